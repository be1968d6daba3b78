"""Curvature as operators: matrices applied, never formed (``base``), over a data set
(``dataset``: GGN, empirical Fisher, Hessian)."""

from curvhooks.operators.base import CurvatureOperator
from curvhooks.operators.dataset import EmpiricalFisherOperator, GGNOperator, HessianOperator

__all__ = ["CurvatureOperator", "EmpiricalFisherOperator", "GGNOperator", "HessianOperator"]
