"""``curvhooks.kfac``: Kronecker-factored curvature (KFAC, EKFAC) over a data set.

One pass over the data accumulates each parameter's factors from the hooks (``B`` weighted
as the whole-dataset loss's curvature, ``A`` as a mean over all samples); EKFAC takes a
second pass for the eigenvalues in the factors' eigenbasis. Parameters without Kronecker
structure get their exact blocks from ``curvhooks.ggn`` or ``curvhooks.empirical_fisher``
(one more pass). The result is a ``curvhooks.operators.kronecker.Kronecker`` operator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvhooks.dataset.plan import DEFAULT_MAX_MEMORY, Structure, layout, model_device, unwrap
from curvhooks.dataset.seeding import seeded
from curvhooks.dataset.weighting import DatasetSum, batches
from curvhooks.derivatives import module_derivatives
from curvhooks.derivatives.attention import several_inputs
from curvhooks.errors import UnsupportedError
from curvhooks.extensions import EigenCorrection, Extension, KroneckerExtension
from curvhooks.extensions.base import check_mc_samples
from curvhooks.extensions.gram import formed, weighted_sum
from curvhooks.extensions.stacks import GGN_ROWS, GRADIENT, MonteCarloStack, StackKind
from curvhooks.hooks import BatchResults, UnservableError, check_eval_mode, hooked
from curvhooks.hooks.plan import serving_modules
from curvhooks.operators.kronecker import Factor, Kronecker, eigenbases, factor_sides

FISHER_TYPES = ("type-2", "mc", "empirical", "forward-only")
OTHERS = ("diag", "dense", "skip", "raise")


def kfac(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Iterable | tuple[Any, Tensor],
    fisher: str = "type-2",
    mc_samples: int = 1,
    approx: str = "expand",
    eigen_correction: bool = False,
    params: list[nn.Parameter] | None = None,
    *,
    others: str = "diag",
    seed: int | None = None,
    progress: bool = False,
    process_group: object = None,
    batch_size_fn: Callable[[Any], int] | None = None,
    return_loss: bool = False,
) -> Kronecker | tuple[Kronecker, Tensor]:
    """Kronecker-factored approximation of the whole-dataset loss's GGN (or Fisher).

    Each selected weight ``[O, *rest]`` gets factors ``(B, A)``, ``B`` ``[O, O]`` and ``A``
    ``[I, I]`` (I = prod(rest)), with ``torch.kron(B, A)`` approximating its block in
    ``p.flatten()`` order; each bias gets ``(B,)``. ``A`` is the mean over all samples (and
    positions: sequence steps, convolution patches and groups) of the layer input's outer
    products; ``B`` is the sum over samples (and positions) of the outer products of the
    layer output's stacks, scaled as the whole-dataset loss: the factors and the dense matrix
    of curvlinops' ``KFACLinearOperator`` (``separate_weight_and_bias=True``).

    Parameters of other modules (norm layers, embeddings) have no Kronecker factors; they
    get their exact blocks of the matrix KFAC approximates (``others``): the GGN's for
    ``"type-2"`` and ``"mc"``, the empirical Fisher's for ``"empirical"``.

    Args:
        model: Any model whose ``Linear``, ``Conv1d/2d/3d`` and ``MultiheadAttention``
            modules (each called once per forward pass, in any graph) get Kronecker factors;
            the hooks (or autograd) must serve its other parameters' exact blocks.
        loss_fn: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss``, reduction
            ``"mean"`` or ``"sum"``.
        data: An iterable of ``(X, y)`` batches or one ``(X, y)`` pair.
        fisher: ``"type-2"`` (the exact loss Hessian: per output row its square root, the
            columns summed over a sample's rows), ``"mc"`` (``mc_samples`` labels sampled
            from the model's predictive distribution), ``"empirical"`` (the gradients at
            the true labels) or ``"forward-only"`` (``B = I``).
        mc_samples: Sampled labels per sample, for ``fisher="mc"`` only.
        approx: ``"expand"`` or ``"reduce"`` for weight shared over positions (Eschenhagen
            et al. 2023): ``"reduce"`` averages the inputs and sums the output stacks over
            positions before taking outer products.
        eigen_correction: EKFAC: replace the Kronecker eigenvalues by the second moments of
            the per-sample gradients in the factors' eigenbasis (a second pass over the
            data).
        params: The parameters (default: all that require grad).
        others: What the parameters without Kronecker factors get: ``"diag"`` (default,
            their exact diagonal), ``"dense"`` (their exact block per parameter), ``"skip"``
            (left out of the operator and its ``params``) or ``"raise"``
            (``UnsupportedError``). ``fisher="forward-only"`` has no exact blocks: there,
            ``"skip"`` or ``"raise"``.
        seed: Seed of the labels sampled for ``fisher="mc"`` (the global random state is
            left as it was).
        progress: Show a progress bar over the batches.
        process_group: Under ``torch.distributed``, the processes whose data to combine.
        batch_size_fn: The sample count of a batch's input (default: ``y.shape[0]``).
        return_loss: Also return the whole-dataset loss ``L`` (0-dim, detached) from the
            same pass over the data.

    Returns:
        A ``Kronecker`` operator with ``@``, ``to_dense``, ``inverse``, ``trace``,
        ``logdet``, ``frobenius_norm``, ``diag``, ``factors`` and ``params``; with
        ``return_loss``, ``(operator, L)``.
    """
    model = unwrap(model)
    if others not in OTHERS:
        raise ValueError(f"others must be one of {OTHERS}, got {others!r}")
    kind = _stack_kind(fisher, mc_samples)
    factors_of = KroneckerExtension(kind, approx, thin=True)  # checks approx
    if eigen_correction and fisher == "forward-only":
        raise ValueError(
            "eigen_correction needs the per-sample gradients, which fisher='forward-only' "
            "does without; pick another fisher type or eigen_correction=False"
        )
    check_eval_mode(model)
    plan = layout(model, params, Structure.PARAM, max_memory=2**62)
    unfactored = _cross_attention_projections(model, data, batch_size_fn)
    rows = _names_of(model, plan.params, others, unfactored)  # (name, param, has factors)
    exact = [(name, param) for name, param, factored in rows if not factored]
    if exact and fisher == "forward-only" and others != "skip":
        raise ValueError(
            "fisher='forward-only' has no exact blocks for parameters without Kronecker "
            f"factors ({', '.join(name for name, _ in exact)}); pass others='skip' to leave "
            "them out"
        )
    if others == "skip":
        rows = [row for row in rows if row[2]]
    if not rows:
        raise ValueError(
            "curvhooks.kfac: none of the parameters has Kronecker factors and others='skip' "
            "leaves them all out; pass others='diag' or 'dense', or other params="
        )
    second_pass = eigen_correction or (exact and others != "skip")
    if second_pass and isinstance(data, Iterator):
        raise ValueError(
            "curvhooks.kfac passes over the data twice here (EKFAC's correction, or the exact "
            "blocks of others=); pass a list or a DataLoader, not a one-shot iterator"
        )
    options = {"process_group": process_group, "batch_size_fn": batch_size_fn}
    names = [name for name, _, factored in rows if factored]
    params = [param for _, param, factored in rows if factored]
    blocks, loss = _exact_blocks(model, loss_fn, data, fisher, exact, others, progress, options)
    passes = _Passes(
        model, loss_fn, data, params, names, progress, **options, keeps_loss=return_loss
    )
    with seeded(seed, model_device(model)):
        try:
            factors = passes.accumulate(factors_of, _factor_shapes) if params else {}
        except UnservableError as error:
            raise UnsupportedError(
                f"curvhooks.kfac: {error.what()}; leave them out with params="
            ) from error
        if fisher == "forward-only":
            identities = {name: _identity(p) for name, p in zip(names, params)}
            factors = {name: (identities[name], *f[1:]) for name, f in factors.items()}
        corrected, bases = None, None
        if eigen_correction and params:
            factors = {name: tuple(map(formed, f)) for name, f in factors.items()}
            bases = {name: eigenbases(f) for name, f in factors.items()}
            by_id = {id(p): bases[name] for name, p in zip(names, params)}
            correction = EigenCorrection(kind, by_id)
            corrected = {n: f[0] for n, f in passes.accumulate(correction, _eigen_shapes).items()}
    all_names, all_params = [row[0] for row in rows], [row[1] for row in rows]
    operator = Kronecker(
        factors, all_params, all_names, corrected=corrected, eigenbases=bases, others=blocks
    )
    return (operator, passes.loss if params else loss) if return_loss else operator


def _exact_blocks(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Iterable | tuple[Any, Tensor],
    fisher: str,
    exact: list[tuple[str, nn.Parameter]],
    others: str,
    progress: bool,
    options: dict[str, Any],
) -> tuple[dict[str, Tensor], Tensor | None]:
    """Name -> the exact diagonal ``[n]`` (``others="diag"``) or dense block ``[n, n]``
    (``"dense"``) of each ``(name, parameter)`` in ``exact``, of the whole-dataset GGN (the
    empirical Fisher for ``fisher="empirical"``); none for ``"skip"``. Also the
    whole-dataset loss from the same pass (``None`` where there was none)."""
    from curvhooks.dataset.functions import empirical_fisher, ggn

    if not exact or others == "skip":
        return {}, None
    matrix_of = empirical_fisher if fisher == "empirical" else ggn
    structure = "diag" if others == "diag" else "param"
    params = [param for _, param in exact]
    size = sum(param.numel() for param in params)
    if others == "dense" and size**2 * params[0].element_size() > DEFAULT_MAX_MEMORY:
        raise ValueError(
            f"curvhooks.kfac(others='dense'): the exact blocks of the {size} parameters without "
            f"Kronecker factors are computed within one [{size}, {size}] matrix, more than "
            f"{DEFAULT_MAX_MEMORY / 2**30:.0f} GiB; pass others='diag', or leave some out with "
            "params= or others='skip'"
        )
    matrix, loss = matrix_of(
        model, loss_fn, data, params, structure, progress=progress, return_loss=True, **options
    )
    blocks, start = {}, 0
    for name, param in exact:
        rows = slice(start, start + param.numel())
        blocks[name] = matrix[rows] if others == "diag" else matrix[rows, rows].clone()
        start += param.numel()
    return blocks, loss


Shapes = Callable[[nn.Parameter], list[tuple[tuple[int, ...], bool]]]
"""The shapes of a parameter's result parts, each with whether it is a mean over samples."""


