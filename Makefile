# medgain: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out

.PHONY: demo test bench clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "medgain needs $(PYTHON) on PATH (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider tests

demo: $(STAMP)
	$(BIN)/python -m medgain.cli demo --out $(DEMO_DIR)

bench: $(STAMP)
	$(BIN)/python benchmarks/gradcam.py
	$(BIN)/python benchmarks/gain_step.py

clean:
	rm -rf $(VENV) $(DEMO_DIR)
