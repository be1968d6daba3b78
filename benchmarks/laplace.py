"""laplace-torch's ``Laplace(...).fit`` with the curvhooks backend against its curvlinops and
BackPACK backends (each on its own copy of the model: BackPACK's hooks stay on the modules it
extends).

GGN, all weights, ``hessian_structure`` ``"full"``, ``"kron"`` and ``"diag"``, on 1,000
digit-sized samples in 10 batches of 100, 10 classes:

- ``mlp``: ``Linear(64, 64)``, ReLU, ``Linear(64, 10)`` (4,810 parameters) on ``[64]``;
- ``cnn``: ``Conv2d(1, 8, 3)``, ReLU, ``Conv2d(8, 8, 3)``, ReLU, flatten, ``Linear(128, 10)``
  (1,962 parameters) on ``[1, 8, 8]``.

Run: ``python -m benchmarks.laplace [--repeats 5] [--problem NAME] [--threads 1]``; writes
docs/benchmarks/laplace.md when it ran every problem. Needs laplace-torch and its peers
(benchmarks/README.md).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.common import optional, plain_backward, problems_parser, run_problems

PROBLEMS = ("mlp", "cnn")
STRUCTURES = ("full", "kron", "diag")
BACKENDS = {
    "curvhooks": ("curvhooks.laplace", "CurvhooksGGN"),
    "curvlinops": ("laplace.curvature", "CurvlinopsGGN"),
    "backpack": ("laplace.curvature", "BackPackGGN"),
}


def _problem(name: str) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        X = torch.randn(1000, 64)
    else:
        model = nn.Sequential(
            nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
            nn.Linear(128, 10),
        )  # fmt: skip
        X = torch.randn(1000, 1, 8, 8)
    y = torch.randint(0, 10, (1000,))
    return model, list(zip(X.split(100), y.split(100), strict=True))


class _Loader(list):
    """The batches, with the ``dataset`` length laplace-torch reads for ``N``."""

    @property
    def dataset(self) -> range:
        return range(sum(len(y) for _, y in self))


def build_methods(problem: str, device: torch.device) -> dict[str, Callable[[], object]]:
    model, batches = _problem(problem)
    model = model.to(device)
    loader = _Loader([(X.to(device), y.to(device)) for X, y in batches])
    loss_fn = nn.CrossEntropyLoss(reduction="sum")

    methods: dict[str, Callable[[], object]] = {"backward": plain_backward(model, loss_fn, loader)}
    if not optional("laplace"):
        return methods
    from laplace import Laplace

    for library, (module, name) in BACKENDS.items():
        backend = getattr(__import__(module, fromlist=[name]), name)
        copied = copy.deepcopy(model)
        for structure in STRUCTURES:

            def fit(backend=backend, copied=copied, structure=structure) -> object:
                options = {"subset_of_weights": "all", "hessian_structure": structure}
                laplace = Laplace(copied, "classification", backend=backend, **options)
                laplace.fit(loader)
                return laplace.H

            methods[f"{library} {structure}"] = fit
    return methods


def _peers_of(method: str) -> tuple[str, ...]:
    if not method.startswith("curvhooks "):
        return ()
    structure = method.split(" ")[1]
    return tuple(f"{peer} {structure}" for peer in BACKENDS if peer != "curvhooks")


def main() -> None:
    args = problems_parser(list(PROBLEMS), repeats=5).parse_args()
    doc = ("laplace", "laplace-torch: Laplace(...).fit by backend (GGN, all weights)")
    run_problems(args, __spec__.name, build_methods, _peers_of, list(PROBLEMS), doc)


if __name__ == "__main__":
    main()
