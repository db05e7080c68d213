#!/usr/bin/env bash
# Creates .venv and installs everything the project needs. What to install and from where is decided
# by scripts/setup_plan.py (standard library only, tested with fake machines in
# tests/test_setup_plan.py); this script carries it out, in the order that survives the machines
# newcomers have (../shared/ENVIRONMENT.md):
#   1. torch first, pinned by constraints.txt: a bare `torch` requirement on a clean venv pulls a
#      multi-GB CUDA build. On Linux without a CUDA GPU, from PyTorch's CPU index when it answers.
#   2. the project, editable, with its extras' requirements pinned by constraints.txt, but without
#      llama-cpp-python: pip would compile it with -march=native, or fail the whole install on a
#      machine without a C++ compiler.
#   3. the offline Llama-2 tokenizer (from llama.cpp's vocabulary file, which the llama-cpp-python
#      sdist carries: downloaded, not compiled) and data preparation's C piece cache.
#   4. last, llama-cpp-python built with explicit CPU flags: the default -march=native build
#      segfaults on quantized GGUFs on AMX Xeons. The wheel is built once per machine and
#      CPU-feature set and cached in $TINYLLAMA_CACHE/wheels/<build>. Where it cannot be built (no
#      C++ compiler) set-up says so in one line and still succeeds: all but the GGUF stages work, and
#      the tests that need llama.cpp skip. `make setup` tries again.
#
# Usage: scripts/setup.sh            (make setup calls it; it is idempotent)
# Env:   PYTHON=python3  VENV=.venv  EXTRAS=dev,prepare,train,sft,gguf,serve,demo,eval
#        TORCH_SPEC=torch==X (default: constraints.txt's pin)  TORCH_INDEX_URL=... (empty: never)
#        CONSTRAINTS=constraints.txt (empty: let pip resolve freely)
#        TINYLLAMA_CACHE=${XDG_CACHE_HOME:-~/.cache}/tinyllama
#        CMAKE_ARGS=...  (llama-cpp-python's own: added after the flags chosen for this CPU)
#        SETUP_STEPS="torch project tokenizer llama-cpp"  (a subset redoes only those parts)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
CACHE=${TINYLLAMA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tinyllama}
export TINYLLAMA_CACHE=$CACHE
SETUP_STEPS=${SETUP_STEPS:-torch project tokenizer llama-cpp}

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
# run by path: scripts/ holds no module that would shadow a standard one
plan() { "$PY" scripts/setup_plan.py "$@"; }

EXTRAS=$(plan extras)
# constraints.txt (or a copy without torch's pin when TORCH_SPEC is the user's own)
CONSTRAINTS_FILE=$(plan constraints "$VENV/.constraints.txt")
PIN=(--constraint "${CONSTRAINTS_FILE:-/dev/null}")

step_torch() {
  "$PY" -c "import torch" >/dev/null 2>&1 && return 0
  local answer spec index why
  answer=$(plan torch)
  { read -r spec; read -r index; read -r why; } <<< "$answer"      # index may be an empty line
  step "installing $why"
  if [ -n "$index" ]; then
    "${PIP[@]}" "${PIN[@]}" --extra-index-url "$index" "$spec"
  else
    "${PIP[@]}" "${PIN[@]}" "$spec"
  fi
}

step_project() {
  local answer line reqs=()
  answer=$(plan requirements)
  while IFS= read -r line; do
    if [ -n "$line" ]; then reqs+=("$line"); fi
  done <<< "$answer"
  step "installing the project with extras [$EXTRAS]${CONSTRAINTS_FILE:+ pinned by $CONSTRAINTS_FILE}"
  "${PIP[@]}" "${PIN[@]}" "${reqs[@]}"
  # --no-deps: its requirements are in place, and pip would otherwise build llama-cpp-python itself
  "${PIP[@]}" --no-deps -e .
}

# The llama-cpp-python sdist, once per machine: the tokenizer reads its vocabulary, step 4 builds it.
fetch_sdist() {
  SDIST="$CACHE/sdist/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz"
  [ -f "$SDIST" ] && return 0
  step "downloading the llama-cpp-python $LLAMA_CPP_VERSION sdist (77 MB; it carries llama.cpp, its converter and the Llama-2 vocabulary)"
  mkdir -p "$CACHE/sdist"
  local tmp
  tmp=$(mktemp -d "$CACHE/sdist/.dl.XXXXXX")
  quiet "$PY" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: \
    "llama-cpp-python==$LLAMA_CPP_VERSION" -d "$tmp"
  mv "$tmp"/llama_cpp_python-"$LLAMA_CPP_VERSION".tar.gz "$SDIST"
  rm -rf "$tmp"
}

