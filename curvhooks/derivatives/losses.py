"""Square roots of the loss Hessian with respect to the model output.

For a loss ``L = s * sum_n l_n(f_n)`` (``s`` the reduction's factor), a square root is a stack
``S`` of shape ``[C, N, *out]`` with ``sum_c S[c, n] S[c, n]^T = d^2 L / d f_n^2`` for each n.
The Monte-Carlo variant ``[M, N, *out]`` satisfies this in expectation. Both depend only on
the forward pass (model output and targets).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvhooks.derivatives.base import diagonal_stack

SUPPORTED_REDUCTIONS = ("mean", "sum")


def loss_gradient(loss_fn: nn.Module, output: Tensor, target: Tensor) -> Tensor:
    """The gradient ``[N, *out]`` of the reduced loss ``loss_fn(output, target)`` in its
    input, by autograd on a detached copy (the loss's hooks do not run); row n is
    ``s * grad(l_n)``."""
    with torch.enable_grad():
        leaf = output.detach().requires_grad_()
        return torch.autograd.grad(loss_fn.forward(leaf, target), leaf)[0]


class LossDerivatives:
    """Square roots of one loss class's Hessian in its input."""

    hessian_is_psd: bool = True
    """Whether the Hessian in the input is positive semi-definite for every input, so that
    its square root starts the exact Hessian's stacks too."""

    def unsupported_reason(self, loss_fn: nn.Module, output: Tensor, target: Tensor) -> str | None:
        """Why this call of ``loss_fn`` is not supported, or ``None`` if it is."""
        return None

    def scale(self, loss_fn: nn.Module, output: Tensor) -> float:
        """The factor ``s`` that the reduction applies to the summed per-sample losses."""
        raise NotImplementedError

    def sqrt_hessian(self, loss_fn: nn.Module, output: Tensor, target: Tensor) -> Tensor:
        """Exact square root ``[C, N, *out]`` of the reduced loss's Hessian."""
        raise NotImplementedError

    def sqrt_hessian_mc(
        self, loss_fn: nn.Module, output: Tensor, target: Tensor, mc_samples: int
    ) -> Tensor:
        """Monte-Carlo square root ``[M, N, *out]``: unbiased for the Hessian."""
        raise NotImplementedError

    def sqrt_hessian_rows(self, loss_fn: nn.Module, output: Tensor, target: Tensor) -> Tensor:
        """KFAC's type-2 factor ``[C, N, *out]``, as curvlinops builds it: the square root of
        the reduced loss's Hessian in each output row (a sample's class or target vector at
        one position), its C columns summed over the rows of a sample. Exact where a sample
        has one row."""
        raise NotImplementedError


class CrossEntropyDerivatives(LossDerivatives):
    """``l_n = -sum_t log softmax(f_n[:, t])[y_n[t]]`` on logits ``[N, C, *d]`` and class
    indices ``[N, *d]`` (no ``*d``: one position).

    At each position the Hessian is ``diag(p) - p p^T`` with ``p = softmax(f_n[:, t])``; its
    square root has columns ``sqrt(p_c) (e_c - p)``, one vector per class and position (C D
    vectors for D positions, each zero off its position). Sampling ``y ~ Categorical(p)`` at
    every position gives the unbiased factor ``p - e_y``. The ``"mean"`` reduction averages
    over all N D positions: ``s = 1 / (N D)``.
    """

    def unsupported_reason(self, loss_fn: nn.Module, output: Tensor, target: Tensor) -> str | None:
        if loss_fn.weight is not None:
            return "class weights (weight=...) are not supported; pass weight=None"
        if loss_fn.label_smoothing != 0:
            return "label_smoothing is not supported; use label_smoothing=0.0"
        if output.dim() < 2:
            return f"logits must have shape [N, C, *d], got {list(output.shape)}"
        expected = (output.shape[0], *output.shape[2:])
        if target.dtype.is_floating_point or tuple(target.shape) != expected:
            return (
                f"targets must be class indices of shape {list(expected)}; class probabilities "
                f"are not supported (got targets of shape {list(target.shape)} and dtype "
                f"{target.dtype})"
            )
        if bool((target == loss_fn.ignore_index).any()):
            return f"targets equal to ignore_index={loss_fn.ignore_index} are not supported"
        return None

    def scale(self, loss_fn: nn.Module, output: Tensor) -> float:
        positions = output.numel() // output.shape[1]
        return 1.0 / positions if loss_fn.reduction == "mean" else 1.0

    def sqrt_hessian(self, loss_fn: nn.Module, output: Tensor, target: Tensor) -> Tensor:
        columns = self._root_columns(loss_fn, output)  # [C, N, C, D]
        num_classes, positions = columns.shape[0], columns.shape[-1]
        # one vector per class and position: [C, N, C, D(entries), D(vectors)] -> [C D, N, ...]
        stack = torch.diag_embed(columns).permute(0, 4, 1, 2, 3)
        return stack.reshape(num_classes * positions, *output.shape)

    def sqrt_hessian_rows(self, loss_fn: nn.Module, output: Tensor, target: Tensor) -> Tensor:
        columns = self._root_columns(loss_fn, output)
        return columns.reshape(columns.shape[0], *output.shape)

    def _root_columns(self, loss_fn: nn.Module, output: Tensor) -> Tensor:
        """``[C, N, C, D]``: column c of each position's root, ``sqrt(s p_c) (e_c - p)``."""
        probs = _class_probabilities(output)  # [N, C, D]
        eye = torch.eye(probs.shape[1], dtype=probs.dtype, device=probs.device)
        columns = eye[:, None, :, None] - probs[None]  # e_c - p at each position
        scale = math.sqrt(self.scale(loss_fn, output))
        return columns.mul_(probs.sqrt().transpose(0, 1)[:, :, None] * scale)

    def sqrt_hessian_mc(
        self, loss_fn: nn.Module, output: Tensor, target: Tensor, mc_samples: int
    ) -> Tensor:
        probs = _class_probabilities(output)  # [N, C, D]
        batch, num_classes, positions = probs.shape
        flat = probs.transpose(1, 2).reshape(-1, num_classes)
        samples = torch.multinomial(flat, mc_samples, replacement=True).T  # [M, N D]
        one_hot = F.one_hot(samples, num_classes).to(probs.dtype)  # [M, N D, C]
        one_hot = one_hot.view(mc_samples, batch, positions, num_classes).transpose(2, 3)
        factor = math.sqrt(self.scale(loss_fn, output) / mc_samples)
        return (probs[None] - one_hot).mul_(factor).reshape(mc_samples, *output.shape)


def _class_probabilities(output: Tensor) -> Tensor:
    """``softmax`` over the classes of logits ``[N, C, *d]``, as ``[N, C, D]``."""
    return F.softmax(output.detach(), dim=1).reshape(*output.shape[:2], -1)


class EntrywiseLossDerivatives(LossDerivatives):
    """A loss summed over the entries of any output ``[N, *out]``, with targets of the same
    shape; ``"mean"`` averages over all entries: ``s = 1 / (N C)``."""

    def unsupported_reason(self, loss_fn: nn.Module, output: Tensor, target: Tensor) -> str | None:
        if target.shape != output.shape:
            return (
                f"targets of shape {list(target.shape)} do not match the output's shape "
                f"{list(output.shape)}; {type(loss_fn).__name__} would broadcast them"
            )
        return None

    def scale(self, loss_fn: nn.Module, output: Tensor) -> float:
        return 1.0 / output.numel() if loss_fn.reduction == "mean" else 1.0

    def hessian_diagonal(self, loss_fn: nn.Module, output: Tensor) -> Tensor:
        """The reduced loss's Hessian, diagonal: ``[N, *out]``."""
        raise NotImplementedError

    def sqrt_hessian_rows(self, loss_fn: nn.Module, output: Tensor, target: Tensor) -> Tensor:
        # rows are the last dimension: column c holds sqrt(h) at entry c of every row
        roots = self.hessian_diagonal(loss_fn, output).sqrt()
        if roots.dim() == 1:  # one entry per sample
            return roots[None]
        return torch.diag_embed(roots).movedim(-1, 0)


class BCEWithLogitsDerivatives(EntrywiseLossDerivatives):
    """``l_n = -sum_k [y log sigma(f_nk) + (1 - y) log(1 - sigma(f_nk))]`` on logits of any
    shape ``[N, *out]`` and targets in ``[0, 1]`` of the same shape.

    The Hessian is diagonal, ``sigma (1 - sigma)`` at each entry (whatever the target); its
    square root is one unit vector per output entry, scaled by ``sqrt(sigma (1 - sigma))``.
    Sampling ``y ~ Bernoulli(sigma)`` at every entry gives the unbiased factor ``sigma - y``.
    The ``"mean"`` reduction averages over all entries: ``s = 1 / (N C)``.
    """

    def unsupported_reason(self, loss_fn: nn.Module, output: Tensor, target: Tensor) -> str | None:
        if loss_fn.weight is not None or loss_fn.pos_weight is not None:
            return "weight= and pos_weight= are not supported; pass neither"
        return super().unsupported_reason(loss_fn, output, target)

    def hessian_diagonal(self, loss_fn: nn.Module, output: Tensor) -> Tensor:
        sigma = torch.sigmoid(output.detach())
        return sigma * (1 - sigma) * self.scale(loss_fn, output)

    def sqrt_hessian(self, loss_fn: nn.Module, output: Tensor, target: Tensor) -> Tensor:
        return diagonal_stack(self.hessian_diagonal(loss_fn, output))

    def sqrt_hessian_mc(
        self, loss_fn: nn.Module, output: Tensor, target: Tensor, mc_samples: int
    ) -> Tensor:
        sigma = torch.sigmoid(output.detach())
        samples = torch.bernoulli(sigma.expand(mc_samples, *sigma.shape))
        factor = math.sqrt(self.scale(loss_fn, output) / mc_samples)
        return (sigma - samples).mul_(factor)


class MSEDerivatives(EntrywiseLossDerivatives):
    """``l_n = ||f_n - y_n||^2`` on any output ``[N, *out]`` with C = prod(out) entries.

    Per sample the Hessian is ``2 I``, with square root ``sqrt(2) I`` (a stack of C unit
    vectors). Sampling ``eps ~ N(0, I)`` gives the unbiased factor ``sqrt(2) eps``.
    The ``"mean"`` reduction averages over all N * C entries: ``s = 1 / (N C)``.
    """

    def hessian_diagonal(self, loss_fn: nn.Module, output: Tensor) -> Tensor:
        return torch.full_like(output, 2 * self.scale(loss_fn, output))

    def sqrt_hessian(self, loss_fn: nn.Module, output: Tensor, target: Tensor) -> Tensor:
        batch, entries = output.shape[0], output[0].numel()
        factor = math.sqrt(2 * self.scale(loss_fn, output))
        eye = torch.eye(entries, dtype=output.dtype, device=output.device).mul_(factor)
        stack = eye[:, None, :].expand(entries, batch, entries).contiguous()  # fresh memory
        return stack.view(entries, *output.shape)

    def sqrt_hessian_mc(
        self, loss_fn: nn.Module, output: Tensor, target: Tensor, mc_samples: int
    ) -> Tensor:
        factor = math.sqrt(2 * self.scale(loss_fn, output) / mc_samples)
        noise = torch.randn(mc_samples, *output.shape, dtype=output.dtype, device=output.device)
        return noise.mul_(factor)
