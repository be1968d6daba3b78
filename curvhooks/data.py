"""What every dataset-level function shares: batches, parameter selection, blocks, weighting.

Batch weighting and the combination of several processes are decided here, once: the
whole-dataset loss is ``L = s * sum_n l_n``. For reduction ``"sum"`` each batch's reduced
loss adds with weight 1. For ``"mean"`` the factor s is proportional to 1 / (number of
samples), so batch b adds with weight ``N_b``, and the sum is divided by the total sample
count at the end: unequal batches are weighted right in a single pass over the data.
Under ``torch.distributed`` each process accumulates its own batches; the sums and sample
counts are then summed over the processes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

STRUCTURES = ("full", "layer", "param", "diag")
HESSIAN, GGN, EMPIRICAL_FISHER = "hessian", "ggn", "empirical_fisher"
KINDS = (HESSIAN, GGN, EMPIRICAL_FISHER)
DEFAULT_MAX_MEMORY = 4 * 2**30
"""Largest dense result (bytes) built without ``max_memory=`` raised: 4 GiB."""


@dataclass(frozen=True)
class Layout:
    """The selected parameters and the diagonal blocks a structure keeps.

    Attributes:
        params: The parameters, in the order of the rows and columns.
        offsets: Start of each parameter's rows; ``offsets[-1]`` is D.
        blocks: For each diagonal block, the indices of its parameters (contiguous);
            one block of all parameters for ``"full"``.
        structure: One of ``STRUCTURES``.
    """

    params: list[nn.Parameter]
    offsets: list[int]
    blocks: list[list[int]]
    structure: str

    @property
    def dim(self) -> int:
        return self.offsets[-1]

    def span(self, block: list[int]) -> slice:
        """The rows of a block."""
        return slice(self.offsets[block[0]], self.offsets[block[-1] + 1])

    def new_result(self) -> Tensor:
        """Zeros of the result's shape: ``[D]`` for ``"diag"``, else ``[D, D]``."""
        first = self.params[0]
        shape = (self.dim,) if self.structure == "diag" else (self.dim, self.dim)
        return torch.zeros(shape, dtype=first.dtype, device=first.device)


def layout(
    model: nn.Module, params: list[nn.Parameter] | None, structure: str, max_memory: int
) -> Layout:
    """Check the arguments and lay out the rows and blocks of the result."""
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    params = _selected_params(model, params)
    offsets = [0]
    for param in params:
        offsets.append(offsets[-1] + param.numel())
    result = Layout(params, offsets, _blocks(model, params, structure), structure)
    _check_memory(result, max_memory)
    return result


def _selected_params(model: nn.Module, params: list[nn.Parameter] | None) -> list[nn.Parameter]:
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    params = list(params)
    owned = {id(p) for p in model.parameters()}
    if not params:
        raise ValueError("no parameters selected: the model has no parameter that requires grad")
    if any(id(p) not in owned for p in params):
        raise ValueError("params must be parameters of the model")
    if len({id(p) for p in params}) != len(params):
        raise ValueError("params lists a parameter twice")
    return params


def _blocks(model: nn.Module, params: list[nn.Parameter], structure: str) -> list[list[int]]:
    indices = list(range(len(params)))
    if structure == "full":
        return [indices]
    if structure in ("param", "diag"):
        return [[index] for index in indices]
    owner = {
        id(p): module_id
        for module_id, module in enumerate(model.modules())
        for p in module.parameters(recurse=False)
    }
    blocks: list[list[int]] = []
    for index, param in enumerate(params):
        if blocks and owner[id(params[blocks[-1][-1]])] == owner[id(param)]:
            blocks[-1].append(index)
        else:
            blocks.append([index])
    return blocks


def _check_memory(result: Layout, max_memory: int) -> None:
    if result.structure == "diag":
        return
    itemsize = result.params[0].element_size()
    needed = result.dim**2 * itemsize
    if needed > max_memory:
        raise ValueError(
            f"the dense [{result.dim}, {result.dim}] result needs {needed / 2**30:.2f} GiB, more "
            f"than max_memory={max_memory / 2**30:.2f} GiB; use structure='diag' for the [D] "
            "diagonal, structure='layer' to compute only the per-layer blocks, pass params= "
            "to select fewer parameters, or raise max_memory"
        )


def layer_sizes(model: nn.Module, params: list[nn.Parameter] | None = None) -> list[int]:
    """The number of selected parameters held by each of ``model.children()``, zeros included.

    ``params`` defaults to the parameters that require grad, as in ``ggn``; the sizes then sum
    to D, the side of the dataset-level matrices.
    """
    model = unwrap(model)
    selected = {id(p) for p in _selected_params(model, params)}
    return [
        sum(p.numel() for p in child.parameters() if id(p) in selected)
        for child in model.children()
    ]


def check_model_mode(model: nn.Module) -> None:
    """Reject modules whose output depends on the batch or on randomness in training mode."""
    batch_dependent = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
    for path, module in model.named_modules():
        if module.training and isinstance(module, batch_dependent):
            raise ValueError(
                f"module {path!r} ({type(module).__name__}) is in training mode, where its "
                "output depends on the batch or on randomness, so the curvature is not that of "
                "a fixed function; call model.eval() first"
            )


