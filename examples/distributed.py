"""Curvature of a data set sharded over processes with torch.distributed.

Each process iterates only its own shard (a ``DistributedSampler``); every process receives
the matrices that one process would compute on all the data.

Run: ``torchrun --nproc_per_node 2 examples/distributed.py``
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import curvhooks


def setting() -> tuple[TensorDataset, nn.Module, nn.Module]:
    """The same data set and model on every process (same seed)."""
    torch.manual_seed(0)
    dataset = TensorDataset(torch.rand(50, 3, 10, 10), torch.randint(0, 5, (50,)))
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(400, 5))
    return dataset, model, nn.CrossEntropyLoss()


def main() -> None:
    dist.init_process_group("gloo")  # "nccl" for one GPU per process
    dataset, model, loss_fn = setting()
    sampler = DistributedSampler(dataset, shuffle=False, drop_last=False)
    loader = DataLoader(dataset, batch_size=8, sampler=sampler)

    found = curvhooks.matrices(model, loss_fn, loader, kinds=("ggn", "empirical_fisher"))
    if dist.get_rank() == 0:
        for kind, matrix in found.items():
            print(f"{kind}: {tuple(matrix.shape)}, trace {matrix.trace():.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
