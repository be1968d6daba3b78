"""The generic fallback's overhead: the same networks with their linear layers as
``nn.Linear`` (analytic derivatives) and as a user's layer calling ``F.linear`` (served by
``torch.func`` on each call), through ``BatchGrad`` and ``DiagGGN(mc_samples=1)``. The
fallback forms each vector's per-sample products (``[N, *p.shape]``) one vector at a time, so
the exact ``DiagGGN`` (one vector per class, and per position for sequences) costs that many
times the Monte Carlo one.

Run: ``python -m benchmarks.generic [--repeats 10] [--problem NAME]``; writes
docs/benchmarks/generic.md when it ran every problem.

- ``mlp``: 784-512-256-10 with ReLU, batch 128, cross-entropy.
- ``tokens``: two linear layers (64-256-64) with GELU on 32 sequences of 64 tokens, a linear
  head to 10 classes per token, cross-entropy over every token.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import curvhooks_per_step, problems_main
from curvhooks import BatchGrad, DiagGGN


class OwnLinear(nn.Module):
    """A user's linear layer: curvhooks has no derivatives for it."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = (
            nn.Parameter(layer.weight.detach()),
            nn.Parameter(layer.bias.detach()),
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.GELU())
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layers(x)).transpose(1, 2)


def mlp() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    return model, torch.randn(128, 784), torch.randint(0, 10, (128,))


def tokens() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    return Tokens(), torch.randn(32, 64, 64), torch.randint(0, 10, (32, 64))


PROBLEMS = {"mlp": mlp, "tokens": tokens}


def _own_layers(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` replaced by an ``OwnLinear`` of the same
    weights."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                setattr(parent, name, OwnLinear(child))
    return model


def build_methods(problem: str, device: torch.device) -> dict[str, Callable[[], object]]:
    model, X, y = PROBLEMS[problem]()
    loss_fn = nn.CrossEntropyLoss()
    own = _own_layers(model)
    model, own, X, y = model.to(device), own.to(device), X.to(device), y.to(device)

    def backward() -> None:
        loss_fn(model(X), y).backward()

    methods = {"backward": backward}
    for name, extension in EXTENSIONS.items():
        for layers, network in (("nn.Linear", model), ("generic", own)):
            methods[f"curvhooks {name}, {layers}"] = curvhooks_per_step(
                network, loss_fn, X, y, extension
            )
    return methods


EXTENSIONS = {"BatchGrad": BatchGrad, "DiagGGN(mc_samples=1)": lambda: DiagGGN(mc_samples=1)}


def _peers_of(method: str) -> tuple[str, ...]:
    """The generic layer against the analytic one."""
    if method.endswith(", generic"):
        return (method.replace(", generic", ", nn.Linear"),)
    return ()


def main() -> None:
    problems_main(
        __spec__.name,
        build_methods,
        _peers_of,
        "generic",
        "The generic fallback against analytic derivatives",
        problems=list(PROBLEMS),
    )


if __name__ == "__main__":
    main()
