"""MkDocs hook: MathJax served with the site, so that formulas render without a network.

``mkdocs.yml`` loads ``assets/mathjax/tex-mml-chtml.js``; after each build, ``on_post_build``
copies it there from the ``django-static-mathjax`` package (MathJax 3's files, with no Django
dependency; in the ``docs`` extra), with what it loads on demand: the fonts, the TeX
extensions, the menu and the accessibility components. The other combined scripts and the
SVG output are left out.
"""

from __future__ import annotations

import shutil
from importlib.resources import files
from pathlib import Path

SCRIPT = "tex-mml-chtml.js"
TARGET = "assets/mathjax"
"""Where the site holds MathJax, relative to its root."""


def source() -> Path:
    """MathJax's ``es5`` folder in the installed package."""
    try:
        return Path(str(files("mathjax"))) / "static" / "mathjax" / "es5"
    except ModuleNotFoundError as error:
        raise RuntimeError(
            "MathJax is not installed: pip install -e '.[docs]' (django-static-mathjax)"
        ) from error


def _left_out(folder: str, names: list[str]) -> list[str]:
    """The combined scripts other than ``SCRIPT`` (top level), and the SVG output."""
    top = Path(folder) == source()
    return [n for n in names if (top and n.endswith(".js") and n != SCRIPT) or "svg" in n]


def on_post_build(config, **kwargs) -> None:
    """Copy MathJax into ``config["site_dir"]/assets/mathjax``."""
    target = Path(config["site_dir"]) / TARGET
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source(), target, ignore=_left_out)
