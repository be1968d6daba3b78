"""The hook machinery: ``extend``, the context of one ``with`` block.

Forward hooks record, for each call of a hooked module, what its derivatives need and which
recorded call produced its input. A tensor hook on each call's output receives the output
gradient during ``backward()``; it hands the gradient (first order) and the square-root stack
that its consumer pushed to it (second order) to the extensions, pushes the stack on to the
producer of its input, and frees what the call stored. Tensor hooks on module outputs fire
downstream first, so every stack arrives before it is needed.

``ChainBackward``, for a chain of supported modules, runs the same steps without autograd's
backward pass: it pushes the output gradient through the recorded calls itself, with the
modules' derivatives, and so computes no parameter gradients nobody asked for.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from curvhooks.derivatives import (
    LOSS_DERIVATIVES,
    MODULE_DERIVATIVES,
    SUPPORTED_REDUCTIONS,
    LossDerivatives,
    ModuleDerivatives,
    ModuleIO,
    diagonal_stack,
    loss_derivatives,
    module_derivatives,
    supported_names,
)
from curvhooks.errors import UnsupportedError
from curvhooks.extensions import RESULT_ATTRIBUTES, Extension
from curvhooks.extensions.base import EXACT, HESSIAN, Target, is_unreferenced

StackKey = str | int
Stack = Tensor | tuple[Tensor, Tensor]
"""A propagated stack ``[V, N, *shape]``, or for ``HESSIAN`` a pair (positive, negative)."""


@dataclass(eq=False)
class _Call:
    """One call of a hooked module during the current forward pass."""

    path: str
    io: ModuleIO
    derivatives: ModuleDerivatives | None
    params: list[tuple[str, nn.Parameter]]
    pass_id: int
    producer: _Call | None
    push_to_producer: bool = False
    stacks: dict[StackKey, Stack] = field(default_factory=dict)
    handle: RemovableHandle | None = None

    def describe(self) -> str:
        return _describe(self.path, self.io.module)

    def release(self) -> None:
        """Drop every stored tensor."""
        self.io.release()
        self.stacks = {}


class extend:
    """Context manager: compute ``extensions`` during each ``backward()`` inside the block.

    Args:
        model: Any ``nn.Module``; nested ``nn.Sequential`` and custom containers are fine.
        loss_fn: The loss module whose output is differentiated (reduction ``"mean"`` or
            ``"sum"``). Second-order extensions need a supported loss whose input is the
            model's output.
        *extensions: Extension instances, e.g. ``BatchGrad(), DiagGGN()``.

    Every result is a quantity of the reduced loss that ``loss_fn`` returns and is written
    to an attribute of each trainable parameter of the model (``p.grad_batch``, ...): those
    that require grad on entering. Entering clears earlier results; leaving removes every
    hook and stored tensor.
    """

    _pushes_gradients = False
    """Whether the context pushes output gradients through the calls itself (``ChainBackward``)
    instead of receiving them from autograd's backward pass."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, *extensions: Extension) -> None:
        _check_arguments(model, loss_fn, extensions)
        self.model = model
        self.loss_fn = loss_fn
        self.extensions = extensions
        self._first_order = [ext for ext in extensions if ext.stack_key() is None]
        self._second_order = [ext for ext in extensions if ext.stack_key() is not None]
        self._stack_keys = sorted({ext.stack_key() for ext in self._second_order}, key=str)
        self._handles: list[RemovableHandle] = []
        self._calls: list[_Call] = []
        self._producers: dict[int, tuple[weakref.ref, _Call]] = {}
        self._model_output: weakref.ref | None = None
        self._pass_id = 0
        self._active = False
        self._spare: dict[tuple[int, str], Tensor] = {}

    # ----------------------------------------------------------------- entering and leaving
    def __enter__(self) -> extend:
        hooked = self._modules_to_hook()
        self._spare = _take_results(self.model)
        self._active = True
        self._handles.append(self.model.register_forward_pre_hook(self._start_pass))
        self._handles.append(self.model.register_forward_hook(self._record_model_output))
        for path, module, derivatives, params in hooked:
            hook = partial(self._record_call, path, derivatives, params)
            self._handles.append(module.register_forward_hook(hook))
        if self._second_order:
            self._handles.append(self.loss_fn.register_forward_hook(self._start_stacks))
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for call in self._calls:
            if call.handle is not None:
                call.handle.remove()
        self._release_calls()
        self._model_output = None
        self._spare.clear()
        self._active = False

    def _modules_to_hook(
        self,
    ) -> list[tuple[str, nn.Module, ModuleDerivatives | None, list[tuple[str, nn.Parameter]]]]:
        """The modules to hook, with their derivatives and trainable parameters; raises for
        a trainable module curvhooks cannot handle."""
        hooked = []
        for path, module in self.model.named_modules():
            is_leaf = next(module.children(), None) is None
            params = _trainable_params(module)
            if not (params or (is_leaf and self._pushes_through_leaves)):
                continue
            derivatives = module_derivatives(module)
            if params:
                self._check_supported(path, module, derivatives, self.extensions)
            hooked.append((path, module, derivatives, params))
        return hooked

    def _check_supported(
        self,
        path: str,
        module: nn.Module,
        derivatives: ModuleDerivatives | None,
        needed_by: list[Extension] | tuple[Extension, ...],
    ) -> None:
        if derivatives is None:
            raise UnsupportedError(
                f"module {_describe(path, module)} is not supported by "
                f"{_names(needed_by)}; supported modules: {supported_names(MODULE_DERIVATIVES)}, "
                "in nn.Sequential or other containers"
            )
        reason = derivatives.unsupported_reason(module)
        if reason is not None:
            raise UnsupportedError(
                f"module {_describe(path, module)} is not supported by {_names(needed_by)}: "
                f"{reason}"
            )

    @property
    def _pushes_through_leaves(self) -> bool:
        """Whether stacks or gradients pass through every leaf module (so all are hooked)."""
        return bool(self._second_order) or self._pushes_gradients

    def run_batch(self, X: Tensor, y: Tensor) -> Tensor:
        """One forward and backward pass of ``loss_fn(model(X), y)`` without touching
        ``p.grad``: writes the extensions' results; returns the model output."""
        output = self.model(X)
        params = [p for p in self.model.parameters() if p.requires_grad]
        torch.autograd.grad(self.loss_fn(output, y), params, allow_unused=True)
        return output

    # ------------------------------------------------------------------- forward hooks
    def _start_pass(self, module: nn.Module, args: tuple) -> None:
        """A new forward pass of the model: calls of earlier passes are stale (their tensor
        hooks stay, to reject a backward pass through them)."""
        self._pass_id += 1
        self._release_calls()

    def _record_model_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._model_output = weakref.ref(output) if isinstance(output, Tensor) else None

    def _record_call(
        self,
        path: str,
        derivatives: ModuleDerivatives | None,
        params: list[tuple[str, nn.Parameter]],
        module: nn.Module,
        args: tuple,
        output: Any,
    ) -> None:
        if not isinstance(output, Tensor):
            return
        if not (self._pushes_gradients or (torch.is_grad_enabled() and output.requires_grad)):
            return
        if params and any(call.io.module is module for call in self._calls):
            raise UnsupportedError(
                f"module {_describe(path, module)} was called twice in one forward pass; "
                "curvhooks supports each module with trainable parameters once per pass"
            )
        inp = args[0]
        keep_output = (
            self._pushes_through_leaves and derivatives is not None and derivatives.needs_output
        )
        io = ModuleIO(
            module=module,
            input=inp.detach() if params else None,
            output=output.detach() if keep_output else None,
            input_shape=inp.shape,
        )
        call = _Call(path, io, derivatives, params, self._pass_id, self._producer_of(inp))
        if not self._pushes_gradients:
            call.handle = output.register_hook(partial(self._backward, call))
        self._calls.append(call)
        self._producers[id(output)] = (weakref.ref(output), call)

    def _producer_of(self, tensor: Any) -> _Call | None:
        """The recorded call whose output is ``tensor`` (the latest, for in-place modules)."""
        entry = self._producers.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def _start_stacks(self, loss_fn: nn.Module, args: tuple, loss: Tensor) -> None:
        """Check the path from the loss to every parameter, then start the square-root stacks."""
        if not torch.is_grad_enabled() or len(args) < 2:
            return
        output, target = args[0], args[1]
        last_call = self._producer_of(output)
        model_output = None if self._model_output is None else self._model_output()
        if last_call is None or output is not model_output:
            raise ValueError(
                f"the input of {type(loss_fn).__name__} is not the model's output; "
                f"{_names(self._second_order)} differentiate the loss in the model's output, "
                "so call loss_fn(model(X), y) directly (move any extra operation into the "
                "model as a supported module)"
            )
        derivatives = self._check_loss(output, target)
        self._link_path(last_call)
        last_call.stacks = {
            key: self._sqrt_hessian(derivatives, output, target, key) for key in self._stack_keys
        }

    def _check_loss(self, output: Tensor, target: Tensor) -> LossDerivatives:
        derivatives = loss_derivatives(self.loss_fn)
        loss_name = type(self.loss_fn).__name__
        if derivatives is None:
            raise UnsupportedError(
                f"loss {loss_name} is not supported by {_names(self._second_order)}; "
                f"supported losses: {supported_names(LOSS_DERIVATIVES)}"
            )
        reason = derivatives.unsupported_reason(self.loss_fn, output, target)
        if reason is not None:
            raise UnsupportedError(
                f"loss {loss_name} is not supported by {_names(self._second_order)}: {reason}"
            )
        return derivatives

    def _link_path(self, last_call: _Call) -> None:
        """Walk from the model output to the input; mark which calls push stacks on."""
        path = []
        call: _Call | None = last_call
        while call is not None:
            self._check_supported(call.path, call.io.module, call.derivatives, self._second_order)
            path.append(call)
            call = call.producer
        on_path = set(map(id, path))
        for call in self._calls:
            if call.params and id(call) not in on_path:
                raise UnsupportedError(
                    f"the output of module {call.describe()} reaches the loss through "
                    f"operations outside the supported modules (a torch function, a residual "
                    f"connection or a module curvhooks does not know); "
                    f"{_names(self._second_order)} need a chain of supported modules: "
                    f"{supported_names(MODULE_DERIVATIVES)}, nested in nn.Sequential"
                )
        upstream_has_params = False
        for call in reversed(path):
            call.push_to_producer = upstream_has_params
            upstream_has_params = upstream_has_params or bool(call.params)

    def _sqrt_hessian(
        self, derivatives: LossDerivatives, output: Tensor, target: Tensor, key: StackKey
    ) -> Stack:
        """The stack the loss starts for ``key`` (a fresh tensor per key: pushing consumes it)."""
        if key == EXACT:
            return derivatives.sqrt_hessian(self.loss_fn, output, target)
        if key == HESSIAN:  # cross-entropy's and squared error's Hessians are PSD
            positive = derivatives.sqrt_hessian(self.loss_fn, output, target)
            return positive, positive.new_zeros(0, *positive.shape[1:])
        return derivatives.sqrt_hessian_mc(self.loss_fn, output, target, key)

    # ------------------------------------------------------------------- backward hook
    def _backward(self, call: _Call, grad_output: Tensor) -> None:
        if not self._active:
            return
        if call.pass_id != self._pass_id:
            raise RuntimeError(
                "backward() reached a forward pass that is not the latest one inside the "
                "curvhooks.extend context; call backward() before the next forward pass"
            )
        self._backward_extensions(call, grad_output.detach())
        call.release()

    def _backward_extensions(self, call: _Call, grad_output: Tensor | None) -> None:
        """Every extension's results at ``call``; push the stacks on to its producer."""
        self._write_results(call, self._first_order, lambda ext: grad_output[None])
        if self._second_order:
            self._backward_stacks(call, grad_output)

    def _backward_stacks(self, call: _Call, grad_output: Tensor | None) -> None:
        if (call.params or call.push_to_producer) and not call.stacks:
            raise RuntimeError(
                f"no square-root GGN reached module {call.describe()}: "
                f"{_names(self._second_order)} need the loss computed by the loss_fn passed "
                "to curvhooks.extend, called on the model's output"
            )
        self._write_results(call, self._second_order, lambda ext: call.stacks[ext.stack_key()])
        if call.push_to_producer:
            call.producer.stacks = {
                key: self._push(call, key, stack, grad_output) for key, stack in call.stacks.items()
            }

    def _push(self, call: _Call, key: StackKey, stack: Stack, grad_output: Tensor | None) -> Stack:
        """Push a stack to the call's input; the exact Hessian also gains the module's own
        curvature, a per-sample diagonal split by sign into the two stacks."""
        if key != HESSIAN:
            return call.derivatives.jac_t_mat_prod(call.io, stack)
        positive, negative = (
            call.derivatives.jac_t_mat_prod(call.io, part)
            if len(part)
            else part.new_zeros(0, *call.io.input_shape)
            for part in stack
        )
        residual = call.derivatives.hessian_residual(call.io, grad_output)
        if residual is None:
            return positive, negative
        return (
            torch.cat([positive, diagonal_stack(residual.clamp(min=0))]),
            torch.cat([negative, diagonal_stack((-residual).clamp(min=0))]),
        )

    def _write_results(
        self, call: _Call, extensions: list[Extension], stack_of: Callable[[Extension], Stack]
    ) -> None:
        """Set each extension's result on each trainable parameter of the call."""
        for name, param in call.params:
            target = Target(call.derivatives, call.io, name)
            for ext in extensions:
                result = ext.compute(target, stack_of(ext), self._previous(param, ext))
                setattr(param, ext.attribute, result)

    def _previous(self, param: nn.Parameter, ext: Extension) -> Tensor | None:
        """The previous result of ``ext`` on ``param`` if nobody else references it: the
        live attribute (a context held open over several passes) or one set aside on entry."""
        live = param.__dict__.get(ext.attribute)
        if live is not None:
            return live if is_unreferenced(live, references=2) else None  # __dict__, `live`
        return self._spare.pop((id(param), ext.attribute), None)

    def _release_calls(self) -> None:
        for call in self._calls:
            call.release()
        self._calls.clear()
        self._producers.clear()


