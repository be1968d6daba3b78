"""Routes: how the second-order stacks reach each call with parameters in one backward pass.

- ``ChainRoute``: where the recorded calls form a chain of supported modules, each call's
  stacks are reduced, then pushed to its producer with the module's derivatives (calls come
  downstream first, so every stack arrives before it is needed);
- ``GraphRoute``: anywhere else, the stacks are pushed from the model output to every call
  with parameters at once by autograd (``hooks.graph``), as the backward pass starts.

A route is made for one pass, when the loss runs forward, and is driven at each call by the
autograd hooks (``AutogradBackward``) or by the dataset functions' own backward pass
(``ChainBackward``).
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from curvhooks.errors import UnsupportedError
from curvhooks.extensions.stacks import Stack, StackKind
from curvhooks.hooks.calls import Call, CallRecord
from curvhooks.hooks.graph import (
    GradientEdge,
    check_hessian_glue,
    check_shared_uses_independent,
    push_to_calls,
)
from curvhooks.hooks.plan import HookPlan, names
from curvhooks.hooks.reducer import Reducer


class Route(Protocol):
    """How one pass's stacks reach the calls."""

    calls_autograd: bool
    """Whether the route runs autograd itself (whose hooks must then do nothing)."""

    def at_call(self, call: Call, grad_output: Tensor | None) -> None:
        """At ``call`` in the backward pass (downstream calls first; ``grad_output`` the
        gradient of the loss in its output): the results of what reached it."""


class ChainRoute:
    """Analytic pushes along ``chain`` (the last call first) from the stacks at its end."""

    calls_autograd = False

    def __init__(
        self, plan: HookPlan, reducer: Reducer, chain: list[Call], stacks: dict[object, Stack]
    ) -> None:
        self.plan = plan
        self.reducer = reducer
        _link(chain)
        chain[0].stacks = stacks

    def at_call(self, call: Call, grad_output: Tensor | None) -> None:
        """Reduce the call's stacks into results, then push them on to its producer."""
        plan = self.plan
        stacks = [call.stacks.get(ext.stack_kind().key) for ext in plan.second_order]
        self.reducer.write(call, list(plan.second_order), stacks, set())
        if call.push_to_producer:
            call.producer.stacks = {
                kind.key: self._push(kind, call, call.stacks[kind.key], grad_output)
                for kind in plan.kinds
            }

    @staticmethod
    def _push(kind: StackKind, call: Call, stack: Stack, grad_output: Tensor | None) -> Stack:
        """Push a stack to the call's input, with the module's own curvature if any. The
        route owns its stacks; results refer to them only at calls with parameters."""
        pushed = kind.push(call.derivatives, call.io, stack, in_place=not call.params)
        curvature = kind.module_curvature(call.derivatives, call.io, grad_output)
        return pushed if curvature is None else kind.join(pushed, curvature)


def chain_of(record: CallRecord, last: Call | None, plan: HookPlan) -> list[Call] | None:
    """The chain to push along (the last call first) for ``plan.route``, or ``None`` for the
    graph route."""
    chain = None if plan.route == "graph" else record.chain(last)
    if chain is None and plan.route == "chain":
        raise UnsupportedError(
            "route='chain': the recorded calls do not form a chain of supported modules from "
            "the input to the loss; use route='auto' or 'graph'"
        )
    return chain


def _link(chain: list[Call]) -> None:
    """Mark which calls of a chain (last call first) push the stacks on to their producer:
    those with a call holding parameters upstream."""
    upstream_has_params = False
    for call in reversed(chain):
        call.push_to_producer = upstream_has_params
        upstream_has_params = upstream_has_params or bool(call.params)


class GraphRoute:
    """Batched autograd pushes from the model output's edge ``start`` (a batch of ``batch``
    samples) to every call with parameters (``push``, as the backward pass starts);
    nonlinear modules' own curvature is pushed from their inputs as their calls come
    (``at_call``). Calls on tensors shared by the batch, and those holding a parameter they
    hold too, get every stack per sample."""

    calls_autograd = True

    def __init__(
        self,
        plan: HookPlan,
        reducer: Reducer,
        record: CallRecord,
        start: GradientEdge,
        stacks: dict[object, Stack],
        batch: int,
    ) -> None:
        if plan.has_module_curvature:
            needed_by = names(e for e in plan.second_order if e.stack_kind().has_module_curvature)
            check_hessian_glue(start, record.calls, needed_by)
            check_shared_uses_independent(record.calls, record.shared, needed_by)
        self.plan = plan
        self.reducer = reducer
        self.record = record
        self.start = start
        self.stacks = stacks
        self.batch = batch

    def push(self) -> None:
        """Push every stack from the model output to every call with parameters."""
        targets = [call for call in self.record.calls if call.params]
        for kind in self.plan.kinds:
            self._reduce_on_arrival(self.start, kind, self.stacks.pop(kind.key), targets)

    def at_call(self, call: Call, grad_output: Tensor | None) -> None:
        """Hand on the call's results (every stack has reached it); push a nonlinear module's
        curvature from its input to the earlier calls with parameters."""
        self.reducer.commit(call)
        if not self.plan.has_module_curvature or call.derivatives is None:
            return
        if not call.derivatives.has_curvature or call.input_edge is None:
            return
        if call.unbatched or call.io.output_shape[0] != self.batch:
            raise UnsupportedError(
                f"module {call.describe()} ran on a tensor without the batch's samples in "
                f"dimension 0 and adds curvature of its own, which "
                f"{names(self.plan.second_order)} cannot split per sample; use "
                "curvhooks.hessian(route='autograd')"
            )
        targets = [c for c in self.record.calls[: call.index] if c.params]
        for kind in self.plan.kinds:
            curvature = kind.module_curvature(call.derivatives, call.io, grad_output)
            if curvature is not None and targets:
                anchored = kind.from_parts(
                    tuple(
                        part.reshape(len(part), *call.input_edge_shape)
                        for part in kind.parts(curvature)
                    )
                )
                self._reduce_on_arrival(call.input_edge, kind, anchored, targets)

    def _reduce_on_arrival(
        self, start: GradientEdge, kind: StackKind, stack: Stack, targets: list[Call]
    ) -> None:
        """Push a stack from ``start`` to the targets and reduce what arrives at each into
        the results of its kind's extensions. Calls on tensors shared by the batch get it
        per sample, and so do the calls holding a parameter they hold: every use of a
        parameter must see the same vectors, to be summed before anything is squared."""
        extensions = self.plan.extensions_of(kind)
        shared = self.record.shared
        unbatched = {id(p) for call in targets if call.unbatched for _, p in call.params}
        per_sample = [c for c in targets if any(id(p) in unbatched for _, p in c.params)]
        whole = [call for call in targets if all(call is not c for c in per_sample)]
        for group, split in ((whole, False), (per_sample, True)):
            for arrivals in push_to_calls(start, kind, stack, group, split) if group else ():
                for call, contribution in arrivals:
                    stacks = [contribution] * len(extensions)
                    self.reducer.reduce(call, extensions, stacks, shared)
                if shared:
                    self.reducer.reduce_shared(kind, arrivals, extensions, shared)


PLAIN = StackKind()
"""A stack of one part, for pushes outside the extensions' kinds (per-sample gradients)."""
