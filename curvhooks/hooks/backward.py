"""The two ways a backward pass meets the hooks, each wiring a ``Recorder``, a ``Reducer`` and
a route for every pass:

- ``AutogradBackward``: autograd runs the backward pass (the user's ``loss.backward()``, or
  ``run_batch``) and each call's tensor hook hands the extensions its output gradient and
  the route's stacks; behind ``curvhooks.extend`` and the dataset functions on any graph;
- ``ChainBackward``: on a chain of supported modules, the dataset functions run the model
  without an autograd graph and push the output gradient and the stacks back through the
  recorded calls themselves, with the modules' derivatives.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from curvhooks._compat import at_backward_end, gradient_edge, has_gradient_edges
from curvhooks.derivatives import loss_derivatives
from curvhooks.errors import UnsupportedError
from curvhooks.extensions import Extension
from curvhooks.extensions.stacks import HESSIAN, Stack
from curvhooks.hooks.calls import Call, tensors_in
from curvhooks.hooks.graph import uses_outside_calls
from curvhooks.hooks.plan import (
    USED_OUTSIDE,
    HookPlan,
    names,
    unsupported_module,
    used_outside_message,
    warn_skipped,
)
from curvhooks.hooks.recorder import Recorder
from curvhooks.hooks.reducer import Reducer
from curvhooks.hooks.routes import ChainRoute, GraphRoute, Route, chain_of
from curvhooks.hooks.sinks import Sink


class AutogradBackward:
    """The hooks of ``plan`` where autograd runs the backward pass; results go to ``sink``."""

    def __init__(self, plan: HookPlan, sink: Sink) -> None:
        self.plan = plan
        self.reducer = Reducer(sink)
        self.recorder = Recorder(
            plan,
            hook_of=lambda call: partial(self._at_call, call),
            keeps_leaves=bool(plan.second_order),
            keeps_input_edges=plan.has_module_curvature,
        )
        self._route: tuple[int, Route] | None = None
        """The current pass's route, with the pass's id."""
        self._finishing = 0
        """The id of the pass whose shared results are queued for the end of its backward."""
        self._nested = False
        self._served = plan.served()
        self._left_out: set[int] = set()
        """Parameters used outside their modules' calls, left out (``unsupported="skip"``)."""
        self._handles: list[RemovableHandle] = []

    def attach(self) -> None:
        """Register the hooks."""
        self.recorder.attach()  # its model hooks first: ``_check_uses`` reads the record
        self._handles.append(self.plan.model.register_forward_hook(self._check_uses))
        if self.plan.second_order:
            self._handles.append(self.plan.loss_fn.register_forward_hook(self._start))

    def detach(self) -> None:
        """Remove every hook and stored tensor."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.recorder.detach()
        self.reducer.clear()
        self._route = None

    def run_batch(self, X: Any, y: Tensor, params: list[nn.Parameter]) -> Tensor:
        """One forward and backward pass of ``loss_fn(model(X), y)`` to ``params`` without
        touching their ``.grad``: the results go to the sink; returns the model output."""
        with torch.enable_grad():  # also inside a caller's torch.no_grad() block
            output = self.plan.model(X)
            loss = self.plan.loss_fn(output, y)
            if loss.requires_grad:
                torch.autograd.grad(loss, params, allow_unused=True)
        return output

    def _check_uses(self, model: nn.Module, args: tuple, output: Any) -> None:
        """After the model's forward pass: raise for a served parameter that the model uses
        outside its module's calls, or with ``unsupported="skip"`` leave it out (one warning
        names it)."""
        record = self.recorder.record
        outputs = [tensor for tensor in tensors_in(output) if tensor.grad_fn is not None]
        outside = uses_outside_calls(outputs, record.calls, set(self._served)) - self._left_out
        described = [self._served[key] for key in outside]
        if outside and self.plan.unsupported == "raise":
            fix = "pass unsupported='skip' to leave it out (one warning names it), or params="
            raise UnsupportedError(used_outside_message(described, fix + " without it"))
        if outside:
            warn_skipped(described, USED_OUTSIDE)
            self._left_out |= outside
        if self._left_out:
            for call in record.calls:
                call.params = [(n, p) for n, p in call.params if id(p) not in self._left_out]

    def _start(self, loss_fn: nn.Module, args: tuple, loss: Tensor) -> None:
        """The loss ran forward: check it and its input, start the stacks at the model output
        and make this pass's route."""
        if not torch.is_grad_enabled() or len(args) < 2:
            return
        output, target = args[0], args[1]
        if output is not self.recorder.model_output():
            raise ValueError(
                f"the input of {type(loss_fn).__name__} is not the model's output; "
                f"{names(self.plan.second_order)} differentiate the loss in the model's "
                "output, so call loss_fn(model(X), y) directly (move any extra operation into "
                "the model's forward)"
            )
        stacks = start_stacks(self.plan, output, target)
        record = self.recorder.record
        chain = chain_of(record, record.producer_of(output), self.plan)
        pass_id = self.recorder.pass_id
        if chain is not None:
            self._route = (pass_id, ChainRoute(self.plan, self.reducer, chain, stacks))
            return
        if not has_gradient_edges():
            raise UnsupportedError(
                f"{names(self.plan.second_order)} on a model that is not a chain of supported "
                "modules need torch.autograd.graph.get_gradient_edge (PyTorch >= 2.4)"
            )
        start = gradient_edge(output)
        if start is None or not loss.requires_grad:
            return
        route = GraphRoute(self.plan, self.reducer, record, start, stacks)
        self._route = (pass_id, route)
        loss.register_hook(partial(self._push_on_graph, pass_id, route))

    def _push_on_graph(self, pass_id: int, route: GraphRoute, grad_loss: Tensor) -> None:
        """As the backward pass starts (the loss's hook fires first): push every stack."""
        if self._nested or pass_id != self.recorder.pass_id:
            return
        self._queue_finish()
        with self._nesting():
            route.push()

    def _at_call(self, call: Call, grad_output: Tensor) -> None:
        """A call's tensor hook, downstream calls first."""
        if self._nested:
            return
        if call.pass_id != self.recorder.pass_id:
            raise RuntimeError(
                "backward() reached a forward pass that is not the latest one inside the "
                "curvhooks.extend context; call backward() before the next forward pass"
            )
        self._queue_finish()
        grad_output = grad_output.detach().view(call.io.output_shape)
        write_first_order(self.plan, self.reducer, call, grad_output, self.recorder.record.shared)
        if self.plan.second_order:
            with self._nesting():
                self._route_at(call).at_call(call, grad_output)
        call.release()

    def _route_at(self, call: Call) -> Route:
        """The current pass's route; raises where the loss did not start one."""
        if self._route is not None and self._route[0] == call.pass_id:
            return self._route[1]
        if not call.params:
            return _NO_ROUTE
        raise RuntimeError(
            f"no square-root stack reached module {call.describe()}: "
            f"{names(self.plan.second_order)} need the loss computed by the loss_fn passed to "
            "curvhooks.extend, called on the model's output"
        )

    def _queue_finish(self) -> None:
        """Once per pass, have the backward pass end by handing on the results of parameters
        used by several calls (every use has contributed by then)."""
        pass_id = self.recorder.pass_id
        if self.recorder.record.shared and self._finishing != pass_id:
            self._finishing = pass_id
            finish = partial(self.reducer.finish_shared, list(self.plan.first_order))
            at_backward_end(finish, needed_by="a parameter used by several calls")

    def _nesting(self) -> _Nested:
        return _Nested(self)


