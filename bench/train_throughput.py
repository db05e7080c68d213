"""Training-step throughput: ours vs transformers.LlamaForCausalLM, same shape, batch,
optimizer and device, in one run; each setting in a fresh process (so peak memory is its own).
With --variants: the project's own training step on a preset, variant by variant (the GPU
suite's mfu, compile and fsdp2 stages), a JSON record each.

    python -m bench.train_throughput [--steps 5] [--quick] [--dtypes float32 bfloat16]
    python -m bench.train_throughput --variants eager unfused sdpa-cudnn --preset tinyllama-1.1b --seq 2048 --batch 8

The table. Shape (the issue's reference point): hidden 512, 8 layers, 8 query heads / 2 KV groups,
SwiGLU 1536, vocab 32000, seq 512, micro-batch 4; AdamW (foreach) + grad clipping, as the
trainer steps. Settings: float32 or bf16 autocast, eager or torch.compile. By default bf16
rows run only where `dtype: auto` would train in bf16 on this CPU (tinyllama.precision); on a
CPU without bf16 instructions each bf16 step takes minutes, and the table says why it skipped
them. MFU is against the measured matmul peak of this CPU in that dtype (pretrain.metrics).

--variants. Each variant builds the preset on --device and times the pieces of
pretrain.train.Trainer.train_step on random token ids: pretrain.train.loss_fn (forward, LM head
and loss in one) + backward per micro-batch, and the optimizer (pretrain.train.build_optimizer)
with gradient clipping, separately. The compute dtype is what `auto` picks (tinyllama.precision:
bf16 on a GPU), under autocast as one process trains.

  eager            what `python -m pretrain` runs on one GPU: SDPA's own backend choice, the
                   fused Triton kernels tinyllama.model.fused picks (liger-kernel where it works)
  unfused          the same with --fused off (TINYLLAMA_FUSED=0): the PyTorch definitions of RMSNorm,
                   RoPE, SwiGLU and the loss (the logits materialised)
  sdpa-flash, sdpa-cudnn, sdpa-efficient, sdpa-math     eager with that SDPA backend forced
  compile          torch.compile(loss_fn), as the Trainer does for one process
  compile-blocks   block.compile() per block, as build_model does under FSDP2
  fsdp2            pretrain.train.build_model under a 1-rank process group: fully_shard with
                   MixedPrecisionPolicy(bf16 parameters, fp32 reduction), no autocast

MFU = flops_per_token(seq) x tokens/s / peak, against the data-sheet peak pretrain.metrics
reports (989 TFLOP/s bf16 on an H100/H200) and against the matmul rate gpu_check's env probe
measured in the same run (bench.records). --profile adds one micro-batch under the profiler: the
top kernels and which attention kernels ran (GPU)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

from . import markdown_table, median_seconds, peak_rss_bytes, sync
from .records import env_ceiling, error_text, record, seconds_left

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


# ---- --variants: the project's own step on a preset, a record per variant -----------------------

SDPA = ("flash", "cudnn", "efficient", "math")
VARIANTS = ("eager", "unfused", *(f"sdpa-{b}" for b in SDPA), "compile", "compile-blocks", "fsdp2")
RESERVE_S = 30           # a variant needs at least this much of the stage's box to build and measure


@dataclass
class Variant:
    model: object                       # torch.nn.Module
    loss: Callable
    autocast: object                    # torch.dtype | None
    sdpa: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    close: list[Callable[[], None]] = field(default_factory=list)


def train_config(args):
    from pretrain.config import TrainConfig

    return TrainConfig(preset=args.preset, seq_len=args.seq, micro_batch=args.batch, compile=False,
                       activation_checkpointing=args.ac)


def _one_rank_group(device):
    """A process group of one (nccl on a GPU) and what build_model reads from pretrain's Dist."""
    import torch.distributed as dist

    with socket.socket() as s:                 # a free port: a second call must not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    return SimpleNamespace(device=device, enabled=True, main=True), dist.destroy_process_group


