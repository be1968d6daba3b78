"""Second-order extensions against plain backward and BackPACK: ``DiagGGN`` / ``SqrtGGN``
against ``DiagGGNExact`` / ``SqrtGGNExact``, and ``DiagHessian`` against ``DiagHessian``.

``DiagHessian`` runs on the MLP only: on the CNN its Sigmoid over 64 x 16 x 16 units would
need a residual stack of 16384 x 32 x 16384 entries (34 GB), in curvhooks as in BackPACK.
On the residual CNN (``resnet``), BackPACK runs on the copy its converter traces
(``extend(model, use_converter=True)``), curvhooks on the model itself; a method that raises
(an unsupported model) is listed as failed.

The transformer is left out: its exact GGN has a vector per class and token of each sample
(64,000 per sequence). LeNet-5 and the ResNet-8 are as in ``benchmarks.problems``.

Run: ``python -m benchmarks.second_order [--repeats 10] [--problem NAME]``; writes
docs/benchmarks/second_order.md when it ran every problem.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import curvhooks
from benchmarks.common import (
    backpack_step,
    curvhooks_held_open,
    curvhooks_per_step,
    optional,
    problems_main,
)
from benchmarks.problems import PROBLEMS, RESIDUAL, SEQUENCE, on_device


def build_methods(problem: str, device: torch.device) -> dict[str, Callable[[], object]]:
    """Plain backward, curvhooks' and (where installed) BackPACK's steps on ``problem``."""
    model, loss_fn, X, y = on_device(PROBLEMS[problem], device)
    methods = {"backward": lambda: loss_fn(model(X), y).backward()}
    extensions = (curvhooks.DiagGGN, curvhooks.SqrtGGN)
    extensions += (curvhooks.DiagHessian,) if problem == "mlp" else ()
    for extension in extensions:
        methods[f"curvhooks {extension.__name__}"] = curvhooks_per_step(
            model, loss_fn, X, y, extension
        )
    methods["curvhooks SqrtGGN (context held open)"] = curvhooks_held_open(
        model, loss_fn, X, y, curvhooks.SqrtGGN
    )
    if optional("backpack"):
        from backpack.extensions import DiagGGNExact, DiagHessian, SqrtGGNExact

        extensions = (DiagGGNExact, SqrtGGNExact) + ((DiagHessian,) if problem == "mlp" else ())
        for extension in extensions:
            methods[f"backpack {extension.__name__}"] = backpack_step(
                model, loss_fn, X, y, extension, use_converter=problem in RESIDUAL
            )
    return methods


GROUPS = (
    ("curvhooks DiagGGN", "backpack DiagGGN"),
    ("curvhooks SqrtGGN", "backpack SqrtGGN"),
    ("curvhooks DiagHessian", "backpack DiagHessian"),
)


def _peers_of(method: str) -> tuple[str, ...]:
    if method.startswith("curvhooks DiagGGN"):
        return ("backpack DiagGGNExact",)
    if method.startswith("curvhooks SqrtGGN"):
        return ("backpack SqrtGGNExact",)
    if method.startswith("curvhooks DiagHessian"):
        return ("backpack DiagHessian",)
    return ()


def main() -> None:
    title = "Second order (DiagGGN, SqrtGGN, DiagHessian)"
    problems = [name for name in PROBLEMS if name not in SEQUENCE]
    problems_main(__spec__.name, build_methods, _peers_of, "second_order", title, GROUPS, problems)


if __name__ == "__main__":
    main()
