"""Running modules with other values of their parameters, and checking batched products
against plain ones: shared by the generic derivatives and the autograd routes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


@contextmanager
def parameters_replaced(model: nn.Module, values: dict[int, Tensor]) -> Iterator[None]:
    """Run the block with each parameter of ``model`` whose id is in ``values`` replaced by
    that tensor, in every module holding it, then put the parameters back.

    ``torch.func.functional_call`` restores a module that appears twice in a model (an
    unrolled recurrence) wrongly, leaving plain tensors in place of its parameters (torch
    2.13); this records every holder before replacing anything.
    """
    holders = [
        (module, name, param)
        for module in model.modules()
        for name, param in module._parameters.items()
        if param is not None and id(param) in values
    ]
    try:
        for module, name, param in holders:
            module._parameters[name] = values[id(param)]
        yield
    finally:
        for module, name, param in holders:
            module._parameters[name] = param


def check_weights(like: Tensor, shape: tuple[int, ...] | None = None) -> Tensor:
    """Random weights of ``shape`` (default ``like``'s), ``like``'s dtype and device, for
    combining products before comparing them; from a private generator, so the caller's
    random state is left as it was."""
    generator = torch.Generator(like.device).manual_seed(0)
    shape = like.shape if shape is None else shape
    return torch.randn(shape, dtype=like.dtype, device=like.device, generator=generator)


def agree(found: Tensor, expected: Tensor) -> bool:
    """Whether two tensors have one shape and agree to the square root of their dtype's
    machine epsilon, relative to the larger magnitude (at least 1)."""
    if found.shape != expected.shape:
        return False
    if not found.numel():
        return True
    scale = max(float(expected.abs().max()), 1.0)
    return bool((found - expected).abs().max() <= torch.finfo(expected.dtype).eps ** 0.5 * scale)