# --------------------------------------------------------------------------- helpers
def _check_arguments(model: nn.Module, loss_fn: nn.Module, extensions: tuple) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(loss_fn, nn.Module):
        raise TypeError(
            f"loss_fn must be a loss module such as torch.nn.CrossEntropyLoss(), "
            f"got {type(loss_fn).__name__}"
        )
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction not in SUPPORTED_REDUCTIONS:
        raise ValueError(
            f"{type(loss_fn).__name__}(reduction={reduction!r}) is not supported: curvhooks "
            f"needs a scalar loss; use reduction='mean' or reduction='sum'"
        )
    for ext in extensions:
        if isinstance(ext, type) and issubclass(ext, Extension):
            raise TypeError(f"pass extension instances: {ext.__name__}(), not {ext.__name__}")
        if not isinstance(ext, Extension):
            raise TypeError(f"extensions must be instances from curvhooks.extensions, got {ext!r}")
    attributes = [ext.attribute for ext in extensions]
    for attribute in set(attributes):
        if attributes.count(attribute) > 1:
            clash = [ext for ext in extensions if ext.attribute == attribute]
            raise ValueError(f"{_names(clash)} all write p.{attribute}; pass each extension once")


def _trainable_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The module's own parameters that require gradients, by name."""
    return [
        (name, param)
        for name, param in module.named_parameters(recurse=False)
        if param.requires_grad
    ]


