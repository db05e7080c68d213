#!/usr/bin/env bash
# Creates .venv and installs everything the project needs, in the order that avoids the
# two known traps on these machines (../shared/ENVIRONMENT.md):
#   1. torch first, pinned: a bare `torch` requirement on a clean venv pulls a multi-GB CUDA
#      build. On a CPU-only machine we install TORCH_SPEC (default torch==2.13.0; the CPU wheel
#      is found locally here). Elsewhere set PIP_EXTRA_INDEX_URL to PyTorch's CPU index.
#   2. llama-cpp-python built with explicit CPU flags: the default -march=native build
#      segfaults on quantized GGUFs on AMX Xeons (AMX weight repacking). The wheel is built once
#      per machine and CPU-feature set and cached in $TINYLLAMA_CACHE/wheels/<build>, so later
#      set-ups (and CI on the same machine) reuse it.
# Then the offline Llama-2 tokenizer is built from llama.cpp's vocabulary file, which the
# llama-cpp-python sdist carries (no model hub needed).
#
# Usage: scripts/setup.sh            (make setup calls it; it is idempotent)
# Env:   PYTHON=python3  VENV=.venv  TORCH_SPEC=torch==2.13.0  EXTRAS=dev,prepare,train,sft,gguf,serve,demo,eval
#        TINYLLAMA_CACHE=~/.cache/tinyllama  LLAMA_CPP_VERSION=0.3.36
#        CMAKE_ARGS=...  (llama-cpp-python's own: added after the flags chosen for this CPU)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
LLAMA_CPP_VERSION=${LLAMA_CPP_VERSION:-0.3.36}
CACHE=${TINYLLAMA_CACHE:-$HOME/.cache/tinyllama}
export TINYLLAMA_CACHE=$CACHE

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  HAS_CUDA=1
  DEFAULT_TORCH=torch
  DEFAULT_EXTRAS=dev,prepare,train,sft,gguf,serve,demo,eval
else
  HAS_CUDA=0
  DEFAULT_TORCH=torch==2.13.0
  DEFAULT_EXTRAS=dev,prepare,train,sft,gguf,serve,demo,eval
fi
TORCH_SPEC=${TORCH_SPEC:-$DEFAULT_TORCH}
EXTRAS=${EXTRAS:-$DEFAULT_EXTRAS}

step() { printf '\n== %s\n' "$*"; }

# trl >= 1.16 and transformers 5.23 need Python 3.11: say so before anything is installed
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "error: $PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '?'); the project needs 3.11 or newer (set PYTHON=python3.11 or newer)" >&2
  exit 1
fi
# pip on these machines warns once per package about local index folders that do not hold it;
# keep its real messages, drop that noise.
quiet() { "$@" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }; return "${PIPESTATUS[0]}"; }

if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=(quiet "$PY" -m pip install --disable-pip-version-check -q)

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  step "installing $TORCH_SPEC (cuda=$HAS_CUDA)"
  "${PIP[@]}" "$TORCH_SPEC"
fi

# --- llama-cpp-python: built for this CPU's features, cached per machine -----------------
SDIST="$CACHE/sdist/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
  step "downloading the llama-cpp-python $LLAMA_CPP_VERSION sdist (77 MB; it carries llama.cpp, its converter and the Llama-2 vocabulary)"
  mkdir -p "$CACHE/sdist"
  tmp=$(mktemp -d "$CACHE/sdist/.dl.XXXXXX")
  quiet "$PY" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: \
    "llama-cpp-python==$LLAMA_CPP_VERSION" -d "$tmp"
  mv "$tmp"/llama_cpp_python-"$LLAMA_CPP_VERSION".tar.gz "$SDIST"
  rm -rf "$tmp"
fi

# Which llama.cpp build: a function of (OS, machine, CPU flags, CUDA GPU) in
# tinyllama/llamacpp/build.py (standard library only; unit-tested with fake inputs). Never
# GGML_NATIVE: on AMX Xeons it turns on AMX weight repacking, which crashes on quantized files.
# x86-64: AVX-512 (+VBMI/VNNI/BF16, AMX off) or AVX2; aarch64: NEON + dotprod/fp16/sve/i8mm;
# macOS arm64: Metal; + GGML_CUDA where nvidia-smi sees a GPU. LLAMA_BUILD=avx2|avx512 overrides.
# (run by path, not as a script: a script's folder would shadow standard modules with the core's)
BUILD_LINE=$("$PY" -c 'import runpy; runpy.run_path("tinyllama/llamacpp/build.py", run_name="__main__")')
BUILD_ID=${BUILD_LINE%%$'\t'*}
LLAMA_CMAKE=${BUILD_LINE#*$'\t'}
# The user's own CMAKE_ARGS (Vulkan, HIP, BLAS, ...) go after ours, so cmake keeps theirs where both
# set an option; the cached wheel is then keyed by them too.
if [ -n "${CMAKE_ARGS:-}" ]; then
  BUILD_ID="$BUILD_ID+cmake-$("$PY" -c 'import hashlib, sys; print(hashlib.sha256(sys.argv[1].encode()).hexdigest()[:8])' "$CMAKE_ARGS")"
  LLAMA_CMAKE="$LLAMA_CMAKE $CMAKE_ARGS"
fi

if [[ ",$EXTRAS," == *",gguf,"* || ",$EXTRAS," == *",serve,"* ]]; then
  MARK="$VENV/.llama-cpp-build"
  if ! "$PY" -c "import llama_cpp" >/dev/null 2>&1 || [ "$(cat "$MARK" 2>/dev/null)" != "$LLAMA_CPP_VERSION-$BUILD_ID" ]; then
    WHEELS="$CACHE/wheels/$BUILD_ID"
    if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl >/dev/null 2>&1; then
      step "building llama-cpp-python $LLAMA_CPP_VERSION for $BUILD_ID (about 4 minutes on 2 cores, once per machine)"
      mkdir -p "$WHEELS"
      tmp=$(mktemp -d "$WHEELS/.build.XXXXXX")
      CMAKE_ARGS="$LLAMA_CMAKE" \
        quiet "$PY" -m pip wheel --disable-pip-version-check -q --no-deps --no-cache-dir -w "$tmp" "$SDIST"
      mv "$tmp"/*.whl "$WHEELS"/
      rm -rf "$tmp"
    fi
    step "installing the cached llama-cpp-python wheel ($BUILD_ID)"
    "${PIP[@]}" --no-deps --force-reinstall "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl
    "${PIP[@]}" "numpy>=1.20" "typing-extensions>=4.5" "diskcache>=5.6.1" "jinja2>=2.11.3"
    echo "$LLAMA_CPP_VERSION-$BUILD_ID" > "$MARK"
  fi
fi

# --- the project, editable, with the chosen extras ---------------------------------------
step "installing the project with extras [$EXTRAS]"
"${PIP[@]}" -e ".[$EXTRAS]"

# --- the offline Llama-2 tokenizer -------------------------------------------------------
step "building the offline Llama-2 tokenizer"
"$PY" -m tinyllama tokenizer build
step "compiling data preparation's piece cache (prepare/piece_cache.c, once per machine)"
"$PY" -c "from prepare.pieces import library; library() or print('  no C compiler: the slower Python splitter will be used')"

step "set-up done: $("$PY" -c 'import torch, sys; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.cuda.is_available()}")')"
