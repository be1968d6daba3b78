"""What every module's derivatives provide, and the record of one module call they act on.

Shape convention: a stack of V vectors over a batch of N samples is ``[V, N, *shape]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from curvhooks.derivatives.generic import RecordedCall


@dataclass
class ModuleIO:
    """What one call of a module leaves for its backward pass.

    Attributes:
        module: The module that was called.
        input: Its input ``[N, *in]`` (detached), if its derivatives need it.
        output: Its output ``[N, *out]`` (detached), if its derivatives need it.
        input_shape: The shape of its input.
        output_shape: The shape of its output.
        cache: Quantities derived from ``input`` that several extensions share (e.g. the
            unfolded input of a convolution); dropped with the input.
        call: The whole call (every argument), for derivatives that take it
            (``ModuleDerivatives.whole_call``).
    """

    module: nn.Module
    input: Tensor | None
    output: Tensor | None
    input_shape: torch.Size
    output_shape: torch.Size
    cache: dict[str, object] = field(default_factory=dict)
    call: RecordedCall | None = None

    def release(self) -> None:
        """Drop every stored tensor."""
        self.input = None
        self.output = None
        self.call = None
        self.cache.clear()

    def per_sample(self, batch: int) -> ModuleIO:
        """The record of a call on a tensor shared by the batch (leading dimension 1), as
        if each of ``batch`` samples made it: input and output expanded (views)."""

        def expand(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor.expand(batch, *tensor.shape[1:])

        return ModuleIO(
            self.module,
            expand(self.input),
            expand(self.output),
            torch.Size((batch, *self.input_shape[1:])),
            torch.Size((batch, *self.output_shape[1:])),
            call=None if self.call is None else self.call.per_sample(batch),
        )


class ModuleDerivatives:
    """The Jacobians of one module type, applied to stacks of vectors.

    Subclasses implement ``jac_t_mat_prod`` (or ``jacobian_diagonal`` where the Jacobian is
    diagonal); those with parameters also implement ``param_jac_t_mat_prod``. The squared
    reductions below have generic implementations that build the per-sample products;
    subclasses override them where a cheaper contraction exists.

    Contract: a method never writes into a tensor it did not create (the stack, the recorded
    input and output, the cache's tensors, the module's parameters), except an ``out=`` the
    caller passes. What a parameter method returns belongs to the caller: it shares memory
    with nothing the derivatives keep, so the caller may change it in place.
    ``jac_t_mat_prod`` and the roots may return the stack itself or a view of it.
    """

    needs_input: bool = False
    """Whether the backward pass needs the module's input (the hooks keep the input's and the
    output's shapes always)."""

    needs_output: bool = False
    """Whether the backward pass needs the module's output."""

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why ``module``'s arguments are not supported, or ``None`` if they are."""
        return None

    def take_saved(self, io: ModuleIO, output: Tensor) -> None:
        """At the forward pass: keep in ``io.cache`` what autograd saved for the module's
        backward (``output.grad_fn``) that these derivatives would otherwise recompute, or
        check the call (``GenericDerivatives``). By default nothing."""

    def jac_t_mat_prod(self, io: ModuleIO, mat: Tensor) -> Tensor:
        """Push a stack ``[V, N, *out]`` from the output to the input: ``[V, N, *in]``.

        By default from ``jacobian_diagonal``, into a fresh tensor.
        """
        diagonal = self.jacobian_diagonal(io)
        if diagonal is None:
            raise NotImplementedError
        return scale_entries(mat, diagonal, out=torch.empty_like(mat))

    def jacobian_diagonal(self, io: ModuleIO) -> Tensor | None:
        """For a module whose input and output have one shape and whose Jacobian is diagonal
        (an element-wise activation, a per-channel scaling): that diagonal, broadcastable
        against a stack ``[V, N, *in]``; ``None`` otherwise. The owner of a stack may then
        push it in place (``scale_entries(stack, diagonal, out=stack)``), which saves
        allocating and page-faulting a fresh stack at every activation."""
        return None

    generic: bool = False
    """Whether these are the generic derivatives of a module curvhooks has no class for
    (``torch.func`` on its call)."""

    whole_call: bool = False
    """Whether the derivatives take the module's whole call (``io.call``: several tensor
    arguments, keyword arguments) and may join several outputs, or one whose samples are not
    in dimension 0, into one output ``[N, D]`` (``CallDerivatives``)."""

    direct: bool = False
    """Whether these serve parameters that a module's own ``forward`` uses directly (a
    container's), reached by autograd: the hooks record no call of the module."""

    serves_children: bool = False
    """Whether the module's call uses its children's parameters itself, without calling
    them (``nn.MultiheadAttention``'s ``out_proj``): they are served at its calls."""

    second_derivatives: bool = True
    """Whether the module's own second derivatives are known (the Hessian extensions need
    them)."""

    has_curvature: bool = False
    """Whether the module adds curvature of its own in its input (``residual_roots`` can be
    nonzero): not linear or piecewise linear in it."""

    def hessian_residual(self, io: ModuleIO, grad_output: Tensor) -> Tensor | None:
        """For a module whose own curvature is diagonal (an element-wise activation): the
        diagonal ``[N, *in]`` it adds to the Hessian of the loss in its input,
        ``d^2 (out . grad_output) / d in^2``; ``None`` where that is zero (a module linear or
        piecewise linear in its input). Modules with curvature between entries override
        ``residual_roots`` instead."""
        return None

    def residual_roots(self, io: ModuleIO, grad_output: Tensor) -> tuple[Tensor, Tensor] | None:
        """The module's own curvature ``d^2 (out . grad_output) / d in^2`` per sample, as
        signed square-root stacks ``(P, Q)``, each ``[U, N, *in]``, with ``P P^T - Q Q^T``
        that matrix; ``None`` where it is zero. From ``hessian_residual``'s diagonal unless
        overridden."""
        residual = self.hessian_residual(io, grad_output)
        if residual is None:
            return None
        return diagonal_stack(residual.clamp(min=0)), diagonal_stack((-residual).clamp(min=0))

    def param_jac_t_mat_prod(
        self, io: ModuleIO, name: str, mat: Tensor, out: Tensor | None = None
    ) -> Tensor:
        """Push a stack ``[V, N, *out]`` to parameter ``name``, per sample: ``[V, N, *p.shape]``.

        ``out``, if given, is a tensor of the result's shape to write into.
        """
        raise NotImplementedError

    @property
    def serves_parameters(self) -> bool:
        """Whether the module type has parameters (``param_jac_t_mat_prod`` is defined)."""
        return type(self).param_jac_t_mat_prod is not ModuleDerivatives.param_jac_t_mat_prod

    def param_jac_t_mat_prod_summed(self, io: ModuleIO, name: str, mat: Tensor) -> Tensor:
        """``param_jac_t_mat_prod`` summed over the stack and the batch: ``p.shape``."""
        return self.param_jac_t_mat_prod(io, name, mat).sum((0, 1))

    def param_sq_sum(self, io: ModuleIO, name: str, mat: Tensor, per_sample: bool) -> Tensor:
        """Sum over the stack of the squared per-sample products.

        Returns ``sum_v (J_n^T mat[v, n]) ** 2`` per sample ``[N, *p.shape]`` if
        ``per_sample``, else also summed over the batch: ``p.shape``.
        """
        squares = self.param_jac_t_mat_prod(io, name, mat).square_().sum(0)
        return squares if per_sample else squares.sum(0)

    def param_sq_norm(self, io: ModuleIO, name: str, mat: Tensor) -> Tensor:
        """Squared norm of the per-sample products, summed over the stack: ``[N]``."""
        products = self.param_jac_t_mat_prod(io, name, mat)
        return products.square_().flatten(2).sum((0, 2))

    has_kronecker_factors: bool = False
    """Whether the module gives Kronecker factors (``input_root``, ``output_root``) to its
    weights (``kronecker_weight``): each applied to inputs at positions that share it."""

    def kronecker_weight(self, module: nn.Module, name: str) -> str | None:
        """The weight whose factors parameter ``name`` takes: itself for a weight, the
        weight it is added to for a bias (which takes that weight's ``B``); ``None`` for a
        parameter without them. By default ``weight`` and ``bias``."""
        if self.has_kronecker_factors and name in ("weight", "bias"):
            return "weight"
        return None

    def input_root(self, io: ModuleIO, approx: str, weight: str = "weight") -> Tensor:
        """KFAC's input factor ``A = R^T R`` ``[I, I]`` of ``weight`` ``[O, I]`` (``[O, *rest]``
        flattened) as its root ``R`` ``[r, I]``: ``A`` is the mean of ``x x^T`` over samples
        and positions (``approx="expand"``, a row per sample and position), or over samples of
        the inputs averaged over positions (``"reduce"``, a row per sample); a grouped
        convolution's inputs are averaged over its groups first."""
        raise NotImplementedError

    def output_root(self, io: ModuleIO, mat: Tensor, approx: str, weight: str = "weight") -> Tensor:
        """KFAC's output factor ``B = R^T R`` ``[O, O]`` of ``weight`` from a stack ``[V, N,
        *out]`` at the module's output as its
        root ``R`` ``[r, O]``: ``B`` is the sum of ``s s^T`` over vectors, samples and positions
        (``"expand"``), or over vectors and samples of the stack summed over positions
        (``"reduce"``)."""
        raise NotImplementedError


