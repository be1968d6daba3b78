"""curvhooks: curvature of neural networks from module hooks, in one backward pass."""

from curvhooks.errors import UnsupportedError
from curvhooks.extensions import (
    BatchDiagGGN,
    BatchGrad,
    BatchL2Grad,
    DiagGGN,
    SqrtGGN,
    SumGradSquared,
    Variance,
)
from curvhooks.hooks import extend

__version__ = "0.1.0"

__all__ = [
    "BatchDiagGGN",
    "BatchGrad",
    "BatchL2Grad",
    "DiagGGN",
    "SqrtGGN",
    "SumGradSquared",
    "UnsupportedError",
    "Variance",
    "extend",
]
