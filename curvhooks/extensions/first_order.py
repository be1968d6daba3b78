"""First-order extensions: per-sample gradients and their statistics.

Every quantity is one of the reduced loss that ``loss_fn`` returns, so per-sample pieces sum to
the batch quantity: ``grad_batch.sum(0) == p.grad``.
"""

from __future__ import annotations

from torch import Tensor

from curvhooks.extensions.base import Extension, Target, result_buffer


class BatchGrad(Extension):
    """``grad_batch`` ``[N, *p.shape]``: sample n's contribution to ``p.grad``."""

    attribute = "grad_batch"

    def compute(self, target: Target, mat: Tensor, previous: Tensor | None = None) -> Tensor:
        result = result_buffer(previous, (mat.shape[1], *target.param.shape), target.param)
        target.products(mat, out=result[None])
        return result


class BatchL2Grad(Extension):
    """``batch_l2`` ``[N]``: squared L2 norm of each ``grad_batch[n]``.

    ``Linear`` and ``Conv2d`` never build the per-sample gradients where a contraction of the
    input with the output gradient is cheaper.
    """

    attribute = "batch_l2"

    def compute(self, target: Target, mat: Tensor, previous: Tensor | None = None) -> Tensor:
        return target.sq_norm(mat)


class SumGradSquared(Extension):
    """``sum_grad_squared`` ``p.shape``: ``(grad_batch ** 2).sum(0)``."""

    attribute = "sum_grad_squared"

    def compute(self, target: Target, mat: Tensor, previous: Tensor | None = None) -> Tensor:
        return target.sq_sum(mat, per_sample=False)


class Variance(Extension):
    """``variance`` ``p.shape``: per-entry variance (divided by N) of the rows of ``grad_batch``.

    Computed as ``sum_grad_squared / N - (p.grad / N) ** 2``, clamped at zero.
    """

    attribute = "variance"

    def compute(self, target: Target, mat: Tensor, previous: Tensor | None = None) -> Tensor:
        batch = mat.shape[1]
        second_moment = target.sq_sum(mat, per_sample=False).div_(batch)
        mean = target.summed(mat).div_(batch)
        # Rounding can leave an entry of a (near-)constant column slightly below zero.
        return second_moment.sub_(mean.square_()).clamp_(min=0)
