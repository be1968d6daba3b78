"""Derivatives of ``nn.Conv2d`` (any stride, padding, dilation and groups; zero padding).

Per-sample weight products of a single vector (first order) are the weight gradient of one
convolution with ``N * groups`` groups (each sample its own group), which PyTorch's
convolution kernels compute faster than unfolded patches unless the problem is small; for
stacks of several vectors one batched matrix product over the unfolded patches (computed
once, shared by all extensions) costs less. Stacks are pushed to the input by a transposed
convolution in channels-last layout, which the CPU kernels run about twice as fast, or, when
small, by a plain convolution of the zero-dilated stack with the flipped kernel (``SMALL``).
Padding that a convolution cannot express (``"same"`` with an even kernel pads one more
pixel at the end) is applied to the input explicitly.
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
        # A strided view of the padded input, copied once (F.unfold loops over the samples).
        module = io.module
        padding = explicit_padding(module)
        padded = F.pad(io.input, padding) if any(padding) else io.input
        batch, channels, height, width = padded.shape
        (kernel_h, kernel_w), (dilation_h, dilation_w) = module.kernel_size, module.dilation
        (stride_h, stride_w), (step_n, step_c, step_h, step_w) = module.stride, padded.stride()
        out_h = (height - dilation_h * (kernel_h - 1) - 1) // stride_h + 1
        out_w = (width - dilation_w * (kernel_w - 1) - 1) // stride_w + 1
        patches = padded.as_strided(
            (batch, module.groups, channels // module.groups, kernel_h, kernel_w, out_h, out_w),
            (
                step_n,
                step_c * channels // module.groups,
                step_c,
                step_h * dilation_h,
                step_w * dilation_w,
                step_h * stride_h,
                step_w * stride_w,
            ),
        )
        return patches.reshape(batch, module.groups, -1, out_h * out_w)

    def to_positions(self, io: ModuleIO, mat: Tensor) -> Tensor:
        return mat.reshape(*mat.shape[:2], io.module.groups, -1, mat[0, 0, 0].numel())

    def weight_jac_t_mat_prod(self, io: ModuleIO, mat: Tensor, out: Tensor) -> None:
        if mat.shape[0] > 1 or (mat.device.type == "cpu" and _patch_count(io, mat) < SMALL):
            return super().weight_jac_t_mat_prod(io, mat, out)
        module = io.module
        x, padding = self._input_and_padding(io)
        # x: [N, C, H, W] -> [1, N * C, H, W]; mat: [1, N, O, H', W'] -> [1, N * O, H', W']
        products = torch.nn.grad.conv2d_weight(
            x.reshape(1, -1, *x.shape[2:]),
            (mat.shape[1] * module.out_channels, *module.weight.shape[1:]),
            mat.reshape(1, -1, *mat.shape[3:]),
            stride=module.stride,
            padding=padding,
            dilation=module.dilation,
            groups=mat.shape[1] * module.groups,
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
        num_vectors, batch, channels, height, width = mat.shape[:2] + io.input_shape[1:]
        stack = mat.flatten(0, 1)
        if stack.device.type == "cpu" and stack.numel() < SMALL:
            grad_input = _dilated_convolution(stack, io.module, (height, width))
        else:
            grad_input = _transposed_convolution(stack, io.module, (height, width))
        return grad_input.reshape(num_vectors, batch, channels, height, width)


SMALL = 2**16
"""Size below which a problem is ruled by the kernels' fixed costs rather than arithmetic, on
the CPU: stacks with fewer entries are pushed by ``_dilated_convolution`` (the
transposed-convolution kernel costs about twice a plain convolution there), and per-sample
weight products of one vector use the unfolded input once it has fewer entries (instead of
a grouped convolution). Measured on the visual tour: GGN 7%, empirical Fisher 9% faster;
larger problems, and all on GPUs, take the other kernels."""


def _patch_count(io: ModuleIO, mat: Tensor) -> int:
    """Entries of the unfolded input: ``N * C * kh * kw * H' * W'``."""
    kernel_h, kernel_w = io.module.kernel_size
    return io.input_shape[:2].numel() * kernel_h * kernel_w * mat.shape[3:].numel()


def _transposed_convolution(stack: Tensor, module: nn.Conv2d, size: tuple[int, int]) -> Tensor:
    """``stack`` ``[R, O, H', W']`` pushed to the input ``[R, C, *size]`` by the transposed
    convolution, in channels-last layout."""
    left, right, top, bottom = padding = explicit_padding(module)
    symmetric = _is_symmetric(padding)
    height, width = size
    target = size if symmetric else (height + top + bottom, width + left + right)
    conv_padding = (top, left) if symmetric else (0, 0)
    stack = stack.contiguous(memory_format=torch.channels_last)
    grad_input = F.conv_transpose2d(
        stack,
        module.weight.detach(),
        stride=module.stride,
        padding=conv_padding,
        output_padding=_output_padding(module, stack.shape[2:], target, conv_padding),
        groups=module.groups,
        dilation=module.dilation,
    )
    return grad_input if symmetric else grad_input[..., top : top + height, left : left + width]


def _dilated_convolution(stack: Tensor, module: nn.Conv2d, size: tuple[int, int]) -> Tensor:
    """The same as ``_transposed_convolution``, as a convolution with the flipped kernel.

    Output pixel i of the module reads padded input pixel ``i * stride + a * dilation`` with
    kernel tap a, so input pixel u receives ``sum_a W[a] stack[i]`` over the i with
    ``i * stride = u + pad - a * dilation``: a correlation of the stack, dilated by the
    stride (zeros between pixels) and shifted by ``dilation * (kernel - 1) - pad``, with the
    flipped kernel. Stack pixels that fall outside only reach padding and are dropped.
    """
    left, _, top, _ = explicit_padding(module)
    spans = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
    shape = (size[0] + spans[0], size[1] + spans[1])
    dilated = stack.new_zeros(*stack.shape[:2], *shape)
    placed = [
        _placement(span - pad, length, stride, count)
        for span, pad, length, stride, count in zip(
            spans, (top, left), shape, module.stride, stack.shape[2:]
        )
    ]
    if None not in placed:
        (rows, sources_rows), (columns, sources_columns) = placed
        dilated[..., rows, columns] = stack[..., sources_rows, sources_columns]
    return F.conv2d(
        dilated, _flipped_transposed_weight(module), dilation=module.dilation, groups=module.groups
    )


def _placement(offset: int, length: int, stride: int, count: int) -> tuple[slice, slice] | None:
    """Where stack pixels ``i`` land (``i * stride + offset``) within ``[0, length)``, and
    which ``i`` those are; ``None`` if none does."""
    first = max(0, -(offset // stride))
    last = min(count, (length - 1 - offset) // stride + 1)
    if first >= last:
        return None
    return slice(first * stride + offset, (last - 1) * stride + offset + 1, stride), slice(
        first, last
    )


def _flipped_transposed_weight(module: nn.Conv2d) -> Tensor:
    """The kernel of the convolution that transposes ``module``: ``[C, O / G, kh, kw]``, input
    and output channels swapped within each group, taps reversed."""
    weight = module.weight.detach()
    groups, (out_channels, in_per_group) = module.groups, weight.shape[:2]
    swapped = weight.view(groups, out_channels // groups, in_per_group, *weight.shape[2:])
    swapped = swapped.transpose(1, 2).reshape(groups * in_per_group, -1, *weight.shape[2:])
    return swapped.flip(-2, -1)


def _output_padding(
    module: nn.Conv2d, out_size: tuple[int, int], target: tuple[int, int], padding: tuple[int, int]
) -> tuple[int, int]:
    """The rows/columns a transposed convolution must add to reach the input size ``target``."""
    return tuple(
        size - ((out - 1) * stride - 2 * pad + dilation * (kernel - 1) + 1)
        for size, out, stride, pad, dilation, kernel in zip(
            target, out_size, module.stride, padding, module.dilation, module.kernel_size
        )
    )
