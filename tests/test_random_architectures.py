"""Property-based tests: random architectures against the ``torch.func`` references.

Hypothesis draws a small float64 model (``Architecture``) from building blocks (``nn.Linear``
with and without bias, ``nn.Conv2d`` with random stride, padding, dilation, groups and bias,
``nn.ReLU`` also in place, ``nn.Sigmoid``, ``nn.Flatten``, ``nn.Unflatten``), some of them
frozen, joined by glue in custom ``forward`` methods: residual additions, ``torch.cat`` of two
branches, reshapes and permutes, ``torch.relu``, constant factors, products of branches,
smooth nonlinear torch functions, tied weights (side by side or one feeding the other), one
module called twice (side by side or unrolled). A third of the models are plain chains of
supported modules. The input shape, the loss (cross-entropy, also over an extra output
dimension, MSE, BCE with logits; mean and sum) and two batches of unequal size (one of them
perhaps of one sample) are drawn too. Every extension and every dataset function is compared
with ``tests.reference``, and the routes with each other.

The generator knows where the Hessian extensions are exact: it records the reasons
(``Architecture.refusals``) for which they must refuse with ``curvhooks.UnsupportedError``:
a nonlinear torch function on a tensor that depends on the trainable parameters, a product of
two such tensors, or a trainable parameter with one use feeding another.

The default run tries the architectures of ``FOUND`` and a few derandomized ones; ``-m slow``
tries many random ones (``CURVHOOKS_RANDOM_EXAMPLES`` sets how many, default 300).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, note, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from torch import Tensor, nn

import curvhooks
from curvhooks import (
    BatchDiagGGN,
    BatchGrad,
    BatchL2Grad,
    DiagGGN,
    DiagHessian,
    HessianBlock,
    Jacobian,
    SqrtGGN,
    SumGradSquared,
    Variance,
)
from tests import reference
from tests.checks import check_first_order, check_ggn
from tests.problems import LOSSES, assert_close, run_with

if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    # database=None keeps the examples out of the repository; this keeps Hypothesis's cache of
    # the constants it finds in the source there too.
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "curvhooks-hypothesis")

Shape = tuple[int, ...]
MAX_WIDTH = 5
"""Most features a drawn ``nn.Linear`` gives (channels of a ``nn.Conv2d``: 3)."""
MAX_PARAMS = 400
"""Most trainable parameters of a drawn model (larger draws are rejected)."""
STRUCTURES = ("full", "layer", "param", "diag")
FUNCTIONS = {
    "ggn": (curvhooks.ggn, reference.ggn),
    "empirical_fisher": (curvhooks.empirical_fisher, reference.empirical_fisher),
    "hessian": (curvhooks.hessian, reference.hessian_matrix),
}
CANNOT_SUM = "cannot sum"
LOSS_NAMES = [name for name in LOSSES if name.split("-")[0] in ("ce", "mse", "bce")]
"""Cross-entropy, MSE (and BCE with logits, where the shared list has it), mean and sum."""


# ------------------------------------------------------------------------------ glue modules
class Op(nn.Module):
    """A torch function between modules: ``kind`` with argument ``arg``."""

    def __init__(self, kind: str, arg: object = None) -> None:
        super().__init__()
        self.kind, self.arg = kind, arg

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "relu":
            return torch.relu(x)
        if self.kind == "scale":
            return x * self.arg
        if self.kind == "swish":
            return x * torch.sigmoid(x)
        if self.kind == "tanh":
            return torch.tanh(x)
        if self.kind == "permute":
            return x.permute(0, *(dim + 1 for dim in self.arg))
        if self.kind == "reshape":
            return x.reshape(x.shape[0], *self.arg)
        raise ValueError(self.kind)


class Residual(nn.Module):
    """``x + body(x)``."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class Concat(nn.Module):
    """``torch.cat([left(x), right(x)], dim)``."""

    def __init__(self, left: nn.Module, right: nn.Module, dim: int) -> None:
        super().__init__()
        self.left, self.right, self.dim = left, right, dim

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.left(x), self.right(x)], dim=self.dim)


class Product(nn.Module):
    """``left(x) * right(x)``: a product of two branches."""

    def __init__(self, left: nn.Module, right: nn.Module) -> None:
        super().__init__()
        self.left, self.right = left, right

    def forward(self, x: Tensor) -> Tensor:
        return self.left(x) * self.right(x)


