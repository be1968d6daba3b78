"""curvhooks as a curvature backend of laplace-torch: ``Laplace(..., backend=CurvhooksGGN)``.

Three backends, ``CurvhooksGGN`` (the GGN, or with ``stochastic=True`` its Monte Carlo
estimate from ``num_samples`` sampled labels), ``CurvhooksEF`` (the empirical Fisher) and
``CurvhooksHessian`` (the exact Hessian), each for laplace-torch's structures ``full``,
``kron`` (not the Hessian) and ``diag``, its ``jacobians``, ``last_layer_jacobians`` and
``gradients``. Each batch's curvature comes from curvhooks' hooks in one backward pass
(``curvhooks.ggn``, ``empirical_fisher``, ``hessian``, ``kfac``, ``jacobians``).

Scaling is laplace-torch's: the sum of the per-sample losses, times its ``factor`` (1/2 for
regression's ``MSELoss``, 1 for classification's ``CrossEntropyLoss``); ``kron`` scales the
input factors ``A`` of each batch of ``M`` samples by ``M / N``, so that the batches' sums
approximate the data set's. 1-D parameters without Kronecker factors (norm layers' weights
and biases) get their exact blocks in ``kron``; laplace-torch's ``Kron`` takes parameters of
more dimensions only as two factors, so others (an ``Embedding``'s weight) are refused there.

Inputs are tensors (laplace-torch's dict inputs of language models are refused).
Needs laplace-torch 0.3; it asks for torchvision, which would pull another torch, so install
it without dependencies as the how-to "Laplace approximations" says.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor

import curvhooks
from curvhooks.dataset.blocks import rows_or_zeros

try:
    from laplace.curvature import CurvatureInterface, EFInterface, GGNInterface
    from laplace.utils import Kron
except ModuleNotFoundError as error:  # pragma: no cover - exercised without laplace-torch
    raise ModuleNotFoundError(
        "curvhooks.laplace needs laplace-torch 0.3: pip install --no-deps laplace-torch==0.3 "
        "asdfghjkl==0.1a4 backpack-for-pytorch curvlinops-for-pytorch torchmetrics "
        "lightning-utilities, then pip install einops unfoldNd einconv linear_operator "
        "opt-einsum scipy tqdm packaging"
    ) from error

__all__ = ["CurvhooksEF", "CurvhooksGGN", "CurvhooksHessian", "CurvhooksInterface"]

Input = Tensor | MutableMapping
"""A batch's input as laplace-torch passes it; the curvhooks backends take tensors only."""


