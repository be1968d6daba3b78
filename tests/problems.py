"""The shared problem list: every extension's test runs on all of these.

Each problem is a small float64 model, an input batch and a loss; ``make`` builds all three
from a fixed seed so that every test sees the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from examples.architectures import Transformer, lenet5, resnet8

LOSSES: dict[str, Callable[[], nn.Module]] = {
    "ce-mean": lambda: nn.CrossEntropyLoss(reduction="mean"),
    "ce-sum": lambda: nn.CrossEntropyLoss(reduction="sum"),
    "mse-mean": lambda: nn.MSELoss(reduction="mean"),
    "mse-sum": lambda: nn.MSELoss(reduction="sum"),
    "bce-mean": lambda: nn.BCEWithLogitsLoss(reduction="mean"),
    "bce-sum": lambda: nn.BCEWithLogitsLoss(reduction="sum"),
}
CE_MSE = ("ce-mean", "ce-sum", "mse-mean", "mse-sum")
"""The losses every problem runs with; BCE runs where a problem names it."""


@dataclass(frozen=True)
class Problem:
    name: str
    build_model: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    batch_size: int = 3
    losses: tuple[str, ...] = CE_MSE
    hessian_glue: str | None = None
    """The nonlinear operation outside the supported modules that the Hessian extensions
    reject (they are exact where this is ``None``)."""
    is_chain: bool = True
    """Whether the model is a chain of supported modules (so both routes apply)."""
    vocabulary: int | None = None
    """For token inputs: indices drawn from ``range(vocabulary)`` instead of Gaussian inputs."""

    def make(
        self,
        loss: str,
        device: str = "cpu",
        dtype: torch.dtype = torch.float64,
        seed: int = 0,
        num_samples: int | None = None,
    ) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
        """``(model, loss_fn, X, y)`` on ``device``, reproducible from ``seed`` and the same
        numbers on every device (drawn on the CPU); X holds ``num_samples`` samples (default:
        the problem's batch size)."""
        torch.manual_seed(seed)
        model = self.build_model().to(dtype=dtype)
        num_samples = num_samples or self.batch_size
        if self.vocabulary is None:
            X = torch.randn(num_samples, *self.input_shape, dtype=dtype)
        else:
            X = torch.randint(0, self.vocabulary, (num_samples, *self.input_shape))
        with torch.no_grad():
            output = model(X)
        if loss.startswith("ce"):
            y = torch.randint(0, output.shape[1], (num_samples, *output.shape[2:]))
        elif loss.startswith("bce"):
            y = torch.rand_like(output)
        else:
            y = torch.randn_like(output)
        model, X, y = model.to(device), X.to(device), y.to(device)
        return model, LOSSES[loss](), X, y


def _frozen(model: nn.Sequential, *indices: int) -> nn.Sequential:
    """Freeze the parameters of the listed children."""
    for index in indices:
        model[index].requires_grad_(False)
    return model


def _frozen_bias(model: nn.Sequential) -> nn.Sequential:
    model[0].bias.requires_grad_(False)
    return model


def _conv_net(**conv_args) -> nn.Sequential:
    conv = nn.Conv2d(2, 4, **conv_args)
    with torch.no_grad():
        out_shape = conv(torch.zeros(1, 2, 7, 6)).shape
    return nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(out_shape[1:].numel(), 3))


class Unsupported(nn.Module):
    """A parameter-free module curvhooks has no derivatives for: ``x ** 3``."""

    def forward(self, x: Tensor) -> Tensor:
        return x**3


class Scaled(nn.Module):
    """A module with a parameter curvhooks has no derivatives for: ``x * weight``."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


class Permute(nn.Module):
    """``x.permute(*dims)``: classes to dimension 1 for a sequence loss."""

    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)


class Residual(nn.Module):
    """``relu(x + inner(x))``: a skip connection around ``inner`` and a torch function."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.inner(x))


class Branches(nn.Module):
    """Two branches of the same input joined by ``torch.cat`` along the features."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Linear(6, 3)
        self.right = nn.Sequential(nn.Linear(6, 2), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.left(x), self.right(x)], dim=1)


class Reshapes(nn.Module):
    """A Linear on ``[N, 2, 4]``, then a permute, a reshape and a slice before the head."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 5)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.first(x).permute(0, 2, 1)  # [N, 5, 2]
        return self.head(h.reshape(h.shape[0], -1)[:, 1:9] * 0.5)


