"""The contract between derivatives and extensions, on every shared problem: no derivatives
method or extension writes into a tensor it did not create (``tests.read_only``), and
extensions computed together in one context give what each gives alone."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

from curvhooks import UnsupportedError
from curvhooks.derivatives.linear import LinearDerivatives
from tests.problems import PROBLEMS, assert_close, by_name, run_with
from tests.read_only import read_only_checked
from tests.registry import SETTINGS, Setting

DETERMINISTIC = [setting for setting in SETTINGS if not setting.random]
RANDOM = [setting for setting in SETTINGS if setting.random]
CASES = [(problem, loss) for problem in PROBLEMS for loss in problem.losses[::3]]
PAIR_PROBLEMS = ["mlp", "cnn-batchnorm", "branches-cat", "tied-weights", "mlp-layernorm-gelu"]
"""Problems every ordered pair of extensions runs on by default (all problems with -m slow):
a chain, BatchNorm, a graph with a join, a parameter used twice, a module with curvature
between entries."""


def _run_checked(problem, loss: str, settings: list[Setting]) -> dict | None:
    """``run_with`` the settings' extensions under the read-only check; ``None`` where one of
    them does not support the problem."""
    model, loss_fn, X, y = problem.make(loss)
    extensions = [setting.build(model) for setting in settings]
    torch.manual_seed(0)
    try:
        with read_only_checked(extensions):
            return run_with(model, loss_fn, X, y, *extensions)
    except UnsupportedError:
        return None


def _assert_same(found: object, expected: object) -> None:
    if isinstance(expected, Tensor):
        assert_close(found, expected)
    else:
        assert len(found) == len(expected)
        for part, expected_part in zip(found, expected):
            _assert_same(part, expected_part)


def _assert_as_alone(together: dict, alone: dict) -> None:
    """Every result computed together equals the one computed alone."""
    for name, results in alone.items():
        for attribute, expected in results.items():
            _assert_same(together[name][attribute], expected)


def _alone(problem, loss: str, settings: list[Setting]) -> dict[Setting, dict]:
    """Each setting's results alone, for the settings that support the problem."""
    found = {setting: _run_checked(problem, loss, [setting]) for setting in settings}
    return {setting: results for setting, results in found.items() if results is not None}


@pytest.mark.parametrize(
    "problem, loss", CASES, ids=[f"{problem.name}-{loss}" for problem, loss in CASES]
)
def test_together_as_alone_and_read_only(problem, loss):
    alone = _alone(problem, loss, DETERMINISTIC)
    assert len(alone) >= 8, "first-order and GGN extensions serve every shared problem"
    for order in (list(alone), list(alone)[::-1]):
        together = _run_checked(problem, loss, order)
        for results in alone.values():
            _assert_as_alone(together, results)
    supported_random = [s for s in RANDOM if _run_checked(problem, loss, [s]) is not None]
    assert supported_random, "the Monte-Carlo GGN extensions serve every shared problem"
    assert _run_checked(problem, loss, supported_random) is not None


def _pair_cases(names: list[str]) -> list:
    return [
        pytest.param(name, first, second, id=f"{name}-{first.name}-{second.name}")
        for name in names
        for first, second in itertools.permutations(DETERMINISTIC, 2)
    ]


@pytest.mark.parametrize("name, first, second", _pair_cases(PAIR_PROBLEMS))
def test_every_pair(name, first, second):
    _check_pair(by_name(name), first, second)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, first, second",
    _pair_cases([p.name for p in PROBLEMS if p.name not in PAIR_PROBLEMS]),
)
def test_every_pair_on_every_problem(name, first, second):
    _check_pair(by_name(name), first, second)


def _check_pair(problem, first: Setting, second: Setting) -> None:
    loss = problem.losses[0]
    alone = _alone(problem, loss, [first, second])
    if len(alone) < 2:
        pytest.skip("not both extensions support the problem")
    together = _run_checked(problem, loss, [first, second])
    for results in alone.values():
        _assert_as_alone(together, results)


def test_the_check_sees_a_write_into_the_stack(monkeypatch):
    """A derivatives method that scales the stack in place fails the read-only check."""

    def scaling_in_place(self, io, mat):
        return mat.mul_(2).matmul(io.module.weight.detach())

    monkeypatch.setattr(LinearDerivatives, "jac_t_mat_prod", scaling_in_place)
    sqrt_ggn = next(setting for setting in SETTINGS if setting.name == "SqrtGGN")
    with pytest.raises(AssertionError, match="LinearDerivatives.jac_t_mat_prod wrote into"):
        _run_checked(by_name("mlp"), "ce-sum", [sqrt_ggn])
