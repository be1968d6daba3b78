"""``nn.MultiheadAttention`` and the transformer layers built on it: the first-order and
GGN-family extensions and ``Jacobian`` against ``tests.reference`` (float64) for every
argument of the attention, against finite differences, and the refusals."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import curvhooks
from curvhooks import KFAC, KFLR, BatchGrad, DiagHessian
from tests import reference
from tests.checks import check_every_extension, check_finite_differences
from tests.problems import CE_MSE, Problem, assert_close, run_with

SEQUENCE, WIDTH = 3, 4


class Attending(nn.Module):
    """Self-attention over ``[N, L, E]`` inputs (separate key and value projections where
    ``kdim``/``vdim`` differ), then a linear head on the flattened output (and weights)."""

    def __init__(self, masks: str = "", use_weights: str = "", **options) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(WIDTH, 2, **options)
        self.key = nn.Linear(WIDTH, options.get("kdim") or WIDTH)
        self.value = nn.Linear(WIDTH, options.get("vdim") or WIDTH)
        self.masks, self.use_weights = masks, use_weights
        keys = SEQUENCE + options.get("add_bias_kv", False) + options.get("add_zero_attn", False)
        weights = {"": 0, "mean": SEQUENCE * keys, "heads": 2 * SEQUENCE * keys}[use_weights]
        self.head = nn.Linear(SEQUENCE * WIDTH + weights, 3)

    def forward(self, x: Tensor) -> Tensor:
        first = self.attention.batch_first
        key, value = self.key(x), self.value(x)
        sequences = [x, key, value] if first else [s.transpose(0, 1) for s in (x, key, value)]
        output, weights = self.attention(
            *sequences,
            need_weights=bool(self.use_weights),
            average_attn_weights=self.use_weights == "mean",
            **self._masks(x),
        )
        features = [(output if first else output.transpose(0, 1)).flatten(1)]
        if self.use_weights:
            features.append(weights.flatten(1))
        return self.head(torch.cat(features, 1))

    def _masks(self, x: Tensor) -> dict[str, Tensor | bool]:
        """Masks made from each sample's own input (so that a reference run on each sample
        alone sees the same): a key padding mask leaving each sample a key; attention masks:
        a float one shared by the batch, a boolean one per sample and head, or a causal one."""
        batch, keys = len(x), SEQUENCE
        if self.masks == "padding":
            kept = torch.zeros(batch, keys - 1, dtype=torch.bool)
            return {"key_padding_mask": torch.cat([kept, x[:, :1, 0] > 0], 1)}
        if self.masks == "shared":
            return {"attn_mask": torch.linspace(-1, 1, SEQUENCE * keys).view(SEQUENCE, keys)}
        if self.masks == "per-head":
            first_key = (x[:, :, 0] > 0.5).unsqueeze(1)  # [N, 1, L]: masked in head 1 only
            masked = torch.cat([torch.zeros_like(first_key), first_key], 1)
            mask = torch.zeros(batch, 2, SEQUENCE, keys, dtype=torch.bool)
            mask = torch.cat([masked.unsqueeze(-1), mask[..., 1:]], -1)
            return {"attn_mask": mask.flatten(0, 1)}
        if self.masks == "causal":
            mask = torch.triu(torch.ones(SEQUENCE, keys, dtype=torch.bool), 1)
            return {"attn_mask": mask, "is_causal": True}
        return {}


ATTENTION = {
    "packed": {},
    "packed-not-batch-first": {"batch_first": False},
    "separate-kdim-vdim": {"kdim": 3, "vdim": 5},
    "no-bias": {"bias": False},
    "bias-kv-zero-attn": {"add_bias_kv": True, "add_zero_attn": True},
    "padding-mask": {"masks": "padding"},
    "shared-float-mask": {"masks": "shared", "batch_first": False},
    "per-head-mask": {"masks": "per-head"},
    "causal": {"masks": "causal"},
    "mean-weights": {"use_weights": "mean"},
    "head-weights-not-batch-first": {"use_weights": "heads", "batch_first": False},
}


def _attending(options: dict) -> nn.Module:
    return Attending(**{"batch_first": True, **options})


def _transformer(layer: str, norm_first: bool) -> nn.Module:
    options = dict(dim_feedforward=6, dropout=0.0, batch_first=True, norm_first=norm_first)
    if layer == "encoder":
        block = nn.TransformerEncoderLayer(WIDTH, 2, **options)
        return nn.Sequential(block, nn.Flatten(), nn.Linear(SEQUENCE * WIDTH, 3))
    return Decoding(nn.TransformerDecoderLayer(WIDTH, 2, **options))


class Decoding(nn.Module):
    """A decoder layer on the input with the input's projection as its memory."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.memory, self.block = nn.Linear(WIDTH, WIDTH), block
        self.head = nn.Linear(SEQUENCE * WIDTH, 3)

    def forward(self, x: Tensor) -> Tensor:
        causal = torch.triu(torch.full((SEQUENCE, SEQUENCE), float("-inf")), 1)
        return self.head(self.block(x, self.memory(x), tgt_mask=causal).flatten(1))