def _take_results(model: nn.Module) -> dict[tuple[int, str], Tensor]:
    """Remove every result attribute; return those nobody else references, for reuse."""
    spare = {}
    for param in model.parameters():
        for attribute in RESULT_ATTRIBUTES:
            result = param.__dict__.pop(attribute, None)
            if result is not None and is_unreferenced(result, references=1):  # `result`
                spare[(id(param), attribute)] = result
    return spare


def supports_chain(model: nn.Module, loss_fn: nn.Module) -> bool:
    """Whether second-order extensions certainly apply: a supported loss, and a model that is
    a supported module or an ``nn.Sequential`` (nested) of supported modules."""
    if loss_derivatives(loss_fn) is None:
        return False
    if isinstance(model, nn.Sequential):
        return all(supports_chain(child, loss_fn) for child in model)
    derivatives = module_derivatives(model)
    return derivatives is not None and derivatives.unsupported_reason(model) is None


@contextmanager
def results_preserved(model: nn.Module) -> Iterator[None]:
    """Set the result attributes on the model's parameters aside for the block, then remove
    whatever results the block left and put the earlier ones back."""
    saved = [
        (param, attribute, param.__dict__.pop(attribute))
        for param in model.parameters()
        for attribute in RESULT_ATTRIBUTES
        if attribute in param.__dict__
    ]
    try:
        yield
    finally:
        clear_results(model)
        for param, attribute, result in saved:
            setattr(param, attribute, result)


