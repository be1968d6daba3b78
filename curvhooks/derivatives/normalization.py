"""Derivatives of ``LayerNorm`` and ``GroupNorm``: normalisation by per-sample statistics.

Both split a sample's input into B groups of D entries (``LayerNorm``: one group per position
before its ``normalized_shape``; ``GroupNorm``: one per group of channels, with their spatial
entries) and compute, per group, ``xhat = (x - mean(x)) / sigma`` with
``sigma = sqrt(var(x) + eps)`` (biased variance), then ``out = weight * xhat + bias``
(weight and bias broadcast per entry of ``normalized_shape``, or per channel).

With ``g = weight * v`` for a vector ``v`` at the output, per group:

- the Jacobian transpose gives ``(g - mean(g) - xhat mean(g xhat)) / sigma``;
- the weight's product is ``v * xhat`` and the bias's ``v``, summed over the positions that
  share a parameter entry;
- the module's own curvature, the Hessian of ``g . xhat`` in the group's input, is
  ``-(h xhat^T + xhat h^T + a P - (3 a / D) xhat xhat^T) / (D sigma^2)`` with ``h = g -
  mean(g)``, ``a = g . xhat`` and the centring ``P = I - 1 1^T / D``: one dense ``D x D``
  block per group (``residual_roots``, by an eigendecomposition of each block).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from curvhooks.derivatives.base import ModuleDerivatives, ModuleIO, block_diagonal_roots


class NormalizationDerivatives(ModuleDerivatives):
    """The shared math; subclasses say how a sample splits into groups and how the affine
    parameters broadcast."""

    needs_input = True
    has_curvature = True

    def group_size(self, module: nn.Module, input_shape: torch.Size) -> int:
        """D, the entries normalised together (consecutive in memory order)."""
        raise NotImplementedError

    def affine_view(self, module: nn.Module, param: Tensor, input_shape: torch.Size) -> Tensor:
        """``param`` viewed to broadcast against one sample ``[*in]``."""
        raise NotImplementedError

    def sum_positions(self, module: nn.Module, products: Tensor) -> Tensor:
        """Per-entry products ``[V, N, *in]`` summed over the entries that share a parameter
        entry: a fresh ``[V, N, *param.shape]``."""
        raise NotImplementedError

    def _grouped(self, io: ModuleIO, tensor: Tensor) -> Tensor:
        """``tensor`` ``[..., N, *in]`` as ``[..., N, B, D]``."""
        leading = tensor.dim() - len(io.input_shape)
        size = self.group_size(io.module, io.input_shape)
        return tensor.reshape(*tensor.shape[: leading + 1], -1, size)

    def _statistics(self, io: ModuleIO) -> tuple[Tensor, Tensor]:
        """``xhat`` ``[N, B, D]`` and ``1 / sigma`` ``[N, B, 1]``, computed once per call."""
        if "normalised" not in io.cache:
            x = self._grouped(io, io.input)
            centred = x - x.mean(-1, keepdim=True)
            inverse_std = (centred.square().mean(-1, keepdim=True) + io.module.eps).rsqrt()
            io.cache["normalised"] = (centred * inverse_std, inverse_std)
        return io.cache["normalised"]

    def _scaled(self, io: ModuleIO, mat: Tensor) -> Tensor:
        """``weight * mat`` for a stack ``[..., N, *in]`` (``mat`` itself without a weight)."""
        weight = io.module.weight
        if weight is None:
            return mat
        return mat * self.affine_view(io.module, weight.detach(), io.input_shape)

    def jac_t_mat_prod(self, io: ModuleIO, mat: Tensor) -> Tensor:
        normalised, inverse_std = self._statistics(io)
        g = self._grouped(io, self._scaled(io, mat))
        projection = (g * normalised).mean(-1, keepdim=True)
        pushed = (g - g.mean(-1, keepdim=True) - normalised * projection) * inverse_std
        return pushed.view(*mat.shape[:2], *io.input_shape[1:])

    def param_jac_t_mat_prod(
        self, io: ModuleIO, name: str, mat: Tensor, out: Tensor | None = None
    ) -> Tensor:
        if name == "weight":
            normalised = self._statistics(io)[0].view(io.input_shape)
            mat = mat * normalised
        products = self.sum_positions(io.module, mat)
        return products if out is None else out.copy_(products)

    def residual_roots(self, io: ModuleIO, grad_output: Tensor) -> tuple[Tensor, Tensor]:
        return block_diagonal_roots(self.hessian_blocks(io, grad_output), io.input_shape[1:])

    def hessian_blocks(self, io: ModuleIO, grad_output: Tensor) -> Tensor:
        """``d^2 (out . grad_output) / d in^2`` of each group: ``[N, B, D, D]``."""
        normalised, inverse_std = self._statistics(io)
        g = self._grouped(io, self._scaled(io, grad_output))
        size = g.shape[-1]
        centred = g - g.mean(-1, keepdim=True)
        projection = (g * normalised).sum(-1)[..., None, None]  # a
        eye = torch.eye(size, dtype=g.dtype, device=g.device)
        mixed = centred[..., :, None] * normalised[..., None, :]
        blocks = mixed + mixed.transpose(-1, -2) + projection * (eye - 1 / size)
        blocks -= (3 / size) * projection * normalised[..., :, None] * normalised[..., None, :]
        return blocks * (-inverse_std[..., None].square() / size)


class LayerNormDerivatives(NormalizationDerivatives):
    """Groups are the positions before ``normalized_shape``; parameters are per entry of
    ``normalized_shape``."""

    def group_size(self, module: nn.Module, input_shape: torch.Size) -> int:
        return math.prod(module.normalized_shape)

    def affine_view(self, module: nn.Module, param: Tensor, input_shape: torch.Size) -> Tensor:
        return param

    def sum_positions(self, module: nn.Module, products: Tensor) -> Tensor:
        normalised = products.shape[products.dim() - len(module.normalized_shape) :]
        return products.reshape(*products.shape[:2], -1, *normalised).sum(2)


class GroupNormDerivatives(NormalizationDerivatives):
    """Groups are ``num_groups`` blocks of consecutive channels with their spatial entries;
    parameters are per channel (dimension 1 of ``[N, C, *]``)."""

    def group_size(self, module: nn.Module, input_shape: torch.Size) -> int:
        return input_shape[1:].numel() // module.num_groups

    def affine_view(self, module: nn.Module, param: Tensor, input_shape: torch.Size) -> Tensor:
        return param.view(-1, *[1] * (len(input_shape) - 2))

    def sum_positions(self, module: nn.Module, products: Tensor) -> Tensor:
        return products.reshape(*products.shape[:3], -1).sum(3)
