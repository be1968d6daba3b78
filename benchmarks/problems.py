"""The two benchmark problems shared by every benchmark script."""

from __future__ import annotations

import torch
from torch import nn


def mlp() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """MLP 784-512-256-10, batch 128, cross-entropy."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    return model, nn.CrossEntropyLoss(), torch.randn(128, 784), torch.randint(0, 10, (128,))


def cnn() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """CIFAR-sized CNN: conv 3-32-32 with ReLU, stride-2 conv to 64 with Sigmoid, Linear to 10;
    batch 32, cross-entropy."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(64 * 16 * 16, 10),
    )
    return model, nn.CrossEntropyLoss(), torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))


PROBLEMS = {"mlp": mlp, "cnn": cnn}


def on_device(problem, device: torch.device):
    model, loss_fn, X, y = problem()
    return model.to(device), loss_fn, X.to(device), y.to(device)
