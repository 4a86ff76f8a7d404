# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= demo_out
DEMO_STUDIES ?= 40
STUDY  ?= demo_study
STUDY_STUDIES ?= 120
EXTERNAL ?= demo_external
KAGGLE  = $(DEMO)/rsna.zip::rsna-intracranial-hemorrhage-detection

.PHONY: install test demo demo-study demo-external bench clean

$(STAMP): setup.cfg setup.py pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

demo: $(STAMP)
	rm -rf $(DEMO)
	@echo "--- a Kaggle-style zip (train and test folders, both CSVs), read where it lies: nothing is unpacked"
	$(BIN)/ichprep synth $(DEMO)/rsna.zip --zip --studies $(DEMO_STUDIES) --seed 0 --lesion-rate 0.9 --min-lesion-pixels 800
	$(BIN)/ichprep scan $(KAGGLE)/stage_2_train --labels $(KAGGLE)/stage_2_train.csv -o $(DEMO)/scan.parquet
	$(BIN)/ichprep convert $(KAGGLE)/stage_2_train --scan $(DEMO)/scan.parquet \
		-o $(DEMO)/cache.zarr --manifest-out $(DEMO)/manifest.json
	$(BIN)/ichprep verify $(DEMO)/cache.zarr
	$(BIN)/ichprep info $(DEMO)/cache.zarr
	$(BIN)/ichprep show $(DEMO)/cache.zarr --slot 30 -o $(DEMO)/montage.png
	@echo "--- a 64x64 cache of the same slices, so a CPU can train on it in a minute"
	$(BIN)/ichprep convert $(KAGGLE)/stage_2_train --scan $(DEMO)/scan.parquet \
		-o $(DEMO)/cache64.zarr --size 64 --shard-slices 32
	$(BIN)/ichtrain train $(DEMO)/cache64.zarr --out $(DEMO)/run --arch resnet18 --image-size 64 \
		--epochs 6 --batch-size 16 --lr 2e-3 --optimizer adamw --scheduler cosine --workers 1 --device cpu
	@echo "--- a held-out archive from another seed, scored with the validation thresholds"
	$(BIN)/ichprep synth $(DEMO)/heldout --studies $(DEMO_STUDIES) --seed 21 --lesion-rate 0.9 --min-lesion-pixels 800
	$(BIN)/ichprep convert $(DEMO)/heldout/stage_2_train --labels $(DEMO)/heldout/stage_2_train.csv \
		-o $(DEMO)/heldout64.zarr --size 64 --shard-slices 32
	$(BIN)/ichtrain evaluate $(DEMO)/run/best.pt --store $(DEMO)/heldout64.zarr --split all --out $(DEMO)/eval --workers 1
	@echo "--- a submission for the zip's test folder, in the sample submission's order"
	$(BIN)/ichtrain predict $(DEMO)/run/best.pt --dicom-dir $(KAGGLE)/stage_2_test \
		--sample-submission $(KAGGLE)/stage_2_sample_submission.csv -o $(DEMO)/submission.csv --workers 1
	@echo
	@echo "demo done:"
	@echo "  synthetic archive    $(DEMO)/rsna.zip  (stage_2_train, stage_2_test, both CSVs)"
	@echo "  Zarr cache           $(DEMO)/cache.zarr  (manifest: $(DEMO)/manifest.json)"
	@echo "  montage of a study   $(DEMO)/montage.png"
	@echo "  training run         $(DEMO)/run  (metrics.json, loss.png, roc.png, calibration.png, best.pt, last.pt)"
	@echo "  held-out evaluation  $(DEMO)/eval  (metrics.json, roc.png, calibration.png, predictions.parquet)"
	@echo "  Kaggle submission    $(DEMO)/submission.csv"

# Study-level modelling: 3 patient folds of a per-slice CNN, then a sequence model over each study's slices
# (the same archive settings and training recipe as `make demo`, on 120 studies: stage 2 learns from the folds'
# out-of-fold outputs and needs that many; BENCHMARKS.md, "The window model").
demo-study: $(STAMP)
	rm -rf $(STUDY)
	$(BIN)/ichprep synth $(STUDY)/data --studies $(STUDY_STUDIES) --seed 0 --lesion-rate 0.9 --min-lesion-pixels 800
	$(BIN)/ichprep convert $(STUDY)/data/stage_2_train --labels $(STUDY)/data/stage_2_train.csv \
		-o $(STUDY)/cache64.zarr --size 64 --shard-slices 32
	$(BIN)/ichtrain cv $(STUDY)/cache64.zarr --out $(STUDY)/exp --folds 3 --arch resnet18 --image-size 64 \
		--epochs 6 --batch-size 16 --lr 2e-3 --optimizer adamw --scheduler cosine --workers 1 --device cpu
	$(BIN)/ichtrain seq $(STUDY)/exp --device cpu
	@echo "--- a held-out archive from another seed: stage 1 alone, stage 1 + 2, and the best constant"
	$(BIN)/ichprep synth $(STUDY)/heldout --studies 30 --seed 21 --lesion-rate 0.9 --min-lesion-pixels 800
	$(BIN)/ichtrain predict $(STUDY)/exp --dicom-dir $(STUDY)/heldout/stage_2_train -o $(STUDY)/stage1.csv \
		--no-seq --workers 1 --device cpu
	$(BIN)/ichtrain predict $(STUDY)/exp --dicom-dir $(STUDY)/heldout/stage_2_train -o $(STUDY)/submission.csv \
		--workers 1 --device cpu
	$(BIN)/ichtrain score $(STUDY)/stage1.csv --labels $(STUDY)/heldout/stage_2_train.csv | tail -1
	$(BIN)/ichtrain score $(STUDY)/submission.csv --labels $(STUDY)/heldout/stage_2_train.csv | tail -1
	@echo
	@echo "demo-study done: $(STUDY)/exp (folds, oof.parquet, metrics.json, seq/, compare.png, study_<uid>.png)"

# External validation: make demo-study's experiment (its operating points fixed on its out-of-fold studies)
# scored on a CQ500-style archive of another seed, converted with the defaults at the experiment's 64².
demo-external: $(STAMP)
	test -f $(STUDY)/exp/seq/seq.pt || $(MAKE) demo-study
	rm -rf $(EXTERNAL)
	$(BIN)/ichprep synth $(EXTERNAL)/hospital --layout hospital --studies 60 --seed 21 --size 256 \
		--lesion-rate 0.9 --min-lesion-pixels 800
	$(BIN)/ichprep convert $(EXTERNAL)/hospital --study-labels $(EXTERNAL)/hospital/reads.csv \
		-o $(EXTERNAL)/hospital64.zarr --size 64 --shard-slices 32
	$(BIN)/ichtrain evaluate $(STUDY)/exp --store $(EXTERNAL)/hospital64.zarr --out $(EXTERNAL)/eval \
		--workers 1 --device cpu
	@echo "demo-external done: $(EXTERNAL)/eval (study_metrics.json, study_roc.png, worst_studies.png)"

bench: $(STAMP)
	$(BIN)/python -m benchmarks --out bench_out/bench.json
	@echo "table printed above; every figure in bench_out/bench.json (see BENCHMARKS.md)"

clean:
	rm -rf $(DEMO) $(STUDY) $(EXTERNAL) .pytest_cache
