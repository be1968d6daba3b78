"""The hooks route: dataset matrices from what the hooks propagate.

One backward pass per batch yields the square-root GGN factor ``V`` ``[C * N_b, D]`` and the
per-sample gradients ``G`` ``[N_b, D]`` of the batch's reduced loss; the matrices accumulate
``V^T V`` and ``G^T G`` block by block into one preallocated result. The same pass can yield
the exact Hessian's per-parameter blocks or diagonal (``HessianBlock``, ``DiagHessian``).
On a chain of supported modules the hooks run that backward pass themselves
(``ChainBackward``); on any other graph autograd's backward pass feeds them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import closing

import torch
from torch import Tensor, nn

from curvhooks.dataset.blocks import accumulate, mirror_upper_panels, rows_or_zeros
from curvhooks.dataset.plan import Kind, Layout, Route, Structure, model_device
from curvhooks.dataset.seeding import seeded
from curvhooks.dataset.weighting import DatasetSum
from curvhooks.derivatives import LOSS_DERIVATIVES, loss_derivatives, supported_names
from curvhooks.errors import UnsupportedError
from curvhooks.extensions import (
    BatchGrad,
    DiagGGN,
    DiagHessian,
    Extension,
    HessianBlock,
    SqrtGGN,
    SumGradSquared,
)
from curvhooks.hooks import BatchResults, hooked

FACTORS: dict[Kind, tuple[type[Extension], type[Extension]]] = {
    Kind.GGN: (DiagGGN, SqrtGGN),
    Kind.EMPIRICAL_FISHER: (SumGradSquared, BatchGrad),
}
"""Per kind, the extension for ``DIAG`` and the one whose factor F gives F^T F."""
BLOCKS = {Kind.HESSIAN: (DiagHessian, HessianBlock)}
"""Per kind, the extension for ``DIAG`` and the one giving per-parameter blocks."""
HESSIAN_STRUCTURES = (Structure.PARAM, Structure.DIAG)
"""The Hessian structures the hooks give."""


@torch.enable_grad()  # also inside a caller's torch.no_grad() block
def hook_matrices(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Iterable | tuple[Tensor, Tensor],
    kinds: tuple[Kind, ...],
    plan: Layout,
    total: DatasetSum,
    route: Route,
    progress: bool,
    mc_samples: int | None = None,
    seed: int | None = None,
) -> dict[Kind, Tensor]:
    """GGN, empirical Fisher and (structures ``PARAM``, ``DIAG``) Hessian, as ``kinds``
    asks, sharing one backward pass per batch; ``route`` is ``HOOKS``, ``CHAIN`` or
    ``GRAPH``. With ``mc_samples``, the GGN of ``mc_samples`` sampled square roots of the
    loss Hessian per sample (drawn from ``seed`` plus the batch's index, or from the global
    random state for ``seed=None``)."""
    derivatives = _check(loss_fn, kinds, plan.structure)
    diag = plan.structure is Structure.DIAG
    extensions = {kind: _extension(kind, diag, mc_samples) for kind in kinds}
    results = {kind: plan.new_result() for kind in kinds}
    batch = BatchResults()
    with hooked(
        model, loss_fn, tuple(extensions.values()), batch, route_of(route), plan.params
    ) as hooks:
        batches = total.batches(data, model_device(model), progress)
        for index, (X, y, weight, _) in enumerate(batches):
            batch.new_batch()
            with seeded(None if seed is None else seed + index, model_device(model)):
                output = hooks.run_batch(X, y)
            total.add_loss(output, y, weight)
            for kind, extension in extensions.items():
                if kind is Kind.EMPIRICAL_FISHER:
                    # grad_batch[n] = s_b grad(l_n): s_b^2 G^T G is off by s_b, divide once.
                    kind_weight = weight / derivatives.scale(loss_fn, output)
                else:
                    kind_weight = weight
                accumulate(
                    results[kind],
                    plan,
                    _results_of(batch, plan.params, extension.attribute),
                    kind_weight,
                    from_factors=kind in FACTORS,
                )
    if not diag:
        for kind in set(kinds) & set(FACTORS):
            mirror_upper_panels(results[kind], plan)
    total.finish(results)
    return results


def hook_factor(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Iterable | tuple[Tensor, Tensor],
    kind: Kind,
    params: list[nn.Parameter],
    total: DatasetSum,
    progress: bool,
    max_memory: int,
    mc_samples: int | None = None,
    seed: int = 0,
) -> Tensor | None:
    """The square-root factor ``F`` ``[R, D]`` of the whole-dataset GGN or empirical Fisher
    (``batch_factors``' batches stacked): ``F^T F`` is the matrix; ``None`` once ``F`` and its
    Gram matrix ``F F^T`` would take more than ``max_memory`` bytes."""
    size, itemsize = sum(p.numel() for p in params), params[0].element_size()
    pieces, rows = [], 0
    factors = batch_factors(model, loss_fn, data, kind, params, total, progress, mc_samples, seed)
    with closing(factors):  # its hooks go at once, also on returning early
        for blocks, weight in factors:
            rows += len(blocks[0])
            if (rows * size + rows**2) * itemsize > max_memory:
                return None
            pieces.append(torch.cat(blocks, 1).mul_(weight**0.5))
    factor = torch.cat(pieces)
    return factor / total.samples**0.5 if total.reduction == "mean" else factor


@torch.enable_grad()  # also inside a caller's torch.no_grad() block
def batch_factors(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Iterable | tuple[Tensor, Tensor],
    kind: Kind,
    params: list[nn.Parameter],
    total: DatasetSum,
    progress: bool,
    mc_samples: int | None = None,
    seed: int = 0,
) -> Iterator[tuple[list[Tensor], float]]:
    """Per batch, the square-root factor ``F_b`` ``[R_b, D]`` of its reduced loss's GGN (the
    per-sample products of its stacks, ``R_b = V N_b`` rows; with ``mc_samples``, sampled from
    ``seed`` plus the batch's index) or empirical Fisher (the per-sample gradients, ``N_b``
    rows), as its column blocks per parameter (``[R_b, p.numel()]`` each, never joined), and
    the weight of ``F_b^T F_b`` in the whole-dataset matrix (``DatasetSum``: call
    ``total.finish`` after the last)."""
    derivatives = _check(loss_fn, (kind,), Structure.FULL)
    extension = BatchGrad() if kind is Kind.EMPIRICAL_FISHER else SqrtGGN(mc_samples)
    leading = 1 if kind is Kind.EMPIRICAL_FISHER else 2  # [N, *p] or [V, N, *p]
    batch = BatchResults()
    with hooked(model, loss_fn, (extension,), batch, "auto", params) as hooks:
        batches = total.batches(data, model_device(model), progress)
        for index, (X, y, weight, _) in enumerate(batches):
            batch.new_batch()
            with seeded(seed + index if mc_samples else None, model_device(model)):
                output = hooks.run_batch(X, y)
            values = [batch.get(param, extension.attribute) for param in params]
            count = next(v for v in values if v is not None).shape[:leading].numel()
            if kind is Kind.EMPIRICAL_FISHER:
                weight = weight / derivatives.scale(loss_fn, output)
            yield [rows_or_zeros(v, p, count) for v, p in zip(values, params)], weight


def _extension(kind: Kind, diag: bool, mc_samples: int | None) -> Extension:
    """The extension that gives ``kind``'s diagonal (``diag``) or factor or blocks; the GGN's
    from ``mc_samples`` sampled square roots where given."""
    extension = {**FACTORS, **BLOCKS}[kind][0 if diag else 1]
    return extension(mc_samples) if kind is Kind.GGN else extension()


def _check(loss_fn: nn.Module, kinds: tuple[Kind, ...], structure: Structure):
    """The loss's derivatives; raises where the hooks cannot give what is asked."""
    derivatives = loss_derivatives(loss_fn)
    if derivatives is None:
        names = "/".join(kind.value for kind in kinds)
        raise UnsupportedError(
            f"loss {type(loss_fn).__name__} is not supported by curvhooks.{names}; "
            f"supported losses: {supported_names(LOSS_DERIVATIVES)}"
        )
    if Kind.HESSIAN in kinds and structure not in HESSIAN_STRUCTURES:
        raise ValueError(
            f"the hooks give the Hessian's per-parameter blocks or diagonal, not "
            f"structure={structure.value!r}; use structure='param' or 'diag', or the autograd "
            "route"
        )
    return derivatives


def _results_of(batch: BatchResults, params: list[nn.Parameter], attribute: str):
    """Parameter ``i``'s result ``attribute`` in the batch; ``None`` where it has none."""
    return lambda index: batch.get(params[index], attribute)


def route_of(route: Route) -> str:
    """The hooks' route for a dataset route among ``HOOKS``, ``CHAIN`` and ``GRAPH``."""
    return "auto" if route is Route.HOOKS else route.value
