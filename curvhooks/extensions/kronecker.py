"""Kronecker-factored curvature: ``KFLR`` (the exact loss Hessian, type-2) and ``KFAC``
(Monte-Carlo) for the weights and biases of ``Linear``, ``Conv1d/2d/3d`` and the projections of
``MultiheadAttention``.

A weight ``[O, *rest]`` gets ``(B, A)`` with ``torch.kron(B, A)`` approximating its GGN block
(``p.flatten()`` order); a bias gets ``(B,)``. ``A`` is the mean over samples and positions
of the unfolded inputs' outer products, ``B`` the sum of the stack's outer products at the
output over vectors, samples and positions (formed from ``ModuleDerivatives.input_root``
and ``output_root``): the factors and scaling of curvlinops' ``KFACLinearOperator``
(``separate_weight_and_bias=True``) for the loss of the backward pass.
"""

from __future__ import annotations

from torch import Tensor

from curvhooks.derivatives import ModuleDerivatives
from curvhooks.extensions.base import Extension, Target, check_mc_samples
from curvhooks.extensions.gram import weighted_sum
from curvhooks.extensions.stacks import GGN_ROWS, MonteCarloStack, StackKind

APPROXIMATIONS = ("expand", "reduce")


class OnKroneckerModules(Extension):
    """An extension that reduces a stack of ``kind`` on modules with Kronecker factors
    (``Linear``, ``Conv1d/2d/3d``, ``MultiheadAttention``) only."""

    def __init__(self, kind: StackKind) -> None:
        self.kind = kind

    def stack_kind(self) -> StackKind:
        return self.kind

    def unsupported_reason(self, derivatives: ModuleDerivatives) -> str | None:
        if derivatives.has_kronecker_factors:
            return None
        return (
            "Kronecker factors are supported for Linear, Conv1d/2d/3d and MultiheadAttention's "
            "projections only"
        )


class KroneckerExtension(OnKroneckerModules):
    """Kronecker factors from a stack of ``kind``, with weight sharing treated by ``approx``
    (``"expand"`` or ``"reduce"``, Eschenhagen et al. 2023); with ``thin``, each factor whose
    root is thin stays a ``Gram`` of it (for ``curvhooks.kfac``)."""

    attribute = "kronecker"

    def __init__(self, kind: StackKind, approx: str = "expand", thin: bool = False) -> None:
        if approx not in APPROXIMATIONS:
            raise ValueError(f"approx must be one of {APPROXIMATIONS}, got {approx!r}")
        super().__init__(kind)
        self.approx = approx
        self.thin = thin

    def compute(self, target: Target, mat: Tensor, previous: object = None) -> tuple:
        return target.kronecker(mat, self.approx, self.thin)

    def combine(self, result: tuple, other: tuple) -> tuple:
        """Parts of a stack add to B; A does not depend on the stack."""
        return (weighted_sum(result[0], other[0], 1, 1), *result[1:])


class KFLR(KroneckerExtension):
    """``p.kflr``: Kronecker factors with the exact loss Hessian (type-2)."""

    attribute = "kflr"

    def __init__(self) -> None:
        super().__init__(GGN_ROWS)

    def __repr__(self) -> str:
        return "KFLR()"


class KFAC(KroneckerExtension):
    """``p.kfac``: Kronecker factors with a Monte-Carlo loss Hessian of ``mc_samples``
    sampled labels per sample (unbiased for ``KFLR``'s B)."""

    attribute = "kfac"

    def __init__(self, mc_samples: int = 1) -> None:
        check_mc_samples(mc_samples)
        super().__init__(MonteCarloStack(mc_samples))
        self.mc_samples = mc_samples

    def __repr__(self) -> str:
        return f"KFAC(mc_samples={self.mc_samples})"


class EigenCorrection(OnKroneckerModules):
    """EKFAC's corrected eigenvalues: the per-sample products of each vector of a stack of
    ``kind``, rotated into the eigenbasis ``(Q_B, Q_A)`` of the parameter's Kronecker factors
    and squared, summed over vectors and samples: ``[O, I]`` for a weight, ``[O]`` for a bias.
    ``bases`` maps ``id(param)`` to its eigenbasis."""

    attribute = "eigen_correction"

    def __init__(self, kind: StackKind, bases: dict[int, tuple[Tensor, ...]]) -> None:
        super().__init__(kind)
        self.bases = bases

    def compute(self, target: Target, mat: Tensor, previous: object = None) -> Tensor:
        products = target.products(mat).flatten(0, 1)  # [V N, *p.shape]
        bases = self.bases[id(target.param)]
        if len(bases) == 1:
            return (products @ bases[0]).square_().sum(0)
        rotated = bases[0].T @ products.flatten(2) @ bases[1]
        return rotated.square_().sum(0)
