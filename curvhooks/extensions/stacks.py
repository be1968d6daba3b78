"""Kinds of propagated stacks: where a stack starts, how it passes a module, how parts join.

A stack holds V vectors per sample, ``[V, N, *shape]``, at some tensor of the network. It starts
at the model output ``f`` and is pushed to each module's output, where an extension reduces it
with the module's parameter products. Pushing is a vector-Jacobian product: on a chain, the
modules' ``jac_t_mat_prod`` (the hooks' analytic route); on any graph, one batched
``torch.autograd.grad`` (the graph route). Both give the total derivative of ``S^T f`` in the
module's output.

The kinds differ in where they start and what they carry:

- ``GGNStack`` (exact) and ``MonteCarloStack``: a square root ``S`` of the loss Hessian in
  ``f``, so that a parameter's pushed stack ``V`` gives its GGN block ``V^T V``;
- ``HessianStack``: a pair ``(P, Q)`` of such stacks with ``P P^T - Q Q^T`` the exact Hessian
  of the loss in the tensor it sits at; every nonlinear module adds its own curvature;
- ``IdentityStack``: the identity over the C output entries of a sample, so that a pushed
  stack is the per-sample Jacobian of the model output;
- ``RowsGGNStack`` and ``GradientStack``: the type-2 and empirical factors of KFAC.

Each kind is identified by its ``key``: extensions that reduce the same kind share one stack.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch
from torch import Tensor, nn

from curvhooks.derivatives import LossDerivatives, ModuleDerivatives, ModuleIO, loss_gradient
from curvhooks.derivatives.base import scale_entries

Stack = Tensor | tuple[Tensor, Tensor]
"""A stack ``[V, N, *shape]``, or for ``HessianStack`` a pair (positive, negative)."""


class StackKind:
    """Where a kind of stack starts, how it passes a module, and how contributions join."""

    key: Hashable = None
    needs_loss_hessian: bool = True
    """Whether the stack starts from the loss's Hessian (so the loss must be supported)."""
    has_module_curvature: bool = False
    """Whether nonlinear modules add their own curvature (``module_curvature``)."""

    def start(
        self, loss_fn: nn.Module, derivatives: LossDerivatives | None, output: Tensor, target
    ) -> Stack:
        """The stack at the model output ``[N, *out]``, in fresh memory of its own (the
        route may overwrite it as it pushes)."""
        raise NotImplementedError

    def parts(self, stack: Stack) -> tuple[Tensor, ...]:
        """The stack as a tuple of ``[V, N, *shape]`` tensors, each pushed on its own."""
        return (stack,)

    def from_parts(self, parts: tuple[Tensor, ...]) -> Stack:
        """Inverse of ``parts``."""
        return parts[0]

    def push(
        self, derivatives: ModuleDerivatives, io: ModuleIO, stack: Stack, in_place: bool = False
    ) -> Stack:
        """Push the stack from a module's output to its input (analytic route); with
        ``in_place``, where the module's Jacobian is diagonal, by overwriting the stack (for
        its owner, once nothing else refers to it)."""
        diagonal = derivatives.jacobian_diagonal(io) if in_place else None
        return self.from_parts(
            tuple(
                part.new_zeros(0, *io.input_shape)
                if not len(part)
                else derivatives.jac_t_mat_prod(io, part)
                if diagonal is None
                else scale_entries(part, diagonal, out=part)
                for part in self.parts(stack)
            )
        )

    def join(self, stack: Stack, other: Stack) -> Stack:
        """Two contributions to the same tensor's stack, as one stack."""
        return self.from_parts(
            tuple(torch.cat(pair) for pair in zip(self.parts(stack), self.parts(other)))
        )

    def module_curvature(
        self, derivatives: ModuleDerivatives, io: ModuleIO, grad_output: Tensor
    ) -> Stack | None:
        """The stack a nonlinear module adds at its input, or ``None``."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key!r})"


class GGNStack(StackKind):
    """The exact square root of the loss Hessian: ``[C, N, *out]``."""

    key = "exact"

    def start(self, loss_fn, derivatives, output, target) -> Tensor:
        return derivatives.sqrt_hessian(loss_fn, output, target)


class MonteCarloStack(StackKind):
    """A Monte-Carlo square root with ``mc_samples`` vectors, unbiased: ``[M, N, *out]``."""

    def __init__(self, mc_samples: int) -> None:
        self.key = mc_samples

    def start(self, loss_fn, derivatives, output, target) -> Tensor:
        return derivatives.sqrt_hessian_mc(loss_fn, output, target, self.key)


class RowsGGNStack(StackKind):
    """KFAC's type-2 factor ``[C, N, *out]``: per output row the loss Hessian's square root,
    its columns summed over a sample's rows (``LossDerivatives.sqrt_hessian_rows``); the
    exact square root where a sample has one row."""

    key = "rows"

    def start(self, loss_fn, derivatives, output, target) -> Tensor:
        return derivatives.sqrt_hessian_rows(loss_fn, output, target)


class GradientStack(StackKind):
    """The loss gradient in the output over ``sqrt(s)``: ``[1, N, *out]``, one vector per
    sample, so that its outer products scale with the reduction factor ``s`` as a square-root
    GGN's do (the empirical Fisher ``s sum_n grad(l_n) grad(l_n)^T``)."""

    key = "gradient"

    def start(self, loss_fn, derivatives, output, target) -> Tensor:
        gradient = loss_gradient(loss_fn, output, target)
        return gradient.div_(derivatives.scale(loss_fn, output) ** 0.5)[None]


class HessianStack(StackKind):
    """Signed square roots ``(P, Q)`` of the exact Hessian.

    The loss starts ``P`` with its square root (its Hessian is positive semi-definite) and
    ``Q`` empty. A nonlinear module adds its curvature at its input as signed roots
    (``ModuleDerivatives.residual_roots``); for an element-wise one, the per-sample diagonal
    ``r = f''(x) * dL/d(out)`` as unit vectors scaled by ``sqrt(max(r, 0))`` to ``P`` and by
    ``sqrt(max(-r, 0))`` to ``Q``. Contributions join by concatenation.
    """

    key = "hessian"
    has_module_curvature = True

    def start(self, loss_fn, derivatives, output, target) -> tuple[Tensor, Tensor]:
        if not derivatives.hessian_is_psd:
            raise NotImplementedError(f"{type(loss_fn).__name__} has an indefinite Hessian")
        positive = derivatives.sqrt_hessian(loss_fn, output, target)
        return positive, positive.new_zeros(0, *positive.shape[1:])

    def parts(self, stack: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return stack

    def from_parts(self, parts: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        return parts[0], parts[1]

    def module_curvature(self, derivatives, io, grad_output) -> tuple[Tensor, Tensor] | None:
        return derivatives.residual_roots(io, grad_output)


class IdentityStack(StackKind):
    """The identity over a sample's C output entries: ``[C, N, *out]``, no loss involved."""

    key = "identity"
    needs_loss_hessian = False

    def start(self, loss_fn, derivatives, output, target) -> Tensor:
        batch, entries = output.shape[0], output[0].numel()
        eye = torch.eye(entries, dtype=output.dtype, device=output.device)
        stack = eye[:, None, :].expand(entries, batch, entries).contiguous()  # fresh memory
        return stack.view(entries, *output.shape)


GGN_EXACT = GGNStack()
GGN_ROWS = RowsGGNStack()
GRADIENT = GradientStack()
HESSIAN = HessianStack()
IDENTITY = IdentityStack()
