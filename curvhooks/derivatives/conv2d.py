"""Derivatives of ``nn.Conv2d`` (any stride, padding, dilation and groups; zero padding).

The input ``[N, C_in, H, W]`` is padded explicitly (so that ``"same"`` padding with an even
kernel, which pads unequally, needs no special case) and unfolded into patches
``[N, G, C_in / G * kH * kW, H_out * W_out]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvhooks.derivatives.affine import AffineDerivatives
from curvhooks.derivatives.base import ModuleIO


def explicit_padding(module: nn.Conv2d) -> tuple[int, int, int, int]:
    """Zero padding ``(left, right, top, bottom)`` equivalent to ``module.padding``."""
    if module.padding == "valid":
        return (0, 0, 0, 0)
    if module.padding == "same":
        (top, bottom), (left, right) = (
            _split_same(dilation * (kernel - 1))
            for dilation, kernel in zip(module.dilation, module.kernel_size)
        )
        return (left, right, top, bottom)
    pad_h, pad_w = module.padding
    return (pad_w, pad_w, pad_h, pad_h)


def _split_same(total: int) -> tuple[int, int]:
    """PyTorch's split of ``"same"`` padding: the extra pixel goes to the end."""
    return total // 2, total - total // 2


class Conv2dDerivatives(AffineDerivatives):
    """Groups are the convolution's groups; positions are the output pixels."""

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if module.padding_mode != "zeros":
            return (
                f"padding_mode={module.padding_mode!r} is not supported; "
                "use padding_mode='zeros' (or pad the input yourself with torch.nn.functional.pad)"
            )
        return None

    def _padded_input(self, io: ModuleIO) -> Tensor:
        padding = explicit_padding(io.module)
        return F.pad(io.input, padding) if any(padding) else io.input

    def unfold_input(self, io: ModuleIO) -> Tensor:
        module = io.module
        patches = F.unfold(
            self._padded_input(io),
            module.kernel_size,
            dilation=module.dilation,
            stride=module.stride,
        )
        return patches.view(patches.shape[0], module.groups, -1, patches.shape[-1])

    def to_positions(self, io: ModuleIO, mat: Tensor) -> Tensor:
        return mat.reshape(*mat.shape[:2], io.module.groups, -1, mat[0, 0, 0].numel())

    def jac_t_mat_prod(self, io: ModuleIO, mat: Tensor) -> Tensor:
        module = io.module
        left, right, top, bottom = explicit_padding(module)
        num_vectors, batch, channels, height, width = mat.shape[:2] + io.input_shape[1:]
        padded_shape = (num_vectors * batch, channels, height + top + bottom, width + left + right)
        grad_padded = torch.nn.grad.conv2d_input(
            padded_shape,
            module.weight.detach(),
            mat.flatten(0, 1),
            stride=module.stride,
            dilation=module.dilation,
            groups=module.groups,
        )
        grad_input = grad_padded[..., top : top + height, left : left + width]
        return grad_input.reshape(num_vectors, batch, channels, height, width)
