"""A visual tour of curvature matrices: Hessian, GGN and empirical Fisher of a small CNN.

The setting of the published tutorial this project grew out of: 50 random images of shape
(3, 10, 10) with 5 classes, in batches of 20, 20 and 10; a 683-parameter CNN; cross-entropy
averaged over the whole data set. Writes three figures to ``--out`` (default ``figures/``):
``visual_tour_logabs.png`` (log10(|x| + 1e-5) of the entries x), ``visual_tour_unaltered.png``
(the entries on a colormap centred at zero), both with the layers' boundaries and names, and
``visual_tour_kfac.png``: the GGN beside its KFAC and EKFAC approximations, with the
boundaries of their blocks (one per weight and per bias).

Run: ``python examples/visual_tour.py [--out DIR]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy
import torch
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvhooks
import curvhooks.plot

NUM_SAMPLES, NUM_CLASSES, BATCH_SIZE = 50, 5, 20
TITLES = {"hessian": "Hessian", "ggn": "GGN", "empirical_fisher": "Empirical Fisher"}


def setting() -> tuple[nn.Module, nn.Module, DataLoader]:
    """Model, loss and data, seeded as in the tutorial (the model after the data set)."""
    torch.manual_seed(0)
    numpy.random.seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    X = torch.rand(NUM_SAMPLES, 3, 10, 10)
    y = torch.randint(0, NUM_CLASSES, (NUM_SAMPLES,))
    loader = DataLoader(TensorDataset(X, y), batch_size=BATCH_SIZE)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 5, padding=2, stride=2),
        nn.Sigmoid(),
        nn.Conv2d(4, 1, 3, padding=1),
        nn.Flatten(),
        nn.Linear(25, NUM_CLASSES),
    ).to(device)
    return model, nn.CrossEntropyLoss(reduction="mean"), loader


def compute(model: nn.Module, loss_fn: nn.Module, loader: DataLoader) -> dict[str, torch.Tensor]:
    """The three matrices, each timed on its own; prints the times."""
    functions = {
        "hessian": curvhooks.hessian,
        "ggn": curvhooks.ggn,
        "empirical_fisher": curvhooks.empirical_fisher,
    }
    found = {}
    for kind, function in functions.items():
        start = time.perf_counter()
        found[kind] = function(model, loss_fn, loader)
        print(f"{TITLES[kind]:>16}: {time.perf_counter() - start:.3f} s")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("figures"))
    args = parser.parse_args()

    model, loss_fn, loader = setting()
    sizes = curvhooks.layer_sizes(model)
    print(f"parameters: {sum(sizes)} in total, per layer {sizes}")
    found = compute(model, loss_fn, loader)

    args.out.mkdir(parents=True, exist_ok=True)
    named = {TITLES[kind]: matrix for kind, matrix in found.items()}
    layers = {"layer_sizes": sizes, "layer_names": curvhooks.plot.layer_names(model)}
    for transform, name in (("logabs", "logabs"), ("none", "unaltered")):
        figure, _ = curvhooks.plot.matrices(named, transform=transform, **layers)
        save(figure, args.out / f"visual_tour_{name}.png")

    kronecker = kronecker_approximations(model, loss_fn, loader, found["ggn"])
    per_param = {name: p.numel() for name, p in model.named_parameters()}  # KFAC's blocks
    figure, _ = curvhooks.plot.matrices(
        kronecker, layer_sizes=list(per_param.values()), layer_names=list(per_param)
    )
    save(figure, args.out / "visual_tour_kfac.png")


def save(figure: Figure, path: Path) -> None:
    figure.savefig(path, dpi=100)
    print(f"wrote {path}")


def kronecker_approximations(
    model: nn.Module, loss_fn: nn.Module, loader: DataLoader, ggn: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The GGN beside its KFAC (type-2) and EKFAC approximations, dense; prints each one's
    relative Frobenius distance to the GGN."""
    named = {"GGN": ggn}
    for title, eigen_correction in (("KFAC", False), ("EKFAC", True)):
        start = time.perf_counter()
        matrix = curvhooks.kfac(model, loss_fn, loader, eigen_correction=eigen_correction)
        named[title] = matrix.to_dense()
        distance = torch.linalg.matrix_norm(named[title] - ggn) / torch.linalg.matrix_norm(ggn)
        print(
            f"{title:>16}: {time.perf_counter() - start:.3f} s, "
            f"relative Frobenius distance to the GGN {distance:.3f}"
        )
    return named


if __name__ == "__main__":
    main()
