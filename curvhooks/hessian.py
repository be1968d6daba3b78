"""The exact Hessian over a data set.

Two routes. The hooks give the per-parameter blocks and the diagonal in one backward pass
per batch (``DiagHessian``, ``HessianBlock``) for chains of supported modules. Plain
autograd gives every structure for any model: Hessian-vector products ``H v`` are
reverse-over-reverse derivatives (one ``vjp`` of ``grad``, linearised once per batch and
block) of the loss as a function of the flat parameters of one block, vectorised over many
directions at once with ``vmap`` in chunks of ``chunk_size`` directions, which bounds memory.
The autograd route is independent of the hook machinery: it works for any differentiable
model and any scalar loss module, supported or not.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap

from curvhooks.data import (
    DEFAULT_MAX_MEMORY,
    HESSIAN,
    Layout,
    batch_weight,
    batches,
    check_model_mode,
    check_same_layout,
    finish,
    layout,
    model_device,
    process_group_of,
    reduction_of,
    unwrap,
)
from curvhooks.dataset import hook_matrices
from curvhooks.hooks import supports_chain

ROUTES = ("auto", "hooks", "autograd")


def hessian(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Iterable | tuple[Tensor, Tensor],
    params: list[nn.Parameter] | None = None,
    structure: str = "full",
    *,
    chunk_size: int = 256,
    max_memory: int = DEFAULT_MAX_MEMORY,
    progress: bool = False,
    route: str = "auto",
    process_group: object = None,
) -> Tensor:
    """The exact Hessian of the whole-dataset loss ``L = s * sum_n l_n``.

    Arguments, structures and batch weighting as in ``curvhooks.ggn``; ``"layer"`` and
    ``"param"`` compute only the diagonal blocks, ``"diag"`` the exact diagonal ``[D]``.
    ``chunk_size`` directions share one vectorised Hessian-vector product (autograd route).
    ``route``: ``"hooks"`` (structures ``"param"``, ``"diag"``; a chain of supported
    modules), ``"autograd"`` (anything), or ``"auto"``: the hooks where they apply.
    ``process_group`` combines processes as in ``curvhooks.ggn``.
    """
    model = unwrap(model)
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if route == "hooks" or (
        route == "auto" and structure in ("param", "diag") and supports_chain(model, loss_fn)
    ):
        return hook_matrices(
            model,
            loss_fn,
            data,
            (HESSIAN,),
            params,
            structure,
            max_memory,
            progress,
            process_group,
        )[HESSIAN]
    plan = layout(model, params, structure, max_memory)
    check_model_mode(model)
    reduction = reduction_of(loss_fn)
    group = process_group_of(process_group, reduction)
    check_same_layout(plan, group)
    result = plan.new_result()
    total = 0
    for index, (X, y) in enumerate(batches(data, model_device(model), progress)):
        weight = batch_weight(reduction, len(X), index)
        total += len(X)
        for block in plan.blocks:
            _add_block(
                result,
                plan,
                block,
                _loss_of_block(model, loss_fn, X, y, plan, block),
                weight,
                chunk_size,
            )
    finish({HESSIAN: result}, reduction, total, group)
    return result


def _loss_of_block(model, loss_fn, X, y, plan: Layout, block: list[int]):
    """The batch loss as a function of the block's flat parameters (others held fixed)."""
    names = {id(p): name for name, p in model.named_parameters()}
    fixed = {name: p.detach() for name, p in model.named_parameters()}
    block_params = [plan.params[i] for i in block]

    def loss(flat: Tensor) -> Tensor:
        pieces = flat.split([p.numel() for p in block_params])
        values = {names[id(p)]: piece.view_as(p) for p, piece in zip(block_params, pieces)}
        return loss_fn(functional_call(model, {**fixed, **values}, (X,)), y)

    return loss, torch.cat([p.detach().flatten() for p in block_params])


def _add_block(result, plan: Layout, block, loss_and_point, weight: float, chunk_size: int) -> None:
    """Add ``weight`` times the block's Hessian (or its diagonal) to ``result``."""
    loss, point = loss_and_point
    _, gradient_vjp = vjp(grad(loss), point)

    rows = plan.span(block)
    size = point.numel()
    for start in range(0, size, chunk_size):
        stop = min(start + chunk_size, size)
        directions = torch.zeros(stop - start, size, dtype=point.dtype, device=point.device)
        directions[:, start:stop].fill_diagonal_(1)
        (columns,) = vmap(gradient_vjp)(directions)  # [k, size]: rows start..stop of H
        if plan.structure == "diag":
            result[rows][start:stop].add_(columns[:, start:stop].diagonal(), alpha=weight)
        else:
            result[rows, rows][start:stop].add_(columns, alpha=weight)
