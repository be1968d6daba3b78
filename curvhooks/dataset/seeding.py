"""Draws seeded by curvhooks' functions, leaving the caller's random state as it was."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Draw from ``seed`` in the block (on the CPU, and on ``device`` where it is a GPU),
    then restore the random state; a plain block for ``seed=None``."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
