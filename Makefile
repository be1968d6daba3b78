# Two entry points for a fresh machine: `make tour` (the main example) and `make test`.
# Both create .venv, install the CPU build of torch first (a bare `torch` may pull a
# multi-GB CUDA build), then curvhooks itself.
VENV := .venv
PYTHON := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[test]"
	touch $@

.PHONY: tour test test-slow
tour: $(VENV)/.installed
	$(PYTHON) examples/visual_tour.py --out figures

test: $(VENV)/.installed
	$(PYTHON) -m pytest -q

test-slow: $(VENV)/.installed
	$(PYTHON) -m pytest -q -m slow

.PHONY: docs
docs: $(VENV)/.installed
	$(PYTHON) -m pip install --quiet -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site
