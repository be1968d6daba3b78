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

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

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
    compared with (the fastest of those present). A method that raises on its first call is
    listed as failed, with its error, and left out of the timing (a peer that fails is then
    absent, as one that is not installed). The script ``module`` handles
    ``--memory-of METHOD --problem P`` by calling ``memory_main``. Returns markdown tables.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sections = []
    for problem in problems:
        methods = build_methods(problem, device)
        failed = failures(methods, baseline)
        rows = []
        for index, prefixes in enumerate(groups):
            names = [n for n in methods if n != baseline and n.startswith(prefixes or ("",))]
            names = [baseline, *names] if index == 0 else names
            working = [n for n in names if n not in failed]
            times = time_interleaved({n: methods[n] for n in (baseline, *working)}, device, repeats)
            for name in names:
                if name in failed:
                    rows.append(_failed_row(name, failed[name]))
                    continue
                peak = _peak_memory(module, problem, name, methods, baseline, device)
                rows.append(_row(name, times, peak, peers_of, baseline))
        header = ["method", "median ms", f"x {baseline}", "peak MB over backward", "x fastest peer"]
        sections.append(f"### {problem}\n\n" + markdown_table(header, rows))
        print(sections[-1], "\n", flush=True)
    return f"{environment()}, {repeats} interleaved rounds.\n\n" + "\n\n".join(sections)


