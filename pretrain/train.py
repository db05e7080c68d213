"""The pretraining loop: FSDP2 across ranks, gradient accumulation to the global batch, a
cosine schedule on optimizer steps, sharded checkpoints with exact resume.

    train(TrainConfig.from_yaml("pretrain/configs/cpu.yaml"))      # what `python -m pretrain` calls
    torchrun --nproc_per_node=8 -m pretrain --config my.yaml        # one node, 8 GPUs

One process runs the model unwrapped; under torchrun every transformer block and then the
root are wrapped with FSDP2 `fully_shard` (bf16 parameters and fp32 gradient reduction on
CUDA, fp32 with gloo on CPU). Running the same command again resumes from the newest
complete checkpoint in out_dir, at exactly the next batch.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from tinyllama import Llama, ModelConfig, Tokenizer, load_checkpoint
from tinyllama.allocator import retain_freed_memory
from tinyllama.atomic import atomic_file
from tinyllama.generate import generate
from tinyllama.checkpoint import load_config
from tinyllama.kernels import cross_entropy
from tinyllama.precision import DtypeChoice, choose_dtype

from .checkpointing import find_resume_state, load_training_state, save_hf_model, save_training_state, step_name
from .config import ConfigError, TrainConfig
from .data import BatchLoader, DataError, Mixture, PackedSource
from .metrics import MetricsLog, device_peak_flops, peak_memory_gb, plot_loss_curve
from .schedule import lr_at


class Dist:
    """Rank, world size and device from torchrun's environment (a single process otherwise)."""

    def __init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", self.local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        self.enabled = self.world_size > 1
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.item() / self.world_size

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


    def broadcast(self, value):
        """Rank 0's `value` on every rank (a decision one rank measured)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def compute_dtype(cfg: TrainConfig, model_cfg: ModelConfig, env: Dist) -> DtypeChoice:
    """cfg.dtype, or for `auto` what rank 0 measures for this model's training matmuls (bf16
    only where it is faster here; on CUDA bf16 where supported), the same on every rank."""
    choice = None
    if env.main or env.device.type == "cuda":
        choice = choose_dtype(cfg.dtype, env.device, model_cfg, work="train", rows=cfg.micro_batch * cfg.seq_len)
    return env.broadcast(choice) if env.device.type != "cuda" else choice


def build_model(cfg: TrainConfig, env: Dist, dtype: torch.dtype | None = None
                ) -> tuple[torch.nn.Module, ModelConfig, Tokenizer]:
    """The same initial weights on every rank and for every world size (seeded, built whole);
    `dtype` is FSDP2's parameter dtype (None: measured as compute_dtype does)."""
    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        model, tok = load_checkpoint(cfg.init_from, dtype=torch.float32)
        model_cfg = model.config
    else:
        model_cfg = initial_model_config(cfg)
        model = Llama(model_cfg)
        tok = Tokenizer.llama2()
    if tok.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocabulary is {model_cfg.vocab_size}")
    model.to(env.device)
    if dtype is None:
        dtype = compute_dtype(cfg, model_cfg, env).dtype

    if cfg.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(model.model.layers):
            model.model.layers[i] = checkpoint_wrapper(block)
    if cfg.compile and env.enabled:
        # Under FSDP2 each block compiles on its own (its hooks stay outside the graphs); a
        # single process compiles the whole loss instead (see _train): measured faster here.
        for block in model.model.layers:
            block.compile()
    if env.enabled:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in model.model.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    return model, model_cfg, tok


def initial_model_config(cfg: TrainConfig) -> ModelConfig:
    """The architecture a run trains: the checkpoint's for init_from, else the preset's."""
    if cfg.init_from:
        return load_config(cfg.init_from)
    model_cfg = ModelConfig.from_name(cfg.preset)
    return model_cfg.replace(max_seq_len=max(model_cfg.max_seq_len, cfg.seq_len))


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    # TinyLlama decays every parameter (norm weights included); kept for fidelity.
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, foreach=True)


