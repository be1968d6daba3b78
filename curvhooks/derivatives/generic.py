"""Derivatives of any module with parameters that curvhooks has no class for (a user's layer,
a subclass with its own ``forward``), by ``torch.func`` on the module's own call.

The module is treated as a function of its one input and its parameters that acts on each
sample alone: ``f(x_n; theta)``. Stacks are pushed to the input by reverse-mode products over
the batch, batched over the vectors; the per-sample parameter products are reverse-mode
products of ``f`` on each sample, batched over the samples, one vector at a time (nested
``vmap`` hits wrong batching rules, e.g. of ``prelu``'s backward in torch 2.13).

Nothing is served on trust:

- at the forward pass the module runs again on its input, on the batch and on each sample
  alone: a module that mixes samples, draws random numbers, or takes more than its first
  argument gives another output there, and is refused;
- every batched product is checked against one plain reverse-mode product over the batch
  (a random combination of the vectors, summed over the samples): a batching rule that gets
  it wrong raises instead of giving a wrong number.

Modules with forward hooks of their own (which ``torch.func`` on ``forward`` would bypass),
or holding one parameter under two names, are not served. The module's own second
derivatives are not known (it may be nonlinear in its parameters): the Hessian extensions
refuse it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap

from curvhooks.derivatives.base import ModuleDerivatives, ModuleIO
from curvhooks.errors import UnsupportedError
from curvhooks.functional import agree, check_weights, parameters_replaced

_PRODUCTS = "generic_products"


class GenericDerivatives(ModuleDerivatives):
    """Any module with parameters, by ``torch.func`` on its recorded input (see the module
    docstring)."""

    needs_input = True
    generic = True

    @staticmethod
    def serves(module: nn.Module) -> bool:
        """Whether the fallback may serve ``module`` (asked before curvhooks hooks it)."""
        return _refusal_reason(module) is None

    def take_saved(self, io: ModuleIO, output: Tensor) -> None:
        """At the forward pass: check that the module is a function of its input acting on
        each sample alone (before later modules may change ``output`` in place)."""
        call = _call(io.module, {})
        inputs = io.input.clone()  # the module may write into its input
        try:
            with torch.no_grad():
                batched = call(inputs)
                alone = vmap(lambda sample: call(sample[None])[0], randomness="different")(inputs)
        except (TypeError, RuntimeError) as error:
            raise _refusal(io.module, f"it fails when run again on its input ({error})") from error
        for where, value in (("on the batch", batched), ("on each sample alone", alone)):
            if not agree(value, output.detach()):
                raise _refusal(
                    io.module,
                    f"run again {where} it gives another output than in the forward pass (it "
                    "mixes samples, is random, or takes more arguments)",
                )

    def jac_t_mat_prod(self, io: ModuleIO, mat: Tensor) -> Tensor:
        _, pullback = vjp(_call(io.module, {}), io.input)
        pushed = vmap(pullback)(mat)[0]
        _check_batching(io.module, mat, (pushed,), pullback, False)
        return pushed

    def param_jac_t_mat_prod(
        self, io: ModuleIO, name: str, mat: Tensor, out: Tensor | None = None
    ) -> Tensor:
        """Per-sample products ``[V, N, *p.shape]``; those of the module's other parameters
        from the same stack are computed with them and kept until asked for (once each)."""
        cached = io.cache.get(_PRODUCTS)
        if cached is None or cached[0] is not mat or name not in cached[1]:
            cached = io.cache[_PRODUCTS] = (mat, _per_sample_products(io.module, io.input, mat))
        products = cached[1].pop(name)
        return products if out is None else out.copy_(products)


def _refusal_reason(module: nn.Module) -> str | None:
    """Why the fallback may not serve ``module``: forward hooks of its own (``weight_norm``,
    say), which ``torch.func`` on ``forward`` would bypass, or one parameter under several
    names; ``None`` if it may."""
    if module._forward_pre_hooks or module._forward_hooks:
        return "it has forward hooks of its own"
    names = dict(module.named_parameters(remove_duplicate=False))
    if len(names) != len(dict(module.named_parameters())):
        return "it holds one parameter under several names"
    return None


def _call(module: nn.Module, values: dict[str, Tensor]) -> Callable[[Tensor], Tensor]:
    """The module's ``forward`` on an input (no hooks: the recorder's would record the call),
    its parameters detached and replaced by ``values`` where given."""
    replaced = {
        id(param): values.get(name, param.detach()) for name, param in module.named_parameters()
    }

    def output(x: Tensor) -> Tensor:
        with parameters_replaced(module, replaced):
            return module.forward(x)

    return output


def _per_sample_products(module: nn.Module, inputs: Tensor, mat: Tensor) -> dict[str, Tensor]:
    """Name -> ``[V, N, *p.shape]``: each sample's products of the stack ``mat``
    ``[V, N, *out]`` with the Jacobian of the output in each trainable parameter."""
    names = [name for name, param in module.named_parameters() if param.requires_grad]
    points = [module.get_parameter(name).detach() for name in names]

    def with_values(x: Tensor) -> Callable[..., Tensor]:
        return lambda *values: _call(module, dict(zip(names, values)))(x)

    def sample_products(sample: Tensor, vector: Tensor) -> tuple[Tensor, ...]:
        _, pullback = vjp(lambda *values: with_values(sample[None])(*values)[0], *points)
        return pullback(vector)

    per_vector = [vmap(sample_products)(inputs, vectors) for vectors in mat]
    products = tuple(torch.stack(parts) for parts in zip(*per_vector))
    _, pullback = vjp(with_values(inputs), *points)
    _check_batching(module, mat, products, pullback, True)
    return dict(zip(names, products))


def _check_batching(
    module: nn.Module,
    mat: Tensor,
    products: tuple[Tensor, ...],
    pullback: Callable[[Tensor], tuple[Tensor, ...]],
    summed: bool,
) -> None:
    """Raise unless ``products`` (``[V, N, ...]`` each, summed over the samples if
    ``summed``) agree with one plain reverse-mode product of a random combination of the
    stack's vectors over the batch."""
    weights = check_weights(mat, (len(mat),))
    expected = pullback(torch.einsum("v,v...->...", weights, mat))
    for found, reference in zip(products, expected):
        combined = torch.einsum("v,v...->...", weights, found.sum(1) if summed else found)
        if found.shape[0] != len(mat) or not agree(combined, reference):
            raise _refusal(
                module,
                "torch.func's batched products disagree with a plain one over the batch (a "
                "batching rule of this torch version)",
            )


def _refusal(module: nn.Module, why: str) -> UnsupportedError:
    return UnsupportedError(
        f"{type(module).__name__} has no curvhooks derivatives, and the generic torch.func "
        f"fallback (a function of its first argument acting on each sample alone) cannot "
        f"serve it: {why}; pass generic=False and unsupported='skip' to leave its parameters "
        "out, or use the dataset functions (autograd)"
    )
