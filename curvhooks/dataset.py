"""Dataset-level GGN and empirical Fisher from factors the hooks propagate.

One backward pass per batch yields the square-root GGN factor ``V`` ``[C * N_b, D]`` and the
per-sample gradients ``G`` ``[N_b, D]`` of the batch's reduced loss; the matrices accumulate
``V^T V`` and ``G^T G`` block by block into one preallocated result.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from curvhooks.data import (
    DEFAULT_MAX_MEMORY,
    Layout,
    batch_weight,
    batches,
    check_model_mode,
    finish,
    layout,
    model_device,
    reduction_of,
)
from curvhooks.derivatives import LOSS_DERIVATIVES, loss_derivatives, supported_names
from curvhooks.errors import UnsupportedError
from curvhooks.extensions import BatchGrad, DiagGGN, SqrtGGN, SumGradSquared
from curvhooks.hooks import clear_results, extend

GGN, EMPIRICAL_FISHER = "ggn", "empirical_fisher"


def ggn(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Iterable | tuple[Tensor, Tensor],
    params: list[nn.Parameter] | None = None,
    structure: str = "full",
    *,
    max_memory: int = DEFAULT_MAX_MEMORY,
    progress: bool = False,
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

    Returns:
        The GGN of ``L = s * sum_n l_n`` over all samples (``s`` = 1 for ``"sum"``, the
        reduction's factor over the whole data set for ``"mean"``), in the parameters' dtype.
    """
    return hook_matrices(model, loss_fn, data, (GGN,), params, structure, max_memory, progress)[GGN]


def empirical_fisher(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Iterable | tuple[Tensor, Tensor],
    params: list[nn.Parameter] | None = None,
    structure: str = "full",
    *,
    max_memory: int = DEFAULT_MAX_MEMORY,
    progress: bool = False,
) -> Tensor:
    """The empirical Fisher ``s * sum_n grad(l_n) grad(l_n)^T`` over the whole data set.

    ``l_n`` is sample n's loss under reduction ``"sum"`` and ``s`` the whole-dataset
    reduction's factor (1 for ``"sum"``; 1/N for cross-entropy ``"mean"``; 1/(N C) for
    ``MSELoss`` ``"mean"``). Arguments and structures as in ``ggn``.
    """
    kinds = (EMPIRICAL_FISHER,)
    return hook_matrices(model, loss_fn, data, kinds, params, structure, max_memory, progress)[
        EMPIRICAL_FISHER
    ]


def hook_matrices(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Iterable | tuple[Tensor, Tensor],
    kinds: tuple[str, ...],
    params: list[nn.Parameter] | None,
    structure: str,
    max_memory: int,
    progress: bool,
) -> dict[str, Tensor]:
    """GGN and/or empirical Fisher (``kinds``), sharing one backward pass per batch."""
    plan = layout(model, params, structure, max_memory)
    check_model_mode(model)
    reduction = reduction_of(loss_fn)
    derivatives = loss_derivatives(loss_fn)
    if derivatives is None:
        raise UnsupportedError(
            f"loss {type(loss_fn).__name__} is not supported by curvhooks.{'/'.join(kinds)}; "
            f"supported losses: {supported_names(LOSS_DERIVATIVES)}"
        )
    diag = structure == "diag"
    extensions = {
        GGN: DiagGGN() if diag else SqrtGGN(),
        EMPIRICAL_FISHER: SumGradSquared() if diag else BatchGrad(),
    }
    results = {kind: plan.new_result() for kind in kinds}
    total = 0
    with _only_these_require_grad(model, plan.params), extend(
        model, loss_fn, *(extensions[kind] for kind in kinds)
    ):
        for index, (X, y) in enumerate(batches(data, model_device(model), progress)):
            output = model(X)
            torch.autograd.grad(loss_fn(output, y), plan.params, allow_unused=True)
            weight = batch_weight(reduction, len(X), index)
            total += len(X)
            if GGN in kinds:
                _accumulate(results[GGN], plan, extensions[GGN].attribute, weight)
            if EMPIRICAL_FISHER in kinds:
                # grad_batch[n] = s_b grad(l_n), so s_b^2 G^T G would be off by s_b: divide once.
                ef_weight = weight / derivatives.scale(loss_fn, output)
                _accumulate(results[EMPIRICAL_FISHER], plan, extensions[EMPIRICAL_FISHER].attribute, ef_weight)
    clear_results(model)
    finish(results, reduction, total)
    return results


def _accumulate(result: Tensor, plan: Layout, attribute: str, weight: float) -> None:
    """Add ``weight`` times the batch's blocks (``F^T F`` of factors, or diagonals)."""
    if plan.structure == "diag":
        diagonal = torch.cat([getattr(p, attribute).flatten() for p in plan.params])
        result.add_(diagonal, alpha=weight)
        return
    for block in plan.blocks:
        factor = torch.cat([_rows(getattr(plan.params[i], attribute), plan.params[i]) for i in block], 1)
        rows = plan.span(block)
        result[rows, rows].addmm_(factor.T, factor, alpha=weight)


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