def batches(
    data: Iterable | tuple[Tensor, Tensor], device: torch.device, progress: bool = False
) -> Iterator[tuple[Tensor, Tensor]]:
    """The ``(X, y)`` batches of ``data`` on ``device``; ``data`` may be one pair."""
    single = (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(item, Tensor) for item in data)
    )
    source = [data] if single else data
    count, start = 0, time.perf_counter()
    total = _length(source)
    for batch in source:
        X, y = _unpack(batch)
        count += 1
        if progress:
            _show_progress(count, total, time.perf_counter() - start)
        yield X.to(device), y.to(device)
    if progress:
        print(file=sys.stderr)


def _unpack(batch: object) -> tuple[Tensor, Tensor]:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError(
            f"each batch must be a pair (X, y), got {type(batch).__name__}; "
            "pass a DataLoader over a TensorDataset(X, y) or an iterable of (X, y) pairs"
        )
    X, y = batch
    if len(X) != len(y):
        raise ValueError(
            f"X and y hold different numbers of samples ({len(X)} and {len(y)}); "
            "pass inputs and targets of the same length"
        )
    if len(X) == 0:
        raise ValueError("a batch is empty; drop empty batches from the data")
    return X, y


def _length(source: object) -> int | None:
    try:
        return len(source)  # type: ignore[arg-type]
    except TypeError:
        return None


def _show_progress(count: int, total: int | None, elapsed: float) -> None:
    of_total = f"/{total}" if total is not None else ""
    print(f"\rbatch {count}{of_total}, {elapsed:.1f} s", end="", file=sys.stderr, flush=True)


def reduction_of(loss_fn: nn.Module) -> str | None:
    """The loss's reduction (``"mean"``/``"sum"``); ``None`` for a loss without one."""
    reduction = getattr(loss_fn, "reduction", None)
    if reduction not in (None, "mean", "sum"):
        raise ValueError(
            f"{type(loss_fn).__name__}(reduction={reduction!r}) is not supported: the "
            "dataset-level matrices need a scalar loss; use reduction='mean' or 'sum'"
        )
    return reduction


def batch_weight(reduction: str | None, batch_size: int, batch_index: int) -> int:
    """The weight of one batch's reduced-loss quantity before ``finish`` divides."""
    if reduction is None and batch_index > 0:
        raise ValueError(
            "the loss has no `reduction` attribute, so batches cannot be weighted; pass one "
            "(X, y) pair, or a loss module with reduction='mean' or 'sum'"
        )
    return batch_size if reduction == "mean" else 1


def finish(
    results: dict[str, Tensor], reduction: str | None, total_samples: int, group: object
) -> None:
    """Sum the results over the processes of ``group`` (if any) and divide the weighted sums
    by the sample count for reduction ``"mean"``, all in place.

    Sample counts are summed first, so the mean is over every process's samples.
    """
    if group is not None:
        count = torch.tensor([float(total_samples)], device=next(iter(results.values())).device)
        dist.all_reduce(count, group=group)
        total_samples = int(count.item())
        for result in results.values():
            dist.all_reduce(result, group=group)
    if total_samples == 0:
        raise ValueError("data is empty: it yielded no batch; pass a non-empty data set")
    if reduction == "mean":
        for result in results.values():
            result.div_(total_samples)


def process_group_of(process_group: object, reduction: str | None) -> object:
    """The group to combine results over: ``process_group``, else the default group when
    ``torch.distributed`` is initialised, else ``None`` (one process)."""
    if process_group is None and dist.is_available() and dist.is_initialized():
        process_group = dist.group.WORLD
    if process_group is not None and reduction is None:
        raise ValueError(
            "the loss has no `reduction` attribute, so results of several processes cannot be "
            "weighted; use a loss module with reduction='mean' or 'sum'"
        )
    return process_group


def check_same_layout(plan: Layout, group: object) -> None:
    """Raise on every process alike if the processes' parameter counts differ (instead of
    hanging in a collective of mismatched sizes)."""
    if group is None:
        return
    sizes: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(sizes, [p.numel() for p in plan.params], group=group)
    if any(size != sizes[0] for size in sizes):
        totals = [sum(size) for size in sizes]
        raise ValueError(
            f"the processes' models differ: parameter counts per rank {totals} (per tensor "
            f"{sizes}); give every process the same model and params"
        )


def prepare(
    model: nn.Module,
    loss_fn: nn.Module,
    params: list[nn.Parameter] | None,
    structure: str,
    max_memory: int,
    process_group: object,
) -> tuple[Layout, str | None, object]:
    """Check a dataset-level call's arguments; return its layout, the loss's reduction and
    the process group to combine over (``None``: one process)."""
    plan = layout(model, params, structure, max_memory)
    check_model_mode(model)
    reduction = reduction_of(loss_fn)
    group = process_group_of(process_group, reduction)
    check_same_layout(plan, group)
    return plan, reduction, group


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` (curvhooks combines results itself)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