PROBLEMS = [
    *[
        Problem(name, lambda o=options: _attending(o), (SEQUENCE, WIDTH), is_chain=False)
        for name, options in ATTENTION.items()
    ],
    Problem("packed-batch-of-one", lambda: _attending({}), (SEQUENCE, WIDTH), 1, is_chain=False),
    *[
        Problem(
            f"{layer}-layer{'-norm-first' if norm_first else ''}",
            lambda layer=layer, norm_first=norm_first: _transformer(layer, norm_first),
            (SEQUENCE, WIDTH),
            is_chain=False,
        )
        for layer in ("encoder", "decoder")
        for norm_first in (False, True)
    ],
]


@pytest.mark.parametrize(
    "problem, loss",
    [pytest.param(p, loss, id=f"{p.name}-{loss}") for p in PROBLEMS for loss in CE_MSE],
)
def test_first_order_and_ggn_family(problem, loss):
    model, loss_fn, X, y = problem.make(loss)
    check_every_extension(model.eval(), loss_fn, X, y)


def test_per_sample_gradients_match_finite_differences():
    """Per-sample gradients of the projections and the added key bias against central
    differences of each sample's loss (float64, step 1e-6), with a padding mask and the
    sequences not batch first."""
    options = {"batch_first": False, "add_bias_kv": True, "masks": "padding"}
    problem = Problem("fd", lambda: _attending(options), (SEQUENCE, WIDTH), 4, is_chain=False)
    model, loss_fn, X, y = problem.make("ce-sum")
    model.eval()
    with curvhooks.extend(model, loss_fn, BatchGrad()):
        loss_fn(model(X), y).backward()
    attention = model.attention
    entries = [
        (attention.in_proj_weight, (5, 2)),
        (attention.in_proj_weight, (9, 0)),
        (attention.out_proj.weight, (1, 3)),
        (attention.bias_k, (0, 0, 2)),
    ]
    check_finite_differences(model, loss_fn, X, y, entries)


def by_name(name: str) -> Problem:
    return next(problem for problem in PROBLEMS if problem.name == name)


def test_refusals():
    """An unbatched sequence, dropout in training mode, the extensions that need the
    attention's own second derivatives, and Kronecker factors of the packed projection of
    several inputs are refused, naming the fix."""
    model, loss_fn, X, y = PROBLEMS[0].make("ce-mean")
    with curvhooks.extend(model, loss_fn, BatchGrad()):
        with pytest.raises(curvhooks.UnsupportedError, match="unbatched sequence.*pass"):
            model.attention(X[0], X[0], X[0])
        with torch.no_grad():  # inference inside the context: nothing to record, no refusal
            model.attention(X[0], X[0], X[0])
    model.attention.dropout = 0.1
    with curvhooks.extend(model.train(), loss_fn, BatchGrad()):
        with pytest.raises(curvhooks.UnsupportedError, match="training mode.*eval"):
            model(X)
    model.eval()
    with pytest.raises(curvhooks.UnsupportedError, match="MultiheadAttention.*own second"):
        curvhooks.extend(model, loss_fn, DiagHessian()).__enter__()
    with curvhooks.extend(model, loss_fn, KFAC()):  # key and value: projections of the input
        with pytest.raises(curvhooks.UnsupportedError, match="packed in_proj_weight.*one input"):
            loss_fn(model(X), y).backward()


