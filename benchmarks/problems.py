"""Benchmark problems. ``PROBLEMS``, shared by the per-step scripts: chains (``mlp``,
``cnn``, ``lenet5``), residual CNNs (``resnet``, ``resnet8`` with BatchNorm) and a
transformer, each a model, a loss and one batch. ``residual``:
a tiny residual CNN with a few batches, for the dense matrices (beside the visual tour);
``resnet18``: torchvision's ResNet-18 over 1,024 images, for the operators' memory.
``RESIDUAL`` names the problems whose model is not a chain (BackPACK needs its converter)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from examples.architectures import BasicBlock, Transformer, lenet5, resnet8

Problem = tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]
DenseProblem = tuple[nn.Module, nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]


def mlp() -> Problem:
    """MLP 784-512-256-10, batch 128, cross-entropy."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    return model, nn.CrossEntropyLoss(), torch.randn(128, 784), torch.randint(0, 10, (128,))


def cnn() -> Problem:
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


class ResidualBlock(nn.Module):
    """``relu2(x + conv2(relu1(conv1(x))))`` with two 3x3 convolutions that keep the shape.

    Modules only (no ``torch.relu`` calls), so that BackPACK's converter can trace it.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` of shape ``[N, channels, H, W]`` to the same shape."""
        return self.relu2(x + self.conv2(self.relu1(self.conv1(x))))


def residual_cnn(width: int, blocks: int, classes: int, side: int) -> nn.Sequential:
    """Stem conv 3->width with ReLU, ``blocks`` residual blocks at ``width``, stride-2 conv to
    ``2 * width`` with ReLU, ``blocks`` residual blocks at ``2 * width``, global average
    pooling, Linear to ``classes``; maps ``[N, 3, side, side]`` (``side`` even) to
    ``[N, classes]``.

    The pooling is an ``AvgPool2d`` over the whole ``side / 2`` map rather than an
    ``AdaptiveAvgPool2d``, which BackPACK's ``SqrtGGNExact`` does not support.
    """
    wide = 2 * width
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        *(ResidualBlock(width) for _ in range(blocks)),
        nn.Conv2d(width, wide, 3, stride=2, padding=1),
        nn.ReLU(),
        *(ResidualBlock(wide) for _ in range(blocks)),
        nn.AvgPool2d(side // 2),
        nn.Flatten(),
        nn.Linear(wide, classes),
    )


def resnet() -> Problem:
    """CIFAR-sized residual CNN: ``residual_cnn(16, 2, 10, 32)`` (stages at 16 and 32 channels,
    two blocks each, 51,690 parameters) on ``[64, 3, 32, 32]``, cross-entropy."""
    torch.manual_seed(0)
    model = residual_cnn(16, 2, 10, 32)
    return model, nn.CrossEntropyLoss(), torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))


def residual() -> DenseProblem:
    """Tiny residual CNN for dense matrices, in the visual tour's spirit:
    ``residual_cnn(3, 1, 5, 8)`` (stages at 3 and 6 channels, one block each, 1,115
    parameters); 50 random images ``[3, 8, 8]`` with 5 classes in batches of 20, 20 and 10
    (``[(X, y)]`` with ``X`` of shape ``[B, 3, 8, 8]``, ``y`` of shape ``[B]``); cross-entropy."""
    torch.manual_seed(0)
    X, y = torch.rand(50, 3, 8, 8), torch.randint(0, 5, (50,))
    model = residual_cnn(3, 1, 5, 8)
    return model, nn.CrossEntropyLoss(), list(zip(X.split(20), y.split(20), strict=True))


def lenet() -> Problem:
    """LeNet-5 (``lenet5()``, 61,706 parameters) on ``[64, 1, 32, 32]``, cross-entropy."""
    torch.manual_seed(0)
    model = lenet5()
    return model, nn.CrossEntropyLoss(), torch.randn(64, 1, 32, 32), torch.randint(0, 10, (64,))


def resnet_8() -> Problem:
    """CIFAR ResNet-8 (``resnet8(width=16)``, 78,042 parameters), BatchNorm in eval mode with
    statistics of the batch, on ``[64, 3, 32, 32]``, cross-entropy."""
    torch.manual_seed(0)
    model, X = resnet8(width=16), torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        model(X)
    return model.eval(), nn.CrossEntropyLoss(), X, torch.randint(0, 10, (64,))


def resnet18(batches: int = 16) -> DenseProblem:
    """torchvision's ResNet-18 for 10 classes (a 7x7 stride-2 stem with BatchNorm, ReLU and
    3x3 max pooling, four stages of two ``BasicBlock`` at 64, 128, 256 and 512 channels,
    global average pooling, a Linear head: 11,181,642 parameters), BatchNorm in eval mode, on
    ``batches`` batches of 64 random CIFAR-sized images ``[64, 3, 32, 32]``; cross-entropy."""
    torch.manual_seed(0)
    stages, channels = [], 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        stages += [BasicBlock(channels, width, stride), BasicBlock(width, width, 1)]
        channels = width
    model = nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, padding=3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, padding=1),
        *stages,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(512, 10),
    ).eval()
    data = [(torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))) for _ in range(batches)]
    return model, nn.CrossEntropyLoss(), data


def transformer() -> Problem:
    """Two-layer transformer encoder (``Transformer(vocabulary=1000, tokens=64, width=128,
    heads=4, layers=2, classes=1000)``, 661,992 parameters) on 32 sequences of 64 tokens, next-token
    cross-entropy over ``[32, 1000, 64]`` logits."""
    torch.manual_seed(0)
    model = Transformer(vocabulary=1000, tokens=64, width=128, heads=4, layers=2, classes=1000)
    tokens = torch.randint(0, 1000, (32, 65))
    return model, nn.CrossEntropyLoss(), tokens[:, :-1], tokens[:, 1:]


PROBLEMS = {
    "mlp": mlp,
    "cnn": cnn,
    "resnet": resnet,
    "lenet5": lenet,
    "resnet8": resnet_8,
    "transformer": transformer,
}
RESIDUAL = ("resnet", "residual", "resnet8")
SEQUENCE = ("transformer",)
"""Problems with a sequence loss, for first order only (an exact GGN stack holds a vector per
class and token)."""


def on_device(problem: Callable[[], Problem], device: torch.device) -> Problem:
    """``problem()`` with model and batch on ``device``."""
    model, loss_fn, X, y = problem()
    return model.to(device), loss_fn, X.to(device), y.to(device)
