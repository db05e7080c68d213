"""GGUF sizes and llama.cpp decode speed for tinyllama-1.1b (random weights), and the quality of
each type with and without an importance matrix on the CPU default chat model, in one run.

    python -m bench.gguf [--types q4_0 q4_k_m q8_0 f16] [--tokens 32]
    python -m bench.gguf --quality out/sft [--quality-types q4_k_m iq4_xs q3_k_m q2_k]

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

# llama.cpp's TinyLlama-1.1B files (q3_k_m, iq4_xs, iq3_m: the sizes issue 25 gives for 1.1B)
REFERENCE_MB = {"q4_0": 638, "q4_k_m": 669, "q8_0": 1170, "f16": 2200, "q3_k_m": 550, "iq4_xs": 606, "iq3_m": 516}


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
    from quantize.export import NEEDS_IMATRIX, quantize_gguf, write_gguf
    from tinyllama import Llama, ModelConfig, Tokenizer, save_checkpoint

    tmp = Path(tempfile.mkdtemp(dir=os.environ.get("TMPDIR")))
    try:
        torch.manual_seed(0)
        cfg = ModelConfig.from_name("tinyllama-1.1b")
        save_checkpoint(Llama(cfg), Tokenizer.llama2(), tmp / "model")
        f32 = write_gguf(tmp / "model", tmp / "F32.gguf", "f32")
        bandwidth = read_bandwidth_gbs()
        matrix = _random_model_imatrix(tmp, f32) if any(t in NEEDS_IMATRIX for t in types) else None
        rows = []
        for t in types:
            t0 = time.perf_counter()
            path = tmp / f"{t}.gguf"
            if t in ("f16", "bf16", "f32"):
                write_gguf(tmp / "model", path, t)          # float types: our gguf-py writer
            else:
                quantize_gguf(f32, path, t, imatrix=matrix if t in NEEDS_IMATRIX else None)   # llama.cpp's
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


def _random_model_imatrix(tmp: Path, f32: Path) -> Path:
    """An importance matrix for the random model (only so that iq3_m can be made and sized)."""
    from pydoc_data.topics import topics

    from quantize.imatrix import compute_imatrix

    return compute_imatrix(f32, "\n\n".join(topics.values()), tmp / "random.imatrix", "random", chunks=4, ctx=512)


def quality(model_dir: str, types: list[str], ctx: int = 512, chunks: int = 32, imatrix_chunks: int = 64,
            text_pair: tuple[str, str, str] | None = None) -> str:
    """Per type, with and without an importance matrix: size, perplexity and KL divergence from
    the F32 file on held-out text, by llama-perplexity. `text_pair`: (calibration text, held-out
    text, where they came from); default: alternate validation documents of the data pipeline."""
    from quantize.export import NEEDS_IMATRIX, quantize_gguf, write_gguf
    from quantize.imatrix import compute_imatrix, model_key, texts
    from quantize.quality import Scorer
    from tinyllama import Tokenizer
    from tinyllama.formats.checkpoint import load_config

    ctx = min(ctx, load_config(model_dir).max_seq_len)
    calib, held, note = text_pair or texts(None, Tokenizer.from_dir(model_dir))
    tmp = Path(tempfile.mkdtemp(dir=os.environ.get("TMPDIR")))
    rows = []
    try:
        f32 = write_gguf(model_dir, tmp / "F32.gguf", "f32")
        scorer = Scorer(Path(model_dir), f32, held, tmp, ctx, chunks)
        matrix = compute_imatrix(f32, calib, tmp / "m.imatrix", model_key(Path(model_dir)), imatrix_chunks, ctx)
        for t in types:
            for label, mat in (("no", None), ("yes", matrix)):
                if mat is None and t in NEEDS_IMATRIX:
                    continue
                path = quantize_gguf(f32, tmp / f"{t}-{label}.gguf", t, imatrix=mat)
                q = scorer.score(path)
                rows.append((t, label, f"{path.stat().st_size / 1e6:,.2f}", f"{q.ppl:.3f}", f"{q.kld_mean:.5f}",
                             f"{q.kld_p99:.4f}", f"{q.same_top:.2f}%"))
                path.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    head = ("type", "imatrix", "MB", "perplexity", "KLD mean", "KLD p99", "same top token")
    return "\n".join([markdown_table(head, rows),
                      f"\n{Path(model_dir).name}: PyTorch float32 perplexity {scorer.torch_ppl:.3f}, F32 GGUF "
                      f"{scorer.base.ppl:.3f}; {scorer.base.tokens:,} tokens scored ({scorer.chunks} chunks of {ctx}); {note}; imatrix: {imatrix_chunks} "
                      f"chunks; llama.cpp build: {_build_id()}"])



REAL_MODEL_TYPES = ["q8_0", "q4_k_m", "q3_k_m", "iq4_xs"]


def python_help_texts() -> tuple[str, str, str]:
    """(calibration, held-out, note): Python's help topics (pydoc_data, ~0.5 MB of English about
    Python), alternate topics on each side: text any model's vocabulary reads, offline."""
    from pydoc_data.topics import topics

    docs = [t for _, t in sorted(topics.items())]
    return ("\n\n".join(docs[::2]), "\n\n".join(docs[1::2]),
            "importance matrix and quality: alternate topics of Python's help text (pydoc_data)")


def real_model_quality(types: list[str]) -> str:
    """quality() on the real model (tinyllama.real_model), imported to float32 first."""
    from quantize.gguf_import import import_gguf
    from tinyllama import real_model

    gguf = real_model.path()
    if gguf is None:
        return f"Not measured: {real_model.absent_reason()}."
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        model_dir = import_gguf(gguf, Path(tmp) / "SmolLM2-135M-Instruct", say=lambda _: None)
        table = quality(str(model_dir), types, text_pair=python_help_texts())
    return (f"{real_model.HUB_ID}, imported from {real_model.GGUF_NAME} (its weights were Q4_1: the F32 reference "
            f"holds those values, so every type below requantizes them)\n\n{table}")


def _build_id() -> str:
    mark = Path(sys.prefix) / ".llama-cpp-build"
    return mark.read_text().strip() if mark.exists() else "unknown (not installed by make setup)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=["q4_0", "q4_k_m", "q8_0", "f16"])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--quality", metavar="MODEL_DIR", help="instead: the quality table of MODEL_DIR (e.g. out/sft)")
    ap.add_argument("--quality-types", nargs="+", default=["q4_k_m", "iq4_xs", "q3_k_m", "iq3_m", "q2_k"])
    ap.add_argument("--real-model", action="store_true",
                    help="instead: the quality table of the real model (make real-model), Q8_0 to IQ4_XS")
    args = ap.parse_args(argv)
    if args.real_model:
        print(real_model_quality(REAL_MODEL_TYPES))
        return 0
    print(quality(args.quality, args.quality_types) if args.quality else run(args.types, args.tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
