"""Batches of a data set, and the one place that weights them.

The whole-dataset loss is ``L = s * sum_n l_n``. For reduction ``"sum"`` each batch's
reduced loss adds with weight 1. For ``"mean"`` the factor s is proportional to
1 / (number of samples), so batch b adds with weight ``N_b`` and the sum is divided by the
total sample count at the end: unequal batches are weighted right in a single pass over the
data. A quantity that is a mean over samples (KFAC's input factor) is averaged over the
batches by their sample counts whatever the reduction. Under ``torch.distributed`` each
process accumulates its own batches; the sums and sample counts are then summed over the
processes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

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
        batch_size_fn: The sample count of a batch's input (default: ``y.shape[0]``).
        keeps_loss: Whether ``add_loss`` sums the whole-dataset loss (``loss``).
    """

    def __init__(
        self,
        loss_fn: nn.Module,
        process_group: object,
        batch_size_fn: Callable[[Inputs], int] | None = None,
        keeps_loss: bool = False,
    ) -> None:
        self.loss_fn = loss_fn
        self.batch_size_fn = batch_size_fn
        self.reduction = _reduction_of(loss_fn)
        self.group = _process_group_of(process_group, self.reduction)
        self.samples = 0
        self.keeps_loss = keeps_loss
        self.loss: Tensor | None = None
        """With ``keeps_loss``, after ``finish``: the whole-dataset loss ``L`` (0-dim)."""

    def add_loss(self, output: Tensor, y: Tensor, weight: float) -> None:
        """With ``keeps_loss``, add the batch's reduced loss on its model ``output`` with the
        batch's ``weight``; nothing otherwise."""
        if self.keeps_loss:  # forward: the hooks on the loss would record this call
            loss = self.loss_fn.forward(output.detach(), y).detach() * weight
            self.loss = loss if self.loss is None else self.loss.add_(loss)

    def batches(
        self, data: Iterable | tuple[Inputs, Tensor], device: torch.device, progress: bool
    ) -> Iterator[tuple[Inputs, Tensor, float, int]]:
        """``(X, y, weight, N_b)`` for each batch of ``data``, on ``device``: add ``weight``
        times the batch's reduced-loss quantity (and average means over samples by ``N_b``),
        then call ``finish``."""
        sized = batches(data, device, progress, self.batch_size_fn)
        for index, (X, y, size) in enumerate(sized):
            if self.reduction is None and index > 0:
                raise ValueError(
                    "the loss has no `reduction` attribute, so batches cannot be weighted; pass "
                    "one (X, y) pair, or a loss module with reduction='mean' or 'sum'"
                )
            self.samples += size
            yield X, y, (size if self.reduction == "mean" else 1), size

    def finish(
        self, results: dict[object, Tensor], means: dict[object, Tensor] | None = None
    ) -> None:
        """Sum the results over the processes (if any) and divide the weighted sums by the
        sample count for reduction ``"mean"``, all in place. ``means`` are averages over this
        process's samples (whatever the reduction); under ``torch.distributed`` they become
        averages over every process's samples.

        Sample counts are summed first, so the mean is over every process's samples.
        """
        means = means or {}
        if self.loss is not None:  # weighted and reduced as every other sum
            results = {**results, _LOSS: self.loss}
        total = self.samples
        if self.group is not None:
            device = next(iter({**results, **means}.values())).device
            count = torch.tensor([float(total)], device=device)
            dist.all_reduce(count, group=self.group)
            for mean in means.values():
                mean.mul_(self.samples)
            total = int(count.item())
            for result in [*results.values(), *means.values()]:
                dist.all_reduce(result, group=self.group)
            for mean in means.values():
                mean.div_(max(total, 1))
        if total == 0:
            raise ValueError("data is empty: it yielded no batch; pass a non-empty data set")
        if self.reduction == "mean":
            for result in results.values():
                result.div_(total)


_LOSS = object()
"""``finish``'s key of the summed loss."""


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


Inputs = object
"""A batch's model input: a tensor, or a nested dict, list, tuple or ``Mapping`` of tensors."""


