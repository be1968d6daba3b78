"""The dataset-level functions: arguments checked once, then handed to a route."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

from torch import Tensor, nn

from curvhooks.dataset.by_autograd import autograd_factor_matrices, autograd_hessian
from curvhooks.dataset.by_hooks import HESSIAN_STRUCTURES, hook_matrices
from curvhooks.dataset.plan import (
    DEFAULT_MAX_MEMORY,
    Kind,
    Route,
    Structure,
    check_same_layout,
    layout,
    parse,
    selected_params,
    unwrap,
)
from curvhooks.dataset.weighting import DatasetSum, FirstBatchKept
from curvhooks.errors import UnsupportedError
from curvhooks.extensions.base import check_mc_samples
from curvhooks.hooks import (
    UnservableError,
    check_eval_mode,
    supported_params,
    supports_chain,
    unsupported_module,
    warn_skipped,
)

Data = Iterable | tuple[Any, Tensor]
HOOK_ROUTES = (Route.AUTO, Route.HOOKS, Route.CHAIN, Route.GRAPH)


def ggn(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Data,
    params: list[nn.Parameter] | None = None,
    structure: str = "full",
    *,
    max_memory: int = DEFAULT_MAX_MEMORY,
    progress: bool = False,
    route: str = "auto",
    unsupported: str = "raise",
    process_group: object = None,
    batch_size_fn: Callable[[Any], int] | None = None,
    mc_samples: int | None = None,
    seed: int | None = None,
    return_loss: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The generalized Gauss-Newton ``sum_n J_n^T H_n J_n`` of the whole-dataset loss.

    Args:
        model: Any model whose modules with trainable parameters are supported.
        loss_fn: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss``, reduction
            ``"mean"`` or ``"sum"``.
        data: An iterable of ``(X, y)`` batches (e.g. a ``DataLoader``) or one ``(X, y)`` pair;
            ``X`` a tensor or any nested dict, list, tuple or ``Mapping`` of tensors, moved
            to the model's device.
        params: Parameters to differentiate (default: all that require grad, in
            ``model.parameters()`` order); D is their total size.
        structure: ``"full"`` (``[D, D]``); ``"layer"`` (``[D, D]``, zero off one diagonal
            block per module holding parameters, whose sides
            ``curvhooks.layer_sizes(model, params)`` gives); ``"param"`` (``[D, D]``, zero off
            one diagonal block per parameter); or ``"diag"`` (``[D]``).
        max_memory: Largest dense result in bytes; a larger one raises ``ValueError``.
        progress: Show a progress bar over the batches.
        route: ``"chain"`` (the hooks run the backward pass themselves along a chain of
            supported modules), ``"graph"`` (autograd's backward pass and batched
            vector-Jacobian products, any graph), or ``"auto"``/``"hooks"``: the chain where
            the model is one.
        unsupported: ``"raise"`` for a module with trainable parameters curvhooks does not
            support, or ``"skip"``: its parameters are left out of the default ``params``
            (one warning names them).
        process_group: Under ``torch.distributed``, the processes whose data sets together
            form the whole data set (default: all, when ``torch.distributed`` is
            initialised); each passes its own ``data`` and receives the combined matrix.
        batch_size_fn: The number of samples in a batch's ``X`` (default: ``y.shape[0]``).
        mc_samples: The Monte-Carlo GGN: each sample's loss Hessian replaced by the mean of
            ``s s^T`` over ``mc_samples`` square roots sampled from the model's predictive
            distribution (an unbiased estimate; default: exact).
        seed: Seed of those samples, plus each batch's index (default: the global random
            state, which is then advanced; given, it is left as it was).
        return_loss: Also return the whole-dataset loss ``L`` (0-dim, detached) from the
            same pass over the data: ``(matrix, loss)``.

    Returns:
        The GGN of ``L = s * sum_n l_n`` over all samples (``s`` = 1 for ``"sum"``, the
        reduction's factor over the whole data set for ``"mean"``), in the parameters' dtype.
    """
    found = matrices(
        model,
        loss_fn,
        data,
        (Kind.GGN,),
        params,
        structure,
        max_memory=max_memory,
        progress=progress,
        route=route,
        unsupported=unsupported,
        process_group=process_group,
        batch_size_fn=batch_size_fn,
        mc_samples=mc_samples,
        seed=seed,
        return_loss=return_loss,
    )
    return _with_loss(found, Kind.GGN, return_loss)


