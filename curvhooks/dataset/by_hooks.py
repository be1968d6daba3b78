"""The hooks route: dataset matrices from what the hooks propagate.

One backward pass per batch yields the square-root GGN factor ``V`` ``[C * N_b, D]`` and the
per-sample gradients ``G`` ``[N_b, D]`` of the batch's reduced loss; the matrices accumulate
``V^T V`` and ``G^T G`` block by block into one preallocated result. The same pass can yield
the exact Hessian's per-parameter blocks or diagonal (``HessianBlock``, ``DiagHessian``).
On a chain of supported modules the hooks run that backward pass themselves
(``ChainBackward``); on any other graph autograd's backward pass feeds them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from curvhooks.dataset.blocks import accumulate, mirror_upper_panels
from curvhooks.dataset.plan import Kind, Layout, Route, Structure, model_device
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
from curvhooks.hooks import ChainBackward, extend, results_preserved, supports_chain

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
    unsupported: str = "raise",
) -> dict[Kind, Tensor]:
    """GGN, empirical Fisher and (structures ``PARAM``, ``DIAG``) Hessian, as ``kinds``
    asks, sharing one backward pass per batch; ``route`` is ``HOOKS``, ``CHAIN`` or
    ``GRAPH``."""
    derivatives = _check(loss_fn, kinds, plan.structure)
    diag = plan.structure is Structure.DIAG
    extensions = {kind: {**FACTORS, **BLOCKS}[kind][0 if diag else 1]() for kind in kinds}
    results = {kind: plan.new_result() for kind in kinds}
    with (
        results_preserved(model),  # the user's own results stay as they were
        only_these_require_grad(model, plan.params),
        hook_context(model, loss_fn, route, unsupported)(*extensions.values()) as hooks,
    ):
        for X, y, weight, _ in total.batches(data, model_device(model), progress):
            output = hooks.run_batch(X, y)
            for kind, extension in extensions.items():
                if kind is Kind.EMPIRICAL_FISHER:
                    # grad_batch[n] = s_b grad(l_n): s_b^2 G^T G is off by s_b, divide once.
                    kind_weight = weight / derivatives.scale(loss_fn, output)
                else:
                    kind_weight = weight
                accumulate(
                    results[kind],
                    plan,
                    _attribute_of(plan, extension.attribute),
                    kind_weight,
                    from_factors=kind in FACTORS,
                )
    if not diag:
        for kind in set(kinds) & set(FACTORS):
            mirror_upper_panels(results[kind], plan)
    total.finish(results)
    return results


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


def hook_context(model: nn.Module, loss_fn: nn.Module, route: Route, unsupported: str):
    """The context for ``route``: the hooks' own backward pass on a chain of supported
    modules (unless the graph route is asked for), autograd's elsewhere."""
    if route is not Route.GRAPH and supports_chain(model, loss_fn):
        return lambda *extensions: ChainBackward(model, loss_fn, *extensions)
    options = {"route": "auto" if route is Route.HOOKS else route.value}
    return lambda *extensions: extend(
        model, loss_fn, *extensions, unsupported=unsupported, **options
    )


def _attribute_of(plan: Layout, attribute: str):
    """Parameter ``i``'s result ``attribute``, or ``None`` where it has none."""
    return lambda index: getattr(plan.params[index], attribute, None)


class only_these_require_grad:
    """Temporarily stop the other parameters from requiring grad, so that no work is spent
    on them; restores every flag on exit."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter]) -> None:
        selected = {id(p) for p in params}
        self._others = [p for p in model.parameters() if p.requires_grad and id(p) not in selected]

    def __enter__(self) -> None:
        for param in self._others:
            param.requires_grad_(False)

    def __exit__(self, *exc_info: object) -> None:
        for param in self._others:
            param.requires_grad_(True)
