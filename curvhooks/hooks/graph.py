"""The graph route: stacks pushed by autograd through any graph.

The stack at a module's output is the total derivative of ``S^T f`` in that output, so one
batched vector-Jacobian product, ``torch.autograd.grad(f, outputs, grad_outputs=S,
is_grads_batched=True)``, gives it at every recorded output at once: through residual
additions, ``torch.cat``, views, torch functions and modules without derivatives of ours.

The exact Hessian also needs the curvature of every nonlinear operation between the
parameters and the loss. Supported nonlinear modules add theirs at their input, and it is
pushed on the same way; ``check_hessian_glue`` walks the autograd graph between the recorded
calls and rejects any other operation that is not linear or piecewise linear in its inputs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from curvhooks import tuning
from curvhooks.errors import UnsupportedError
from curvhooks.extensions.stacks import Stack, StackKind
from curvhooks.hooks.calls import Call, GradientEdge

_LINEAR = """
    Add Sub Neg View UnsafeView Reshape ReshapeAlias Alias Cat Stack Permute Transpose T Slice
    Select Index Split SplitWithSizes Unbind Squeeze Unsqueeze Expand Clone Sum Mean AsStrided
    ConstantPadNd Flip Roll Repeat ToCopy Narrow Unfold Fill MaskedFill Where Diagonal Im2Col
    Col2Im AvgPool1D AvgPool2D AvgPool3D AdaptiveAvgPool1D AdaptiveAvgPool2D AdaptiveAvgPool3D
"""
_PIECEWISE_LINEAR = """
    Relu Threshold LeakyRelu Hardtanh Abs Maximum Minimum Clamp ClampMin ClampMax Max Min Sort
    Topk MaxPool2DWithIndices MaxPool3DWithIndices AdaptiveMaxPool1D AdaptiveMaxPool2D
    AdaptiveMaxPool3D
