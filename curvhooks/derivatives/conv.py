"""Derivatives of ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d`` (any stride, padding,
dilation and groups; zero padding), one class for the family: the spatial dimensions are
those of the weight after its two channel dimensions.

Per-sample weight products of a single vector (first order) are the weight gradient of one
convolution with ``N * groups`` groups (each sample its own group), which PyTorch's
convolution kernels compute faster than unfolded patches unless the problem is small; for
stacks of several vectors one batched matrix product over the unfolded patches (computed
once, shared by all extensions) costs less. Stacks are pushed to the input by a transposed
convolution (2-D inputs of many positions: in channels-last layout), or, when small, by a
plain convolution of the zero-dilated stack with the flipped kernel (the thresholds are in
``curvhooks.tuning``). Padding that a convolution cannot express (``"same"`` with an even
kernel pads one more entry at the end) is applied to the input explicitly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvhooks import tuning
from curvhooks.derivatives.affine import AffineDerivatives
from curvhooks.derivatives.base import ModuleIO

CONVOLUTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
TRANSPOSED = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
WEIGHT_GRADIENTS = {
    1: torch.nn.grad.conv1d_weight,
    2: torch.nn.grad.conv2d_weight,
    3: torch.nn.grad.conv3d_weight,
}


def explicit_padding(module: nn.Module) -> list[tuple[int, int]]:
    """Zero padding ``(before, after)`` per spatial dimension, equivalent to
    ``module.padding``."""
    spatial = module.weight.dim() - 2
    if module.padding == "valid":
        return [(0, 0)] * spatial
    if module.padding == "same":
        return [_split_same(d * (k - 1)) for d, k in zip(module.dilation, module.kernel_size)]
    return [(pad, pad) for pad in module.padding]


def pad_arguments(padding: list[tuple[int, int]]) -> list[int]:
    """``padding`` in ``F.pad``'s order: the last dimension first."""
    return [amount for pair in reversed(padding) for amount in pair]


def _split_same(total: int) -> tuple[int, int]:
    """PyTorch's split of ``"same"`` padding: the extra entry goes to the end."""
    return total // 2, total - total // 2


def _is_symmetric(padding: list[tuple[int, int]]) -> bool:
    return all(before == after for before, after in padding)


