"""The hook machinery: what a context computes (``plan``), the record of calls (``calls``,
``recorder``), the routes the stacks take (``routes``, with autograd's pushes in ``graph``),
the results and where they go (``reducer``, ``sinks``), the two ways a backward pass meets the
hooks (``backward``), the user's context (``context``) and the dataset functions' use of them
(``datasets``)."""

from curvhooks.hooks.backward import AutogradBackward, ChainBackward
from curvhooks.hooks.context import extend
from curvhooks.hooks.datasets import hooked, supports_chain
from curvhooks.hooks.plan import (
    ROUTES,
    HookPlan,
    UnservableError,
    check_eval_mode,
    supported_params,
    unsupported_module,
    warn_skipped,
)
from curvhooks.hooks.sinks import BatchResults, ParameterAttributes

__all__ = [
    "ROUTES",
    "AutogradBackward",
    "BatchResults",
    "ChainBackward",
    "HookPlan",
    "ParameterAttributes",
    "check_eval_mode",
    "extend",
    "hooked",
    "supported_params",
    "supports_chain",
    "unsupported_module",
    "UnservableError",
    "warn_skipped",
]