class Siamese(nn.Module):
    """``inner(x) + inner(view(x))``: one module called twice side by side."""

    def __init__(self, inner: nn.Module, view: str) -> None:
        super().__init__()
        self.inner, self.view = inner, view

    def forward(self, x: Tensor) -> Tensor:
        other = {"same": x, "affine": 2 * x + 1, "relu": torch.relu(x)}[self.view]
        return self.inner(x) + self.inner(other)


class Recurrence(nn.Module):
    """``cell`` unrolled ``steps`` times, ``act`` between the steps."""

    def __init__(self, cell: nn.Module, steps: int, act: str) -> None:
        super().__init__()
        self.cell, self.steps = cell, steps
        self.act = nn.Sigmoid() if act == "sigmoid" else Op("relu")

    def forward(self, x: Tensor) -> Tensor:
        for step in range(self.steps):
            x = self.cell(x if step == 0 else self.act(x))
        return x


class Tied(nn.Module):
    """Two ``nn.Linear`` sharing one weight: one feeding the other (``"feed"``:
    ``second(relu(first(x)))``) or side by side (``"side"``: ``first(x) + second(relu(x))``)."""

    def __init__(self, first: nn.Linear, second: nn.Linear, mode: str) -> None:
        super().__init__()
        second.weight = first.weight
        self.first, self.second, self.mode = first, second, mode

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "feed":
            return self.second(torch.relu(self.first(x)))
        return self.first(x) + self.second(torch.relu(x))


# ------------------------------------------------------------------------------ specifications
def _freeze(module: nn.Module, frozen: bool) -> nn.Module:
    return module.requires_grad_(False) if frozen else module


@dataclass(frozen=True)
class LinearSpec:
    """``nn.Linear``; ``frozen``: its parameters do not require grad."""

    features_in: int
    features_out: int
    bias: bool = True
    frozen: bool = False

    def build(self) -> nn.Linear:
        """The module."""
        linear = nn.Linear(self.features_in, self.features_out, bias=self.bias)
        return _freeze(linear, self.frozen)


@dataclass(frozen=True)
class ConvSpec:
    """``nn.Conv2d`` with per-dimension kernel, stride, padding (or ``"same"``), dilation."""

    channels_in: int
    channels_out: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True
    frozen: bool = False

    def build(self) -> nn.Conv2d:
        """The module."""
        conv = nn.Conv2d(
            self.channels_in,
            self.channels_out,
            self.kernel,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias,
        )
        return _freeze(conv, self.frozen)


@dataclass(frozen=True)
class ModuleSpec:
    """A supported module without parameters: ``relu``, ``relu-inplace``, ``sigmoid``,
    ``flatten``."""

    kind: str

    def build(self) -> nn.Module:
        """The module."""
        return {
            "relu": lambda: nn.ReLU(),
            "relu-inplace": lambda: nn.ReLU(inplace=True),
            "sigmoid": lambda: nn.Sigmoid(),
            "flatten": lambda: nn.Flatten(),
        }[self.kind]()


@dataclass(frozen=True)
class UnflattenSpec:
    """``nn.Unflatten(dim, sizes)``."""

    dim: int
    sizes: tuple[int, ...]

    def build(self) -> nn.Unflatten:
        """The module."""
        return nn.Unflatten(self.dim, self.sizes)


@dataclass(frozen=True)
class OpSpec:
    """A torch function written in ``forward`` (``Op``)."""

    kind: str
    arg: object = None

    def build(self) -> Op:
        """The module."""
        return Op(self.kind, self.arg)


@dataclass(frozen=True)
class ResidualSpec:
    """``x + body(x)``."""

    body: tuple

    def build(self) -> Residual:
        """The module."""
        return Residual(build_sequence(self.body))


@dataclass(frozen=True)
class ConcatSpec:
    """``torch.cat`` of two branches (an empty branch passes ``x`` on)."""

    left: tuple
    right: tuple
    dim: int

    def build(self) -> Concat:
        """The module."""
        return Concat(build_sequence(self.left), build_sequence(self.right), self.dim)


@dataclass(frozen=True)
class ProductSpec:
    """``left(x) * right(x)``."""

    left: tuple
    right: tuple

    def build(self) -> Product:
        """The module."""
        return Product(build_sequence(self.left), build_sequence(self.right))


@dataclass(frozen=True)
class SiameseSpec:
    """``inner(x) + inner(view(x))``."""

    inner: tuple
    view: str

    def build(self) -> Siamese:
        """The module."""
        return Siamese(build_sequence(self.inner), self.view)


