"""Exact Hessian extensions against ``torch.func.hessian`` on every shared problem."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvhooks
from curvhooks import DiagGGN, DiagHessian, HessianBlock
from tests.problems import CASE_IDS, CASES, assert_close, run_with
from tests.reference import ggn, hessian_blocks, split


@pytest.mark.parametrize("problem, loss", CASES, ids=CASE_IDS)
def test_hessian_extensions(problem, loss):
    model, loss_fn, X, y = problem.make(loss)
    if problem.hessian_glue is not None:  # a nonlinear operation outside the supported modules
        with pytest.raises(
            curvhooks.UnsupportedError, match=f"DiagHessian.*{problem.hessian_glue}"
        ):
            run_with(model, loss_fn, X, y, DiagHessian())
        return
    expected = hessian_blocks(model, loss_fn, X, y)
    results = run_with(model, loss_fn, X, y, DiagHessian(), HessianBlock(), DiagGGN())
    for name, block in expected.items():
        assert_close(results[name]["hessian_block"], block)
        assert_close(results[name]["diag_hessian"].flatten(), block.diagonal())
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert all(results[name] == {} for name in frozen)


def test_sigmoid_heavy_network_where_hessian_and_ggn_differ():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 6), nn.Sigmoid(), nn.Linear(6, 3)
    ).double()
    X, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    loss_fn = nn.CrossEntropyLoss()
    results = run_with(model, loss_fn, X, y, DiagHessian(), DiagGGN())
    expected = split(
        torch.cat([b.diagonal() for b in hessian_blocks(model, loss_fn, X, y).values()]), model
    )
    ggn_diag = split(ggn(model, loss_fn, X, y).diagonal(), model)
    first = results["0.weight"]
    assert_close(first["diag_hessian"], expected["0.weight"])
    assert (first["diag_hessian"] - ggn_diag["0.weight"]).abs().max() > 0.1 * ggn_diag[
        "0.weight"
    ].abs().max()
