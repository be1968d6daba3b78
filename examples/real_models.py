"""Curvature of the networks people train: a CIFAR ResNet-8 (BatchNorm in eval mode, residual
blocks, global average pooling) and a two-layer transformer encoder (embeddings, LayerNorm,
attention from torch functions, a GELU MLP, cross-entropy over a sequence).

For each model, one backward pass gives per-sample gradients (``BatchGrad``) and the GGN's
diagonal (``DiagGGN``); ``curvhooks.ggn(structure="layer")`` gives each layer's dense GGN
block over the data set. Prints per-layer figures and writes ``real_models.png``: each
layer's share of the GGN's trace, and the distribution of per-sample gradient norms.

Run: ``python examples/real_models.py [--out DIR]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

import curvhooks
from curvhooks import BatchGrad, DiagGGN

try:
    from examples.architectures import Transformer, resnet8
except ImportError:  # run as a script: python examples/real_models.py
    from architectures import Transformer, resnet8

Data = list[tuple[Tensor, Tensor]]


def resnet_setting() -> tuple[nn.Module, nn.Module, Data]:
    """ResNet-8 four channels wide on 128 random CIFAR-sized images with 10 classes, in two
    batches of 64; BatchNorm statistics from one pass in train mode."""
    torch.manual_seed(0)
    X, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    model = resnet8(width=4)
    with torch.no_grad():
        model(X)  # running statistics of the data, then eval mode for curvature
    return model.eval(), nn.CrossEntropyLoss(), list(zip(X.split(64), y.split(64)))


def transformer_setting() -> tuple[nn.Module, nn.Module, Data]:
    """A two-layer transformer (width 8, 2 heads, 50 tokens and classes) on 64 random
    sequences of 16 tokens, each token labelled with the next (a language model's task), in
    two batches of 32."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 50, (64, 17))
    model = Transformer(vocabulary=50, tokens=16, width=8, heads=2, layers=2, classes=50)
    X, y = tokens[:, :-1], tokens[:, 1:]
    return model, nn.CrossEntropyLoss(), list(zip(X.split(32), y.split(32)))


def layer_figures(model: nn.Module, loss_fn: nn.Module, data: Data) -> dict[str, object]:
    """Per layer (module with parameters): parameter count, the GGN's trace from ``DiagGGN``
    and from the dense layer block of ``curvhooks.ggn`` (the same number, two ways), and the
    block's largest eigenvalue; and the norms of the per-sample gradients ``[N]``.

    The loss is the mean over the whole data set: each batch's ``DiagGGN`` (of its batch
    mean) is weighted by its share of the samples, and per-sample gradients are scaled back
    from the batch mean to each sample's own loss.
    """
    total = sum(len(y) for _, y in data)
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    diagonal, norms = {name: 0.0 for name, _ in params}, []
    for X, y in data:
        with curvhooks.extend(model, loss_fn, BatchGrad(), DiagGGN()):
            loss_fn(model(X), y).backward()
        for name, p in params:
            diagonal[name] += p.diag_ggn.sum().item() * len(y) / total
        squared = sum(p.grad_batch.flatten(1).square().sum(1) for _, p in params)
        norms.append(squared.sqrt() * len(y))
        model.zero_grad()

    ggn = curvhooks.ggn(model, loss_fn, data, structure="layer")  # [D, D], zero off the blocks
    layers, start = {}, 0
    for layer, names in _parameter_names_by_layer(params).items():
        size = sum(p.numel() for name, p in params if name in names)
        block = ggn[start : start + size, start : start + size]
        start += size
        layers[f"{layer} ({type(model.get_submodule(layer)).__name__})"] = {
            "parameters": size,
            "trace (DiagGGN)": sum(diagonal[name] for name in names),
            "trace (block)": block.trace().item(),
            "largest eigenvalue": torch.linalg.eigvalsh(block)[-1].item(),
        }
    return {"layers": layers, "norms": torch.cat(norms)}


def _parameter_names_by_layer(params: list[tuple[str, Tensor]]) -> dict[str, list[str]]:
    """Parameter names grouped by the module that holds them, in order."""
    groups: dict[str, list[str]] = {}
    for name, _ in params:
        groups.setdefault(name.rpartition(".")[0], []).append(name)
    return groups


def report(title: str, found: dict[str, object]) -> None:
    print(f"\n{title}")
    total = sum(row["parameters"] for row in found["layers"].values())
    print(f"{'layer':<36}{'params':>8}{'tr(DiagGGN)':>13}{'tr(block)':>11}{'max eig':>10}")
    for layer, row in found["layers"].items():
        print(
            f"{layer:<36}{row['parameters']:>8}{row['trace (DiagGGN)']:>13.4f}"
            f"{row['trace (block)']:>11.4f}{row['largest eigenvalue']:>10.4f}"
        )
    norms = found["norms"]
    print(f"{total} parameters in total")
    print(f"per-sample gradient norms: median {norms.median():.4f}, max {norms.max():.4f}")


def plot(results: dict[str, dict[str, object]], path: Path) -> None:
    """Per model (a column): each layer's share of the GGN trace (horizontal bars, one row
    per layer, named), and the per-sample gradient norms (histogram)."""
    rows = max(len(found["layers"]) for found in results.values())
    figure = Figure(
        figsize=(7 * len(results), 0.3 * rows + 4.5),
        layout="constrained",
    )
    shares_row, norms_row = figure.subfigures(2, 1, height_ratios=[0.3 * rows, 3])
    for shares, norms, (title, found) in zip(
        shares_row.subplots(1, len(results)), norms_row.subplots(1, len(results)), results.items()
    ):
        layers = found["layers"]
        traces = torch.tensor([row["trace (block)"] for row in layers.values()])
        shares.barh(range(len(layers)), (traces / traces.sum()).numpy())
        shares.set_yticks(range(len(layers)), list(layers), fontsize=9)
        shares.invert_yaxis()
        shares.set_xlabel("share of the GGN trace")
        shares.set_title(f"{title}: share of the GGN trace per layer")
        norms.hist(found["norms"].numpy(), bins=20)
        norms.set_xlabel("per-sample gradient norm")
        norms.set_ylabel("samples")
        norms.set_title(f"{title}: per-sample gradient norms")
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("figures"))
    args = parser.parse_args()
    results = {}
    for title, setting in (("ResNet-8", resnet_setting), ("Transformer", transformer_setting)):
        start = time.perf_counter()
        results[title] = layer_figures(*setting())
        report(f"{title} ({time.perf_counter() - start:.1f} s)", results[title])
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out / "real_models.png")
    print(f"\nwrote {args.out / 'real_models.png'}")


if __name__ == "__main__":
    main()
