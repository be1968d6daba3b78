"""Derivatives of the modules that only move, copy or zero-pad entries: ``Identity``,
``Dropout`` (eval mode), ``Flatten``, ``Unflatten`` and ``ZeroPad1d/2d/3d``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from curvhooks.derivatives.base import ModuleDerivatives, ModuleIO


class IdentityDerivatives(ModuleDerivatives):
    """``Identity``, and ``Dropout`` in eval mode: the Jacobian is the identity."""

    def jac_t_mat_prod(self, io: ModuleIO, mat: Tensor) -> Tensor:
        return mat


class ReshapeDerivatives(ModuleDerivatives):
    """``Flatten`` (any ``start_dim`` and ``end_dim``) and ``Unflatten``: the Jacobian of a
    reshape is the inverse reshape."""

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if getattr(module, "start_dim", None) == 0 or getattr(module, "dim", None) == 0:
            return "the reshape touches the batch dimension 0; reshape from dimension 1 on"
        return None

    def jac_t_mat_prod(self, io: ModuleIO, mat: Tensor) -> Tensor:
        return mat.reshape(mat.shape[0], *io.input_shape)


class ZeroPadDerivatives(ModuleDerivatives):
    """``ZeroPad1d/2d/3d`` (negative padding crops): the transposed Jacobian crops what the
    module padded and pads what it cropped."""

    def jac_t_mat_prod(self, io: ModuleIO, mat: Tensor) -> Tensor:
        return F.pad(mat, [-amount for amount in io.module.padding])
