"""Chat fine-tuning with trl's SFTTrainer: full, LoRA (peft) or QLoRA (bitsandbytes nf4 + LoRA).

    from sft.train import SFTArgs, run_sft
    out = run_sft(SFTArgs(base="out/pretrain/final", out="out/sft", method="lora"))

Writes one HF-format directory, atomically:
    out/                  the chat model: LoRA folded into the base weights (or the fully
                          fine-tuned weights), tokenizer with the chat template,
                          generation_config.json; what tinyllama.load_checkpoint, transformers
                          and python -m quantize read
    out/adapter/          (lora, qlora) the peft adapter alone: adapter_config.json +
                          adapter_model.safetensors, loadable onto the base with
                          peft.PeftModel.from_pretrained (ours or transformers' LlamaForCausalLM)
    out/sft_summary.json  data counts, hyperparameters, losses before and after
    out/sft_log.jsonl     the trainer's log history (loss, eval_loss, lr, tokens)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tinyllama.allocator import retain_freed_memory
from tinyllama.formats.chat import template_of
from tinyllama.formats.checkpoint import (
    CheckpointError,
    check_weights,
    load_config,
    save_checkpoint,
    stored_dtype,
)
from tinyllama.cli import flag
from tinyllama.errors import UserError
from tinyllama.formats.hub import ModelRef, resolve_model
from tinyllama.paths import check_output_dir
from tinyllama.precision import DTYPE_CHOICES, choose_dtype
from tinyllama.formats.tokenizer import Tokenizer
from tinyllama.model.kernels import use_kernels
from tinyllama.runtime import TRAINING, RuntimeOptions

from .data import (
    LoadStats,
    TokenStats,
    load_conversations,
    split_eval,
    tokenize_conversations,
)

METHODS = ("full", "lora", "qlora")
REPORT_TO = ("none", "tensorboard", "wandb")          # as pretraining's tensorboard / wandb switches
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4}   # Zephyr's full SFT; QLoRA paper's small models
# bitsandbytes warns at import when its optional hub kernels cannot be fetched (no hub here);
# the built-in CPU path it falls back to is the one QLoRA uses on a CPU.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


_OPT, _RUN = "optimisation", "data and runtime"


class SFTError(UserError):
    """A fine-tuning request that cannot run; the message names the argument or file at fault."""


# The sft extra installs bitsandbytes only where PyPI has a wheel for it (0.50 ships no sdist).
QLORA_NEEDS_BITSANDBYTES = ("--method qlora needs bitsandbytes, which is not installed: pip install 'bitsandbytes>=0.50' "
                            "(wheels for Linux x86-64/aarch64, Windows and macOS 14+ on Apple silicon), "
                            "or fine-tune with --method lora")


@dataclass
class SFTArgs:
    """Everything a fine-tuning run takes; `python -m sft` has a flag per field (tinyllama.cli)."""
    base: str | Path = field(metadata=flag(
        "the Llama to fine-tune: an HF-format directory (ours or TinyLlama's) or a hub id (org/name, safetensors)"))
    out: str | Path = field(metadata=flag("output directory (written atomically; replaced if it exists)"))
    data: str = field(default="sample", metadata=flag("sample, a .jsonl file or a hub dataset name"))
    revision: str | None = field(default=None, metadata=flag("hub revision of --base (default: main)"))
    method: str = field(default="lora", metadata=flag(
        "full: every weight; lora: low-rank adapters on a frozen base; qlora: lora on an nf4 (4-bit, "
        "double-quantized) base with gradient checkpointing", choices=METHODS))
    epochs: float = field(default=3.0, metadata=flag("passes over the data", group=_OPT))
    max_steps: int = field(default=-1, metadata=flag("optimizer steps; overrides --epochs when > 0", group=_OPT))
    lr: float | None = field(default=None, metadata=flag(
        "peak learning rate, cosine decay (None: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")",
        group=_OPT))
    batch_size: int = field(default=8, metadata=flag("examples per micro-batch", group=_OPT))
    grad_accum: int = field(default=1, metadata=flag("micro-batches per step", group=_OPT))
    seq_len: int = field(default=512, metadata=flag("tokens per example", group=_OPT))
    packing: bool = field(default=False, metadata=flag(
        "pack examples into --seq-len rows (padding-free; examples never attend to each other)", group=_OPT))
    group_by_length: bool = field(default=True, metadata=flag(
        "batch examples of similar length (less padding, the same examples)", group=_OPT))
    warmup_ratio: float = field(default=0.03, metadata=flag("share of the steps spent warming up", group=_OPT))
    weight_decay: float = field(default=0.0, metadata=flag("AdamW weight decay", group=_OPT))
    gradient_checkpointing: bool | None = field(default=None, metadata=flag(
        "recompute activations in backward (None: on for qlora, off otherwise)", group=_OPT))
    seed: int = field(default=42, metadata=flag("seed of the model init, the data order and the split", group=_OPT))
    lora_r: int = field(default=16, metadata=flag("adapter rank", group="LoRA"))
    lora_alpha: int = field(default=32, metadata=flag("scale alpha/r", group="LoRA"))
    lora_dropout: float = field(default=0.05, metadata=flag("dropout on the adapters' input", group="LoRA"))
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS), metadata=flag(
        "projections to adapt", choices=ALL_PROJECTIONS, group="LoRA", metavar="NAME"))
    chat_template: str | None = field(default=None, metadata=flag(
        "the template to train and write: a built-in name (zephyr, llama-2, chatml) or a .jinja file; default: the "
        "base model's own, else zephyr (TinyLlama-Chat's, with no added tokens)", metavar="NAME|FILE"))
    eval_fraction: float = field(default=0.05, metadata=flag("held-out share for the evaluation loss", group=_RUN))
    eval_split: str | None = field(default=None, metadata=flag(
        "a hub dataset's own evaluation split instead (e.g. test)", group=_RUN))
    skip_invalid: bool = field(default=False, metadata=flag(
        "count and skip malformed records instead of stopping at the first", group=_RUN))
    device: str = field(default="auto", metadata=flag("where to train", choices=("auto", "cpu", "cuda"), group=_RUN))
    dtype: str = field(default="auto", metadata=flag(
        "compute dtype; auto times a bf16 and a float32 matmul of the model's shapes once per machine and takes "
        "bf16 only where it is faster (AMX, AVX-512 BF16, GPUs); float16 on CUDA only (with loss scaling, for "
        "GPUs without bf16)", choices=DTYPE_CHOICES, group=_RUN))
    logging_steps: int = field(default=10, metadata=flag("steps between log lines", group=_RUN))
    report_to: str = field(default="none", metadata=flag(
        "where trl's trainer also logs (its report_to): none, tensorboard (event files in OUT/runs) or wandb; "
        "the log lines and OUT/sft_log.jsonl are written either way", choices=REPORT_TO, group=_RUN))
    progress: bool = field(default=True, metadata=flag("a progress bar", group=_RUN))

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]


def _check(args: SFTArgs) -> ModelRef:
    """Refuses bad arguments before the slow imports; returns --base resolved to a local directory."""
    if args.method not in METHODS:
        raise SFTError(f"--method {args.method!r}: expected one of {', '.join(METHODS)}")
    if args.method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        raise SFTError(QLORA_NEEDS_BITSANDBYTES)
    try:
        ref = resolve_model(args.base, revision=args.revision, kinds=("checkpoint",), flag="--base")
    except UserError as e:
        raise SFTError(str(e)) from None
    base = ref.path
    if not (base / "config.json").is_file():
        raise SFTError(f"--base {base}: not a model directory (no config.json); give an HF-format Llama directory "
                       "such as out/pretrain/final")
    try:
        load_config(base)             # refuses what is not a Llama, naming the field
        check_weights(base)           # a truncated file, now rather than after the slow imports
    except (CheckpointError, ValueError) as e:
        raise SFTError(f"--base {base}: {e}") from None
    for name in ("batch_size", "grad_accum", "seq_len", "lora_r", "lora_alpha"):
        if getattr(args, name) <= 0:
            raise SFTError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.max_steps <= 0 and args.epochs <= 0:
        raise SFTError("give --epochs > 0 or --max-steps > 0")
    if args.lr is not None and not args.lr > 0:
        raise SFTError(f"--lr must be positive, got {args.lr}")
    for name in ("eval_fraction", "warmup_ratio"):
        if not 0 <= getattr(args, name) < 1:
            raise SFTError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    if args.weight_decay < 0:
        raise SFTError(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if not 0 <= args.lora_dropout < 1:
        raise SFTError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    unknown = sorted(set(args.target_modules) - set(ALL_PROJECTIONS))
    if unknown:
        raise SFTError(f"--target-modules: unknown {', '.join(unknown)}; choose from {', '.join(ALL_PROJECTIONS)}")
    if args.dtype not in DTYPE_CHOICES:
        raise SFTError(f"--dtype {args.dtype!r}: expected one of {', '.join(DTYPE_CHOICES)}")
    if args.report_to not in REPORT_TO:
        raise SFTError(f"--report-to {args.report_to!r}: expected one of {', '.join(REPORT_TO)}")
    if args.report_to != "none" and importlib.util.find_spec(args.report_to) is None:
        # the trainer would fail on it only after the model has loaded
        raise SFTError(f"--report-to {args.report_to}: {args.report_to} is not installed (pip install {args.report_to})")
    _device(args.device, args.dtype)              # no GPU, or float16 on a CPU: said now, not after the imports
    check_output_dir(args.out, "--out")
    return ref


def _device(name: str, dtype: str = "auto") -> str:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    if device not in ("cpu", "cuda"):
        raise SFTError(f"--device {name!r}: expected auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise SFTError("--device cuda: no CUDA device is available")
    if dtype == "float16" and device == "cpu":
        # the trainer's fp16 is autocast with a gradient scaler, which accelerate runs on GPUs only
        raise SFTError("--dtype float16 trains on CUDA only (mixed precision with loss scaling); on a CPU "
                       "use bfloat16 or float32 (or auto)")
    return device


def _hf_tokenizer(tok: Tokenizer, work: Path):
    """The transformers tokenizer trl needs as processing_class: our own files, chat template in,
    padding on the right with an existing id (never a new token)."""
    from transformers import PreTrainedTokenizerFast

    tok.save(work)
    hf_tok = PreTrainedTokenizerFast.from_pretrained(str(work))
    hf_tok.padding_side = "right"
    return hf_tok


def load_model(base: str | Path, method: str, device: str, dtype: torch.dtype, compute_dtype: torch.dtype | None = None):
    """The base as a trainable transformers model over tinyllama.model.model.Llama, weights in `dtype`;
    nf4 for qlora, dequantized to `compute_dtype` (default: dtype) for its matmuls."""
    from .modeling import TinyLlamaForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype or dtype, llm_int8_skip_modules=["lm_head"])
        kwargs["device_map"] = {"": 0} if device == "cuda" else {"": "cpu"}
        model = TinyLlamaForCausalLM.from_pretrained(str(base), **kwargs)
        if device == "cpu":
            _keep_nf4_trainable_on_cpu(model)
    else:
        model = TinyLlamaForCausalLM.from_pretrained(str(base), **kwargs).to(device)
    return model


def _keep_nf4_trainable_on_cpu(model) -> None:
    """bitsandbytes (0.50) on a CPU with AVX512-BF16 repacks nf4 weights in place the first time a
    Linear4bit runs in eval mode without grad (an evaluation pass), and from then on routes even
    training forwards through `gemv_4bit`, which has no autograd formula: gradients through the
    frozen layers come out silently wrong (measured: LoRA grads off by 150% after one eval). It
    also asserts on output sizes that are not multiples of 32. Turning the repacking off keeps
    every forward on the differentiable dequantize + matmul path."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _lora_config(args: SFTArgs):
    from peft import LoraConfig

    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=list(args.target_modules), bias="none", task_type="CAUSAL_LM")


