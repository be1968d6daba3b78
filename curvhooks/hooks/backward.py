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

from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from curvhooks._compat import at_backward_end
from curvhooks.derivatives import ModuleIO, loss_gradient
from curvhooks.extensions.stacks import HESSIAN, Stack
from curvhooks.hooks.calls import Call, gradient_edge, tensors_in
from curvhooks.hooks.graph import push_to_calls, uses_outside_calls
from curvhooks.hooks.plan import (
    USED_OUTSIDE,
    HookPlan,
    UnservableError,
    names,
    not_batch_first,
    warn_skipped,
)
from curvhooks.hooks.recorder import Recorder
from curvhooks.hooks.reducer import Reducer
from curvhooks.hooks.routes import PLAIN, ChainRoute, GraphRoute, Route, chain_of
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
        self._attached = False
        self._served = plan.served_ids()
        direct = [h for h in plan.modules if h.derivatives is not None and h.derivatives.direct]
        in_calls = {id(p) for h in plan.modules if h not in direct for _, p in h.params}
        self._direct = {
            id(param): (hooked, name, param)
            for hooked in direct
            for name, param in hooked.params
            if id(param) not in in_calls
        }
        """The parameters used directly in their module's ``forward``, by id; not those a
        recorded call also uses (their autograd derivative would count that call's use
        twice: such a direct use is refused as a use outside the calls)."""
        self._direct_handles: list[RemovableHandle] = []
        self._left_out: set[int] = set()
        """Parameters used outside their modules' calls, left out (``unsupported="skip"``)."""
        self._handles: list[RemovableHandle] = []

    def attach(self) -> None:
        """Register the hooks."""
        self.recorder.attach()  # its model hooks first: ``_after_forward`` reads the record
        model = self.plan.model
        self._handles.append(model.register_forward_pre_hook(self._new_pass))
        self._handles.append(model.register_forward_hook(self._after_forward))
        if self.plan.second_order:
            hook = self.plan.loss_fn.register_forward_hook(self._start, with_kwargs=True)
            self._handles.append(hook)
        self._attached = True

    def detach(self) -> None:
        """Remove every hook and stored tensor; tensor hooks left on the outputs of earlier
        passes do nothing from now on."""
        self._attached = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._remove_direct_hooks()
        self.recorder.detach()
        self.reducer.clear()
        self._route = None

    def run_batch(self, X: Any, y: Tensor) -> Tensor:
        """One forward and backward pass of ``loss_fn(model(X), y)`` to the served parameters
        without touching their ``.grad``: the results go to the sink; returns the model
        output."""
        with torch.enable_grad():  # also inside a caller's torch.no_grad() block
            output = self.plan.model(X)
            loss = self.plan.loss_fn(output, y)
            if loss.requires_grad:
                params = list({id(p): p for _, p in self.plan.params()}.values())
                torch.autograd.grad(loss, params, allow_unused=True)
        return output

    def _new_pass(self, model: nn.Module, args: tuple) -> None:
        """A new forward pass: nothing of an earlier one's results is kept (a backward pass
        that raised may have left sums of a parameter used by several calls)."""
        self.reducer.clear()
        self._route = None
        self._remove_direct_hooks()

    def _remove_direct_hooks(self) -> None:
        for handle in self._direct_handles:
            handle.remove()
        self._direct_handles.clear()

    def _after_forward(self, model: nn.Module, args: tuple, output: Any) -> None:
        """After the model's forward pass: raise for the served parameters the hooks cannot
        serve (``UnservableError``), or with ``unsupported="skip"`` leave out those used
        outside their modules' calls (one warning names them); mark the calls on tensors
        shared by the batch, and have their per-sample gradients pushed to them."""
        record = self.recorder.record
        outputs = [tensor for tensor in tensors_in(output) if tensor.grad_fn is not None]
        outside = uses_outside_calls(outputs, record.calls, self._served) - self._left_out
        direct = outside & self._direct.keys()
        outside -= direct
        if outside and self.plan.unsupported == "skip":
            warn_skipped(
                self.plan.describe(outside), "parameters used outside their modules' calls"
            )
            self._left_out |= outside
            outside = set()
        found = {key: USED_OUTSIDE for key in outside}
        if outputs and outputs[0].dim():
            found.update(_expand_unbatched(record.calls, len(outputs[0])))
        if found:
            described = {
                key: f"{self.plan.describe({key})[0]}, {why}" for key, why in found.items()
            }
            raise UnservableError(described, _UNSERVABLE_FIX)
        if self._left_out:
            for call in record.calls:
                call.params = [(n, p) for n, p in call.params if id(p) not in self._left_out]
        if direct:
            self._record_direct(direct, len(outputs[0]))
        unbatched = [call for call in record.calls if call.unbatched]
        if unbatched and self.plan.first_order:
            hook = partial(self._push_gradients, self.recorder.pass_id, outputs[0], unbatched)
            outputs[0].register_hook(hook)

    def _record_direct(self, used: set[int], batch: int) -> None:
        """A call of its own for each parameter that a module's ``forward`` used directly
        (``DirectDerivatives``): its output is the parameter, taken per sample, and its
        tensor hook (removed at the next pass) is on the parameter."""
        record = self.recorder.record
        for key in used:
            hooked, name, param = self._direct[key]
            shape = torch.Size((1, *param.shape))
            call = Call(
                hooked.path,
                ModuleIO(hooked.module, None, None, torch.Size(()), shape),
                hooked.derivatives,
                [(name, param)],
                self.recorder.pass_id,
                len(record.calls),
                None,
                output_edge=gradient_edge(param),
            )
            call.expand_to_batch(batch)
            call.handle = param.register_hook(partial(self._at_call, call))
            self._direct_handles.append(call.handle)
            record.add(call, None)

    def _push_gradients(
        self, pass_id: int, output: Tensor, calls: list[Call], gradient: Tensor
    ) -> None:
        """In the backward pass, at the model output: its gradient ``[N, *out]`` (each row
        one sample's), pushed per sample to the calls on tensors shared by the batch."""
        if self._nested or not self._attached or pass_id != self.recorder.pass_id:
            return
        start = gradient_edge(output)
        with self._nesting():
            for arrivals in push_to_calls(start, PLAIN, gradient.detach()[None], calls, True):
                for call, gradients in arrivals:
                    call.per_sample_gradient = gradients[0]

    def _start(self, loss_fn: nn.Module, args: tuple, kwargs: dict, loss: Tensor) -> None:
        """The loss ran forward: check it and its input, start the stacks at the model output
        and make this pass's route."""
        if not torch.is_grad_enabled():
            return
        output, target = _loss_inputs(args, kwargs)
        if output is None or output is not self.recorder.model_output():
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
        start = gradient_edge(output)
        if start is None or not loss.requires_grad:
            return
        route = GraphRoute(self.plan, self.reducer, record, start, stacks, len(output))
        self._route = (pass_id, route)
        loss.register_hook(partial(self._push_on_graph, pass_id, route))

    def _push_on_graph(self, pass_id: int, route: GraphRoute, grad_loss: Tensor) -> None:
        """As the backward pass starts (the loss's hook fires first): push every stack."""
        if self._nested or not self._attached or pass_id != self.recorder.pass_id:
            return
        self._queue_finish()
        with self._nesting():
            route.push()

    def _at_call(self, call: Call, grad_output: Tensor) -> None:
        """A call's tensor hook, downstream calls first."""
        if self._nested or not self._attached:
            return
        if call.pass_id != self.recorder.pass_id:
            raise RuntimeError(
                "backward() reached a forward pass that is not the latest one inside the "
                "curvhooks.extend context; call backward() before the next forward pass"
            )
        self._queue_finish()
        route = self._route[1] if self._route and self._route[0] == call.pass_id else None
        # a call on a tensor shared by the batch has the samples' gradients summed
        grad_output = (
            call.per_sample_gradient
            if call.unbatched
            else grad_output.detach().view(call.io.output_shape)
        )
        write_first_order(self.plan, self.reducer, call, grad_output, self.recorder.record.shared)
        if route is None and call.params and self.plan.second_order:
            raise RuntimeError(
                f"no square-root stack reached module {call.describe()}: "
                f"{names(self.plan.second_order)} need the loss computed by the loss_fn "
                "passed to curvhooks.extend, called on the model's output"
            )
        if route is not None and route.calls_autograd:
            with self._nesting():
                route.at_call(call, grad_output)
        elif route is not None:
            route.at_call(call, grad_output)
        call.release()

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