@dataclass(frozen=True)
class RecurrenceSpec:
    """One ``nn.Linear`` cell unrolled ``steps`` times."""

    cell: LinearSpec
    steps: int
    act: str

    def build(self) -> Recurrence:
        """The module."""
        return Recurrence(self.cell.build(), self.steps, self.act)


@dataclass(frozen=True)
class TiedSpec:
    """Two ``nn.Linear`` with one weight (``second``'s is replaced by ``first``'s)."""

    first: LinearSpec
    second: LinearSpec
    mode: str

    def build(self) -> Tied:
        """The module."""
        return Tied(self.first.build(), self.second.build(), self.mode)


@dataclass(frozen=True)
class RepeatSpec:
    """``nn.Sequential(cell, act, cell)``: one ``nn.Linear`` held twice by a container."""

    cell: LinearSpec
    act: str

    def build(self) -> nn.Sequential:
        """The module."""
        cell = self.cell.build()
        return nn.Sequential(cell, ModuleSpec(self.act).build(), cell)


Spec = (
    LinearSpec
    | ConvSpec
    | ModuleSpec
    | UnflattenSpec
    | OpSpec
    | ResidualSpec
    | ConcatSpec
    | ProductSpec
    | SiameseSpec
    | RecurrenceSpec
    | TiedSpec
    | RepeatSpec
)


def build_sequence(specs: tuple[Spec, ...]) -> nn.Sequential:
    """The modules of ``specs`` one after the other."""
    return nn.Sequential(*(spec.build() for spec in specs))


@dataclass(frozen=True)
class Architecture:
    """A drawn model, its data and what the Hessian extensions must do on it."""

    input_shape: Shape
    blocks: tuple[Spec, ...]
    loss: str
    sizes: tuple[int, int]
    """The sample counts of the two batches."""
    seed: int
    refusals: frozenset[str] = field(default_factory=frozenset)
    """Fragments one of which the Hessian extensions' refusal names; empty where exact."""
    chain: bool = True
    """Whether the model is a chain of supported modules (the chain route applies)."""

    def make(self) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
        """``(model, loss_fn, X, y)`` in float64, ``X`` holding both batches."""
        torch.manual_seed(self.seed)
        model = build_sequence(self.blocks).double()
        X = torch.randn(sum(self.sizes), *self.input_shape, dtype=torch.float64)
        with torch.no_grad():
            output = model(X)
        if self.loss.startswith("ce"):
            y = torch.randint(0, output.shape[1], (len(X), *output.shape[2:]))
        elif self.loss.startswith("bce"):
            y = torch.rand_like(output)
        else:
            y = torch.randn_like(output)
        return model, LOSSES[self.loss](), X, y

    def batches(self, X: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]]:
        """The two batches of unequal size."""
        first = self.sizes[0]
        return [(X[:first], y[:first]), (X[first:], y[first:])]


# ------------------------------------------------------------------------------ the generator
def _split(draw: st.DrawFn, size: int) -> tuple[int, int]:
    """Two factors of ``size`` (one of them perhaps 1)."""
    first = draw(st.sampled_from([d for d in range(1, size + 1) if size % d == 0]))
    return first, size // first


MAX_DEPTH = 2
"""Glue around child modules nests at most this deep."""


