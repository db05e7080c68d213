"""Batch-1 greedy decode speed: our generator vs the reference on the same model, in one run.

    python -m bench.decode [--tokens 64] [--presets tinyllama-19m tinyllama-1.1b] [--dtypes float32 bfloat16] [--no-gguf]
    python -m bench.decode --real-model        # SmolLM2-135M-Instruct: its import, and its Q4_1 GGUF

PyTorch rows: `tinyllama.inference.generate` on our model vs `transformers` `generate` on
LlamaForCausalLM (sdpa, static KV cache off, the default dynamic cache), same random weights,
same dtype, `max_new_tokens` forced (no EOS). GGUF row: `tinyllama.inference.generate` over llama.cpp
(GGUFBackend) vs llama.cpp's own completion loop (`Llama.create_completion`, greedy), same
Q4_K_M file. Tokens/s count the generated tokens over the wall time after the prefill; each
side's best of 5 runs, ours and the reference alternating.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from . import markdown_table


def _ours_torch(backend, prompt: list[int], n: int) -> float:
    from tinyllama.inference.generate import generate

    backend.reset()                               # no KV cache carried over from the last run
    gen = generate(backend, prompt, max_new_tokens=n)
    for _ in gen:
        pass
    return gen.stats.generated_tokens / gen.stats.decode_seconds


def _hf(model, prompt: list[int], n: int) -> float:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)          # prefill only
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        t2 = time.perf_counter()
    assert out.shape[1] == len(prompt) + n
    return (n - 1) / ((t2 - t1) - (t1 - t0))


def _best_interleaved(ours, theirs, repeats: int) -> tuple[float, float]:
    """Best tokens/s of each over `repeats` alternating runs: a shared machine's slow spells
    then hit both sides alike instead of whichever happened to run during them."""
    o, t = [], []
    for _ in range(repeats):
        o.append(ours())
        t.append(theirs())
    return max(o), max(t)


def torch_rows(preset: str, dtype: torch.dtype, n: int, repeats: int = 5) -> tuple:
    from tinyllama import Llama, ModelConfig, Tokenizer, save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        save_checkpoint(Llama(ModelConfig.from_name(preset)).to(dtype), Tokenizer.llama2(), Path(tmp) / "m")
        return checkpoint_row(Path(tmp) / "m", preset, dtype, n, list(range(1, 33)), repeats)


def checkpoint_row(path: Path, label: str, dtype: torch.dtype, n: int, prompt: list[int], repeats: int = 5) -> tuple:
    """Ours against transformers' LlamaForCausalLM on one checkpoint directory, both in `dtype`."""
    from transformers import LlamaForCausalLM

    from tinyllama import load_checkpoint
    from tinyllama.inference.backends import TorchBackend

    ours = TorchBackend(load_checkpoint(path, dtype=dtype)[0])    # as load_backend runs it
    hf = LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()
    _ours_torch(ours, prompt, 4), _hf(hf, prompt, 4)                          # warm-up
    o, h = _best_interleaved(lambda: _ours_torch(ours, prompt, n), lambda: _hf(hf, prompt, n), repeats)
    ours.close()
    name = f"{label} {str(dtype).removeprefix('torch.')} (PyTorch)"
    return (name, f"{o:,.1f} tok/s", f"{h:,.1f} tok/s (transformers generate)", f"{o / h:.2f}x")