def _factor_shapes(param: nn.Parameter) -> list[tuple[tuple[int, ...], bool]]:
    """``B`` (weighted as the loss), and for a weight ``A`` (a mean over samples)."""
    return [((side, side), index == 1) for index, side in enumerate(factor_sides(param))]


def _eigen_shapes(param: nn.Parameter) -> list[tuple[tuple[int, ...], bool]]:
    """EKFAC's eigenvalues ``[O, I]`` or ``[O]``, weighted as the loss."""
    return [(factor_sides(param), False)]


@dataclass
class _Passes:
    """Passes over the data with one extension, its results summed as one loss."""

    model: nn.Module
    loss_fn: nn.Module
    data: Iterable | tuple[Any, Tensor]
    params: list[nn.Parameter]
    names: list[str]
    progress: bool
    process_group: object
    batch_size_fn: Callable[[Any], int] | None = None
    keeps_loss: bool = False
    """Whether ``accumulate`` also sums the whole-dataset loss into ``loss``."""
    loss: Tensor | None = field(default=None, init=False)

    def accumulate(self, extension: Extension, shapes: Shapes) -> dict[str, tuple[Factor, ...]]:
        """Each parameter's result of ``extension`` (a tensor or a tuple, parts as ``shapes``
        says) over the data: a part that is a mean over samples weighted by each batch's
        sample count, the others as the whole-dataset loss's curvature (``DatasetSum``).

        Kronecker factors may come as ``Gram`` roots, stacked over batches while they stay
        thin. The first batch's results are taken over in place (a dense input factor can take
        a gigabyte, not worth a second one, nor a pass over it on one batch); a process
        without batches joins the reduction with zeros."""
        total = DatasetSum(self.loss_fn, self.process_group, self.batch_size_fn, self.keeps_loss)
        sums: dict[tuple[str, int], Factor] = {}
        means: dict[tuple[str, int], Factor] = {}  # averages over the samples so far
        samples = 0
        batch = BatchResults()
        with hooked(self.model, self.loss_fn, (extension,), batch, "auto", self.params) as hooks:
            device = model_device(self.model)
            for X, y, weight, size in total.batches(self.data, device, self.progress):
                batch.new_batch()
                total.add_loss(hooks.run_batch(X, y), y, weight)
                share = size / (samples + size)
                samples += size
                for name, param in zip(self.names, self.params):
                    parts = _parts(name, batch.get(param, extension.attribute))
                    for index, (part, (_, is_mean)) in enumerate(zip(parts, shapes(param))):
                        key = (name, index)
                        if is_mean:
                            means[key] = weighted_sum(means.get(key), part, 1 - share, share)
                        else:
                            sums[key] = weighted_sum(sums.get(key), part, 1, weight)
        if total.group is not None:  # the reduction over processes needs formed tensors
            sums = {key: formed(factor) for key, factor in sums.items()}
            means = {key: formed(factor) for key, factor in means.items()}
        for name, param in zip(self.names, self.params):
            for index, (shape, is_mean) in enumerate(shapes(param)):
                store = means if is_mean else sums
                if (name, index) not in store:
                    store[name, index] = param.new_zeros(shape)
        total.finish(sums, means)
        self.loss = total.loss
        found = {**sums, **means}
        return {
            name: tuple(found[name, i] for i in range(len(shapes(param))))
            for name, param in zip(self.names, self.params)
        }


