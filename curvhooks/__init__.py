"""curvhooks: curvature of neural networks from module hooks, in one backward pass."""

from curvhooks.dataset import (
    empirical_fisher,
    ggn,
    hessian,
    jacobians,
    kfac,
    layer_sizes,
    matrices,
)
from curvhooks.errors import UnsupportedError
from curvhooks.extensions import (
    KFAC,
    KFLR,
    BatchDiagGGN,
    BatchGrad,
    BatchL2Grad,
    DiagGGN,
    DiagHessian,
    HessianBlock,
    Jacobian,
    SqrtGGN,
    SumGradSquared,
    Variance,
)
from curvhooks.hooks import extend
from curvhooks.operators import (
    CurvatureOperator,
    EmpiricalFisherOperator,
    GGNOperator,
    HessianOperator,
    Kronecker,
    TraceEstimate,
    eigenpairs,
    spectral_density,
    trace,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    """``curvhooks.plot`` on first use, so that importing curvhooks does not load matplotlib."""
    if name == "plot":
        import importlib

        return importlib.import_module("curvhooks.plot")
    raise AttributeError(f"module 'curvhooks' has no attribute {name!r}")


__all__ = [
    "BatchDiagGGN",
    "BatchGrad",
    "BatchL2Grad",
    "CurvatureOperator",
    "DiagGGN",
    "DiagHessian",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianBlock",
    "HessianOperator",
    "Jacobian",
    "KFAC",
    "KFLR",
    "Kronecker",
    "SqrtGGN",
    "TraceEstimate",
    "SumGradSquared",
    "UnsupportedError",
    "Variance",
    "eigenpairs",
    "empirical_fisher",
    "extend",
    "ggn",
    "jacobians",
    "hessian",
    "kfac",
    "layer_sizes",
    "matrices",
    "spectral_density",
    "trace",
]