class TwoHeads(nn.Module):
    """One trunk feeding two heads whose outputs are added."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 5), nn.ReLU())
        self.head = nn.Linear(5, 3)
        self.other = nn.Sequential(nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3))

    def forward(self, x: Tensor) -> Tensor:
        h = self.trunk(x)
        return self.head(h) + self.other(h)


class Attention(nn.Module):
    """Single-head self-attention over ``[N, T, E]`` from ``nn.Linear`` modules and torch
    functions, then a Linear head on the flattened tokens."""

    def __init__(self, tokens: int = 3, width: int = 4) -> None:
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.head = nn.Linear(tokens * width, 3)

    def forward(self, x: Tensor) -> Tensor:
        scores = torch.matmul(self.query(x), self.key(x).transpose(1, 2)) / 2.0
        mixed = torch.matmul(torch.softmax(scores, dim=-1), self.value(x))
        return self.head(mixed.flatten(1))


class MultiheadAttending(nn.Module):
    """``nn.MultiheadAttention`` (packed projections, weights returned and used) between
    ``nn.Linear`` layers, then a Linear head on the flattened tokens."""

    def __init__(self, tokens: int = 3, width: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(width, width)
        self.attention = nn.MultiheadAttention(width, 2, batch_first=True)
        self.head = nn.Linear(tokens * (width + tokens), 3)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.embed(x)
        mixed, weights = self.attention(hidden, hidden, hidden)
        return self.head(torch.cat([mixed, weights], 2).flatten(1))


class Recurrent(nn.Module):
    """``nn.RNN``, ``nn.GRU`` (not batch first) and a two-layer bidirectional ``nn.LSTM``
    one after the other between ``nn.Linear`` layers, read at the last step and at the
    final cell states."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(width, 3)
        self.rnn = nn.RNN(3, 3, nonlinearity="relu", batch_first=True)
        self.gru = nn.GRU(3, 3)
        self.lstm = nn.LSTM(3, 2, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(4 + 8, 3)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.rnn(self.embed(x))[0]
        hidden = self.gru(hidden.transpose(0, 1))[0].transpose(0, 1)
        output, (_, cells) = self.lstm(hidden)
        return self.head(torch.cat([output[:, -1], cells.transpose(0, 1).flatten(1)], 1))


class ClassToken(nn.Module):
    """A vision-transformer-like container: a class token and position embeddings held and
    used by the model's own ``forward`` (no module call), around linear layers."""

    def __init__(self, patches: int = 3, width: int = 4) -> None:
        super().__init__()
        self.patch = nn.Linear(width, width)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, patches + 1, width))
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x: Tensor) -> Tensor:
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), self.patch(x)], 1)
        hidden = torch.tanh(self.mix(tokens + self.pos_embed))
        return self.head(hidden[:, 0] * self.cls_token[0, 0] + hidden[:, 1:].mean(1))


class TiedWeights(nn.Module):
    """Two Linear modules sharing one weight (as an embedding tied to an output layer), one
    feeding the other."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(5, 5), nn.Linear(5, 5)
        self.second.weight = self.first.weight
        self.act, self.head = nn.Sigmoid(), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act(self.second(torch.relu(self.first(x)))))


class TiedEmbedding(nn.Module):
    """A token model whose output layer shares the embedding's weight (as language models
    do): ``embed^T tanh(mean_t embed(x_t))``."""

    def __init__(self, vocabulary: int = 5, width: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.act = nn.Tanh()
        self.output = nn.Linear(width, vocabulary)
        self.output.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.output(self.act(self.embed(tokens).mean(1)))


class PositionEmbedding(nn.Module):
    """Token embeddings plus a position embedding called on ids ``[1, T]`` and broadcast
    over the batch (as Hugging Face's BERT and GPT-2 do), then Tanh, a head and a mean over
    positions."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(7, 4)
        self.positions = nn.Embedding(5, 4)
        self.tanh = nn.Tanh()
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        ids = torch.arange(x.shape[1], device=x.device)[None]
        return self.head(self.tanh(self.tokens(x) + self.positions(ids))).mean(1)


class TiedPositions(nn.Module):
    """One embedding for the tokens and for the positions (ids ``[1, T]`` broadcast over the
    batch): a parameter used by a call of the whole batch and by one shared by it."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(7, 4)
        self.tanh = nn.Tanh()
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        ids = torch.arange(x.shape[1], device=x.device)[None]
        return self.head(self.tanh(self.embedding(x) + self.embedding(ids))).mean(1)


class SharedConstant(nn.Module):
    """A module applied to a constant ``[1, 2]`` shared by the batch, added to each
    sample's features."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Linear(4, 3)
        self.offset = nn.Linear(2, 3)
        self.register_buffer("constant", torch.randn(1, 2))
        self.sigmoid = nn.Sigmoid()
        self.head = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.sigmoid(self.features(x) + self.offset(self.constant)))


