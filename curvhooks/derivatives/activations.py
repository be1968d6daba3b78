"""Derivatives of the element-wise activations.

Each gives its first and second derivative at every entry, from the module's output where
that determines them (correct for in-place activations, whose stored input the activation
overwrites) and from its input otherwise (an in-place module's input is then kept as a copy
taken before it runs).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from curvhooks.derivatives.base import ModuleDerivatives, ModuleIO


class ElementwiseDerivatives(ModuleDerivatives):
    """An activation applied entry by entry: its Jacobian is diagonal."""

    def derivative(self, io: ModuleIO) -> Tensor:
        """The activation's derivative at each entry ``[N, *]``."""
        raise NotImplementedError

    has_curvature = True
    """``False`` where the second derivative is zero almost everywhere (piecewise linear:
    then no ``second_derivative`` is needed)."""

    def second_derivative(self, io: ModuleIO) -> Tensor:
        """The second derivative at each entry ``[N, *]``."""
        raise NotImplementedError

    def hessian_residual(self, io: ModuleIO, grad_output: Tensor) -> Tensor | None:
        return self.second_derivative(io) * grad_output if self.has_curvature else None

    def jacobian_diagonal(self, io: ModuleIO) -> Tensor:
        return self.derivative(io)


class FromOutput(ElementwiseDerivatives):
    """Derivatives that the output determines."""

    needs_output = True


class FromInput(ElementwiseDerivatives):
    """Derivatives taken from the input ``x``."""

    needs_input = True


class ReLUDerivatives(FromOutput):
    """``relu'(x) = 1 if x > 0 else 0`` (0 at 0, as autograd)."""

    has_curvature = False

    def derivative(self, io: ModuleIO) -> Tensor:
        return (io.output > 0).to(io.output.dtype)


class LeakyReLUDerivatives(FromInput):
    """``1`` for ``x > 0``, else ``negative_slope``; piecewise linear."""

    has_curvature = False

    def derivative(self, io: ModuleIO) -> Tensor:
        x = io.input
        return torch.full_like(x, io.module.negative_slope).masked_fill_(x > 0, 1.0)


class ELUDerivatives(FromOutput):
    """``y = x`` for ``x > 0``, else ``alpha (e^x - 1)``: ``y' = y'' = y + alpha`` there."""

    def _scale_alpha(self, module: nn.Module) -> tuple[float, float]:
        return 1.0, module.alpha

    def _negative_side(self, io: ModuleIO) -> Tensor:
        scale, alpha = self._scale_alpha(io.module)
        return io.output + scale * alpha

    def derivative(self, io: ModuleIO) -> Tensor:
        scale = self._scale_alpha(io.module)[0]
        return torch.where(io.output > 0, scale, self._negative_side(io))

    def second_derivative(self, io: ModuleIO) -> Tensor:
        return torch.where(io.output > 0, 0.0, self._negative_side(io))


class SELUDerivatives(ELUDerivatives):
    """``scale * elu(x, alpha)`` with PyTorch's fixed ``scale`` and ``alpha``."""

    SCALE = 1.0507009873554804934193349852946
    ALPHA = 1.6732632423543772848170429916717

    def _scale_alpha(self, module: nn.Module) -> tuple[float, float]:
        return self.SCALE, self.ALPHA


class SigmoidDerivatives(FromOutput):
    """``sigma'(x) = sigma (1 - sigma)``, ``sigma''(x) = sigma (1 - sigma) (1 - 2 sigma)``."""

    def derivative(self, io: ModuleIO) -> Tensor:
        return io.output * (1 - io.output)

    def second_derivative(self, io: ModuleIO) -> Tensor:
        return io.output * (1 - io.output) * (1 - 2 * io.output)


class TanhDerivatives(FromOutput):
    """``tanh' = 1 - y^2``, ``tanh'' = -2 y (1 - y^2)``."""

    def derivative(self, io: ModuleIO) -> Tensor:
        return 1 - io.output.square()

    def second_derivative(self, io: ModuleIO) -> Tensor:
        return -2 * io.output * (1 - io.output.square())


class LogSigmoidDerivatives(FromInput):
    """``y = log sigma(x)``: ``y' = sigma(-x)``, ``y'' = -sigma(x) sigma(-x)``."""

    def derivative(self, io: ModuleIO) -> Tensor:
        return torch.sigmoid(-io.input)

    def second_derivative(self, io: ModuleIO) -> Tensor:
        return -torch.sigmoid(io.input) * torch.sigmoid(-io.input)


class SoftplusDerivatives(FromInput):
    """``y = log(1 + e^(beta x)) / beta`` (``x`` where ``beta x > threshold``):
    ``y' = sigma(beta x)``, ``y'' = beta sigma(beta x) (1 - sigma(beta x))``."""

    def _linear(self, io: ModuleIO) -> Tensor:
        return io.input * io.module.beta > io.module.threshold

    def derivative(self, io: ModuleIO) -> Tensor:
        sigma = torch.sigmoid(io.module.beta * io.input)
        return torch.where(self._linear(io), 1.0, sigma)

    def second_derivative(self, io: ModuleIO) -> Tensor:
        sigma = torch.sigmoid(io.module.beta * io.input)
        return torch.where(self._linear(io), 0.0, io.module.beta * sigma * (1 - sigma))


class SiLUDerivatives(FromInput):
    """``y = x sigma(x)``: ``y' = sigma (1 + x (1 - sigma))``,
    ``y'' = sigma (1 - sigma) (2 + x (1 - 2 sigma))``."""

    def derivative(self, io: ModuleIO) -> Tensor:
        x = io.input
        sigma = torch.sigmoid(x)
        return sigma * (1 + x * (1 - sigma))

    def second_derivative(self, io: ModuleIO) -> Tensor:
        x = io.input
        sigma = torch.sigmoid(x)
        return sigma * (1 - sigma) * (2 + x * (1 - 2 * sigma))


class GELUDerivatives(FromInput):
    """``y = x Phi(x)`` (``approximate="none"``): ``y' = Phi + x phi``,
    ``y'' = phi (2 - x^2)``; with ``approximate="tanh"``, ``y = x (1 + tanh u) / 2`` with
    ``u = c (x + k x^3)``, ``c = sqrt(2 / pi)``, ``k = 0.044715``."""

    C, K = math.sqrt(2 / math.pi), 0.044715

    def derivative(self, io: ModuleIO) -> Tensor:
        x = io.input
        if io.module.approximate == "tanh":
            t, du = self._tanh_parts(x)
            return 0.5 * (1 + t) + 0.5 * x * (1 - t.square()) * du
        return _normal_cdf(x) + x * _normal_pdf(x)

    def second_derivative(self, io: ModuleIO) -> Tensor:
        x = io.input
        if io.module.approximate == "tanh":
            t, du = self._tanh_parts(x)
            ddu = self.C * 6 * self.K * x
            return (1 - t.square()) * (du - x * t * du.square() + 0.5 * x * ddu)
        return _normal_pdf(x) * (2 - x.square())

    def _tanh_parts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``tanh(u)`` and ``u'``."""
        t = torch.tanh(self.C * (x + self.K * x**3))
        return t, self.C * (1 + 3 * self.K * x.square())


def _normal_pdf(x: Tensor) -> Tensor:
    return torch.exp(-0.5 * x.square()) / math.sqrt(2 * math.pi)


def _normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))
