"""Calls the hooks cannot take as one per sample: a parameter used outside its module's call
(a parent's forward using a child's weight directly, as ``nn.MultiheadAttention`` uses
``out_proj``): refused with a clear error, left out with ``unsupported="skip"``, or exact by
autograd, never zeros; a module called with the samples folded into another dimension:
refused. (Calls on tensors shared by the batch, a position embedding's, are exact: the
problems ``position-embedding`` and ``shared-constant`` run through every test.)"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvhooks
from curvhooks import BatchGrad, DiagGGN, SqrtGGN
from tests import reference
from tests.problems import assert_close, run_with


class UsesChildWeight(nn.Module):
    """Calls ``inner``, and uses ``inner.weight`` once more outside that call."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(x)) + F.linear(x, self.inner.weight))


class Encoder(nn.Module):
    """A ``TransformerEncoderLayer`` (its attention uses ``out_proj`` functionally), a mean
    over positions and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


def _problem(model_class, *input_shape):
    torch.manual_seed(0)
    model = model_class().double().eval()
    X = torch.randn(5, *input_shape, dtype=torch.float64)
    return model, nn.CrossEntropyLoss(), X, torch.randint(0, 3, (5,))


def _kept(model: nn.Module, left_out: set[str]) -> torch.Tensor:
    """The rows of the flat trainable parameters less ``left_out``."""
    pieces, start = [], 0
    for name, param in model.named_parameters():
        if name not in left_out:
            pieces.append(torch.arange(start, start + param.numel()))
        start += param.numel()
    return torch.cat(pieces)


def test_extend_refuses_or_skips_a_parameter_used_outside_its_call():
    model, loss_fn, X, y = _problem(UsesChildWeight, 4)
    with pytest.raises(
        curvhooks.UnsupportedError, match=r"inner.weight of 'inner' \(Linear\).*used outside a call"
    ):
        run_with(model, loss_fn, X, y, BatchGrad())
    grads = reference.per_sample_grads(model, loss_fn, X, y)
    diagonal = reference.split(reference.ggn(model, loss_fn, X, y).diagonal(), model)
    with pytest.warns(UserWarning, match="used outside their modules' calls inner.weight"):
        with curvhooks.extend(model, loss_fn, BatchGrad(), DiagGGN(), unsupported="skip"):
            loss_fn(model(X), y).backward()
            loss_fn(model(X), y).backward()  # warned once per context
    assert not hasattr(model.inner.weight, "grad_batch")
    assert not hasattr(model.inner.weight, "diag_ggn")
    for name in ("inner.bias", "head.weight", "head.bias"):
        assert_close(model.get_parameter(name).grad_batch, grads[name])
        assert_close(model.get_parameter(name).diag_ggn, diagonal[name])


@pytest.mark.parametrize("function", [curvhooks.ggn, curvhooks.empirical_fisher])
def test_dataset_functions_take_autograd_skip_or_refuse(function):
    model, loss_fn, X, y = _problem(UsesChildWeight, 4)
    reference_function = {curvhooks.ggn: reference.ggn}.get(function, reference.empirical_fisher)
    expected = reference_function(model, loss_fn, X, y)
    data = iter([(X[:3], y[:3]), (X[3:], y[3:])])  # one-shot: first batch kept
    assert_close(function(model, loss_fn, data), expected)  # autograd serves it
    with pytest.warns(UserWarning, match="inner.weight"):
        found = function(model, loss_fn, (X, y), structure="diag", unsupported="skip")
    kept = _kept(model, {"inner.weight"})
    assert_close(found, expected.diagonal()[kept])
    with pytest.raises(curvhooks.UnsupportedError, match="inner.weight.*used outside.*route="):
        function(model, loss_fn, (X, y), route="hooks")
    with pytest.raises(
        curvhooks.UnsupportedError, match="kfac: the hooks cannot serve inner.weight.*params="
    ):
        curvhooks.kfac(model, loss_fn, (X, y))


def test_transformer_encoder_layer_is_served_whole():
    """``nn.MultiheadAttention`` serves its ``out_proj`` (used inside its forward, never
    called) at its own calls: every parameter of the layer gets exact results, none is left
    out."""
    model, loss_fn, X, y = _problem(Encoder, 3, 4)
    assert any("out_proj" in name for name, _ in model.named_parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = curvhooks.ggn(model, loss_fn, (X, y), structure="diag", route="hooks")
        with curvhooks.extend(model, loss_fn, SqrtGGN()):
            loss_fn(model(X), y).backward()
    assert not [w for w in caught if "curvhooks" in str(w.message)]
    assert_close(found, reference.ggn(model, loss_fn, X, y).diagonal())
    assert all(hasattr(p, "sqrt_ggn") for p in model.parameters())


class FoldedPositions(nn.Module):
    """A linear layer called on ``[N * T, 4]``: samples folded into the positions."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return self.linear(x.reshape(-1, 4)).reshape(*x.shape[:2], 3).sum(1)


