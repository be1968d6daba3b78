"""The GGN, the empirical Fisher and the Hessian of the whole-dataset loss as operators: each
product is one pass over the data, every column at once, and no ``[D, D]`` matrix is formed.

Per batch, with ``f`` the model's output as a function of the parameters and ``V`` the
columns split per parameter:

- GGN: ``J V`` by forward-mode products (the forward pass shared by all columns), the loss's
  Hessian as ``S S^T`` from its square root, then ``J^T`` by one batched reverse-mode
  product;
- empirical Fisher: ``J V`` as for the GGN, each sample's loss gradient ``r_n`` in its
  output, then ``J^T`` of ``r_n (r_n . J_n V) / s`` (s the batch's reduction factor);
- Hessian: reverse-over-reverse products of the loss's gradient, batched over the columns.

Columns are batched in chunks whose module outputs fit ``tuning.COLUMN_CHUNK_BYTES``.

Batches are weighted as the whole-dataset loss (``DatasetSum``), also across processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap

from curvhooks import tuning
from curvhooks._compat import math_attention
from curvhooks.dataset.by_hooks import batch_factors, hook_factor
from curvhooks.dataset.plan import Kind, model_device, selected_params, unwrap
from curvhooks.dataset.seeding import seeded
from curvhooks.dataset.weighting import DatasetSum, FirstBatchKept
from curvhooks.derivatives import loss_gradient
from curvhooks.errors import UnsupportedError
from curvhooks.extensions.base import check_mc_samples
from curvhooks.functional import parameters_replaced
from curvhooks.hooks import check_eval_mode
from curvhooks.hooks.calls import tensors_in
from curvhooks.hooks.plan import check_loss
from curvhooks.operators.base import CurvatureOperator

Data = Iterable | tuple[Any, Tensor]


class DataOperator(CurvatureOperator):
    """A curvature matrix of the whole-dataset loss ``L = s * sum_n l_n``; subclasses give
    the product of one batch's reduced loss (``_batch_product``).

    Args:
        model: Any model (eval mode where its output depends on the batch or on
            randomness); wrapped in ``DistributedDataParallel`` or not.
        loss_fn: The loss module, reduction ``"mean"`` or ``"sum"``.
        data: An iterable of ``(X, y)`` batches that can be iterated again (a list, a
            ``DataLoader``), or one ``(X, y)`` pair.
        params: The parameters (default: all that require grad); D is their total size.
        progress: Show a progress bar over the batches of each product.
        process_group: Under ``torch.distributed``, the processes whose data together form
            the data set (default: all, when initialised); each passes its own ``data``.
        batch_size_fn: The number of samples in a batch's ``X`` (default: ``y.shape[0]``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        data: Data,
        params: list[nn.Parameter] | None = None,
        *,
        progress: bool = False,
        process_group: object = None,
        batch_size_fn: Callable[[Any], int] | None = None,
    ) -> None:
        self.model = unwrap(model)
        check_eval_mode(self.model)
        self.loss_fn = loss_fn
        self.data = FirstBatchKept(data) if isinstance(data, Iterator) else data
        self.params = selected_params(self.model, params)
        self.progress = progress
        self.process_group = process_group
        self.batch_size_fn = batch_size_fn
        DatasetSum(loss_fn, process_group, batch_size_fn)  # checks the reduction

    def _matmat(self, columns: Tensor) -> Tensor:
        result = torch.zeros_like(columns)
        if not columns.shape[1]:
            return result
        total = DatasetSum(self.loss_fn, self.process_group, self.batch_size_fn)
        tangents = self._split(columns)
        batches = total.batches(self.data, model_device(self.model), self.progress)
        with math_attention(), torch.enable_grad():
            for index, (X, y, weight, _) in enumerate(batches):
                product = self._batch_product(index, X, y, tangents)
                result.add_(self._joined(product), alpha=weight)
        total.finish({"product": result})
        return result

    def _batch_product(
        self, index: int, X: Any, y: Tensor, tangents: tuple[Tensor, ...]
    ) -> tuple[Tensor, ...]:
        """The product of batch ``index``'s reduced loss's matrix with ``tangents`` (the
        columns per parameter ``[k, *p.shape]``), per parameter."""
        raise NotImplementedError

    def _split(self, columns: Tensor) -> tuple[Tensor, ...]:
        """``[D, k]`` as one ``[k, *p.shape]`` per parameter, less the directions autograd
        gives no gradient (an ``Embedding``'s ``padding_idx`` row: its reverse-mode Jacobian
        is zero there, its forward-mode one is not; the matrices are autograd's)."""
        pieces = columns.T.split([p.numel() for p in self.params], dim=1)
        tangents = [piece.reshape(len(piece), *p.shape) for piece, p in zip(pieces, self.params)]
        for index, row in self._padding_rows():
            tangents[index] = tangents[index].index_fill(1, torch.tensor([row]), 0)
        return tuple(tangents)

    def _padding_rows(self) -> list[tuple[int, int]]:
        """``(index into params, row)`` of each selected embedding weight's padding row."""
        index_of = {id(p): i for i, p in enumerate(self.params)}
        return [
            (index_of[id(module.weight)], module.padding_idx % module.num_embeddings)
            for module in self.model.modules()
            if isinstance(module, nn.Embedding)
            and module.padding_idx is not None
            and id(module.weight) in index_of
        ]

    def _joined(self, pieces: tuple[Tensor, ...]) -> Tensor:
        """Inverse of ``_split``: ``[D, k]``."""
        return torch.cat([piece.flatten(1) for piece in pieces], dim=1).T

    def _function(self, X: Any) -> Callable[..., Tensor]:
        """The model's output on ``X`` as a function of the parameters' values."""
        fixed = {id(p): p.detach() for p in self.model.parameters()}
        ids = [id(p) for p in self.params]

        def output(*values: Tensor) -> Tensor:
            with parameters_replaced(self.model, {**fixed, **dict(zip(ids, values))}):
                return self.model(X)

        return output

    def _point(self) -> tuple[Tensor, ...]:
        return tuple(p.detach() for p in self.params)

    def _output_products(
        self, X: Any, tangents: tuple[Tensor, ...]
    ) -> tuple[Tensor, Tensor, Callable[[Tensor], tuple[Tensor, ...]]]:
        """The output ``[N, *out]``, its forward-mode products with the tangents
        ``[k, N, *out]`` (``J V``), and the reverse-mode product of output vectors
        ``[k, N, *out]`` with the Jacobian (``J^T U``, per parameter ``[k, *p.shape]``)."""
        function, point = self._function(X), self._point()
        with _output_bytes(self.model) as counted:
            output, pullback = vjp(function, *point)
        chunk = _columns_per_chunk(counted[0], output.device)
        forward = _over_columns(lambda *tangent: jvp(function, point, tangent)[1], chunk)
        return output.detach(), forward(*tangents), _over_columns(pullback, chunk)