def _loss_inputs(args: tuple, kwargs: dict) -> tuple[Any, Any]:
    """A loss module's input and target, however they were passed."""
    values = list(args) + [kwargs.get(name) for name in ("input", "target")[len(args) :]]
    return values[0], values[1]


class _Nested:
    """Marks the hooks' own autograd calls: the hooks they trigger do nothing."""

    def __init__(self, backward: AutogradBackward) -> None:
        self._backward = backward

    def __enter__(self) -> None:
        self._backward._nested = True

    def __exit__(self, *exc_info: object) -> None:
        self._backward._nested = False


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

    def run_batch(self, X: Any, y: Tensor) -> Tensor:
        """The results of ``loss_fn(model(X), y)`` to the sink; returns the model output."""
        plan = self.plan
        with torch.no_grad():
            output = plan.model(X)
        record = self.recorder.record
        chain = chain_of(record, record.producer_of(output), plan)
        stacks = start_stacks(plan, output, y)
        route = ChainRoute(plan, self.reducer, chain, stacks)
        needs_gradient = plan.first_order or HESSIAN in plan.kinds
        grad_output = loss_gradient(plan.loss_fn, output, y) if needs_gradient else None
        call = chain[0]
        while call is not None:
            write_first_order(plan, self.reducer, call, grad_output, set())
            route.at_call(call, grad_output)
            if call.push_to_producer and grad_output is not None:
                grad_output = call.derivatives.jac_t_mat_prod(call.io, grad_output[None])[0]
            call.release()
            call = call.producer
        return output


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


def _expand_unbatched(calls: list[Call], batch: int) -> dict[int, str]:
    """Mark the calls with parameters that ran on a tensor shared by the ``batch`` samples
    (leading dimension 1); the parameters of those whose leading dimension is another, with
    why."""
    found = {}
    for call in calls:
        first = leading(call)
        if not call.params or first == batch or call.unbatched:
            continue
        if first == 1:
            call.expand_to_batch(batch)
        else:
            found.update({id(p): not_batch_first(first, batch) for _, p in call.params})
    return found


_UNSERVABLE_FIX = (
    "pass unsupported='skip' to leave out parameters used outside their modules' calls (one "
    "warning names them), or params= without them; keep the samples in dimension 0 of every "
    "module call (reshape [N, T, d] inputs as they are, not to [N * T, d]; build transformer "
    "layers with batch_first=True)"
)


def leading(call: Call) -> int:
    """The leading dimension of the call's output."""
    return call.io.output_shape[0] if len(call.io.output_shape) else 1


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