def empirical_fisher(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Data,
    params: list[nn.Parameter] | None = None,
    structure: str = "full",
    *,
    max_memory: int = DEFAULT_MAX_MEMORY,
    progress: bool = False,
    route: str = "auto",
    unsupported: str = "raise",
    process_group: object = None,
    batch_size_fn: Callable[[Any], int] | None = None,
    return_loss: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The empirical Fisher ``s * sum_n grad(l_n) grad(l_n)^T`` over the whole data set.

    ``l_n`` is sample n's loss under reduction ``"sum"`` and ``s`` the whole-dataset
    reduction's factor (1 for ``"sum"``; 1/N for ``CrossEntropyLoss`` ``"mean"``; 1/(N C) for
    ``MSELoss`` and ``BCEWithLogitsLoss`` ``"mean"``, which average over all N C output
    entries). One gradient per sample, also for outputs with extra dimensions (curvlinops'
    ``EFLinearOperator`` counts each position as a term instead: reshape the positions into
    the batch for that one). Arguments (``loss_fn`` one of those three) and structures as in
    ``ggn``.
    """
    found = matrices(
        model,
        loss_fn,
        data,
        (Kind.EMPIRICAL_FISHER,),
        params,
        structure,
        max_memory=max_memory,
        progress=progress,
        route=route,
        unsupported=unsupported,
        process_group=process_group,
        batch_size_fn=batch_size_fn,
        return_loss=return_loss,
    )
    return _with_loss(found, Kind.EMPIRICAL_FISHER, return_loss)


def hessian(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Data,
    params: list[nn.Parameter] | None = None,
    structure: str = "full",
    *,
    chunk_size: int | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    progress: bool = False,
    route: str = "auto",
    unsupported: str = "raise",
    process_group: object = None,
    batch_size_fn: Callable[[Any], int] | None = None,
    return_loss: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The exact Hessian of the whole-dataset loss ``L = s * sum_n l_n``.

    Arguments, structures and batch weighting as in ``curvhooks.ggn``; ``"layer"`` and
    ``"param"`` compute only the diagonal blocks, ``"diag"`` the exact diagonal ``[D]``.
    ``route``: ``"autograd"`` (vectorised Hessian-vector products; any model, any scalar
    loss), ``"hooks"``/``"chain"``/``"graph"`` (``DiagHessian``/``HessianBlock``, structures
    ``"param"`` and ``"diag"``; supported modules with linear or piecewise-linear operations
    between them), or ``"auto"``: the hooks for those structures on a chain of supported
    modules, autograd otherwise. ``chunk_size`` directions share one vectorised product
    (autograd route; default 256 on CPU, 1024 on CUDA).
    """
    if chunk_size is not None and (isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    found = matrices(
        model,
        loss_fn,
        data,
        (Kind.HESSIAN,),
        params,
        structure,
        max_memory=max_memory,
        progress=progress,
        route=route,
        unsupported=unsupported,
        process_group=process_group,
        batch_size_fn=batch_size_fn,
        chunk_size=chunk_size,
        return_loss=return_loss,
    )
    return _with_loss(found, Kind.HESSIAN, return_loss)


def matrices(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Data,
    kinds: tuple[str, ...] = tuple(Kind),
    params: list[nn.Parameter] | None = None,
    structure: str = "full",
    *,
    max_memory: int = DEFAULT_MAX_MEMORY,
    progress: bool = False,
    route: str = "auto",
    unsupported: str = "raise",
    process_group: object = None,
    batch_size_fn: Callable[[Any], int] | None = None,
    chunk_size: int | None = None,
    mc_samples: int | None = None,
    seed: int | None = None,
    return_loss: bool = False,
) -> dict[str, Tensor]:
    """``{kind: matrix}`` for ``kinds`` among ``"hessian"``, ``"ggn"``, ``"empirical_fisher"``.

    GGN and empirical Fisher (and the Hessian on the hooks route) share one backward pass per
    batch; the autograd Hessian takes its own pass. Arguments as in ``curvhooks.ggn`` and
    ``curvhooks.hessian`` (``mc_samples`` and ``seed`` apply to the GGN); with
    ``return_loss``, also ``"loss"``: the whole-dataset loss from the same pass. The data is
    iterated once or twice, so a one-shot iterator is not enough when the autograd Hessian
    and another kind are both asked for.
    """
    if mc_samples is not None:
        check_mc_samples(mc_samples)
    model = unwrap(model)
    asked = _parse_kinds(kinds)
    structure = parse(Structure, structure, "structure")
    route = parse(Route, route, "route")
    check_eval_mode(model)
    if unsupported == "skip":
        params = supported_params(model, params)
    params = selected_params(model, params)
    by_autograd = _kinds_by_autograd(asked, model, loss_fn, params, structure, route)
    if isinstance(data, Iterator):  # the hooks may stop after the first batch to start again
        data = FirstBatchKept(data)
    compute = partial(
        _compute,
        model,
        loss_fn,
        data,
        asked,
        structure,
        route,
        max_memory=max_memory,
        progress=progress,
        process_group=process_group,
        batch_size_fn=batch_size_fn,
        chunk_size=chunk_size,
        sampling=(mc_samples, seed),
        keeps_loss=return_loss,
    )
    try:
        results = compute(params, by_autograd)
    except UnservableError as error:  # found by the hooks on the first batch
        params = _without_unservable(error, params, route, unsupported)
        if unsupported == "skip":
            by_autograd = _kinds_by_autograd(asked, model, loss_fn, params, structure, route)
        results = compute(params, by_autograd if unsupported == "skip" else asked)
    found = {kind.value: results[kind] for kind in asked}
    return {**found, "loss": results["loss"]} if return_loss else found


def _compute(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Data,
    asked: list[Kind],
    structure: Structure,
    route: Route,
    params: list[nn.Parameter],
    by_autograd: list[Kind],
    *,
    max_memory: int,
    progress: bool,
    process_group: object,
    batch_size_fn: Callable[[Any], int] | None,
    chunk_size: int | None,
    sampling: tuple[int | None, int | None],
    keeps_loss: bool,
) -> dict[Kind | str, Tensor]:
    """The ``asked`` matrices, ``by_autograd`` by the autograd route, the others by the hooks
    (first: they may find, on the first batch, parameters they cannot serve); ``sampling``
    is the GGN's ``(mc_samples, seed)``; with ``keeps_loss`` also the whole-dataset loss
    (``"loss"``), from the first pass."""
    plan = layout(model, params, structure, max_memory)
    hooked = tuple(kind for kind in asked if kind not in by_autograd)
    factor_kinds = tuple(kind for kind in by_autograd if kind is not Kind.HESSIAN)
    results, totals = {}, []

    def fresh_total() -> DatasetSum:
        total = DatasetSum(loss_fn, process_group, batch_size_fn, keeps_loss and not totals)
        check_same_layout(plan, total.group)
        totals.append(total)
        return total

    if hooked:
        total = fresh_total()
        hook_route = Route.HOOKS if route is Route.AUTO else route
        results.update(
            hook_matrices(
                model, loss_fn, data, hooked, plan, total, hook_route, progress, *sampling
            )
        )
    if Kind.HESSIAN in by_autograd:
        total = fresh_total()
        results[Kind.HESSIAN] = autograd_hessian(
            model, loss_fn, data, plan, total, chunk_size, progress
        )
    if factor_kinds:
        total = fresh_total()
        results.update(
            autograd_factor_matrices(
                model, loss_fn, data, factor_kinds, plan, total, progress, *sampling
            )
        )
    if keeps_loss:
        results["loss"] = totals[0].loss
    return results


def _with_loss(
    found: dict[str, Tensor], kind: Kind, return_loss: bool
) -> Tensor | tuple[Tensor, Tensor]:
    """``kind``'s matrix among ``matrices``' results, with the loss where asked."""
    return (found[kind.value], found["loss"]) if return_loss else found[kind.value]


def _parse_kinds(kinds: tuple[str, ...]) -> list[Kind]:
    choices = tuple(kind.value for kind in Kind)
    if not kinds or any(kind not in choices for kind in kinds):
        raise ValueError(f"kinds must be a non-empty selection of {choices}, got {kinds!r}")
    return [Kind(kind) for kind in kinds]


def _kinds_by_autograd(
    asked: list[Kind],
    model: nn.Module,
    loss_fn: nn.Module,
    params: list[nn.Parameter],
    structure: Structure,
    route: Route,
) -> list[Kind]:
    """The kinds among ``asked`` that take the autograd route (``_by_autograd``)."""
    return [k for k in asked if _by_autograd(k, model, loss_fn, params, structure, route)]


def _by_autograd(
    kind: Kind,
    model: nn.Module,
    loss_fn: nn.Module,
    params: list[nn.Parameter],
    structure: Structure,
    route: Route,
) -> bool:
    """Whether ``kind`` takes the autograd route: asked for, or on ``AUTO`` where the hooks
    cannot serve (a module holding one of ``params`` is unsupported) or, for the Hessian,
    where they would not give the structure on a chain."""
    if route is not Route.AUTO:
        return route is Route.AUTOGRAD
    if _has_unsupported_owner(model, params):
        return True
    return kind is Kind.HESSIAN and (
        structure not in HESSIAN_STRUCTURES or not supports_chain(model, loss_fn)
    )


def _has_unsupported_owner(model: nn.Module, params: list[nn.Parameter]) -> bool:
    """Whether a module holding one of ``params`` is unsupported (the hooks raise for it)."""
    ids = {id(p) for p in params}
    owners = [m for m in model.modules() if any(id(p) in ids for p in m.parameters(False))]
    return any(unsupported_module(module) for module in owners)


def _without_unservable(
    error: UnservableError, params: list[nn.Parameter], route: Route, unsupported: str
) -> list[nn.Parameter]:
    """After the hooks found parameters they cannot serve (``nn.MultiheadAttention``'s
    ``out_proj``, a call with the samples folded into another dimension): the parameters
    to start again with, less those with ``unsupported="skip"`` (one warning names them);
    else every kind takes the autograd route on ``AUTO``, and an explicit hooks route
    raises."""
    if unsupported == "skip":
        warn_skipped(list(error.found.values()), "parameters the hooks cannot serve:")
        return [p for p in params if id(p) not in error.found]
    if route is Route.AUTO:
        return params
    fixes = "use route='auto' or 'autograd', unsupported='skip', or params= without them"
    raise UnsupportedError(f"{error.what()}; {fixes}") from error
