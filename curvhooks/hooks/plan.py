"""What a context hooks and computes, checked once on construction: the arguments, the
modules to hook with their derivatives and served parameters, and the checks of modules and
losses that every route and every dataset function shares."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from curvhooks._compat import BATCH_NORMS, DROPOUTS
from curvhooks.derivatives import (
    LOSS_DERIVATIVES,
    MODULE_DERIVATIVES,
    SUPPORTED_REDUCTIONS,
    LossDerivatives,
    ModuleDerivatives,
    loss_derivatives,
    module_derivatives,
    supported_names,
)
from curvhooks.derivatives.generic import DirectDerivatives, GenericDerivatives
from curvhooks.errors import UnsupportedError
from curvhooks.extensions import Extension
from curvhooks.extensions.stacks import StackKind
from curvhooks.hooks.calls import describe

ROUTES = ("auto", "chain", "graph")
"""How stacks travel: ``"chain"`` (analytic pushes along a chain of supported modules),
``"graph"`` (autograd, any graph), ``"auto"`` (the chain where the calls form one)."""

Params = list[tuple[str, nn.Parameter]]


@dataclass(frozen=True)
class HookedModule:
    """A module to hook: its path, its derivatives (``None`` if unsupported, for a module
    recorded only to find chains) and the parameters it serves results to."""

    path: str
    module: nn.Module
    derivatives: ModuleDerivatives | None
    params: Params


@dataclass(frozen=True)
class HookPlan:
    """The checked request of a context.

    Attributes:
        model: The model.
        loss_fn: The loss module.
        first_order: The extensions that reduce the output gradient.
        second_order: The extensions that reduce a propagated stack.
        kinds: The stack kinds of ``second_order``, each once.
        modules: The modules to hook.
        route: One of ``ROUTES``.
        unsupported: ``"raise"`` or ``"skip"``.
    """

    model: nn.Module
    loss_fn: nn.Module
    first_order: tuple[Extension, ...]
    second_order: tuple[Extension, ...]
    kinds: tuple[StackKind, ...]
    modules: tuple[HookedModule, ...]
    route: str
    unsupported: str

    @classmethod
    def of(
        cls,
        model: nn.Module,
        loss_fn: nn.Module,
        extensions: tuple[Extension, ...],
        unsupported: str = "raise",
        route: str = "auto",
        params: Iterable[nn.Parameter] | None = None,
        records_leaves: bool = False,
        generic: bool = False,
    ) -> HookPlan:
        """Check the modules (``check_arguments`` checks the arguments); ``params`` limits
        the parameters served (default: all that require grad); ``records_leaves`` records
        every leaf module (to push along a chain), else only those with parameters and, for
        second order, the leaves; ``generic`` serves leaf modules with parameters that
        curvhooks has no derivatives for by ``GenericDerivatives`` (one warning names
        them)."""
        second_order = tuple(ext for ext in extensions if ext.stack_kind() is not None)
        kinds = {ext.stack_kind().key: ext.stack_kind() for ext in second_order}
        selected = None if params is None else check_params(model, list(params))
        records = records_leaves or bool(second_order)
        modules = _modules_to_hook(model, extensions, unsupported, selected, records, generic)
        return cls(
            model,
            loss_fn,
            tuple(ext for ext in extensions if ext.stack_kind() is None),
            second_order,
            tuple(kinds.values()),
            modules,
            route,
            unsupported,
        )

    def extensions_of(self, kind: StackKind) -> list[Extension]:
        """The second-order extensions that reduce stacks of ``kind``."""
        return [ext for ext in self.second_order if ext.stack_kind().key == kind.key]

    def params(self) -> list[tuple[str, nn.Parameter]]:
        """Every served parameter, by name in its module (a tied one once per module)."""
        return [named for hooked in self.modules for named in hooked.params]

    @property
    def has_module_curvature(self) -> bool:
        """Whether some stack takes the curvature of nonlinear modules (the Hessian's)."""
        return any(kind.has_module_curvature for kind in self.kinds)

    def served_ids(self) -> set[int]:
        """The ids of the parameters that get results."""
        return {id(param) for _, param in self.params()}

    def describe(self, param_ids: set[int]) -> list[str]:
        """The parameters of ``param_ids`` among the served, each with its module."""
        return [
            f"{hooked.path + '.' if hooked.path else ''}{name} of "
            f"{describe(hooked.path, hooked.module)}"
            for hooked in self.modules
            for name, param in hooked.params
            if id(param) in param_ids
        ]

    def check_loss(self, output: Tensor, target: Tensor) -> LossDerivatives | None:
        """The loss's derivatives where a stack starts from the loss's Hessian; raises for
        an unsupported loss or call."""
        needed_by = [e for e in self.second_order if e.stack_kind().needs_loss_hessian]
        if not needed_by:
            return None
        return check_loss(self.loss_fn, output, target, names(needed_by))


def check_params(model: nn.Module, params: list[nn.Parameter]) -> set[int]:
    """The ids of ``params``; raises unless they are parameters of ``model``, each once."""
    owned = {id(p) for p in model.parameters()}
    selected = {id(p) for p in params}
    if not selected <= owned:
        raise ValueError("params must be parameters of the model")
    if len(selected) != len(params):
        raise ValueError("params lists a parameter twice")
    return selected


USED_OUTSIDE = "used outside a call of its module (its parent's forward uses it directly, say)"


class UnservableError(UnsupportedError):
    """Parameters the hooks cannot serve on this model, found in its forward pass: used
    outside their modules' calls, or by a call whose leading dimension is not the batch.

    Attributes:
        found: Each such parameter's description, with why, by id.
    """

    def __init__(self, found: dict[int, str], fix: str) -> None:
        self.found = found
        super().__init__(f"{self.what()}; {fix}")

    def what(self) -> str:
        """What the hooks cannot serve, and why."""
        return f"the hooks cannot serve {'; '.join(self.found.values())}"


def not_batch_first(leading: int, batch: int) -> str:
    """Why a call whose leading dimension is not the batch cannot be served."""
    return f"called on a tensor of leading dimension {leading}, not the batch ({batch})"


def names(extensions: Iterable[Extension]) -> str:
    """The extensions, for messages: ``"DiagGGN(), BatchGrad()"``."""
    return ", ".join(map(repr, extensions))


def check_arguments(
    model: nn.Module, loss_fn: nn.Module, extensions: tuple, route: str, unsupported: str
) -> None:
    """Raise ``TypeError``/``ValueError`` for arguments that cannot work, saying what to do."""
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
            raise ValueError(f"{names(clash)} all write p.{attribute}; pass each extension once")


def _modules_to_hook(
    model: nn.Module,
    extensions: tuple[Extension, ...],
    unsupported: str,
    selected: set[int] | None,
    records_leaves: bool,
    generic: bool,
) -> tuple[HookedModule, ...]:
    """The modules to hook; raises for a module with served parameters that curvhooks cannot
    handle, or with ``unsupported="skip"`` leaves it out (one warning names them); with
    ``generic``, a leaf module with parameters and no derivatives of its own gets the
    generic ones (one warning names them)."""
    check_eval_mode(model)
    hooked, skipped, generically, directly = [], [], [], []
    for path, module, params in serving_modules(model, selected):
        derivatives = module_derivatives(module)
        is_leaf = next(module.children(), None) is None
        if not (params or (is_leaf and records_leaves)):
            continue
        if derivatives is None and generic and params and is_leaf and GENERIC.serves(module):
            derivatives = GENERIC
            generically.append(describe(path, module))
        elif derivatives is None and generic and params and not is_leaf:
            derivatives = DIRECT
            directly += [f"{path + '.' if path else ''}{name}" for name, _ in params]
        if params and unsupported == "skip" and _refused(module, derivatives):
            skipped.append(describe(path, module))
            continue
        if params and unsupported == "skip":  # extensions that refuse it leave it out alone
            skipped += [
                f"{describe(path, module)} by {ext!r}"
                for ext in extensions
                if ext.unsupported_reason(derivatives) is not None
            ]
        elif params:
            _check_supported(path, module, derivatives, extensions)
        hooked.append(HookedModule(path, module, derivatives, params))
    if skipped:
        warn_skipped(skipped)
    if generically:
        _warn(
            f"curvhooks has no derivatives for {', '.join(generically)} and serves them by "
            "torch.func on each sample (exact, slower; generic=False turns this off)"
        )
    if directly:
        _warn(
            f"curvhooks serves {', '.join(directly)}, used directly in their module's own "
            "forward, by autograd per sample (exact, slower; generic=False turns this off)"
        )
    return tuple(hooked)


def warn_skipped(described: list[str], what: str = "the parameters of unsupported modules") -> None:
    """The one warning of ``unsupported="skip"``, naming what gets no results; it points at
    the user's line (the first frame outside curvhooks and torch)."""
    listed = ", ".join(described)
    _warn(f"curvhooks skips {what} {listed} (unsupported='skip'): they get no results")


def _warn(message: str) -> None:
    """Warn, pointing at the user's line (the first frame outside curvhooks and torch)."""
    frame, level = inspect.currentframe(), 1
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARIES):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