def batches(
    data: Iterable | tuple[Inputs, Tensor],
    device: torch.device,
    progress: bool = False,
    batch_size_fn: Callable[[Inputs], int] | None = None,
) -> Iterator[tuple[Inputs, Tensor, int]]:
    """``(X, y, N)`` for each batch of ``data`` on ``device``; ``data`` may be one pair. N is
    ``batch_size_fn(X)`` if given, else ``y.shape[0]``."""
    source = [data] if _is_single_pair(data) else data
    for batch in _with_progress(source) if progress else source:
        X, y = _unpack(batch)
        size = _batch_size(X, y, batch_size_fn)
        yield to_device(X, device), y.to(device), size


class FirstBatchKept:
    """A one-shot iterator of batches whose first batch is kept: iterating again yields it
    again, then the iterator's rest (for a pass that stopped after the first batch)."""

    def __init__(self, batches: Iterator) -> None:
        self._batches = batches
        self._first: list = []
        self._taken = 0

    def __iter__(self) -> Iterator:
        if self._taken > 1:
            raise ValueError(
                "one-shot data (an iterator) was iterated past its first batch already, so "
                "it cannot be iterated again; pass data that can be (a list, a DataLoader)"
            )
        yield from self._first
        for batch in self._batches:
            if not self._first:
                self._first.append(batch)
            self._taken += 1
            yield batch


def _is_single_pair(data: object) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor)


def _with_progress(source: Iterable) -> Iterator:
    """``source`` behind a progress bar on stderr: tqdm's where installed, else a line."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _progress_line(source)
    return iter(tqdm(source, total=_length(source), unit="batch", file=sys.stderr))


def _progress_line(source: Iterable) -> Iterator:
    count, start, total = 0, time.perf_counter(), _length(source)
    for batch in source:
        count += 1
        _show_progress(count, total, time.perf_counter() - start)
        yield batch
    print(file=sys.stderr)


def to_device(inputs: Inputs, device: torch.device) -> Inputs:
    """``inputs`` with every tensor in it moved to ``device``, containers rebuilt alike."""
    return map_tensors(lambda tensor: tensor.to(device), inputs)


def map_tensors(function: Callable[[Tensor], Tensor], inputs: Inputs) -> Inputs:
    """``inputs`` with ``function`` applied to every tensor in it, containers rebuilt alike."""
    if isinstance(inputs, Tensor):
        return function(inputs)
    if isinstance(inputs, Mapping):
        mapped = {key: map_tensors(function, value) for key, value in inputs.items()}
        return mapped if type(inputs) is dict else _rebuilt(inputs, mapped)
    if isinstance(inputs, (list, tuple)):
        mapped = [map_tensors(function, value) for value in inputs]
        if hasattr(inputs, "_fields"):  # a named tuple
            return type(inputs)(*mapped)
        return type(inputs)(mapped)
    return inputs


def _rebuilt(mapping: Mapping, items: dict) -> Mapping:
    """A mapping of ``mapping``'s type holding ``items`` (a plain dict where the type cannot be
    built from one)."""
    try:
        return type(mapping)(items)
    except TypeError:
        return items


def _unpack(batch: object) -> tuple[Inputs, Tensor]:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError(
            f"each batch must be a pair (X, y), got {type(batch).__name__}; "
            "pass a DataLoader over a TensorDataset(X, y) or an iterable of (X, y) pairs"
        )
    X, y = batch
    if not isinstance(y, Tensor):
        raise TypeError(f"the targets y of a batch must be a tensor, got {type(y).__name__}")
    return X, y


def _batch_size(X: Inputs, y: Tensor, batch_size_fn: Callable[[Inputs], int] | None) -> int:
    """The batch's sample count; checked against a tensor input's first dimension."""
    if batch_size_fn is not None:
        size = batch_size_fn(X)
    else:
        size = y.shape[0] if y.dim() else 0
        if isinstance(X, Tensor) and (X.dim() == 0 or len(X) != size):
            raise ValueError(
                f"X and y hold different numbers of samples "
                f"({len(X) if X.dim() else 0} and {size}); pass inputs and targets of the same "
                "length (or batch_size_fn= for inputs whose first dimension is not the batch)"
            )
    if size == 0:
        raise ValueError("a batch is empty; drop empty batches from the data")
    return size


def _length(source: object) -> int | None:
    try:
        return len(source)  # type: ignore[arg-type]
    except TypeError:
        return None


def _show_progress(count: int, total: int | None, elapsed: float) -> None:
    of_total = f"/{total}" if total is not None else ""
    print(f"\rbatch {count}{of_total}, {elapsed:.1f} s", end="", file=sys.stderr, flush=True)
