"""The supported-modules page is generated from the registry and lists every class in it."""

from __future__ import annotations

from curvhooks.derivatives import LOSS_DERIVATIVES, MODULE_DERIVATIVES
from docs.supported import LOSS_ARGUMENTS, MODULE_ARGUMENTS, PAGE, render


def test_every_registered_class_has_its_arguments_written_and_nothing_else_does():
    assert set(MODULE_ARGUMENTS) == set(MODULE_DERIVATIVES)
    assert set(LOSS_ARGUMENTS) == set(LOSS_DERIVATIVES)


def test_supported_page_is_the_generators_output():
    assert PAGE.read_text() == render(), "run `python docs/supported.py` to regenerate it"