_LIBRARIES = (str(Path(__file__).parents[1]), str(Path(torch.__file__).parent))

GENERIC = GenericDerivatives()
DIRECT = DirectDerivatives()


def serving_modules(
    model: nn.Module, selected: set[int] | None = None
) -> Iterator[tuple[str, nn.Module, Params]]:
    """Each module whose calls the hooks record, with the trainable parameters (among
    ``selected`` ids) served at its calls: its own, and its children's where its derivatives
    serve them (``nn.MultiheadAttention``'s ``out_proj``; those children are then left
    out)."""
    served_whole: list[str] = []
    for path, module in model.named_modules():
        if any(_inside(path, parent) for parent in served_whole):
            continue
        derivatives = module_derivatives(module)
        whole = derivatives is not None and derivatives.serves_children
        if whole:
            served_whole.append(path)
        yield path, module, trainable_params(module, selected, recurse=whole)


def _inside(path: str, parent: str) -> bool:
    """Whether the module at ``path`` lies below the one at ``parent``."""
    return parent == "" or path.startswith(parent + ".")


def trainable_params(
    module: nn.Module, selected: set[int] | None = None, recurse: bool = False
) -> Params:
    """The module's own parameters (with ``recurse``, its children's too) that require
    gradients (among ``selected`` ids), by name."""
    return [
        (name, param)
        for name, param in module.named_parameters(recurse=recurse)
        if param.requires_grad and (selected is None or id(param) in selected)
    ]