def test_a_call_without_the_batch_first_is_refused():
    model, loss_fn, X, y = _problem(FoldedPositions, 2, 4)
    refused = (
        r"linear.weight of 'linear' \(Linear\), called on a tensor of leading dimension 10, "
        r"not the batch \(5\)"
    )
    for extension in (BatchGrad(), DiagGGN()):
        with pytest.raises(curvhooks.UnsupportedError, match=refused):
            run_with(model, loss_fn, X, y, extension)
    with pytest.raises(curvhooks.UnsupportedError, match="leading dimension.*route='auto'"):
        curvhooks.ggn(model, loss_fn, (X, y), route="graph")
    expected = reference.ggn(model, loss_fn, X, y)
    assert_close(curvhooks.ggn(model, loss_fn, (X, y)), expected)  # auto: by autograd


def test_skip_keeps_the_hessian_on_autograd_when_the_hooks_start_again():
    model, loss_fn, X, y = _problem(UsesChildWeight, 4)
    with pytest.warns(UserWarning, match="inner.weight"):
        found = curvhooks.matrices(model, loss_fn, [(X, y)], ("ggn", "hessian"), unsupported="skip")
    kept = _kept(model, {"inner.weight"})
    assert_close(found["ggn"], reference.ggn(model, loss_fn, X, y)[kept][:, kept])
    assert_close(found["hessian"], reference.hessian_matrix(model, loss_fn, X, y)[kept][:, kept])


def test_first_order_of_a_shared_call_follows_the_actual_backward():
    """The per-sample gradients at a call shared by the batch are those of what is
    differentiated (here twice the loss plus a term of the output), as at every other call."""
    from tests.problems import by_name

    model, loss_fn, X, y = by_name("shared-constant").make("ce-sum")
    with curvhooks.extend(model, loss_fn, BatchGrad()):
        output = model(X)
        (2 * loss_fn(output, y) + output.square().sum()).backward()
    for p in model.parameters():
        assert_close(p.grad_batch.sum(0), p.grad)


class SharedTanh(nn.Module):
    """A position embedding passed through Tanh before it is broadcast over the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(7, 4), nn.Embedding(5, 4)
        self.tanh, self.head = nn.Tanh(), nn.Linear(4, 3)

    def forward(self, x):
        ids = torch.arange(x.shape[1])[None]
        return self.head(self.tokens(x) + self.tanh(self.positions(ids))).mean(1)


def test_a_nonlinear_module_on_a_shared_tensor_is_refused_by_the_hessian_extensions():
    torch.manual_seed(0)
    model, loss_fn = SharedTanh().double(), nn.CrossEntropyLoss()
    X, y = torch.randint(0, 7, (3, 5)), torch.randint(0, 3, (3,))
    with pytest.raises(curvhooks.UnsupportedError, match=r"'tanh' \(Tanh\) ran on a tensor"):
        run_with(model, loss_fn, X, y, curvhooks.DiagHessian())
    results = run_with(model, loss_fn, X, y, DiagGGN())  # the GGN is exact there
    diagonal = reference.split(reference.ggn(model, loss_fn, X, y).diagonal(), model)
    for name, found in results.items():
        assert_close(found["diag_ggn"], diagonal[name])
