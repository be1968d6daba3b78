"""curvhooks: curvature of neural networks from module hooks, in one backward pass."""

from curvhooks.data import layer_sizes
from curvhooks.dataset import empirical_fisher, ggn
from curvhooks.errors import UnsupportedError
from curvhooks.extensions import (
    BatchDiagGGN,
    BatchGrad,
    BatchL2Grad,
    DiagGGN,
    DiagHessian,
    HessianBlock,
    SqrtGGN,
    SumGradSquared,
    Variance,
)
from curvhooks.hessian import hessian
from curvhooks.hooks import extend
from curvhooks.matrices import matrices

__version__ = "0.1.0"

__all__ = [
    "BatchDiagGGN",
    "BatchGrad",
    "BatchL2Grad",
    "DiagGGN",
    "DiagHessian",
    "HessianBlock",
    "SqrtGGN",
    "SumGradSquared",
    "UnsupportedError",
    "Variance",
    "empirical_fisher",
    "extend",
    "ggn",
    "hessian",
    "layer_sizes",
    "matrices",
]