class ConvDerivatives(AffineDerivatives):
    """Groups are the convolution's groups; positions are the output's spatial entries."""

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if module.padding_mode != "zeros":
            return (
                f"padding_mode={module.padding_mode!r} is not supported; "
                "use padding_mode='zeros' (or pad the input yourself with torch.nn.functional.pad)"
            )
        return None

    def _input_and_padding(self, io: ModuleIO) -> tuple[Tensor, tuple[int, ...]]:
        """The input, padded explicitly where needed, and the padding left to the convolution."""
        padding = explicit_padding(io.module)
        if _is_symmetric(padding):
            return io.input, tuple(before for before, _ in padding)
        return F.pad(io.input, pad_arguments(padding)), (0,) * len(padding)

    def unfold_input(self, io: ModuleIO) -> Tensor:
        # A strided view of the padded input, copied once (F.unfold loops over the samples).
        module = io.module
        padding = pad_arguments(explicit_padding(module))
        padded = F.pad(io.input, padding) if any(padding) else io.input
        batch, channels, *size = padded.shape
        steps = padded.stride()
        out = [
            (length - dilation * (kernel - 1) - 1) // stride + 1
            for length, dilation, kernel, stride in zip(
                size, module.dilation, module.kernel_size, module.stride
            )
        ]
        per_group = channels // module.groups
        patches = padded.as_strided(
            (batch, module.groups, per_group, *module.kernel_size, *out),
            (
                steps[0],
                steps[1] * per_group,
                steps[1],
                *(step * dilation for step, dilation in zip(steps[2:], module.dilation)),
                *(step * stride for step, stride in zip(steps[2:], module.stride)),
            ),
        )
        return patches.reshape(batch, module.groups, -1, math.prod(out))

    def to_positions(self, io: ModuleIO, mat: Tensor) -> Tensor:
        return mat.reshape(*mat.shape[:2], io.module.groups, -1, mat[0, 0, 0].numel())

    def weight_jac_t_mat_prod(self, io: ModuleIO, mat: Tensor, out: Tensor) -> None:
        if mat.shape[0] > 1 or (
            mat.device.type == "cpu" and _patch_count(io, mat) <= tuning.UNFOLD_LIMIT
        ):
            return super().weight_jac_t_mat_prod(io, mat, out)
        module = io.module
        x, padding = self._input_and_padding(io)
        # x: [N, C, *S] -> [1, N * C, *S]; mat: [1, N, O, *S'] -> [1, N * O, *S']
        products = WEIGHT_GRADIENTS[x.dim() - 2](
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
        return WEIGHT_GRADIENTS[x.dim() - 2](
            x,
            module.weight.shape,
            mat.sum(0),
            stride=module.stride,
            padding=padding,
            dilation=module.dilation,
            groups=module.groups,
        )

    def jac_t_mat_prod(self, io: ModuleIO, mat: Tensor) -> Tensor:
        stack = mat.flatten(0, 1)
        size = tuple(io.input_shape[2:])
        if stack.device.type == "cpu" and stack.numel() < tuning.SMALL_STACK:
            grad_input = _dilated_convolution(stack, io.module, size)
        else:
            grad_input = _transposed_convolution(stack, io.module, size)
        return grad_input.reshape(*mat.shape[:2], *io.input_shape[1:])


def _patch_count(io: ModuleIO, mat: Tensor) -> int:
    """Entries of the unfolded input: ``N * C * prod(kernel) * prod(out)``."""
    kernel = math.prod(io.module.kernel_size)
    return io.input_shape[:2].numel() * kernel * mat.shape[3:].numel()


def _transposed_convolution(stack: Tensor, module: nn.Module, size: tuple[int, ...]) -> Tensor:
    """``stack`` ``[R, O, *S']`` pushed to the input ``[R, C, *size]`` by the transposed
    convolution (2-D inputs of at least ``tuning.CHANNELS_LAST`` positions: in channels-last
    layout)."""
    padding = explicit_padding(module)
    symmetric = _is_symmetric(padding)
    target = size if symmetric else tuple(n + sum(pair) for n, pair in zip(size, padding))
    conv_padding = tuple(before for before, _ in padding) if symmetric else (0,) * len(size)
    if len(size) == 2 and math.prod(size) >= tuning.CHANNELS_LAST:
        stack = stack.contiguous(memory_format=torch.channels_last)
    grad_input = TRANSPOSED[len(size)](
        stack,
        module.weight.detach(),
        stride=module.stride,
        padding=conv_padding,
        output_padding=_output_padding(module, stack.shape[2:], target, conv_padding),
        groups=module.groups,
        dilation=module.dilation,
    )
    if symmetric:
        return grad_input
    window = tuple(slice(before, before + n) for (before, _), n in zip(padding, size))
    return grad_input[(..., *window)]


def _dilated_convolution(stack: Tensor, module: nn.Module, size: tuple[int, ...]) -> Tensor:
    """The same as ``_transposed_convolution``, as a convolution with the flipped kernel.

    Output entry i of the module reads padded input entry ``i * stride + a * dilation`` with
    kernel tap a, so input entry u receives ``sum_a W[a] stack[i]`` over the i with
    ``i * stride = u + pad - a * dilation``: a correlation of the stack, dilated by the
    stride (zeros between entries) and shifted by ``dilation * (kernel - 1) - pad``, with the
    flipped kernel. Stack entries that fall outside only reach padding and are dropped.
    """
    padding = explicit_padding(module)
    spans = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
    shape = [n + span for n, span in zip(size, spans)]
    dilated = stack.new_zeros(*stack.shape[:2], *shape)
    placed = [
        _placement(span - before, length, stride, count)
        for span, (before, _), length, stride, count in zip(
            spans, padding, shape, module.stride, stack.shape[2:]
        )
    ]
    if None not in placed:
        targets, sources = zip(*placed)
        dilated[(..., *targets)] = stack[(..., *sources)]
    return CONVOLUTIONS[len(size)](
        dilated, _flipped_transposed_weight(module), dilation=module.dilation, groups=module.groups
    )


def _placement(offset: int, length: int, stride: int, count: int) -> tuple[slice, slice] | None:
    """Where stack entries ``i`` land (``i * stride + offset``) within ``[0, length)``, and
    which ``i`` those are; ``None`` if none does."""
    first = max(0, -(offset // stride))
    last = min(count, (length - 1 - offset) // stride + 1)
    if first >= last:
        return None
    return slice(first * stride + offset, (last - 1) * stride + offset + 1, stride), slice(
        first, last
    )


def _flipped_transposed_weight(module: nn.Module) -> Tensor:
    """The kernel of the convolution that transposes ``module``: ``[C, O / G, *kernel]``,
    input and output channels swapped within each group, taps reversed."""
    weight = module.weight.detach()
    groups, (out_channels, in_per_group) = module.groups, weight.shape[:2]
    swapped = weight.view(groups, out_channels // groups, in_per_group, *weight.shape[2:])
    swapped = swapped.transpose(1, 2).reshape(groups * in_per_group, -1, *weight.shape[2:])
    return swapped.flip(tuple(range(2, weight.dim())))


def _output_padding(
    module: nn.Module, out_size: tuple[int, ...], target: tuple[int, ...], padding: tuple[int, ...]
) -> tuple[int, ...]:
    """The entries a transposed convolution must add to reach the input size ``target``."""
    return tuple(
        size - ((out - 1) * stride - 2 * pad + dilation * (kernel - 1) + 1)
        for size, out, stride, pad, dilation, kernel in zip(
            target, out_size, module.stride, padding, module.dilation, module.kernel_size
        )
    )
