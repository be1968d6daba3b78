"""``extend``: the context of one ``with`` block, wiring the call record, the stacks and the
results to the model's hooks.

Forward hooks record each call of a hooked module (``CallRecord``); a tensor hook on each
call's output receives the output gradient during ``backward()`` and hands it (first order)
and the stacks that reached the output (second order) to the extensions. When the loss runs,
its forward hook starts the stacks at the model output and picks how they travel:

- the chain route, where the recorded calls form a chain of supported modules: each call's
  hook pushes the stacks to its producer with the module's derivatives (tensor hooks on
  module outputs fire downstream first, so every stack arrives before it is needed);
- the graph route, anywhere else: a tensor hook on the model output, the first to fire,
  pushes the stacks to every recorded output at once with autograd (``hooks.graph``).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from curvhooks._compat import (
    BATCH_NORMS,
    DROPOUTS,
    at_backward_end,
    gradient_edge,
    has_gradient_edges,
    is_transformed,
)
from curvhooks.derivatives import (
    LOSS_DERIVATIVES,
    MODULE_DERIVATIVES,
    SUPPORTED_REDUCTIONS,
    LossDerivatives,
    ModuleDerivatives,
    ModuleIO,
    loss_derivatives,
    module_derivatives,
    supported_names,
)
from curvhooks.errors import UnsupportedError
from curvhooks.extensions import Extension
from curvhooks.extensions.stacks import Stack, StackKind
from curvhooks.hooks.calls import Call, CallRecord, describe, gradient_anchor
from curvhooks.hooks.graph import (
    check_hessian_glue,
    check_shared_uses_independent,
    push_to_calls,
)
from curvhooks.hooks.results import Results

ROUTES = ("auto", "chain", "graph")
"""How stacks travel: ``"chain"`` (analytic pushes along a chain of supported modules),
``"graph"`` (autograd, any graph), ``"auto"`` (the chain where the calls form one)."""


class extend:
    """Context manager: compute ``extensions`` during each ``backward()`` inside the block.

    Args:
        model: Any ``nn.Module``: ``nn.Sequential``, residual blocks, branches, torch
            functions between modules. Its modules with trainable parameters must be
            supported.
        loss_fn: The loss module whose output is differentiated (reduction ``"mean"`` or
            ``"sum"``). Second-order extensions need a supported loss called on the model's
            output.
        *extensions: Extension instances, e.g. ``BatchGrad(), DiagGGN()``.
        unsupported: ``"raise"``: a module with trainable parameters curvhooks does not
            support raises ``UnsupportedError``; ``"skip"``: its parameters get no results
            (one warning names the modules), everything else is computed as usual.
        route: How second-order stacks travel (``ROUTES``); ``"auto"`` takes the analytic
            chain where the recorded calls form one and autograd elsewhere.

    Every result is a quantity of the reduced loss that ``loss_fn`` returns and is written
    to an attribute of each trainable parameter of the model (``p.grad_batch``, ...): those
    that require grad on entering. Entering clears earlier results; leaving removes every
    hook and stored tensor.
    """

    _pushes_gradients = False
    """Whether the context pushes output gradients through the calls itself (``ChainBackward``)
    instead of receiving them from autograd's backward pass."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        *extensions: Extension,
        unsupported: str = "raise",
        route: str = "auto",
    ) -> None:
        _check_arguments(model, loss_fn, extensions, route, unsupported)
        self.model = model
        self.loss_fn = loss_fn
        self.extensions = extensions
        self.unsupported = unsupported
        self.route = route
        self._first_order = [ext for ext in extensions if ext.stack_kind() is None]
        self._second_order = [ext for ext in extensions if ext.stack_kind() is not None]
        kinds = {ext.stack_kind().key: ext.stack_kind() for ext in self._second_order}
        self._kinds: list[StackKind] = list(kinds.values())
        self._needs_input_edges = not self._pushes_gradients and any(
            kind.has_module_curvature for kind in self._kinds
        )
        """Whether calls keep their input edge: for nonlinear modules' curvature on graphs."""
        self._handles: list[RemovableHandle] = []
        self._record = CallRecord()
        self._results = Results()
        self._model_output: weakref.ref | None = None
        self._pending_inputs: dict[int, tuple] = {}
        self._graph_stacks: dict[object, Stack] = {}
        self._on_graph = False
        self._finish_queued = False
        self._pass_id = 0
        self._active = False
        self._nested = False

    # ----------------------------------------------------------------- entering and leaving
    def __enter__(self) -> extend:
        check_eval_mode(self.model)
        hooked = self._modules_to_hook()
        self._results.take(self.model)
        self._active = True
        self._handles.append(self.model.register_forward_pre_hook(self._start_pass))
        self._handles.append(self.model.register_forward_hook(self._record_model_output))
        for path, module, derivatives, params in hooked:
            pre_hook = partial(self._record_input, _overwrites_needed_input(module, derivatives))
            self._handles.append(module.register_forward_pre_hook(pre_hook))
            hook = partial(self._record_call, path, derivatives, params)
            self._handles.append(module.register_forward_hook(hook))
        if self._second_order:
            self._handles.append(self.loss_fn.register_forward_hook(self._start_stacks))
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for call in self._record.calls:
            if call.handle is not None:
                call.handle.remove()
        self._release_pass()
        self._results.clear()
        self._active = False

    def _modules_to_hook(
        self,
    ) -> list[tuple[str, nn.Module, ModuleDerivatives | None, list[tuple[str, nn.Parameter]]]]:
        """The modules to hook, with their derivatives and trainable parameters; raises for
        a trainable module curvhooks cannot handle. Second order records every leaf module
        too, to find chains (and the nonlinear modules the Hessian needs)."""
        hooked, skipped, refused = [], [], []
        for path, module in self.model.named_modules():
            is_leaf = next(module.children(), None) is None
            params = _trainable_params(module)
            if not (params or (is_leaf and self._records_leaves)):
                continue
            derivatives = module_derivatives(module)
            skip = self.unsupported == "skip"
            if params and skip and unsupported_module(module):
                skipped.append(describe(path, module))
                continue
            if params and skip:  # extensions that refuse the module leave it out themselves
                refused += [
                    f"{describe(path, module)} by {ext!r}"
                    for ext in self.extensions
                    if ext.unsupported_reason(derivatives) is not None
                ]
            elif params:
                _check_supported(path, module, derivatives, self.extensions)
            hooked.append((path, module, derivatives, params))
        if skipped or refused:
            warnings.warn(
                f"curvhooks skips the parameters of unsupported modules "
                f"{', '.join(skipped + refused)} (unsupported='skip'): they get no results",
                stacklevel=3,
            )
        return hooked

    @property
    def _records_leaves(self) -> bool:
        return bool(self._second_order) or self._pushes_gradients

    def run_batch(self, X: Any, y: Tensor) -> Tensor:
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
        self._release_pass()

    def _record_model_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._model_output = weakref.ref(output) if isinstance(output, Tensor) else None

    def _record_input(self, keep_copy: bool, module: nn.Module, args: tuple) -> None:
        """Before the module runs (and maybe modifies its input in place): the input's
        producer and version, where needed its autograd edge, and for an in-place module whose
        derivatives need the input (``keep_copy``) a copy of it."""
        if args and isinstance(args[0], Tensor):
            inp = args[0]
            edge, edge_shape = None, None
            if self._needs_input_edges:
                anchor = gradient_anchor(inp)
                edge, edge_shape = gradient_edge(anchor), anchor.shape
            copy = inp.detach().clone() if keep_copy else None
            producer = self._record.producer_of(inp)
            self._pending_inputs[id(module)] = (producer, edge, edge_shape, copy, inp._version)

    def _record_call(
        self,
        path: str,
        derivatives: ModuleDerivatives | None,
        params: list[tuple[str, nn.Parameter]],
        module: nn.Module,
        args: tuple,
        output: Any,
    ) -> None:
        pending = self._pending_inputs.pop(id(module), (None,) * 5)
        producer, input_edge, input_edge_shape, input_copy, input_version = pending
        if not isinstance(output, Tensor) or not args or not isinstance(args[0], Tensor):
            return
        if output is args[0] and output._version == input_version:
            return  # handed its input on untouched (Identity, Dropout in eval): nothing to do
        if is_transformed(output):
            raise UnsupportedError(
                f"module {describe(path, module)} ran inside a torch.func transform (vmap, grad, "
                "...) in the model's forward; curvhooks cannot follow its calls there. Call the "
                "module outside the transform (modules take batches), or, for the dataset "
                "matrices, use curvhooks.hessian(route='autograd')"
            )
        if not (self._pushes_gradients or (torch.is_grad_enabled() and output.requires_grad)):
            return
        # A module with parameters creates its output's base itself, so its hook on the base
        # is the base's first; other modules' hooks stay on their outputs (views of one base
        # must fire downstream first).
        anchor = gradient_anchor(output) if params and output is not args[0] else output
        call = Call(
            path,
            self._module_io(
                module, derivatives, params, args[0] if input_copy is None else input_copy, output
            ),
            derivatives,
            params,
            self._pass_id,
            len(self._record.calls),
            producer,
            output_edge=None if self._pushes_gradients else gradient_edge(anchor),
            input_edge=input_edge,
            input_edge_shape=input_edge_shape,
            view_base=output._base,
        )
        if not self._pushes_gradients:
            call.handle = anchor.register_hook(partial(self._backward, call))
            if output is args[0] and output._base is not None:
                _rehook_producers(call, output, lambda producer: partial(self._backward, producer))
        self._record.add(call, output)

    def _module_io(
        self,
        module: nn.Module,
        derivatives: ModuleDerivatives | None,
        params: list,
        inp: Tensor,
        output: Tensor,
    ) -> ModuleIO:
        """What the call keeps: the input for parameter products and derivatives that need
        it, the output for derivatives that need it, both shapes, and what the derivatives
        take from autograd's saved tensors."""
        keeps = self._records_leaves and derivatives is not None
        io = ModuleIO(
            module=module,
            input=inp.detach() if params or (keeps and derivatives.needs_input) else None,
            output=output.detach() if keeps and derivatives.needs_output else None,
            input_shape=inp.shape,
            output_shape=output.shape,
        )
        if keeps:
            derivatives.take_saved(io, output)
        return io

    def _start_stacks(self, loss_fn: nn.Module, args: tuple, loss: Tensor) -> None:
        """Check the loss and its input, start the stacks at the model output and pick the
        route they travel."""
        if not torch.is_grad_enabled() or len(args) < 2:
            return
        output, target = args[0], args[1]
        if self._model_output is None or output is not self._model_output():
            raise ValueError(
                f"the input of {type(loss_fn).__name__} is not the model's output; "
                f"{_names(self._second_order)} differentiate the loss in the model's output, "
                "so call loss_fn(model(X), y) directly (move any extra operation into the "
                "model's forward)"
            )
        if not len(output):
            raise ValueError(
                "the batch is empty (0 samples): there is no curvature to compute; leave "
                "empty batches out"
            )
        derivatives = self._check_loss(output, target)
        stacks = {
            kind.key: kind.start(loss_fn, derivatives, output, target) for kind in self._kinds
        }
        chain = self._choose_route(self._record.producer_of(output))
        if chain is not None:
            link_chain(chain)
            chain[0].stacks = stacks
        else:
            self._start_graph(output, loss, stacks)

    def _check_loss(self, output: Tensor, target: Tensor) -> LossDerivatives | None:
        if not any(kind.needs_loss_hessian for kind in self._kinds):
            return None
        derivatives = loss_derivatives(self.loss_fn)
        loss_name = type(self.loss_fn).__name__
        needed_by = _names(ext for ext in self._second_order if ext.stack_kind().needs_loss_hessian)
        if derivatives is None:
            raise UnsupportedError(
                f"loss {loss_name} is not supported by {needed_by}; "
                f"supported losses: {supported_names(LOSS_DERIVATIVES)}"
            )
        reason = derivatives.unsupported_reason(self.loss_fn, output, target)
        if reason is not None:
            raise UnsupportedError(f"loss {loss_name} is not supported by {needed_by}: {reason}")
        return derivatives

    def _choose_route(self, last: Call | None) -> list[Call] | None:
        """The chain to push along (last call first), or ``None`` for the graph route."""
        chain = None if self.route == "graph" else self._record.chain(last)
        if chain is None and self.route == "chain":
            raise UnsupportedError(
                f"route='chain': the recorded calls do not form a chain of supported modules "
                f"({supported_names(MODULE_DERIVATIVES)}) from the input to the loss; "
                "use route='auto' or 'graph'"
            )
        if chain is None and not has_gradient_edges():
            raise UnsupportedError(
                f"{_names(self._second_order)} on a model that is not a chain of supported "
                "modules need torch.autograd.graph.get_gradient_edge (PyTorch >= 2.4)"
            )
        return chain

    def _start_graph(self, output: Tensor, loss: Tensor, stacks: dict[object, Stack]) -> None:
        """Hold the stacks until the backward pass starts: the loss's tensor hook fires before
        any module output's."""
        start = gradient_edge(output)
        if start is None or not loss.requires_grad:
            return
        if any(kind.has_module_curvature for kind in self._kinds):
            needed_by = _names(e for e in self._second_order if e.stack_kind().has_module_curvature)
            check_hessian_glue(start, self._record.calls, needed_by)
            check_shared_uses_independent(self._record.calls, self._record.shared, needed_by)
        self._on_graph = True
        self._graph_stacks = stacks
        loss.register_hook(partial(self._push_on_graph, start, self._pass_id))

    # ------------------------------------------------------------------- backward hooks
    def _push_on_graph(self, start: object, pass_id: int, grad_loss: Tensor) -> None:
        """Push every stack from the model output to every call with parameters."""
        if self._nested or not self._active or pass_id != self._pass_id:
            return
        self._finish_with_backward()
        targets = [call for call in self._record.calls if call.params]
        for kind in self._kinds:
            self._reduce_on_arrival(start, kind, self._graph_stacks.pop(kind.key), targets)

    def _reduce_on_arrival(
        self, start: object, kind: StackKind, stack: Stack, targets: list[Call]
    ) -> None:
        """Push a stack from ``start`` to the targets and reduce what arrives at each into
        the results of the extensions of its kind."""
        extensions = [ext for ext in self._second_order if ext.stack_kind().key == kind.key]
        shared = self._record.shared
        with self._nesting():
            for arrivals in push_to_calls(start, kind, stack, targets):
                for call, contribution in arrivals:
                    stacks = [contribution] * len(extensions)
                    self._results.reduce(call, extensions, stacks, shared)
                if shared:
                    self._results.reduce_shared(kind, arrivals, extensions, shared)

    def _backward(self, call: Call, grad_output: Tensor) -> None:
        if self._nested or not self._active:
            return
        if call.pass_id != self._pass_id:
            raise RuntimeError(
                "backward() reached a forward pass that is not the latest one inside the "
                "curvhooks.extend context; call backward() before the next forward pass"
            )
        self._finish_with_backward()
        self._backward_extensions(call, grad_output.detach().view(call.io.output_shape))
        call.release()

    def _finish_with_backward(self) -> None:
        """Once per pass, have the backward pass end by writing the results of parameters
        used by several calls (every use has contributed by then)."""
        if self._record.shared and not self._finish_queued:
            self._finish_queued = True
            finish = partial(self._results.finish_shared, self._first_order)
            at_backward_end(finish, needed_by="a parameter used by several calls")

    def _backward_extensions(self, call: Call, grad_output: Tensor | None) -> None:
        """Every extension's results at ``call``; the stacks it passes on."""
        if self._first_order:
            shared = self._record.shared
            stacks = [grad_output[None]] * len(self._first_order)
            self._results.write(call, self._first_order, stacks, shared)
            if shared:
                self._results.add_gradient(call, grad_output, shared)
        if not self._second_order:
            return
        if self._on_graph:
            self._results.commit(call)
            self._add_module_curvature(call, grad_output)
            return
        if call.params and not all(kind.key in call.stacks for kind in self._kinds):
            raise RuntimeError(
                f"no square-root stack reached module {call.describe()}: "
                f"{_names(self._second_order)} need the loss computed by the loss_fn passed "
                "to curvhooks.extend, called on the model's output"
            )
        stacks = [call.stacks.get(ext.stack_kind().key) for ext in self._second_order]
        self._results.write(call, self._second_order, stacks, self._record.shared)
        if call.push_to_producer:
            call.producer.stacks = {
                kind.key: self._push(kind, call, call.stacks[kind.key], grad_output)
                for kind in self._kinds
            }

    def _push(self, kind: StackKind, call: Call, stack: Stack, grad_output: Tensor | None) -> Stack:
        """Push a stack to the call's input, with the module's own curvature if any (chain)."""
        # The route owns the stack; results may refer to it only at a call with parameters.
        pushed = kind.push(call.derivatives, call.io, stack, in_place=not call.params)
        curvature = kind.module_curvature(call.derivatives, call.io, grad_output)
        return pushed if curvature is None else kind.join(pushed, curvature)

    def _add_module_curvature(self, call: Call, grad_output: Tensor) -> None:
        """On the graph route: push a nonlinear module's curvature from its input to the
        earlier calls with parameters."""
        if call.derivatives is None or call.input_edge is None:
            return
        targets = [c for c in self._record.calls[: call.index] if c.params]
        for kind in self._kinds:
            curvature = kind.module_curvature(call.derivatives, call.io, grad_output)
            if curvature is not None and targets:
                anchored = kind.from_parts(
                    tuple(
                        part.reshape(len(part), *call.input_edge_shape)
                        for part in kind.parts(curvature)
                    )
                )
                self._reduce_on_arrival(call.input_edge, kind, anchored, targets)

    def _nesting(self) -> _Nested:
        return _Nested(self)

    def _release_pass(self) -> None:
        self._record.release()
        self._model_output = None
        self._pending_inputs.clear()
        self._graph_stacks = {}
        self._on_graph = False
        self._finish_queued = False


