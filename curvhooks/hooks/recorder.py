"""``Recorder``: the forward hooks that record each call of the hooked modules in the current
forward pass of the model (a ``CallRecord``), and place each call's tensor hook."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from curvhooks._compat import is_transformed
from curvhooks.derivatives import ModuleDerivatives, ModuleIO
from curvhooks.derivatives.generic import RecordedCall
from curvhooks.errors import UnsupportedError
from curvhooks.hooks.calls import (
    Call,
    CallRecord,
    describe,
    gradient_anchor,
    gradient_edge,
    tensors_in,
)
from curvhooks.hooks.plan import HookedModule, HookPlan

TensorHook = Callable[[Tensor], None]


class Recorder:
    """Records the calls of ``plan``'s modules, pass by pass.

    Args:
        plan: What to hook.
        hook_of: Makes the tensor hook of a call (placed on its output); ``None`` where no
            autograd backward pass runs through the calls (the dataset functions' own
            backward along a chain), which records calls also without gradients.
        keeps_leaves: Whether calls keep what their derivatives need to push stacks.
        keeps_input_edges: Whether every call keeps its input's autograd edge (the Hessian
            on the graph route); calls with parameters keep theirs always.

    Attributes:
        record: The calls of the current pass.
        pass_id: Counts the model's forward passes.
    """

    def __init__(
        self,
        plan: HookPlan,
        hook_of: Callable[[Call], TensorHook] | None,
        keeps_leaves: bool,
        keeps_input_edges: bool = False,
    ) -> None:
        self.plan = plan
        self.hook_of = hook_of
        self.keeps_leaves = keeps_leaves
        self.keeps_input_edges = keeps_input_edges and hook_of is not None
        self.record = CallRecord()
        self.pass_id = 0
        self._model_output: weakref.ref | None = None
        self._pending: dict[int, tuple] = {}
        self._handles: list[RemovableHandle] = []

    def attach(self) -> None:
        """Register the forward hooks."""
        model = self.plan.model
        self._handles.append(model.register_forward_pre_hook(self._start_pass))
        self._handles.append(model.register_forward_hook(self._keep_model_output))
        for hooked in self.plan.modules:
            if hooked.derivatives is not None and hooked.derivatives.direct:
                continue  # no call of it to record (AutogradBackward serves its parameters)
            keep_copy = _overwrites_needed_input(hooked.module, hooked.derivatives)
            pre_hook = partial(self._record_input, keep_copy, bool(hooked.params))
            module = hooked.module
            self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            hook = partial(self._record_call, hooked)
            self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def detach(self) -> None:
        """Remove every hook, the calls' tensor hooks included, and every stored tensor."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for call in self.record.calls:
            if call.handle is not None:
                call.handle.remove()
        self.release()

    def release(self) -> None:
        """Drop the current pass's calls and tensors."""
        self.record.release()
        self._model_output = None
        self._pending.clear()

    def model_output(self) -> Tensor | None:
        """The model's output of the current pass, if a tensor still alive."""
        return None if self._model_output is None else self._model_output()

    def _start_pass(self, module: nn.Module, args: tuple) -> None:
        """A new forward pass: calls of earlier passes are stale (their tensor hooks stay,
        to reject a backward pass through them)."""
        self.pass_id += 1
        self.release()

    def _keep_model_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._model_output = weakref.ref(output) if isinstance(output, Tensor) else None

    def _record_input(
        self, keep_copy: bool, has_params: bool, module: nn.Module, args: tuple, kwargs: dict
    ) -> None:
        """Before the module runs (and maybe changes its input in place): the input's
        producer and version, where needed its autograd edge, and for an in-place module whose
        derivatives need the input (``keep_copy``) a copy of it."""
        if args and isinstance(args[0], Tensor):
            inp = args[0]
            edge, edge_shape = None, None
            if self.keeps_input_edges or (has_params and self.hook_of is not None):
                anchor = gradient_anchor(inp)
                edge, edge_shape = gradient_edge(anchor), anchor.shape
            copy = inp.detach().clone() if keep_copy else None
            producer = self.record.producer_of(inp)
            self._pending[id(module)] = (producer, edge, edge_shape, copy, inp._version)

    def _record_call(
        self, hooked: HookedModule, module: nn.Module, args: tuple, kwargs: dict, output: Any
    ) -> Any:
        """Record the call; for derivatives that take the whole call, return the outputs
        re-made from their joint (``CallDerivatives.join``), which the call records as its
        output."""
        pending = self._pending.pop(id(module), (None,) * 5)
        producer, input_edge, input_edge_shape, input_copy, input_version = pending
        if args and output is args[0] and output._version == input_version:
            return None  # handed its input on untouched (Identity, Dropout in eval): nothing to do
        if any(map(is_transformed, tensors_in(output))):
            raise UnsupportedError(
                f"module {describe(hooked.path, module)} ran inside a torch.func transform "
                "(vmap, grad, ...) in the model's forward; curvhooks cannot follow its calls "
                "there. Call the module outside the transform (modules take batches), or, for "
                "the dataset matrices, use route='autograd'"
            )
        driven = self.hook_of is not None
        needs_gradient = any(t.requires_grad for t in tensors_in(output))
        if driven and not (torch.is_grad_enabled() and needs_gradient):
            return None  # no backward pass will come through (inference inside the context)
        derivatives = hooked.derivatives
        recorded, handed_on = None, output
        if derivatives is not None and derivatives.whole_call:
            recorded = derivatives.record(module, args, kwargs)
            output, handed_on = derivatives.join(module, output)
        if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            return None
        # A module with parameters creates its output's base itself, so its hook on the base
        # is the base's first; other modules' hooks stay on their outputs (views of one base
        # must fire downstream first).
        params = hooked.params
        anchor = gradient_anchor(output) if params and output is not args[0] else output
        inp = args[0] if input_copy is None else input_copy
        call = Call(
            hooked.path,
            self._module_io(module, derivatives, params, inp, output, recorded),
            hooked.derivatives,
            params,
            self.pass_id,
            len(self.record.calls),
            producer,
            output_edge=gradient_edge(anchor) if driven else None,
            input_edge=input_edge,
            input_edge_shape=input_edge_shape,
            view_base=output._base,
        )
        if driven:
            call.handle = anchor.register_hook(self.hook_of(call))
            if output is args[0] and output._base is not None:
                self._rehook_producers(call, output)
        self.record.add(call, output)
        return None if handed_on is output else handed_on

    def _module_io(
        self,
        module: nn.Module,
        derivatives: ModuleDerivatives | None,
        params: list,
        inp: Tensor,
        output: Tensor,
        recorded: RecordedCall | None,
    ) -> ModuleIO:
        """What the call keeps: the input for parameter products and derivatives that need
        it, the output for derivatives that need it, both shapes, and what the derivatives
        take from autograd's saved tensors."""
        keeps = self.keeps_leaves and derivatives is not None
        io = ModuleIO(
            module=module,
            input=inp.detach() if params or (keeps and derivatives.needs_input) else None,
            output=output.detach() if keeps and derivatives.needs_output else None,
            input_shape=inp.shape,
            output_shape=output.shape,
            call=recorded,
        )
        if derivatives is not None and (keeps or params):
            derivatives.take_saved(io, output)
        return io

    def _rehook_producers(self, call: Call, output: Tensor) -> None:
        """An in-place module just rewrote the history of its input, a view (``Flatten`` of
        a convolution's output, say): the tensor hooks on every view of that base will never
        fire. Hook the producers that made such views again, on ``output`` after ``call``'s
        own hook, nearest first, so they fire in the order of the chain. Only parameter-free
        producers (reshapes) are rehooked: they need no output gradient of their own, only
        the stacks pushed to them; one with parameters hooks its view's base instead
        (``gradient_anchor``)."""
        base = output._base
        producer = call.producer
        while (
            producer is not None
            and not producer.params
            and producer.handle is not None
            and producer.view_base is base
        ):
            producer.handle.remove()
            producer.handle = output.register_hook(self.hook_of(producer))
            producer = producer.producer


def _overwrites_needed_input(module: nn.Module, derivatives: ModuleDerivatives | None) -> bool:
    """Whether ``module`` runs in place while its derivatives need its input."""
    return bool(getattr(module, "inplace", False)) and bool(
        derivatives is not None and derivatives.needs_input
    )
