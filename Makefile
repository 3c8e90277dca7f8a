# Two commands do all set-up on a fresh machine:  `make run`  and  `make test`.
# Both create .venv on first use. torch==2.13.0 is pinned here because a plain `torch` requirement
# pulls several GB of CUDA packages on a machine that has none; on a GPU cluster use environment.yml.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
CONFIG ?= configs/toy.yaml
PYTEST_ARGS ?=

.PHONY: venv run test lint clean-venv
venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

run: venv
	HF_HUB_OFFLINE=1 $(VENV)/bin/silmm run $(CONFIG)

test: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check silmm jobs tests bench

clean-venv:
	rm -rf $(VENV)
