"""Several dataset-level matrices at once, sharing passes over the data."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from curvhooks.data import DEFAULT_MAX_MEMORY, HESSIAN, KINDS
from curvhooks.dataset import hook_matrices
from curvhooks.hessian import hessian


def matrices(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Iterable | tuple[Tensor, Tensor],
    kinds: tuple[str, ...] = KINDS,
    params: list[nn.Parameter] | None = None,
    structure: str = "full",
    *,
    max_memory: int = DEFAULT_MAX_MEMORY,
    progress: bool = False,
    process_group: object = None,
) -> dict[str, Tensor]:
    """``{kind: matrix}`` for ``kinds`` among ``"hessian"``, ``"ggn"``, ``"empirical_fisher"``.

    GGN and empirical Fisher come from the same backward passes; the Hessian takes its own
    pass. Arguments as in ``curvhooks.ggn``; the data is iterated once or twice, so a
    one-shot iterator is not enough when the Hessian and another kind are both asked for.
    """
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty selection of {KINDS}, got {kinds!r}")
    results = {}
    if HESSIAN in kinds:
        results[HESSIAN] = hessian(
            model,
            loss_fn,
            data,
            params,
            structure,
            max_memory=max_memory,
            progress=progress,
            process_group=process_group,
        )
    hooked = tuple(kind for kind in kinds if kind != HESSIAN)
    if hooked:
        results.update(
            hook_matrices(
                model,
                loss_fn,
                data,
                hooked,
                params,
                structure,
                max_memory,
                progress,
                process_group,
            )
        )
    return {kind: results[kind] for kind in kinds}
