# difftron: two commands do everything.
#   make pretrain   install what is missing, then run the recipe (default: the embedded tiny run)
#   make test       the test suite (CPU)
#   make eval       lm-eval-harness tasks on the recipe's export, then the run report
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/tiny.yaml
ARGS ?=
# e.g. EVAL_ARGS="--tasks hellaswag piqa --limit 200 --noise-levels 32"
EVAL_ARGS ?=
TORCH_CPU ?= torch==2.13.0

.PHONY: pretrain test eval venv clean export push status logs cancel

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

# On a SLURM login node (sbatch on PATH, a controller answering) the recipe is submitted as a
# job; anywhere else it runs here. make status|logs|cancel follow the run's last job.
pretrain: venv
	@if command -v sbatch >/dev/null 2>&1 && timeout 10 scontrol ping >/dev/null 2>&1; then \
		PYTHONWARNINGS=ignore $(PY) -m pipeline submit --config $(CONFIG) $(ARGS); \
	else PYTHONWARNINGS=ignore $(PY) -m pipeline pretrain --config $(CONFIG) $(ARGS); fi

status logs cancel: venv
	@PYTHONWARNINGS=ignore $(PY) -m pipeline $@ --config $(CONFIG) $(if $(JOB),--job $(JOB)) $(ARGS)

eval: venv
	PYTHONWARNINGS=ignore $(PY) -m pipeline.evaluate --config $(CONFIG) $(EVAL_ARGS)

# The recipe's run folder. make export: $(RUN)/export from the adaptation's newest checkpoint.
# make push REPO=owner/name [PRIVATE=1] [STEPS=1]: that export in one commit, or with STEPS=1
# every checkpoint exported and pushed in step order, tagged step-N.
RUN ?= $(shell $(PY) -c "from pipeline.config import load_config; print(load_config('$(CONFIG)').run_dir)")
REPO ?=

export: venv
	PYTHONWARNINGS=ignore $(PY) -m pipeline.export --config $(RUN)/adapt/config.yaml \
		--checkpoint $(RUN)/adapt/checkpoints --out $(RUN)/export

push: venv
	@test -n "$(REPO)" || { echo "error: make push REPO=owner/name (token: HF_TOKEN or hf auth login)"; exit 2; }
	PYTHONWARNINGS=ignore $(PY) -m pipeline.push --repo $(REPO) $(if $(PRIVATE),--private) \
		$(if $(STEPS),--config $(RUN)/adapt/config.yaml --checkpoints $(RUN)/adapt/checkpoints,--folder $(RUN)/export)

test: venv
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf runs
