"""Curvature before and after training, on real data: scikit-learn's 8x8 handwritten digits.

A small CNN is trained for a few epochs on CPU. At initialisation and after training the
example computes the Hessian, GGN and empirical Fisher on a fixed subset of the training set
and shows how they change: the matrices, how much of their mass the per-layer blocks hold,
and the top of their spectra. It prints how far the GGN is from the Hessian (their gap is the
residual term: output gradient times the network's second derivative) and the empirical
Fisher from the GGN (they agree only where the model's predictions fit the labels' noise).

Run: ``python examples/digits.py [--out DIR] [--epochs 15]`` (needs ``pip install scikit-learn``,
the ``examples`` extra).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvhooks
import curvhooks.plot

TITLES = {"hessian": "Hessian", "ggn": "GGN", "empirical_fisher": "Empirical Fisher"}


def digits() -> tuple[TensorDataset, TensorDataset]:
    """Train and test sets: images ``[N, 1, 8, 8]`` scaled to [0, 1], labels 0-9."""
    images, labels = load_digits(return_X_y=True)
    X = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    y = torch.tensor(labels)
    return TensorDataset(X[:1500], y[:1500]), TensorDataset(X[1500:], y[1500:])


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def train(model: nn.Module, loss_fn: nn.Module, data: TensorDataset, epochs: int) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(epochs):
        for X, y in DataLoader(data, batch_size=64, shuffle=True):
            optimizer.zero_grad()
            loss_fn(model(X), y).backward()
            optimizer.step()


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    with torch.no_grad():
        X, y = data.tensors
        return (model(X).argmax(1) == y).float().mean().item()


def curvature(model, loss_fn, loader, label: str) -> dict[str, torch.Tensor]:
    start = time.perf_counter()
    found = curvhooks.matrices(model, loss_fn, loader)
    print(
        f"{label}: three {len(found['ggn'])}x{len(found['ggn'])} matrices in "
        f"{time.perf_counter() - start:.2f} s"
    )
    return {TITLES[kind]: matrix for kind, matrix in found.items()}


def spectrum_figure(stages: dict[str, dict[str, torch.Tensor]], top: int) -> Figure:
    """The ``top`` largest eigenvalues of each matrix, at each stage, on a log scale."""
    figure = Figure(figsize=(5 * len(stages), 4), layout="constrained")
    for ax, (stage, named) in zip(figure.subplots(1, len(stages)), stages.items()):
        for title, matrix in named.items():
            eigenvalues = torch.linalg.eigvalsh(matrix.double()).flip(0)[:top]
            ax.semilogy(range(1, top + 1), eigenvalues.abs(), marker="o", label=title)
        ax.set_title(f"top eigenvalues (absolute), {stage}")
        ax.set_xlabel("rank")
        ax.legend()
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("figures"))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--curvature-samples", type=int, default=256)
    args = parser.parse_args()

    torch.manual_seed(0)
    train_set, test_set = digits()
    model, loss_fn = cnn(), nn.CrossEntropyLoss()
    subset = TensorDataset(*(t[: args.curvature_samples] for t in train_set.tensors))
    loader = DataLoader(subset, batch_size=128)
    sizes = curvhooks.layer_sizes(model)
    print(f"parameters: {sum(sizes)} in total, per layer {sizes}")

    stages = {"initialisation": curvature(model, loss_fn, loader, "at initialisation")}
    start = time.perf_counter()
    train(model, loss_fn, train_set, args.epochs)
    print(
        f"trained {args.epochs} epochs in {time.perf_counter() - start:.1f} s, "
        f"test accuracy {accuracy(model, test_set):.3f}"
    )
    stages["after training"] = curvature(model, loss_fn, loader, "after training")

    args.out.mkdir(parents=True, exist_ok=True)
    names = curvhooks.plot.layer_names(model)
    for stage, named in stages.items():
        slug = stage.split()[0]
        figure, _ = curvhooks.plot.matrices(named, layer_sizes=sizes, layer_names=names)
        figure.suptitle(f"digits CNN, {stage}")
        figure.savefig(args.out / f"digits_{slug}.png", dpi=80)
        figure, _ = curvhooks.plot.block_mass(named, sizes, layer_names=names)
        figure.suptitle(f"mass in per-layer blocks, {stage}")
        figure.savefig(args.out / f"digits_block_mass_{slug}.png", dpi=100)
        shares = {
            t: round(1 - curvhooks.plot.block_shares(m, sizes)[-1], 3) for t, m in named.items()
        }
        print(f"{stage}: share of squared Frobenius mass in per-layer blocks {shares}")
    spectrum_figure(stages, top=20).savefig(args.out / "digits_spectrum.png", dpi=100)
    for stage, named in stages.items():
        ggn, hessian, fisher = named["GGN"], named["Hessian"], named["Empirical Fisher"]
        print(
            f"{stage}: ||H - GGN|| / ||H|| = {(hessian - ggn).norm() / hessian.norm():.3f}, "
            f"||EF - GGN|| / ||GGN|| = {(fisher - ggn).norm() / ggn.norm():.3f}"
        )
    print(f"wrote figures to {args.out}/")


if __name__ == "__main__":
    main()