class _Nested:
    """Marks the hooks' own autograd calls: the hooks they trigger do nothing."""

    def __init__(self, backward: AutogradBackward) -> None:
        self._backward = backward

    def __enter__(self) -> None:
        self._backward._nested = True

    def __exit__(self, *exc_info: object) -> None:
        self._backward._nested = False


class _NoRoute:
    """A pass without stacks, at a call without parameters: nothing to do."""

    def at_call(self, call: Call, grad_output: Tensor | None) -> None:
        return None


_NO_ROUTE = _NoRoute()


def supports_chain(model: nn.Module, loss_fn: nn.Module) -> bool:
    """Whether the chain route certainly applies: a supported loss, and a model that is a
    supported module or an ``nn.Sequential`` (nested) of supported modules, no parameter
    used twice. A subclass of ``nn.Sequential`` that overrides ``forward`` is not a chain of
    its children."""
    modules = _chain_modules(model)
    if loss_derivatives(loss_fn) is None or modules is None:
        return False
    params = [id(p) for module in modules for p in module.parameters()]
    return len(params) == len(set(params))


def _chain_modules(model: nn.Module) -> list[nn.Module] | None:
    """The supported modules ``model`` applies one after the other, or ``None``."""
    if isinstance(model, nn.Sequential):
        if type(model).forward is not nn.Sequential.forward:
            return None
        parts = [_chain_modules(child) for child in model]
        return None if None in parts else [m for part in parts for m in part]
    if unsupported_module(model):
        return None
    return [model]


