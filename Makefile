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

# The libraries the tests compare with (laplace-torch and its curvlinops and BackPACK
# backends), beside the CPU torch: without their dependencies, since BackPACK and
# laplace-torch ask for torchvision, which pulls a multi-GB CUDA torch; then those
# dependencies that are light.
PEERS := backpack-for-pytorch==1.7.1 curvlinops-for-pytorch==3.0.1 laplace-torch==0.3 \
	asdfghjkl==0.1a4 torchmetrics lightning-utilities
PEER_DEPENDENCIES := einops unfoldNd einconv linear_operator opt-einsum scipy tqdm packaging

$(VENV)/.peers: $(VENV)/.installed
	$(PYTHON) -m pip install --quiet --no-deps $(PEERS)
	$(PYTHON) -m pip install --quiet $(PEER_DEPENDENCIES)
	touch $@

# The newest torch the package index offers (a CUDA build of several GB from PyPI; pip's
# cap on this machine's torch is lifted for this environment only), with the ecosystem's
# model libraries (torchvision, timm, transformers) for tests/test_ecosystem.py: PyPI's
# torchvision does not import beside the pinned CPU torch of .venv.
NEWEST := .venv-newest
NEWEST_PIP := PIP_CONSTRAINT=/dev/null $(NEWEST)/bin/python -m pip

$(NEWEST)/.installed: pyproject.toml
	python3 -m venv $(NEWEST)
	$(NEWEST_PIP) install --quiet --upgrade torch
	$(NEWEST_PIP) install --quiet -e ".[test,ecosystem]"
	$(NEWEST_PIP) install --quiet --no-deps $(PEERS)
	$(NEWEST_PIP) install --quiet $(PEER_DEPENDENCIES)
	touch $@

.PHONY: tour test test-slow test-newest
tour: $(VENV)/.installed
	$(PYTHON) examples/visual_tour.py --out figures

# Two worker processes of one thread each (tests/conftest.py pins the threads): they use
# two cores without the waits of two OpenMP threads on a shared machine.
WORKERS := -n 2

test: $(VENV)/.peers
	$(PYTHON) -m pytest -q $(WORKERS)

test-slow: $(VENV)/.peers
	$(PYTHON) -m pytest -q $(WORKERS) -m slow

test-newest: $(NEWEST)/.installed
	$(NEWEST)/bin/python -c "import torch; print('torch', torch.__version__)"
	$(NEWEST)/bin/python -m pytest -q $(WORKERS)

.PHONY: docs
docs: $(VENV)/.installed
	$(PYTHON) -m pip install --quiet -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site
