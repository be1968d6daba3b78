"""Derivatives of the element-wise activations ``ReLU`` and ``Sigmoid``.

Both take their derivative from the output, which stays correct for in-place activations
(whose stored input the activation overwrites).
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvhooks.derivatives.base import ModuleDerivatives, ModuleIO


class ElementwiseDerivatives(ModuleDerivatives):
    """An activation applied entry by entry: its Jacobian is diagonal."""

    needs_output = True

    def derivative(self, output: Tensor) -> Tensor:
        """The activation's derivative at each entry, from its output ``[N, *]``."""
        raise NotImplementedError

    def second_derivative(self, output: Tensor) -> Tensor | None:
        """The second derivative at each entry, from the output; ``None`` if zero."""
        raise NotImplementedError

    def hessian_residual(self, io: ModuleIO, grad_output: Tensor) -> Tensor | None:
        second = self.second_derivative(io.output)
        return None if second is None else second * grad_output

    def jac_t_mat_prod(self, io: ModuleIO, mat: Tensor) -> Tensor:
        # Match the stack's memory layout (e.g. channels-last), so the product runs vectorised.
        derivative = torch.empty_like(mat[0]).copy_(self.derivative(io.output))
        return mat.mul_(derivative)


class ReLUDerivatives(ElementwiseDerivatives):
    """``relu'(x) = 1 if x > 0 else 0`` (0 at 0, as autograd)."""

    def derivative(self, output: Tensor) -> Tensor:
        return (output > 0).to(output.dtype)

    def second_derivative(self, output: Tensor) -> None:
        return None  # zero away from the kink, as autograd takes it


class SigmoidDerivatives(ElementwiseDerivatives):
    """``sigma'(x) = sigma (1 - sigma)``, ``sigma''(x) = sigma (1 - sigma) (1 - 2 sigma)``."""

    def derivative(self, output: Tensor) -> Tensor:
        return output * (1 - output)

    def second_derivative(self, output: Tensor) -> Tensor:
        return output * (1 - output) * (1 - 2 * output)
