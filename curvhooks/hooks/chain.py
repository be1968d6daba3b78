"""``ChainBackward``: the dataset functions' backward pass through a chain of supported modules,
run by the hooks themselves instead of autograd."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from curvhooks.derivatives import loss_derivatives, module_derivatives
from curvhooks.extensions.stacks import HESSIAN
from curvhooks.hooks.calls import Call
from curvhooks.hooks.context import extend, link_chain


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
    derivatives = module_derivatives(model)
    if derivatives is None or derivatives.unsupported_reason(model) is not None:
        return None
    return [model]


class ChainBackward(extend):
    """``extend`` for a chain of supported modules (``supports_chain``) that runs the
    backward pass itself.

    ``run_batch`` runs the model without building an autograd graph, recording each call;
    autograd gives only the loss's gradient in the model output. That gradient and the
    stacks are then pushed through the recorded calls, last to first, with the modules'
    derivatives, and each call's extensions get what the tensor hooks of ``extend`` would
    have handed them. No parameter gradient and no gradient of the first module's input is
    computed. Used by the dataset-level functions.
    """

    _pushes_gradients = True

    def __init__(self, model: nn.Module, loss_fn: nn.Module, *extensions: Any) -> None:
        super().__init__(model, loss_fn, *extensions, route="chain")

    def run_batch(self, X: Any, y: Tensor) -> Tensor:
        with torch.no_grad():
            output = self.model(X)
        last_call = self._record.producer_of(output)
        if self._first_order or HESSIAN in self._kinds:
            output.requires_grad_()
            (grad_output,) = torch.autograd.grad(self.loss_fn(output, y), output)
        else:  # the stacks alone: the loss's forward hook starts them
            self.loss_fn(output, y)
            grad_output = None
        self._push_back(last_call, grad_output)
        return output.detach()

    def _push_back(self, last_call: Call | None, grad_output: Tensor | None) -> None:
        """Hand each call on the chain its output gradient (if needed) and stacks, last to
        first."""
        if not self._second_order:  # else the loss's forward hook linked the chain
            link_chain(self._choose_route(last_call))
        call = last_call
        while call is not None:
            self._backward_extensions(call, grad_output)
            if call.push_to_producer and grad_output is not None:
                grad_output = call.derivatives.jac_t_mat_prod(call.io, grad_output[None])[0]
            call.release()
            call = call.producer