@dataclass
class SFTResult:
    out: Path
    model: Any             # the trained transformers model (a peft model for lora/qlora)
    summary: dict


@dataclass
class SFTData:
    """The tokenized split and what it took to make it (for the summary)."""
    train_rows: list[dict]
    eval_rows: list[dict]
    eval_convs: list
    load_stats: LoadStats
    train_stats: TokenStats
    eval_stats: TokenStats


def run_sft(args: SFTArgs, runtime: RuntimeOptions = RuntimeOptions()) -> SFTResult:
    """Fine-tunes args.base on args.data and writes args.out (see the module docstring).
    runtime: the attention and fused kernels, and the allocator (tinyllama.runtime)."""
    ref = _check(args)
    typed_base = str(args.base)
    args = dataclasses.replace(args, base=ref.path)        # a hub id becomes its cached snapshot
    # what the adapter names as its base: the hub id (as peft users load it), else the directory
    adapter_base = typed_base if ref.repo else str(ref.path.resolve())
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()      # keep the console to progress and our own summary
    retain_freed_memory(runtime.allocator)        # tinyllama/allocator.py
    use_kernels(runtime)
    device = _device(args.device, args.dtype)
    base, out = Path(args.base), Path(args.out)
    choice = choose_dtype(args.dtype, device, load_config(base), work="train", rows=args.batch_size * args.seq_len)
    print(f"dtype: {choice}; {runtime.describe(TRAINING)}", flush=True)
    tok = Tokenizer.from_dir(base)
    template, template_origin = template_of(tok, args.chat_template)
    print(f"chat template: {template_origin}", flush=True)
    data = prepare_data(args, tok, template)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.resolve().parent))
    try:
        trainer = build_trainer(args, data, tok, work, device, choice.dtype)
        eval_before = trainer.evaluate()["eval_loss"] if data.eval_rows else None
        t0 = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - t0
        eval_after = trainer.evaluate()["eval_loss"] if data.eval_rows else None
        if eval_before is not None:
            print(f"eval loss (assistant tokens): {eval_before:.3f} before -> {eval_after:.3f} after")
        summary = {
            "base": typed_base, "data": args.data, "method": args.method,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(args).items()},
            "learning_rate": args.resolved_lr(), "device": device, "dtype": choice.name, "dtype_reason": choice.reason,
            "chat_template": template_origin,
            "conversations_read": data.load_stats.read, "conversations_skipped": data.load_stats.skipped,
            "train": dataclasses.asdict(data.train_stats), "eval": dataclasses.asdict(data.eval_stats),
            "steps": result.global_step, "train_loss": result.training_loss, "train_seconds": round(seconds, 1),
            "eval_loss_before": eval_before, "eval_loss_after": eval_after,
            "sample_questions": [c[0]["content"] if c[0]["role"] == "user" else c[1]["content"]
                                 for c in data.eval_convs[:5]],
        }
        log_lines = "".join(json.dumps(r) + "\n" for r in trainer.state.log_history)
        _write_output(trainer, args, base, tok.with_template(template), out, work, summary, log_lines, adapter_base)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return SFTResult(out=out, model=trained_model(trainer), summary=summary)