class GGNOperator(DataOperator):
    """The generalized Gauss-Newton ``sum_n J_n^T H_n J_n`` of the whole-dataset loss:
    ``curvhooks.ggn(...)`` as an operator (also ``mc_samples=`` sampled square roots of the
    loss Hessian, fixed per operator by ``seed=``). Arguments as ``DataOperator``'s;
    ``loss_fn`` a ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss``."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        data: Data,
        params: list[nn.Parameter] | None = None,
        *,
        mc_samples: int | None = None,
        seed: int = 0,
        progress: bool = False,
        process_group: object = None,
        batch_size_fn: Callable[[Any], int] | None = None,
    ) -> None:
        super().__init__(
            model,
            loss_fn,
            data,
            params,
            progress=progress,
            process_group=process_group,
            batch_size_fn=batch_size_fn,
        )
        if mc_samples is not None:
            check_mc_samples(mc_samples)
        self.mc_samples = mc_samples
        self.seed = seed
        self._factors: bool | None = None
        """Whether products go by the batches' factors (``None``: not yet estimated)."""

    def _matmat(self, columns: Tensor) -> Tensor:
        """By the batches' square-root factors from the hooks where that costs less
        (``tuning.FACTOR_PRODUCT_COLUMNS``, ``FACTOR_PRODUCT_BYTES``), else by forward- and
        reverse-mode products."""
        if columns.shape[1] >= tuning.FACTOR_PRODUCT_COLUMNS and self._factor_fits():
            try:
                return self._factor_matmat(columns)
            except UnsupportedError:  # a module the hooks do not serve
                self._factors = False
        return super()._matmat(columns)

    def _factor_fits(self) -> bool:
        """Whether the hooks may give a batch's factor within ``FACTOR_PRODUCT_BYTES``
        (estimated once from the first batch's output)."""
        if self._factors is None:
            total = DatasetSum(self.loss_fn, self.process_group, self.batch_size_fn)
            X, _, _, _ = next(total.batches(self.data, model_device(self.model), False))
            with torch.no_grad():
                output = self.model(X)
            rows = len(output) * (self.mc_samples or output[0].numel())
            size = sum(p.numel() for p in self.params) * self.params[0].element_size()
            self._factors = rows * size <= tuning.FACTOR_PRODUCT_BYTES
        return self._factors

    def _factor_matmat(self, columns: Tensor) -> Tensor:
        """``sum_b w_b F_b^T (F_b V)`` over the batches' square-root factors."""
        total = DatasetSum(self.loss_fn, self.process_group, self.batch_size_fn)
        result = torch.zeros_like(columns)
        factors = batch_factors(
            self.model,
            self.loss_fn,
            self.data,
            Kind.GGN,
            self.params,
            total,
            self.progress,
            self.mc_samples,
            self.seed,
        )
        sizes = [p.numel() for p in self.params]
        for blocks, weight in factors:
            parts = list(zip(blocks, columns.split(sizes), result.split(sizes)))
            projected = sum(block @ part for block, part, _ in parts)  # F V, [R, k]
            for block, _, out in parts:
                out.addmm_(block.T, projected, alpha=weight)
        total.finish({"product": result})
        return result

    def _batch_product(self, index, X, y, tangents):
        output, products, pullback = self._output_products(X, tangents)
        root = self._root(index, output, y)  # [C, N, *out]
        coefficients = torch.einsum("cn...,kn...->ckn", root, products)
        return pullback(torch.einsum("ckn,cn...->kn...", coefficients, root))

    def _root(self, index: int, output: Tensor, y: Tensor) -> Tensor:
        """A square root ``[C, N, *out]`` of the batch loss's Hessian in the output (sampled
        with the operator's seed and the batch's index)."""
        derivatives = check_loss(self.loss_fn, output, y, "curvhooks.GGNOperator")
        if self.mc_samples is None:
            return derivatives.sqrt_hessian(self.loss_fn, output, y)
        with seeded(self.seed + index, output.device):
            return derivatives.sqrt_hessian_mc(self.loss_fn, output, y, self.mc_samples)

    def to_dense(self) -> Tensor:
        if self.mc_samples is not None:
            return super().to_dense()
        from curvhooks.dataset.functions import ggn

        return ggn(self.model, self.loss_fn, self.data, **self._options())

    def diag(self) -> Tensor:
        if self.mc_samples is not None:
            return super().diag()
        from curvhooks.dataset.functions import ggn

        return ggn(self.model, self.loss_fn, self.data, structure="diag", **self._options())

    def exact_trace(self) -> Tensor | None:
        """The diagonal's sum (not for the Monte-Carlo GGN)."""
        return self.diag().sum() if self.mc_samples is None else None

    def factor(self, max_memory: int) -> Tensor | None:
        """The square-root factor ``F`` ``[R, D]`` with ``F^T F`` this matrix (``R = C N``
        rows, or ``M N`` with ``mc_samples=M``), from the hooks in one pass; ``None`` where
        it and its Gram matrix would take more than ``max_memory`` bytes, the hooks cannot
        give it, or under ``torch.distributed``."""
        return _factor(self, Kind.GGN, max_memory, self.mc_samples, self.seed)

    def _options(self) -> dict:
        return {
            "params": self.params,
            "progress": self.progress,
            "process_group": self.process_group,
            "batch_size_fn": self.batch_size_fn,
        }


