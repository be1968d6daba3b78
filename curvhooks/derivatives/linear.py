"""Derivatives of ``nn.Linear`` on inputs ``[N, *, in]``: ``out = x @ W^T + b``."""

from __future__ import annotations

from torch import Tensor

from curvhooks.derivatives.affine import AffineDerivatives
from curvhooks.derivatives.base import ModuleIO


class LinearDerivatives(AffineDerivatives):
    """One group; the positions T are the flattened extra input dimensions ``*``."""

    def unfold_input(self, io: ModuleIO) -> Tensor:
        x = io.input
        return x.reshape(x.shape[0], 1, -1, x.shape[-1]).transpose(-1, -2)

    def to_positions(self, io: ModuleIO, mat: Tensor) -> Tensor:
        return mat.reshape(*mat.shape[:2], 1, -1, mat.shape[-1]).transpose(-1, -2)

    def jac_t_mat_prod(self, io: ModuleIO, mat: Tensor) -> Tensor:
        return mat.matmul(io.module.weight.detach())
