"""Everything registered in curvhooks has test settings: every extension class (in
``tests.registry``), every module with derivatives (in the per-module tables of
``tests.test_derivatives``, which the finite-difference tests share, and in a model of the
shared problem list) and every loss (in the problems' losses and the finite-difference
cases). Registering something new without them fails here."""

from __future__ import annotations

from torch import nn

import curvhooks.extensions
from curvhooks.derivatives import LOSS_DERIVATIVES, MODULE_DERIVATIVES
from curvhooks.extensions import Extension
from tests.problems import LOSSES, PROBLEMS
from tests.registry import EXTENSION_SETTINGS
from tests.test_attention import test_per_sample_gradients_match_finite_differences as attention
from tests.test_derivatives import (
    MODULES,
    test_embedding_products_with_repeated_indices_and_padding,
)
from tests.test_finite_differences import LOSS_CASES
from tests.test_recurrent import test_per_sample_gradients_match_finite_differences as recurrent


def _subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _subclasses(sub)
    return found


def _registered_classes(table: dict, instances: list[object]) -> set[type]:
    """The table's classes that one of ``instances`` is an instance of (most specific)."""
    return {
        next(c for c in type(obj).__mro__ if c in table)
        for obj in instances
        if any(c in table for c in type(obj).__mro__)
    }


def test_every_extension_class_has_settings():
    library = {
        cls
        for cls in _subclasses(Extension)
        if cls.__module__.startswith("curvhooks.") and cls.attribute
    }
    assert library, "no extension classes found"
    assert library <= set(EXTENSION_SETTINGS), library - set(EXTENSION_SETTINGS)
    public = [getattr(curvhooks.extensions, name) for name in curvhooks.extensions.__all__]
    assert library <= {obj for obj in public if isinstance(obj, type)}


OWN_TESTS = {
    nn.Embedding: test_embedding_products_with_repeated_indices_and_padding,
    nn.MultiheadAttention: attention,
    **{cls: recurrent for cls in (nn.RNN, nn.LSTM, nn.GRU)},
}
"""Modules tested by tests of their own instead of the per-module tables (integer inputs,
several arguments), finite differences included."""


def test_every_module_has_derivative_and_problem_settings():
    per_module = [build() for build, _ in MODULES.values()]
    tabled = _registered_classes(MODULE_DERIVATIVES, per_module)
    assert tabled | set(OWN_TESTS) == set(MODULE_DERIVATIVES)
    in_problems = [m for problem in PROBLEMS for m in problem.build_model().modules()]
    missing = set(MODULE_DERIVATIVES) - _registered_classes(MODULE_DERIVATIVES, in_problems)
    assert not missing, f"modules in no shared problem: {missing}"


def test_every_loss_has_settings():
    in_problems = [build() for build in LOSSES.values()]
    assert _registered_classes(LOSS_DERIVATIVES, in_problems) == set(LOSS_DERIVATIVES)
    in_cases = [build() for build, _ in LOSS_CASES.values()]
    assert _registered_classes(LOSS_DERIVATIVES, in_cases) == set(LOSS_DERIVATIVES)