step_tokenizer() {
  fetch_sdist
  step "building the offline Llama-2 tokenizer"
  "$PY" -m tinyllama tokenizer build
  step "compiling data preparation's piece cache (prepare/piece_cache.c, once per machine)"
  "$PY" -c "from prepare.pieces import library; library() or print('  no C compiler: the slower Python splitter will be used')"
}

# Which llama.cpp build: a function of (OS, machine, CPU flags, CUDA GPU) in
# tinyllama/llamacpp/build.py (standard library only; unit-tested with fake inputs). Never
# GGML_NATIVE: on AMX Xeons it turns on AMX weight repacking, which crashes on quantized files.
# (run by path, not as a script: a script's folder would shadow standard modules with the core's)
choose_build() {
  local line
  line=$("$PY" -c 'import runpy; runpy.run_path("tinyllama/llamacpp/build.py", run_name="__main__")')
  BUILD_ID=${line%%$'\t'*}
  LLAMA_CMAKE=${line#*$'\t'}
  # The user's own CMAKE_ARGS (Vulkan, HIP, BLAS, ...) go after ours, so cmake keeps theirs where both
  # set an option; the cached wheel is then keyed by them too.
  if [ -n "${CMAKE_ARGS:-}" ]; then
    BUILD_ID="$BUILD_ID+cmake-$("$PY" -c 'import hashlib, sys; print(hashlib.sha256(sys.argv[1].encode()).hexdigest()[:8])' "$CMAKE_ARGS")"
    LLAMA_CMAKE="$LLAMA_CMAKE $CMAKE_ARGS"
  fi
}

# Builds the wheel into $WHEELS; on failure prints the one line, records it in $MISSING, returns 1.
build_wheel() {
  step "building llama-cpp-python $LLAMA_CPP_VERSION for $BUILD_ID (about 4 minutes on 2 cores, once per machine)"
  mkdir -p "$WHEELS"
  local tmp log="$WHEELS/build.log"
  tmp=$(mktemp -d "$WHEELS/.build.XXXXXX")
  if ! CMAKE_ARGS="$LLAMA_CMAKE" "$PY" -m pip wheel --disable-pip-version-check --no-deps --no-cache-dir \
      -w "$tmp" "$SDIST" >"$log" 2>&1; then
    rm -rf "$tmp"
    plan build-failure "$log" | tee "$MISSING"
    return 1
  fi
  mv "$tmp"/*.whl "$WHEELS"/
  rm -rf "$tmp"
}

step_llama_cpp() {
  [ -n "$(plan wants-llama-cpp)" ] || return 0
  fetch_sdist
  choose_build
  local mark="$VENV/.llama-cpp-build"
  MISSING="$VENV/.llama-cpp-missing"
  if "$PY" -c "import llama_cpp" >/dev/null 2>&1 && [ "$(cat "$mark" 2>/dev/null)" = "$LLAMA_CPP_VERSION-$BUILD_ID" ]; then
    rm -f "$MISSING"
    return 0
  fi
  WHEELS="$CACHE/wheels/$BUILD_ID"
  if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl >/dev/null 2>&1; then
    build_wheel || return 0                  # set-up still succeeds: the GGUF stages wait for a compiler
  fi
  step "installing the cached llama-cpp-python wheel ($BUILD_ID)"
  "${PIP[@]}" --no-deps --force-reinstall "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl
  "${PIP[@]}" "${PIN[@]}" "llama-cpp-python==$LLAMA_CPP_VERSION"      # its dependencies, pinned
  echo "$LLAMA_CPP_VERSION-$BUILD_ID" > "$mark"
  rm -f "$MISSING"
}

LLAMA_CPP_VERSION=$(plan llama-cpp-version)
for name in $SETUP_STEPS; do
  case $name in
    torch|project|tokenizer|llama-cpp) "step_${name//-/_}" ;;
    *) echo "error: SETUP_STEPS: unknown step '$name' (torch, project, tokenizer, llama-cpp)" >&2; exit 2 ;;
  esac
done

llama="llama.cpp $(cat "$VENV/.llama-cpp-build" 2>/dev/null || echo 'not built')"
[ ! -f "$VENV/.llama-cpp-missing" ] || llama="llama.cpp unavailable (see above)"
step "set-up done: $("$PY" -c 'import torch, sys; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.cuda.is_available()}")' 2>/dev/null || echo 'torch not installed'), $llama"
