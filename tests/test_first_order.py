"""First-order extensions against ``vmap(grad)`` references on every shared problem."""

from __future__ import annotations

import pytest
import torch

from curvhooks import BatchGrad, BatchL2Grad, SumGradSquared, Variance
from tests.checks import check_first_order
from tests.problems import CASE_IDS, CASES, run_with
from tests.reference import per_sample_grads


@pytest.mark.parametrize("problem, loss", CASES, ids=CASE_IDS)
def test_first_order_extensions(problem, loss):
    model, loss_fn, X, y = problem.make(loss)
    expected = per_sample_grads(model, loss_fn, X, y)
    results = run_with(
        model, loss_fn, X, y, BatchGrad(), BatchL2Grad(), SumGradSquared(), Variance()
    )
    check_first_order(model, results, expected)


@pytest.mark.parametrize("problem, loss", CASES[:1] + CASES[-4:], ids=CASE_IDS[:1] + CASE_IDS[-4:])
def test_grad_is_plain_autograd(problem, loss):
    """Inside the context, p.grad is bit for bit what plain autograd gives."""
    model, loss_fn, X, y = problem.make(loss)
    loss_fn(model(X), y).backward()
    plain = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    run_with(model, loss_fn, X, y, BatchGrad(), Variance())
    hooked = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(plain, hooked))
