"""Square-root GGN extensions against ``J^T H J`` references on every shared problem."""

from __future__ import annotations

import pytest
import torch

from curvhooks import BatchDiagGGN, DiagGGN, DiagHessian, HessianBlock, Jacobian, SqrtGGN
from tests.checks import check_ggn
from tests.problems import (
    CASE_IDS,
    CASES,
    CHAIN_CASE_IDS,
    CHAIN_CASES,
    PROBLEMS,
    assert_close,
    by_name,
    run_with,
)
from tests.reference import ggn_per_sample, jacobians, trainable


@pytest.mark.parametrize("problem, loss", CASES, ids=CASE_IDS)
def test_exact_ggn_extensions(problem, loss):
    model, loss_fn, X, y = problem.make(loss)
    expected = ggn_per_sample(model, loss_fn, X, y)  # [N, D, D]
    results = run_with(model, loss_fn, X, y, SqrtGGN(), DiagGGN(), BatchDiagGGN())
    check_ggn(model, results, expected)
    for name in trainable(model):
        assert_close(results[name]["diag_ggn_batch"].sum(0), results[name]["diag_ggn"])
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert all(results[name] == {} for name in frozen)


def test_exact_sqrt_ggn_leading_dimension():
    model, loss_fn, X, y = PROBLEMS[0].make("ce-mean")
    results = run_with(model, loss_fn, X, y, SqrtGGN())
    for name, p in model.named_parameters():
        assert results[name]["sqrt_ggn"].shape == (3, X.shape[0], *p.shape)


def _mc_results(problem, loss, mc_samples, seed):
    model, loss_fn, X, y = problem.make(loss)
    torch.manual_seed(seed)
    extensions = SqrtGGN(mc_samples=mc_samples), DiagGGN(mc_samples=mc_samples)
    return model, run_with(model, loss_fn, X, y, *extensions)


@pytest.mark.parametrize("loss", ["ce-mean", "mse-sum"])
def test_mc_is_reproducible_and_shaped(loss):
    model, first = _mc_results(PROBLEMS[0], loss, mc_samples=2, seed=1)
    _, second = _mc_results(PROBLEMS[0], loss, mc_samples=2, seed=1)
    _, other = _mc_results(PROBLEMS[0], loss, mc_samples=2, seed=2)
    for name, p in model.named_parameters():
        assert first[name]["sqrt_ggn"].shape == (2, 3, *p.shape)
        assert torch.equal(first[name]["sqrt_ggn"], second[name]["sqrt_ggn"])
        assert not torch.equal(first[name]["diag_ggn"], other[name]["diag_ggn"])
        factor = first[name]["sqrt_ggn"].flatten(2).flatten(0, 1)
        assert_close(first[name]["diag_ggn"].flatten(), factor.square().sum(0))


@pytest.mark.parametrize(
    "name, loss",
    [
        ("mlp", "ce-sum"),
        ("mlp", "mse-mean"),
        ("mlp", "bce-mean"),
        ("sequence-classes-last-dims", "ce-mean"),
    ],
)
def test_mc_is_unbiased(name, loss):
    """With many samples the MC diagonal approaches the exact one (statistical tolerance)."""
    problem = by_name(name)
    model, loss_fn, X, y = problem.make(loss)
    exact = run_with(model, loss_fn, X, y, DiagGGN())
    _, mc = _mc_results(problem, loss, mc_samples=20_000, seed=0)
    for name, _ in model.named_parameters():
        expected, estimate = exact[name]["diag_ggn"], mc[name]["diag_ggn"]
        torch.testing.assert_close(estimate, expected, rtol=0.05, atol=0.02 * expected.abs().max())


@pytest.mark.parametrize("problem", PROBLEMS, ids=[problem.name for problem in PROBLEMS])
def test_jacobian(problem):
    """``p.jacobian`` ``[C, N, *p.shape]``: the model output's per-sample Jacobian, whatever
    the loss."""
    model, loss_fn, X, y = problem.make(problem.losses[-1])
    expected = jacobians(model, X)
    results = run_with(model, loss_fn, X, y, Jacobian())
    for name, jacobian in expected.items():
        assert_close(results[name]["jacobian"], jacobian)


@pytest.mark.parametrize("problem, loss", CHAIN_CASES, ids=CHAIN_CASE_IDS)
def test_chain_and_graph_routes_agree(problem, loss):
    """On a chain, the analytic pushes and autograd's batched products give the same stacks
    (the Monte-Carlo ones from the same random draws)."""
    model, loss_fn, X, y = problem.make(loss)
    found = {}
    for route in ("chain", "graph"):
        torch.manual_seed(1)
        extensions = (
            SqrtGGN(mc_samples=2),
            DiagGGN(),
            BatchDiagGGN(),
            DiagHessian(),
            HessianBlock(),
            Jacobian(),
        )
        found[route] = run_with(model, loss_fn, X, y, *extensions, route=route)
    for name, results in found["chain"].items():
        for attribute, value in results.items():
            assert_close(found["graph"][name][attribute], value)
