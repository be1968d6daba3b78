"""The autograd route: the exact Hessian over a data set for any model, by plain autograd.

Hessian-vector products ``H v`` are reverse-over-reverse derivatives (one ``vjp`` of ``grad``,
linearised once per batch and task) of the loss as a function of flat parameters, vectorised
over many directions at once with ``vmap`` in chunks of ``chunk_size`` directions, which
bounds memory. For an ``nn.Sequential`` (that does not override ``forward``) it uses the
chain: the columns of one stage's parameters need only the tail of the network from that
stage on (its input computed once), and their rows of earlier stages follow by symmetry, so
directions into later layers cost less. On a GPU, where each vectorised call has a fixed cost
of many kernel launches, a full Hessian whose directions fit in one chunk is computed on the
whole model in one call per batch instead. The route is independent of the hook machinery:
it works for any differentiable model and any scalar loss module, supported or not.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import grad, jacrev, vjp, vmap

from curvhooks import tuning
from curvhooks._compat import math_attention
from curvhooks.dataset.blocks import accumulate, mirror_upper_panels
from curvhooks.dataset.plan import Kind, Layout, Structure, model_device
from curvhooks.dataset.seeding import seeded
from curvhooks.dataset.weighting import DatasetSum, map_tensors
from curvhooks.derivatives import (
    LOSS_DERIVATIVES,
    LossDerivatives,
    loss_derivatives,
    loss_gradient,
    supported_names,
)
from curvhooks.errors import UnsupportedError
from curvhooks.functional import agree, check_weights, parameters_replaced


@torch.enable_grad()  # also inside a caller's torch.no_grad() block
def autograd_hessian(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Iterable | tuple[Tensor, Tensor],
    plan: Layout,
    total: DatasetSum,
    chunk_size: int | None,
    progress: bool,
) -> Tensor:
    """The Hessian of the whole-dataset loss in ``plan``'s structure."""
    result = plan.new_result()
    device = model_device(model)
    sizes = tuning.HESSIAN_CHUNK_SIZES
    chunk_size = chunk_size or sizes.get(device.type, sizes["cpu"])
    stages = _stages(model)
    if device.type == "cuda" and plan.structure is Structure.FULL and plan.dim <= chunk_size:
        stages = [model]  # one call per batch costs less there than one per stage
    with math_attention():  # second derivatives through F.scaled_dot_product_attention
        for X, y, weight, _ in total.batches(data, device, progress):
            stage_inputs = _stage_inputs(stages, X)
            if total.keeps_loss:
                with torch.no_grad():
                    total.add_loss(stages[-1](stage_inputs[-1]), y, weight)
            for task in _tasks(plan, stages):
                _add_task(result, plan, task, stages, stage_inputs, loss_fn, y, weight, chunk_size)
    total.finish({Kind.HESSIAN: result})
    return result


@dataclass(frozen=True)
class _Task:
    """The Hessian's entries in rows ``rows`` and columns ``columns`` (parameter indices; the
    columns are among the rows), computed on the model's tail from stage ``start`` on."""

    rows: list[int]
    columns: list[int]
    start: int


def _stages(model: nn.Module) -> list[nn.Module]:
    """The model as a chain of stages: a (nested) ``nn.Sequential`` flattened; otherwise,
    or where stages share a parameter, the model itself."""
    if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
        return [model]
    stages = [stage for child in model for stage in _stages(child)]
    owners = [id(p) for stage in stages for p in stage.parameters()]
    return stages if len(owners) == len(set(owners)) else [model]


def _stage_inputs(stages: list[nn.Module], X: Tensor) -> list[Tensor]:
    """The input of each stage, without gradients."""
    inputs = [X]
    with torch.no_grad():
        for stage in stages[:-1]:
            inputs.append(stage(inputs[-1]))
    return inputs


def _tasks(plan: Layout, stages: list[nn.Module]) -> list[_Task]:
    """Per diagonal block: its own rows and columns, on the tail from its first stage. For
    ``"full"``, per stage: its parameters' columns, with rows of its own and later stages
    only. Parameters of a stage do not change earlier stages' outputs, so their entries in
    rows of earlier stages are those of the earlier stages' tasks, mirrored."""
    stage_of = {id(p): k for k, stage in enumerate(stages) for p in stage.parameters()}
    first = [stage_of[id(p)] for p in plan.params]
    if plan.structure is not Structure.FULL:
        return [_Task(block, block, min(first[i] for i in block)) for block in plan.blocks]
    return [
        _Task(
            rows=[i for i, stage in enumerate(first) if stage >= start],
            columns=[i for i, stage in enumerate(first) if stage == start],
            start=start,
        )
        for start in sorted(set(first))
    ]