class Draft:
    """The state while drawing one sequence of blocks.

    Attributes:
        shape: The shape (less the batch dimension) of the tensor that flows.
        dependent: Whether that tensor depends on trainable parameters.
        last_dim_only: Whether the blocks may change only the last dimension (a residual body
            that a final ``nn.Linear`` maps back).
        chain_only: Whether to draw a plain chain of supported modules.
        fresh: Whether an in-place ``ReLU`` may overwrite the tensor: neither the model input
            nor used elsewhere, and neither it nor its base (of a view) saved for backward
            (outputs of ``nn.Linear``, ``nn.Conv2d``, additions, products, ``torch.cat``, and
            views of those).
        chain: Whether every block so far is a supported module.
        refusals: The reasons for which the Hessian extensions must refuse.
    """

    def __init__(
        self,
        draw: st.DrawFn,
        shape: Shape,
        dependent: bool = False,
        last_dim_only: bool = False,
        chain_only: bool = False,
    ) -> None:
        self.draw, self.shape, self.dependent = draw, shape, dependent
        self.last_dim_only, self.chain_only = last_dim_only, chain_only
        self.fresh, self.chain = False, True
        self.refusals: set[str] = set()

    # ---------------------------------------------------------------- bookkeeping
    def fork(self, last_dim_only: bool | None = None) -> Draft:
        """A branch that starts from the current tensor."""
        only = self.last_dim_only if last_dim_only is None else last_dim_only
        return Draft(self.draw, self.shape, self.dependent, only)

    def join(self, shape: Shape, *branches: Draft) -> None:
        """Continue after glue that joins ``branches`` into a new tensor of ``shape`` (by an
        addition, product, ``torch.cat`` or ``nn.Linear``, none of which saves its output)."""
        self.shape, self.fresh, self.chain = shape, True, False
        self.dependent = any(branch.dependent for branch in branches)
        for branch in branches:
            self.refusals |= branch.refusals

    def coin(self) -> bool:
        """A fair coin (shrinks to ``False``)."""
        return self.draw(st.booleans())

    def frozen(self) -> bool:
        """Whether a new module's parameters are frozen (rarely; shrinks to ``False``)."""
        return self.draw(st.integers(0, 7)) == 7

    def is_image(self) -> bool:
        """Whether the tensor is ``[C, H, W]``."""
        return len(self.shape) == 3

    # ---------------------------------------------------------------- modules
    def linear(self, features_out: int | None = None, frozen: bool | None = None) -> LinearSpec:
        """An ``nn.Linear`` on the last dimension."""
        features_out = features_out or self.draw(st.integers(1, MAX_WIDTH))
        frozen = self.frozen() if frozen is None else frozen
        spec = LinearSpec(self.shape[-1], features_out, self.coin(), frozen)
        self.shape = (*self.shape[:-1], features_out)
        self.dependent |= not frozen
        self.fresh = True
        return spec

    def conv(self, channels_out: int | None = None, same: bool = False) -> ConvSpec:
        """An ``nn.Conv2d`` on ``[C, H, W]``; ``same``: keeps ``H, W`` (stride 1)."""
        channels_in, *sizes = self.shape
        divisors = [g for g in (1, 2, 3) if channels_in % g == 0]
        if channels_out is not None:
            divisors = [g for g in divisors if channels_out % g == 0]
        groups = self.draw(st.sampled_from(divisors))
        if channels_out is None:
            channels_out = groups * self.draw(st.integers(1, max(1, 3 // groups)))
        dilation = tuple(self.draw(st.integers(1, 2)) for _ in sizes)
        if same:
            kernel = tuple(self.draw(st.integers(1, 3)) for _ in sizes)
            stride, padding, out = (1, 1), "same", tuple(sizes)
        else:
            stride = tuple(self.draw(st.integers(1, 2)) for _ in sizes)
            padding = tuple(self.draw(st.integers(0, 1)) for _ in sizes)
            reach = [(s + 2 * p - 1) // d + 1 for s, p, d in zip(sizes, padding, dilation)]
            kernel = tuple(self.draw(st.integers(1, min(3, r))) for r in reach)
            out = tuple(
                (s + 2 * p - d * (k - 1) - 1) // t + 1
                for s, p, d, k, t in zip(sizes, padding, dilation, kernel, stride)
            )
        bias, frozen = self.coin(), self.frozen()
        spec = ConvSpec(
            channels_in, channels_out, kernel, stride, padding, dilation, groups, bias, frozen
        )
        self.shape = (channels_out, *out)
        self.dependent |= not frozen
        self.fresh = True
        return spec

    def activation(self) -> Spec:
        """A piecewise-linear or supported activation, as a module or a torch function;
        an in-place ``nn.ReLU`` only on a fresh module output."""
        kinds = ["relu", "sigmoid"] + ["torch-relu"] * (not self.chain_only)
        kinds += ["relu-inplace"] * self.fresh
        kind = self.draw(st.sampled_from(kinds))
        self.fresh = False  # each saves its output
        if kind == "torch-relu":
            self.chain = False
            return OpSpec("relu")
        return ModuleSpec(kind)

    def layers(self, conv: bool = False, same: bool = False) -> list[Spec]:
        """An ``nn.Linear`` (``conv``: an ``nn.Conv2d``), perhaps followed by an activation."""
        specs: list[Spec] = [self.conv(same=same) if conv else self.linear()]
        if self.coin():
            specs.append(self.activation())
        return specs

    # ---------------------------------------------------------------- glue
    def op(
        self, kind: str, arg: object = None, shape: Shape | None = None, fresh: bool = False
    ) -> OpSpec:
        """A torch function in a custom ``forward``."""
        self.shape, self.fresh, self.chain = shape or self.shape, fresh, False
        return OpSpec(kind, arg)

    def nonlinear_op(self) -> OpSpec:
        """A smooth nonlinear torch function the Hessian extensions have no derivatives for;
        they refuse it where the tensor depends on the parameters."""
        kind = self.draw(st.sampled_from(["swish", "tanh"]))
        if self.dependent:
            names = {"swish": ("SigmoidBackward0", "MulBackward0"), "tanh": ("TanhBackward0",)}
            self.refusals.update(names[kind])
        return self.op(kind, fresh=kind == "swish")

    def reshape(self) -> Spec:
        """A permute, a reshape to another number of dimensions, or an ``nn.Unflatten`` of
        the last dimension (views: ``fresh`` stays)."""
        shape, fresh = self.shape, self.fresh
        if len(shape) > 1 and self.coin():
            order = tuple(self.draw(st.permutations(range(len(shape)))))
            return self.op("permute", order, tuple(shape[i] for i in order), fresh)
        if len(shape) < 3 and self.coin():
            return self.unflatten()
        numel = torch.Size(shape).numel()
        sizes = (numel,) if len(shape) > 1 else _split(self.draw, numel)
        return self.op("reshape", sizes, sizes, fresh)

    def unflatten(self) -> UnflattenSpec:
        """An ``nn.Unflatten`` of the last dimension into two (a view)."""
        sizes = _split(self.draw, self.shape[-1])
        spec = UnflattenSpec(len(self.shape), sizes)
        self.shape = (*self.shape[:-1], *sizes)
        return spec

    def residual(self, depth: int) -> ResidualSpec:
        """``x + body(x)``: a body that ends where it started."""
        shape = self.shape
        if self.is_image() and self.coin():
            body = self.fork()
            specs = body.layers(conv=True, same=True) + [body.conv(shape[0], same=True)]
        else:
            body = self.fork(last_dim_only=True)
            specs = body.blocks(0, 2, depth + 1) + [body.linear(shape[-1])]
        if self.coin():
            specs.append(body.activation())
        self.join(shape, self, body)
        return ResidualSpec(tuple(specs))

    def concat(self) -> ConcatSpec:
        """Two branches (the first perhaps empty) joined by ``torch.cat``: along the channels
        of images (same-padding ``nn.Conv2d``), else along the last dimension."""
        image = self.is_image() and not self.last_dim_only and self.coin()
        left, right = self.fork(), self.fork()
        left_specs = left.layers(conv=image, same=True) if self.coin() else []
        right_specs = right.layers(conv=image, same=True)
        index = 0 if image else len(self.shape) - 1
        shape = list(right.shape)
        shape[index] += left.shape[index]
        self.join(tuple(shape), left, right)
        return ConcatSpec(tuple(left_specs), tuple(right_specs), index + 1)

    def product(self) -> ProductSpec:
        """``left(x) * right(x)`` with two ``nn.Linear`` of one width: a product of two
        parameter-dependent tensors unless one side is frozen and ``x`` is not dependent."""
        left, right = self.fork(), self.fork()
        width = self.draw(st.integers(1, MAX_WIDTH))
        left_specs: list[Spec] = [left.linear(width)]
        right_specs: list[Spec] = [right.linear(width)]
        if self.coin():
            right_specs.append(ModuleSpec("sigmoid"))
        if left.dependent and right.dependent:
            self.refusals.add("MulBackward0")
        self.join(left.shape, left, right)
        return ProductSpec(tuple(left_specs), tuple(right_specs))

    def siamese(self) -> SiameseSpec:
        """One ``nn.Linear`` (and activation) called on ``x`` and on a view of ``x``."""
        inner = self.fork()
        specs = inner.layers()
        view = self.draw(st.sampled_from(["same", "affine", "relu"]))
        self.join(inner.shape, inner)
        return SiameseSpec(tuple(specs), view)

    def recurrence(self) -> RecurrenceSpec:
        """A square ``nn.Linear`` applied 2 or 3 times in a row: a trainable one makes the
        Hessian extensions refuse."""
        cell_draft = self.fork()
        cell = cell_draft.linear(self.shape[-1])
        if not cell.frozen:
            self.refusals.add(CANNOT_SUM)
        steps = self.draw(st.integers(2, 3))
        act = self.draw(st.sampled_from(["relu", "sigmoid"]))
        self.join(self.shape, cell_draft)
        return RecurrenceSpec(cell, steps, act)

    def repeat(self) -> RepeatSpec:
        """A square ``nn.Linear`` held twice by an ``nn.Sequential`` (no chain: one parameter
        used twice), an activation module between the two calls."""
        cell_draft = self.fork()
        cell = cell_draft.linear(self.shape[-1])
        if not cell.frozen:
            self.refusals.add(CANNOT_SUM)
        act = self.draw(st.sampled_from(["relu", "sigmoid"]))
        self.join(self.shape, cell_draft)
        return RepeatSpec(cell, act)

    def tied(self) -> TiedSpec:
        """Two ``nn.Linear`` with one weight, one feeding the other (the Hessian extensions
        refuse where that weight is trainable) or side by side."""
        mode = self.draw(st.sampled_from(["side", "feed"]))
        features = self.shape[-1]
        width = features if mode == "feed" else self.draw(st.integers(1, MAX_WIDTH))
        first = self.fork().linear(width)
        second = LinearSpec(features, width, True, False)
        if mode == "feed" and not first.frozen:
            self.refusals.add(CANNOT_SUM)
        self.join((*self.shape[:-1], width), Draft(self.draw, self.shape, True))
        return TiedSpec(first, second, mode)

    # ---------------------------------------------------------------- sequences
    def chain_block(self) -> list[Spec]:
        """One block of a plain chain: supported modules only."""
        kinds = ["layers", "activation"] + ["conv"] * 4 * self.is_image()
        kinds += ["flatten"] * (len(self.shape) > 1) + ["unflatten"] * (len(self.shape) < 3)
        kind = self.draw(st.sampled_from(kinds))
        if kind in ("layers", "conv"):
            return self.layers(conv=kind == "conv")
        if kind == "flatten":
            self.shape = (torch.Size(self.shape).numel(),)
            return [ModuleSpec("flatten")]
        return [self.activation() if kind == "activation" else self.unflatten()]

    def block(self, depth: int) -> list[Spec]:
        """One block: modules with parameters, activations, glue (around child modules only
        below ``MAX_DEPTH``)."""
        if self.chain_only:
            return self.chain_block()
        kinds = ["layers", "activation", "scale"]
        if depth < MAX_DEPTH:  # those that may make the Hessian extensions refuse: once
            kinds += ["residual", "siamese", "concat"] * 2 + ["tied"]
            kinds += ["product", "nonlinear", "recurrence", "repeat"]
        if not self.last_dim_only:
            kinds += ["reshape"] + ["conv"] * 6 * self.is_image()
            kinds += ["flatten"] * (len(self.shape) > 1)
        kind = self.draw(st.sampled_from(kinds))
        if kind in ("layers", "conv"):
            return self.layers(conv=kind == "conv")
        if kind == "flatten":
            self.shape = (torch.Size(self.shape).numel(),)
            return [ModuleSpec("flatten")]
        if kind == "scale":
            return [self.op("scale", self.draw(st.sampled_from([-1.5, 0.5, 2.0])), fresh=True)]
        if kind == "residual":
            return [self.residual(depth)]
        return [
            {
                "activation": self.activation,
                "reshape": self.reshape,
                "siamese": self.siamese,
                "concat": self.concat,
                "product": self.product,
                "nonlinear": self.nonlinear_op,
                "tied": self.tied,
                "recurrence": self.recurrence,
                "repeat": self.repeat,
            }[kind]()
        ]

    def blocks(self, least: int, most: int, depth: int) -> list[Spec]:
        """Between ``least`` and ``most`` blocks one after the other."""
        specs: list[Spec] = []
        for _ in range(self.draw(st.integers(least, most))):
            specs += self.block(depth)
        return specs

    def head(self, loss: str) -> list[Spec]:
        """Flatten (unless the output keeps one extra dimension) and a trainable
        ``nn.Linear`` to the outputs; cross-entropy with an extra dimension takes the classes
        to dimension 1 (``[N, C, T]``)."""
        specs: list[Spec] = []
        cross_entropy = loss.startswith("ce")
        keep = len(self.shape) == 2 and not (self.chain_only and cross_entropy) and self.coin()
        if len(self.shape) > 1 and not keep:
            specs.append(ModuleSpec("flatten"))
            self.shape = (torch.Size(self.shape).numel(),)
        specs.append(self.linear(self.draw(st.integers(1 + cross_entropy, 4)), frozen=False))
        if cross_entropy and keep:
            specs.append(self.op("permute", (1, 0), self.shape[::-1]))
        return specs


INPUT_SHAPES = st.one_of(
    st.tuples(st.integers(1, 5)),
    st.tuples(st.integers(1, 3), st.integers(1, 4)),
    st.tuples(st.integers(1, 3), st.integers(2, 4), st.integers(2, 4)),
)


@st.composite
def architectures(draw: st.DrawFn) -> Architecture:
    """A random model, input shape, loss and pair of batch sizes."""
    loss = draw(st.sampled_from(LOSS_NAMES))
    input_shape = draw(INPUT_SHAPES)
    draft = Draft(draw, input_shape, chain_only=draw(st.integers(0, 2)) == 2)
    blocks = draft.blocks(1, 4, depth=0) + draft.head(loss)
    first = draw(st.integers(1, 4))
    second = draw(st.sampled_from([n for n in range(1, 5) if n != first]))
    return Architecture(
        input_shape,
        tuple(blocks),
        loss,
        (first, second),
        draw(st.integers(0, 2**16)),
        frozenset(draft.refusals),
        draft.chain,
    )


# ------------------------------------------------------------------------------ the checks
def check_hook_level(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> None:
    """First-order, GGN and Jacobian extensions in one backward pass."""
    expected = reference.per_sample_grads(model, loss_fn, X, y)
    model.zero_grad(set_to_none=True)
    first_order = (BatchGrad(), BatchL2Grad(), SumGradSquared(), Variance())
    second_order = (SqrtGGN(), DiagGGN(), BatchDiagGGN(), Jacobian())
    results = run_with(model, loss_fn, X, y, *first_order, *second_order)
    check_first_order(model, results, expected)
    ggn = reference.ggn_per_sample(model, loss_fn, X, y)
    check_ggn(model, results, ggn, reference.jacobians(model, X))
    model.zero_grad(set_to_none=True)


def _refusal_pattern(arch: Architecture) -> str:
    """A regular expression matching any of the expected refusal reasons."""
    return "|".join(sorted(map(re.escape, arch.refusals)))


def check_hessian_extensions(
    arch: Architecture, model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor
) -> None:
    """Exact ``DiagHessian``/``HessianBlock``, or their refusal where the generator expects it."""
    if arch.refusals:
        for extension in (DiagHessian(), HessianBlock()):
            pattern = f"{type(extension).__name__}.*({_refusal_pattern(arch)})"
            with pytest.raises(curvhooks.UnsupportedError, match=pattern):
                run_with(model, loss_fn, X, y, extension)
        return
    expected = reference.hessian_blocks(model, loss_fn, X, y)
    results = run_with(model, loss_fn, X, y, DiagHessian(), HessianBlock())
    for name, block in expected.items():
        assert_close(results[name]["hessian_block"], block)
        assert_close(results[name]["diag_hessian"].flatten(), block.diagonal())
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert all(results[name] == {} for name in frozen)


def check_hook_routes(
    arch: Architecture, model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor
) -> None:
    """The default route (and the chain route on a chain) against the graph route, the
    Monte-Carlo stacks from the same random draws."""
    exact_hessian = (DiagHessian(), HessianBlock()) if not arch.refusals else ()
    routes = ("auto", "graph") + (("chain",) if arch.chain else ())
    found = {}
    for route in routes:
        torch.manual_seed(1)
        extensions = (SqrtGGN(mc_samples=2), DiagGGN(), BatchDiagGGN(), Jacobian())
        found[route] = run_with(model, loss_fn, X, y, *extensions, *exact_hessian, route=route)
    model.zero_grad(set_to_none=True)
    for route in routes:
        for name, results in found[route].items():
            for attribute, value in results.items():
                assert_close(value, found["graph"][name][attribute])


def check_dataset(
    arch: Architecture, model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor
) -> None:
    """Every dataset function and structure over two batches of unequal size."""
    data = arch.batches(X, y)
    expected = {kind: ref(model, loss_fn, X, y) for kind, (_, ref) in FUNCTIONS.items()}
    for kind, (function, _) in FUNCTIONS.items():
        for structure in STRUCTURES:
            found = function(model, loss_fn, data, structure=structure)
            assert_close(found, reference.restrict(expected[kind], model, structure))
    kinds = ("ggn", "empirical_fisher") + (() if arch.refusals else ("hessian",))
    for route in ("graph",) + (("chain",) if arch.chain else ()):
        found = curvhooks.matrices(model, loss_fn, data, kinds, structure="param", route=route)
        for kind in kinds:
            assert_close(found[kind], reference.restrict(expected[kind], model, "param"))
    if arch.refusals:
        with pytest.raises(curvhooks.UnsupportedError, match=_refusal_pattern(arch)):
            curvhooks.hessian(model, loss_fn, data, structure="diag", route="hooks")


def check_architecture(arch: Architecture) -> None:
    """Every comparison on one drawn architecture."""
    model, loss_fn, X, y = arch.make()
    size = sum(p.numel() for p in reference.trainable(model).values())
    assume(size <= MAX_PARAMS)
    note(f"model: {model}")
    X1, y1 = arch.batches(X, y)[0]
    check_hook_level(model, loss_fn, X1, y1)
    check_hessian_extensions(arch, model, loss_fn, X1, y1)
    check_hook_routes(arch, model, loss_fn, X1, y1)
    check_dataset(arch, model, loss_fn, X, y)


# ------------------------------------------------------------------------------ the tests
EVEN_SAME_PADDING = "ignore:Using padding='same' with even kernel lengths:UserWarning"

FOUND = [
    # nn.Linear (with bias) on [N, T, F] returns an autograd view; an in-place ReLU on it
    # rebased the view, its tensor hook never fired: no results for the Linear, on every route
    # (and zero rows in curvhooks.ggn(route="graph")). Fixed in a6b8118.
    Architecture(
        (1, 1),
        (LinearSpec(1, 1), ModuleSpec("relu-inplace"), ModuleSpec("flatten"), LinearSpec(1, 2)),
        "ce-mean",
        (1, 2),
        seed=0,
    ),
    # nn.Flatten on [N, T, F] (or [N, C, H, W] after a Conv2d) returns a view; an in-place ReLU
    # on it: Flatten's tensor hook never fires, so the chain route never pushes the stacks on
    # to the Linear (RuntimeError "no square-root stack reached module '0'").
    Architecture(
        (1, 1),
        (
            LinearSpec(1, 1, bias=False),
            ModuleSpec("flatten"),
            ModuleSpec("relu-inplace"),
            LinearSpec(1, 2, bias=False),
        ),
        "ce-mean",
        (1, 2),
        seed=0,
    ),
    # The same through two views in a row (nn.Flatten, then nn.Unflatten).
    Architecture(
        (1, 1),
        (
            LinearSpec(1, 1, bias=False),
            ModuleSpec("flatten"),
            UnflattenSpec(1, (1, 1)),
            ModuleSpec("relu-inplace"),
            ModuleSpec("flatten"),
            LinearSpec(1, 2, bias=False),
        ),
        "ce-mean",
        (3, 1),
        seed=1,
    ),
    # Per-sample gradients equal across the samples, of magnitude 1e3: Variance, the second
    # moment less the squared mean, is zero up to rounding relative to the second moment
    # (5.8e-11), which an absolute tolerance of 1e-12 refused.
    Architecture(
        (1,),
        (
            SiameseSpec((LinearSpec(1, 2, bias=False),), "same"),
            ProductSpec((LinearSpec(2, 3, bias=False),), (LinearSpec(2, 3, bias=False),)),
            OpSpec("scale", -1.5),
            LinearSpec(3, 1, bias=False),
        ),
        "mse-mean",
        (1, 2),
        seed=3,
        refusals=frozenset({"MulBackward0"}),
        chain=False,
    ),
]
"""Architectures that failed, tried first in the default run: regressions (the first two as
Hypothesis shrank them, the third a variant of the second; the last a tolerance too tight
for Variance)."""


def _with_found(test: Callable) -> Callable:
    """``test`` that tries every architecture of ``FOUND`` first."""
    for arch in reversed(FOUND):
        test = example(arch)(test)
    return test


@pytest.mark.filterwarnings(EVEN_SAME_PADDING)
@settings(max_examples=8, deadline=None, derandomize=True, database=None)
@_with_found
@given(architectures())
def test_random_architectures(arch: Architecture) -> None:
    """A few reproducible architectures in the default run."""
    check_architecture(arch)


@pytest.mark.slow
@pytest.mark.filterwarnings(EVEN_SAME_PADDING)
@settings(
    max_examples=int(os.environ.get("CURVHOOKS_RANDOM_EXAMPLES", "300")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(architectures())
def test_many_random_architectures(arch: Architecture) -> None:
    """Many random architectures (``-m slow``; ``CURVHOOKS_RANDOM_EXAMPLES`` sets how many)."""
    check_architecture(arch)
