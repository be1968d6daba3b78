"""Second-order extensions: the generalized Gauss-Newton (GGN) from square-root stacks.

The loss starts a stack ``S`` ``[V, N, *out]`` with ``sum_v S S^T`` its Hessian in the model
output (V = C exact, V = M Monte-Carlo); each module pushes it to its input. At a parameter
the pushed stack is ``sqrt_ggn`` and ``GGN = sqrt_ggn^T sqrt_ggn``. Quantities are those of the
reduced loss that ``loss_fn`` returns.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvhooks.extensions.base import Extension, MonteCarloExtension, Target, result_buffer
from curvhooks.extensions.stacks import IDENTITY, StackKind


class _Parts(list):
    """Per-sample products of consecutive parts of a stack's vectors, joined once."""


def _stacked(result: Tensor | _Parts, other: Tensor) -> _Parts:
    """Per-sample products of the stack's vectors so far and of its next part (joined by
    ``_joined``: joining at each part would copy the products once per part)."""
    if isinstance(result, _Parts):
        result.append(other)
        return result
    return _Parts([result, other])


def _joined(result: Tensor | _Parts) -> Tensor:
    """The per-sample products of the whole stack ``[V, N, *p.shape]``."""
    return torch.cat(result) if isinstance(result, _Parts) else result


def _per_sample_products(target: Target, mat: Tensor, previous: Tensor | None) -> Tensor:
    """The stack's per-sample parameter products ``[V, N, *p.shape]``, written into
    ``previous`` where it fits."""
    result = result_buffer(previous, (*mat.shape[:2], *target.param.shape), target.param)
    return target.products(mat, out=result)


class SqrtGGN(MonteCarloExtension):
    """``sqrt_ggn`` ``[C, N, *p.shape]`` (exact) or ``[M, N, *p.shape]`` (``mc_samples=M``).

    Flattened to ``V [C * N, p.numel()]``, the GGN block of ``p`` is ``V^T V``.
    """

    attribute = "sqrt_ggn"
    combine = staticmethod(_stacked)
    finish = staticmethod(_joined)

    def compute(self, target: Target, mat: Tensor, previous: Tensor | None = None) -> Tensor:
        return _per_sample_products(target, mat, previous)


class Jacobian(Extension):
    """``jacobian`` ``[C, N, *p.shape]``: the per-sample Jacobian of the model output in ``p``.

    Entry ``[c, n]`` is the derivative of output entry c (of the C = prod(out) entries of a
    sample, flattened) of sample n; the loss plays no part.
    """

    attribute = "jacobian"
    combine = staticmethod(_stacked)
    finish = staticmethod(_joined)

    def stack_kind(self) -> StackKind:
        return IDENTITY

    def compute(self, target: Target, mat: Tensor, previous: Tensor | None = None) -> Tensor:
        return _per_sample_products(target, mat, previous)


class DiagGGN(MonteCarloExtension):
    """``diag_ggn`` ``p.shape``: the diagonal of the GGN block (exact, or MC unbiased)."""

    attribute = "diag_ggn"

    def compute(self, target: Target, mat: Tensor, previous: Tensor | None = None) -> Tensor:
        return target.sq_sum(mat, per_sample=False)


class BatchDiagGGN(MonteCarloExtension):
    """``diag_ggn_batch`` ``[N, *p.shape]``: per-sample GGN diagonals; they sum to ``diag_ggn``."""

    attribute = "diag_ggn_batch"

    def compute(self, target: Target, mat: Tensor, previous: Tensor | None = None) -> Tensor:
        return target.sq_sum(mat, per_sample=True)
