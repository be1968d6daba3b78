"""How curvhooks scales with intra-op threads: the seed's dense matrices (the visual tour's
Hessian, GGN and empirical Fisher over its three batches), ``DiagGGN`` on the CIFAR-sized
ResNet (``benchmarks.problems.resnet``, batch 64) and ``curvhooks.kfac`` with one product
``@ [D, 10]`` on the MLP (784-512-256-10, batch 128), each beside a plain backward pass on the
same model.

Every round times every method at each thread count (``torch.set_num_threads``), so the
counts are interleaved; medians. Run it on an otherwise idle machine: with another job on
one of two cores, two threads wait on each other.

Run: ``python -m benchmarks.threads [--repeats 10] [--counts 1 2]``; writes
docs/benchmarks/threads.md (``threads-cuda.md`` on a GPU).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import curvhooks
from benchmarks.common import (
    curvhooks_per_step,
    markdown_table,
    plain_backward,
    synchronize,
    write_doc,
)
from benchmarks.dense import tour
from benchmarks.problems import PROBLEMS, on_device, resnet


def workloads(device: torch.device) -> dict[str, Callable[[], object]]:
    """Name -> one call of each measured method, plain backward passes included."""
    model, loss_fn, batches = tour()
    model = model.to(device)
    data = [(X.to(device), y.to(device)) for X, y in batches]

    methods = {"visual tour: backward": plain_backward(model, loss_fn, data)}
    for matrix in (curvhooks.hessian, curvhooks.ggn, curvhooks.empirical_fisher):
        methods[f"visual tour: {matrix.__name__}"] = lambda m=matrix: m(model, loss_fn, data)
    net, loss, X, y = on_device(resnet, device)
    methods["resnet: backward"] = lambda: loss(net(X), y).backward()
    methods["resnet: DiagGGN"] = curvhooks_per_step(net, loss, X, y, curvhooks.DiagGGN)
    mlp, mlp_loss, X_mlp, y_mlp = on_device(PROBLEMS["mlp"], device)
    block = torch.randn(sum(p.numel() for p in mlp.parameters()), 10, device=device)
    methods["mlp: backward"] = lambda: mlp_loss(mlp(X_mlp), y_mlp).backward()
    methods["mlp: kfac @ V"] = lambda: curvhooks.kfac(mlp, mlp_loss, [(X_mlp, y_mlp)]) @ block
    return methods


def time_by_threads(
    methods: dict[str, Callable[[], object]], counts: list[int], repeats: int, device
) -> dict[tuple[str, int], float]:
    """(method, thread count) -> median seconds; every round runs every pair once, after one
    warm-up round."""
    samples: dict[tuple[str, int], list[float]] = {}
    for round_index in range(repeats + 1):
        for count in counts:
            torch.set_num_threads(count)
            for name, method in methods.items():
                synchronize(device)
                start = time.perf_counter()
                method()
                synchronize(device)
                if round_index:
                    samples.setdefault((name, count), []).append(time.perf_counter() - start)
    return {key: sorted(times)[len(times) // 2] for key, times in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    methods = workloads(device)
    medians = time_by_threads(methods, args.counts, args.repeats, device)
    first = args.counts[0]
    header = ["method", *(f"{count} threads, ms" for count in args.counts)]
    header += [f"{first} / {count} threads" for count in args.counts[1:]]
    rows = []
    for name in methods:
        times = [medians[name, count] for count in args.counts]
        rows.append(
            [name, *(f"{t * 1e3:.1f}" for t in times), *(f"{times[0] / t:.2f}" for t in times[1:])]
        )
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    body = (
        f"torch {torch.__version__}, {device_name}, {args.repeats} interleaved rounds; the last "
        "columns are speed-ups (above 1: faster with more threads).\n\n"
        + markdown_table(header, rows)
    )
    print(body)
    print("wrote", write_doc("threads", "Scaling with threads", body))


if __name__ == "__main__":
    main()
