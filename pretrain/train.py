"""The pretraining loop: FSDP2 across ranks, gradient accumulation to the global batch, a
cosine schedule on optimizer steps, sharded checkpoints with exact resume.

    train(TrainConfig.from_yaml("pretrain/configs/cpu.yaml"))      # what `python -m pretrain` calls
    torchrun --nproc_per_node=8 -m pretrain --config my.yaml        # one node, 8 GPUs

One process runs the model unwrapped; under torchrun every transformer block and then the
root are wrapped with FSDP2 `fully_shard` (bf16 parameters and fp32 gradient reduction on
CUDA, fp32 with gloo on CPU). Running the same command again resumes from the newest
complete checkpoint in cfg.out, at exactly the next batch.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from tinyllama import Llama, ModelConfig, Tokenizer, load_checkpoint
from tinyllama.allocator import retain_freed_memory
from tinyllama.atomic import atomic_file
from tinyllama.formats.checkpoint import load_config
from tinyllama.errors import UserError
from tinyllama.inference.generate import SamplingParams, generate
from tinyllama.formats.hub import resolve_model
from tinyllama.precision import DtypeChoice, choose_dtype
from tinyllama.model.kernels import use_kernels
from tinyllama.runtime import TRAINING, RuntimeOptions

from .checkpointing import (
    find_resume_state,
    load_training_state,
    save_hf_model,
    save_training_state,
    step_name,
)
from .config import ConfigError, TrainConfig
from .data import BatchLoader, Mixture
from .distributed import Dist
from .metrics import MetricsLog, device_peak_flops, peak_memory_gb, plot_loss_curve
from .schedule import lr_at
from tinyllama.formats.shards import PackedSource, ShardError


def compute_dtype(cfg: TrainConfig, model_cfg: ModelConfig, env: Dist) -> DtypeChoice:
    """cfg.dtype, or for `auto` what rank 0 measures for this model's training matmuls (bf16
    only where it is faster here; on CUDA bf16 where supported), the same on every rank."""
    choice = None
    if env.main or env.device.type == "cuda":
        choice = choose_dtype(cfg.dtype, env.device, model_cfg, work="train", rows=cfg.micro_batch * cfg.seq_len)
    return env.broadcast(choice) if env.device.type != "cuda" else choice


def build_model(cfg: TrainConfig, env: Dist, model_cfg: ModelConfig, dtype: torch.dtype,
                init_dir: Path | None = None) -> tuple[torch.nn.Module, Tokenizer]:
    """`model_cfg` (initial_model_config) built, or loaded from `init_dir` (init_checkpoint):
    the same initial weights on every rank and for every world size (seeded, built whole);
    `dtype` is FSDP2's parameter dtype (compute_dtype's choice)."""
    torch.manual_seed(cfg.seed)
    if init_dir is not None:
        model, tok = load_checkpoint(init_dir, dtype=torch.float32)
    else:
        model = Llama(model_cfg)
        tok = scratch_tokenizer(cfg)
        if cfg.embeddings_from:
            with torch.no_grad():
                model.model.embed_tokens.weight.copy_(projected_embeddings(cfg.embeddings_from, model_cfg))
    if tok.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocabulary is {model_cfg.vocab_size}")
    model.to(env.device)

    if cfg.activation_checkpointing:
        checkpoint_blocks(model)
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
    return model, tok


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Activation checkpointing: each transformer block wrapped so that its activations are
    recomputed in the backward pass instead of kept."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        checkpoint_wrapper,
    )

    for i, block in enumerate(model.model.layers):
        model.model.layers[i] = checkpoint_wrapper(block)


def init_checkpoint(cfg: TrainConfig) -> Path | None:
    """cfg.init_from as a local directory (a hub id fetched into the hub cache), or None."""
    if not cfg.init_from:
        return None
    try:
        return resolve_model(cfg.init_from, kinds=("checkpoint",), flag="config field init_from:").path
    except UserError as e:
        raise ConfigError(str(e)) from None


_SHAPE = ("n_layer", "d_model", "n_head", "n_kv_head", "ffn_dim", "vocab_size", "tie_embeddings")


def scratch_tokenizer(cfg: TrainConfig) -> Tokenizer:
    """The vocabulary a model built from scratch speaks: config field tokenizer's (a checkpoint
    directory or hub id: a draft in its target's vocabulary and template), else Llama-2's."""
    if not cfg.tokenizer:
        return Tokenizer.llama2()
    try:
        path = resolve_model(cfg.tokenizer, kinds=("checkpoint",), flag="config field tokenizer:").path
        return Tokenizer.from_dir(path)
    except UserError as e:
        raise ConfigError(str(e)) from None


def projected_embeddings(source: str, cfg: ModelConfig) -> torch.Tensor:
    """`source`'s embedding table (vocab, D) projected onto its cfg.d_model principal directions
    (vocab, d), scaled to the std the model's own initialisation gives: the rows keep their
    relative geometry (which tokens are near which) in the smaller width."""
    from safetensors import safe_open

    try:
        path = resolve_model(source, kinds=("checkpoint",), flag="config field embeddings_from:").path
    except UserError as e:
        raise ConfigError(str(e)) from None
    files = sorted(Path(path).glob("*.safetensors"))
    table = None
    for f in files:
        with safe_open(f, "pt") as st:
            if "model.embed_tokens.weight" in st.keys():
                table = st.get_tensor("model.embed_tokens.weight").float()               # (V, D)
    if table is None:
        raise ConfigError(f"config field embeddings_from: {path} has no model.embed_tokens.weight")
    if table.shape[0] != cfg.vocab_size or table.shape[1] < cfg.d_model:
        raise ConfigError(f"config field embeddings_from: {path}'s embedding table is {tuple(table.shape)}; "
                          f"this model needs {cfg.vocab_size} rows and at least {cfg.d_model} columns")
    centered = table - table.mean(0)
    _, _, vt = torch.linalg.svd(centered, full_matrices=False)                          # vt: (D, D)
    projected = centered @ vt[:cfg.d_model].T                                           # (V, d)
    return projected * (math.sqrt(2.0 / (5 * cfg.d_model)) / projected.std())


def initial_model_config(cfg: TrainConfig, init_dir: Path | None = None) -> ModelConfig:
    """The architecture a run trains: the init_from checkpoint's (`init_dir`; a preset that
    disagrees with it is an error naming both), else the preset's (tinyllama-1.1b by default)
    in config field tokenizer's vocabulary and special ids."""
    if init_dir is None:
        model_cfg = ModelConfig.from_name(cfg.preset or "tinyllama-1.1b")
        if cfg.tokenizer:
            tok = scratch_tokenizer(cfg)
            model_cfg = model_cfg.replace(vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id)
        if cfg.tie_embeddings is not None:
            model_cfg = model_cfg.replace(tie_embeddings=cfg.tie_embeddings)
        return model_cfg.replace(max_seq_len=max(model_cfg.max_seq_len, cfg.seq_len))
    loaded = load_config(init_dir)
    if cfg.preset is not None:
        preset = ModelConfig.from_name(cfg.preset)
        diff = [f"{k} {getattr(preset, k)} vs {getattr(loaded, k)}" for k in _SHAPE
                if getattr(preset, k) != getattr(loaded, k)]
        if diff:
            raise ConfigError(f"config field preset: {cfg.preset} disagrees with the init_from checkpoint "
                              f"{cfg.init_from} ({'; '.join(diff)}); leave preset out: the checkpoint sets the shape")
    if cfg.seq_len > loaded.max_seq_len:
        raise ConfigError(f"config field seq_len: {cfg.seq_len} is longer than the {loaded.max_seq_len} positions "
                          f"the init_from checkpoint {cfg.init_from} was built for")
    return loaded


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; TinyLlama decays every parameter (norm weights included), kept for fidelity. On
    CUDA the fused kernel (one launch for all parameters, as torchtitan's default), elsewhere
    the multi-tensor one."""
    impl = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, **impl)


def allow_fp32_tensor_cores(device: torch.device, dtype: torch.dtype) -> bool:
    """A float32 run on CUDA computes its matmuls as TF32 on the tensor cores (8x the float32
    rate on an A100/H100; torch's default keeps them off), as litgpt does; the MFU peak assumes
    it. True if it was turned on."""
    if device.type != "cuda" or dtype != torch.float32:
        return False
    torch.set_float32_matmul_precision("high")
    return True


def build_data(cfg: TrainConfig, tok: Tokenizer, split: str) -> Mixture:
    sources = {}
    for name, path in cfg.data.items():
        try:
            sources[name] = PackedSource(path, split=split)
        except ShardError as e:
            raise ConfigError(f"config field data.{name}: {e}") from None
    return Mixture(sources, cfg.weights, cfg.seq_len, seed=cfg.seed, tokenizer_fingerprint=tok.fingerprint)


def loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """Mean next-token cross-entropy of x, y (B, T): the model computes it with its LM head
    (fused with the loss where liger-kernel runs)."""
    ctx = torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with ctx:
        return model(x, targets=y)


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
        sampling = SamplingParams(max_new_tokens=cfg.sample_tokens, temperature=0.8, top_k=40, seed=cfg.seed)
        out = list(generate(model, ids, sampling, stop_ids=[tok.eos_id]))
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


def train(cfg: TrainConfig, stop_after: int | None = None, on_step: Callable[[int, float], None] | None = None,
          runtime: RuntimeOptions = RuntimeOptions()) -> dict:
    """Runs (or resumes) pretraining; returns a summary. `stop_after` ends the process's work
    after that many optimizer steps of this invocation, as if it had been killed (tests).
    runtime: the attention and fused kernels, and the allocator (tinyllama.runtime)."""
    cfg.validate()
    retain_freed_memory(runtime.allocator)    # no mmap/munmap of the logits every step (tinyllama/allocator.py)
    use_kernels(runtime)
    env = Dist()
    try:
        return _train(cfg, env, stop_after, on_step, runtime)
    finally:
        env.close()


def _train(cfg: TrainConfig, env: Dist, stop_after: int | None, on_step, runtime: RuntimeOptions) -> dict:
    return Trainer(cfg, env, runtime).fit(stop_after, on_step)


class Trainer:
    """One pretraining run: built (or resumed) by __init__, stepped by fit(), in named pieces as
    torchtitan's Trainer (train_step, maybe_log, maybe_evaluate, maybe_save)."""

    def __init__(self, cfg: TrainConfig, env: Dist, runtime: RuntimeOptions = RuntimeOptions()) -> None:
        self.cfg, self.env, self.out = cfg, env, Path(cfg.out)
        self.accum = cfg.grad_accum_steps(env.world_size)
        init_dir = init_checkpoint(cfg)                  # resolved (a hub id fetched) once
        self.model_cfg = initial_model_config(cfg, init_dir)
        choice = compute_dtype(cfg, self.model_cfg, env)
        if env.main:
            print(f"dtype: {choice}; {runtime.describe(TRAINING)}", flush=True)
        self.model, self.tok = build_model(cfg, env, self.model_cfg, choice.dtype, init_dir)
        train_mix = build_data(cfg, self.tok, "train")
        self.val_mix = build_data(cfg, self.tok, "validation") if cfg.eval_every and cfg.eval_batches else None
        self.optimizer = build_optimizer(cfg, self.model, env.device)
        if allow_fp32_tensor_cores(env.device, choice.dtype) and env.main:
            print("float32 matmuls on CUDA run as TF32 (torch.set_float32_matmul_precision('high'))", flush=True)
        self.loader = BatchLoader(train_mix, cfg.micro_batch, env.rank, env.world_size, cfg.num_workers)
        # FSDP2 casts parameters itself; a single process uses autocast for bf16.
        self.autocast_dtype = choice.dtype if (choice.dtype != torch.float32 and not env.enabled) else None
        self.step_loss = torch.compile(loss_fn) if (cfg.compile and not env.enabled) else loss_fn
        self.step, self.tokens = self._resume()
        self._write_config()
        self.log = MetricsLog(self.out, env.main, cfg.tensorboard, cfg.wandb, cfg.to_dict(), resume_step=self.step)
        self.peak, peak_source = device_peak_flops(env.device, choice.dtype)
        if env.main:
            print(f"{self.model_cfg.name}: {self.model_cfg.num_params():,} parameters; {env.world_size} rank(s) on "
                  f"{env.device.type}, {choice.dtype}; global batch {cfg.global_batch_tokens:,} tokens = "
                  f"{cfg.micro_batch} × {cfg.seq_len} × {env.world_size} rank(s) × {self.accum} accumulation "
                  f"step(s); {cfg.total_steps} optimizer steps; MFU against {self.peak / 1e12:.2f} TFLOP/s "
                  f"({peak_source})")
        self.last: dict = {"loss": float("nan")}
        self.window = (time.perf_counter(), 0, [])            # (start, tokens, losses) since the last log

    def _resume(self) -> tuple[int, int]:
        """(step, tokens) of the newest intact training state in the run's folder, loaded; (0, 0) if none."""
        resume = find_resume_state(self.out, say=print if self.env.main else (lambda _: None))
        if resume is None:
            return 0, 0
        state = load_training_state(resume, self.model, self.optimizer)
        self.loader.load_state_dict(state["loader"])
        if self.env.main:
            print(f"resuming from {resume} (step {state['step']}, {state['tokens']:,} tokens)")
        return state["step"], state["tokens"]

    def _write_config(self) -> None:
        if self.env.main:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.out)
            with atomic_file(self.out / "config.yaml") as tmp:
                tmp.write_text(self.cfg.to_yaml())

    def fit(self, stop_after: int | None = None, on_step: Callable[[int, float], None] | None = None) -> dict:
        """Steps to cfg.total_steps (or `stop_after` steps of this call, as if killed: tests)."""
        cfg, total = self.cfg, self.cfg.total_steps
        bar = self._progress_bar()
        it = iter(self.loader)
        self.model.train()
        steps_this_run = 0
        while self.step < total:
            lr = lr_at(self.step + 1, cfg.lr, cfg.min_lr, cfg.warmup_steps, total)
            train_loss, grad_norm = self.train_step(it, lr)
            steps_this_run += 1
            if on_step is not None:
                on_step(self.step, train_loss)
            self.maybe_log(lr, grad_norm, bar)
            if bar is not None:
                bar.update(1)
            self.maybe_evaluate(train_loss, bar)
            self.maybe_save()
            if stop_after is not None and steps_this_run >= stop_after and self.step < total:
                break
        if bar is not None:
            bar.close()
        return self.finish()

    def _progress_bar(self):
        if not (self.env.main and self.cfg.progress):
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.total_steps, initial=self.step, desc="pretrain", unit="step", dynamic_ncols=True,
                    file=sys.stderr, mininterval=1.0)

    def train_step(self, it, lr: float) -> tuple[float, torch.Tensor]:
        """One optimizer step over `accum` micro-batches; (mean train loss over ranks, grad norm:
        a tensor, read only when logged, so a GPU is not synchronised for it every step)."""
        env, model = self.env, self.model
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=env.device)   # summed on the device: read once per step, not per micro-step
        for micro in range(self.accum):
            x, y = next(it)
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            if env.enabled:
                model.set_requires_gradient_sync(micro == self.accum - 1)
            loss = self.step_loss(model, x, y, self.autocast_dtype) / self.accum
            loss.backward()
            loss_sum += loss.detach()
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += self.cfg.global_batch_tokens
        train_loss = env.mean(loss_sum.item())
        self.last["loss"] = train_loss
        start, window_tokens, losses = self.window
        self.window = (start, window_tokens + self.cfg.global_batch_tokens, losses + [train_loss])
        return train_loss, grad_norm

    def maybe_log(self, lr: float, grad_norm: torch.Tensor, bar) -> None:
        """Every log_every steps (and the last): the window's mean loss, tokens/s, MFU, memory."""
        if self.step % self.cfg.log_every and self.step != self.cfg.total_steps:
            return
        start, window_tokens, losses = self.window
        tok_s = window_tokens / (time.perf_counter() - start)
        mfu = self.model_cfg.flops_per_token(self.cfg.seq_len) * tok_s / (self.peak * self.env.world_size)
        window_loss = sum(losses) / len(losses)          # one step's loss is too noisy to plot
        self.log.log({"step": self.step, "tokens": self.tokens, "loss": round(window_loss, 5), "lr": lr,
                      "grad_norm": round(float(grad_norm), 5), "tokens_per_s": round(tok_s, 1), "mfu": round(mfu, 5),
                      "peak_mem_gb": round(peak_memory_gb(self.env.device), 3)})
        if bar is not None:
            bar.set_postfix(loss=f"{window_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}")
        self.window = (time.perf_counter(), 0, [])

    def maybe_evaluate(self, train_loss: float, bar) -> None:
        cfg = self.cfg
        if self.val_mix is None or (self.step % cfg.eval_every and self.step != cfg.total_steps):
            return
        val_loader = BatchLoader(self.val_mix, cfg.micro_batch, self.env.rank, self.env.world_size)
        val_loss = evaluate(self.model, val_loader, cfg.eval_batches, self.env, self.autocast_dtype)
        self.last["val_loss"] = val_loss
        self.log.log({"step": self.step, "tokens": self.tokens, "val_loss": round(val_loss, 5)})
        if bar is not None:
            bar.write(f"step {self.step}: train loss {train_loss:.4f}, validation loss {val_loss:.4f}")

    def maybe_save(self) -> None:
        """Every save_every steps and at the end: the HF directory and the sharded training state."""
        final = self.step == self.cfg.total_steps
        if not (final or (self.cfg.save_every and self.step % self.cfg.save_every == 0)):
            return
        extra = {"train_config.yaml": self.cfg.to_yaml()}
        save_hf_model(self.model, self.model_cfg, self.tok, self.out / ("final" if final else step_name(self.step)),
                      extra)
        save_training_state(self.out, self.step, self.model, self.optimizer,
                            {"step": self.step, "tokens": self.tokens, "loader": self.loader.state_dict(),
                             "world_size": self.env.world_size}, self.cfg.keep_last)

    def finish(self) -> dict:
        """The summary; at the end of the run also the loss curve and the samples (rank 0)."""
        summary = {"step": self.step, "tokens": self.tokens, **self.last}
        if self.env.main and self.step == self.cfg.total_steps:
            png = plot_loss_curve(self.out / "metrics.jsonl", self.out / "loss.png") if self.log.path.exists() else None
            summary["loss_png"] = str(png) if png else None
            if self.cfg.sample_prompts and self.cfg.sample_tokens > 0:
                text = write_samples(self.out / "final", self.cfg, self.env.device)
                print(f"samples from {self.out / 'final'}:\n{text}")
        self.log.close()
        return summary
