# Every target installs what it needs first: on a fresh clone, `make demo` and `make test` suffice.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (on local disk here). GPU clusters: make install TORCH_SPEC='torch==2.13.0' with
# their CUDA index, or install the project into an environment that already has CUDA torch.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

# make prepare DATA=<raw folder> OUT=<folder> [TOKENIZER=<file>] [SEQ_LEN=2048] [MICRO_BSZ=2] [WORKERS=<n>]
DATA ?=
OUT ?=
TOKENIZER ?=
SEQ_LEN ?= 2048
MICRO_BSZ ?= 2
WORKERS ?= $(shell nproc)
VALID_FRACTION ?= 0.01
MIN_LENGTH ?= 0

# make mlflow-ui [MLFLOW_PORT=5000]: the MLflow UI over this folder's runs (the store that
# `metrics-sidecar --tracking-uri sqlite:///mlruns/mlflow.db` writes without a server).
MLFLOW_PORT ?= 5000
MLFLOW_DB ?= mlruns/mlflow.db

DEMO_DIR ?= demo_data
DEMO_STEPS ?= 400

.PHONY: install prepare demo test test-fast lint format bench clean-demo mlflow-ui

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[test,metrics,lint]'
	touch $(STAMP)

prepare: install
	@test -n "$(DATA)" || { echo "usage: make prepare DATA=<raw folder> OUT=<folder> [TOKENIZER=<file>] [SEQ_LEN=2048] [MICRO_BSZ=2] [WORKERS=n]"; exit 2; }
	@test -n "$(OUT)" || { echo "make prepare: OUT=<folder> is required"; exit 2; }
	$(BIN)/tokenize-stage run --input "$(DATA)" --output "$(OUT)/tokenized" --workers $(WORKERS) \
		$(if $(TOKENIZER),--tokenizer "$(TOKENIZER)")
	$(BIN)/pack-stage run --input "$(OUT)/tokenized" --output "$(OUT)/packed" --seq-len $(SEQ_LEN) \
		--micro-bsz $(MICRO_BSZ) --valid-fraction $(VALID_FRACTION) --min-length $(MIN_LENGTH) --overwrite

demo: install
	@set -e; started=$$(date +%s); \
	$(BIN)/tokenize-stage demo-corpus --output $(DEMO_DIR)/raw; \
	$(MAKE) --no-print-directory prepare DATA=$(DEMO_DIR)/raw OUT=$(DEMO_DIR) SEQ_LEN=512 MICRO_BSZ=2; \
	$(BIN)/pack-stage inspect $(DEMO_DIR)/packed --row 0 | head -n 40; \
	prepared=$$(date +%s); \
	$(BIN)/train-kernel run --config configs/demo.py --set data.total_steps=$(DEMO_STEPS); \
	trained=$$(date +%s); \
	$(BIN)/train-kernel export-hf --ckpt runs/demo/ckpt/$(DEMO_STEPS) --out runs/demo/hf; \
	exported=$$(date +%s); \
	echo; \
	echo "Demo data: raw text in $(DEMO_DIR)/raw, token shards in $(DEMO_DIR)/tokenized, packed rows in $(DEMO_DIR)/packed"; \
	echo "  (any packed row, decoded: $(BIN)/pack-stage inspect $(DEMO_DIR)/packed --row N)"; \
	echo "Run: log runs/demo/train.log, per-step records runs/demo/metrics.jsonl, weights runs/demo/ckpt/<step>/,"; \
	echo "  and a Hugging Face export (LlamaForCausalLM) in runs/demo/hf"; \
	echo "Watch it in MLflow: make mlflow-ui, then open http://127.0.0.1:$(MLFLOW_PORT) (experiment 'demo')"; \
	echo "Demo wall time: prepare $$((prepared - started)) s, train $$((trained - prepared)) s, export $$((exported - trained)) s"

mlflow-ui: install
	mkdir -p $(dir $(MLFLOW_DB))artifacts
	@echo "MLflow UI: http://127.0.0.1:$(MLFLOW_PORT) (Ctrl-C stops it)"
	$(BIN)/mlflow server --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1 \
		--backend-store-uri sqlite:///$(MLFLOW_DB) --artifacts-destination $(dir $(MLFLOW_DB))artifacts

# The whole suite: real servers (MLflow, moto S3, the uploader), multi-process gloo groups, CLIs.
# TEST_WORKERS pytest-xdist workers, a test file each at a time (--dist loadfile: a file's module
# fixtures stay in one process). Much of the suite waits on servers and processes, so 2 workers pay on
# 2 cores; TEST_WORKERS=0 runs it in pytest's own process.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# The quick loop while editing: the tests that run inside pytest's process only, no servers, no
# process groups, no CLIs (markers in pyproject.toml; tests/conftest.py keeps them true).
test-fast: install
	$(BIN)/python -m pytest -q -m "not server and not distributed and not process"

# ruff's rule set is in pyproject.toml; `make format` applies the formatter and the safe fixes.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python -m bench.run_all

clean-demo:
	rm -rf $(DEMO_DIR)
