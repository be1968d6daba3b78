"""Per-sample gradients: curvhooks ``BatchGrad`` against plain backward and peers.

Run: ``python -m benchmarks.per_sample [--repeats 10] [--problem NAME]``; writes
docs/benchmarks/per_sample.md when it ran every problem. On the residual ``resnet`` BackPACK's
``BatchGrad`` runs without its converter (first order needs none).
Peers (optional): ``torch.func`` ``vmap(grad)``, BackPACK ``BatchGrad``, Opacus
``GradSampleModule``; see benchmarks/README.md to install them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import functional_call, grad, vmap

from benchmarks.common import (
    backpack_step,
    curvhooks_held_open,
    curvhooks_per_step,
    opacus_step,
    optional,
    problems_main,
)
from benchmarks.problems import PROBLEMS, on_device
from curvhooks import BatchGrad


def build_methods(problem: str, device: torch.device) -> dict[str, Callable[[], object]]:
    model, loss_fn, X, y = on_device(PROBLEMS[problem], device)

    def backward() -> None:
        loss_fn(model(X), y).backward()

    methods = {
        "backward": backward,
        "curvhooks (context per step)": curvhooks_per_step(model, loss_fn, X, y, BatchGrad),
        "curvhooks (context held open)": curvhooks_held_open(model, loss_fn, X, y, BatchGrad),
        "torch.func vmap(grad)": _vmap_grad(model, loss_fn, X, y),
    }
    if optional("backpack"):
        from backpack.extensions import BatchGrad as BackpackBatchGrad

        methods["backpack BatchGrad"] = backpack_step(model, loss_fn, X, y, BackpackBatchGrad)
    if optional("opacus"):
        methods["opacus GradSampleModule"] = opacus_step(model, loss_fn, X, y)
    return methods


def _vmap_grad(model, loss_fn, X, y):
    params = {name: p.detach() for name, p in model.named_parameters()}
    sum_loss = type(loss_fn)(reduction="sum")

    def sample_loss(params, x, target):  # a mean over all N (N * T for sequences) targets
        return sum_loss(functional_call(model, params, (x[None],)), target[None]) / y.numel()

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    return lambda: per_sample(params, X, y)


PEERS = ("torch.func vmap(grad)", "backpack BatchGrad", "opacus GradSampleModule")


def _peers_of(method: str) -> tuple[str, ...]:
    return PEERS if method.startswith("curvhooks") else ()


def main() -> None:
    problems_main(
        __spec__.name, build_methods, _peers_of, "per_sample", "Per-sample gradients (BatchGrad)"
    )


if __name__ == "__main__":
    main()