def build_data(cfg: TrainConfig, tok: Tokenizer, split: str) -> Mixture:
    sources = {}
    for name, path in cfg.data.items():
        try:
            sources[name] = PackedSource(path, split=split)
        except DataError as e:
            raise ConfigError(f"config field data.{name}: {e}") from None
    return Mixture(sources, cfg.weights, cfg.seq_len, seed=cfg.seed, tokenizer_fingerprint=tok.fingerprint)


def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    ctx = torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with ctx:
        logits = model(x)                                                     # (B, T, V) float32
    return cross_entropy(logits.flatten(0, 1), y.flatten())


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: BatchLoader, batches: int, env: Dist,
             autocast_dtype: torch.dtype | None) -> float:
    model.eval()
    it = iter(loader)
    total = 0.0
    for _ in range(batches):
        x, y = next(it)
        total += loss_fn(model, x.to(env.device), y.to(env.device), autocast_dtype).item()
    model.train()
    return env.mean(total / batches)


def write_samples(final_dir: Path, cfg: TrainConfig, device: torch.device) -> str:
    model, tok = load_checkpoint(final_dir, device=device)
    lines = []
    for prompt in cfg.sample_prompts:
        ids = tok.encode(prompt)
        out = list(generate(model, ids, max_new_tokens=cfg.sample_tokens, temperature=0.8, top_k=40, seed=cfg.seed,
                            stop_ids=[tok.eos_id]))
        lines.append(f"--- {prompt!r}\n{tok.decode(ids + out)}\n")
    text = "\n".join(lines)
    (final_dir.parent / "samples.txt").write_text(text)
    return text


def remove_stale_temporaries(out: Path) -> None:
    """What a run killed mid-write left: dot-named temporaries of HF directories and files
    (tinyllama.atomic) and of training states. Nothing reads them; they only take disk."""
    for stale in [*out.glob(".*.tmp-*"), *out.glob(".*.old-*"), *(out / "state").glob(".step-*.tmp")]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def train(cfg: TrainConfig, stop_after: int | None = None, on_step: Callable[[int, float], None] | None = None) -> dict:
    """Runs (or resumes) pretraining; returns a summary. `stop_after` ends the process's work
    after that many optimizer steps of this invocation, as if it had been killed (tests)."""
    cfg.validate()
    retain_freed_memory()          # no mmap/munmap of the logits every step (tinyllama/allocator.py)
    env = Dist()
    try:
        return _train(cfg, env, stop_after, on_step)
    finally:
        env.close()


