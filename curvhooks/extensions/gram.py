"""A Kronecker factor kept as its root while that is thin.

A factor ``R^T R`` (``[n, n]``) from ``r`` rows costs ``r n^2`` to form and ``n^2`` per
vector to multiply; kept as ``R`` it costs ``2 r n`` per vector. ``curvhooks.kfac`` keeps a
factor as a :class:`Gram` while ``r <= n / 2`` (one batch of 128 samples gives a 784-wide
layer an input factor of rank 128) and forms it once more rows make that pay no longer.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Gram:
    """The symmetric positive semi-definite ``root^T root`` (``[n, n]``) of ``root``
    ``[r, n]``, never formed unless asked for. Its root is never written to in place."""

    def __init__(self, root: Tensor) -> None:
        self.root = root

    @staticmethod
    def of(root: Tensor, thin: bool = True) -> Tensor | Gram:
        """``root^T root``: a ``Gram`` if ``thin`` and ``r <= n / 2``, else formed."""
        if thin and 2 * root.shape[0] <= root.shape[1]:
            return Gram(root)
        return root.T @ root

    @staticmethod
    def copy(factor: Tensor | Gram) -> Tensor | Gram:
        """A factor that may be changed in place without changing ``factor``."""
        return Gram(factor.root) if isinstance(factor, Gram) else factor.clone()

    @property
    def shape(self) -> torch.Size:
        """``[n, n]``."""
        return torch.Size([self.root.shape[1]] * 2)

    def formed(self) -> Tensor:
        """``root^T root`` ``[n, n]``."""
        return self.root.T @ self.root

    def trace(self) -> Tensor:
        """``tr(root^T root)`` (0-dim)."""
        return self.root.square().sum()

    def diagonal(self) -> Tensor:
        """The diagonal ``[n]``."""
        return self.root.square().sum(0)

    def squared_norm(self) -> Tensor:
        """The squared Frobenius norm (0-dim), from the ``[r, r]`` Gram of the rows."""
        return (self.root @ self.root.T).square().sum()

    def __matmul__(self, mat: Tensor) -> Tensor:
        """``root^T (root @ mat)`` for ``mat`` ``[..., n, k]``."""
        return self.root.T @ (self.root @ mat)

    def div_(self, value: float) -> Gram:
        """Divide by ``value > 0`` (the root by its square root), rebinding the root."""
        self.root = self.root / value**0.5
        return self


def formed(factor: Tensor | Gram) -> Tensor:
    """The factor as an ``[n, n]`` tensor."""
    return factor.formed() if isinstance(factor, Gram) else factor


def weighted_sum(
    total: Tensor | Gram | None, part: Tensor | Gram, keep: float, add: float
) -> Tensor | Gram:
    """``keep * total + add * part`` (``add * part`` if ``total`` is None), for weights
    ``>= 0``: two roots are stacked while the result stays thin; otherwise the sum is formed,
    in place of a formed ``total`` (``total`` is the caller's to change; ``part`` changes only
    where ``total`` is None: it then becomes the total)."""
    if total is None and add == 1:
        return part
    if total is None:
        return Gram(part.root * add**0.5) if isinstance(part, Gram) else part.mul_(add)
    if isinstance(total, Gram) and isinstance(part, Gram):
        return Gram.of(torch.cat([total.root * keep**0.5, part.root * add**0.5]))
    if isinstance(total, Gram):  # not in place of part: it may be cached or shared
        return total.formed().mul_(keep).add_(part, alpha=add)
    if keep != 1:
        total.mul_(keep)
    return total.add_(formed(part), alpha=add)