def _add_task(result, plan, task, stages, stage_inputs, loss_fn, y, weight, chunk_size) -> None:
    """Add ``weight`` times the task's Hessian entries, and their mirror images, to ``result``."""
    tail = nn.Sequential(*stages[task.start :])
    fixed = {id(p): p.detach() for p in tail.parameters()}
    row_params = [plan.params[i] for i in task.rows]
    tail_input = stage_inputs[task.start]

    def loss(flat: Tensor) -> Tensor:
        pieces = flat.split([p.numel() for p in row_params])
        values = {id(p): piece.view_as(p) for p, piece in zip(row_params, pieces)}
        with parameters_replaced(tail, {**fixed, **values}):
            return loss_fn(tail(tail_input), y)

    point = torch.cat([p.detach().flatten() for p in row_params])
    _, hessian_vjp = vjp(grad(loss), point)
    later = [i for i in task.rows if i not in task.columns]
    rows, columns, later_rows = (_flat(plan, part) for part in (task.rows, task.columns, later))
    positions = _flat(plan, task.columns, within=task.rows)
    later_positions = _flat(plan, later, within=task.rows)
    for start in range(0, len(columns), chunk_size):
        chunk = slice(start, start + chunk_size)
        count = len(positions[chunk])
        directions = torch.zeros(count, len(point), dtype=point.dtype, device=point.device)
        directions[torch.arange(count), positions[chunk]] = 1
        (entries,) = vmap(hessian_vjp)(directions)  # [k, rows]: H[rows, column], per column
        entries = entries * weight  # not in place: zeros of an unused parameter are expanded
        if plan.structure is Structure.DIAG:
            result[columns[chunk]] += entries[torch.arange(count), positions[chunk]]
            continue
        _add(result, rows, columns[chunk], entries.T)
        _add(result, columns[chunk], later_rows, entries[:, later_positions])


def _add(result: Tensor, rows: Tensor, columns: Tensor, values: Tensor) -> None:
    """``result[rows, columns] += values``, through a view where both are ranges."""
    if _is_range(rows) and _is_range(columns):
        block = result[rows[0] : rows[0] + len(rows), columns[0] : columns[0] + len(columns)]
        block.add_(values)
    elif len(rows) and len(columns):
        result.index_put_((rows[:, None], columns[None, :]), values, accumulate=True)


def _is_range(indices: Tensor) -> bool:
    """Whether ``indices`` is a non-empty run of consecutive increasing integers."""
    if not len(indices):
        return False
    start = int(indices[0])
    return torch.equal(indices, torch.arange(start, start + len(indices), device=indices.device))


def _flat(plan: Layout, indices: list[int], within: list[int] | None = None) -> Tensor:
    """The rows of the listed parameters in the result; given ``within``, their positions in
    the concatenation of the ``within`` parameters instead."""
    order = range(len(plan.params)) if within is None else within
    starts, position = {}, 0
    for i in order:
        starts[i] = plan.offsets[i] if within is None else position
        position += plan.params[i].numel()
    pieces = [torch.arange(starts[i], starts[i] + plan.params[i].numel()) for i in indices]
    flat = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    return flat.to(plan.params[0].device)


