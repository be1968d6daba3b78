"""The graph route (autograd's batched vector-Jacobian products) against the chain route
(the modules' own Jacobians) on chains, where both apply: hook-level ``DiagGGN`` and
``SqrtGGN`` on the MLP and the CNN, and the dataset-level GGN of the visual tour.

Run: ``python -m benchmarks.routes [--repeats 10] [--problem mlp|cnn|visual-tour]``; writes
docs/benchmarks/routes.md. The "x fastest peer" column is the graph route's time over the
chain route's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import curvhooks
from benchmarks.common import curvhooks_per_step, plain_backward, problems_parser, run_problems
from benchmarks.dense import tour
from benchmarks.problems import PROBLEMS, on_device

ROUTES = ("chain", "graph")


def build_methods(problem: str, device: torch.device) -> dict[str, Callable[[], object]]:
    if problem == "visual-tour":
        return _dataset_methods(device)
    model, loss_fn, X, y = on_device(PROBLEMS[problem], device)
    methods = {"backward": lambda: loss_fn(model(X), y).backward()}
    for extension in (curvhooks.DiagGGN, curvhooks.SqrtGGN):
        for route in ROUTES:
            methods[f"{extension.__name__} {route}"] = curvhooks_per_step(
                model, loss_fn, X, y, extension, route
            )
    return methods


def _dataset_methods(device: torch.device) -> dict[str, Callable[[], object]]:
    """One backward pass per batch, and the tour's GGN by either route."""
    model, loss_fn, batches = tour()
    model = model.to(device)
    data = [(X.to(device), y.to(device)) for X, y in batches]

    methods = {"backward": plain_backward(model, loss_fn, data)}
    for route in ROUTES:
        methods[f"ggn {route}"] = lambda route=route: curvhooks.ggn(
            model, loss_fn, data, route=route
        )
    return methods


def peers_of(method: str) -> tuple[str, ...]:
    return (method.replace("graph", "chain"),) if method.endswith("graph") else ()


def main() -> None:
    problems = ["mlp", "cnn", "visual-tour"]
    args = problems_parser(problems, repeats=10).parse_args()
    doc = ("routes", "Graph route against chain route (on chains)")
    run_problems(args, "benchmarks.routes", build_methods, peers_of, problems, doc)


if __name__ == "__main__":
    main()