class CurvhooksInterface(CurvatureInterface):
    """What the three backends share: Jacobians and per-sample gradients from the hooks, and
    one matrix per batch from a curvhooks dataset function."""

    def jacobians(self, x: Input, enable_backprop: bool = False) -> tuple[Tensor, Tensor]:
        """``(J [B, C, P], f [B, C])``: each sample's Jacobian of the model's output in the
        selected parameters (``P`` of them; the subnetwork's entries only, where given),
        differentiable in ``x`` with ``enable_backprop``."""
        jacobian, output = curvhooks.jacobians(
            self.model, _tensor(x), params=self.params, create_graph=enable_backprop
        )
        return self._subnetwork(jacobian), output

    def last_layer_jacobians(
        self, x: Input, enable_backprop: bool = False
    ) -> tuple[Tensor, Tensor]:
        """``(J [B, C, P], f [B, C])`` in the last layer's ``P`` parameters, from the
        features of the layer before (any last layer, not only ``Linear``)."""
        with torch.set_grad_enabled(enable_backprop):
            output, features = self.model.forward_with_features(_tensor(x))
        jacobian, _ = curvhooks.jacobians(
            self.model.last_layer, features, create_graph=enable_backprop
        )
        return jacobian, output

    def gradients(self, x: Input, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(G [B, P], loss)``: each sample's gradient of its loss (unscaled by
        ``factor``; zeros for parameters that do not reach the loss) and the batch's summed
        loss, from ``BatchGrad``; ``p.grad`` is left as it was."""
        inputs = _tensor(x)
        with curvhooks.extend(self.model, self.lossfunc, curvhooks.BatchGrad(), params=self.params):
            loss = self.lossfunc(self.model(inputs), y)
            torch.autograd.grad(loss, self.params, allow_unused=True)
        found = [vars(param).pop("grad_batch", None) for param in self.params]
        rows = [rows_or_zeros(g, p, len(inputs)) for g, p in zip(found, self.params)]
        return self._subnetwork(torch.cat(rows, 1)), loss.detach()

    def full(self, x: Input, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """``(factor * loss, factor * H)`` with ``H`` ``[P, P]`` the batch's matrix."""
        if self.subnetwork_indices is not None:
            return self._subnetwork_full(x, y)
        matrix, loss = self._matrix(x, y, "full")
        return self.factor * loss, self.factor * matrix

    def diag(self, x: Input, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """``(factor * loss, factor * diag(H))``, the diagonal ``[P]``."""
        diagonal, loss = self._matrix(x, y, "diag")
        return self.factor * loss, self.factor * self._subnetwork(diagonal)

    def _matrix(self, x: Input, y: Tensor, structure: str) -> tuple[Tensor, Tensor]:
        """The batch's matrix (or diagonal) in the selected parameters, and its loss."""
        raise NotImplementedError

    def _subnetwork_full(self, x: Input, y: Tensor) -> tuple[Tensor, Tensor]:
        """``full`` for a subnetwork, never forming the ``[D, D]`` matrix: laplace-torch's
        ``GGNInterface.full`` or ``EFInterface.full`` (next in the subclasses' method
        resolution order), from this class's Jacobians or per-sample gradients."""
        return super().full(x, y)

    def _data(self, x: Input, y: Tensor) -> list[tuple[Tensor, Tensor]]:
        """The batch as a one-batch data set of curvhooks' dataset functions."""
        return [(_tensor(x), y)]

    def _kron(self, x: Input, y: Tensor, N: int, **options: Any) -> tuple[Tensor, Kron]:
        """One batch's ``curvhooks.kfac(..., **options)`` as laplace-torch's ``Kron``, blocks
        in the order of ``self.params``: ``[B, A * M / N]`` per weight (``M`` the batch's
        size), ``[B]`` per bias, the exact dense block for other 1-D parameters; all times
        ``self.factor``."""
        if self.subnetwork_indices is not None:
            raise ValueError("laplace-torch's Kron has no subnetwork form; use 'full' or 'diag'")
        operator, loss = curvhooks.kfac(
            self.model,
            self.lossfunc,
            self._data(x, y),
            params=self.params,
            others="dense",
            return_loss=True,
            **options,
        )
        named = dict(zip(map(id, operator.params), operator.names))
        blocks = [self._kron_block(operator, named[id(p)], p, len(y) / N) for p in self.params]
        return self.factor * loss, Kron(blocks) * self.factor

    @staticmethod
    def _kron_block(
        operator: curvhooks.Kronecker, name: str, param: Tensor, input_scale: float
    ) -> list[Tensor]:
        """A parameter's block of ``Kron``: ``(B, A)`` as ``[B, A * input_scale]``, ``(B,)``
        as ``[B]``, an exact block ``[n, n]`` as itself (1-D parameters only)."""
        if name in operator.others:
            if param.dim() > 1:
                raise ValueError(
                    f"laplace-torch's Kron takes {name!r} {list(param.shape)} only as two "
                    "Kronecker factors, and its module has none; use hessian_structure='full' "
                    "or 'diag'"
                )
            return [operator.others[name]]
        factors = operator.factors[name]
        if len(factors) == 1:
            return [factors[0]]
        output, inputs = factors
        return [output, inputs * input_scale]

    def _subnetwork(self, values: Tensor) -> Tensor:
        """The subnetwork's entries of the last dimension (all where none is given)."""
        if self.subnetwork_indices is None:
            return values
        return values[..., self.subnetwork_indices]


class CurvhooksGGN(CurvhooksInterface, GGNInterface):
    """The GGN (``stochastic=True``: its Monte Carlo estimate from ``num_samples`` labels
    sampled from the model's predictive distribution per sample)."""

    def _matrix(self, x: Input, y: Tensor, structure: str) -> tuple[Tensor, Tensor]:
        samples = self.num_samples if self.stochastic else None
        return curvhooks.ggn(
            self.model,
            self.lossfunc,
            self._data(x, y),
            self.params,
            structure,
            mc_samples=samples,
            return_loss=True,
        )

    def kron(self, x: Input, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Kron]:
        """``(factor * loss, factor * KFAC)``: exact type-2 KFAC, or with ``stochastic``
        KFAC from ``num_samples`` sampled labels."""
        fisher, samples = ("mc", self.num_samples) if self.stochastic else ("type-2", 1)
        return self._kron(x, y, N, fisher=fisher, mc_samples=samples)


class CurvhooksEF(CurvhooksInterface, EFInterface):
    """The empirical Fisher: the per-sample gradients' outer products."""

    def _matrix(self, x: Input, y: Tensor, structure: str) -> tuple[Tensor, Tensor]:
        return curvhooks.empirical_fisher(
            self.model, self.lossfunc, self._data(x, y), self.params, structure, return_loss=True
        )

    def kron(self, x: Input, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Kron]:
        """``(factor * loss, factor * KFAC)`` of the empirical Fisher."""
        return self._kron(x, y, N, fisher="empirical")


class CurvhooksHessian(CurvhooksInterface):
    """The exact Hessian of the summed loss (``full`` and ``diag``)."""

    def _matrix(self, x: Input, y: Tensor, structure: str) -> tuple[Tensor, Tensor]:
        return curvhooks.hessian(
            self.model, self.lossfunc, self._data(x, y), self.params, structure, return_loss=True
        )

    def _subnetwork_full(self, x: Input, y: Tensor) -> tuple[Tensor, Tensor]:
        """The subnetwork's rows and columns, from Hessian-vector products with its unit
        vectors (``[D, k]``, no ``[D, D]`` matrix)."""
        operator = curvhooks.HessianOperator(
            self.model, self.lossfunc, self._data(x, y), params=self.params
        )
        device = operator.device
        indices = self.subnetwork_indices.to(device)
        units = torch.zeros(operator.shape[0], len(indices), dtype=operator.dtype, device=device)
        units[indices, torch.arange(len(indices), device=device)] = 1
        block = (operator @ units)[indices]
        with torch.no_grad():
            loss = self.lossfunc(self.model(_tensor(x)), y)
        return self.factor * loss, self.factor * block

    def kron(self, x: Input, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Kron]:
        raise NotImplementedError(
            "CurvhooksHessian has no Kronecker structure; use CurvhooksGGN or CurvhooksEF "
            "for hessian_structure='kron'"
        )


def _tensor(x: Input) -> Tensor:
    if isinstance(x, MutableMapping):
        raise ValueError(
            "the curvhooks backends take tensor inputs, not dicts; use laplace-torch's "
            "CurvlinopsGGN for models that take dicts of tensors"
        )
    return x
