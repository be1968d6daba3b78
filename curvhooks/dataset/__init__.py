"""Dataset-level curvature: what a call computes (``plan``), how batches are weighted
(``weighting``), the two routes to dense matrices (``by_hooks``, ``by_autograd``) behind the
public functions (``functions``), Kronecker-factored curvature (``by_kronecker``, giving
a ``curvhooks.operators.kronecker.Kronecker`` operator), and per-sample Jacobians
(``jacobians``)."""

from curvhooks.dataset.by_kronecker import kfac
from curvhooks.dataset.functions import empirical_fisher, ggn, hessian, matrices
from curvhooks.dataset.jacobians import jacobians
from curvhooks.dataset.plan import layer_sizes

__all__ = ["empirical_fisher", "ggn", "hessian", "jacobians", "kfac", "layer_sizes", "matrices"]
