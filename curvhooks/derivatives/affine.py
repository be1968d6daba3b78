"""Parameter derivatives shared by the affine modules, ``Linear`` and ``Conv2d``.

Both compute, for each sample n, group g and output position t,
``out[n, g, :, t] = W_g @ x[n, g, :, t] + b_g``, where ``x`` is the (unfolded) input
``[N, G, I, T]`` and ``W_g`` is ``[O, I]``. A stack pushed to the output, rearranged to
``[V, N, G, O, T]``, therefore reaches the weight of sample n as
``sum_t mat[v, n, g, :, t] x[n, g, :, t]^T`` and the bias as ``sum_t mat[v, n, g, :, t]``.
Subclasses say only how to unfold the input and how to rearrange a stack; every
parameter product and squared reduction lives here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvhooks.derivatives.base import ModuleDerivatives, ModuleIO

_UNFOLDED = "unfolded_input"


class AffineDerivatives(ModuleDerivatives):
    """Parameter products of a module that is affine in its unfolded input."""

    needs_input = True

    def unfold_input(self, io: ModuleIO) -> Tensor:
        """The input rearranged to ``[N, G, I, T]`` (may be a view)."""
        raise NotImplementedError

    def to_positions(self, io: ModuleIO, mat: Tensor) -> Tensor:
        """A stack ``[V, N, *out]`` rearranged to ``[V, N, G, O, T]`` (may be a view)."""
        raise NotImplementedError

    def _unfolded(self, io: ModuleIO) -> Tensor:
        """``unfold_input``, computed once per module call and shared by all extensions."""
        if _UNFOLDED not in io.cache:
            io.cache[_UNFOLDED] = self.unfold_input(io)
        return io.cache[_UNFOLDED]

    def _position_count(self, io: ModuleIO) -> int:
        return self._unfolded(io).shape[-1]

    def param_jac_t_mat_prod(
        self, io: ModuleIO, name: str, mat: Tensor, out: Tensor | None = None
    ) -> Tensor:
        if out is None:
            out = mat.new_empty(*mat.shape[:2], *getattr(io.module, name).shape)
        if name == "bias":
            positions = self.to_positions(io, mat).flatten(2, 3)
            torch.sum(positions, -1, out=out.view(*mat.shape[:2], -1))
        else:
            self.weight_jac_t_mat_prod(io, mat, out)
        return out

    def weight_jac_t_mat_prod(self, io: ModuleIO, mat: Tensor, out: Tensor) -> None:
        """Write the per-sample weight products ``[V, N, *weight.shape]`` into ``out``."""
        stacked, x = self.to_positions(io, mat), self._unfolded(io)
        torch.matmul(stacked, x.transpose(-1, -2), out=out.view(*stacked.shape[:-1], -1))

    def param_jac_t_mat_prod_summed(self, io: ModuleIO, name: str, mat: Tensor) -> Tensor:
        param = getattr(io.module, name)
        stacked = self.to_positions(io, mat)
        if name == "bias":
            return stacked.sum((0, 1, 4)).view(param.shape)
        return self.weight_jac_t_mat_prod_summed(io, mat).view(param.shape)

    def weight_jac_t_mat_prod_summed(self, io: ModuleIO, mat: Tensor) -> Tensor:
        """The weight products summed over the stack and the batch: ``weight.shape``."""
        return torch.einsum("vngot,ngit->goi", self.to_positions(io, mat), self._unfolded(io))

    def param_sq_sum(self, io: ModuleIO, name: str, mat: Tensor, per_sample: bool) -> Tensor:
        if name == "bias" or self._position_count(io) != 1:
            return super().param_sq_sum(io, name, mat, per_sample)
        # One position: the product is an outer product, its square the outer product of squares.
        mat_sq = self.to_positions(io, mat)[..., 0].square().sum(0)
        x_sq = self._unfolded(io)[..., 0].square()
        equation = "ngo,ngi->ngoi" if per_sample else "ngo,ngi->goi"
        result = torch.einsum(equation, mat_sq, x_sq)
        param_shape = getattr(io.module, name).shape
        return result.view(-1, *param_shape) if per_sample else result.view(param_shape)

    def param_sq_norm(self, io: ModuleIO, name: str, mat: Tensor) -> Tensor:
        if name == "bias" or not self._gram_is_cheaper(io, mat):
            return super().param_sq_norm(io, name, mat)
        # ||sum_t m_t x_t^T||^2 = sum_{t,s} (m_t . m_s)(x_t . x_s): Gram matrices over positions.
        stacked, x = self.to_positions(io, mat), self._unfolded(io)
        mat_gram = torch.einsum("vngot,vngos->ngts", stacked, stacked)
        x_gram = torch.einsum("ngit,ngis->ngts", x, x)
        return (mat_gram * x_gram).flatten(1).sum(1)

    def _gram_is_cheaper(self, io: ModuleIO, mat: Tensor) -> bool:
        """Whether Gram matrices over positions cost fewer operations than the products."""
        num_vectors, out_per_group = mat.shape[0], self.to_positions(io, mat).shape[-2]
        in_per_group, positions = self._unfolded(io).shape[-2:]
        gram_cost = positions * (num_vectors * out_per_group + in_per_group)
        return gram_cost < num_vectors * out_per_group * in_per_group

