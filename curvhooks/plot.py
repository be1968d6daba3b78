"""Plots of curvature matrices and of their block structure (headless: no pyplot needed)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import Tensor, nn

from curvhooks.dataset.plan import layers

DIVERGING = "RdBu_r"
LOG_OFFSET = 1e-5
"""Added to ``|x|`` before ``log10`` in the ``"logabs"`` transform, so that zeros have a colour."""
PANEL_INCHES = 7.0
AXIS_LABEL = "parameter index"
NAME_FONTSIZE = 9


@dataclass(frozen=True)
class Transform:
    """What a panel shows of a matrix.

    Attributes:
        function: ``[D, D]`` entries -> ``[D, D]`` values to colour.
        label: The colorbar's label, naming the transform of an entry ``x``.
        signed: Whether the values' sign is meaningful: then values of both signs get a
            diverging colormap centred at zero.
    """

    function: Callable[[np.ndarray], np.ndarray]
    label: str
    signed: bool


TRANSFORMS: dict[str, Transform] = {
    "logabs": Transform(
        lambda m: np.log10(np.abs(m) + LOG_OFFSET),
        "log10(|x| + 1e-5), x: matrix entry",
        signed=False,
    ),
    "none": Transform(lambda m: m, "x: matrix entry", signed=True),
}


def matrices(
    named: dict[str, Tensor],
    layer_sizes: Sequence[int] | None = None,
    transform: str | Callable[[Tensor], Tensor] = "logabs",
    label: str | None = None,
    *,
    layer_names: Sequence[str] | None = None,
) -> tuple[Figure, list[Axes]]:
    """One panel per matrix in a row, on one shared color scale, with one colorbar.

    Values of both signs (``"none"``, or a callable's) get a diverging colormap centred at
    zero (red positive, blue negative) and black boundary lines; otherwise viridis from the
    smallest to the largest value and white lines. Both axes of every panel are labelled
    ``"parameter index"``.

    Args:
        named: ``{title: [D, D] matrix}``; all matrices share D.
        layer_sizes: Parameters per layer (e.g. ``curvhooks.layer_sizes(model)``, or
            ``p.numel()`` per parameter for blocks per weight and bias); thin dashed lines
            mark the boundaries between layers (none at the edges, one per distinct boundary,
            so zero sizes add none).
        transform: ``"logabs"`` (``log10(|x| + 1e-5)``), ``"none"``, or a callable
            matrix -> matrix.
        label: The colorbar's label; defaults to the transform written out (e.g.
            ``"log10(|x| + 1e-5), x: matrix entry"``; a callable by its name: ``"sign(x)"``).
        layer_names: One name per entry of ``layer_sizes`` (e.g.
            ``curvhooks.plot.layer_names(model)``), written right of each panel at the middle
            of its layer's rows.

    Returns:
        The figure and its matrix axes.

    Raises:
        ValueError: If ``named`` is empty, ``transform`` unknown, or ``layer_names`` not one
            per layer size.
    """
    if not named:
        raise ValueError("named must hold at least one matrix")
    shown = _transform(transform)
    sizes = list(layer_sizes or [])
    if layer_names is not None and len(layer_names) != len(sizes):
        raise ValueError(
            f"layer_names must name each of the {len(sizes)} layer_sizes, got "
            f"{len(layer_names)} names; pass one name per size"
        )
    images = {title: shown.function(_numpy(matrix)) for title, matrix in named.items()}
    scale = _color_scale(list(images.values()), shown.signed)
    figure = Figure(figsize=(PANEL_INCHES * len(images) + 1.5, PANEL_INCHES), layout="constrained")
    axes = list(figure.subplots(1, len(images), squeeze=False)[0])
    for ax, (title, image) in zip(axes, images.items()):
        drawn = ax.imshow(image, interpolation="nearest", **scale)
        ax.set_title(title)
        ax.set_xlabel(AXIS_LABEL)
        ax.set_ylabel(AXIS_LABEL)
        _mark_layers(ax, sizes, layer_names, image.shape[0], _line_color(scale["cmap"]))
    figure.colorbar(drawn, ax=axes, label=label or shown.label, shrink=0.8)
    return figure, axes


def layer_names(model: nn.Module, params: list[nn.Parameter] | None = None) -> list[str]:
    """A name per entry of ``curvhooks.layer_sizes(model, params)``: the module's name and
    class, e.g. ``"features.0 (Conv2d)"``, for ``matrices(layer_names=...)``."""
    return [name for name, _ in layers(model, params)]


def layer_boundaries(layer_sizes: Sequence[int], dim: int) -> list[int]:
    """Distinct cumulative layer sizes strictly between 0 and ``dim``."""
    return sorted({edge for edge in accumulate(layer_sizes) if 0 < edge < dim})


def _line_color(cmap: str) -> str:
    """Boundary lines that show on the colormap: black on the diverging one (white at
    zero), white on viridis."""
    return "black" if cmap == DIVERGING else "white"


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


def _transform(transform: str | Callable[[Tensor], Tensor]) -> Transform:
    if callable(transform):

        def function(matrix: np.ndarray) -> np.ndarray:
            return _numpy(transform(torch.from_numpy(matrix)))

        name = getattr(transform, "__name__", "f")
        return Transform(function, f"{name}(x), x: matrix entry", signed=True)
    if transform not in TRANSFORMS:
        raise ValueError(
            f"transform must be one of {tuple(TRANSFORMS)} or a callable, got {transform!r}"
        )
    return TRANSFORMS[transform]


def _color_scale(images: list[np.ndarray], signed: bool) -> dict[str, object]:
    """``imshow``'s colormap and limits shared by ``images``: symmetric about zero on the
    diverging colormap where ``signed`` values have both signs, else the values' range."""
    low = min(float(np.nanmin(image)) for image in images)
    high = max(float(np.nanmax(image)) for image in images)
    if signed and low < 0 < high:
        bound = max(-low, high)
        return {"cmap": DIVERGING, "vmin": -bound, "vmax": bound}
    return {"cmap": "viridis", "vmin": low, "vmax": high}


def _mark_layers(
    ax: Axes, sizes: list[int], names: Sequence[str] | None, dim: int, color: str
) -> None:
    """Dashed lines at the boundaries between layers; the names, if any, right of the panel
    at the middle of each nonempty layer's block."""
    for boundary in layer_boundaries(sizes, dim):
        ax.axhline(boundary - 0.5, color=color, linestyle="--", linewidth=0.6)
        ax.axvline(boundary - 0.5, color=color, linestyle="--", linewidth=0.6)
    if names is None:
        return
    ends = list(accumulate(sizes))
    named = [(end - size / 2 - 0.5, name) for end, size, name in zip(ends, sizes, names) if size]
    right = ax.secondary_yaxis("right")
    right.set_yticks([middle for middle, _ in named], [name for _, name in named])
    right.tick_params(labelsize=NAME_FONTSIZE, length=0)


def _numpy(matrix: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(matrix, Tensor):
        return matrix.detach().cpu().double().numpy()
    return np.asarray(matrix, dtype=np.float64)