def clear_results(model: nn.Module) -> None:
    """Remove every curvhooks result attribute from the model's parameters."""
    for param in model.parameters():
        for attribute in RESULT_ATTRIBUTES:
            param.__dict__.pop(attribute, None)


def _describe(path: str, module: nn.Module) -> str:
    return f"{path or '(the model itself)'!r} ({type(module).__name__})"


def _names(extensions) -> str:
    return ", ".join(map(repr, extensions))


class ChainBackward(extend):
    """``extend`` for a chain of supported modules (``supports_chain``) that runs the
    backward pass itself.

    ``run_batch`` runs the model without building an autograd graph, recording each call;
    autograd gives only the loss's gradient in the model output. That gradient and the
    square-root stacks are then pushed through the recorded calls, last to first, with the
    modules' derivatives, and each call's extensions get what the tensor hooks of ``extend``
    would have handed them. No parameter gradient and no gradient of the first module's
    input is computed. Used by the dataset-level functions.
    """

    _pushes_gradients = True

    def run_batch(self, X: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            output = self.model(X)
        last_call = self._producer_of(output)
        if self._first_order or HESSIAN in self._stack_keys:
            output.requires_grad_()
            (grad_output,) = torch.autograd.grad(self.loss_fn(output, y), output)
        else:  # the stacks alone: the loss's forward hook starts them
            self.loss_fn(output, y)
            grad_output = None
        self._push_back(last_call, grad_output)
        return output.detach()

    def _push_back(self, last_call: _Call | None, grad_output: Tensor | None) -> None:
        """Hand each call on the path its output gradient (if needed) and stacks, last to
        first."""
        if not self._second_order:
            self._link_path(last_call)
        call = last_call
        while call is not None:
            self._backward_extensions(call, grad_output)
            if call.push_to_producer and grad_output is not None:
                grad_output = call.derivatives.jac_t_mat_prod(call.io, grad_output[None])[0]
            call.release()
            call = call.producer
