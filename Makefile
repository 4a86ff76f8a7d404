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
	rm -rf $(DEMO)
	$(BIN)/ichprep synth $(DEMO)/data --studies $(DEMO_STUDIES) --seed 0
	$(BIN)/ichprep convert $(DEMO)/data/stage_2_train --labels $(DEMO)/data/stage_2_train.csv \
		-o $(DEMO)/cache.zarr --manifest-out $(DEMO)/manifest.json
	$(BIN)/ichprep verify $(DEMO)/cache.zarr
	$(BIN)/ichprep info $(DEMO)/cache.zarr
	$(BIN)/python -c "import pandas as pd; s = pd.read_parquet('$(DEMO)/cache.zarr/studies.parquet'); \
		print(s.loc[s['any'] == 1, 'start'].iloc[0] + 10)" > $(DEMO)/.slice
	$(BIN)/ichprep show $(DEMO)/cache.zarr --index $$(cat $(DEMO)/.slice) -o $(DEMO)/montage.png
	@echo
	@echo "demo done:"
	@echo "  synthetic DICOMs     $(DEMO)/data/stage_2_train  (labels: $(DEMO)/data/stage_2_train.csv)"
	@echo "  Zarr cache           $(DEMO)/cache.zarr  (manifest: $(DEMO)/manifest.json)"
	@echo "  montage of a study   $(DEMO)/montage.png"

clean:
	rm -rf $(DEMO) .pytest_cache
