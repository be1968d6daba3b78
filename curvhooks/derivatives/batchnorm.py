"""Derivatives of ``BatchNorm1d/2d/3d`` in eval mode: per channel c,
``out = weight_c * xhat + bias_c`` with ``xhat = (x - running_mean_c) / sqrt(running_var_c +
eps)``, an affine map of the input (no curvature of its own) and of the parameters."""

from __future__ import annotations

import torch
from torch import Tensor

from curvhooks.derivatives.base import ModuleDerivatives, ModuleIO


class BatchNormDerivatives(ModuleDerivatives):
    """Channels are dimension 1 of ``[N, C, *]``; every other dimension is a position."""

    needs_input = True

    def jacobian_diagonal(self, io: ModuleIO) -> Tensor:
        scale = (io.module.running_var + io.module.eps).rsqrt()
        if io.module.weight is not None:
            scale = scale * io.module.weight.detach()
        return self._per_channel(scale, len(io.input_shape) - 1)

    def param_jac_t_mat_prod(
        self, io: ModuleIO, name: str, mat: Tensor, out: Tensor | None = None
    ) -> Tensor:
        if out is None:
            out = mat.new_empty(mat.shape[:3])
        per_position = mat if name == "bias" else mat * self._normalised(io)
        if mat.dim() > 3:
            return torch.sum(per_position.flatten(3), 3, out=out)
        return out.copy_(per_position)

    def _normalised(self, io: ModuleIO) -> Tensor:
        """``xhat`` ``[N, C, *]``, computed once per call."""
        if "normalised" not in io.cache:
            module = io.module
            channel = self._per_channel
            scale = (module.running_var + module.eps).rsqrt()
            dims = io.input.dim() - 1
            io.cache["normalised"] = (io.input - channel(module.running_mean, dims)) * channel(
                scale, dims
            )
        return io.cache["normalised"]

    @staticmethod
    def _per_channel(values: Tensor, trailing: int) -> Tensor:
        """``[C]`` shaped to broadcast against ``[..., C, *]`` with ``trailing`` dims from C."""
        return values.view(-1, *[1] * (trailing - 1))