def build(name: str, args, device, dtype) -> Variant:
    import torch

    from pretrain.train import build_model, checkpoint_blocks, initial_model_config, loss_fn
    from tinyllama import Llama

    cfg = train_config(args)
    mcfg = initial_model_config(cfg)
    autocast = dtype if dtype != torch.float32 else None          # as Trainer: one process autocasts
    if name == "fsdp2":
        env, close = _one_rank_group(device)
        try:
            model, _ = build_model(cfg, env, mcfg, dtype)          # fully_shard + MixedPrecisionPolicy
        except BaseException:
            close()
            raise
        return Variant(model, loss_fn, None, close=[close])        # FSDP2 casts the parameters itself
    torch.manual_seed(cfg.seed)
    with torch.device(device):             # built on the GPU: initialising 1.1B on the CPU takes seconds
        model = Llama(mcfg)
    if args.ac:
        checkpoint_blocks(model)                      # as build_model does
    variant = Variant(model, loss_fn, autocast)
    if name.startswith("sdpa-"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                                       "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}[name[5:]])
        variant.sdpa = lambda: sdpa_kernel([backend])
    elif name == "unfused":
        from tinyllama.model import fused

        before = fused._wanted()
        fused.use_provider("off")                        # the process's choice, asked at every op
        variant.close.append(lambda: fused.use_provider(before))
    elif name == "compile":
        variant.loss = torch.compile(loss_fn)
    elif name == "compile-blocks":
        for block in model.model.layers:
            block.compile()
    return variant


def _timed(fn: Callable[[], object], device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def time_steps(v: Variant, args, device, vocab: int) -> tuple[dict, Callable]:
    """First micro-batch (compilation, autotuning), warm-up, then the timed micro-batches and
    optimizer steps; returns the timings and the micro-batch function (for the profiler)."""
    import torch

    from pretrain.train import build_optimizer

    cfg = train_config(args)
    opt = build_optimizer(cfg, v.model, device)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (args.batch, args.seq + 1), generator=g).to(device) for _ in range(2)]

    def micro(i: int):
        xy = batches[i % 2]
        with v.sdpa():
            loss = v.loss(v.model, xy[:, :-1], xy[:, 1:], v.autocast)
        loss.backward()
        return loss

    def opt_step() -> None:
        torch.nn.utils.clip_grad_norm_(v.model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=False)              # keep the gradient buffers: the next step reuses them

    t0 = time.perf_counter()
    first_loss = micro(0).item()
    first_s = time.perf_counter() - t0
    for i in range(args.warmup):
        micro(i)
    times = [_timed(lambda: micro(i), device) for i in range(args.steps)]
    opt_times = [_timed(opt_step, device) for _ in range(3)]
    return {"first_step_s": round(first_s, 2), "first_loss": round(first_loss, 4),
            "fwd_bwd_s": sorted(times)[len(times) // 2], "fwd_bwd_ms_all": [round(t * 1e3, 1) for t in times],
            "optimizer_s": sorted(opt_times)[1]}, micro


def kernel_profile(micro: Callable, device) -> dict:
    """One profiled micro-batch: the top kernels by GPU time, and which attention kernels ran."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        micro(0)
        sync(device)

    def gpu_time(e) -> float:
        return getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)

    events = sorted(prof.key_averages(), key=gpu_time, reverse=True)
    total = sum(map(gpu_time, events)) or 1
    attention = sorted({e.key[:90] for e in events
                        if any(s in e.key.lower() for s in ("flash", "cudnn", "fmha", "attention", "sdpa"))})
    return {"top_kernels": [(e.key[:90], round(gpu_time(e) / total, 3), e.count) for e in events[:12]],
            "attention_kernels": attention[:8]}


def fused_provider(device) -> str | None:
    """The fused-kernel library (tinyllama.model.fused: liger-kernel, flash-attn) the model's ops
    use on `device` now, None for the PyTorch definitions."""
    import torch

    try:
        from tinyllama.model import fused

        ops = fused.provider_for(torch.zeros(1, device=device))
    except Exception as e:         # --fused / TINYLLAMA_FUSED forcing one that cannot run here
        return f"error: {error_text(e, 200)}"
    return ops.name if ops is not None else None


def run_variant(name: str, args, device) -> dict:
    import torch

    from pretrain.train import initial_model_config
    from tinyllama.precision import choose_dtype

    mcfg = initial_model_config(train_config(args))
    choice = choose_dtype(args.dtype, device, mcfg, work="train", rows=args.batch * args.seq)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    v = build(name, args, device, choice.dtype)
    try:
        v.model.train()
        build_s = time.perf_counter() - t0
        timing, micro = time_steps(v, args, device, mcfg.vocab_size)
        rec = {"variant": name, "preset": args.preset, "seq": args.seq, "micro_batch": args.batch, "ac": args.ac,
               "dtype": choice.name, "fused": fused_provider(device), "build_s": round(build_s, 1),
               **throughput(timing, args, mcfg, device, choice.dtype)}
        if device.type == "cuda":
            rec["peak_alloc_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
            rec["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 2)
            if args.profile:
                rec.update(kernel_profile(micro, device))
        return rec
    finally:
        for close in v.close:
            close()


def throughput(timing: dict, args, mcfg, device, dtype) -> dict:
    from pretrain.metrics import device_peak_flops

    tokens = args.batch * args.seq
    tok_s = tokens / timing["fwd_bwd_s"]
    accum = max(1, train_config(args).global_batch_tokens // tokens)     # the 2M-token batch on one GPU
    fpt = mcfg.flops_per_token(args.seq)
    sheet, source = device_peak_flops(device, dtype)
    sheet = sheet if math.isfinite(sheet) else None            # a GPU pretrain.metrics has no figure for
    measured = env_ceiling("matmul_tflops")
    measured = measured * 1e12 if measured else None
    return {"first_step_s": timing["first_step_s"], "first_loss": timing["first_loss"],
            "fwd_bwd_ms_median": round(timing["fwd_bwd_s"] * 1e3, 2), "fwd_bwd_ms_all": timing["fwd_bwd_ms_all"],
            "optimizer_ms": round(timing["optimizer_s"] * 1e3, 2), "tokens_per_s": round(tok_s, 1),
            "tokens_per_s_with_opt_at_accum": [accum, round(tokens * accum / (timing["fwd_bwd_s"] * accum
                                                                               + timing["optimizer_s"]), 1)],
            "flops_per_token": fpt, "peak_datasheet_tflops": round(sheet / 1e12, 3) if sheet else None, "peak_source": source,
            "mfu_vs_datasheet": round(fpt * tok_s / sheet, 4) if sheet else None,
            "mfu_vs_measured": round(fpt * tok_s / measured, 4) if measured else None}


def run_variants(args) -> None:
    """A record per variant, in order; one that fails is recorded with its error and the next
    runs; one the stage's box has no room left for is recorded as skipped."""
    import torch

    from tinyllama.devices import resolve_device

    device = resolve_device(args.device)
    for name in args.variants:
        if seconds_left() < RESERVE_S:
            record("train_throughput", variant=name, skipped="deadline")
            continue
        try:
            record("train_throughput", **run_variant(name, args, device))
        except Exception as e:
            record("train_throughput", variant=name, error=error_text(e), trace=traceback.format_exc()[-1500:])
        if device.type == "cuda":
            torch.cuda.empty_cache()


def parse_args(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (with --variants: timed micro-batches)")
    table = ap.add_argument_group("the table (ours vs transformers, the fixed shape, on this CPU)")
    table.add_argument("--quick", action="store_true", help="eager settings only")
    table.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=None,
                       help="(default: float32, and bfloat16 where auto would train in it here)")
    var = ap.add_argument_group("--variants (the project's own step on a preset, a JSON record each)")
    var.add_argument("--variants", nargs="+", choices=VARIANTS, help="which variants, in order")
    var.add_argument("--preset", default="tinyllama-1.1b")
    var.add_argument("--seq", type=int, default=2048)
    var.add_argument("--batch", type=int, default=8, help="micro-batch (sequences)")
    var.add_argument("--warmup", type=int, default=2)
    var.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                     help="compute dtype (auto: as pretraining picks it, bf16 on a GPU)")
    var.add_argument("--ac", action="store_true", help="activation checkpointing (checkpoint_wrapper per block)")
    var.add_argument("--profile", action="store_true", help="one more micro-batch under the profiler (GPU)")
    var.add_argument("--device", default="auto", help="auto, cpu, cuda (default: %(default)s)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from tinyllama.model.kernels import use_kernels
    from tinyllama.runtime import RuntimeOptions

    use_kernels(RuntimeOptions.from_env())          # TINYLLAMA_ATTENTION / _FUSED, read once as every CLI does
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        impl, dtype, compiled, steps = sys.argv[2:6]
        print(json.dumps(_measure(impl, dtype, bool(int(compiled)), int(steps))))
        return 0
    args = parse_args(argv)
    if args.variants:
        run_variants(args)
    else:
        print(run(args.steps, args.quick, args.dtypes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