class Siamese(nn.Module):
    """One encoder called twice, side by side, on two views of the input."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 4), nn.Sigmoid())
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x) - self.encoder(2 * x + 1))


class UNetSkip(nn.Module):
    """A strided convolution, a transposed convolution back to the input's size (through
    ``output_size=``) and a skip around both."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, groups=2)
        self.head = nn.Linear(84, 3)

    def forward(self, x: Tensor) -> Tensor:
        up = self.up(torch.relu(self.down(x)), output_size=x.shape[-2:])
        return self.head((x + up).flatten(1))


def _unrolled_recurrence() -> nn.Sequential:
    """One cell applied twice in a row: ``head(cell(relu(cell(x))))``."""
    cell = nn.Linear(5, 5)
    return nn.Sequential(nn.Linear(6, 5), cell, nn.ReLU(), cell, nn.Linear(5, 3))


class PostProcessed(nn.Sequential):
    """An ``nn.Sequential`` whose own ``forward`` adds a skip around its children:
    ``x + 0.1 * children(x)``, so it is no chain of its children."""

    def forward(self, x: Tensor) -> Tensor:
        return x + 0.1 * super().forward(x)


def eval_batchnorm(module: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """``module`` in eval mode with random running statistics and affine parameters."""
    with torch.no_grad():
        module.running_mean.uniform_(-1, 1)
        module.running_var.uniform_(0.5, 2)
        if module.affine:
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-1, 1)
    return module.eval()


def random_affine(module: nn.Module) -> nn.Module:
    """``module`` (a normalisation layer) with random weight and bias instead of the identity
    they start as."""
    with torch.no_grad():
        for param in module.parameters():
            param.uniform_(0.5, 1.5)
    return module


def _resnet8() -> nn.Module:
    """A ResNet-8 two channels wide, its BatchNorm layers in eval mode with random statistics."""
    model = resnet8(width=2, classes=3)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            eval_batchnorm(module)
    return model


def _conv_residual() -> nn.Sequential:
    block = nn.Sequential(
        nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(3, 3, 3, padding=1)
    )
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2), nn.ReLU(), Residual(block), nn.Flatten(), nn.Linear(18, 3)
    )


def _unsupported_in_chain() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 5), Unsupported(), nn.Linear(5, 3))


