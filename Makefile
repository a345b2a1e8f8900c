# medgain: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out

.PHONY: demo demo-glimpse demo-wsi demo-dermoscopy test bench gpu-check clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "medgain needs $(PYTHON) on PATH (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# one pytest-xdist worker per core (TEST_WORKERS=0 runs in one process), whole files to a worker, the slowest files
# first (tests/conftest.py, which also gives each worker one compute thread)
TEST_WORKERS ?= auto
test: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 tests

# the absolute `mlflow ui` command of a demo's store, as medgain.tracking.ui_command prints it: one server
# (one web worker, no job consumers), so that Ctrl+C stops all of it
print_ui = echo "browse the runs (model-training view):"; \
	echo "  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(abspath $(BIN))/mlflow ui --backend-store-uri \
	sqlite:///$(abspath $(1)) --host 127.0.0.1 --port 5000 --workers 1"; \
	echo "  then open http://127.0.0.1:5000/\#/experiments?workflowType=machine_learning"

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m medgain.cli demo --out $(DEMO_DIR)

# recurrent glimpse attention on synthetic pattern2 (128², 3-channel, 2000 images): data, training, test evaluation.
# The training and validation images are read once into memory (CacheDataset), not in every epoch.
GLIMPSE_DIR ?= demo_glimpse
GLIMPSE_BUNDLE := bundles/glimpse_attention
GLIMPSE_RUN := $(BIN)/python -m monai.bundle run --bundle_root $(GLIMPSE_DIR) \
	--meta_file $(GLIMPSE_BUNDLE)/configs/metadata.json --logging_file $(GLIMPSE_BUNDLE)/configs/logging.conf \
	--dataset_dir $(GLIMPSE_DIR)/data --num_workers 0
demo-glimpse: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/medgain synth patterns --kind pattern2 --rgb --size 128 --n-images 2000 --seed 0 \
		--split-fractions 0.8 0.1 0.1 --out $(GLIMPSE_DIR)/data
	OMP_NUM_THREADS=1 $(GLIMPSE_RUN) --run_id training --config_file $(GLIMPSE_BUNDLE)/configs/train.yaml --max_epochs 12 \
		--train#dataset#_target_ CacheDataset --validate#dataset#_target_ CacheDataset
	OMP_NUM_THREADS=1 $(GLIMPSE_RUN) --run_id evaluate \
		--config_file "['$(GLIMPSE_BUNDLE)/configs/train.yaml','$(GLIMPSE_BUNDLE)/configs/evaluate.yaml']"
	cat $(GLIMPSE_DIR)/outputs/evaluation/metrics.json
	@$(call print_ui,$(GLIMPSE_DIR)/outputs/mlflow.db)

# whole-slide patches (small_cnn, 64-px patches at level 1): synthetic slides, patch tables, GAIN training,
# patch + slide evaluation (slide AUC, FROC, heat maps). Validated once, after the last epoch: the synthetic
# patches saturate the validation figures from the first epoch, and a tie keeps the earliest model.
WSI_DIR ?= demo_wsi
WSI_BUNDLE := bundles/wsi_patch_gain
WSI_RUN := OMP_NUM_THREADS=2 $(BIN)/python -m monai.bundle run --bundle_root $(WSI_DIR)/run \
	--meta_file $(WSI_BUNDLE)/configs/metadata.json --logging_file $(WSI_BUNDLE)/configs/logging.conf \
	--dataset_dir $(WSI_DIR)/data --num_workers 0 --level 1
demo-wsi: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/medgain synth wsi --out $(WSI_DIR)/slides --n-slides 10 --seed 0 --size 3072
	OMP_NUM_THREADS=2 $(BIN)/medgain wsi patches --labels $(WSI_DIR)/slides/labels.csv --out $(WSI_DIR)/data \
		--level 1 --patch-size 64 --max-eval-patches 600
	$(WSI_RUN) --run_id training --config_file $(WSI_BUNDLE)/configs/train.yaml --network small_cnn --patch_size 64 \
		--batch_size 16 --max_epochs 8 --val_interval 8
	$(WSI_RUN) --run_id evaluate --config_file "['$(WSI_BUNDLE)/configs/train.yaml','$(WSI_BUNDLE)/configs/evaluate.yaml']"
	cat $(WSI_DIR)/run/outputs/evaluation/metrics.json
	@echo "slide maps, overlays, lesions: $(WSI_DIR)/run/outputs/evaluation/slides/"
	@$(call print_ui,$(WSI_DIR)/run/outputs/mlflow.db)

bench: $(STAMP)
	$(BIN)/python benchmarks/gradcam.py
	$(BIN)/python benchmarks/gain_step.py
	$(BIN)/python benchmarks/saliency.py
	$(BIN)/python benchmarks/wsi_inference.py
	$(BIN)/python benchmarks/study_inference.py

# on a CUDA machine: each bundle's training (AMP) -> evaluation -> inference on tiny synthetic data, and the
# benchmarks' CUDA paths, in <= 8 minutes; figures in $(GPU_CHECK_DIR)/gpu_check.json and .md. Without CUDA it
# says so and exits 0 (docs/benchmarks.md, "GPU check").
GPU_CHECK_DIR ?= gpu_check
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --out $(GPU_CHECK_DIR)

# dermoscopy attention-crop pipeline (small_cnn at 64 px, 3 folds): synthetic ISIC-style data, full-image model,
# attention crops of the originals, crop model, ensemble weighted on out-of-fold predictions
DERMOSCOPY_DIR ?= demo_dermoscopy
demo-dermoscopy: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/medgain synth dermoscopy --out $(DERMOSCOPY_DIR)/data --n-images 300 --seed 0 \
		--prevalence 0.2 --images-per-patient 3 --min-size 160 --max-size 320
	OMP_NUM_THREADS=1 $(BIN)/medgain pipeline attention-crop --config pipelines/attention_crop/demo.yaml \
		--dataset-dir $(DERMOSCOPY_DIR)/data --output-dir $(DERMOSCOPY_DIR)/pipeline
	@$(call print_ui,$(DERMOSCOPY_DIR)/pipeline/mlflow.db)

clean:
	rm -rf $(VENV) $(DEMO_DIR) $(GLIMPSE_DIR) $(WSI_DIR) $(DERMOSCOPY_DIR) $(GPU_CHECK_DIR)
