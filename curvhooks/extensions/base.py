"""What an extension is: a reduction of a stack pushed to a parameter.

A first-order extension reduces the output gradient ``[N, *out]`` (a stack of one vector);
a second-order extension reduces the square-root GGN stack ``[V, N, *out]`` that the loss
starts and each module pushes back. Both call the module's derivatives, never a Jacobian of
their own.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from curvhooks.derivatives import ModuleDerivatives, ModuleIO

EXACT = "exact"
"""Stack key of the exact square-root GGN; Monte-Carlo stacks are keyed by their sample count."""
HESSIAN = "hessian"
"""Stack key of the exact Hessian: a pair of stacks ``(positive, negative)`` whose outer
products' difference is the Hessian of the loss in a module's output."""


class Extension:
    """Base class: subclasses set ``attribute`` and implement ``compute``."""

    attribute: str = ""
    """Name of the attribute that receives the result on each parameter."""

    def stack_key(self) -> str | int | None:
        """Which propagated stack this extension reduces: ``None`` for the output gradient
        (first order), ``EXACT`` or a Monte-Carlo sample count (GGN), ``HESSIAN``."""
        return None

    def compute(
        self,
        derivatives: ModuleDerivatives,
        io: ModuleIO,
        name: str,
        mat: Tensor,
        previous: Tensor | None = None,
    ) -> Tensor:
        """The result for parameter ``name`` of ``io.module`` from the stack ``mat``.

        ``previous`` is this attribute's previous result on the parameter when nobody else
        references it: an extension may write its result into it.
        """
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


def result_buffer(previous: Tensor | None, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """``previous`` if it has ``shape`` and ``like``'s dtype and device, else a new tensor.

    Writing into the previous result avoids page-faulting a fresh tensor of the same size,
    as autograd does with ``.grad``.
    """
    if (
        previous is not None
        and previous.shape == shape
        and previous.dtype == like.dtype
        and previous.device == like.device
    ):
        return previous
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def is_unreferenced(tensor: Tensor, references: int) -> bool:
    """Whether ``tensor`` has exactly ``references`` Python references (counted by the
    caller, not counting this call's argument) and no view shares its memory."""
    return (
        tensor._base is None
        and sys.getrefcount(tensor) - 2 <= references
        # Storage users: `tensor` and the temporary storage object.
        and torch._C._storage_Use_Count(tensor.untyped_storage()._cdata) <= 2
    )
