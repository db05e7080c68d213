"""GGUF sizes and llama.cpp decode speed for tinyllama-1.1b (random weights), in one run.

    python -m bench.gguf [--types q4_0 q4_k_m q8_0 f16] [--tokens 32]

Sizes are printed next to llama.cpp's reference files for TinyLlama-1.1B (Q4_0 638 MB,
Q4_K_M 669 MB, Q8_0 1,170 MB, F16 2,200 MB). Prefill is a 256-token prompt in one batch;
decode speed is batch-1 generation through
llama-cpp-python on all cores, next to the memory-bandwidth roofline: measured read bandwidth
divided by the bytes of weights read per token (the file's tensor data).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import markdown_table

REFERENCE_MB = {"q4_0": 638, "q4_k_m": 669, "q8_0": 1170, "f16": 2200}


def read_bandwidth_gbs(mb: int = 1024) -> float:
    """Best-of-5 read bandwidth of a reduction over a buffer far larger than the caches, on
    all cores (torch parallelises it; llama.cpp decodes on all cores too)."""
    a = torch.ones(mb * 1024 * 1024 // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return a.numel() * 4 / best / 1e9


def speeds(path: Path, n_tokens: int) -> tuple[float, float]:
    """(prefill tok/s of a 256-token prompt, best of 3; batch-1 decode tok/s)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=os.cpu_count(), verbose=False)
    try:
        prompt = list(range(1000, 1256))
        best = float("inf")
        for _ in range(3):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt)
            best = min(best, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(n_tokens):
            tok = llm.sample(temp=0.0)
            llm.eval([tok])
        return len(prompt) / best, n_tokens / (time.perf_counter() - t0)
    finally:
        llm.close()


def run(types: list[str], n_tokens: int = 32) -> str:
    from quantize.export import quantize_gguf, write_gguf
    from tinyllama import Llama, ModelConfig, Tokenizer, save_checkpoint

    tmp = Path(tempfile.mkdtemp(dir=os.environ.get("TMPDIR")))
    try:
        torch.manual_seed(0)
        cfg = ModelConfig.from_name("tinyllama-1.1b")
        save_checkpoint(Llama(cfg), Tokenizer.llama2(), tmp / "model")
        f32 = write_gguf(tmp / "model", tmp / "F32.gguf", "f32")
        bandwidth = read_bandwidth_gbs()
        rows = []
        for t in types:
            t0 = time.perf_counter()
            path = tmp / f"{t}.gguf"
            if t in ("f16", "bf16", "f32"):
                write_gguf(tmp / "model", path, t)          # float types: our gguf-py writer
            else:
                quantize_gguf(f32, path, t)                  # the rest: llama.cpp's quantizer
            secs = time.perf_counter() - t0
            mb = path.stat().st_size / 1e6
            ref = REFERENCE_MB.get(t)
            prefill, speed = speeds(path, n_tokens)
            roofline = bandwidth * 1e9 / path.stat().st_size
            rows.append((t, f"{mb:,.1f} MB", f"{ref:,} MB ({(mb / ref - 1) * 100:+.1f}%)" if ref else "-",
                         f"{secs:.1f} s", f"{prefill:.1f} tok/s", f"{speed:.1f} tok/s", f"{roofline:.1f} tok/s",
                         f"{speed / roofline:.0%}"))
            path.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    head = ("type", "ours", "llama.cpp reference", "export", "prefill (256)", "decode (batch 1)", "roofline",
            "of roofline")
    lines = [markdown_table(head, rows),
             f"\nread bandwidth measured: {bandwidth:.1f} GB/s; tinyllama-1.1b with random weights; {os.cpu_count()} threads; "
             f"llama.cpp build: {_build_id()}"]
    return "\n".join(lines)


def _build_id() -> str:
    mark = Path(sys.prefix) / ".llama-cpp-build"
    return mark.read_text().strip() if mark.exists() else "unknown (not installed by make setup)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=["q4_0", "q4_k_m", "q8_0", "f16"])
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args(argv)
    print(run(args.types, args.tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
