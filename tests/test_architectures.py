"""Three real architectures (LeNet-5, a ResNet-8 with BatchNorm, a transformer) at tiny sizes:
every extension and every dataset function against ``torch.func`` references in float64.

The references are computed once per case (the ResNet's dense Hessian is the costly part);
the shared problems' tests check the structures and routes in detail.
"""

from __future__ import annotations

import pytest

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
from tests.problems import ARCHITECTURES, assert_close, run_with

CASES = [(problem, loss) for problem in ARCHITECTURES for loss in problem.losses]
BATCHES = (3, 2)
"""Two unequal batches of one data set."""


@pytest.fixture(scope="module", params=CASES, ids=[f"{p.name}-{loss}" for p, loss in CASES])
def case(request):
    """``(problem, model, loss_fn, X, y, expected)`` with the references over all of X."""
    problem, loss = request.param
    model, loss_fn, X, y = problem.make(loss, num_samples=sum(BATCHES))
    expected = {
        "grads": reference.per_sample_grads(model, loss_fn, X, y),
        "ggn": reference.ggn_per_sample(model, loss_fn, X, y),
        "jacobians": reference.jacobians(model, X),
        "empirical_fisher": reference.empirical_fisher(model, loss_fn, X, y),
        "hessian": reference.hessian_matrix(model, loss_fn, X, y),
    }
    return problem, model, loss_fn, X, y, expected


def test_first_order(case):
    _, model, loss_fn, X, y, expected = case
    model.zero_grad(set_to_none=True)
    results = run_with(
        model, loss_fn, X, y, BatchGrad(), BatchL2Grad(), SumGradSquared(), Variance()
    )
    check_first_order(model, results, expected["grads"])


def test_ggn_extensions_and_jacobian(case):
    _, model, loss_fn, X, y, expected = case
    results = run_with(model, loss_fn, X, y, SqrtGGN(), DiagGGN(), BatchDiagGGN(), Jacobian())
    check_ggn(model, results, expected["ggn"], expected["jacobians"])


def test_hessian_extensions(case):
    """Exact where every nonlinear operation is a supported module; the transformer's
    attention glue raises the documented error."""
    problem, model, loss_fn, X, y, expected = case
    if problem.hessian_glue is not None:
        with pytest.raises(curvhooks.UnsupportedError, match=problem.hessian_glue):
            run_with(model, loss_fn, X, y, DiagHessian())
        return
    results = run_with(model, loss_fn, X, y, DiagHessian(), HessianBlock())
    for name, block in reference.parameter_blocks(expected["hessian"], model).items():
        assert_close(results[name]["hessian_block"], block)
        assert_close(results[name]["diag_hessian"].flatten(), block.diagonal())


@pytest.mark.parametrize("kind", ["ggn", "empirical_fisher", "hessian"])
def test_dataset_matrices_over_unequal_batches(case, kind):
    _, model, loss_fn, X, y, expected = case
    loader = list(zip(X.split(BATCHES), y.split(BATCHES)))
    matrix = getattr(curvhooks, kind)(model, loss_fn, loader)
    assert_close(matrix, expected[kind].sum(0) if kind == "ggn" else expected[kind])
