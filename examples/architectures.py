"""Three architectures people train, sized by arguments: a LeNet-5, a CIFAR ResNet-8 and a
small transformer encoder. The example ``real_models.py``, the tests (at tiny sizes, against
``torch.func`` in float64) and the benchmarks build them from here.

Each is made of modules curvhooks supports and torch functions between them; nothing in them
is written for curvhooks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def lenet5(
    side: int = 32,
    in_channels: int = 1,
    channels: tuple[int, int] = (6, 16),
    hidden: tuple[int, int] = (120, 84),
    classes: int = 10,
) -> nn.Sequential:
    """LeCun et al.'s LeNet-5 with max pooling: ``[N, in_channels, side, side]`` to
    ``[N, classes]`` by two 5x5 convolutions, each followed by Tanh and 2x2 max pooling, then
    three Linear layers with Tanh between them (``side`` at least 16)."""
    pooled = ((side - 4) // 2 - 4) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, channels[0], 5),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Conv2d(channels[0], channels[1], 5),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(channels[1] * pooled**2, hidden[0]),
        nn.Tanh(),
        nn.Linear(hidden[0], hidden[1]),
        nn.Tanh(),
        nn.Linear(hidden[1], classes),
    )


class BasicBlock(nn.Module):
    """He et al.'s residual block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``, with a
    strided 1x1 convolution and BatchNorm as the shortcut where the shape changes. Modules
    only (no ``torch.relu``), so that BackPACK's converter can trace it for the benchmarks."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        """``[N, in, H, W]`` to ``[N, out, H / stride, W / stride]``."""
        inner = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(inner + self.shortcut(x))


def resnet8(width: int = 16, classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    """The CIFAR ResNet-8: a 3x3 stem convolution with BatchNorm and ReLU, three stages of one
    ``BasicBlock`` each at ``width``, ``2 * width`` and ``4 * width`` channels (the last two
    halving the resolution), global average pooling and a Linear head. BatchNorm is used in
    eval mode for curvature (its running statistics, as at test time)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        BasicBlock(width, width, 1),
        BasicBlock(width, 2 * width, 2),
        BasicBlock(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, classes),
    )


class SelfAttention(nn.Module):
    """Multi-head self-attention from ``nn.Linear`` modules and torch functions:
    ``[N, T, E]`` to ``[N, T, E]``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.out = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, width = x.shape

        def split(h: Tensor) -> Tensor:  # [N, T, E] -> [N, heads, T, E / heads]
            return h.view(batch, tokens, self.heads, -1).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        mixed = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.out(mixed.transpose(1, 2).reshape(batch, tokens, width))


class EncoderLayer(nn.Module):
    """A pre-norm transformer encoder layer: ``x + attention(norm(x))``, then
    ``h + mlp(norm(h))`` with a GELU MLP of ``hidden`` units."""

    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = SelfAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor) -> Tensor:
        """``[N, T, E]`` to ``[N, T, E]``."""
        h = x + self.attention(self.norm1(x))
        return h + self.mlp(self.norm2(h))


class Transformer(nn.Module):
    """A token-level transformer encoder: token and learned position embeddings, ``layers``
    pre-norm encoder layers, a final LayerNorm and a Linear head; ``[N, T]`` token indices to
    logits ``[N, classes, T]`` (classes in dimension 1, as ``nn.CrossEntropyLoss`` takes them
    for sequences)."""

    def __init__(
        self,
        vocabulary: int = 100,
        tokens: int = 32,
        width: int = 64,
        heads: int = 4,
        layers: int = 2,
        classes: int = 100,
    ) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocabulary, width)
        self.positions = nn.Embedding(tokens, width)
        self.layers = nn.Sequential(*(EncoderLayer(width, heads, 4 * width) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        h = self.layers(self.tokens(tokens) + self.positions(positions))
        return self.head(self.norm(h)).transpose(1, 2)
