"""The supported-modules page is generated from the registry and lists every class in it;
the code blocks of the self-contained pages run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from curvhooks.derivatives import LOSS_DERIVATIVES, MODULE_DERIVATIVES
from docs.supported import LOSS_ARGUMENTS, MODULE_ARGUMENTS, PAGE, render

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_every_registered_class_has_its_arguments_written_and_nothing_else_does():
    assert set(MODULE_ARGUMENTS) == set(MODULE_DERIVATIVES)
    assert set(LOSS_ARGUMENTS) == set(LOSS_DERIVATIVES)


def test_supported_page_is_the_generators_output():
    assert PAGE.read_text() == render(), "run `python docs/supported.py` to regenerate it"


SELF_CONTAINED = ["how-to/sharpness.md"]
"""Docs pages whose code blocks run on their own, each page's blocks in order."""


@pytest.mark.parametrize("page", SELF_CONTAINED)
def test_code_blocks_run_on_their_own(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = (DOCS / page).read_text()
    blocks = re.findall(r"```python\n(.*?)```", source, re.S)
    assert blocks, f"no code block in {page}"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, page, "exec"), namespace)
