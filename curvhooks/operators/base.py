"""``CurvatureOperator``: a symmetric ``[D, D]`` matrix over a model's flattened, concatenated
parameters that is applied, never formed; sums, scalings and damping of operators, and the
conjugate-gradient inverse."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class CurvatureOperator:
    """A symmetric ``[D, D]`` operator; subclasses implement ``_matmat``.

    Rows and columns follow ``params``, flattened and concatenated in order. Operators
    compose: ``a * op``, ``op1 + op2``, ``op.damped(damping)``.
    """

    params: list[nn.Parameter]

    def _matmat(self, columns: Tensor) -> Tensor:
        """The product with ``columns`` ``[D, k]`` (contiguous, of the operator's dtype and
        device): ``[D, k]``, a fresh tensor that the caller may overwrite."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int]:
        """``(D, D)``, D the number of parameter entries."""
        size = sum(param.numel() for param in self.params)
        return size, size

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def __matmul__(self, v: Tensor) -> Tensor:
        """Multiply by ``v``.

        Args:
            v: ``[D]`` or ``[D, k]``, rows following the flattened, concatenated
                parameters, of the operator's dtype and on its device.

        Returns:
            The product, shaped like ``v``.

        Raises:
            ValueError: If ``v`` is not ``[D]`` or ``[D, k]``, or of another dtype or
                device.
        """
        size = self.shape[0]
        if not isinstance(v, Tensor) or v.dim() not in (1, 2) or v.shape[0] != size:
            shape = list(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"expected a vector [{size}] or a matrix [{size}, k], got {shape}")
        if v.dtype != self.dtype or v.device != self.device:
            raise ValueError(
                f"expected a tensor of dtype {self.dtype} on {self.device} (the operator's), "
                f"got {v.dtype} on {v.device}; convert it with "
                ".to(device=op.device, dtype=op.dtype)"
            )
        return self._matmat(v.reshape(size, -1).contiguous()).reshape(v.shape)

    def to_dense(self) -> Tensor:
        """The ``[D, D]`` matrix, by products with the identity in chunks of columns."""
        size = self.shape[0]
        eye = torch.eye(size, dtype=self.dtype, device=self.device)
        return torch.cat([self._matmat(chunk) for chunk in eye.split(256, dim=1)], dim=1)

    def diag(self) -> Tensor:
        """The diagonal ``[D]`` (from ``to_dense`` unless a subclass knows better)."""
        return self.to_dense().diagonal().clone()

    def exact_trace(self) -> Tensor | None:
        """The trace where it is had exactly without forming the matrix, else ``None``."""
        return None

    def factor(self, max_memory: int) -> Tensor | None:
        """A square-root factor ``F`` ``[R, D]`` with ``F^T F`` this matrix, where one is had
        within ``max_memory`` bytes (with its Gram matrix ``F F^T``), else ``None``."""
        return None

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` of this operator (in float64 on the CPU
        for scipy's routines; products go through the operator's dtype and device)."""
        try:
            from scipy.sparse.linalg import LinearOperator
        except ImportError as error:
            raise ImportError("to_scipy needs scipy: pip install scipy") from error
        import numpy as np

        def matmat(x: np.ndarray) -> np.ndarray:
            columns = torch.as_tensor(np.asarray(x).reshape(self.shape[0], -1))
            product = self @ columns.to(device=self.device, dtype=self.dtype)
            return product.detach().cpu().double().numpy()

        return LinearOperator(
            self.shape,
            matvec=matmat,
            matmat=matmat,
            rmatvec=matmat,
            rmatmat=matmat,
            dtype=np.float64,
        )

    def __add__(self, other: CurvatureOperator) -> CurvatureOperator:
        if not isinstance(other, CurvatureOperator):
            return NotImplemented
        return Sum(self, other)

    def __mul__(self, scale: float) -> CurvatureOperator:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            return NotImplemented
        return Scaled(self, float(scale))

    __rmul__ = __mul__

    def damped(self, damping: float) -> CurvatureOperator:
        """``self + damping * I``."""
        return Sum(self, Scaled(Identity(self.params), float(damping)))

    def inverse(
        self,
        damping: float = 0.0,
        method: str = "cg",
        tolerance: float = 1e-6,
        max_iterations: int | None = None,
    ) -> CurvatureOperator:
        """``(self + damping I)^{-1}``, applied by conjugate gradients.

        Each product solves ``(self + damping I) x = v`` for every column of ``v`` at once,
        to a residual ``||(self + damping I) x - v|| <= tolerance * ||v||`` per column, within
        ``max_iterations`` (default D) steps, each one product with ``self`` (one pass over
        the data for the dataset operators). The matrix must be positive definite once
        damped.

        Raises:
            ValueError: For another ``method``, or ``damping < 0``.
        """
        if method != "cg":
            raise ValueError(f"method must be 'cg', got {method!r}")
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        damped = self.damped(damping) if damping else self
        return ConjugateGradientInverse(damped, tolerance, max_iterations)

    def __repr__(self) -> str:
        size = self.shape[0]
        return f"{type(self).__name__}(D={size}, dtype={self.dtype}, device={self.device})"


class Sum(CurvatureOperator):
    """``first + second``, over the same parameters."""

    def __init__(self, first: CurvatureOperator, second: CurvatureOperator) -> None:
        if first.shape != second.shape:
            raise ValueError(f"cannot add operators of shapes {first.shape} and {second.shape}")
        self.first, self.second = first, second
        self.params = first.params

    def _matmat(self, columns: Tensor) -> Tensor:
        return self.first._matmat(columns).add_(self.second._matmat(columns))

    def diag(self) -> Tensor:
        return self.first.diag() + self.second.diag()

    def exact_trace(self) -> Tensor | None:
        parts = [self.first.exact_trace(), self.second.exact_trace()]
        return None if None in parts else parts[0] + parts[1]

    def __repr__(self) -> str:
        return f"({self.first!r} + {self.second!r})"


class Scaled(CurvatureOperator):
    """``scale * operator``."""

    def __init__(self, operator: CurvatureOperator, scale: float) -> None:
        self.operator, self.scale = operator, scale
        self.params = operator.params

    def _matmat(self, columns: Tensor) -> Tensor:
        return self.operator._matmat(columns).mul_(self.scale)

    def diag(self) -> Tensor:
        return self.operator.diag() * self.scale

    def exact_trace(self) -> Tensor | None:
        inner = self.operator.exact_trace()
        return None if inner is None else inner * self.scale

    def __repr__(self) -> str:
        return f"{self.scale:g} * {self.operator!r}"


class Identity(CurvatureOperator):
    """The identity over ``params``."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params

    def _matmat(self, columns: Tensor) -> Tensor:
        return columns.clone()

    def diag(self) -> Tensor:
        return torch.ones(self.shape[0], dtype=self.dtype, device=self.device)

    def exact_trace(self) -> Tensor:
        return torch.tensor(float(self.shape[0]), dtype=self.dtype, device=self.device)

    def __repr__(self) -> str:
        return f"I(D={self.shape[0]})"


class ConjugateGradientInverse(CurvatureOperator):
    """``operator^{-1}`` by conjugate gradients, all columns at once (see
    ``CurvatureOperator.inverse``)."""

    def __init__(
        self, operator: CurvatureOperator, tolerance: float, max_iterations: int | None
    ) -> None:
        self.operator, self.tolerance = operator, tolerance
        self.max_iterations = max_iterations or operator.shape[0]
        self.params = operator.params

    def _matmat(self, columns: Tensor) -> Tensor:
        return conjugate_gradients(
            self.operator._matmat, columns, self.tolerance, self.max_iterations
        )

    def __repr__(self) -> str:
        return f"inverse({self.operator!r}, cg, tolerance={self.tolerance:g})"


def conjugate_gradients(
    apply: Callable[[Tensor], Tensor], rhs: Tensor, tolerance: float, max_iterations: int
) -> Tensor:
    """Solve ``A x = rhs`` for ``rhs`` ``[D, k]`` column by column at once, ``A`` symmetric
    positive definite given by ``apply``; stop once every column's residual is at most
    ``tolerance`` times its right-hand side's norm. Raises ``RuntimeError`` if that takes more
    than ``max_iterations`` products."""
    solution = torch.zeros_like(rhs)
    residual = rhs.clone()
    direction = residual.clone()
    squared = residual.square().sum(0)
    goal = (tolerance * rhs.norm(dim=0)).square()
    for _ in range(max_iterations):
        if bool((squared <= goal).all()):
            return solution
        product = apply(direction)
        curvature = (direction * product).sum(0)
        step = torch.where(squared > goal, squared / curvature, torch.zeros_like(squared))
        solution.addcmul_(direction, step)
        residual.addcmul_(product, step, value=-1)
        new_squared = residual.square().sum(0)
        direction.mul_(new_squared / squared.clamp(min=torch.finfo(rhs.dtype).tiny)).add_(residual)
        squared = new_squared
    if bool((squared <= goal).all()):
        return solution
    worst = (squared.sqrt() / rhs.norm(dim=0).clamp(min=torch.finfo(rhs.dtype).tiny)).max()
    raise RuntimeError(
        f"conjugate gradients did not reach the relative residual {tolerance:g} within "
        f"{max_iterations} products (reached {float(worst):.2e}); raise max_iterations or "
        "damping, or loosen tolerance"
    )