def unsupported_module(module: nn.Module) -> bool:
    """Whether curvhooks lacks derivatives for ``module`` or for its arguments."""
    return _refused(module, module_derivatives(module))


def _refused(module: nn.Module, derivatives: ModuleDerivatives | None) -> bool:
    """Whether ``derivatives`` (``None``: none) cannot serve ``module``."""
    return derivatives is None or derivatives.unsupported_reason(module) is not None


def supported_params(
    model: nn.Module, params: list[nn.Parameter] | None = None
) -> list[nn.Parameter]:
    """``params`` (default: the trainable parameters of ``model``) less those of modules
    curvhooks does not support (one warning names those modules)."""
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    selected = {id(p) for p in params}
    skipped = [
        (path, module)
        for path, module in model.named_modules()
        if trainable_params(module, selected) and unsupported_module(module)
    ]
    if skipped:
        warn_skipped([describe(path, module) for path, module in skipped])
    left_out = {id(p) for _, module in skipped for p in module.parameters(recurse=False)}
    return [p for p in params if id(p) not in left_out]


_SKIP_OR_EXCLUDE = (
    "pass unsupported='skip' to leave its parameters out (one warning names them), or "
    "exclude them (requires_grad_(False), or params= at dataset level)"
)


def _with_parameters() -> str:
    """The supported module classes that hold parameters, for messages."""
    table = {cls: d for cls, d in MODULE_DERIVATIVES.items() if d.serves_parameters}
    return supported_names(table)


def _check_supported(
    path: str, module: nn.Module, derivatives: ModuleDerivatives | None, needed_by: tuple
) -> None:
    if derivatives is None:
        raise UnsupportedError(
            f"module {describe(path, module)} is not supported by {names(needed_by)}; "
            f"supported modules with parameters: {_with_parameters()} (any graph of them, with "
            f"torch functions and parameter-free modules between); {_SKIP_OR_EXCLUDE}"
        )
    reason = derivatives.unsupported_reason(module)
    if reason is not None:
        raise UnsupportedError(
            f"module {describe(path, module)} is not supported by {names(needed_by)}: {reason}"
        )
    for extension in needed_by:
        reason = extension.unsupported_reason(derivatives)
        if reason is not None:
            raise UnsupportedError(
                f"module {describe(path, module)} is not supported by {extension!r}: {reason}; "
                f"{_SKIP_OR_EXCLUDE}"
            )


def check_loss(
    loss_fn: nn.Module, output: Tensor, target: Tensor, needed_by: str
) -> LossDerivatives:
    """The derivatives of ``loss_fn`` called on ``output`` and ``target``; raises
    ``UnsupportedError`` naming what ``needed_by`` cannot use."""
    derivatives = loss_derivatives(loss_fn)
    loss_name = type(loss_fn).__name__
    if derivatives is None:
        raise UnsupportedError(
            f"loss {loss_name} is not supported by {needed_by}; "
            f"supported losses: {supported_names(LOSS_DERIVATIVES)}"
        )
    reason = derivatives.unsupported_reason(loss_fn, output, target)
    if reason is not None:
        raise UnsupportedError(f"loss {loss_name} is not supported by {needed_by}: {reason}")
    return derivatives


def check_eval_mode(model: nn.Module) -> None:
    """Reject modules whose output depends on the batch or on randomness: BatchNorm and
    Dropout in training mode, BatchNorm without running statistics in any mode."""
    for path, module in model.named_modules():
        if module.training and isinstance(module, BATCH_NORMS + DROPOUTS):
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
