"""Derivatives of ``nn.Embedding``: ``out[n, t] = weight[x[n, t]]`` for indices ``x`` of any
shape ``[N, *]``.

A stack ``[V, N, *, E]`` reaches row i of the weight, per sample, as the sum over the
sample's positions holding index i: a scatter, never a one-hot product. The squared
reductions first sum each sample's positions per distinct index (only the rows a sample
uses), then square. The row ``padding_idx`` gets no gradient, so no curvature either.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvhooks.derivatives.base import ModuleDerivatives, ModuleIO


class EmbeddingDerivatives(ModuleDerivatives):
    """Indices have no gradient: only the weight's products exist."""

    needs_input = True

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if module.max_norm is not None:
            return "max_norm renormalises the weight in place during forward; use max_norm=None"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq scales by the batch's counts; use scale_grad_by_freq=False"
        return None

    def param_jac_t_mat_prod(
        self, io: ModuleIO, name: str, mat: Tensor, out: Tensor | None = None
    ) -> Tensor:
        num_vectors, batch, dim = mat.shape[0], mat.shape[1], mat.shape[-1]
        rows = io.module.num_embeddings
        if out is None:
            out = mat.new_empty(num_vectors, batch, rows, dim)
        flat = out.view(num_vectors, batch * rows, dim).zero_()
        keys = self._keys(io)  # [N * T]: n * rows + index
        flat.index_add_(1, keys, mat.reshape(num_vectors, -1, dim))
        self._drop_padding(io, out.view(num_vectors, batch, rows, dim), dim=2)
        return out

    def param_sq_sum(self, io: ModuleIO, name: str, mat: Tensor, per_sample: bool) -> Tensor:
        squares, keys = self._used_row_squares(io, mat)  # [U, E], [U]
        rows = io.module.num_embeddings
        if per_sample:
            result = mat.new_zeros(mat.shape[1] * rows, mat.shape[-1]).index_add_(0, keys, squares)
            result = result.view(mat.shape[1], rows, -1)
            return self._drop_padding(io, result, dim=1)
        result = mat.new_zeros(rows, mat.shape[-1]).index_add_(0, keys % rows, squares)
        return self._drop_padding(io, result, dim=0)

    def param_sq_norm(self, io: ModuleIO, name: str, mat: Tensor) -> Tensor:
        squares, keys = self._used_row_squares(io, mat)
        per_row = self._drop_padding_rows(io, squares.sum(1), keys)
        rows = io.module.num_embeddings
        return mat.new_zeros(mat.shape[1]).index_add_(0, keys // rows, per_row)

    def _used_row_squares(self, io: ModuleIO, mat: Tensor) -> tuple[Tensor, Tensor]:
        """Per distinct (sample, index) pair u: ``sum_v (sum of the stack over the sample's
        positions with that index)^2`` ``[U, E]``, and the pairs' keys ``n * rows + index``."""
        unique, inverse = torch.unique(self._keys(io), return_inverse=True)
        num_vectors, dim = mat.shape[0], mat.shape[-1]
        sums = mat.new_zeros(num_vectors, len(unique), dim)
        sums.index_add_(1, inverse, mat.reshape(num_vectors, -1, dim))
        return sums.square_().sum(0), unique

    def _keys(self, io: ModuleIO) -> Tensor:
        """``n * rows + index`` for every position of every sample, flattened."""
        indices = io.input.reshape(io.input.shape[0], -1)
        offsets = torch.arange(indices.shape[0], device=indices.device)[:, None]
        return (offsets * io.module.num_embeddings + indices).flatten()

    @staticmethod
    def _drop_padding(io: ModuleIO, result: Tensor, dim: int) -> Tensor:
        """Zero the ``padding_idx`` row along ``dim`` (autograd gives it no gradient)."""
        if io.module.padding_idx is not None:
            result.select(dim, io.module.padding_idx).zero_()
        return result

    @staticmethod
    def _drop_padding_rows(io: ModuleIO, values: Tensor, keys: Tensor) -> Tensor:
        """``values`` per (sample, index) pair, zero for the ``padding_idx`` pairs."""
        padding = io.module.padding_idx
        if padding is None:
            return values
        return values.masked_fill(keys % io.module.num_embeddings == padding, 0)