PROBLEMS: list[Problem] = [
    Problem(
        "mlp",
        lambda: nn.Sequential(
            nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3)
        ),
        (6,),
        losses=tuple(LOSSES),
    ),
    Problem(
        "mlp-inplace-relu",
        lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)),
        (6,),
    ),
    Problem(
        "nested-sequential",
        lambda: nn.Sequential(
            nn.Sequential(nn.Linear(6, 5), nn.Sigmoid()),
            nn.Sequential(nn.Sequential(nn.Linear(5, 4), nn.ReLU()), nn.Linear(4, 3)),
        ),
        (6,),
    ),
    Problem(
        "frozen-params",
        lambda: _frozen_bias(
            _frozen(
                nn.Sequential(
                    nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)
                ),
                2,
            )
        ),
        (6,),
    ),
    Problem(
        "batch-of-one",
        lambda: nn.Sequential(nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 3)),
        (4,),
        batch_size=1,
    ),
    Problem(
        "linear-extra-dims",
        lambda: nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Flatten(), nn.Linear(10, 3)),
        (2, 4),
    ),
    Problem(
        "linear-extra-dims-inplace",
        lambda: nn.Sequential(
            nn.Linear(4, 5),
            nn.ELU(alpha=0.5, inplace=True),
            nn.Linear(5, 4),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(8, 3),
        ),
        (2, 4),
    ),
    Problem(
        "conv-flatten-inplace",
        lambda: nn.Sequential(
            nn.Conv2d(2, 2, 3, stride=2), nn.Flatten(), nn.ReLU(inplace=True), nn.Linear(12, 3)
        ),
        (2, 7, 6),
    ),
    Problem(
        "linear-extra-dims-output",
        lambda: nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3)),
        (2, 4),
        losses=("mse-mean", "mse-sum", "bce-mean", "bce-sum"),
    ),
    Problem(
        "conv-stride-padding", lambda: _conv_net(kernel_size=3, stride=2, padding=1), (2, 7, 6)
    ),
    Problem(
        "conv-dilation-tuple",
        lambda: _conv_net(kernel_size=(3, 2), dilation=(2, 1), padding=(1, 2)),
        (2, 7, 6),
    ),
    Problem(
        "conv-groups-no-bias", lambda: _conv_net(kernel_size=2, groups=2, bias=False), (2, 7, 6)
    ),
    Problem(
        "conv-same-even-kernel",
        lambda: _conv_net(kernel_size=4, padding="same", dilation=2),
        (2, 7, 6),
    ),
    Problem(
        "conv-valid", lambda: _conv_net(kernel_size=3, padding="valid", stride=(1, 2)), (2, 7, 6)
    ),
    Problem(
        "activations-from-output",
        lambda: nn.Sequential(
            nn.Linear(6, 5),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Linear(5, 5),
            nn.ELU(alpha=0.7, inplace=True),
            nn.Linear(5, 5),
            nn.SELU(),
            nn.Linear(5, 4),
            nn.Tanh(),
            nn.Linear(4, 3),
        ),
        (6,),
    ),
    Problem(
        "activations-from-input",
        lambda: nn.Sequential(
            nn.Linear(6, 5),
            nn.GELU(),
            nn.Linear(5, 5),
            nn.GELU(approximate="tanh"),
            nn.Linear(5, 5),
            nn.SiLU(inplace=True),
            nn.Linear(5, 5),
            nn.Softplus(beta=2.0, threshold=1.0),
            nn.Linear(5, 4),
            nn.LogSigmoid(),
            nn.Linear(4, 3),
        ),
        (6,),
    ),
    Problem(
        "reshape-pad-dropout",
        lambda: nn.Sequential(
            nn.Linear(6, 8),
            nn.Unflatten(1, (2, 4)),
            nn.ZeroPad1d((1, -1)),
            nn.Sigmoid(),
            nn.ZeroPad1d((0, 2)),
            nn.Flatten(),
            nn.Dropout(0.3).eval(),
            nn.Identity(),
            nn.Linear(12, 3),
        ),
        (6,),
    ),
    Problem(
        "conv1d",
        lambda: nn.Sequential(
            nn.Conv1d(2, 4, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv1d(4, 4, 2, dilation=2, groups=2, bias=False),
            nn.Flatten(),
            nn.Linear(12, 3),
        ),
        (2, 9),
    ),
    Problem(
        "conv3d",
        lambda: nn.Sequential(
            nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1),
            nn.Sigmoid(),
            nn.Conv3d(3, 2, (1, 2, 2), padding="same"),
            nn.Flatten(),
            nn.Linear(96, 3),
        ),
        (2, 3, 4, 3),
    ),
    Problem(
        "conv-transpose2d",
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2),
            nn.Sigmoid(),
            nn.ConvTranspose2d(4, 2, 3, stride=2, output_padding=1, groups=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(96, 3),
        ),
        (2, 7, 6),
    ),
    Problem(
        "conv-transpose1d-3d",
        lambda: nn.Sequential(
            nn.Linear(6, 8),
            nn.Unflatten(1, (2, 4)),
            nn.ConvTranspose1d(2, 2, 2, stride=2, dilation=2, bias=False),
            nn.Tanh(),
            nn.Unflatten(2, (1, 3, 3)),
            nn.ConvTranspose3d(2, 2, (1, 2, 2), stride=(1, 1, 2), padding=(0, 1, 0)),
            nn.Flatten(),
            nn.Linear(24, 3),
        ),
        (6,),
    ),
    Problem(
        "embedding-padding",
        lambda: nn.Sequential(
            nn.Embedding(4, 3, padding_idx=0), nn.Flatten(), nn.Tanh(), nn.Linear(15, 3)
        ),
        (5,),
        vocabulary=4,
    ),
    Problem(
        "cnn-pooling",
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Tanh(),
            nn.Conv2d(3, 4, 2),
            nn.AvgPool2d(2, padding=1, count_include_pad=False),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d((2, 2)),
            nn.Flatten(),
            nn.Linear(16, 3),
        ),
        (2, 7, 6),
    ),
    Problem(
        "pooling-1d",
        lambda: nn.Sequential(
            nn.Linear(7, 8),
            nn.MaxPool1d(3, stride=2, padding=1),
            nn.Sigmoid(),
            nn.AvgPool1d(2),
            nn.AdaptiveAvgPool1d(3),
            nn.Flatten(),
            nn.Linear(6, 3),
        ),
        (2, 7),
    ),
    Problem(
        "pooling-3d",
        lambda: nn.Sequential(
            nn.Linear(6, 24),
            nn.Unflatten(1, (1, 2, 3, 4)),
            nn.MaxPool3d((1, 2, 2), stride=1),
            nn.Sigmoid(),
            nn.AvgPool3d((2, 1, 1)),
            nn.AdaptiveAvgPool3d((1, 2, 2)),
            nn.Flatten(),
            nn.Linear(4, 3),
        ),
        (6,),
    ),
    Problem(
        "ends-in-sigmoid",
        lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3), nn.Sigmoid()),
        (6,),
    ),
    Problem(
        "batchnorm3d-chain",
        lambda: nn.Sequential(
            eval_batchnorm(nn.BatchNorm3d(3)),
            nn.Linear(2, 3),
            eval_batchnorm(nn.BatchNorm3d(3)),
            nn.ReLU(),
            eval_batchnorm(nn.BatchNorm3d(3)),
            nn.Flatten(),
        ),
        (3, 4, 1, 2),
    ),
    Problem(
        "zero-pad-2d-3d",
        lambda: nn.Sequential(
            nn.Linear(6, 24),
            nn.Unflatten(1, (2, 3, 4)),
            nn.ZeroPad2d((1, 0, -1, 1)),
            nn.Sigmoid(),
            nn.Unflatten(1, (1, 2)),
            nn.ZeroPad3d((0, 1, 1, 0, -1, 0)),
            nn.Flatten(),
            nn.Linear(24, 3),
        ),
        (6,),
    ),
    Problem(
        "cnn-batchnorm",
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, stride=2),
            eval_batchnorm(nn.BatchNorm2d(3)),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(18, 5),
            eval_batchnorm(nn.BatchNorm1d(5, eps=0.1)),
            nn.Sigmoid(),
            nn.Linear(5, 3),
        ),
        (2, 7, 6),
    ),
    Problem(
        "mlp-layernorm-gelu",
        lambda: nn.Sequential(
            nn.Linear(6, 5),
            random_affine(nn.LayerNorm(5)),
            nn.GELU(),
            nn.Linear(5, 4),
            nn.LayerNorm(4, elementwise_affine=False),
            nn.Linear(4, 3),
        ),
        (6,),
        losses=tuple(LOSSES),
    ),
    Problem(
        "sequence-layernorm-two-dims",
        lambda: nn.Sequential(
            nn.Linear(4, 3),
            random_affine(nn.LayerNorm((2, 3), bias=False)),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(6, 3),
        ),
        (2, 4),
    ),
    Problem(
        "cnn-groupnorm",
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3),
            random_affine(nn.GroupNorm(2, 4, eps=0.1)),
            nn.ReLU(),
            nn.Conv2d(4, 2, 3, stride=2),
            nn.GroupNorm(1, 2, affine=False),
            nn.Flatten(),
            nn.Linear(4, 3),
        ),
        (2, 7, 6),
    ),
    Problem(
        "cnn-sigmoid",
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.Sigmoid(),
            nn.Conv2d(3, 2, 3, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(12, 4),
        ),
        (2, 7, 6),
    ),
]

