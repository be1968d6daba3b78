"""The hook machinery: what a context computes (``plan``), the record of calls (``calls``,
``recorder``), the routes the stacks take (``routes``, with autograd's pushes in ``graph``),
the results and where they go (``reducer``, ``sinks``), the two ways a backward pass meets the
hooks (``backward``) and the user's context (``context``)."""

from curvhooks.hooks.backward import (
    AutogradBackward,
    ChainBackward,
    hooked,
    supports_chain,
    unservable_params,
)
from curvhooks.hooks.context import extend
from curvhooks.hooks.plan import (
    ROUTES,
    HookPlan,
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
    "unservable_params",
    "warn_skipped",
]
