"""Dataset-level curvature matrices: what a call computes (``plan``), how batches are weighted
(``weighting``), and the two routes (``by_hooks``, ``by_autograd``) behind the public
functions (``functions``)."""

from curvhooks.dataset.functions import empirical_fisher, ggn, hessian, matrices
from curvhooks.dataset.plan import layer_sizes

__all__ = ["empirical_fisher", "ggn", "hessian", "layer_sizes", "matrices"]
