"""The hooks as the dataset functions use them: attached for a data set's batches with the
results in a table (``hooked``), and whether the hooks' own backward pass along a chain
applies (``supports_chain``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from curvhooks.derivatives import loss_derivatives
from curvhooks.extensions import Extension
from curvhooks.hooks.backward import AutogradBackward, ChainBackward
from curvhooks.hooks.plan import HookPlan, unsupported_module
from curvhooks.hooks.sinks import Sink


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
    ``"graph"`` always autograd's, where modules without derivatives of their own are served
    by the generic ones (``HookPlan.of``)."""
    if route != "graph" and supports_chain(model, loss_fn):
        plan = HookPlan.of(
            model, loss_fn, extensions, route="chain", params=params, records_leaves=True
        )
        backward = ChainBackward(plan, sink)
    else:
        plan = HookPlan.of(model, loss_fn, extensions, route=route, params=params, generic=True)
        backward = AutogradBackward(plan, sink)
    backward.attach()
    try:
        yield backward
    finally:
        backward.detach()