GRAPH_PROBLEMS: list[Problem] = [
    Problem(
        "residual-inplace-relu",
        lambda: nn.Sequential(
            nn.Linear(6, 5),
            Residual(nn.Sequential(nn.Linear(5, 5), nn.ReLU(inplace=True), nn.Linear(5, 5))),
            nn.Linear(5, 3),
        ),
        (6,),
        is_chain=False,
    ),
    Problem("conv-residual", _conv_residual, (2, 7, 6), is_chain=False),
    Problem(
        "residual-extra-dims-inplace",
        lambda: nn.Sequential(
            Residual(nn.Sequential(nn.Linear(4, 4), nn.ELU(inplace=True), nn.Linear(4, 4))),
            nn.Flatten(),
            nn.Linear(8, 3),
        ),
        (2, 4),
        is_chain=False,
    ),
    Problem(
        "branches-cat", lambda: nn.Sequential(Branches(), nn.Linear(5, 3)), (6,), is_chain=False
    ),
    Problem("reshapes", Reshapes, (2, 4), is_chain=False),
    Problem("unet-skip-output-size", UNetSkip, (2, 7, 6), is_chain=False),
    Problem("two-heads", TwoHeads, (6,), is_chain=False),
    Problem(
        "residual-sigmoid-branch",
        lambda: nn.Sequential(
            nn.Linear(6, 5),
            Residual(nn.Sequential(nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 5))),
            nn.Linear(5, 3),
        ),
        (6,),
        is_chain=False,
    ),
    Problem("attention", Attention, (3, 4), hessian_glue="BmmBackward0", is_chain=False),
    Problem(
        "multihead-attention",
        MultiheadAttending,
        (3, 4),
        hessian_glue="own second derivatives",
        is_chain=False,
    ),
    Problem("recurrent", Recurrent, (3, 4), hessian_glue="own second derivatives", is_chain=False),
    Problem(
        "class-token", ClassToken, (3, 4), hessian_glue="own second derivatives", is_chain=False
    ),
    Problem(
        "sequential-own-forward",
        lambda: PostProcessed(nn.Linear(3, 5), nn.Sigmoid(), nn.Linear(5, 3)),
        (3,),
        is_chain=False,
    ),
    Problem(
        "sequence-classes-last-dims",
        lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), Permute(0, 3, 1, 2)),
        (2, 3, 4),
        losses=("ce-mean", "ce-sum"),
        is_chain=False,
    ),
    Problem(
        "embedding-tied-to-output",
        TiedEmbedding,
        (4,),
        hessian_glue="cannot sum",
        is_chain=False,
        vocabulary=5,
    ),
    Problem("tied-weights", TiedWeights, (5,), hessian_glue="cannot sum", is_chain=False),
    Problem("siamese", Siamese, (6,), is_chain=False),
    Problem("position-embedding", PositionEmbedding, (5,), is_chain=False, vocabulary=7),
    Problem("shared-constant", SharedConstant, (4,), is_chain=False),
    Problem("tied-positions", TiedPositions, (5,), is_chain=False, vocabulary=7),
    Problem(
        "unrolled-recurrence",
        _unrolled_recurrence,
        (6,),
        hessian_glue="cannot sum",
        is_chain=False,
    ),
    Problem(
        "unsupported-in-chain",
        _unsupported_in_chain,
        (6,),
        hessian_glue="PowBackward0",
        is_chain=False,
    ),
]
ARCHITECTURES: list[Problem] = [
    Problem(
        "lenet5",
        lambda: lenet5(side=16, channels=(2, 3), hidden=(6, 5), classes=3),
        (1, 16, 16),
        losses=("ce-mean", "mse-sum"),
    ),
    Problem("resnet8", _resnet8, (3, 4, 4), losses=("ce-sum", "mse-mean"), is_chain=False),
    Problem(
        "transformer",
        lambda: Transformer(vocabulary=7, tokens=4, width=4, heads=2, layers=2, classes=3),
        (4,),
        losses=("ce-mean", "ce-sum"),
        hessian_glue="BmmBackward0",
        is_chain=False,
        vocabulary=7,
    ),
]
"""Real architectures (examples/architectures.py) at tiny sizes; tests/test_architectures.py
checks every quantity on them against references computed once per case."""

