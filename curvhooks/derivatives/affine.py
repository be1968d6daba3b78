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

from curvhooks import tuning
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

    def _position_count(self, io: ModuleIO, mat: Tensor) -> int:
        return self.to_positions(io, mat).shape[-1]

    def param_jac_t_mat_prod(
        self, io: ModuleIO, name: str, mat: Tensor, out: Tensor | None = None
    ) -> Tensor:
        if out is None:
            out = mat.new_empty(*mat.shape[:2], *getattr(io.module, name).shape)
        if name == "bias":
            positions = self.to_positions(io, mat).flatten(2, 3)
            bias_out = out.view(*mat.shape[:2], -1)
            if positions.shape[-1] == 1:  # a copy; a sum over one strided entry runs slowly
                bias_out.copy_(positions[..., 0])
            else:
                torch.sum(positions, -1, out=bias_out)
        else:
            self.weight_jac_t_mat_prod(io, mat, out)
        return out

    def weight_jac_t_mat_prod(self, io: ModuleIO, mat: Tensor, out: Tensor) -> None:
        """Write the per-sample weight products ``[V, N, *weight.shape]`` into ``out``."""
        stacked = self.to_positions(io, mat)
        out_grouped = out.view(*stacked.shape[:-1], -1)  # [V, N, G, O, I]
        x_t = self._unfolded(io).transpose(-1, -2)  # [N, G, T, I]
        if stacked.shape[-1] == 1:  # outer products, broadcast over V without copying x
            torch.mul(stacked, x_t, out=out_grouped)
        elif stacked.shape[0] == 1:
            torch.matmul(stacked, x_t, out=out_grouped)
        else:
            out_grouped.copy_(self._folded_products(io, mat).permute(2, 0, 1, 3, 4))

    def _folded_products(self, io: ModuleIO, mat: Tensor) -> Tensor:
        """Per-sample weight products ``[N, G, V, O, I]`` (maybe a permuted view) from one
        batched matrix product with the stack folded into one of its dimensions.

        The fold copies the stack; it copies along contiguous runs of the stack's memory:
        ``[N, G, T, V * O]`` for a position-major (channels-last) stack, else
        ``[N, G, V * O, T]``.
        """
        stacked, x = self.to_positions(io, mat), self._unfolded(io)
        num_vectors, batch, groups, out_per_group, positions = stacked.shape
        if stacked.stride(-2) == 1:
            columns = stacked.permute(1, 2, 4, 0, 3).reshape(batch, groups, positions, -1)
            products = x.matmul(columns).view(batch, groups, -1, num_vectors, out_per_group)
            return products.permute(0, 1, 3, 4, 2)
        rows = stacked.permute(1, 2, 0, 3, 4).reshape(batch, groups, -1, positions)
        products = rows.matmul(x.transpose(-1, -2))
        return products.view(batch, groups, num_vectors, out_per_group, -1)

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
        shape = getattr(io.module, name).shape
        if self._position_count(io, mat) != 1:
            squares = self._squared_per_sample(io, name, mat)
            return squares if per_sample else squares.sum(0)
        # At one position a product is an outer product (the bias's: the stack itself), and its
        # square the outer product of the squares.
        mat_sq, x_sq = self._squares_at_one_position(io, mat)
        if name == "bias":  # mat_sq is cached: hand out a copy
            result = mat_sq.clone() if per_sample else mat_sq.sum(0)
        else:
            result = torch.einsum("ngo,ngi->ngoi" if per_sample else "ngo,ngi->goi", mat_sq, x_sq)
        return result.reshape(-1, *shape) if per_sample else result.reshape(shape)

    def _squared_per_sample(self, io: ModuleIO, name: str, mat: Tensor) -> Tensor:
        """``sum_v (J_n^T mat[v, n]) ** 2`` per sample: ``[N, *p.shape]``, by one batched
        product of the folded stack, or for few vectors and inputs (``tuning.FEW_VECTORS``,
        ``tuning.FEW_INPUTS``) by one per vector, squared into a running sum."""
        if name == "bias" or mat.shape[0] == 1:
            return self.param_jac_t_mat_prod(io, name, mat).square_().sum(0)
        shape = (mat.shape[1], *io.module.weight.shape)
        x_t = self._unfolded(io).transpose(-1, -2)  # [N, G, T, I]
        if mat.shape[0] > tuning.FEW_VECTORS or x_t.shape[-1] >= tuning.FEW_INPUTS:
            return self._folded_products(io, mat).square_().sum(2).view(shape)
        stacked = self.to_positions(io, mat)
        squares = torch.matmul(stacked[0], x_t).square_()  # [N, G, O, I]
        product = torch.empty_like(squares)
        for vector in stacked[1:]:
            torch.matmul(vector, x_t, out=product)
            squares.addcmul_(product, product)
        return squares.view(shape)

    def _squares_at_one_position(self, io: ModuleIO, mat: Tensor) -> tuple[Tensor, Tensor]:
        """``sum_v mat^2`` ``[N, G, O]`` and ``x^2`` ``[N, G, I]`` for one position; cached
        for the module call, since weight and bias share them."""
        cached = io.cache.get("squares_at_one_position")
        if cached is None or cached[0] is not mat:  # the stack itself, not a recycled id
            stack = self.to_positions(io, mat)[..., 0]
            io.cache["squares_at_one_position"] = (mat, stack.square().sum(0))
        if "x_squared" not in io.cache:
            io.cache["x_squared"] = self._unfolded(io)[..., 0].square()
        return io.cache["squares_at_one_position"][1], io.cache["x_squared"]

    def param_sq_norm(self, io: ModuleIO, name: str, mat: Tensor) -> Tensor:
        if name == "bias" or not self._gram_is_cheaper(io, mat):
            return self._squared_per_sample(io, name, mat).flatten(1).sum(1)
        # ||sum_t m_t x_t^T||^2 = sum_{t,s} (m_t . m_s)(x_t . x_s): Gram matrices over positions.
        stacked, x = self.to_positions(io, mat), self._unfolded(io)
        mat_gram = torch.einsum("vngot,vngos->ngts", stacked, stacked)
        x_gram = torch.einsum("ngit,ngis->ngts", x, x)
        return (mat_gram * x_gram).flatten(1).sum(1)

    has_kronecker_factors = True

    def input_root(self, io: ModuleIO, approx: str, weight: str = "weight") -> Tensor:
        # Groups are averaged over first, as curvlinops does (each group's input meets its own
        # block of the weight, which one Kronecker factor cannot tell apart).
        unfolded = self._unfolded(io)  # [N, G, I, T]
        x = unfolded[:, 0] if unfolded.shape[1] == 1 else unfolded.mean(1)  # [N, I, T]
        x = x.mean(-1, keepdim=True) if approx == "reduce" else x
        rows = x.new_empty(x.shape[0], x.shape[2], x.shape[1])  # one row per (n, t)
        torch.mul(x.transpose(-1, -2), (x.shape[0] * x.shape[2]) ** -0.5, out=rows)
        return rows.view(-1, x.shape[1])

    def output_root(self, io: ModuleIO, mat: Tensor, approx: str, weight: str = "weight") -> Tensor:
        stacked = self.to_positions(io, mat).flatten(2, 3)  # [V, N, O, T]
        stacked = stacked.sum(-1, keepdim=True) if approx == "reduce" else stacked
        return stacked.transpose(-1, -2).reshape(-1, stacked.shape[2])  # one per (v, n, t)

    def _gram_is_cheaper(self, io: ModuleIO, mat: Tensor) -> bool:
        """Whether Gram matrices over positions cost fewer operations than the products."""
        num_vectors, out_per_group = mat.shape[0], self.to_positions(io, mat).shape[-2]
        in_per_group, positions = self._unfolded(io).shape[-2:]
        gram_cost = positions * (num_vectors * out_per_group + in_per_group)
        return gram_cost < num_vectors * out_per_group * in_per_group
