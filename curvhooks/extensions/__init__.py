"""Extensions: what to compute during the backward pass, one class per result attribute."""

from curvhooks.extensions.base import RESULT_ATTRIBUTES, Extension
from curvhooks.extensions.first_order import BatchGrad, BatchL2Grad, SumGradSquared, Variance
from curvhooks.extensions.hessian import DiagHessian, HessianBlock
from curvhooks.extensions.kronecker import KFAC, KFLR, EigenCorrection, KroneckerExtension
from curvhooks.extensions.second_order import BatchDiagGGN, DiagGGN, Jacobian, SqrtGGN

__all__ = [
    "RESULT_ATTRIBUTES",
    "BatchDiagGGN",
    "BatchGrad",
    "BatchL2Grad",
    "DiagGGN",
    "DiagHessian",
    "EigenCorrection",
    "Extension",
    "HessianBlock",
    "Jacobian",
    "KFAC",
    "KFLR",
    "KroneckerExtension",
    "SqrtGGN",
    "SumGradSquared",
    "Variance",
]