def trained_model(trainer):
    """The model the trainer trained, as a plain module again. Under bf16 mixed precision
    accelerate replaces the model's `forward` with one that runs in autocast; left in place, the
    model a caller gets back computes in bf16 although its weights are float32, and disagrees
    with the checkpoint it was saved to (0.03 on the logits of a 4M model)."""
    return trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)


def prepare_data(args: SFTArgs, tok: Tokenizer, template: str) -> SFTData:
    """Conversations read, split (the dataset's own eval split, or a seeded fraction) and
    tokenized in `template` with the assistant-only label mask; the counts printed."""
    load_stats = LoadStats()
    convs = load_conversations(args.data, skip_invalid=args.skip_invalid, stats=load_stats)
    if args.eval_split:
        train_convs, eval_convs = convs, load_conversations(args.data, split=args.eval_split,
                                                            skip_invalid=args.skip_invalid, stats=load_stats)
    elif args.eval_fraction > 0 and len(convs) > 1:
        train_convs, eval_convs = split_eval(convs, args.eval_fraction, args.seed)
    else:
        train_convs, eval_convs = convs, []
    train_stats, eval_stats = TokenStats(), TokenStats()
    train_rows = tokenize_conversations(train_convs, tok, args.seq_len, train_stats, template)
    eval_rows = tokenize_conversations(eval_convs, tok, args.seq_len, eval_stats, template)
    if not train_rows:
        raise SFTError(f"--data {args.data}: no training example fits --seq-len {args.seq_len}")
    print(f"data: {args.data}: read {load_stats.read} conversations"
          + (f", skipped {load_stats.skipped} invalid" if load_stats.skipped else ""))
    print(f"  train: {train_stats.describe()}")
    if eval_rows:
        print(f"  eval:  {eval_stats.describe()}")
    return SFTData(train_rows, eval_rows, eval_convs, load_stats, train_stats, eval_stats)


