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
from curvhooks.hooks import ChainBackward, extend, results_preserved, supports_chain

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


@torch.enable_grad()  # also inside a caller's torch.no_grad() block
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
    asks, sharing one backward pass per batch (run by the hooks themselves on a chain of
    supported modules, by autograd otherwise)."""
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
    context = ChainBackward if supports_chain(model, loss_fn) else extend
    with (
        results_preserved(model),  # the user's own results stay as they were
        _only_these_require_grad(model, plan.params),
        context(model, loss_fn, *(extensions[kind] for kind in kinds)) as hooks,
    ):
        for index, (X, y) in enumerate(batches(data, model_device(model), progress)):
            output = hooks.run_batch(X, y)
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
            _mirror_upper_panels(results[kind], plan)
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
        square = result[rows, rows]
        for panel in _row_panels(factor.shape[1]):
            square[panel, panel.start :].addmm_(
                factor[:, panel].T, factor[:, panel.start :], alpha=weight
            )


PANEL = 512
"""Most rows of a panel: Gram matrices ``F^T F`` are built in row panels, each multiplied
only with the columns from the diagonal on (about half the work once there are several),
then mirrored."""


def _row_panels(size: int) -> list[slice]:
    """Equal row panels of at most ``PANEL`` rows that cover ``[size, size]``."""
    count = max(1, -(-size // PANEL))
    edges = [size * index // count for index in range(count + 1)]
    return [slice(start, stop) for start, stop in zip(edges, edges[1:])]


def _mirror_upper_panels(result: Tensor, plan: Layout) -> None:
    """Copy each block's entries right of its panels' diagonal parts to their mirror images."""
    for block in plan.blocks:
        rows = plan.span(block)
        square = result[rows, rows]
        for panel in _row_panels(square.shape[0]):
            square[panel.stop :, panel].copy_(square[panel, panel.stop :].T)


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