class ChainBackward:
    """The dataset functions' backward pass along a chain of supported modules (a model for
    which ``supports_chain`` holds), run by the hooks themselves: no autograd graph is built,
    no parameter gradient and no gradient of the first module's input computed."""

    def __init__(self, plan: HookPlan, sink: Sink) -> None:
        self.plan = plan
        self.reducer = Reducer(sink)
        self.recorder = Recorder(plan, hook_of=None, keeps_leaves=True)

    def attach(self) -> None:
        self.recorder.attach()

    def detach(self) -> None:
        self.recorder.detach()

    def run_batch(self, X: Any, y: Tensor, params: list[nn.Parameter] | None = None) -> Tensor:
        """The results of ``loss_fn(model(X), y)`` to the sink; returns the model output."""
        plan = self.plan
        with torch.no_grad():
            output = plan.model(X)
        record = self.recorder.record
        chain = chain_of(record, record.producer_of(output), plan)
        stacks = start_stacks(plan, output, y)
        route = ChainRoute(plan, self.reducer, chain, stacks)
        grad_output = None
        if plan.first_order or HESSIAN in plan.kinds:
            output.requires_grad_()
            with torch.enable_grad():
                (grad_output,) = torch.autograd.grad(plan.loss_fn.forward(output, y), output)
        call = chain[0]
        while call is not None:
            write_first_order(plan, self.reducer, call, grad_output, set())
            route.at_call(call, grad_output)
            if call.push_to_producer and grad_output is not None:
                grad_output = call.derivatives.jac_t_mat_prod(call.io, grad_output[None])[0]
            call.release()
            call = call.producer
        return output.detach()


def start_stacks(plan: HookPlan, output: Tensor, target: Tensor) -> dict[object, Stack]:
    """The stacks of every kind at the model output ``[N, *out]``; raises for an empty batch
    or a loss the stacks cannot start from."""
    if not len(output):
        raise ValueError(
            "the batch is empty (0 samples): there is no curvature to compute; leave empty "
            "batches out"
        )
    derivatives = plan.check_loss(output, target)
    return {kind.key: kind.start(plan.loss_fn, derivatives, output, target) for kind in plan.kinds}


def write_first_order(
    plan: HookPlan, reducer: Reducer, call: Call, grad_output: Tensor | None, shared: set[int]
) -> None:
    """The first-order results at ``call`` from the gradient of the loss in its output."""
    if not plan.first_order or grad_output is None:
        return
    extensions = list(plan.first_order)
    reducer.write(call, extensions, [grad_output[None]] * len(extensions), shared)
    if shared:
        reducer.add_gradient(call, grad_output, shared)


@contextmanager
def hooked(
    model: nn.Module,
    loss_fn: nn.Module,
    extensions: tuple[Extension, ...],
    sink: Sink,
    route: str,
    params: list[nn.Parameter],
) -> Iterator[AutogradBackward | ChainBackward]:
    """The hooks of the dataset functions for ``params``, attached for the block; results go
    to ``sink``, never onto the model; every one of ``params`` must be served (a module that
    cannot serve one raises). ``route``: ``"chain"`` or ``"auto"`` take the hooks' own
    backward pass on a chain of supported modules (``supports_chain``), autograd's elsewhere;
    ``"graph"`` always autograd's."""
    if route != "graph" and supports_chain(model, loss_fn):
        plan = HookPlan.of(
            model, loss_fn, extensions, route="chain", params=params, records_leaves=True
        )
        backward = ChainBackward(plan, sink)
    else:
        plan = HookPlan.of(model, loss_fn, extensions, route=route, params=params)
        backward = AutogradBackward(plan, sink)
    backward.attach()
    try:
        yield backward
    finally:
        backward.detach()


def uses_outside_modules(
    model: nn.Module, loss_fn: nn.Module, X: Any, params: list[nn.Parameter]
) -> dict[int, str]:
    """The ``params`` of supported modules that one forward pass on ``X`` uses outside their
    modules' calls (``graph.uses_outside_calls``), by id, described: the hooks cannot serve
    them."""
    plan = HookPlan.of_supported(model, loss_fn, params)
    served = plan.served()
    recorder = Recorder(plan, hook_of=lambda call: _ignore_gradient, keeps_leaves=False)
    recorder.attach()
    try:
        with torch.enable_grad():
            outputs = [t for t in tensors_in(model(X)) if t.grad_fn is not None]
        outside = uses_outside_calls(outputs, recorder.record.calls, set(served))
    finally:
        recorder.detach()
    return {key: served[key] for key in outside}


def _ignore_gradient(grad: Tensor) -> None:
    return None