"""
LINEAR_OPERATIONS = frozenset((_LINEAR + _PIECEWISE_LINEAR).split()) | {"CopySlices"}
"""Autograd nodes (by class name less its ``Backward<variant>`` suffix) that are linear or
piecewise linear (zero second derivative almost everywhere) in all their inputs."""

BILINEAR_OPERATIONS = {
    "MulBackward0": (0, 1),
    "DivBackward0": (1,),
    "MmBackward0": (0, 1),
    "BmmBackward0": (0, 1),
    "AddmmBackward0": (1, 2),
    "AddbmmBackward0": (1, 2),
    "BaddbmmBackward0": (1, 2),
    "MvBackward0": (0, 1),
    "DotBackward0": (0, 1),
    "ConvolutionBackward0": (0, 1),
}
"""Products, by the positions of their factors: linear where at most one factor depends on the
parameters (for division: where the denominator does not)."""


def batched_vjp(start: GradientEdge, stack: Tensor, targets: list[Call]) -> list[Tensor | None]:
    """Push ``stack`` ``[V, N, *shape]`` from the graph edge ``start`` to each target call's
    output: ``[V, N, *out]``, or ``None`` where the target does not reach ``start``; one
    vector by a plain backward pass, several by one batched over them."""
    if not len(stack) or not targets:
        return [None] * len(targets)
    single = len(stack) == 1  # vmap's overhead (and its loops over ops without batching rules)
    pushed = torch.autograd.grad(
        start,
        [call.output_edge for call in targets],
        grad_outputs=stack[0] if single else stack,
        is_grads_batched=not single,
        retain_graph=True,
        allow_unused=True,
    )
    return [None if p is None else p[None] if single else p for p in pushed]


def push_to_calls(
    start: GradientEdge,
    kind: StackKind,
    stack: Stack,
    targets: list[Call],
    per_sample: bool = False,
) -> Iterator[list[tuple[Call, Stack]]]:
    """Push a stack of ``kind`` from ``start`` to the targets' outputs, in chunks of vectors
    of at most ``tuning.GRAPH_CHUNK_BYTES``; yield, per chunk, the ``(call, stack)`` contributions
    that arrive (the same vectors at every call).

    A call's contributions together form its stack (``kind.join``); every reduction of a
    stack is a sum over its vectors, so each can be reduced on arrival and freed. With
    ``per_sample`` (targets shared by the batch, whose outputs sum the samples' gradients),
    each vector is first split into one per sample, zero at the others, so that what arrives
    stays apart per sample.
    """
    parts = kind.parts(stack)
    samples = parts[0].shape[1] if per_sample else 1
    if per_sample:
        parts = tuple(map(_split_samples, parts))
    if not any(map(len, parts)):  # no vectors (a loss with a zero Hessian): zero results
        yield [(call, _as_stack(kind, 0, parts[0], len(parts), call, samples)) for call in targets]
        return
    for index, part in enumerate(parts):
        for chunk in part.split(_chunk_size(part, targets, samples)) if len(part) else ():
            pushed = batched_vjp(start, chunk, targets)
            yield [
                (call, _as_stack(kind, index, vectors, len(parts), call, samples))
                for call, vectors in zip(targets, pushed)
                if vectors is not None
            ]


def _split_samples(part: Tensor) -> Tensor:
    """``[V, N, *shape]`` as ``[V * N, N, *shape]``: vector ``(v, n)`` holds sample n of
    vector v and zeros at the other samples."""
    num_vectors, batch = part.shape[:2]
    split = part.new_zeros(num_vectors, batch, batch, *part.shape[2:])
    split.diagonal(0, 1, 2).copy_(part.movedim(1, -1))
    return split.view(num_vectors * batch, batch, *part.shape[2:])


def _chunk_size(part: Tensor, targets: list[Call], multiple: int) -> int:
    """Vectors per batched product, within ``tuning.GRAPH_CHUNK_BYTES``, a multiple of
    ``multiple``."""
    per_vector = sum(call.anchor_shape.numel() for call in targets) * part.element_size()
    budgets = tuning.GRAPH_CHUNK_BYTES
    budget = budgets.get(part.device.type, budgets["cpu"])
    return max(1, budget // max(1, per_vector) // multiple) * multiple


def _as_stack(
    kind: StackKind, index: int, vectors: Tensor, count: int, call: Call, samples: int
) -> Stack:
    """``vectors`` (shaped like the call's gradient anchor) as part ``index`` of a stack of
    ``kind`` at the call's output ``[V, N, *out]``, its other parts empty. After a push split
    per sample (``samples`` > 1, vector ``v * N + n`` nonzero at sample n only), a call on a
    tensor shared by the batch has one vector per vector and sample, and any other call takes
    each vector's own sample."""
    shape = call.io.output_shape
    if samples > 1 and not call.unbatched:
        split = vectors.view(len(vectors) // samples, samples, *shape)
        vectors = split.diagonal(0, 1, 2).movedim(-1, 1)
    else:
        vectors = vectors.reshape(len(vectors) // samples, *shape)
    empty = vectors.new_zeros(0, *shape)
    return kind.from_parts(tuple(vectors if i == index else empty for i in range(count)))


def check_hessian_glue(start: GradientEdge, calls: list[Call], needed_by: str) -> None:
    """Raise ``UnsupportedError`` if a nonlinear operation other than a supported module lies
    between the parameters and ``start`` (the model output).

    The walk goes down the autograd graph from ``start``. A recorded call with derivatives is
    passed over from its output edge to its input edge (its own curvature is known); a
    product counts as linear where at most one factor depends on the parameters.
    """
    jumps = _jumps(call for call in calls if call.derivatives is not None)
    for node in _walk([start.node], jumps):
        _check_operation(node, needed_by)


def _check_operation(node: object, needed_by: str) -> None:
    name = node.name().rsplit("::", 1)[-1]  # "torch::autograd::AccumulateGrad"
    if name == "AccumulateGrad" or re.sub(r"Backward\d*$", "", name) in LINEAR_OPERATIONS:
        return
    factors = BILINEAR_OPERATIONS.get(name)
    if factors is not None:
        dependent = [i for i in factors if node.next_functions[i][0] is not None]
        if name == "DivBackward0" and not dependent:
            return
        if name != "DivBackward0" and len(dependent) <= 1:
            return
        what = "a product of two tensors that both depend on the parameters"
    else:
        what = "a nonlinear operation"
    raise UnsupportedError(
        f"{needed_by} need the second derivative of every operation between the parameters "
        f"and the loss, but the model applies {name} ({what}) outside the supported modules; "
        "use a supported module for it (see curvhooks.derivatives.MODULE_DERIVATIVES), or use "
        "the GGN extensions, which are exact there"
    )


def check_shared_uses_independent(calls: list[Call], shared: set[int], needed_by: str) -> None:
    """Raise ``UnsupportedError`` where a parameter used by several calls has one use feeding
    another (a recurrence ``W (W x)``): the Hessian then has a term of the two uses together
    that the summed stacks do not hold. Uses side by side (a siamese net) are exact."""
    for param_id in shared:
        uses = [c for c in calls if any(id(p) == param_id for _, p in c.params)]
        outputs = {c.output_edge.node for c in uses if c.output_edge is not None}
        for call in uses:
            others = outputs - {None if call.output_edge is None else call.output_edge.node}
            if call.input_edge is not None and _reaches(call.input_edge.node, others):
                names = ", ".join(
                    f"{c.path or '(the model)'}.{n}"
                    for c in uses
                    for n, p in c.params
                    if id(p) == param_id
                )
                raise UnsupportedError(
                    f"{needed_by} cannot sum the uses of a parameter where one feeds another: "
                    f"{names} are one parameter, and one use's output reaches another's input; "
                    "the GGN and first-order extensions are exact there, and "
                    "curvhooks.hessian(route='autograd') gives the Hessian"
                )


def _reaches(node: object, goals: set) -> bool:
    """Whether the autograd graph below ``node`` (``node`` included) holds one of ``goals``."""
    return any(current in goals for current in _walk([node], {}))


def uses_outside_calls(outputs: list[Tensor], calls: list[Call], served: set[int]) -> set[int]:
    """The ``served`` parameters (ids) that ``outputs`` depend on through an operation outside
    the recorded calls with parameters: a parameter used by its parent's forward, say
    (``nn.MultiheadAttention`` uses ``out_proj.weight`` so). The hooks see module calls
    only, so such a parameter's results would miss that use.

    The walk goes down the autograd graph from the outputs; a call with parameters is passed
    over from its output edge to its input edge (its own parameters are its to serve).
    """
    found = set()
    for node in _walk([output.grad_fn for output in outputs], _jumps(c for c in calls if c.params)):
        variable = getattr(node, "variable", None)  # an AccumulateGrad node's parameter
        if variable is not None and id(variable) in served:
            found.add(id(variable))
    return found


def _jumps(calls: Iterable[Call]) -> dict[object, GradientEdge | None]:
    """Each call's output node, to its input edge: a walk passes over the call."""
    return {call.output_edge.node: call.input_edge for call in calls if call.output_edge}


def _walk(nodes: list, jumps: dict[object, GradientEdge | None]) -> Iterator[object]:
    """Every autograd node below ``nodes`` once, down ``next_functions``; a node in ``jumps``
    is not visited but passed over to its input edge's node."""
    seen, todo = set(), list(nodes)
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in jumps:
            todo.append(None if jumps[node] is None else jumps[node].node)
            continue
        yield node
        todo.extend(next_node for next_node, _ in node.next_functions)