@torch.enable_grad()  # also inside a caller's torch.no_grad() block
def autograd_factor_matrices(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Iterable | tuple[Tensor, Tensor],
    kinds: tuple[Kind, ...],
    plan: Layout,
    total: DatasetSum,
    progress: bool,
    mc_samples: int | None = None,
    seed: int | None = None,
) -> dict[Kind, Tensor]:
    """GGN and empirical Fisher of any model from per-sample Jacobians (``torch.func``).

    Per batch, the Jacobians ``J_n`` ``[N, *out, *p]`` of each sample's output in the
    parameters give the GGN factor ``S^T J`` (S the loss's square root, as on the hooks
    route; with ``mc_samples``, sampled as there from ``seed`` plus the batch's index) and
    the per-sample gradients ``g_n^T J`` (g the output gradient of the batch's reduced
    loss); their Gram matrices accumulate as on the hooks route.
    """
    derivatives = loss_derivatives(loss_fn)
    if derivatives is None:
        raise UnsupportedError(
            f"loss {type(loss_fn).__name__} is not supported by the GGN and the empirical "
            f"Fisher; supported losses: {supported_names(LOSS_DERIVATIVES)}"
        )
    results = {kind: plan.new_result() for kind in kinds}
    batches = total.batches(data, model_device(model), progress)
    for index, (X, y, weight, _) in enumerate(batches):
        output, jacobians = per_sample_jacobians(model, plan.params, X)
        total.add_loss(output, y, weight)
        reason = derivatives.unsupported_reason(loss_fn, output, y)
        if reason is not None:
            raise UnsupportedError(f"loss {type(loss_fn).__name__} is not supported: {reason}")
        for kind in kinds:
            if kind is Kind.GGN:
                with seeded(None if seed is None else seed + index, model_device(model)):
                    stack = _ggn_root(derivatives, loss_fn, output, y, mc_samples)
                kind_weight = weight
            else:  # rows s_b grad(l_n): s_b^2 G^T G is off by s_b, divide once
                stack = loss_gradient(loss_fn, output, y)[None]
                kind_weight = weight / derivatives.scale(loss_fn, output)
            factors = [_contract(stack, jacobian, output.dim()) for jacobian in jacobians]
            if plan.structure is Structure.DIAG:
                factors = [factor.square().sum((0, 1)) for factor in factors]
            accumulate(results[kind], plan, factors.__getitem__, kind_weight, from_factors=True)
    for kind in kinds:
        if plan.structure is not Structure.DIAG:
            mirror_upper_panels(results[kind], plan)
    total.finish(results)
    return results


def _ggn_root(
    derivatives: LossDerivatives,
    loss_fn: nn.Module,
    output: Tensor,
    y: Tensor,
    mc_samples: int | None,
) -> Tensor:
    """The loss Hessian's square root ``[C, N, *out]``, or ``mc_samples`` sampled ones."""
    if mc_samples is None:
        return derivatives.sqrt_hessian(loss_fn, output, y)
    return derivatives.sqrt_hessian_mc(loss_fn, output, y, mc_samples)


def per_sample_jacobians(
    model: nn.Module, params: list[nn.Parameter], X: object, differentiable: bool = False
) -> tuple[Tensor, list[Tensor]]:
    """The batch output ``[N, *out]`` and, per parameter, each sample's Jacobian
    ``[N, *out, *p.shape]``; with ``differentiable``, both differentiable in ``X``."""
    points = tuple(p.detach() for p in params)
    fixed = {id(p): p.detach() for p in model.parameters()}

    def sample_output(values: tuple[Tensor, ...], x: object) -> Tensor:
        batched = map_tensors(lambda tensor: tensor[None], x)
        with parameters_replaced(model, {**fixed, **dict(zip(map(id, params), values))}):
            return model(batched)[0]

    with torch.set_grad_enabled(differentiable):
        output = model(X)
    try:
        jacobians = list(vmap(jacrev(sample_output), in_dims=(None, 0))(points, X))
        if _sum_agrees(model, params, X, output, jacobians):
            return output, jacobians
    except RuntimeError:  # a model vmap cannot batch (nn.GRU, nn.LSTM): a sample at a time
        pass
    per_sample = [
        jacrev(sample_output)(points, map_tensors(lambda tensor, n=n: tensor[n], X))
        for n in range(len(output))
    ]
    return output, [torch.stack(parts) for parts in zip(*per_sample)]


def _sum_agrees(
    model: nn.Module, params: list[nn.Parameter], X: object, output: Tensor, jacobians: list
) -> bool:
    """Whether the per-sample Jacobians, combined with random weights over the samples and
    outputs, agree with one reverse-mode product over the batch (``vmap`` of ``jacrev`` hits
    wrong batching rules, e.g. of ``prelu``'s backward in torch 2.13)."""
    weights = check_weights(output)
    fixed = {id(p): p.detach() for p in model.parameters()}

    def batch_output(*values: Tensor) -> Tensor:
        with parameters_replaced(model, {**fixed, **dict(zip(map(id, params), values))}):
            return model(X)

    _, pullback = vjp(batch_output, *(p.detach() for p in params))
    return all(
        agree(torch.tensordot(weights, jacobian.detach(), dims=weights.dim()), expected)
        for jacobian, expected in zip(jacobians, pullback(weights))
    )


def _contract(stack: Tensor, jacobian: Tensor, output_dims: int) -> Tensor:
    """``[V, N, *out]`` with ``[N, *out, *p]``: per-sample products ``[V, N, *p]``."""
    out_dims = list(range(2, output_dims + 1))
    flat = stack.flatten(2)  # [V, N, O]
    jac = jacobian.flatten(1, len(out_dims))  # [N, O, *p]
    return torch.einsum("vno,no...->vn...", flat, jac)
