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
approximate the data set's. Parameters without Kronecker factors (norm layers and other
modules KFAC does not factor) get their exact blocks in ``kron``.

Inputs are tensors (laplace-torch's dict inputs of language models are refused).
Needs laplace-torch: ``pip install "curvhooks[laplace]"``.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor

import curvhooks

try:
    from laplace.curvature import CurvatureInterface, EFInterface, GGNInterface
    from laplace.utils import Kron
except ModuleNotFoundError as error:  # pragma: no cover - exercised without laplace-torch
    raise ModuleNotFoundError(
        "curvhooks.laplace needs laplace-torch: pip install 'curvhooks[laplace]' "
        "(or pip install laplace-torch)"
    ) from error

__all__ = ["CurvhooksEF", "CurvhooksGGN", "CurvhooksHessian", "CurvhooksInterface"]


class CurvhooksInterface(CurvatureInterface):
    """What the three backends share: Jacobians and per-sample gradients from the hooks, and
    one matrix per batch from a curvhooks dataset function."""

    def jacobians(self, x: Tensor, enable_backprop: bool = False) -> tuple[Tensor, Tensor]:
        """``(J [B, C, P], f [B, C])``: each sample's Jacobian of the model's output in the
        selected parameters (``P`` of them; the subnetwork's entries only, where given),
        differentiable in ``x`` with ``enable_backprop``."""
        jacobian, output = curvhooks.jacobians(
            self.model, _tensor(x), params=self.params, create_graph=enable_backprop
        )
        return self._subnetwork(jacobian), output

    def last_layer_jacobians(
        self, x: Tensor, enable_backprop: bool = False
    ) -> tuple[Tensor, Tensor]:
        """``(J [B, C, P], f [B, C])`` in the last layer's ``P`` parameters, from the
        features of the layer before (any last layer, not only ``Linear``)."""
        output, features = self.model.forward_with_features(_tensor(x))
        jacobian, _ = curvhooks.jacobians(
            self.model.last_layer, features, create_graph=enable_backprop
        )
        return jacobian, output if enable_backprop else output.detach()

    def gradients(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(G [B, P], loss)``: each sample's gradient of its loss (unscaled by
        ``factor``) and the batch's summed loss, from ``BatchGrad``; ``p.grad`` is left
        as it was."""
        with curvhooks.extend(self.model, self.lossfunc, curvhooks.BatchGrad(), params=self.params):
            loss = self.lossfunc(self.model(_tensor(x)), y)
            torch.autograd.grad(loss, self.params)
        rows = [param.grad_batch.flatten(start_dim=1) for param in self.params]
        for param in self.params:
            del param.grad_batch
        return self._subnetwork(torch.cat(rows, 1)), loss.detach()

    def full(self, x: Tensor, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """``(factor * loss, factor * H)`` with ``H`` ``[P, P]`` the batch's matrix."""
        if self.subnetwork_indices is not None:
            return self._subnetwork_full(x, y)
        matrix, loss = self._matrix(x, y, "full")
        return self.factor * loss, self.factor * matrix

    def diag(self, x: Tensor, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """``(factor * loss, factor * diag(H))``, the diagonal ``[P]``."""
        diagonal, loss = self._matrix(x, y, "diag")
        return self.factor * loss, self.factor * self._subnetwork(diagonal)

    def _matrix(self, x: Tensor, y: Tensor, structure: str) -> tuple[Tensor, Tensor]:
        """The batch's matrix (or diagonal) in the selected parameters, and its loss."""
        raise NotImplementedError

    def _subnetwork_full(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """``full`` for a subnetwork, never forming the ``[D, D]`` matrix."""
        return super().full(x, y)

    def _data(self, x: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]]:
        return [(_tensor(x), y)]

    def _subnetwork(self, values: Tensor) -> Tensor:
        """The subnetwork's entries of the last dimension (all where none is given)."""
        if self.subnetwork_indices is None:
            return values
        return values[..., self.subnetwork_indices]


class CurvhooksGGN(CurvhooksInterface, GGNInterface):
    """The GGN (``stochastic=True``: its Monte Carlo estimate from ``num_samples`` labels
    sampled from the model's predictive distribution per sample)."""

    def _matrix(self, x: Tensor, y: Tensor, structure: str) -> tuple[Tensor, Tensor]:
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

    def kron(self, x: Tensor, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Kron]:
        """``(factor * loss, factor * KFAC)``: exact type-2 KFAC, or with ``stochastic``
        KFAC from ``num_samples`` sampled labels."""
        fisher, samples = ("mc", self.num_samples) if self.stochastic else ("type-2", 1)
        return _kron(self, x, y, N, fisher=fisher, mc_samples=samples)


class CurvhooksEF(CurvhooksInterface, EFInterface):
    """The empirical Fisher: the per-sample gradients' outer products."""

    def _matrix(self, x: Tensor, y: Tensor, structure: str) -> tuple[Tensor, Tensor]:
        return curvhooks.empirical_fisher(
            self.model, self.lossfunc, self._data(x, y), self.params, structure, return_loss=True
        )

    def kron(self, x: Tensor, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Kron]:
        """``(factor * loss, factor * KFAC)`` of the empirical Fisher."""
        return _kron(self, x, y, N, fisher="empirical")


class CurvhooksHessian(CurvhooksInterface):
    """The exact Hessian of the summed loss (``full`` and ``diag``)."""

    def _matrix(self, x: Tensor, y: Tensor, structure: str) -> tuple[Tensor, Tensor]:
        return curvhooks.hessian(
            self.model, self.lossfunc, self._data(x, y), self.params, structure, return_loss=True
        )

    def _subnetwork_full(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The subnetwork's rows and columns, from Hessian-vector products with its unit
        vectors (``[D, k]``, no ``[D, D]`` matrix)."""
        operator = curvhooks.HessianOperator(
            self.model, self.lossfunc, self._data(x, y), params=self.params
        )
        indices = self.subnetwork_indices.to(operator.device)
        units = torch.zeros(operator.shape[0], len(indices), dtype=operator.dtype)
        units = units.to(operator.device)
        units[indices, torch.arange(len(indices), device=operator.device)] = 1
        block = (operator @ units)[indices]
        with torch.no_grad():
            loss = self.lossfunc(self.model(_tensor(x)), y)
        return self.factor * loss, self.factor * block

    def kron(self, x: Tensor, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Kron]:
        raise NotImplementedError(
            "CurvhooksHessian has no Kronecker structure; use CurvhooksGGN or CurvhooksEF "
            "for hessian_structure='kron'"
        )


def _kron(
    backend: CurvhooksInterface, x: Tensor, y: Tensor, N: int, **options: Any
) -> tuple[Tensor, Kron]:
    """One batch's KFAC as laplace-torch's ``Kron``, blocks in the order of
    ``backend.params``: ``[B, A * M / N]`` per weight (``M`` the batch's size), ``[B]`` per
    bias, the exact dense block for parameters without Kronecker factors; all times
    ``backend.factor``."""
    if backend.subnetwork_indices is not None:
        raise ValueError("laplace-torch's Kron has no subnetwork form; use 'full' or 'diag'")
    data = backend._data(x, y)
    operator = curvhooks.kfac(
        backend.model, backend.lossfunc, data, params=backend.params, others="dense", **options
    )
    named = dict(zip(map(id, operator.params), operator.names))
    factors, others = operator.factors, operator.others
    blocks = []
    for param in backend.params:
        name = named[id(param)]
        if name in others:
            blocks.append([others[name]])
        else:
            blocks.append(_laplace_factors(factors[name], len(y) / N))
    with torch.no_grad():
        loss = backend.lossfunc(backend.model(data[0][0]), y)
    return backend.factor * loss, Kron(blocks) * backend.factor


def _laplace_factors(factors: tuple[Tensor, ...], input_scale: float) -> list[Tensor]:
    """``(B, A)`` as ``[B, A * input_scale]`` (one ``[1, 1]`` block for a ``[1, 1]`` weight,
    the form laplace-torch's curvlinops backend gives it), ``(B,)`` as ``[B]``."""
    if len(factors) == 1:
        return [factors[0]]
    output, inputs = factors
    if output.numel() == inputs.numel() == 1:
        return [output * inputs * input_scale]
    return [output, inputs * input_scale]


def _tensor(x: Tensor | MutableMapping) -> Tensor:
    if isinstance(x, MutableMapping):
        raise ValueError(
            "the curvhooks backends take tensor inputs, not dicts; use laplace-torch's "
            "CurvlinopsGGN for models that take dicts of tensors"
        )
    return x
