"""``curvhooks.jacobians`` against ``tests.reference.jacobians`` on the shared problems (by the
hooks and by ``torch.func``), and its derivative in the input against finite differences."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import curvhooks
from tests import reference
from tests.problems import PROBLEMS, Scaled, assert_close, by_name


def _expected(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """``[N, C, D]`` from the reference's ``{name: [C, N, *p]}``."""
    parts = reference.jacobians(model, X).values()
    return torch.cat([part.flatten(2) for part in parts], 2).transpose(0, 1)


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda problem: problem.name)
@pytest.mark.parametrize("create_graph", [False, True], ids=["hooks", "torch.func"])
def test_jacobians_match_the_reference(problem, create_graph):
    model, _, X, _ = problem.make(problem.losses[0])
    J, f = curvhooks.jacobians(model, X, create_graph=create_graph)
    assert_close(J, _expected(model, X))
    assert_close(f, model(X).flatten(1))


def test_a_subset_of_parameters_and_an_unsupported_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), Scaled(4), nn.Linear(4, 2)).double()
    X = torch.randn(5, 3, dtype=torch.float64)
    chosen = [model[0].weight, model[3].bias]
    J, _ = curvhooks.jacobians(model, X, params=chosen)
    full = _expected(model, X)
    columns = torch.cat([torch.arange(0, 12), torch.arange(full.shape[2] - 2, full.shape[2])])
    assert_close(J, full[:, :, columns])


def test_differentiable_in_the_input():
    """``d/dX sum(J * R)`` for a fixed random ``R`` against central differences (float64,
    step 1e-6)."""
    model, _, X, _ = by_name("mlp").make("ce-mean")
    X.requires_grad_(True)
    J, f = curvhooks.jacobians(model, X, create_graph=True)
    weights = torch.randn_like(J)
    (found,) = torch.autograd.grad((J * weights).sum() + f.sum(), X)
    step = 1e-6
    for index in [(0, 0), (1, 3), (2, 5)]:
        shifted = []
        for sign in (1, -1):
            moved = X.detach().clone()
            moved[index] += sign * step
            J_moved, f_moved = curvhooks.jacobians(model, moved)
            shifted.append((J_moved * weights).sum() + f_moved.sum())
        difference = (shifted[0] - shifted[1]) / (2 * step)
        torch.testing.assert_close(found[index], difference, rtol=1e-6, atol=1e-8)


def test_the_hooks_serve_a_supported_model_in_one_backward_pass(monkeypatch):
    module = importlib.import_module("curvhooks.dataset.jacobians")  # not the function

    def refuse(*args, **kwargs):
        raise AssertionError("torch.func was used")

    monkeypatch.setattr(module, "per_sample_jacobians", refuse)
    model, _, X, _ = by_name("conv-residual").make("ce-mean")
    J, _ = curvhooks.jacobians(model, X)
    assert_close(J, _expected(model, X))


def test_frozen_parameters_and_a_batching_rule_torch_gets_wrong():
    """A frozen parameter asked for by ``params=`` (the hooks serve none) and ``nn.PReLU``
    (whose backward ``vmap`` of ``jacrev`` batches wrongly in torch 2.13; three samples and
    three outputs, where the wrong shapes broadcast): both ways against the reference."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(4), nn.Linear(4, 3)).double()
    model[0].weight.requires_grad_(False)
    X = torch.randn(3, 3, dtype=torch.float64)
    for create_graph in (False, True):
        J, _ = curvhooks.jacobians(model, X, [model[0].weight], create_graph=create_graph)
        model[0].weight.requires_grad_(True)
        expected = _expected(model, X)[:, :, :12]
        model[0].weight.requires_grad_(False)
        assert_close(J, expected)
    J, _ = curvhooks.jacobians(model, X, create_graph=True)
    assert_close(J, _expected(model, X))
