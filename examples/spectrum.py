"""The sharpness and spectra of a small ResNet before and after training, on real data:
scikit-learn's handwritten digits, upscaled to 16x16.

A CIFAR-style ResNet-8 (8 channels, BatchNorm in eval mode for curvature) is trained for a
few epochs on CPU. Before and after, on a fixed subset of the training set, the example
computes the top eigenvalues of the Hessian (block Lanczos) and of the GGN (exactly, from the
Gram matrix of its square-root factors), both traces (exact: the GGN's diagonal from the
hooks, the Hessian's from ``DiagHessian``) and both spectral densities (stochastic Lanczos
quadrature), all as matrix-free operators. It prints them and draws the four densities with
the top eigenvalues in one figure.

Run: ``python examples/spectrum.py [--out DIR] [--epochs 3]`` (needs scikit-learn, the
``examples`` extra).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvhooks
import curvhooks.plot

try:
    from examples.architectures import resnet8
except ImportError:  # run as a script: python examples/spectrum.py
    from architectures import resnet8


def digits() -> TensorDataset:
    """The digits as images ``[N, 1, 16, 16]`` in [0, 1] (bilinear upscaling), labels 0-9."""
    images, labels = load_digits(return_X_y=True)
    X = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    return TensorDataset(F.interpolate(X, size=16, mode="bilinear"), torch.tensor(labels))


def train(model: nn.Module, loss_fn: nn.Module, data: TensorDataset, epochs: int) -> None:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(epochs):
        for X, y in DataLoader(data, batch_size=64, shuffle=True):
            optimizer.zero_grad()
            loss_fn(model(X), y).backward()
            optimizer.step()
    model.eval()


def curvature(model: nn.Module, loss_fn: nn.Module, batches: list, top: int) -> dict:
    """Top eigenvalues, traces and spectral densities of the Hessian and the GGN."""
    found = {}
    for name, operator in {
        "Hessian": curvhooks.HessianOperator(model, loss_fn, batches),
        "GGN": curvhooks.GGNOperator(model, loss_fn, batches),
    }.items():
        values, _ = curvhooks.eigenpairs(operator, top, tolerance=1e-3)
        found[name] = {
            "eigenvalues": values,
            "trace": curvhooks.trace(operator).value,
            "density": curvhooks.spectral_density(operator, probes=2, steps=24),
        }
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("figures"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=256, help="samples for the curvature")
    parser.add_argument("--top", type=int, default=5, help="top eigenvalues")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # small problems: one thread runs steadiest on a shared CPU
    data = digits()
    subset = data.tensors[0][: args.samples], data.tensors[1][: args.samples]
    batches = list(zip(subset[0].split(64), subset[1].split(64), strict=True))
    model, loss_fn = resnet8(width=8, in_channels=1).eval(), nn.CrossEntropyLoss()
    print(f"ResNet-8 with {sum(p.numel() for p in model.parameters())} parameters")
    results = {}
    for stage in ("at initialisation", f"after {args.epochs} epochs"):
        if stage.startswith("after"):
            train(model, loss_fn, data, args.epochs)
        start = time.perf_counter()
        results[stage] = curvature(model, loss_fn, batches, args.top)
        for name, found in results[stage].items():
            values = ", ".join(f"{value:.4g}" for value in found["eigenvalues"].tolist())
            print(
                f"{stage:>17s} {name:7s} top eigenvalues {values}; trace "
                f"{float(found['trace']):.4g}"
            )
        print(f"{stage:>17s} curvature in {time.perf_counter() - start:.1f} s")
    figure = Figure(figsize=(12, 4.5), layout="constrained")
    for ax, (stage, found) in zip(figure.subplots(1, 2), results.items()):
        curvhooks.plot.spectrum(
            {name: entry["density"] for name, entry in found.items()},
            {name: entry["eigenvalues"] for name, entry in found.items()},
            ax=ax,
        )
        ax.set_title(stage)
    args.out.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out / "spectrum.png", dpi=120)
    print(f"wrote {args.out / 'spectrum.png'}")


if __name__ == "__main__":
    main()
