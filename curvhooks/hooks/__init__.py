"""The hook machinery: what a context computes (``plan``), the record of calls (``calls``,
``recorder``), the routes the stacks take (``routes``, with autograd's pushes in ``graph``),
the results and where they go (``reducer``, ``sinks``), the two ways a backward pass meets the
hooks (``backward``) and the user's context (``context``)."""

from curvhooks.hooks.backward import (
    AutogradBackward,
    ChainBackward,
    hooked,
    supports_chain,
    uses_outside_modules,
)
from curvhooks.hooks.context import extend
from curvhooks.hooks.plan import (
    ROUTES,
    USED_OUTSIDE,
    HookPlan,
    check_eval_mode,
    supported_params,
    unsupported_module,
    used_outside_message,
    warn_skipped,
)
from curvhooks.hooks.sinks import BatchResults, ParameterAttributes

__all__ = [
    "ROUTES",
    "USED_OUTSIDE",
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
    "used_outside_message",
    "uses_outside_modules",
    "warn_skipped",
]