def _parts(name: str, result: object) -> tuple[Tensor, ...]:
    """A parameter's result as a tuple of parts; raises where it has none."""
    if result is None:
        raise ValueError(
            f"parameter {name} does not reach the loss, so it has no Kronecker factors; "
            "leave it out with params="
        )
    return result if isinstance(result, tuple) else (result,)


def _identity(param: nn.Parameter) -> Tensor:
    """``B = I`` ``[O, O]`` for ``param`` ``[O, ...]``, of its dtype and device."""
    return torch.eye(param.shape[0], dtype=param.dtype, device=param.device)


def _stack_kind(fisher: str, mc_samples: int) -> StackKind:
    """The stack whose outer products give B."""
    if fisher not in FISHER_TYPES:
        raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}")
    check_mc_samples(mc_samples)
    if fisher != "mc" and mc_samples != 1:
        raise ValueError(
            f"mc_samples={mc_samples} applies to fisher='mc' only, not fisher={fisher!r}; "
            "leave mc_samples at 1 or pass fisher='mc'"
        )
    return {"type-2": GGN_ROWS, "mc": MonteCarloStack(mc_samples)}.get(fisher, GRADIENT)


def _cross_attention_projections(
    model: nn.Module, data: Iterable | tuple[Any, Tensor], batch_size_fn: Callable | None
) -> set[int]:
    """The ids of the packed projections (``in_proj_weight``, ``in_proj_bias``) of the
    ``nn.MultiheadAttention`` modules that the model calls on several inputs
    (cross-attention, ``several_inputs``), found by a forward pass on the first batch: they
    have no Kronecker factors. None for a one-shot iterator (its first batch would be lost:
    the factor pass then refuses them, naming ``params=``)."""
    packed = [
        m for m in model.modules() if isinstance(m, nn.MultiheadAttention) and m._qkv_same_embed_dim
    ]
    if not packed or isinstance(data, Iterator):
        return set()
    found: set[int] = set()

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if several_inputs(module, args, kwargs):
            found.update(
                id(p) for p in (module.in_proj_weight, module.in_proj_bias) if p is not None
            )

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in packed]
    try:
        for X, _, _ in batches(data, model_device(model), batch_size_fn=batch_size_fn):
            with torch.enable_grad():  # the path the passes take (no_grad has fast paths)
                model(X)
            break
    finally:
        for handle in handles:
            handle.remove()
    return found


def _names_of(
    model: nn.Module, params: list[nn.Parameter], others: str, unfactored: set[int]
) -> list[tuple[str, nn.Parameter, bool]]:
    """Each parameter with its name in ``model`` and whether its module gives it Kronecker
    factors (not those of ``unfactored`` ids); raises for one without them under
    ``others="raise"``."""
    owners = {}
    for path, module, served in serving_modules(model):
        for name, param in served:
            owners.setdefault(id(param), (path, name, module))
    rows = []
    for param in params:
        path, name, module = owners[id(param)]
        derivatives = module_derivatives(module)
        factored = (
            derivatives is not None
            and derivatives.kronecker_weight(module, name) is not None
            and id(param) not in unfactored
        )
        if not factored and others == "raise":
            raise UnsupportedError(
                f"curvhooks.kfac gives Kronecker factors to the weights and biases of Linear "
                f"and Conv1d/2d/3d modules and MultiheadAttention's projections, not to "
                f"{path}.{name} of {type(module).__name__}; "
                "pass others='diag' or 'dense' for its exact block, others='skip' or params= "
                "to leave it out"
            )
        rows.append((f"{path}.{name}" if path else name, param, factored))
    return rows
