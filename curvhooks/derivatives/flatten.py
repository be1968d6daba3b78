"""Derivatives of ``nn.Flatten`` (any ``start_dim`` and ``end_dim``): a reshape."""

from __future__ import annotations

from torch import Tensor, nn

from curvhooks.derivatives.base import ModuleDerivatives, ModuleIO


class FlattenDerivatives(ModuleDerivatives):
    """The Jacobian of a reshape is the inverse reshape."""

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if module.start_dim == 0:
            return "start_dim=0 merges the batch dimension; flatten from start_dim=1"
        return None

    def jac_t_mat_prod(self, io: ModuleIO, mat: Tensor) -> Tensor:
        return mat.reshape(mat.shape[0], *io.input_shape)
