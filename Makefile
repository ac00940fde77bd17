# difftron: two commands do everything.
#   make pretrain   install what is missing, then run the recipe (default: the embedded tiny run)
#   make test       the test suite (CPU)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/tiny.yaml
ARGS ?=
TORCH_CPU ?= torch==2.13.0

.PHONY: pretrain test venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# The CPU wheel first: a plain "torch" requirement would pull several GB of CUDA.
	@if $(PY) -c "import torch" 2>/dev/null; then :; \
	elif command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install --quiet torch; \
	else $(PY) -m pip install --quiet $(TORCH_CPU); fi
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

pretrain: venv
	PYTHONWARNINGS=ignore $(PY) -m pipeline pretrain --config $(CONFIG) $(ARGS)

test: venv
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf runs