def failures(methods: dict[str, Callable[[], object]], baseline: str) -> dict[str, Exception]:
    """Call every method but the baseline once (a warm-up); the errors of those that raise,
    each also printed to stderr."""
    failed = {}
    for name, method in methods.items():
        if name == baseline:
            continue
        try:
            method()
        except Exception as error:  # any error of a method under test is a result to report
            print(f"{name} failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            failed[name] = error
    return failed


def failing_build(
    build: Callable[..., Callable[[], object]],
) -> Callable[..., Callable[[], object]]:
    """Wrap a method builder so that an error while building (say, an unsupported model
    when a context is entered) is raised by the built method's calls instead, for
    ``run_benchmark`` to report, rather than ending the script."""

    @functools.wraps(build)
    def wrapped(*args, **kwargs) -> Callable[[], object]:
        try:
            return build(*args, **kwargs)
        except Exception as error:  # reported when the method is called
            return _raising(error)

    return wrapped


def _raising(error: Exception) -> Callable[[], object]:
    """A method that raises ``error``."""

    def fail() -> None:
        raise error

    return fail


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


def _failed_row(name: str, error: Exception) -> list[str]:
    """A table row for a method that raised ``error``."""
    return [name, f"failed: {type(error).__name__}", "", "", ""]


def memory_main(build_methods, problem: str, method: str) -> None:
    """Subprocess side of ``memory_in_subprocess``: the peak of ``method``'s first call after
    a plain backward pass, results included."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    methods = build_methods(problem, device)
    report_memory(peak_memory_of(methods[method], methods["backward"], device))


def plain_backward(model: nn.Module, loss_fn: nn.Module, data: list) -> Callable[[], None]:
    """The baseline: one plain ``loss_fn(model(X), y).backward()`` per batch of ``data``."""

    def backward() -> None:
        for X, y in data:
            loss_fn(model(X), y).backward()

    return backward


@failing_build
def curvhooks_per_step(model, loss_fn, X, y, extension, route="auto") -> Callable[[], object]:
    """A context per step, on a model of its own (freeing results is part of the step)."""
    import copy

    import curvhooks

    model = copy.deepcopy(model)

    def run() -> None:
        with curvhooks.extend(model, loss_fn, extension(), route=route):
            loss_fn(model(X), y).backward()

    return run


@failing_build
def curvhooks_held_open(model, loss_fn, X, y, extension) -> Callable[[], object]:
    """One context entered once around all steps, as around a training loop: each step writes
    into the previous step's results (on copies of model and loss, whose hooks stay)."""
    import copy

    import curvhooks

    model, loss_fn = copy.deepcopy(model), copy.deepcopy(loss_fn)
    curvhooks.extend(model, loss_fn, extension()).__enter__()
    return lambda: loss_fn(model(X), y).backward()


def backpack_extended(
    model: nn.Module, loss_fn: nn.Module, use_converter: bool = False
) -> tuple[nn.Module, nn.Module]:
    """Copies of ``model`` and ``loss_fn`` extended for BackPACK, with the same weights.

    With ``use_converter`` (needed for models that are not chains, such as residual ones),
    BackPACK traces the model into a new module object, on which it must run.
    """
    import copy

    from backpack import extend

    model = extend(copy.deepcopy(model), use_converter=use_converter)
    return model, extend(copy.deepcopy(loss_fn))


@failing_build
def opacus_step(model, loss_fn, X, y) -> Callable[[], object]:
    """One Opacus step: ``GradSampleModule`` on a copy of ``model``, the previous step's
    per-sample gradients dropped first."""
    import copy

    from opacus import GradSampleModule

    wrapped = GradSampleModule(copy.deepcopy(model), loss_reduction="mean")

    def run() -> None:
        for p in wrapped.parameters():
            p.grad_sample = None
        loss_fn(wrapped(X), y).backward()

    return run


@failing_build
def backpack_step(
    model, loss_fn, X, y, extension, use_converter: bool = False
) -> Callable[[], object]:
    """One BackPACK step with ``extension`` on extended copies of model and loss (see
    ``backpack_extended`` for ``use_converter``)."""
    from backpack import backpack

    model, loss_fn = backpack_extended(model, loss_fn, use_converter)

    def run() -> None:
        with backpack(extension()):
            loss_fn(model(X), y).backward()

    return run


def problems_parser(problems: list[str], repeats: int) -> argparse.ArgumentParser:
    """The command line of a benchmark over ``problems``: ``--repeats``, ``--problem`` (one
    problem only; no table is written) and ``--memory-of`` (for ``memory_in_subprocess``)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--problem", choices=problems, help="run this problem only, write nothing")
    parser.add_argument("--memory-of", help="internal: one method's peak memory, printed as JSON")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads (default 1: steady on a shared CPU)",
    )
    return parser


def run_problems(
    args: argparse.Namespace,
    module: str,
    build_methods: Callable[[str, torch.device], dict[str, Callable[[], object]]],
    peers_of: Callable[[str], tuple[str, ...]],
    problems: list[str],
    doc: tuple[str, str],
    groups: tuple[tuple[str, ...], ...] = ((),),
) -> None:
    """Run what ``problems_parser``'s ``args`` ask for; writes ``docs/benchmarks/<name>.md``
    (``doc`` is name and title) only when every problem ran."""
    torch.set_num_threads(args.threads)
    if args.memory_of:
        return memory_main(build_methods, args.problem, args.memory_of)
    chosen = [args.problem] if args.problem else problems
    tables = run_benchmark(module, build_methods, chosen, args.repeats, peers_of, groups)
    if not args.problem:
        print("wrote", write_doc(*doc, tables))


def problems_main(
    module: str,
    build_methods: Callable[[str, torch.device], dict[str, Callable[[], object]]],
    peers_of: Callable[[str], tuple[str, ...]],
    doc_name: str,
    title: str,
    groups: tuple[tuple[str, ...], ...] = ((),),
    problems: list[str] | None = None,
) -> None:
    """The command line of a benchmark over ``problems`` (default: all shared problems of
    ``benchmarks.problems``; see ``problems_parser``); writes
    ``docs/benchmarks/<doc_name>.md`` when every problem ran."""
    from benchmarks.problems import PROBLEMS

    problems = list(PROBLEMS) if problems is None else problems
    args = problems_parser(problems, repeats=10).parse_args()
    run_problems(args, module, build_methods, peers_of, problems, (doc_name, title), groups)
