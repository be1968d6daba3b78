"""Derivatives of any module with parameters that curvhooks has no class for (a user's layer,
a subclass with its own ``forward``), by ``torch.func`` on the module's own call.

The module is treated as a function of its one input and its parameters that acts on each
sample alone: ``f(x_n; theta)``. Stacks are pushed to the input by one reverse-mode product
over the batch, batched over the vectors; the per-sample parameter products are reverse-mode
products of ``f`` on each sample, batched over samples and vectors (``vmap``). Before its
first use on a call the module is run again on the recorded input, on the batch and on each
sample alone: a module that mixes samples, draws random numbers, or takes more than its
first argument gives a different output there, and is refused instead of served wrongly.

The module's own second derivatives are not known (it may be nonlinear in its parameters):
the Hessian extensions refuse it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap

from curvhooks.derivatives.base import ModuleDerivatives, ModuleIO
from curvhooks.errors import UnsupportedError

_CHECKED = "generic_checked"
_PRODUCTS = "generic_products"


class GenericDerivatives(ModuleDerivatives):
    """Any module with parameters, by ``torch.func`` on its recorded input (see the module
    docstring)."""

    needs_input = True
    needs_output = True
    generic = True

    def jac_t_mat_prod(self, io: ModuleIO, mat: Tensor) -> Tensor:
        self._check_per_sample(io)
        _, pullback = vjp(_call(io.module, {}), io.input)
        return vmap(pullback)(mat)[0]

    def param_jac_t_mat_prod(
        self, io: ModuleIO, name: str, mat: Tensor, out: Tensor | None = None
    ) -> Tensor:
        """Per-sample products ``[V, N, *p.shape]``; those of the module's other parameters
        from the same stack are computed with them and kept until asked for (once each)."""
        self._check_per_sample(io)
        cached = io.cache.get(_PRODUCTS)
        if cached is None or cached[0] is not mat or name not in cached[1]:
            cached = io.cache[_PRODUCTS] = (mat, _per_sample_products(io.module, io.input, mat))
        products = cached[1].pop(name)
        return products if out is None else out.copy_(products)

    def _check_per_sample(self, io: ModuleIO) -> None:
        """Raise unless the module, run again on its recorded input, on the batch and on each
        sample alone, gives the output it gave in the forward pass."""
        if io.cache.get(_CHECKED):
            return
        call = _call(io.module, {})
        with torch.no_grad():
            batched = call(io.input)
            per_sample = vmap(lambda sample: call(sample[None])[0], randomness="different")(
                io.input
            )
        scale = io.output.abs().max()
        tolerance = torch.finfo(io.output.dtype).eps ** 0.5 * max(float(scale), 1.0)
        for name, value in (("on the batch", batched), ("on each sample alone", per_sample)):
            if value.shape != io.output.shape or (value - io.output).abs().max() > tolerance:
                raise UnsupportedError(
                    f"{type(io.module).__name__} has no curvhooks derivatives and is served by "
                    f"torch.func as a function of its first argument acting on each sample "
                    f"alone, but run again {name} it gives another output than in the forward "
                    "pass (it mixes samples, is random, or takes more arguments); pass "
                    "generic=False and unsupported='skip' to leave its parameters out"
                )
        io.cache[_CHECKED] = True


def _call(module: nn.Module, values: dict[str, Tensor]) -> Callable[[Tensor], Tensor]:
    """The module's ``forward`` on an input (no hooks: the recorder's would record the call),
    its parameters detached and replaced by ``values`` where given."""

    def output(x: Tensor) -> Tensor:
        held = dict(module._parameters)
        try:
            for name, param in held.items():
                if param is not None:
                    module._parameters[name] = values.get(name, param.detach())
            return module.forward(x)
        finally:
            module._parameters.update(held)

    return output


def _per_sample_products(module: nn.Module, inputs: Tensor, mat: Tensor) -> dict[str, Tensor]:
    """Name -> ``[V, N, *p.shape]``: each sample's products of the stack ``mat``
    ``[V, N, *out]`` with the Jacobian of the output in each trainable parameter."""
    names = [name for name, param in module.named_parameters() if param.requires_grad]
    points = [module.get_parameter(name).detach() for name in names]

    def sample_products(sample: Tensor, vectors: Tensor) -> tuple[Tensor, ...]:
        def output(*values: Tensor) -> Tensor:
            return _call(module, dict(zip(names, values)))(sample[None])[0]

        _, pullback = vjp(output, *points)
        return vmap(pullback)(vectors)

    products = vmap(sample_products, in_dims=(0, 1), out_dims=1)(inputs, mat)
    return dict(zip(names, products))
