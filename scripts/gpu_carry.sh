#!/usr/bin/env bash
# make gpu-carry: run on a CPU machine with network, from the repo root, before a GPU run.
# The GPU machine is offline and its image lacks trl, datasets, bitsandbytes and liger-kernel,
# so what gpu-check needs travels with the checkout in two git-ignored folders (copy both
# along with it):
#   .whl/                      cp312 manylinux x86_64 wheels (~10 MiB), installed by
#                              `python -m gpu_check` into a temporary folder, never into the image
#   .cache/tokenizers/llama2/  the offline Llama-2 tokenizer `make setup` built (~4 MiB)
# Versions: what this checkout's venv runs (so the GPU runs what the CPU tests ran), else the
# fallback pinned below.
set -euo pipefail
PY=${PY:-python3}
WHL=.whl
# bitsandbytes >= 0.50 is tagged manylinux_2_24 only: without that tag pip falls back to
# 0.42.0 (100 MiB, no CUDA 13 library)
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

pin() {   # pin NAME FALLBACK -> NAME==VERSION
  local v
  v=$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1" 2>/dev/null) || v=$2
  echo "$1==$v"
}
# pip on these machines warns per package about local index folders that do not hold it: noise
dl() { "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
         --python-version 3.12 --implementation cp "${PLAT[@]}" -d "$WHL" "$@" 2>&1 \
         | { grep -v 'is ignored: it is neither a file nor a directory' || true; }; return "${PIPESTATUS[0]}"; }

mkdir -p "$WHL"
rm -f "$WHL"/*.whl     # a changed pin must not leave its old wheel beside the new one
# liger-kernel: fused Triton RMSNorm/RoPE/SwiGLU/linear-CE for the mfu comparison (flash-attn
# has no wheel; PyPI's xformers is built for another torch/CUDA and would not load its ops)
dl "$(pin liger-kernel 0.8.5)"
# QLoRA (bench.sft_memory, python -m sft --method qlora) and python -m sft itself: trl needs
# datasets (+ dill, multiprocess). The image's own transformers stays: sft.train speaks its
# (5.17) names too, and a newer one would need newer tokenizers/huggingface-hub than it has.
dl "$(pin bitsandbytes 0.50.2)" "$(pin trl 1.16.0)" "$(pin datasets 5.2.0)" "$(pin dill 0.4.1)" \
   "$(pin multiprocess 0.70.19)" "$(pin peft 0.21.2)"
# bitsandbytes ships a library per CUDA version (41 MiB): keep the CPU and CUDA 13.0 ones
"$PY" - "$WHL" <<'PYCODE'
import glob, os, re, sys, zipfile

drop = re.compile(r"libbitsandbytes_(?!cpu\.so|cuda130\.so)")
for wheel in glob.glob(os.path.join(sys.argv[1], "bitsandbytes-*.whl")):
    tmp = wheel + ".tmp"
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            if drop.search(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith("RECORD"):   # pip checks RECORD against the files
                lines = data.decode().splitlines()
                data = "".join(f"{line}\n" for line in lines if not drop.search(line.split(",")[0])).encode()
            out.writestr(info, data)
    os.replace(tmp, wheel)
PYCODE

# the tokenizer: a fresh copy each time (a rebuilt one must not be shadowed by a stale copy)
src=${TINYLLAMA_TOKENIZER_DIR:-${TINYLLAMA_CACHE:-$HOME/.cache/tinyllama}/tokenizers/llama2}
[ -f "$src/tokenizer.json" ] || { echo "no tokenizer at $src: run make setup first" >&2; exit 1; }
mkdir -p .cache/tokenizers/llama2
cp "$src"/tokenizer.json "$src"/tokenizer.model "$src"/tokenizer_config.json "$src"/special_tokens_map.json \
   .cache/tokenizers/llama2/

for d in "$WHL" .cache; do git check-ignore -q "$d" || echo "warning: $d/ is not git-ignored" >&2; done
du -sh "$WHL" .cache/tokenizers
ls "$WHL"