class EmpiricalFisherOperator(DataOperator):
    """The empirical Fisher ``s * sum_n grad(l_n) grad(l_n)^T`` over the whole data set:
    ``curvhooks.empirical_fisher(...)`` as an operator. Arguments as ``DataOperator``'s;
    ``loss_fn`` a ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss`` (its reduction
    factor is needed)."""

    def _batch_product(self, index, X, y, tangents):
        output, products, pullback = self._output_products(X, tangents)
        derivatives = check_loss(self.loss_fn, output, y, "curvhooks.EmpiricalFisherOperator")
        gradient = loss_gradient(self.loss_fn, output, y)  # s r_n
        along = torch.einsum("n...,kn...->kn", gradient, products)
        scale = 1 / derivatives.scale(self.loss_fn, output)
        return pullback(torch.einsum("kn,n...->kn...", along, gradient) * scale)

    def exact_trace(self) -> Tensor:
        """The diagonal's sum."""
        return self.diag().sum()

    def factor(self, max_memory: int) -> Tensor | None:
        """The per-sample gradients ``G`` ``[N, D]`` scaled so that ``G^T G`` is this
        matrix; ``None`` as for ``GGNOperator.factor``."""
        return _factor(self, Kind.EMPIRICAL_FISHER, max_memory)

    def to_dense(self) -> Tensor:
        from curvhooks.dataset.functions import empirical_fisher

        return empirical_fisher(self.model, self.loss_fn, self.data, **GGNOperator._options(self))

    def diag(self) -> Tensor:
        from curvhooks.dataset.functions import empirical_fisher

        options = GGNOperator._options(self)
        return empirical_fisher(self.model, self.loss_fn, self.data, structure="diag", **options)