def weight_dtype(method: str, device: str, compute: torch.dtype) -> torch.dtype:
    """The dtype the model's weights are loaded in; `compute` (bf16 or float32) is the matmul dtype,
    reached through autocast (the trainer's bf16=True) where it differs.

    Weights the optimiser updates stay float32 everywhere (full fine-tuning's master copy): bf16
    keeps 8 significant bits, so an AdamW step of lr 2e-5 on a weight of 0.02 (a relative change
    of 1e-3, under half a bf16 ulp) rounds back to the old value, and a pure-bf16 full fine-tune
    silently stops learning. A frozen base is never updated, so on CUDA LoRA keeps it in `compute`
    (half the memory; peft makes the trained adapters float32) and QLoRA keeps its unquantized
    layers (embeddings, norms, lm_head) there, its projections being nf4 computed in `compute`.
    A CPU keeps float32 weights for every method and gets bf16 only through autocast."""
    if device == "cuda" and method in ("lora", "qlora"):
        return compute
    return torch.float32


def optimizer_name(method: str, device: str) -> str:
    """The trainer's `optim`. On CUDA: QLoRA's paged 8-bit AdamW (its state in managed memory
    that pages to the host under pressure: QLoRA is for fitting a small GPU), fused AdamW for
    full and LoRA (one kernel over all parameters instead of several per tensor). A CPU keeps
    plain AdamW, the path its runs and timings were measured on."""
    if device != "cuda":
        return "adamw_torch"
    return "paged_adamw_8bit" if method == "qlora" else "adamw_torch_fused"