class _Nested:
    """Marks the context's own autograd calls: the hooks they trigger do nothing."""

    def __init__(self, context: extend) -> None:
        self._context = context

    def __enter__(self) -> None:
        self._context._nested = True

    def __exit__(self, *exc_info: object) -> None:
        self._context._nested = False


def link_chain(chain: list[Call]) -> None:
    """Mark which calls of a chain (last call first) push the stacks on to their producer:
    those with a call holding parameters upstream."""
    upstream_has_params = False
    for call in reversed(chain):
        call.push_to_producer = upstream_has_params
        upstream_has_params = upstream_has_params or bool(call.params)


# --------------------------------------------------------------------------- helpers
def _check_arguments(
    model: nn.Module, loss_fn: nn.Module, extensions: tuple, route: str, unsupported: str
) -> None:
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
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if unsupported not in ("raise", "skip"):
        raise ValueError(f"unsupported must be 'raise' or 'skip', got {unsupported!r}")
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


def supported_params(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of ``model`` less those of modules curvhooks does not support
    (one warning names those modules)."""
    skipped = [
        (path, module)
        for path, module in model.named_modules()
        if _trainable_params(module) and unsupported_module(module)
    ]
    if skipped:
        names = ", ".join(describe(path, module) for path, module in skipped)
        warnings.warn(
            f"curvhooks leaves out the parameters of unsupported modules {names} "
            "(unsupported='skip')",
            stacklevel=3,
        )
    left_out = {id(p) for _, module in skipped for p in module.parameters(recurse=False)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in left_out]


def unsupported_module(module: nn.Module) -> bool:
    """Whether curvhooks lacks derivatives for ``module`` or for its arguments."""
    derivatives = module_derivatives(module)
    return derivatives is None or derivatives.unsupported_reason(module) is not None


def _check_supported(
    path: str, module: nn.Module, derivatives: ModuleDerivatives | None, needed_by: tuple
) -> None:
    if derivatives is None:
        raise UnsupportedError(
            f"module {describe(path, module)} is not supported by "
            f"{_names(needed_by)}; supported modules with parameters: "
            f"{supported_names(MODULE_DERIVATIVES)} (any graph of them, with torch functions "
            "and parameter-free modules between)"
        )
    reason = derivatives.unsupported_reason(module)
    if reason is not None:
        raise UnsupportedError(
            f"module {describe(path, module)} is not supported by {_names(needed_by)}: {reason}"
        )
    for extension in needed_by:
        reason = extension.unsupported_reason(derivatives)
        if reason is not None:
            raise UnsupportedError(
                f"module {describe(path, module)} is not supported by {extension!r}: {reason}; "
                "exclude its parameters (requires_grad_(False), or params= at dataset level)"
            )


def check_eval_mode(model: nn.Module) -> None:
    """Reject modules whose output depends on the batch or on randomness: BatchNorm and
    Dropout in training mode, BatchNorm without running statistics in any mode."""
    batch_dependent = BATCH_NORMS + DROPOUTS
    for path, module in model.named_modules():
        if module.training and isinstance(module, batch_dependent):
            raise ValueError(
                f"module {describe(path, module)} is in training mode, where its output "
                "depends on the batch or on randomness, so the curvature is not that of a "
                "fixed function; call model.eval() first"
            )
        if isinstance(module, BATCH_NORMS) and module.running_var is None:
            raise ValueError(
                f"module {describe(path, module)} has track_running_stats=False: it "
                "normalises by the batch's statistics even in eval mode, so samples are not "
                "independent and the curvature is not that of a fixed function; use "
                "track_running_stats=True"
            )


def _rehook_producers(call: Call, output: Tensor, hook_of: Callable[[Call], Callable]) -> None:
    """An in-place module just rewrote the history of its input, a view (``Flatten`` of a
    convolution's output, say): the tensor hooks on every view of that base will never fire.
    Hook the producers that made such views again, on ``output`` after ``call``'s own hook,
    nearest first, so they fire in the order of the chain. Only parameter-free producers
    (reshapes) are rehooked: they need no output gradient of their own, only the stacks pushed
    to them; one with parameters hooks its view's base instead (``gradient_anchor``)."""
    base = output._base
    producer = call.producer
    while (
        producer is not None
        and not producer.params
        and producer.handle is not None
        and producer.view_base is base
    ):
        producer.handle.remove()
        producer.handle = output.register_hook(hook_of(producer))
        producer = producer.producer


def _overwrites_needed_input(module: nn.Module, derivatives: ModuleDerivatives | None) -> bool:
    """Whether ``module`` runs in place while its derivatives need its input."""
    return bool(getattr(module, "inplace", False)) and bool(
        derivatives is not None and derivatives.needs_input
    )


def _trainable_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The module's own parameters that require gradients, by name."""
    return [
        (name, param)
        for name, param in module.named_parameters(recurse=False)
        if param.requires_grad
    ]


def _names(extensions) -> str:
    return ", ".join(map(repr, extensions))
