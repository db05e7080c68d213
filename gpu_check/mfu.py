"""Stages `mfu`, `compile` and `fsdp2`: pretraining throughput and MFU of the project's own
training step on one GPU.

Each variant builds the preset (tinyllama-1.1b on the GPU) and times the pieces of
pretrain.train.Trainer.train_step on random token ids: pretrain.train.loss_fn (forward, LM head
and loss in one) + backward per micro-batch, and the optimizer (pretrain.train.build_optimizer)
with gradient clipping, separately. The compute dtype is what `auto` picks (tinyllama.precision:
bf16 on a GPU), under autocast as one process trains.

  eager            what `python -m pretrain` runs on one GPU: SDPA's own backend choice, the
                   fused Triton kernels tinyllama.model.fused picks (liger-kernel where it works)
  unfused          the same with --fused off (TINYLLAMA_FUSED=0): the PyTorch definitions of RMSNorm, RoPE,
                   SwiGLU and the loss (the logits materialised)
  sdpa-flash, sdpa-cudnn, sdpa-efficient, sdpa-math     eager with that SDPA backend forced
  compile          torch.compile(loss_fn), as the Trainer does for one process
  compile-blocks   block.compile() per block, as build_model does under FSDP2
  fsdp2            pretrain.train.build_model under a 1-rank process group: fully_shard with
                   MixedPrecisionPolicy(bf16 parameters, fp32 reduction), no autocast

MFU = flops_per_token(seq) x tokens/s / peak, against the data-sheet peak pretrain.metrics
reports (989 TFLOP/s bf16 on an H100/H200) and against the matmul rate the `env` stage measured.

    python -m gpu_check.mfu --variants eager unfused sdpa-cudnn --preset tinyllama-1.1b --seq 2048 --batch 8
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch

from tinyllama import Llama

from .common import (
    device_name,
    emit,
    error_text,
    fused_provider,
    read_results,
    seconds_left,
    sync,
)

SDPA = ("flash", "cudnn", "efficient", "math")
VARIANTS = ("eager", "unfused", *(f"sdpa-{b}" for b in SDPA), "compile", "compile-blocks", "fsdp2")
STAGE_OF = {"compile": "compile", "compile-blocks": "compile", "fsdp2": "fsdp2"}
RESERVE_S = 30           # a variant needs at least this much of the box to build and measure


@dataclass
class Variant:
    model: torch.nn.Module
    loss: Callable
    autocast: torch.dtype | None
    sdpa: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    close: list[Callable[[], None]] = field(default_factory=list)


def train_config(args):
    from pretrain.config import TrainConfig

    return TrainConfig(preset=args.preset, seq_len=args.seq, micro_batch=args.batch, compile=False,
                       activation_checkpointing=args.ac)


def _one_rank_group(device: torch.device):
    """A process group of one (nccl on a GPU) and what build_model reads from pretrain's Dist."""
    import torch.distributed as dist

    with socket.socket() as s:                 # a free port: a second call must not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    return SimpleNamespace(device=device, enabled=True, main=True), dist.destroy_process_group


def build(name: str, args, device: torch.device, dtype: torch.dtype) -> Variant:
    from pretrain.train import (
        build_model,
        checkpoint_blocks,
        initial_model_config,
        loss_fn,
    )

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