# transformers 5.23 renamed TrainingArguments' gradient_checkpointing(_kwargs) to
# activation_checkpointing(_kwargs), keeping the old names as deprecated aliases; older versions
# (5.17 on the GPU machines) know only the old names. The new name first.
CHECKPOINTING_FIELDS = ("activation_checkpointing", "gradient_checkpointing")


def checkpointing_kwargs(config_cls, enabled: bool) -> dict[str, Any]:
    """The keywords that turn activation checkpointing on or off in `config_cls` (trl's SFTConfig),
    named as its dataclass fields name them. The flag is always passed: SFTConfig defaults it to
    True, so leaving it out would checkpoint every method, not only QLoRA."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    for name in CHECKPOINTING_FIELDS:
        if name in names and f"{name}_kwargs" in names:
            return {name: enabled, f"{name}_kwargs": {"use_reentrant": False}}
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = f"transformers {version('transformers')}, trl {version('trl')}"
    except PackageNotFoundError:
        installed = "unknown versions"
    raise SFTError(f"{config_cls.__module__}.{config_cls.__qualname__} has neither "
                   f"{' nor '.join(f'{n}(_kwargs)' for n in CHECKPOINTING_FIELDS)} ({installed}): "
                   "install the versions the sft extra names in pyproject.toml")


def build_trainer(args: SFTArgs, data: SFTData, tok: Tokenizer, work: Path, device: str, compute: torch.dtype):
    """trl's SFTTrainer over our model (LoRA/QLoRA through peft), weights in weight_dtype (float32
    where they train), matmuls in `compute` (bf16 autocast where it is bf16)."""
    from datasets import Dataset
    from trl import SFTTrainer

    hf_tok = _hf_tokenizer(tok, work / "tokenizer")
    torch.manual_seed(args.seed)
    model = load_model(args.base, args.method, device, weight_dtype(args.method, device, compute),
                       compute_dtype=compute)
    peft_config = None
    if args.method in ("lora", "qlora"):
        peft_config = _lora_config(args)
        if args.method == "qlora":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = _trainer_config(args, work, device, compute, has_eval=bool(data.eval_rows))
    trainer_cls = SFTTrainer if device == "cuda" else plain_loss_trainer(SFTTrainer)
    trainer = trainer_cls(model=model, args=config, train_dataset=Dataset.from_list(data.train_rows),
                          eval_dataset=Dataset.from_list(data.eval_rows) if data.eval_rows else None,
                          processing_class=hf_tok, peft_config=peft_config)
    if args.method != "full":
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in trainer.model.parameters())
        print(f"{args.method}: training {trainable:,} of {total:,} parameters "
              f"(r={args.lora_r}, alpha={args.lora_alpha}, {', '.join(args.target_modules)})")
    return trainer


def mixed_precision(compute: torch.dtype) -> dict[str, bool]:
    """The trainer's autocast flags for a compute dtype: bf16 as is, float16 with accelerate's
    gradient scaler (fp16's range needs loss scaling), float32 neither."""
    return {"bf16": compute == torch.bfloat16, "fp16": compute == torch.float16}


def report_to(choice: str) -> list[str]:
    """--report-to as trl's (transformers') report_to: [] logs to no integration."""
    return [] if choice == "none" else [choice]


def _trainer_config(args: SFTArgs, work: Path, device: str, compute: torch.dtype, has_eval: bool):
    from trl import SFTConfig

    grad_ckpt = args.method == "qlora" if args.gradient_checkpointing is None else args.gradient_checkpointing
    return SFTConfig(
        output_dir=str(work / "trainer"),
        num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.resolved_lr(), lr_scheduler_type="cosine", warmup_steps=args.warmup_ratio,   # a float in [0, 1) is a ratio of all steps
        weight_decay=args.weight_decay, max_grad_norm=1.0, optim=optimizer_name(args.method, device),
        max_length=args.seq_len, packing=args.packing,
        **checkpointing_kwargs(SFTConfig, grad_ckpt),
        **mixed_precision(compute), use_cpu=device == "cpu",
        # Per epoch; a --max-steps run is evaluated before and after only.
        eval_strategy="epoch" if has_eval and args.max_steps <= 0 else "no",
        train_sampling_strategy="group_by_length" if args.group_by_length and not args.packing else "random",
        save_strategy="no", report_to=report_to(args.report_to), logging_steps=args.logging_steps,
        logging_first_step=True,
        disable_tqdm=not args.progress, seed=args.seed, data_seed=args.seed,
        dataloader_num_workers=0, remove_unused_columns=True,
    )


def plain_loss_trainer(base_cls):
    """SFTTrainer with the loss computed by one lm_head matmul + cross entropy (the model's own
    forward) instead of trl's tiled fused LM head. On CUDA the fused head saves the (B, T, 32000)
    logits' memory and is used as is; on CPU its tiles are slower than the plain path, with the
    same losses, so CPU runs use this."""

    class PlainLossSFTTrainer(base_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            outputs = model(**inputs, num_items_in_batch=num_items_in_batch)
            with torch.no_grad():
                labels = inputs["labels"][:, 1:]
                mask = labels != -100
                correct = (outputs.logits[:, :-1].argmax(-1) == labels) & mask
                self._metrics[mode]["mean_token_accuracy"].append(correct.sum().item() / max(1, mask.sum().item()))
            if mode == "train":
                self._total_train_tokens += int(inputs["input_ids"].numel() if "attention_mask" not in inputs
                                                else inputs["attention_mask"].sum())
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    return PlainLossSFTTrainer


def _write_output(trainer, args: SFTArgs, base: Path, tok: Tokenizer, out: Path, work: Path,
                  summary: dict, log_lines: str, adapter_base: str) -> None:
    """The merged chat model (+ adapter) as one atomic directory."""
    extra_dirs = {}
    if args.method == "full":
        llama = trainer.model.llama
    else:
        adapter_dir = work / "adapter"
        trainer.model.save_pretrained(str(adapter_dir))
        _rewrite_adapter_base(adapter_dir, adapter_base)
        llama = merge_adapter(base, adapter_dir)
        extra_dirs["adapter"] = adapter_dir
    if (work / "trainer" / "runs").is_dir():          # --report-to tensorboard: the event files, kept
        extra_dirs["runs"] = work / "trainer" / "runs"
    base_dtype = stored_dtype(base)
    llama = llama.to(device="cpu", dtype=base_dtype)
    if llama.config.name != "custom" and not llama.config.name.endswith("-chat"):
        # names the GGUF files and their general.name: tinyllama-19m-chat-Q4_K_M.gguf
        llama.config = llama.config.replace(name=f"{llama.config.name}-chat")
    save_checkpoint(llama, tok, out, generation_config={"pad_token_id": tok.pad_id, "eos_token_id": tok.generation_eos},
                    extra_files={"sft_summary.json": json.dumps(summary, indent=2) + "\n",
                                 "sft_log.jsonl": log_lines},
                    extra_dirs=extra_dirs)
    print(f"wrote {out} (chat model{', adapter in ' + str(out / 'adapter') if extra_dirs else ''})")


def _rewrite_adapter_base(adapter_dir: Path, base: str) -> None:
    """base_model_name_or_path: the hub id for a hub base (what peft users load it by), else the
    base directory's absolute path."""
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def merge_adapter(base: str | Path, adapter_dir: str | Path):
    """base weights (full precision, even after QLoRA) + LoRA -> a plain tinyllama Llama with
    W + (alpha/r)·B·A folded into every adapted projection."""
    from peft import PeftModel

    from .modeling import TinyLlamaForCausalLM

    model = TinyLlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return merged.llama
