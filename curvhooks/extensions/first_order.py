"""First-order extensions: per-sample gradients and their statistics.

Every quantity is one of the reduced loss that ``loss_fn`` returns, so per-sample pieces sum to
the batch quantity: ``grad_batch.sum(0) == p.grad``.
"""

from __future__ import annotations

from torch import Tensor

from curvhooks.derivatives import ModuleDerivatives, ModuleIO
from curvhooks.extensions.base import Extension, result_buffer


class BatchGrad(Extension):
    """``grad_batch`` ``[N, *p.shape]``: sample n's contribution to ``p.grad``."""

    attribute = "grad_batch"

    def compute(
        self,
        derivatives: ModuleDerivatives,
        io: ModuleIO,
        name: str,
        mat: Tensor,
        previous: Tensor | None = None,
    ) -> Tensor:
        param = getattr(io.module, name)
        result = result_buffer(previous, (mat.shape[1], *param.shape), param)
        derivatives.param_jac_t_mat_prod(io, name, mat, out=result[None])
        return result


class BatchL2Grad(Extension):
    """``batch_l2`` ``[N]``: squared L2 norm of each ``grad_batch[n]``.

    ``Linear`` and ``Conv2d`` never build the per-sample gradients where a contraction of the
    input with the output gradient is cheaper.
    """

    attribute = "batch_l2"

    def compute(
        self,
        derivatives: ModuleDerivatives,
        io: ModuleIO,
        name: str,
        mat: Tensor,
        previous: Tensor | None = None,
    ) -> Tensor:
        return derivatives.param_sq_norm(io, name, mat)


class SumGradSquared(Extension):
    """``sum_grad_squared`` ``p.shape``: ``(grad_batch ** 2).sum(0)``."""

    attribute = "sum_grad_squared"

    def compute(
        self,
        derivatives: ModuleDerivatives,
        io: ModuleIO,
        name: str,
        mat: Tensor,
        previous: Tensor | None = None,
    ) -> Tensor:
        return derivatives.param_sq_sum(io, name, mat, per_sample=False)


class Variance(Extension):
    """``variance`` ``p.shape``: per-entry variance (divided by N) of the rows of ``grad_batch``.

    Computed as ``sum_grad_squared / N - (p.grad / N) ** 2``.
    """

    attribute = "variance"

    def compute(
        self,
        derivatives: ModuleDerivatives,
        io: ModuleIO,
        name: str,
        mat: Tensor,
        previous: Tensor | None = None,
    ) -> Tensor:
        batch = mat.shape[1]
        second_moment = derivatives.param_sq_sum(io, name, mat, per_sample=False).div_(batch)
        mean = derivatives.param_jac_t_mat_prod_summed(io, name, mat).div_(batch)
        return second_moment.sub_(mean.square_())
