"""The PyTorch internals curvhooks relies on, each behind one name with a fallback for a
PyTorch that lacks it (``tests/test_compat.py`` runs every fallback).

A missing internal never changes a result: it costs time (a value recomputed, memory not
reused) or gives an error (for ``is_transformed``, a later and less clear one).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from curvhooks.errors import UnsupportedError


def _private_base(module: object, name: str, public: tuple[type, ...]) -> tuple[type, ...]:
    """The private base class ``module.name`` of the ``public`` classes, or those classes."""
    base = getattr(module, name, None)
    return (base,) if isinstance(base, type) else public


BATCH_NORMS = _private_base(
    nn.modules.batchnorm, "_BatchNorm", (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
)
"""BatchNorm classes: their private base (subclasses and ``SyncBatchNorm`` included)."""
DROPOUTS = _private_base(
    nn.modules.dropout,
    "_DropoutNd",
    (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout),
)
"""Dropout classes: their private base."""


def storage_users(tensor: Tensor) -> int | None:
    """How many tensors use ``tensor``'s memory (views included, plus one for the storage
    object this call makes); ``None`` where this PyTorch cannot count them."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else count(tensor.untyped_storage()._cdata)


def _queue_callback() -> Callable[[Callable[[], None]], None] | None:
    return getattr(torch.autograd.Variable._execution_engine, "queue_callback", None)


def at_backward_end(callback: Callable[[], None], needed_by: str) -> None:
    """Run ``callback`` once the running backward pass is over."""
    queue = _queue_callback()
    if queue is None:
        raise UnsupportedError(
            f"{needed_by} needs autograd's queue_callback, which this PyTorch lacks; use one "
            "call per parameter (untie the weights) or another PyTorch"
        )
    queue(callback)


def saved(node: object, name: str) -> Any:
    """What autograd saved for the backward of ``node`` under ``name`` (``_saved_<name>``), or
    ``None`` where this PyTorch does not show it (the caller then recomputes it)."""
    return getattr(node, f"_saved_{name}", None)


def is_transformed(tensor: Tensor) -> bool:
    """Whether ``tensor`` lives inside a ``torch.func`` transform (a wrapped tensor); ``False``
    where this PyTorch cannot tell (then such calls are not refused early)."""
    is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(is_wrapped is not None and is_wrapped(tensor))


def math_attention() -> contextlib.AbstractContextManager:
    """A block in which ``F.scaled_dot_product_attention`` uses its math kernel, which has a
    double backward (the fused CPU kernels have none); a plain block where this PyTorch cannot
    choose."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)