def gguf_row(gguf: Path, n: int, repeats: int = 5, prompt: list[int] | None = None) -> tuple:
    import llama_cpp

    from tinyllama.inference.backends import GGUFBackend
    from tinyllama.inference.generate import generate

    backend = GGUFBackend(gguf, n_ctx=512)
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, verbose=False, n_threads=backend.llm.n_threads,
                          flash_attn=True)        # as the backend runs it: the loops compared, not the kernels
    prompt = prompt or list(range(1, 33))
    eos = llama_cpp.llama_vocab_eos(llm._model.vocab)
    try:
        def ours() -> float:
            backend.reset()
            gen = generate(backend, prompt, max_new_tokens=n)
            for _ in gen:
                pass
            return gen.stats.generated_tokens / gen.stats.decode_seconds

        def theirs() -> float:
            llm.reset()
            t0 = time.perf_counter()
            llm.create_completion(prompt, max_tokens=1, temperature=0.0)
            t1 = time.perf_counter()
            llm.reset()
            out = llm.create_completion(prompt, max_tokens=n, temperature=0.0, logit_bias={eos: -1e9})
            t2 = time.perf_counter()
            got = out["usage"]["completion_tokens"]
            return (got - 1) / ((t2 - t1) - (t1 - t0))

        ours(), theirs()
        o, t = _best_interleaved(ours, theirs, repeats)
    finally:
        backend.close()
        llm.close()
    return (f"{gguf.name} (llama.cpp)", f"{o:,.1f} tok/s", f"{t:,.1f} tok/s (llama.cpp create_completion)",
            f"{o / t:.2f}x")


def run(presets=("tinyllama-19m", "tinyllama-1.1b"), n: int = 64, gguf_preset: str = "tinyllama-19m",
        dtypes=("float32", "bfloat16"), gguf: bool = True) -> str:
    rows = []
    for preset in presets:
        for dtype in dtypes:
            rows.append(torch_rows(preset, getattr(torch, dtype), n))
    if not gguf:
        head = (f"model (batch 1, greedy, {n} new tokens, 32-token prompt)", "ours (tinyllama.inference.generate)",
                "reference", "ours vs ref")
        return markdown_table(head, rows)
    with tempfile.TemporaryDirectory() as tmp:
        from quantize.export import quantize_gguf, write_gguf
        from tinyllama import Llama, ModelConfig, Tokenizer, save_checkpoint

        torch.manual_seed(0)
        save_checkpoint(Llama(ModelConfig.from_name(gguf_preset)), Tokenizer.llama2(), Path(tmp) / "m")
        f32 = write_gguf(Path(tmp) / "m", Path(tmp) / "m-f32.gguf", "f32")
        q4 = quantize_gguf(f32, Path(tmp) / f"{gguf_preset}-Q4_K_M.gguf", "q4_k_m")
        rows.append(gguf_row(q4, n))
    head = (f"model (batch 1, greedy, {n} new tokens, 32-token prompt)", "ours (tinyllama.inference.generate)", "reference",
            "ours vs ref")
    return markdown_table(head, rows)


def real_model_rows(n: int, repeats: int = 5) -> str:
    """SmolLM2-135M-Instruct: its float32 import against transformers, its Q4_1 GGUF against
    llama.cpp's own loop; the prompt is a chat turn in its template."""
    from quantize.gguf_import import import_gguf
    from tinyllama import real_model
    from tinyllama.formats.chat import apply_chat_template
    from tinyllama.formats.tokenizer import Tokenizer

    gguf = real_model.path()
    if gguf is None:
        raise SystemExit(f"error: {real_model.absent_reason()}")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = import_gguf(gguf, Path(tmp) / "smollm2", say=lambda _: None)
        tok = Tokenizer.from_dir(ckpt)
        prompt = apply_chat_template(tok, [{"role": "user", "content": "Write a short story about a lighthouse."}])
        rows = [checkpoint_row(ckpt, "SmolLM2-135M-Instruct", torch.float32, n, prompt, repeats),
                gguf_row(gguf, n, repeats, prompt)]
    head = (f"model (batch 1, greedy, {n} new tokens, {len(prompt)}-token chat prompt)", "ours (tinyllama.inference.generate)",
            "reference", "ours vs ref")
    return markdown_table(head, rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--presets", nargs="+", default=["tinyllama-19m", "tinyllama-1.1b"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--no-gguf", action="store_true", help="skip the GGUF (llama.cpp) row")
    ap.add_argument("--real-model", action="store_true",
                    help="SmolLM2-135M-Instruct instead (make real-model): its import and its own GGUF")
    args = ap.parse_args(argv)
    if args.real_model:
        print(real_model_rows(args.tokens))
        return 0
    print(run(args.presets, args.tokens, dtypes=args.dtypes, gguf=not args.no_gguf))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
