# medgain: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out

.PHONY: demo demo-glimpse test bench clean

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

# recurrent glimpse attention on synthetic pattern2 (128², 3-channel): data, training, test evaluation
GLIMPSE_DIR ?= demo_glimpse
GLIMPSE_BUNDLE := bundles/glimpse_attention
GLIMPSE_RUN := $(BIN)/python -m monai.bundle run --bundle_root $(GLIMPSE_DIR) \
	--meta_file $(GLIMPSE_BUNDLE)/configs/metadata.json --logging_file $(GLIMPSE_BUNDLE)/configs/logging.conf \
	--dataset_dir $(GLIMPSE_DIR)/data --num_workers 0
demo-glimpse: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/medgain synth patterns --kind pattern2 --rgb --size 128 --n-images 2400 --seed 0 \
		--split-fractions 0.8 0.1 0.1 --out $(GLIMPSE_DIR)/data
	OMP_NUM_THREADS=1 $(GLIMPSE_RUN) --run_id training --config_file $(GLIMPSE_BUNDLE)/configs/train.yaml --max_epochs 12
	OMP_NUM_THREADS=1 $(GLIMPSE_RUN) --run_id evaluate \
		--config_file "['$(GLIMPSE_BUNDLE)/configs/train.yaml','$(GLIMPSE_BUNDLE)/configs/evaluate.yaml']"
	cat $(GLIMPSE_DIR)/outputs/evaluation/metrics.json

bench: $(STAMP)
	$(BIN)/python benchmarks/gradcam.py
	$(BIN)/python benchmarks/gain_step.py
	$(BIN)/python benchmarks/saliency.py
	$(BIN)/python benchmarks/wsi_inference.py
	$(BIN)/python benchmarks/study_inference.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) $(GLIMPSE_DIR)
