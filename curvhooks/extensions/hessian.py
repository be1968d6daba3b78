"""Exact Hessian extensions: ``DiagHessian`` and ``HessianBlock``.

Representation: signed square-root stacks. The Hessian of the loss in a module's output is
``P P^T - Q Q^T`` for a pair of stacks ``(P, Q)``. The loss starts ``P`` with its square
root (the Hessians of cross-entropy, squared error and binary cross-entropy with logits
are positive semi-definite) and ``Q`` empty. Each module pushes both to its input; a
nonlinearity then adds its own curvature: an element-wise one the per-sample diagonal
``r = f''(x) * dL/d(out)``, as unit vectors scaled by ``sqrt(max(r, 0))`` to ``P`` and by
``sqrt(max(-r, 0))`` to ``Q``; a normalisation layer one dense block per normalised group, as
its eigenvectors scaled the same way.

Why this representation: it reuses the square-root GGN's propagation and every parameter
reduction unchanged, and the stacks grow only where the residual is non-zero (Sigmoid; ReLU
adds nothing). Propagating per-sample output Hessians ``[N, U, U]`` instead costs the same
``U^2 N`` at a nonlinearity of U units but also at every layer before one (two Jacobian
products per layer instead of one), so the stacks are cheaper for networks whose ReLUs
outnumber their Sigmoids. The affine modules are linear in their parameters, so a parameter's
block is ``J_p^T (P P^T - Q Q^T) J_p`` with no further term of its own.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from curvhooks.derivatives.base import ModuleDerivatives
from curvhooks.extensions.base import Extension, Target
from curvhooks.extensions.stacks import HESSIAN, StackKind


class HessianExtension(Extension):
    """An extension that reduces the signed Hessian stacks ``(positive, negative)``."""

    def stack_kind(self) -> StackKind:
        return HESSIAN

    def unsupported_reason(self, derivatives: ModuleDerivatives) -> str | None:
        if derivatives.generic:
            return (
                "it has no curvhooks derivatives, and its own second derivatives (it may be "
                "nonlinear in its parameters) are unknown to the generic torch.func fallback; "
                "use curvhooks.hessian, which differentiates any model by autograd"
            )
        if not derivatives.second_derivatives:
            return (
                "curvhooks has its first derivatives, not its own second derivatives; use "
                "curvhooks.hessian, which differentiates any model by autograd"
            )
        return None


def _signed_sum(reduce: Callable[[Tensor], Tensor], stack: tuple[Tensor, Tensor]) -> Tensor:
    """``reduce(P) - reduce(Q)`` for a stack ``(P, Q)``, skipping an empty part (one of the
    two may be empty, not both)."""
    positive, negative = stack
    if not len(positive):
        return reduce(negative).neg_()
    result = reduce(positive)
    return result.sub_(reduce(negative)) if len(negative) else result


class DiagHessian(HessianExtension):
    """``diag_hessian`` ``p.shape``: the exact diagonal of the Hessian block of ``p``."""

    attribute = "diag_hessian"

    def compute(
        self, target: Target, mat: tuple[Tensor, Tensor], previous: Tensor | None = None
    ) -> Tensor:
        return _signed_sum(lambda part: target.sq_sum(part, per_sample=False), mat)


class HessianBlock(HessianExtension):
    """``hessian_block`` ``[p.numel(), p.numel()]``: the exact Hessian block of ``p``."""

    attribute = "hessian_block"

    def compute(
        self, target: Target, mat: tuple[Tensor, Tensor], previous: Tensor | None = None
    ) -> Tensor:
        def gram(part: Tensor) -> Tensor:
            factor = target.products(part).flatten(2).flatten(0, 1)
            return factor.T @ factor

        return _signed_sum(gram, mat)
