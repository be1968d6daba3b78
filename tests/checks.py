"""Assertions shared by the tests: extension results against the ``tests.reference``
quantities, in float64 (``assert_close``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from curvhooks import (
    BatchDiagGGN,
    BatchGrad,
    BatchL2Grad,
    DiagGGN,
    Jacobian,
    SqrtGGN,
    SumGradSquared,
    Variance,
)
from tests import reference
from tests.problems import assert_close, run_with


def flat_factor(results: dict, names: list[str]) -> Tensor:
    """The parameters' ``sqrt_ggn`` side by side: ``[V * N, D]``."""
    factors = [results[name]["sqrt_ggn"] for name in names]
    return torch.cat([f.flatten(2) for f in factors], dim=2).flatten(0, 1)


def check_first_order(model: nn.Module, results: dict, expected: dict[str, Tensor]) -> None:
    """``BatchGrad``, ``BatchL2Grad``, ``SumGradSquared`` and ``Variance`` against the
    per-sample gradients ``expected`` (``reference.per_sample_grads``); ``grad_batch`` sums to
    ``p.grad``; frozen parameters get no attributes."""
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert results[name] == {}, f"frozen {name} got attributes"
            continue
        grads, found = expected[name], results[name]
        assert_close(found["grad_batch"], grads)
        assert_close(found["batch_l2"], grads.flatten(1).square().sum(1))
        assert_close(found["sum_grad_squared"], grads.square().sum(0))
        # Variance is the second moment less the squared mean: its rounding is relative to
        # the second moment, not to the variance (zero where the samples' gradients agree).
        scale = float(grads.square().mean(0).max())
        torch.testing.assert_close(
            found["variance"], grads.var(0, unbiased=False), rtol=1e-10, atol=1e-12 + 1e-13 * scale
        )
        assert_close(found["grad_batch"].sum(0), param.grad)


def check_ggn(
    model: nn.Module, results: dict, ggn_per_sample: Tensor, jacobians: dict | None = None
) -> None:
    """``SqrtGGN`` (every block, across parameters too), ``DiagGGN`` and ``BatchDiagGGN``
    against ``ggn_per_sample`` ``[N, D, D]`` (``reference.ggn_per_sample``), and ``Jacobian``
    against ``jacobians`` (``reference.jacobians``) where given."""
    names = list(reference.trainable(model))
    factor = flat_factor(results, names)
    assert_close(factor.T @ factor, ggn_per_sample.sum(0))
    diagonal = reference.split(ggn_per_sample.sum(0).diagonal(), model)
    per_sample = reference.split(ggn_per_sample.diagonal(dim1=1, dim2=2), model)
    for name in names:
        assert_close(results[name]["diag_ggn"], diagonal[name])
        assert_close(results[name]["diag_ggn_batch"], per_sample[name])
        if jacobians is not None:
            assert_close(results[name]["jacobian"], jacobians[name])


FIRST_ORDER = (BatchGrad(), BatchL2Grad(), SumGradSquared(), Variance())
GGN_FAMILY = (SqrtGGN(), DiagGGN(), BatchDiagGGN(), Jacobian())


def check_every_extension(
    model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor, route: str = "auto"
) -> None:
    """Every first-order and GGN-family extension in one backward pass, against the
    references (``check_first_order``, ``check_ggn``)."""
    results = run_with(model, loss_fn, X, y, *FIRST_ORDER, *GGN_FAMILY, route=route)
    check_first_order(model, results, reference.per_sample_grads(model, loss_fn, X, y))
    expected = reference.ggn_per_sample(model, loss_fn, X, y)
    check_ggn(model, results, expected, reference.jacobians(model, X))


def check_finite_differences(
    model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor, entries: list, rtol: float = 1e-7
) -> None:
    """``grad_batch`` (already computed on ``X``, ``y`` with a sum-reduced ``loss_fn``) at
    each ``(param, index)`` of ``entries`` against central differences of each sample's
    loss (float64, step 1e-6)."""
    step = 1e-6
    for param, index in entries:
        for n in range(len(X)):
            with torch.no_grad():
                param[index] += step
                up = loss_fn(model(X[n : n + 1]), y[n : n + 1])
                param[index] -= 2 * step
                down = loss_fn(model(X[n : n + 1]), y[n : n + 1])
                param[index] += step
            difference = (up - down) / (2 * step)
            torch.testing.assert_close(param.grad_batch[n][index], difference, rtol=rtol, atol=1e-9)
