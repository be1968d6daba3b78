"""Plots of curvature matrices and of their block structure (headless: no pyplot needed)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import accumulate

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import Tensor

TRANSFORMS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], str]] = {
    "logabs": (lambda m: np.log10(np.abs(m) + 1e-5), "Logarithmic absolute entries"),
    "none": (lambda m: m, "Unaltered matrix entries"),
}
PANEL_INCHES = 7.0


def matrices(
    named: dict[str, Tensor],
    layer_sizes: Sequence[int] | None = None,
    transform: str | Callable[[Tensor], Tensor] = "logabs",
    label: str | None = None,
) -> tuple[Figure, list[Axes]]:
    """One panel per matrix in a row, on one shared color scale, with one colorbar.

    Args:
        named: ``{title: [D, D] matrix}``; all matrices share D.
        layer_sizes: Parameters per layer (e.g. ``curvhooks.layer_sizes(model)``); thin white
            dashed lines mark the boundaries between layers (none at the edges, one per
            distinct boundary, so layers without parameters add none).
        transform: ``"logabs"`` (``log10(|x| + 1e-5)``), ``"none"``, or a callable
            matrix -> matrix.
        label: The colorbar's label; defaults to the transform's (a callable's name).

    Returns:
        The figure and its matrix axes.
    """
    if not named:
        raise ValueError("named must hold at least one matrix")
    function, default_label = _transform(transform)
    images = {title: function(_numpy(matrix)) for title, matrix in named.items()}
    low = min(float(np.nanmin(image)) for image in images.values())
    high = max(float(np.nanmax(image)) for image in images.values())
    figure = Figure(figsize=(PANEL_INCHES * len(images) + 1.5, PANEL_INCHES), layout="constrained")
    axes = list(figure.subplots(1, len(images), squeeze=False)[0])
    for ax, (title, image) in zip(axes, images.items()):
        shown = ax.imshow(image, vmin=low, vmax=high, cmap="viridis", interpolation="nearest")
        ax.set_title(title)
        for boundary in layer_boundaries(layer_sizes or [], image.shape[0]):
            ax.axhline(boundary - 0.5, color="white", linestyle="--", linewidth=0.6)
            ax.axvline(boundary - 0.5, color="white", linestyle="--", linewidth=0.6)
    figure.colorbar(shown, ax=axes, label=label or default_label, shrink=0.8)
    return figure, axes


def layer_boundaries(layer_sizes: Sequence[int], dim: int) -> list[int]:
    """Distinct cumulative layer sizes strictly between 0 and ``dim``."""
    return sorted({edge for edge in accumulate(layer_sizes) if 0 < edge < dim})


def block_shares(matrix: Tensor, layer_sizes: Sequence[int]) -> list[float]:
    """Share of the squared Frobenius mass in each layer's diagonal block (layers with
    parameters, in order), followed by the share off the blocks; the shares sum to 1."""
    squared = matrix.detach().double().square()
    total = squared.sum()
    shares, start = [], 0
    for size in (s for s in layer_sizes if s > 0):
        shares.append(float(squared[start : start + size, start : start + size].sum() / total))
        start += size
    return shares + [1.0 - sum(shares)]


def block_mass(
    named: dict[str, Tensor], layer_sizes: Sequence[int], layer_names: Sequence[str] | None = None
) -> tuple[Figure, Axes]:
    """Horizontal stacked bars: per matrix, the share of squared Frobenius mass in each
    layer's diagonal block and off the blocks, which a block-diagonal approximation drops."""
    sizes = [size for size in layer_sizes if size > 0]
    names = list(layer_names or [f"layer {i + 1}" for i in range(len(sizes))])
    figure = Figure(figsize=(8, 1.2 + 0.6 * len(named)), layout="constrained")
    ax = figure.subplots()
    colors = [f"C{i}" for i in range(len(sizes))] + ["lightgray"]
    for row, matrix in enumerate(named.values()):
        left = 0.0
        for share, color in zip(block_shares(matrix, layer_sizes), colors):
            ax.barh(row, share, left=left, color=color)
            left += share
    ax.set_yticks(range(len(named)), list(named))
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of squared Frobenius mass")
    handles = [Patch(color=color) for color in colors]
    ax.legend(
        handles,
        names + ["off the blocks"],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.35),
        ncol=len(colors),
        frameon=False,
    )
    return figure, ax


def spectrum(
    densities: dict[str, tuple[Tensor, Tensor]],
    eigenvalues: dict[str, Tensor] | None = None,
    floor: float = 1e-7,
    ax: Axes | None = None,
) -> tuple[Figure, Axes]:
    """Spectral densities on a log scale, with the top eigenvalues as vertical lines.

    Args:
        densities: ``{label: (grid, density)}`` (``curvhooks.spectral_density``).
        eigenvalues: ``{label: values}`` to mark, in the colour of the density with the same
            label (``curvhooks.eigenpairs``).
        floor: Densities are drawn from this value up (a log scale has no zero).
        ax: Axes to draw into (default: those of a new figure).

    Returns:
        The figure and the axes.
    """
    if not densities:
        raise ValueError("densities must hold at least one (grid, density) pair")
    if ax is None:
        ax = Figure(figsize=(8, 4.5), layout="constrained").subplots()
    colors = {label: f"C{index}" for index, label in enumerate(densities)}
    for label, (grid, density) in densities.items():
        values = np.maximum(_numpy(density), floor)
        ax.plot(_numpy(grid), values, color=colors[label], label=label)
    for label, values in (eigenvalues or {}).items():
        for index, value in enumerate(_numpy(values)):
            ax.axvline(
                value,
                color=colors.get(label, "gray"),
                linestyle="--",
                linewidth=0.8,
                label=f"{label}: top eigenvalues" if index == 0 else None,
            )
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("spectral density")
    ax.legend()
    return ax.figure, ax


def _transform(transform) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    if callable(transform):
        name = getattr(transform, "__name__", "transformed")
        return lambda m: _numpy(transform(torch.from_numpy(m))), f"{name} of entries"
    if transform not in TRANSFORMS:
        raise ValueError(
            f"transform must be one of {tuple(TRANSFORMS)} or a callable, got {transform!r}"
        )
    return TRANSFORMS[transform]


def _numpy(matrix: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(matrix, Tensor):
        return matrix.detach().cpu().double().numpy()
    return np.asarray(matrix, dtype=np.float64)