class LinearAttention(nn.Module):
    """An ``nn.MultiheadAttention``'s attention (its weights) with the projections as
    ``nn.Linear`` layers, as timm writes it: ``qkv`` on one input, or ``q``, ``k``, ``v``."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        self.heads, width = attention.num_heads, attention.embed_dim
        if attention._qkv_same_embed_dim:
            self.qkv = nn.Linear(width, 3 * width)
            self.qkv.weight.data.copy_(attention.in_proj_weight)
            self.qkv.bias.data.copy_(attention.in_proj_bias)
        else:
            for name, weight, bias in zip(
                "qkv",
                (attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight),
                attention.in_proj_bias.chunk(3),
            ):
                layer = nn.Linear(weight.shape[1], width)
                layer.weight.data.copy_(weight)
                layer.bias.data.copy_(bias)
                setattr(self, name, layer)
        self.out = nn.Linear(width, width)
        self.out.load_state_dict(attention.out_proj.state_dict())

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(query).chunk(3, -1)
        else:
            q, k, v = self.q(query), self.k(key), self.v(value)
        batch, length, width = q.shape
        q, k, v = (
            t.view(batch, -1, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v)
        )
        mixed = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(mixed.transpose(1, 2).reshape(batch, length, width))


class SelfAttending(nn.Module):
    """Attention over the input (packed projections) or over it and two linear maps of it
    (separate projections of other widths), between linear layers."""

    def __init__(self, separate: bool) -> None:
        super().__init__()
        dims = {"kdim": 3, "vdim": 5} if separate else {}
        self.attention = nn.MultiheadAttention(WIDTH, 2, batch_first=True, **dims)
        if separate:
            self.key, self.value = nn.Linear(WIDTH, 3), nn.Linear(WIDTH, 5)
        self.head = nn.Linear(SEQUENCE * WIDTH, 3)

    def forward(self, x: Tensor) -> Tensor:
        key, value = (self.key(x), self.value(x)) if hasattr(self, "key") else (x, x)
        if isinstance(self.attention, nn.MultiheadAttention):
            mixed = self.attention(x, key, value, need_weights=False)[0]
        else:
            mixed = self.attention(x, key, value)
        return self.head(torch.tanh(mixed).flatten(1))


AS_LINEAR = {
    "attention.in_proj_weight": "attention.qkv.weight",
    "attention.in_proj_bias": "attention.qkv.bias",
    **{f"attention.{p}_proj_weight": f"attention.{p}.weight" for p in "qkv"},
    "attention.out_proj.weight": "attention.out.weight",
    "attention.out_proj.bias": "attention.out.bias",
}


def _blocks(K) -> dict[str, Tensor]:
    """Each parameter's diagonal block of a Kronecker operator (the others are zero)."""
    dense, blocks, start = K.to_dense(), {}, 0
    for name, param in zip(K.names, K.params):
        rows = slice(start, start + param.numel())
        blocks[name], start = dense[rows, rows], start + param.numel()
    return blocks


