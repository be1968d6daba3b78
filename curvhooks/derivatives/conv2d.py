"""Derivatives of ``nn.Conv2d`` (any stride, padding, dilation and groups; zero padding).

Products with the weight use convolutions: the per-sample weight products of V vectors are
the weight gradient of one convolution with ``V * N * groups`` groups (each sample its own
group), which PyTorch's convolution kernels compute faster than unfolded patches. Padding that
a convolution cannot express (``"same"`` with an even kernel pads one more pixel at the end)
is applied to the input explicitly.
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


def _is_symmetric(padding: tuple[int, int, int, int]) -> bool:
    left, right, top, bottom = padding
    return left == right and top == bottom


class Conv2dDerivatives(AffineDerivatives):
    """Groups are the convolution's groups; positions are the output pixels."""

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if module.padding_mode != "zeros":
            return (
                f"padding_mode={module.padding_mode!r} is not supported; "
                "use padding_mode='zeros' (or pad the input yourself with torch.nn.functional.pad)"
            )
        return None

    def _input_and_padding(self, io: ModuleIO) -> tuple[Tensor, tuple[int, int]]:
        """The input, padded explicitly where needed, and the padding left to the convolution."""
        padding = explicit_padding(io.module)
        if _is_symmetric(padding):
            return io.input, (padding[2], padding[0])
        return F.pad(io.input, padding), (0, 0)

    def unfold_input(self, io: ModuleIO) -> Tensor:
        module = io.module
        x, padding = self._input_and_padding(io)
        patches = F.unfold(
            x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride
        )
        return patches.view(patches.shape[0], module.groups, -1, patches.shape[-1])

    def to_positions(self, io: ModuleIO, mat: Tensor) -> Tensor:
        return mat.reshape(*mat.shape[:2], io.module.groups, -1, mat[0, 0, 0].numel())

    def weight_jac_t_mat_prod(self, io: ModuleIO, mat: Tensor, out: Tensor) -> None:
        module = io.module
        x, padding = self._input_and_padding(io)
        num_vectors, batch = mat.shape[:2]
        # x: [N, C, H, W] -> [1, V * N * C, H, W]; mat: [V, N, O, H', W'] -> [1, V * N * O, H', W']
        stacked_x = x.expand(num_vectors, *x.shape).reshape(1, -1, *x.shape[2:])
        products = torch.nn.grad.conv2d_weight(
            stacked_x,
            (num_vectors * batch * module.out_channels, *module.weight.shape[1:]),
            mat.reshape(1, -1, *mat.shape[3:]),
            stride=module.stride,
            padding=padding,
            dilation=module.dilation,
            groups=num_vectors * batch * module.groups,
        )
        out.copy_(products.view(out.shape))

    def weight_jac_t_mat_prod_summed(self, io: ModuleIO, mat: Tensor) -> Tensor:
        module = io.module
        x, padding = self._input_and_padding(io)
        return torch.nn.grad.conv2d_weight(
            x,
            module.weight.shape,
            mat.sum(0),
            stride=module.stride,
            padding=padding,
            dilation=module.dilation,
            groups=module.groups,
        )

    def jac_t_mat_prod(self, io: ModuleIO, mat: Tensor) -> Tensor:
        module = io.module
        left, right, top, bottom = padding = explicit_padding(module)
        num_vectors, batch, channels, height, width = mat.shape[:2] + io.input_shape[1:]
        symmetric = _is_symmetric(padding)
        padded = (height, width) if symmetric else (height + top + bottom, width + left + right)
        grad_input = torch.nn.grad.conv2d_input(
            (num_vectors * batch, channels, *padded),
            module.weight.detach(),
            mat.flatten(0, 1),
            stride=module.stride,
            padding=(top, left) if symmetric else 0,
            dilation=module.dilation,
            groups=module.groups,
        )
        if not symmetric:
            grad_input = grad_input[..., top : top + height, left : left + width]
        return grad_input.reshape(num_vectors, batch, channels, height, width)
