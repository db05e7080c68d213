"""Core benchmark: tokenizer and model throughput, ours vs the reference, in one run.

    python -m bench.bench_core [--preset tinyllama-19m] [--quick]

- tokenizer: our Rust `tokenizers` batch encoder vs llama.cpp's tokenizer (llama-cpp-python,
  vocab-only) on the Python standard library's source; ids must be identical.
- model: forward, training step and one-token KV-cache decoding of the same weights in our
  `Llama` vs `transformers.LlamaForCausalLM` (SDPA attention), on this machine's device.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

from prepare.encoding import clear_piece_cache, encode_batch

from . import markdown_table


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def corpus(max_bytes: int) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for f in sorted(root.glob("*.py")):
        t = f.read_text(encoding="utf-8", errors="replace")
        texts.append(t)
        total += len(t.encode())
        if total >= max_bytes:
            break
    return texts


def bench_tokenizer(quick: bool) -> list[tuple[str, str, str, str]]:
    from tinyllama import Tokenizer
    from tinyllama.paths import llama2_dir

    tok = Tokenizer.llama2()
    texts = corpus(500_000 if quick else 3_000_000)
    nbytes = sum(len(t.encode()) for t in texts)
    ours_ids: list[list[int]] = []

    def ours():
        clear_piece_cache(tok)      # cold: every run starts without the piece cache
        ours_ids[:] = encode_batch(tok, texts, bos=False)

    t_ours = _time(ours, 3)
    ntok = sum(map(len, ours_ids))
    rows = [("tokenizer: encode stdlib source, cold cache", f"{nbytes / 1e6 / t_ours:.2f} MB/s ({ntok / t_ours / 1e3:.0f}k tok/s)")]
    try:
        import llama_cpp
    except ImportError:
        return [(*rows[0], "llama-cpp-python not installed", "-")]
    llm = llama_cpp.Llama(model_path=str(llama2_dir() / "ggml-vocab-llama-spm.gguf"), vocab_only=True, verbose=False)
    ref_ids: list[list[int]] = []

    def ref():
        ref_ids[:] = [llm.tokenize(t.encode(), add_bos=False, special=False) for t in texts]

    t_ref = _time(ref, 3)
    llm.close()
    same = "ids identical" if ref_ids == ours_ids else "IDS DIFFER"
    return [(rows[0][0] + f" ({same})", rows[0][1], f"{nbytes / 1e6 / t_ref:.2f} MB/s (llama.cpp)", f"{t_ref / t_ours:.2f}x")]


def bench_model(preset: str, quick: bool) -> list[tuple[str, str, str, str]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tinyllama import KVCache, Llama, ModelConfig, Step

    cfg = ModelConfig.from_name(preset)
    torch.manual_seed(0)
    ours = Llama(cfg)
    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k != "torch_dtype"})
    hf_cfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(hf_cfg)
    hf.load_state_dict(ours.state_dict(), strict=False)
    B, T = (2, 128) if quick else (4, 256)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    rows = []
    repeat = 3 if quick else 5

    with torch.no_grad():
        diff = (ours.eval()(ids) - hf.eval()(ids).logits).abs().max().item()
        t_o = _time(lambda: ours(ids), repeat)
        t_h = _time(lambda: hf(ids).logits, repeat)
    rows.append((f"forward {preset} B={B} T={T} (max abs Δlogit {diff:.1e})", f"{B * T / t_o:,.0f} tok/s",
                 f"{B * T / t_h:,.0f} tok/s", f"{t_h / t_o:.2f}x"))

    def train_step(model, get_logits):
        def step():
            logits = get_logits(model)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            model.zero_grad(set_to_none=True)
        return step

    ours.train(), hf.train()
    t_o = _time(train_step(ours, lambda m: m(ids)), repeat)
    t_h = _time(train_step(hf, lambda m: m(ids).logits), repeat)
    rows.append((f"train step fwd+bwd {preset} B={B} T={T}", f"{B * T / t_o:,.0f} tok/s", f"{B * T / t_h:,.0f} tok/s",
                 f"{t_h / t_o:.2f}x"))

    n_new = 32 if quick else 64
    prompt = ids[:1, :64]
    ours.eval(), hf.eval()

    def ours_decode():
        cache = KVCache.for_model(ours, 1, 64 + n_new + 1)
        logits = ours(prompt, cache, Step.span(0, 64))
        for i in range(n_new):
            nxt = logits[:, -1:].argmax(-1)
            logits = ours(nxt, cache, Step.span(64 + i, 1))

    def hf_decode():
        from transformers import DynamicCache

        cache = DynamicCache()
        out = hf(prompt, past_key_values=cache, use_cache=True)
        for _ in range(n_new):
            nxt = out.logits[:, -1:].argmax(-1)
            out = hf(nxt, past_key_values=out.past_key_values, use_cache=True)

    with torch.no_grad():
        t_o = _time(ours_decode, 3)
        t_h = _time(hf_decode, 3)
    rows.append((f"KV-cache decode {preset}, 64-token prompt, {n_new} new", f"{n_new / t_o:,.0f} tok/s",
                 f"{n_new / t_h:,.0f} tok/s", f"{t_h / t_o:.2f}x"))
    return rows


def run(preset: str = "tinyllama-19m", quick: bool = False) -> str:
    torch.set_num_threads(os.cpu_count() or 1)
    rows = bench_tokenizer(quick) + bench_model(preset, quick)
    return markdown_table(("benchmark", "ours", "reference", "ours vs ref"), rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tinyllama-19m")
    ap.add_argument("--quick", action="store_true", help="smaller inputs, fewer repeats")
    args = ap.parse_args(argv)
    print(run(args.preset, args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
