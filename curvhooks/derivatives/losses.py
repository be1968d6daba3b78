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

SUPPORTED_REDUCTIONS = ("mean", "sum")


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


class CrossEntropyDerivatives(LossDerivatives):
    """``l_n = -log softmax(f_n)[y_n]`` on logits ``[N, C]`` and class indices ``[N]``.

    Per sample the Hessian is ``diag(p) - p p^T`` with ``p = softmax(f_n)``; its square root
    has columns ``sqrt(p_c) (e_c - p)``. Sampling ``y ~ Categorical(p)`` gives the unbiased
    factor ``p - e_y``. The ``"mean"`` reduction has ``s = 1 / N``.
    """

    def unsupported_reason(self, loss_fn: nn.Module, output: Tensor, target: Tensor) -> str | None:
        if loss_fn.weight is not None:
            return "class weights (weight=...) are not supported; pass weight=None"
        if loss_fn.label_smoothing != 0:
            return "label_smoothing is not supported; use label_smoothing=0.0"
        if output.dim() != 2:
            return f"logits must have shape [N, C], got {list(output.shape)}; flatten them first"
        if target.dtype.is_floating_point or target.shape != output.shape[:1]:
            return (
                "targets must be class indices of shape [N]; class probabilities are not "
                f"supported (got targets of shape {list(target.shape)} and dtype {target.dtype})"
            )
        if bool((target == loss_fn.ignore_index).any()):
            return f"targets equal to ignore_index={loss_fn.ignore_index} are not supported"
        return None

    def scale(self, loss_fn: nn.Module, output: Tensor) -> float:
        return 1.0 / output.shape[0] if loss_fn.reduction == "mean" else 1.0

    def sqrt_hessian(self, loss_fn: nn.Module, output: Tensor, target: Tensor) -> Tensor:
        probs = F.softmax(output.detach(), dim=1)
        num_classes = probs.shape[1]
        eye = torch.eye(num_classes, dtype=probs.dtype, device=probs.device)
        columns = eye[:, None, :] - probs[None]  # [C, N, C]: e_c - p_n
        sqrt_probs = probs.sqrt().T[:, :, None]  # [C, N, 1]
        return columns.mul_(sqrt_probs * math.sqrt(self.scale(loss_fn, output)))

    def sqrt_hessian_mc(
        self, loss_fn: nn.Module, output: Tensor, target: Tensor, mc_samples: int
    ) -> Tensor:
        probs = F.softmax(output.detach(), dim=1)
        samples = torch.multinomial(probs, mc_samples, replacement=True).T  # [M, N]
        one_hot = F.one_hot(samples, probs.shape[1]).to(probs.dtype)
        factor = math.sqrt(self.scale(loss_fn, output) / mc_samples)
        return (probs[None] - one_hot).mul_(factor)


class MSEDerivatives(LossDerivatives):
    """``l_n = ||f_n - y_n||^2`` on any output ``[N, *out]`` with C = prod(out) entries.

    Per sample the Hessian is ``2 I``, with square root ``sqrt(2) I`` (a stack of C unit
    vectors). Sampling ``eps ~ N(0, I)`` gives the unbiased factor ``sqrt(2) eps``.
    The ``"mean"`` reduction averages over all N * C entries: ``s = 1 / (N C)``.
    """

    def unsupported_reason(self, loss_fn: nn.Module, output: Tensor, target: Tensor) -> str | None:
        if target.shape != output.shape:
            return (
                f"targets of shape {list(target.shape)} do not match the output's shape "
                f"{list(output.shape)}; MSELoss would broadcast them"
            )
        return None

    def scale(self, loss_fn: nn.Module, output: Tensor) -> float:
        return 1.0 / output.numel() if loss_fn.reduction == "mean" else 1.0

    def sqrt_hessian(self, loss_fn: nn.Module, output: Tensor, target: Tensor) -> Tensor:
        batch, entries = output.shape[0], output[0].numel()
        factor = math.sqrt(2 * self.scale(loss_fn, output))
        eye = torch.eye(entries, dtype=output.dtype, device=output.device).mul_(factor)
        return eye[:, None, :].expand(entries, batch, entries).reshape(entries, *output.shape)

    def sqrt_hessian_mc(
        self, loss_fn: nn.Module, output: Tensor, target: Tensor, mc_samples: int
    ) -> Tensor:
        factor = math.sqrt(2 * self.scale(loss_fn, output) / mc_samples)
        noise = torch.randn(mc_samples, *output.shape, dtype=output.dtype, device=output.device)
        return noise.mul_(factor)
