"""Dataset-level matrices from what the hooks propagate.

One backward pass per batch yields the square-root GGN factor ``V`` ``[C * N_b, D]`` and the
per-sample gradients ``G`` ``[N_b, D]`` of the batch's reduced loss; the matrices accumulate
``V^T V`` and ``G^T G`` block by block into one preallocated result. The same pass can yield
the exact Hessian's per-parameter blocks or diagonal (``HessianBlock``, ``DiagHessian``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from curvhooks.data import (
    DEFAULT_MAX_MEMORY,
    EMPIRICAL_FISHER,
    GGN,
    HESSIAN,
    Layout,
    batch_weight,
    batches,
    finish,
    model_device,
    prepare,
    unwrap,
)
from curvhooks.derivatives import LOSS_DERIVATIVES, loss_derivatives, supported_names
from curvhooks.errors import UnsupportedError
from curvhooks.extensions import (
    BatchGrad,
    DiagGGN,
    DiagHessian,
    Extension,
    HessianBlock,
    SqrtGGN,
    SumGradSquared,
)
from curvhooks.hooks import extend, results_preserved

FACTORS: dict[str, tuple[type[Extension], type[Extension]]] = {
    GGN: (DiagGGN, SqrtGGN),
    EMPIRICAL_FISHER: (SumGradSquared, BatchGrad),
}
"""Per kind, the extension for ``structure="diag"`` and the one whose factor F gives F^T F."""
BLOCKS = {HESSIAN: (DiagHessian, HessianBlock)}
"""Per kind, the extension for ``structure="diag"`` and the one giving per-parameter blocks."""


def ggn(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Iterable | tuple[Tensor, Tensor],
    params: list[nn.Parameter] | None = None,
    structure: str = "full",
    *,
    max_memory: int = DEFAULT_MAX_MEMORY,
    progress: bool = False,
    process_group: object = None,
) -> Tensor:
    """The generalized Gauss-Newton ``sum_n J_n^T H_n J_n`` of the whole-dataset loss.

    Args:
        model: A model of supported modules.
        loss_fn: ``CrossEntropyLoss`` or ``MSELoss``, reduction ``"mean"`` or ``"sum"``.
        data: An iterable of ``(X, y)`` batches (e.g. a ``DataLoader``) or one ``(X, y)`` pair.
        params: Parameters to differentiate (default: all that require grad, in
            ``model.parameters()`` order); D is their total size.
        structure: ``"full"``, ``"layer"`` or ``"param"`` (``[D, D]``, zero off the diagonal
            blocks), or ``"diag"`` (``[D]``).
        max_memory: Largest dense result in bytes; a larger one raises ``ValueError``.
        progress: Show a progress bar over the batches.
        process_group: Under ``torch.distributed``, the processes whose data sets together
            form the whole data set (default: all, when ``torch.distributed`` is
            initialised); each passes its own ``data`` and receives the combined matrix.

    Returns:
        The GGN of ``L = s * sum_n l_n`` over all samples (``s`` = 1 for ``"sum"``, the
        reduction's factor over the whole data set for ``"mean"``), in the parameters' dtype.
    """
    return hook_matrices(
        model, loss_fn, data, (GGN,), params, structure, max_memory, progress, process_group
    )[GGN]


def empirical_fisher(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Iterable | tuple[Tensor, Tensor],
    params: list[nn.Parameter] | None = None,
    structure: str = "full",
    *,
    max_memory: int = DEFAULT_MAX_MEMORY,
    progress: bool = False,
    process_group: object = None,
) -> Tensor:
    """The empirical Fisher ``s * sum_n grad(l_n) grad(l_n)^T`` over the whole data set.

    ``l_n`` is sample n's loss under reduction ``"sum"`` and ``s`` the whole-dataset
    reduction's factor (1 for ``"sum"``; 1/N for cross-entropy ``"mean"``; 1/(N C) for
    ``MSELoss`` ``"mean"``). Arguments and structures as in ``ggn``.
    """
    kinds = (EMPIRICAL_FISHER,)
    return hook_matrices(
        model, loss_fn, data, kinds, params, structure, max_memory, progress, process_group
    )[EMPIRICAL_FISHER]


def hook_matrices(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Iterable | tuple[Tensor, Tensor],
    kinds: tuple[str, ...],
    params: list[nn.Parameter] | None,
    structure: str,
    max_memory: int,
    progress: bool,
    process_group: object = None,
) -> dict[str, Tensor]:
    """GGN, empirical Fisher and (structures ``"param"``, ``"diag"``) Hessian, as ``kinds``
    asks, sharing one backward pass per batch."""
    model = unwrap(model)
    plan, reduction, group = prepare(model, loss_fn, params, structure, max_memory, process_group)
    derivatives = loss_derivatives(loss_fn)
    if derivatives is None:
        raise UnsupportedError(
            f"loss {type(loss_fn).__name__} is not supported by curvhooks.{'/'.join(kinds)}; "
            f"supported losses: {supported_names(LOSS_DERIVATIVES)}"
        )
    if HESSIAN in kinds and structure not in ("param", "diag"):
        raise ValueError(
            f"the hooks give the Hessian's per-parameter blocks or diagonal, not "
            f"structure={structure!r}; use structure='param' or 'diag', or the autograd route"
        )
    diag = structure == "diag"
    extensions = {kind: {**FACTORS, **BLOCKS}[kind][0 if diag else 1]() for kind in kinds}
    results = {kind: plan.new_result() for kind in kinds}
    total = 0
    with (
        results_preserved(model),  # the user's own results stay as they were
        _only_these_require_grad(model, plan.params),
        extend(model, loss_fn, *(extensions[kind] for kind in kinds)),
    ):
        for index, (X, y) in enumerate(batches(data, model_device(model), progress)):
            output = model(X)
            torch.autograd.grad(loss_fn(output, y), plan.params, allow_unused=True)
            weight = batch_weight(reduction, len(X), index)
            total += len(X)
            for kind in kinds:
                if kind == EMPIRICAL_FISHER:
                    # grad_batch[n] = s_b grad(l_n): s_b^2 G^T G is off by s_b, divide once.
                    kind_weight = weight / derivatives.scale(loss_fn, output)
                else:
                    kind_weight = weight
                _accumulate(
                    results[kind], plan, extensions[kind].attribute, kind_weight, kind in FACTORS
                )
    if structure != "diag":
        for kind in set(kinds) & set(FACTORS):
            _mirror_upper_tiles(results[kind], plan)
    finish(results, reduction, total, group)
    return results


def _accumulate(
    result: Tensor, plan: Layout, attribute: str, weight: float, from_factors: bool
) -> None:
    """Add ``weight`` times the batch's diagonal, or its blocks: ``F^T F`` from factors F,
    or the per-parameter blocks themselves."""
    if plan.structure == "diag":
        diagonal = torch.cat([getattr(p, attribute).flatten() for p in plan.params])
        result.add_(diagonal, alpha=weight)
        return
    for block in plan.blocks:
        rows = plan.span(block)
        if not from_factors:
            result[rows, rows].add_(getattr(plan.params[block[0]], attribute), alpha=weight)
            continue
        factor = torch.cat(
            [_rows(getattr(plan.params[i], attribute), plan.params[i]) for i in block], 1
        )
        for tile_rows, tile_columns in _upper_tiles(factor.shape[1]):
            result[rows, rows][tile_rows, tile_columns].addmm_(
                factor[:, tile_rows].T, factor[:, tile_columns], alpha=weight
            )


TILE = 2048
"""Side of the tiles in which Gram matrices ``F^T F`` are built: above one tile, only the
tiles on and above the diagonal are multiplied (about half the work) and then mirrored."""


def _upper_tiles(size: int) -> list[tuple[slice, slice]]:
    """``(rows, columns)`` of the tiles on and above the diagonal of a ``[size, size]``
    matrix."""
    starts = range(0, size, TILE)
    return [
        (slice(row, row + TILE), slice(column, column + TILE))
        for row in starts
        for column in starts
        if row <= column
    ]


def _mirror_upper_tiles(result: Tensor, plan: Layout) -> None:
    """Copy each block's tiles above the diagonal to their mirror images below it."""
    for block in plan.blocks:
        rows = plan.span(block)
        square = result[rows, rows]
        for tile_rows, tile_columns in _upper_tiles(square.shape[0]):
            if tile_rows != tile_columns:
                square[tile_columns, tile_rows].copy_(square[tile_rows, tile_columns].T)


def _rows(factor: Tensor, param: nn.Parameter) -> Tensor:
    """A factor ``[..., *p.shape]`` as rows ``[R, p.numel()]``."""
    return factor.reshape(-1, param.numel())


class _only_these_require_grad:
    """Temporarily stop the other parameters from requiring grad, so that no work is spent
    on them; restores every flag on exit."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter]) -> None:
        selected = {id(p) for p in params}
        self._others = [p for p in model.parameters() if p.requires_grad and id(p) not in selected]

    def __enter__(self) -> None:
        for param in self._others:
            param.requires_grad_(False)

    def __exit__(self, *exc_info: object) -> None:
        for param in self._others:
            param.requires_grad_(True)