@pytest.mark.parametrize("separate", [False, True], ids=["packed", "separate"])
@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kronecker_factors_are_those_of_the_attention_with_linear_layers(separate, fisher, approx):
    """``curvhooks.kfac`` and ``KFLR`` of the attention's projections equal those of the
    same attention with ``nn.Linear`` projections (whose factors are checked against
    curvlinops' elsewhere): the packed projection is one linear map of the input to query,
    key and value, the out projection one of the core's output. The bias of separate
    projections spans three weights: it gets its exact block (``others``), and ``KFLR``
    refuses it."""
    torch.manual_seed(0)
    model = SelfAttending(separate).double().eval()
    linear = SelfAttending(separate).double().eval()
    linear.load_state_dict(model.state_dict())
    linear.attention = LinearAttention(model.attention).double()
    X, y = torch.randn(6, SEQUENCE, WIDTH, dtype=torch.float64), torch.randint(0, 3, (6,))
    data, loss_fn = [(X[:4], y[:4]), (X[4:], y[4:])], nn.CrossEntropyLoss()
    found = _blocks(curvhooks.kfac(model, loss_fn, data, fisher=fisher, approx=approx))
    expected = _blocks(curvhooks.kfac(linear, loss_fn, data, fisher=fisher, approx=approx))
    compared = [name for name in found if name != "attention.in_proj_bias" or not separate]
    for name in compared:
        assert_close(found[name], expected[AS_LINEAR.get(name, name)])
    if separate:
        with pytest.raises(curvhooks.UnsupportedError, match="in_proj_bias.*no Kronecker"):
            run_with(model, loss_fn, X, y, KFLR())
    if fisher == "type-2" and approx == "expand" and not separate:
        found = run_with(model, loss_fn, X, y, KFLR())
        expected = run_with(linear, loss_fn, X, y, KFLR())
        for name in compared:
            for part, reference_part in zip(
                found[name]["kflr"], expected[AS_LINEAR.get(name, name)]["kflr"]
            ):
                assert_close(part, reference_part)


def test_kfac_gives_cross_attention_projections_their_exact_blocks():
    """A decoder layer's cross-attention packs three projections of different inputs into
    one weight, which no Kronecker product holds: ``curvhooks.kfac`` finds it on the first
    batch and gives it its exact diagonal (``others``), and factors for the rest; over a
    one-shot iterator (no first batch to look at) the factor pass refuses it, naming
    ``params=``."""
    model, loss_fn, X, y = by_name("decoder-layer").make("ce-mean", num_samples=4)
    model.eval()
    data = [(X[:2], y[:2]), (X[2:], y[2:])]
    K = curvhooks.kfac(model, loss_fn, data)
    cross = {"block.multihead_attn.in_proj_weight", "block.multihead_attn.in_proj_bias"}
    assert cross <= set(K.others) and "block.self_attn.in_proj_weight" not in K.others
    ggn, start = reference.ggn(model, loss_fn, X, y), 0
    for name, param in zip(K.names, K.params):
        rows = slice(start, start + param.numel())
        start += param.numel()
        if name in cross:
            assert_close(K.others[name], ggn[rows, rows].diagonal())
    refused = "packed in_proj_weight.*exact blocks.*params="
    with pytest.raises(curvhooks.UnsupportedError, match=refused):
        curvhooks.kfac(model, loss_fn, iter(data), others="skip")  # one pass over the data


class CalledTwice(nn.Module):
    """An attention and an LSTM each called twice, the first call's output feeding the
    second (their parameters' products are summed per sample before anything is squared)."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(WIDTH, 2, batch_first=True)
        self.lstm = nn.LSTM(WIDTH, WIDTH, batch_first=True)
        self.head = nn.Linear(SEQUENCE * WIDTH, 3)

    def forward(self, x: Tensor) -> Tensor:
        mixed = self.attention(x, x, x)[0]
        mixed = self.attention(mixed, x, x, need_weights=False)[0]
        return self.head(self.lstm(self.lstm(mixed)[0])[0].flatten(1))


@pytest.mark.parametrize("loss", CE_MSE)
def test_modules_called_twice(loss):
    problem = Problem("twice", CalledTwice, (SEQUENCE, WIDTH), 4, is_chain=False)
    model, loss_fn, X, y = problem.make(loss)
    check_every_extension(model.eval(), loss_fn, X, y)