PROBLEMS = PROBLEMS + GRAPH_PROBLEMS


def by_name(name: str) -> Problem:
    """The problem called ``name``."""
    return next(problem for problem in PROBLEMS if problem.name == name)


CNN = by_name("cnn-sigmoid")
CASES = [(problem, loss) for problem in PROBLEMS for loss in problem.losses]
CASE_IDS = [f"{problem.name}-{loss}" for problem, loss in CASES]
CHAIN_CASES = [(problem, loss) for problem, loss in CASES if problem.is_chain]
CHAIN_CASE_IDS = [f"{problem.name}-{loss}" for problem, loss in CHAIN_CASES]


def run_with(
    model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor, *extensions, route: str = "auto"
) -> dict:
    """One backward pass inside ``curvhooks.extend``; ``{param name: {attribute: result}}``."""
    import curvhooks

    with curvhooks.extend(model, loss_fn, *extensions, route=route):
        loss_fn(model(X), y).backward()
    attributes = [ext.attribute for ext in extensions]
    return {
        name: {attr: getattr(p, attr) for attr in attributes if hasattr(p, attr)}
        for name, p in model.named_parameters()
    }


def assert_close(actual: Tensor, expected: Tensor) -> None:
    """float64 agreement: rtol 1e-10, with an absolute floor for entries that cancel to 0."""
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def needs_cuda(test: Callable) -> Callable:
    """Mark ``test`` as a CUDA case (``-m cuda``), skipped where no CUDA device is present."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    return pytest.mark.cuda(skip(test))
