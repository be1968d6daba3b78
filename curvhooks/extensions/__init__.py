"""Extensions: what to compute during the backward pass, one class per result attribute."""

from curvhooks.extensions.base import Extension
from curvhooks.extensions.first_order import BatchGrad, BatchL2Grad, SumGradSquared, Variance
from curvhooks.extensions.hessian import DiagHessian, HessianBlock
from curvhooks.extensions.second_order import BatchDiagGGN, DiagGGN, SqrtGGN

EXTENSIONS: tuple[type[Extension], ...] = (
    BatchGrad,
    BatchL2Grad,
    SumGradSquared,
    Variance,
    SqrtGGN,
    DiagGGN,
    BatchDiagGGN,
    DiagHessian,
    HessianBlock,
)
RESULT_ATTRIBUTES: tuple[str, ...] = tuple(cls.attribute for cls in EXTENSIONS)

__all__ = [
    "BatchDiagGGN",
    "BatchGrad",
    "BatchL2Grad",
    "DiagGGN",
    "DiagHessian",
    "Extension",
    "HessianBlock",
    "SqrtGGN",
    "SumGradSquared",
    "Variance",
]