class HessianOperator(DataOperator):
    """The exact Hessian of the whole-dataset loss: ``curvhooks.hessian(...)`` as an
    operator, by reverse-over-reverse products batched over the columns. Any model and any
    scalar loss module. Arguments as ``DataOperator``'s.

    Where the data is one batch, the graph of the loss's gradient is kept between products
    (as long as the batch's tensors and the parameters' values stay the same): each product
    after the first is then one batched second backward pass."""

    _kept: tuple | None = None
    """``(X, y, the parameters' versions, the vectorised product)`` of a one-batch data set."""

    def _matmat(self, columns: Tensor) -> Tensor:
        self._batches = 0
        result = super()._matmat(columns)
        if self._batches > 1:
            self._kept = None  # graphs of several batches would hold too much memory
        return result

    def _batch_product(self, index, X, y, tangents):
        self._batches += 1
        versions = [p._version for p in self.params]
        kept = self._kept
        if not index and kept and kept[0] is X and kept[1] is y and kept[2] == versions:
            return kept[3](*tangents)
        function = self._function(X)

        def loss(*values: Tensor) -> Tensor:
            return self.loss_fn(function(*values), y)

        with _output_bytes(self.model) as counted:
            _, pullback = vjp(grad(loss, argnums=tuple(range(len(tangents)))), *self._point())
        chunk = _columns_per_chunk(counted[0], tangents[0].device)
        product = _over_columns(lambda *columns: pullback(columns), chunk)
        self._kept = (X, y, versions, product) if not index else None
        return product(*tangents)

    def to_dense(self) -> Tensor:
        from curvhooks.dataset.functions import hessian

        return hessian(self.model, self.loss_fn, self.data, **GGNOperator._options(self))

    def exact_trace(self) -> Tensor | None:
        """The diagonal's sum where ``DiagHessian`` serves the model, else ``None``."""
        try:
            return self.diag(route="hooks").sum()
        except UnsupportedError:
            return None

    def diag(self, route: str = "auto") -> Tensor:
        """The exact diagonal, by ``curvhooks.hessian(structure="diag", route=route)``:
        ``DiagHessian`` where it serves the model (``"hooks"`` raises where it does not),
        autograd otherwise."""
        from curvhooks.dataset.functions import hessian

        options = GGNOperator._options(self)
        return hessian(
            self.model, self.loss_fn, self.data, structure="diag", route=route, **options
        )


@contextmanager
def _output_bytes(model: nn.Module) -> Iterator[list[int]]:
    """``[bytes]``: the bytes of the tensors that the model's modules without children
    return while the block runs (what one vectorised column of a product carries)."""
    counted = [0]

    def count(module: nn.Module, inputs: Any, output: Any) -> None:
        counted[0] += sum(t.numel() * t.element_size() for t in tensors_in(output))

    leaves = [module for module in model.modules() if next(module.children(), None) is None]
    handles = [module.register_forward_hook(count) for module in leaves]
    try:
        yield counted
    finally:
        for handle in handles:
            handle.remove()


def _columns_per_chunk(column_bytes: int, device: torch.device) -> int:
    """Columns per vectorised product: as many as fit ``tuning.COLUMN_CHUNK_BYTES`` at
    ``column_bytes`` each, at least one."""
    budgets = tuning.COLUMN_CHUNK_BYTES
    return max(1, budgets.get(device.type, budgets["cpu"]) // max(1, column_bytes))


def _over_columns(function: Callable, chunk: int) -> Callable:
    """``function`` of tensors mapped over their leading dimension (the columns): by ``vmap``
    over ``chunk`` columns at a time, or column by column where ``chunk`` or the number of
    columns is 1 (``vmap``'s batching rules cost more than one column gains)."""

    def mapped(*columns: Tensor) -> Tensor | tuple[Tensor, ...]:
        count = len(columns[0])
        if chunk > 1 and count > 1:
            return vmap(function, chunk_size=chunk)(*columns)
        results = [function(*(column[i] for column in columns)) for i in range(count)]
        if isinstance(results[0], Tensor):
            return torch.stack(results)
        return tuple(torch.stack(parts) for parts in zip(*results))

    return mapped


def _factor(
    operator: DataOperator,
    kind: Kind,
    max_memory: int,
    mc_samples: int | None = None,
    seed: int = 0,
) -> Tensor | None:
    """``operator``'s square-root factor from the hooks (``by_hooks.hook_factor``), or
    ``None`` (see ``GGNOperator.factor``)."""
    total = DatasetSum(operator.loss_fn, operator.process_group, operator.batch_size_fn)
    if total.group is not None:
        return None
    try:
        return hook_factor(
            operator.model,
            operator.loss_fn,
            operator.data,
            kind,
            operator.params,
            total,
            operator.progress,
            max_memory,
            mc_samples,
            seed,
        )
    except UnsupportedError:  # a module the hooks do not serve
        return None
