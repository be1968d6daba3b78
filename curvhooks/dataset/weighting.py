"""Batches of a data set, and the one place that weights them.

The whole-dataset loss is ``L = s * sum_n l_n``. For reduction ``"sum"`` each batch's
reduced loss adds with weight 1. For ``"mean"`` the factor s is proportional to
1 / (number of samples), so batch b adds with weight ``N_b`` and the sum is divided by the
total sample count at the end: unequal batches are weighted right in a single pass over the
data. Under ``torch.distributed`` each process accumulates its own batches; the sums and
sample counts are then summed over the processes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn


class DatasetSum:
    """Sums per-batch quantities of the reduced loss into those of the whole-dataset loss.

    Args:
        loss_fn: The loss; its ``reduction`` (``"mean"``, ``"sum"``, or none for a single
            batch) decides the weights.
        process_group: Under ``torch.distributed``, the processes to combine (default: all,
            when initialised).
    """

    def __init__(self, loss_fn: nn.Module, process_group: object) -> None:
        self.reduction = _reduction_of(loss_fn)
        self.group = _process_group_of(process_group, self.reduction)
        self.samples = 0

    def batches(
        self, data: Iterable | tuple[Tensor, Tensor], device: torch.device, progress: bool
    ) -> Iterator[tuple[Tensor, Tensor, float]]:
        """``(X, y, weight)`` for each batch of ``data``, on ``device``: add ``weight`` times
        the batch's reduced-loss quantity, then call ``finish``."""
        for index, (X, y) in enumerate(batches(data, device, progress)):
            if self.reduction is None and index > 0:
                raise ValueError(
                    "the loss has no `reduction` attribute, so batches cannot be weighted; pass "
                    "one (X, y) pair, or a loss module with reduction='mean' or 'sum'"
                )
            self.samples += len(y)
            yield X, y, (len(y) if self.reduction == "mean" else 1)

    def finish(self, results: dict[object, Tensor]) -> None:
        """Sum the results over the processes (if any) and divide the weighted sums by the
        sample count for reduction ``"mean"``, all in place.

        Sample counts are summed first, so the mean is over every process's samples.
        """
        total = self.samples
        if self.group is not None:
            device = next(iter(results.values())).device
            count = torch.tensor([float(total)], device=device)
            dist.all_reduce(count, group=self.group)
            total = int(count.item())
            for result in results.values():
                dist.all_reduce(result, group=self.group)
        if total == 0:
            raise ValueError("data is empty: it yielded no batch; pass a non-empty data set")
        if self.reduction == "mean":
            for result in results.values():
                result.div_(total)


def _reduction_of(loss_fn: nn.Module) -> str | None:
    """The loss's reduction (``"mean"``/``"sum"``); ``None`` for a loss without one."""
    reduction = getattr(loss_fn, "reduction", None)
    if reduction not in (None, "mean", "sum"):
        raise ValueError(
            f"{type(loss_fn).__name__}(reduction={reduction!r}) is not supported: the "
            "dataset-level matrices need a scalar loss; use reduction='mean' or 'sum'"
        )
    return reduction


def _process_group_of(process_group: object, reduction: str | None) -> object:
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
