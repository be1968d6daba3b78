"""Derivatives of pooling: ``AvgPool1d/2d/3d``, ``AdaptiveAvgPool1d/2d/3d`` (linear) and
``MaxPool1d/2d/3d`` (piecewise linear), every kernel, stride, padding, dilation and
``ceil_mode``.

A stack ``[V, N, *out]`` is pushed with the V vectors folded into the batch. Average pooling
is linear, so its transposed Jacobian is the pooling's own backward kernel at any point (zeros).
Max pooling routes each output entry's vector entry back to the input entry that won the
window (the indices of the recorded input), summed where windows overlap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from curvhooks._compat import saved
from curvhooks.derivatives.base import ModuleDerivatives, ModuleIO


class AvgPoolDerivatives(ModuleDerivatives):
    """Average pooling, plain or adaptive: linear in the input."""

    def jac_t_mat_prod(self, io: ModuleIO, mat: Tensor) -> Tensor:
        folded = mat.reshape(-1, *mat.shape[2:])
        with torch.enable_grad():
            point = mat.new_zeros(len(folded), *io.input_shape[1:], requires_grad=True)
            (pushed,) = torch.autograd.grad(io.module.forward(point), point, folded)
        return pushed.view(*mat.shape[:2], *io.input_shape[1:])


class MaxPoolDerivatives(ModuleDerivatives):
    """Max pooling: each output entry's derivative is 1 at its window's maximum."""

    needs_input = True

    def unsupported_reason(self, module) -> str | None:
        if module.return_indices:
            return "return_indices=True returns a tuple; call F.max_pool*d for the indices"
        return None

    def take_saved(self, io: ModuleIO, output: Tensor) -> None:
        """The indices autograd keeps for 2-D and 3-D max pooling of a batch (``_saved_result1``
        of ``MaxPool2DWithIndicesBackward0``), checked for node, type, device and shape."""
        node = output.grad_fn
        if node is None or "MaxPool" not in node.name():
            return
        indices = saved(node, "result1")
        spatial = len(saved(node, "kernel_size") or ())
        if (
            isinstance(indices, Tensor)
            and indices.dtype == torch.int64
            and indices.device == output.device  # not moved away by saved-tensor hooks
            and indices.shape == output.shape
            and indices.dim() == spatial + 2  # batched: not [C, *spatial]
        ):
            io.cache["indices"] = indices.flatten(2)

    def jac_t_mat_prod(self, io: ModuleIO, mat: Tensor) -> Tensor:
        indices = self._indices(io)  # [N, C, prod(out spatial)] into the input's spatial entries
        num_vectors, batch, channels = mat.shape[:3]
        spatial = io.input_shape[2:].numel()
        pushed = mat.new_zeros(num_vectors, batch, channels, spatial)
        index = indices.expand(num_vectors, *indices.shape)
        pushed.scatter_add_(3, index, mat.reshape(num_vectors, batch, channels, -1))
        return pushed.view(num_vectors, *io.input_shape)

    def _indices(self, io: ModuleIO) -> Tensor:
        """The winning input entry of every output entry: autograd's (``take_saved``), or
        computed once per call."""
        if "indices" not in io.cache:
            module = io.module
            pool = {3: F.max_pool1d, 4: F.max_pool2d, 5: F.max_pool3d}[io.input.dim()]
            _, indices = pool(
                io.input,
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                module.ceil_mode,
                return_indices=True,
            )
            io.cache["indices"] = indices.flatten(2)
        return io.cache["indices"]
