"""The record of one forward pass: each call of a hooked module, and which call produced which
tensor.

A call keeps what its module's derivatives need (``ModuleIO``), the stacks that reach its
output, and two autograd edges: where its output and its input enter the autograd graph, taken
when the call ran, so that a later in-place operation on either tensor does not change what is
differentiated. A call's producer is the recorded call whose output is its input, unchanged
since (same tensor object, same version counter): a link of a chain. The calls need not form a
chain; ``CallRecord.chain`` says whether they do.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils.hooks import RemovableHandle

from curvhooks.derivatives import ModuleDerivatives, ModuleIO
from curvhooks.extensions.stacks import Stack


@dataclass(eq=False)
class Call:
    """One call of a hooked module during the current forward pass.

    Attributes:
        path: The module's path in the model (``""`` for the model itself).
        io: What the module's derivatives need from the call.
        derivatives: The module's derivatives, ``None`` for an unsupported module.
        params: The module's trainable parameters, by name.
        pass_id: The forward pass the call belongs to.
        index: Its position in the pass (calls run in this order).
        producer: The recorded call whose unchanged output is this call's input.
        push_to_producer: Whether the chain route pushes the stacks on to the producer.
        output_edge: Where the output enters the autograd graph (graph route), at its
            gradient anchor.
        input_edge: Where the input enters the autograd graph (graph route, Hessian), at its
            gradient anchor (``gradient_anchor``), whose shape is ``input_edge_shape``.
        view_base: The base of the output where the output is a view (an in-place module on a
            view of it makes the call's hook never fire).
        stacks: The stacks at the output, by stack kind key (chain route).
        results: Results of this pass not yet handed to the sink, by (parameter name,
            attribute): the graph route reduces stacks as they arrive.
        handle: The output's tensor hook.
        unbatched: Whether the call ran on a tensor shared by the batch (leading
            dimension 1, a position embedding's, say): ``io`` is then that of every sample
            (``ModuleIO.per_sample``) and stacks arrive per sample (graph route).
        per_sample_gradient: For a call shared by the batch, each sample's gradient of the
            loss in its output ``[N, *out]`` (graph route).
    """

    path: str
    io: ModuleIO
    derivatives: ModuleDerivatives | None
    params: list[tuple[str, nn.Parameter]]
    pass_id: int
    index: int
    producer: Call | None
    push_to_producer: bool = False
    output_edge: GradientEdge | None = None
    input_edge: GradientEdge | None = None
    input_edge_shape: tuple[int, ...] | None = None
    view_base: Tensor | None = None
    stacks: dict[object, Stack] = field(default_factory=dict)
    results: dict[tuple[str, str], object] = field(default_factory=dict)
    handle: RemovableHandle | None = None
    unbatched: bool = False
    per_sample_gradient: Tensor | None = None

    def describe(self) -> str:
        return describe(self.path, self.io.module)

    @property
    def anchor_shape(self) -> torch.Size:
        """The shape of the output as autograd sees it (one sample where shared)."""
        shape = self.io.output_shape
        return torch.Size((1, *shape[1:])) if self.unbatched else shape

    def expand_to_batch(self, batch: int) -> None:
        """Mark the call as run on a tensor shared by ``batch`` samples."""
        self.io = self.io.per_sample(batch)
        self.unbatched = True

    def unsupported_reason(self) -> str | None:
        """Why the analytic route cannot push through this call, or ``None``."""
        if self.derivatives is None:
            return "no derivatives"
        if self.io.call is not None and self.io.call.batched_tensors > 1:
            return "several arguments hold the samples"
        return self.derivatives.unsupported_reason(self.io.module)

    def release(self) -> None:
        """Drop every stored tensor."""
        self.io.release()
        self.stacks = {}
        self.results = {}
        self.output_edge = self.input_edge = None
        self.view_base = self.per_sample_gradient = None


class CallRecord:
    """The calls of the current forward pass, in order, and the tensors they produced."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.shared: set[int] = set()
        """Ids of the parameters used by several calls."""
        self._outputs: dict[int, tuple[weakref.ref, int, Call]] = {}
        self._used: set[int] = set()

    def add(self, call: Call, output: Tensor | None) -> None:
        """Record ``call``, whose output is ``output`` (``None`` for a parameter's own
        call: ``DirectDerivatives``)."""
        self.calls.append(call)
        if output is not None:
            self._outputs[id(output)] = (weakref.ref(output), output._version, call)
        for _, param in call.params:
            (self.shared if id(param) in self._used else self._used).add(id(param))

    def producer_of(self, tensor: object) -> Call | None:
        """The recorded call whose output is ``tensor``, unchanged since (the latest, for
        in-place modules); ``None`` if there is none."""
        entry = self._outputs.get(id(tensor))
        if entry is None or entry[0]() is not tensor or entry[1] != tensor._version:
            return None
        return entry[2]

    def chain(self, last: Call | None) -> list[Call] | None:
        """The calls from ``last`` back to the first, if they form a chain the analytic route
        can push through: every call on it supported, every call with trainable parameters on
        it, no parameter used twice. ``None`` otherwise."""
        path = []
        call = last
        while call is not None:
            if call.unsupported_reason() is not None:
                return None
            path.append(call)
            call = call.producer
        on_path = set(map(id, path))
        if not path or self.shared or any(c.params and id(c) not in on_path for c in self.calls):
            return None
        return path

    def release(self) -> None:
        for call in self.calls:
            call.release()
        self.calls.clear()
        self._outputs.clear()
        self.shared = set()
        self._used = set()


def gradient_anchor(output: Tensor) -> Tensor:
    """The tensor whose gradient is ``output``'s, for hooks and edges: ``output``, or its base
    where ``output`` is a reshaping view of all of it (``nn.Linear`` on inputs of more than two
    dimensions). An in-place operation on such a view (``ReLU(inplace=True)``) rewrites the
    view's history and its tensor hooks never fire; the base's keep their place."""
    base = output._base
    if (
        base is not None
        and base.numel() == output.numel()
        and base.storage_offset() == output.storage_offset()
        and base.is_contiguous()
        and output.is_contiguous()
    ):
        return base
    return output


def describe(path: str, module: nn.Module) -> str:
    return f"{path or '(the model itself)'!r} ({type(module).__name__})"


def tensors_in(value: object) -> list[Tensor]:
    """The tensors in ``value``, inside tuples, lists and mappings (a model's output)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [tensor for item in value for tensor in tensors_in(item)]
    return []


def gradient_edge(tensor: Tensor) -> GradientEdge | None:
    """Where ``tensor`` enters the autograd graph now; ``None`` if it needs no gradient."""
    return get_gradient_edge(tensor) if tensor.requires_grad else None
