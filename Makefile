# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= demo_out
DEMO_STUDIES ?= 40

.PHONY: install test demo bench clean

$(STAMP): setup.cfg setup.py pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/ichprep synth $(DEMO)/data --studies $(DEMO_STUDIES) --seed 0
	$(BIN)/ichprep scan $(DEMO)/data/stage_2_train --labels $(DEMO)/data/stage_2_train.csv -o $(DEMO)/slices.parquet
	@echo
	@echo "demo done: synthetic DICOMs in $(DEMO)/data/stage_2_train, labels in $(DEMO)/data/stage_2_train.csv,"
	@echo "header scan in $(DEMO)/slices.parquet"

clean:
	rm -rf $(DEMO) .pytest_cache
