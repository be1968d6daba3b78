"""Curvature as operators: matrices applied, never formed (``base``), over a data set
(``dataset``: GGN, empirical Fisher, Hessian), Kronecker-factored ones (``kronecker``), and
their spectra (``spectra``)."""

from curvhooks.operators.base import CurvatureOperator
from curvhooks.operators.dataset import EmpiricalFisherOperator, GGNOperator, HessianOperator
from curvhooks.operators.kronecker import Kronecker
from curvhooks.operators.spectra import TraceEstimate, eigenpairs, spectral_density, trace

__all__ = [
    "CurvatureOperator",
    "EmpiricalFisherOperator",
    "GGNOperator",
    "HessianOperator",
    "Kronecker",
    "TraceEstimate",
    "eigenpairs",
    "spectral_density",
    "trace",
]
