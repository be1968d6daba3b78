"""Every PyTorch internal in ``curvhooks._compat`` without it: the fallback gives the same
numbers (time or memory aside) or a clear error."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import curvhooks
import curvhooks._compat as compat
from curvhooks import DiagGGN, SqrtGGN
from tests import reference
from tests.checks import check_ggn
from tests.problems import assert_close, by_name, run_with


def _reused_across_passes(model, loss_fn, X, y) -> bool:
    """Whether the second pass of a context held open writes ``sqrt_ggn`` into the first's
    memory (the results agree either way)."""
    with curvhooks.extend(model, loss_fn, SqrtGGN()):
        loss_fn(model(X), y).backward()
        first = model[0].weight.sqrt_ggn
        values, pointer = first.clone(), first.data_ptr()
        del first
        loss_fn(model(X), y).backward()
        second = model[0].weight.sqrt_ggn
    assert_close(second, values)
    return second.data_ptr() == pointer


def test_without_storage_counts_results_are_not_reused(monkeypatch):
    model, loss_fn, X, y = by_name("mlp").make("ce-mean")
    assert _reused_across_passes(model, loss_fn, X, y)
    monkeypatch.delattr(torch._C, "_storage_Use_Count")
    assert compat.storage_users(torch.zeros(3)) is None
    assert not _reused_across_passes(model, loss_fn, X, y)


def test_without_queue_callback_shared_parameters_are_refused(monkeypatch):
    monkeypatch.setattr(compat, "_queue_callback", lambda: None)
    model, loss_fn, X, y = by_name("tied-weights").make("ce-mean")
    with pytest.raises(curvhooks.UnsupportedError, match="queue_callback"):
        run_with(model, loss_fn, X, y, DiagGGN())
    model, loss_fn, X, y = by_name("mlp").make("ce-mean")
    run_with(model, loss_fn, X, y, DiagGGN())  # no shared parameter: no callback needed


def test_without_saved_indices_max_pooling_recomputes_them(monkeypatch):
    model, loss_fn, X, y = by_name("cnn-pooling").make("ce-mean")
    expected = reference.ggn_per_sample(model, loss_fn, X, y)
    monkeypatch.setattr(curvhooks.derivatives.pooling, "saved", lambda node, name: None)
    results = run_with(model, loss_fn, X, y, SqrtGGN(), DiagGGN(), curvhooks.BatchDiagGGN())
    check_ggn(model, results, expected)


def test_without_functorch_wrapping_transformed_calls_are_not_told_apart(monkeypatch):
    wrapped = []
    torch.func.vmap(lambda x: wrapped.append(compat.is_transformed(x)) or x)(torch.zeros(2, 3))
    assert wrapped == [True] and not compat.is_transformed(torch.zeros(2))
    monkeypatch.delattr(torch._C._functorch, "is_functorch_wrapped_tensor")
    wrapped.clear()
    torch.func.vmap(lambda x: wrapped.append(compat.is_transformed(x)) or x)(torch.zeros(2, 3))
    assert wrapped == [False]


def test_without_kernel_choice_attention_runs_as_it_is(monkeypatch):
    layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True).double().eval()
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(12, 2)).double()
    X, y = torch.randn(3, 3, 4, dtype=torch.float64), torch.randint(0, 2, (3,))
    with compat.math_attention():
        expected = reference.hessian_matrix(model, nn.CrossEntropyLoss(), X, y)
    found = curvhooks.hessian(model, nn.CrossEntropyLoss(), (X, y))  # math kernel chosen
    assert_close(found, expected)
    monkeypatch.setitem(sys.modules, "torch.nn.attention", None)
    assert type(compat.math_attention()).__name__ == "nullcontext"
    plain = nn.Sequential(nn.Linear(12, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    flat = X.flatten(1)
    expected = reference.hessian_matrix(plain, nn.CrossEntropyLoss(), flat, y)
    assert_close(curvhooks.hessian(plain, nn.CrossEntropyLoss(), (flat, y)), expected)


def test_private_base_classes_or_their_public_subclasses():
    assert compat.BATCH_NORMS == (nn.modules.batchnorm._BatchNorm,)
    public = (nn.BatchNorm1d, nn.BatchNorm2d)
    assert compat._private_base(nn.modules.batchnorm, "_Missing", public) == public
    assert all(issubclass(cls, compat.DROPOUTS) for cls in (nn.Dropout, nn.Dropout2d))
