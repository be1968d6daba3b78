"""``extend``: the context of one ``with`` block. It checks what is asked (``HookPlan``),
attaches the hooks of an ``AutogradBackward`` on entering and removes them on leaving; the
results land on the parameters (``ParameterAttributes``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from curvhooks.extensions import Extension
from curvhooks.hooks.backward import AutogradBackward
from curvhooks.hooks.plan import HookPlan, check_arguments
from curvhooks.hooks.sinks import ParameterAttributes


class extend:
    """Context manager: compute ``extensions`` during each ``backward()`` inside the block.

    Args:
        model: Any ``nn.Module``: ``nn.Sequential``, residual blocks, branches, torch
            functions between modules. Its modules with trainable parameters must be
            supported.
        loss_fn: The loss module whose output is differentiated (reduction ``"mean"`` or
            ``"sum"``). Second-order extensions need a supported loss (``CrossEntropyLoss``,
            ``MSELoss`` or ``BCEWithLogitsLoss``) called on the model's output.
        *extensions: Extension instances, e.g. ``BatchGrad(), DiagGGN()``.
        unsupported: ``"raise"``: a module with trainable parameters curvhooks does not
            support raises ``UnsupportedError``; ``"skip"``: its parameters get no results
            (one warning names the modules), everything else is computed as usual.
        route: How second-order stacks travel: ``"chain"`` (analytic pushes along a chain
            of supported modules), ``"graph"`` (autograd, any graph) or ``"auto"`` (the
            chain where the recorded calls form one).
        params: The parameters to compute results for (default: every parameter that
            requires grad on entering); the others get none and cost nothing.
        generic: Serve a module with parameters that curvhooks has no derivatives for (a
            layer of your own, a subclass with its own ``forward``; no child modules) by
            ``torch.func`` on its call, as a function of its arguments acting on each
            sample alone (checked on each call; one warning names such modules), and the
            parameters a module uses directly in its own ``forward`` (a class token) by
            autograd, per sample (one warning names them). Exact, for the first-order and
            GGN-family extensions and ``Jacobian``; the Hessian extensions and KFAC refuse
            them. ``False``: such modules and parameters are unsupported.

    Every result is a quantity of the reduced loss that ``loss_fn`` returns and is written
    to an attribute of each served parameter (``p.grad_batch``, ...). Entering clears earlier
    results; leaving removes every hook from the model and the loss and every stored tensor
    (tensor hooks left on outputs of its forward passes do nothing from then on).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        *extensions: Extension,
        unsupported: str = "raise",
        route: str = "auto",
        params: Iterable[nn.Parameter] | None = None,
        generic: bool = True,
    ) -> None:
        check_arguments(model, loss_fn, extensions, route, unsupported)
        self.model = model
        self.loss_fn = loss_fn
        self.extensions = extensions
        self._options = {
            "unsupported": unsupported,
            "route": route,
            "params": None if params is None else list(params),
            "generic": generic,
        }
        self._results = ParameterAttributes()
        self._backward: AutogradBackward | None = None

    def __enter__(self) -> extend:
        if self._backward is not None:
            raise RuntimeError(
                "this curvhooks.extend context is entered already; leave it first, or make "
                "another one"
            )
        plan = HookPlan.of(self.model, self.loss_fn, self.extensions, **self._options)
        self._results.take(self.model)
        self._backward = AutogradBackward(plan, self._results)
        self._backward.attach()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._backward is not None:
            self._backward.detach()
        self._backward = None
        self._results.clear()
