"""The hook machinery: the record of calls (``calls``), the graph route (``graph``), the
results on the parameters (``results``), the context that wires them (``context``), and the
dataset functions' own backward pass along a chain (``chain``)."""

from curvhooks.hooks.chain import ChainBackward, supports_chain
from curvhooks.hooks.context import (
    ROUTES,
    check_eval_mode,
    extend,
    supported_params,
    unsupported_module,
)
from curvhooks.hooks.results import clear_results, results_preserved

__all__ = [
    "ROUTES",
    "ChainBackward",
    "check_eval_mode",
    "clear_results",
    "extend",
    "results_preserved",
    "supported_params",
    "supports_chain",
    "unsupported_module",
]