def _train(cfg: TrainConfig, env: Dist, stop_after: int | None, on_step) -> dict:
    out = Path(cfg.out_dir)
    accum = cfg.grad_accum_steps(env.world_size)
    total_steps = cfg.total_steps
    model_cfg = initial_model_config(cfg)
    choice = compute_dtype(cfg, model_cfg, env)
    if env.main:
        print(f"dtype: {choice}", flush=True)
    dtype = choice.dtype
    model, model_cfg, tok = build_model(cfg, env, dtype)
    train_mix = build_data(cfg, tok, "train")
    val_mix = build_data(cfg, tok, "validation") if cfg.eval_every and cfg.eval_batches else None
    optimizer = build_optimizer(cfg, model)
    loader = BatchLoader(train_mix, cfg.micro_batch, env.rank, env.world_size, cfg.num_workers)
    # FSDP2 casts parameters itself; a single process uses autocast for bf16.
    autocast_dtype = dtype if (dtype != torch.float32 and not env.enabled) else None
    step_loss = torch.compile(loss_fn) if (cfg.compile and not env.enabled) else loss_fn

    step, tokens = 0, 0
    resume = find_resume_state(out, say=print if env.main else (lambda _: None))
    if resume is not None:
        state = load_training_state(resume, model, optimizer)
        step, tokens = state["step"], state["tokens"]
        loader.load_state_dict(state["loader"])
        if env.main:
            print(f"resuming from {resume} (step {step}, {tokens:,} tokens)")
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        with atomic_file(out / "config.yaml") as tmp:
            tmp.write_text(cfg.to_yaml())
    log = MetricsLog(out, env.main, cfg.tensorboard, cfg.wandb, cfg.to_dict(), resume_step=step)
    flops_per_token = model_cfg.flops_per_token(cfg.seq_len)
    peak, peak_source = device_peak_flops(env.device, dtype)
    tokens_per_step = cfg.global_batch_tokens
    if env.main:
        print(f"{model_cfg.name}: {model_cfg.num_params():,} parameters; {env.world_size} rank(s) on {env.device.type}, "
              f"{dtype}; global batch {tokens_per_step:,} tokens = {cfg.micro_batch} × {cfg.seq_len} × "
              f"{env.world_size} rank(s) × {accum} accumulation step(s); {total_steps} optimizer steps; "
              f"MFU against {peak / 1e12:.2f} TFLOP/s ({peak_source})")

    bar = None
    if env.main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="pretrain", unit="step", dynamic_ncols=True,
                   file=sys.stderr, mininterval=1.0)
    it = iter(loader)
    model.train()
    steps_this_run = 0
    window_t, window_tokens, window_losses = time.perf_counter(), 0, []
    last = {"loss": float("nan")}
    while step < total_steps:
        lr = lr_at(step + 1, cfg.lr, cfg.min_lr, cfg.warmup_steps, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for micro in range(accum):
            x, y = next(it)
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            if env.enabled:
                model.set_requires_gradient_sync(micro == accum - 1)
            loss = step_loss(model, x, y, autocast_dtype) / accum
            loss.backward()
            loss_sum += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        steps_this_run += 1
        tokens += tokens_per_step
        window_tokens += tokens_per_step
        train_loss = env.mean(loss_sum)
        last["loss"] = train_loss
        window_losses.append(train_loss)
        if on_step is not None:
            on_step(step, train_loss)

        if step % cfg.log_every == 0 or step == total_steps:
            dt = time.perf_counter() - window_t
            tok_s = window_tokens / dt
            mfu = flops_per_token * tok_s / (peak * env.world_size)
            # the mean over the logging window: one step's loss is too noisy to plot
            window_loss = sum(window_losses) / len(window_losses)
            record = {"step": step, "tokens": tokens, "loss": round(window_loss, 5), "lr": lr,
                      "grad_norm": round(float(grad_norm), 5), "tokens_per_s": round(tok_s, 1),
                      "mfu": round(mfu, 5), "peak_mem_gb": round(peak_memory_gb(env.device), 3)}
            log.log(record)
            if bar is not None:
                bar.set_postfix(loss=f"{window_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}")
            window_t, window_tokens, window_losses = time.perf_counter(), 0, []
        if bar is not None:
            bar.update(1)

        if val_mix is not None and (step % cfg.eval_every == 0 or step == total_steps):
            val_loader = BatchLoader(val_mix, cfg.micro_batch, env.rank, env.world_size)
            val_loss = evaluate(model, val_loader, cfg.eval_batches, env, autocast_dtype)
            last["val_loss"] = val_loss
            log.log({"step": step, "tokens": tokens, "val_loss": round(val_loss, 5)})
            if bar is not None:
                bar.write(f"step {step}: train loss {train_loss:.4f}, validation loss {val_loss:.4f}")

        final = step == total_steps
        if final or (cfg.save_every and step % cfg.save_every == 0):
            extra = {"train_config.yaml": cfg.to_yaml()}
            save_hf_model(model, model_cfg, tok, out / ("final" if final else step_name(step)), extra)
            save_training_state(out, step, model, optimizer,
                                {"step": step, "tokens": tokens, "loader": loader.state_dict(),
                                 "world_size": env.world_size}, cfg.keep_last)
        if stop_after is not None and steps_this_run >= stop_after and step < total_steps:
            break

    if bar is not None:
        bar.close()
    summary = {"step": step, "tokens": tokens, **last}
    if env.main and step == total_steps:
        png = plot_loss_curve(out / "metrics.jsonl", out / "loss.png") if log.path.exists() else None
        summary["loss_png"] = str(png) if png else None
        if cfg.sample_prompts and cfg.sample_tokens > 0:
            text = write_samples(out / "final", cfg, env.device)
            print(f"samples from {out / 'final'}:\n{text}")
    log.close()
    return summary
