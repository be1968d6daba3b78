"""Adding a batch's factors, diagonals or blocks into a dataset matrix, block by block.

Gram matrices ``F^T F`` of factors are built in row panels, each multiplied only from its
diagonal on, and mirrored once at the end.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from curvhooks import tuning
from curvhooks.dataset.plan import Layout, Structure


def accumulate(
    result: Tensor,
    plan: Layout,
    value_of: Callable[[int], Tensor | None],
    weight: float,
    from_factors: bool,
) -> None:
    """Add ``weight`` times a batch's diagonal, or its blocks: ``F^T F`` from factors F,
    or per-parameter blocks themselves. ``value_of(i)`` is parameter i's factor
    ``[..., *p.shape]`` (rows of its own), diagonal ``p.shape`` or block; ``None`` where the
    parameter did not reach the batch's loss (its module was not called, or its output was
    not used): it adds zeros."""
    if plan.structure is Structure.DIAG:
        for index in range(len(plan.params)):
            value = value_of(index)
            if value is not None:
                rows = slice(plan.offsets[index], plan.offsets[index + 1])
                result[rows].add_(value.flatten(), alpha=weight)
        return
    for block in plan.blocks:
        rows = plan.span(block)
        values = {i: value_of(i) for i in block}
        reached = [i for i in block if values[i] is not None]
        if not from_factors:
            for i in reached:
                own = slice(plan.offsets[i], plan.offsets[i + 1])
                result[own, own].add_(values[i], alpha=weight)
            continue
        if not reached:
            continue
        count = _rows(values[reached[0]], plan.params[reached[0]]).shape[0]
        factor = torch.cat([rows_or_zeros(values[i], plan.params[i], count) for i in block], 1)
        square = result[rows, rows]
        for panel in _row_panels(factor.shape[1]):
            square[panel, panel.start :].addmm_(
                factor[:, panel].T, factor[:, panel.start :], alpha=weight
            )


def rows_or_zeros(factor: Tensor | None, param: nn.Parameter, count: int) -> Tensor:
    """The parameter's factor as rows ``[count, p.numel()]``; zeros where it has none."""
    if factor is not None:
        return _rows(factor, param)
    return param.new_zeros(count, param.numel())


def _row_panels(size: int) -> list[slice]:
    """Equal row panels of at most ``tuning.PANEL`` rows that cover ``[size, size]``."""
    count = max(1, -(-size // tuning.PANEL))
    edges = [size * index // count for index in range(count + 1)]
    return [slice(start, stop) for start, stop in zip(edges, edges[1:])]


def mirror_upper_panels(result: Tensor, plan: Layout) -> None:
    """Copy each block's entries right of its panels' diagonal parts to their mirror images."""
    for block in plan.blocks:
        rows = plan.span(block)
        square = result[rows, rows]
        for panel in _row_panels(square.shape[0]):
            square[panel.stop :, panel].copy_(square[panel, panel.stop :].T)


def _rows(factor: Tensor, param: nn.Parameter) -> Tensor:
    """A factor ``[..., *p.shape]`` as rows ``[R, p.numel()]``."""
    return factor.reshape(-1, param.numel())