def scale_entries(mat: Tensor, diagonal: Tensor, out: Tensor) -> Tensor:
    """``mat * diagonal`` written into ``out`` (which may be ``mat``). A per-sample
    ``diagonal`` ``[N, *in]`` is first laid out like one vector of ``mat`` (channels-last,
    say), so that the product runs vectorised."""
    if diagonal.shape == mat.shape[1:] and diagonal.stride() != mat[0].stride():
        diagonal = torch.empty_like(mat[0]).copy_(diagonal)
    return torch.mul(mat, diagonal, out=out)


def diagonal_stack(diagonal: Tensor) -> Tensor:
    """Square root of per-sample diagonal matrices as a stack: ``[N, *shape]`` of
    non-negative entries -> ``[U, N, *shape]`` (U = prod(shape)) whose vector u holds
    ``sqrt(diagonal[n, u])`` at entry u and zeros elsewhere."""
    batch, shape = diagonal.shape[0], diagonal.shape[1:]
    roots = diagonal.reshape(batch, -1).sqrt()
    return torch.diag_embed(roots).permute(1, 0, 2).reshape(-1, batch, *shape)


def block_diagonal_roots(blocks: Tensor, shape: torch.Size) -> tuple[Tensor, Tensor]:
    """Signed square roots of per-sample block-diagonal symmetric matrices.

    ``blocks`` ``[N, B, D, D]`` holds B blocks of D consecutive entries of a sample's
    ``shape`` (``B * D = prod(shape)``). Returns ``(P, Q)``, each ``[B * D, N, *shape]``:
    vector ``(b, j)`` holds eigenvector j of block b times ``sqrt(max(lambda_j, 0))`` in ``P``
    (``sqrt(max(-lambda_j, 0))`` in ``Q``) within that block, and zeros elsewhere.
    """
    batch, num_blocks, size = blocks.shape[:3]
    eigenvalues, eigenvectors = torch.linalg.eigh(blocks)  # columns are eigenvectors

    def spread(scale: Tensor) -> Tensor:
        stack = blocks.new_zeros(num_blocks, size, batch, num_blocks, size)
        # diagonal over the two block dimensions: [D (vector j), N, D (entry), B]
        stack.diagonal(0, 0, 3).copy_((eigenvectors * scale[:, :, None, :]).permute(3, 0, 2, 1))
        return stack.view(num_blocks * size, batch, *shape)

    return spread(eigenvalues.clamp(min=0).sqrt()), spread((-eigenvalues).clamp(min=0).sqrt())
