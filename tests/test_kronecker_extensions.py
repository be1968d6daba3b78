"""``KFLR`` and ``KFAC`` against ``tests.reference.kronecker_factors`` (``torch.func``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvhooks
from curvhooks import KFAC, KFLR
from tests import reference
from tests.problems import assert_close, by_name, run_with

KRONECKER_PROBLEMS = [
    "mlp",
    "linear-extra-dims",
    "linear-extra-dims-output",
    "conv-stride-padding",
    "conv-dilation-tuple",
    "conv-groups-no-bias",
    "conv1d",
    "conv3d",
    "residual-inplace-relu",
    "conv-residual",
    "sequence-classes-last-dims",
]
"""Shared problems whose trainable modules are all Linear or Conv."""
CASES = [(name, loss) for name in KRONECKER_PROBLEMS for loss in by_name(name).losses]


def _layers(model: nn.Module) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
        and module.weight.requires_grad
    ]


@pytest.mark.parametrize("name, loss", CASES, ids=[f"{n}-{loss}" for n, loss in CASES])
def test_kflr_factors(name, loss):
    model, loss_fn, X, y = by_name(name).make(loss)
    results = run_with(model, loss_fn, X, y, KFLR())
    for layer in _layers(model):
        B, A = reference.kronecker_factors(model, loss_fn, X, y, layer)
        assert_close(results[f"{layer}.weight"]["kflr"][0], B)
        assert_close(results[f"{layer}.weight"]["kflr"][1], A)
        if f"{layer}.bias" in results and results[f"{layer}.bias"]:
            (bias_B,) = results[f"{layer}.bias"]["kflr"]
            assert_close(bias_B, B)


def test_kflr_of_one_sample_and_position_is_the_ggn_block():
    """Without weight sharing and with one sample, ``kron(B, A)`` is the GGN block."""
    model, loss_fn, X, y = by_name("mlp").make("ce-sum", num_samples=1)
    results = run_with(model, loss_fn, X, y, KFLR())
    ggn = reference.ggn(model, loss_fn, X, y)
    B, A = results["4.weight"]["kflr"]
    start = sum(p.numel() for p in list(model.parameters())[:4])
    block = ggn[start : start + B.shape[0] * A.shape[0], start : start + B.shape[0] * A.shape[0]]
    assert_close(torch.kron(B, A), block)


def test_kfac_tends_to_kflr():
    model, loss_fn, X, y = by_name("conv-stride-padding").make("ce-mean")
    exact = run_with(model, loss_fn, X, y, KFLR())["3.weight"]["kflr"][0]
    torch.manual_seed(0)
    sampled = run_with(model, loss_fn, X, y, KFAC(mc_samples=20000))["3.weight"]["kfac"][0]
    torch.testing.assert_close(sampled, exact, rtol=0.05, atol=0.02 * exact.abs().max().item())


@pytest.mark.parametrize("problem", ["cnn-batchnorm", "embedding-padding"])
def test_unsupported_layers_raise_and_can_be_skipped(problem):
    model, loss_fn, X, y = by_name(problem).make("ce-mean")
    with pytest.raises(curvhooks.UnsupportedError, match="Kronecker factors are supported for"):
        run_with(model, loss_fn, X, y, KFLR())
    with (
        pytest.warns(UserWarning, match=r"skips .* by KFLR\(\)"),
        curvhooks.extend(model, loss_fn, KFLR(), curvhooks.DiagGGN(), unsupported="skip"),
    ):
        loss_fn(model(X), y).backward()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            assert hasattr(param, "kflr") == isinstance(module, (nn.Linear, nn.Conv2d))
            assert hasattr(param, "diag_ggn"), "the other extensions still serve the module"


def test_tied_weights_raise():
    model, loss_fn, X, y = by_name("tied-weights").make("ce-mean")
    named = r"KFAC of weight of 'first' \(Linear\), weight of 'second' \(Linear\) \(2 calls\)"
    with pytest.raises(curvhooks.UnsupportedError, match=named + ".*untie the weights"):
        run_with(model, loss_fn, X, y, KFLR())


def test_bad_mc_samples():
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="mc_samples"):
            KFAC(mc_samples=bad)
