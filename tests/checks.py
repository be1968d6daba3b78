"""Assertions shared by the tests: extension results against the ``tests.reference``
quantities, in float64 (``assert_close``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tests import reference
from tests.problems import assert_close


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
        assert_close(found["variance"], grads.var(0, unbiased=False))
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
