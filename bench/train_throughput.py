"""Training-step throughput: ours vs transformers.LlamaForCausalLM, same shape, batch,
optimizer and device, in one run; each setting in a fresh process (so peak memory is its own).

    python -m bench.train_throughput [--steps 5] [--quick] [--dtypes float32 bfloat16]

Shape (the issue's reference point): hidden 512, 8 layers, 8 query heads / 2 KV groups,
SwiGLU 1536, vocab 32000, seq 512, micro-batch 4; AdamW (foreach) + grad clipping, as the
trainer steps. Settings: float32 or bf16 autocast, eager or torch.compile. By default bf16
rows run only where `dtype: auto` would train in bf16 on this CPU (tinyllama.precision); on a
CPU without bf16 instructions each bf16 step takes minutes, and the table says why it skipped
them. MFU is against the measured matmul peak of this CPU in that dtype (pretrain.metrics).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from . import markdown_table, median_seconds, peak_rss_bytes

SETTINGS = [("float32", False), ("float32", True), ("bfloat16", False), ("bfloat16", True)]
SHAPE = dict(n_layer=8, d_model=512, n_head=8, n_kv_head=2, ffn_dim=1536, vocab_size=32000, max_seq_len=512)
B, T = 4, 512


def _measure(impl: str, dtype_name: str, compiled: bool, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    from tinyllama import Llama, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(name="bench-512", **SHAPE)
    dtype = torch.bfloat16 if dtype_name == "bfloat16" else None
    if impl == "ours":
        from pretrain.train import loss_fn

        model = Llama(cfg)
        # exactly what the trainer runs in one process: the whole loss, compiled when asked
        ours_loss = torch.compile(loss_fn) if compiled else loss_fn
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        hf_cfg = LlamaConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k != "torch_dtype"})
        hf_cfg._attn_implementation = "sdpa"
        model = LlamaForCausalLM(hf_cfg)
        forward = torch.compile(model) if compiled else model

        def logits_of(x):
            return forward(x).logits.float()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    x = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))

    def step():
        if impl == "ours":
            loss = ours_loss(model, x[:, :-1], x[:, 1:], dtype)
        else:
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                logits = forward(x[:, :-1]).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    dt = median_seconds(step, steps, warmup=2)
    return {"tok_s": B * T / dt, "rss_gb": peak_rss_bytes() / 1e9}


def default_dtypes() -> tuple[list[str], str | None]:
    """float32, and bf16 where `auto` picks it for this shape here; else the reason it is left out."""
    from tinyllama import ModelConfig
    from tinyllama.precision import choose_dtype

    choice = choose_dtype("auto", "cpu", ModelConfig(name="bench-512", **SHAPE), work="train", rows=B * T)
    if choice.name == "bfloat16":
        return ["float32", "bfloat16"], None
    return ["float32"], f"bfloat16 rows skipped ({choice.reason}; --dtypes float32 bfloat16 runs them)"


def run(steps: int = 5, quick: bool = False, dtypes: list[str] | None = None) -> str:
    import torch

    from pretrain.metrics import measured_cpu_peak
    from tinyllama import ModelConfig

    skipped = None
    if dtypes is None:
        dtypes, skipped = default_dtypes()
    settings = [(d, c) for d, c in SETTINGS if d in dtypes and not (quick and c)]
    flops = ModelConfig(name="bench-512", **SHAPE).flops_per_token(T)
    peaks = {d: measured_cpu_peak(getattr(torch, d), n=2048) for d in dtypes}
    results = {}
    for impl in ("ours", "hf"):
        for dtype, compiled in settings:
            r = subprocess.run([sys.executable, "-m", "bench.train_throughput", "--child", impl, dtype,
                                str(int(compiled)), str(steps)], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{impl} {dtype} compiled={compiled} failed:\n{r.stderr[-2000:]}")
            res = json.loads(r.stdout.strip().splitlines()[-1])
            res["mfu"] = flops * res["tok_s"] / peaks[dtype]
            results[(impl, dtype, compiled)] = res
    rows = []
    for dtype, compiled in settings:
        o, h = results[("ours", dtype, compiled)], results[("hf", dtype, compiled)]
        name = f"{dtype} {'compiled' if compiled else 'eager'}"
        rows.append((name, f"{o['tok_s']:,.0f} tok/s, MFU {o['mfu']:.0%}, {o['rss_gb']:.1f} GB",
                     f"{h['tok_s']:,.0f} tok/s, MFU {h['mfu']:.0%}, {h['rss_gb']:.1f} GB", f"{o['tok_s'] / h['tok_s']:.2f}x"))
    best_o = max(v["tok_s"] for k, v in results.items() if k[0] == "ours")
    best_h = max(v["tok_s"] for k, v in results.items() if k[0] == "hf")
    rows.append(("best of each", f"{best_o:,.0f} tok/s", f"{best_h:,.0f} tok/s", f"{best_o / best_h:.2f}x"))
    rows.append(("measured matmul peak (MFU's denominator)", ", ".join(f"{d} {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items()),
                 "", ""))
    head = ("setting (hidden 512, 8 layers, GQA 8:2, seq 512, batch 4)", "ours", "transformers", "ours vs HF")
    from tinyllama.measure import cpu_identity

    note = f"\n\n{skipped[0].upper()}{skipped[1:]}." if skipped else ""
    return f"CPU: {cpu_identity().describe()}\n\n" + markdown_table(head, rows) + note


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        impl, dtype, compiled, steps = sys.argv[2:6]
        print(json.dumps(_measure(impl, dtype, bool(int(compiled)), int(steps))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="eager settings only")
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=None,
                    help="(default: float32, and bfloat16 where auto would train in it here)")
    args = ap.parse_args(argv)
    print(run(args.steps, args.quick, args.dtypes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
