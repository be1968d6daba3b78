"""What an extension is: a reduction of a stack pushed to a parameter.

A first-order extension reduces the output gradient ``[N, *out]`` (a stack of one vector);
a second-order extension reduces the square-root GGN stack ``[V, N, *out]`` that the loss
starts and each module pushes back. Both call the module's derivatives, never a Jacobian of
their own.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from curvhooks.derivatives import ModuleDerivatives, ModuleIO

EXACT = "exact"
"""Stack key of the exact square-root GGN; Monte-Carlo stacks are keyed by their sample count."""


class Extension:
    """Base class: subclasses set ``attribute`` and implement ``compute``."""

    attribute: str = ""
    """Name of the attribute that receives the result on each parameter."""

    def stack_key(self) -> str | int | None:
        """Which propagated stack this extension reduces: ``None`` for the output gradient
        (first order), ``EXACT`` or a Monte-Carlo sample count (second order)."""
        return None

    def compute(
        self, derivatives: ModuleDerivatives, io: ModuleIO, name: str, mat: Tensor
    ) -> Tensor:
        """The result for parameter ``name`` of ``io.module`` from the stack ``mat``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MonteCarloExtension(Extension):
    """A second-order extension that is exact by default, or Monte-Carlo with M samples."""

    def __init__(self, mc_samples: int | None = None) -> None:
        if mc_samples is not None and (
            isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1
        ):
            raise ValueError(f"mc_samples must be a positive integer or None, got {mc_samples!r}")
        self.mc_samples = mc_samples

    def stack_key(self) -> str | int:
        return EXACT if self.mc_samples is None else self.mc_samples

    def __repr__(self) -> str:
        argument = "" if self.mc_samples is None else f"mc_samples={self.mc_samples}"
        return f"{type(self).__name__}({argument})"


def result_buffer(param: nn.Parameter, attribute: str, shape: tuple[int, ...]) -> Tensor:
    """A tensor of ``shape`` to write ``param``'s next ``attribute`` result into.

    This is the previous result if nothing else references it (neither the tensor nor a view
    of it) and its shape matches: writing into it avoids page-faulting a fresh tensor of the
    same size, as autograd does with ``.grad``. Otherwise a new, uninitialised tensor.
    """
    previous = param.__dict__.get(attribute)
    if (
        isinstance(previous, Tensor)
        and previous.shape == shape
        and previous.dtype == param.dtype
        and previous.device == param.device
        and previous._base is None
        # References: the parameter's __dict__, `previous`, and getrefcount's argument.
        and sys.getrefcount(previous) <= 3
        # Storage users: `previous` and the temporary storage object.
        and torch._C._storage_Use_Count(previous.untyped_storage()._cdata) <= 2
    ):
        return previous
    return torch.empty(shape, dtype=param.dtype, device=param.device)
