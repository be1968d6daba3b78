"""Second-order extensions: the generalized Gauss-Newton (GGN) from square-root stacks.

The loss starts a stack ``S`` ``[V, N, *out]`` with ``sum_v S S^T`` its Hessian in the model
output (V = C exact, V = M Monte-Carlo); each module pushes it to its input. At a parameter
the pushed stack is ``sqrt_ggn`` and ``GGN = sqrt_ggn^T sqrt_ggn``. Quantities are those of the
reduced loss that ``loss_fn`` returns.
"""

from __future__ import annotations

from torch import Tensor

from curvhooks.derivatives import ModuleDerivatives, ModuleIO
from curvhooks.extensions.base import MonteCarloExtension, result_buffer


class SqrtGGN(MonteCarloExtension):
    """``sqrt_ggn`` ``[C, N, *p.shape]`` (exact) or ``[M, N, *p.shape]`` (``mc_samples=M``).

    Flattened to ``V [C * N, p.numel()]``, the GGN block of ``p`` is ``V^T V``.
    """

    attribute = "sqrt_ggn"

    def compute(
        self,
        derivatives: ModuleDerivatives,
        io: ModuleIO,
        name: str,
        mat: Tensor,
        previous: Tensor | None = None,
    ) -> Tensor:
        param = getattr(io.module, name)
        result = result_buffer(previous, (*mat.shape[:2], *param.shape), param)
        return derivatives.param_jac_t_mat_prod(io, name, mat, out=result)


class DiagGGN(MonteCarloExtension):
    """``diag_ggn`` ``p.shape``: the diagonal of the GGN block (exact, or MC unbiased)."""

    attribute = "diag_ggn"

    def compute(
        self,
        derivatives: ModuleDerivatives,
        io: ModuleIO,
        name: str,
        mat: Tensor,
        previous: Tensor | None = None,
    ) -> Tensor:
        return derivatives.param_sq_sum(io, name, mat, per_sample=False)


class BatchDiagGGN(MonteCarloExtension):
    """``diag_ggn_batch`` ``[N, *p.shape]``: per-sample GGN diagonals; they sum to ``diag_ggn``."""

    attribute = "diag_ggn_batch"

    def compute(
        self,
        derivatives: ModuleDerivatives,
        io: ModuleIO,
        name: str,
        mat: Tensor,
        previous: Tensor | None = None,
    ) -> Tensor:
        return derivatives.param_sq_sum(io, name, mat, per_sample=True)
