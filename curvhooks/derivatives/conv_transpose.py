"""Derivatives of ``nn.ConvTranspose1d/2d/3d`` (any stride, padding, output padding, dilation
and groups), one class for the family.

A transposed convolution is the adjoint of the convolution with the same weight
``[C_in, C_out / G, *kernel]`` and arguments: ``<v, conv_transpose(x, W)> = <conv(v, W), x>``
for ``v`` shaped like its output. So a stack pushed to the input is that convolution of
the stack, and the weight product of a sample is the weight gradient of the convolution with
input ``v`` and output gradient ``x``. Per-sample products fold the stack and the batch
into the groups of one such convolution, ``V * N * G`` groups.

Output padding (also the one a call with ``output_size=`` implies) is read off the shapes the
call recorded: the convolution of a stack then has ``output_padding // stride`` entries more
than the input per dimension, which reach nothing.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from curvhooks.derivatives.base import ModuleDerivatives, ModuleIO
from curvhooks.derivatives.conv import CONVOLUTIONS, WEIGHT_GRADIENTS


class ConvTransposeDerivatives(ModuleDerivatives):
    """The spatial dimensions are those of the weight after its two channel dimensions."""

    needs_input = True

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} is not supported; use 'zeros'"
        return None

    def jac_t_mat_prod(self, io: ModuleIO, mat: Tensor) -> Tensor:
        module = io.module
        pushed = CONVOLUTIONS[module.weight.dim() - 2](
            mat.flatten(0, 1),
            module.weight.detach(),
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
        )
        inside = tuple(slice(0, size) for size in io.input_shape[2:])
        return pushed[(..., *inside)].reshape(*mat.shape[:2], *io.input_shape[1:])

    def param_jac_t_mat_prod(
        self, io: ModuleIO, name: str, mat: Tensor, out: Tensor | None = None
    ) -> Tensor:
        if name == "bias":
            products = mat.sum(tuple(range(3, mat.dim())))
        else:
            products = self._weight_products(io, mat)
        return products if out is None else out.copy_(products)

    def param_jac_t_mat_prod_summed(self, io: ModuleIO, name: str, mat: Tensor) -> Tensor:
        if name == "bias":
            return mat.sum(tuple(i for i in range(mat.dim()) if i != 2))
        module = io.module
        return self._weight_gradient(
            io, mat.sum(0), self._padded_input(io), module.weight.shape, module.groups
        )

    def _weight_products(self, io: ModuleIO, mat: Tensor) -> Tensor:
        """Per-sample weight products ``[V, N, *weight.shape]``: the stack and the batch
        folded into the groups of one convolution's weight gradient."""
        module, (num_vectors, batch) = io.module, mat.shape[:2]
        folds = num_vectors * batch
        x = self._padded_input(io)
        x = x.expand(num_vectors, *x.shape)
        weight_shape = module.weight.shape
        products = self._weight_gradient(
            io,
            mat.reshape(1, -1, *mat.shape[3:]),
            x.reshape(1, -1, *x.shape[3:]),
            (folds * weight_shape[0], *weight_shape[1:]),
            folds * module.groups,
        )
        return products.view(num_vectors, batch, *weight_shape)

    @staticmethod
    def _weight_gradient(
        io: ModuleIO, stack: Tensor, grad_output: Tensor, shape: tuple[int, ...], groups: int
    ) -> Tensor:
        """The weight gradient of the adjoint convolution of ``stack`` (summed over its
        batch dimension), given ``grad_output`` at its output."""
        module = io.module
        return WEIGHT_GRADIENTS[module.weight.dim() - 2](
            stack,
            shape,
            grad_output,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=groups,
        )

    @staticmethod
    def _padded_input(io: ModuleIO) -> Tensor:
        """The input ``[N, C_in, *S]``, zero-padded at the end to the size of the adjoint
        convolution's output where the output padding reaches a whole stride."""
        module = io.module
        extra = [
            (out - ((size - 1) * stride - 2 * pad + dilation * (kernel - 1) + 1)) // stride
            for out, size, stride, pad, dilation, kernel in zip(
                io.output_shape[2:],
                io.input_shape[2:],
                module.stride,
                module.padding,
                module.dilation,
                module.kernel_size,
            )
        ]
        if not any(extra):
            return io.input
        return F.pad(io.input, [amount for e in reversed(extra) for amount in (0, e)])