def time_steps(v: Variant, args, device: torch.device, vocab: int) -> tuple[dict, Callable]:
    """First micro-batch (compilation, autotuning), warm-up, then the timed micro-batches and
    optimizer steps; returns the timings and the micro-batch function (for the profiler)."""
    from pretrain.train import build_optimizer

    cfg = train_config(args)
    opt = build_optimizer(cfg, v.model, device)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (args.batch, args.seq + 1), generator=g).to(device) for _ in range(2)]

    def micro(i: int) -> torch.Tensor:
        xy = batches[i % 2]
        with v.sdpa():
            loss = v.loss(v.model, xy[:, :-1], xy[:, 1:], v.autocast)
        loss.backward()
        return loss

    t0 = time.perf_counter()
    first_loss = micro(0).item()
    first_s = time.perf_counter() - t0
    for i in range(args.warmup):
        micro(i)
    times = []
    for i in range(args.steps):
        sync(device)
        t = time.perf_counter()
        micro(i)
        sync(device)
        times.append(time.perf_counter() - t)
    opt_times = []
    for _ in range(3):
        sync(device)
        t = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(v.model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=False)              # keep the gradient buffers: the next step reuses them
        sync(device)
        opt_times.append(time.perf_counter() - t)
    return {"first_step_s": round(first_s, 2), "first_loss": round(first_loss, 4),
            "fwd_bwd_s": sorted(times)[len(times) // 2], "fwd_bwd_ms_all": [round(t * 1e3, 1) for t in times],
            "optimizer_s": sorted(opt_times)[1]}, micro


def kernel_profile(micro: Callable, device: torch.device) -> dict:
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


def measured_peak() -> float | None:
    """The matmul FLOP/s the env stage measured on this device, if it ran."""
    probes = [r for r in read_results() if r.get("stage") == "env" and r.get("matmul_tflops")]
    return probes[-1]["matmul_tflops"] * 1e12 if probes else None


def run_variant(name: str, args, device: torch.device) -> dict:
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
               "dtype": choice.name, "fused": fused_provider(device), "build_s": round(build_s, 1), **throughput(timing, args, mcfg, device, choice.dtype)}
        if device.type == "cuda":
            rec["peak_alloc_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
            rec["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 2)
            if args.profile:
                rec.update(kernel_profile(micro, device))
        return rec
    finally:
        for close in v.close:
            close()


def throughput(timing: dict, args, mcfg, device: torch.device, dtype: torch.dtype) -> dict:
    from pretrain.metrics import device_peak_flops

    tokens = args.batch * args.seq
    tok_s = tokens / timing["fwd_bwd_s"]
    accum = max(1, train_config(args).global_batch_tokens // tokens)     # the 2M-token batch on one GPU
    fpt = mcfg.flops_per_token(args.seq)
    sheet, source = device_peak_flops(device, dtype)
    sheet = sheet if math.isfinite(sheet) else None            # a GPU pretrain.metrics has no figure for
    measured = measured_peak()
    return {"first_step_s": timing["first_step_s"], "first_loss": timing["first_loss"],
            "fwd_bwd_ms_median": round(timing["fwd_bwd_s"] * 1e3, 2), "fwd_bwd_ms_all": timing["fwd_bwd_ms_all"],
            "optimizer_ms": round(timing["optimizer_s"] * 1e3, 2), "tokens_per_s": round(tok_s, 1),
            "tokens_per_s_with_opt_at_accum": [accum, round(tokens * accum / (timing["fwd_bwd_s"] * accum
                                                                               + timing["optimizer_s"]), 1)],
            "flops_per_token": fpt, "peak_datasheet_tflops": round(sheet / 1e12, 3) if sheet else None, "peak_source": source,
            "mfu_vs_datasheet": round(fpt * tok_s / sheet, 4) if sheet else None,
            "mfu_vs_measured": round(fpt * tok_s / measured, 4) if measured else None}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=["eager"])
    ap.add_argument("--preset", default="tinyllama-1.1b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8, help="micro-batch (sequences)")
    ap.add_argument("--steps", type=int, default=5, help="timed micro-batches")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="compute dtype (auto: as pretraining picks it, bf16 on a GPU)")
    ap.add_argument("--ac", action="store_true", help="activation checkpointing (checkpoint_wrapper per block)")
    ap.add_argument("--profile", action="store_true", help="one more micro-batch under the profiler (GPU)")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    from tinyllama.model.kernels import use_kernels
    from tinyllama.runtime import RuntimeOptions

    args = parse_args(argv)
    use_kernels(RuntimeOptions.from_env())          # TINYLLAMA_ATTENTION / _FUSED, as every CLI reads them
    device = torch.device(device_name())
    for name in args.variants:
        stage = STAGE_OF.get(name, "mfu")
        if seconds_left() < RESERVE_S:
            emit(stage, variant=name, skipped="deadline")
            continue
        try:
            emit(stage, **run_variant(name, args, device))
        except Exception as e:
            emit(stage, variant=name, error=error_text(e), trace=traceback.format_exc()[-1500:])
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
