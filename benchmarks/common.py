"""Shared benchmark harness: interleaved timing in one process, peak memory per method.

Times: every method runs once per round, rounds repeat, the table reports medians and their
ratio to a baseline measured in the same rounds (the machines are noisy; ratios of
interleaved medians are stable). Peak memory: the growth during a method's first call over
what a plain backward pass left in use, its results included; on CPU of the peak resident
set, in a fresh subprocess per method; on CUDA of ``torch.cuda.max_memory_allocated``, in
the benchmark's own process (the allocator's peak can be reset, a process's cannot).
Tables measured on CUDA go to ``<name>-cuda.md`` beside the CPU ones.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    methods: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per call of each method, rounds interleaved."""
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for round_index in range(warmup + repeats):
        for name, method in methods.items():
            synchronize(device)
            start = time.perf_counter()
            method()
            synchronize(device)
            if round_index >= warmup:
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def _resident_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_of(
    method: Callable[[], object], baseline: Callable[[], object], device: torch.device
) -> int:
    """Bytes by which ``method``'s peak exceeds memory in use after ``baseline`` ran."""
    baseline()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        in_use = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        method()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - in_use
    in_use = _resident_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set (VmHWM)
    method()
    return _resident_bytes("VmHWM") - in_use


def memory_in_subprocess(module: str, problem: str, method: str) -> int | None:
    """Run ``python -m MODULE --memory-of METHOD --problem PROBLEM`` in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-m", module, "--memory-of", method, "--problem", problem],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    if result.returncode != 0:
        print(result.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


def report_memory(peak_bytes: int) -> None:
    """What a ``--memory-of`` subprocess prints for ``memory_in_subprocess``."""
    print(json.dumps({"peak_bytes": peak_bytes}))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def megabytes(count: int | None) -> str:
    return "n/a" if count is None else f"{count / 2**20:.1f}"


def environment() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads"


def write_doc(name: str, title: str, body: str) -> Path:
    """Write ``docs/benchmarks/<name>.md`` (``<name>-cuda.md`` when measured on CUDA) and
    return its path."""
    DOCS.mkdir(parents=True, exist_ok=True)
    if torch.cuda.is_available():
        name, title = f"{name}-cuda", f"{title}, CUDA"
    path = DOCS / f"{name}.md"
    path.write_text(f"# {title}\n\n{body}\n")
    return path


def optional(module: str) -> bool:
    """Whether an optional peer package is importable."""
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def run_benchmark(
    module: str,
    build_methods: Callable[[str, torch.device], dict[str, Callable[[], object]]],
    problems: list[str],
    repeats: int,
    peers_of: Callable[[str], tuple[str, ...]],
    groups: tuple[tuple[str, ...], ...] = ((),),
    baseline: str = "backward",
) -> str:
    """Time the methods of every problem and measure their peak memory.

    Each group (method-name prefixes; ``()`` takes all) is timed interleaved with the
    baseline, apart from the other groups, so that a method that allocates gigabytes does not
    slow its neighbours. ``peers_of(method)`` names the peer methods that ``method`` is
    compared with (the fastest of those present). The script ``module`` handles
    ``--memory-of METHOD --problem P`` by calling ``memory_main``. Returns markdown tables.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sections = []
    for problem in problems:
        methods = build_methods(problem, device)
        rows = []
        for prefixes in groups:
            names = [n for n in methods if n != baseline and n.startswith(prefixes or ("",))]
            names = names if rows else [baseline, *names]
            times = time_interleaved({n: methods[n] for n in (baseline, *names)}, device, repeats)
            for name in names:
                peak = _peak_memory(module, problem, name, methods, baseline, device)
                rows.append(_row(name, times, peak, peers_of, baseline))
        header = ["method", "median ms", f"x {baseline}", "peak MB over backward", "x fastest peer"]
        sections.append(f"### {problem}\n\n" + markdown_table(header, rows))
        print(sections[-1], "\n", flush=True)
    return f"{environment()}, {repeats} interleaved rounds.\n\n" + "\n\n".join(sections)


def _peak_memory(module, problem, name, methods, baseline, device) -> int | None:
    """``name``'s peak memory over the baseline's: on CUDA here, on CPU in a subprocess."""
    if device.type == "cuda":
        return peak_memory_of(methods[name], methods[baseline], device)
    return memory_in_subprocess(module, problem, name)


def _row(name, times, peak, peers_of, baseline) -> list[str]:
    """One table row: times relative to the baseline and fastest peer of the same rounds."""
    peers = [peer for peer in peers_of(name) if peer in times]
    fastest = min(peers, key=times.__getitem__) if peers else None
    return [
        name,
        f"{times[name] * 1e3:.1f}",
        f"{times[name] / times[baseline]:.2f}",
        megabytes(peak),
        "" if fastest is None else f"{times[name] / times[fastest]:.2f} ({fastest})",
    ]


def memory_main(build_methods, problem: str, method: str) -> None:
    """Subprocess side of ``memory_in_subprocess``: the peak of ``method``'s first call after
    a plain backward pass, results included."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    methods = build_methods(problem, device)
    report_memory(peak_memory_of(methods[method], methods["backward"], device))


def curvhooks_per_step(model, loss_fn, X, y, extension) -> Callable[[], object]:
    """A context per step, on a model of its own (freeing results is part of the step)."""
    import copy

    import curvhooks

    model = copy.deepcopy(model)

    def run() -> None:
        with curvhooks.extend(model, loss_fn, extension()):
            loss_fn(model(X), y).backward()

    return run


def curvhooks_held_open(model, loss_fn, X, y, extension) -> Callable[[], object]:
    """One context entered once around all steps, as around a training loop: each step writes
    into the previous step's results (on copies of model and loss, whose hooks stay)."""
    import copy

    import curvhooks

    model, loss_fn = copy.deepcopy(model), copy.deepcopy(loss_fn)
    curvhooks.extend(model, loss_fn, extension()).__enter__()
    return lambda: loss_fn(model(X), y).backward()


def backpack_step(model, loss_fn, X, y, extension) -> Callable[[], object]:
    """One BackPACK step with ``extension`` on extended copies of model and loss."""
    import copy

    from backpack import backpack, extend

    model, loss_fn = extend(copy.deepcopy(model)), extend(copy.deepcopy(loss_fn))

    def run() -> None:
        with backpack(extension()):
            loss_fn(model(X), y).backward()

    return run


def problems_main(
    module: str,
    build_methods: Callable[[str, torch.device], dict[str, Callable[[], object]]],
    peers_of: Callable[[str], tuple[str, ...]],
    doc_name: str,
    title: str,
    groups: tuple[tuple[str, ...], ...] = ((),),
) -> None:
    """The command line of a benchmark over the shared problems (``--repeats``, ``--problem``,
    ``--memory-of``); writes ``docs/benchmarks/<doc_name>.md`` when every problem ran."""
    import argparse

    from benchmarks.problems import PROBLEMS

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--problem", choices=list(PROBLEMS))
    parser.add_argument("--memory-of")
    args = parser.parse_args()
    if args.memory_of:
        return memory_main(build_methods, args.problem, args.memory_of)
    problems = [args.problem] if args.problem else list(PROBLEMS)
    tables = run_benchmark(module, build_methods, problems, args.repeats, peers_of, groups)
    if not args.problem:
        print("wrote", write_doc(doc_name, title, tables))
