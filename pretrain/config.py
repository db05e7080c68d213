"""The pretraining configuration: one typed dataclass, from a YAML file and/or flags.

    cfg = TrainConfig.from_yaml("pretrain/configs/cpu.yaml", overrides={"max_steps": 100})
    cfg.to_yaml()            # the resolved config, saved beside every checkpoint

Defaults reproduce TinyLlama-1.1B: AdamW (0.9, 0.95), weight decay 0.1, peak lr 4e-4 cosine
to 4e-5, 2000 warmup steps, grad clip 1.0, 2M-token global batch (1024 × 2048), seq 2048,
bf16; `pretrain/configs/cpu.yaml` scales them to a small preset on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from tinyllama.model.config import PRESETS
from tinyllama.errors import UserError


class ConfigError(UserError):
    """A configuration value that cannot work; the message names the field."""


@dataclass
class TrainConfig:
    # model
    preset: str | None = None             # None: the init_from checkpoint's shape, else tinyllama-1.1b
    init_from: str | None = None          # continue pretraining from: a directory or hub id (tinyllama.formats.hub)
    # from scratch in another model's vocabulary (a draft for that model): a checkpoint directory
    # or hub id whose tokenizer, special ids and chat template the new model takes; None: Llama-2's
    tokenizer: str | None = None
    tie_embeddings: bool | None = None    # lm_head shares the embedding table; None: the preset's
    # start the embedding table from another model's (same vocabulary), projected onto its d_model
    # principal directions: a draft begins with its target's geometry of tokens
    embeddings_from: str | None = None
    # data: name -> shard directory, and the mixture weights (TinyLlama: 0.693584 / 0.306416)
    data: dict[str, str] = field(default_factory=lambda: {"natural": "data/tokens/natural", "code": "data/tokens/code"})
    weights: dict[str, float] = field(default_factory=lambda: {"natural": 0.7, "code": 0.3})
    seq_len: int = 2048
    micro_batch: int = 8                  # sequences per rank per forward/backward
    global_batch_tokens: int = 2048 * 1024
    max_steps: int | None = None          # optimizer steps; or derive them from max_tokens
    max_tokens: int = 3_000_000_000_000
    # optimizer and schedule (on optimizer steps, never micro-batches)
    lr: float = 4e-4
    min_lr: float = 4e-5
    warmup_steps: int = 2000
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # numerics and speed
    dtype: str = "auto"                   # auto: measured (tinyllama.precision); or bfloat16 / float32
    compile: bool = False
    activation_checkpointing: bool = False
    num_workers: int = 0                  # dataloader worker processes per rank
    # checkpoints, evaluation, logging
    out: str = "out/pretrain"             # the run's folder (checkpoints, state, metrics); was out_dir
    save_every: int = 1000                # optimizer steps between checkpoints (0: only final)
    keep_last: int = 2                    # training-state checkpoints kept (HF step-*/ dirs are all kept)
    eval_every: int = 500
    eval_batches: int = 20
    log_every: int = 10
    sample_prompts: list[str] = field(default_factory=lambda: ["The meaning of", "def fibonacci(n):"])
    sample_tokens: int = 48
    tensorboard: bool = True
    wandb: bool = False
    seed: int = 1337
    progress: bool = True

    # ---- derived ----------------------------------------------------------------------
    def tokens_per_micro_step(self, world_size: int) -> int:
        return self.micro_batch * self.seq_len * world_size

    def grad_accum_steps(self, world_size: int) -> int:
        per = self.tokens_per_micro_step(world_size)
        if self.global_batch_tokens % per:
            raise ConfigError(
                f"global_batch_tokens={self.global_batch_tokens} is not divisible by micro_batch × seq_len × world_size "
                f"= {self.micro_batch} × {self.seq_len} × {world_size} = {per}; choose a global batch that is a multiple "
                f"of {per}")
        return self.global_batch_tokens // per

    @property
    def total_steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return math.ceil(self.max_tokens / self.global_batch_tokens)

    # ---- validation ---------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        def bad(name: str, why: str) -> None:
            raise ConfigError(f"config field {name}: {why} (got {getattr(self, name)!r})")

        if self.preset is not None and self.preset not in PRESETS:
            bad("preset", f"unknown preset; known presets: {', '.join(sorted(PRESETS))}")
        for name in ("seq_len", "micro_batch", "global_batch_tokens", "log_every"):
            if getattr(self, name) <= 0:
                bad(name, "must be > 0")
        if self.max_steps is not None and self.max_steps <= 0:
            bad("max_steps", "must be > 0")
        if self.lr <= 0:
            bad("lr", "must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            bad("min_lr", f"must be within [0, lr={self.lr}]")
        if self.warmup_steps < 0 or self.warmup_steps > self.total_steps:
            bad("warmup_steps", f"must be within [0, total steps {self.total_steps}]")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            bad("beta1" if not 0 <= self.beta1 < 1 else "beta2", "must be in [0, 1)")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0")
        if self.grad_clip < 0:
            bad("grad_clip", "must be >= 0 (0 disables clipping)")
        if self.dtype == "float16":
            bad("dtype", "must be auto, bfloat16 or float32: float16 training needs loss scaling, which "
                         "pretraining does not do; bfloat16 has float32's range and needs none")
        if self.dtype not in ("auto", "bfloat16", "float32"):
            bad("dtype", "must be auto, bfloat16 or float32")
        if self.save_every < 0 or self.eval_every < 0 or self.keep_last < 1:
            bad("keep_last" if self.keep_last < 1 else "save_every", "must be >= 0 (keep_last >= 1)")
        scratch_only = [f for f in ("tokenizer", "tie_embeddings", "embeddings_from") if getattr(self, f) is not None]
        if self.init_from and scratch_only:
            bad(scratch_only[0], "only for a model built from scratch; an init_from checkpoint brings its own")
        if not self.data:
            bad("data", "needs at least one source")
        unknown = set(self.weights) - set(self.data)
        if unknown:
            bad("weights", f"names source(s) not in data: {', '.join(sorted(unknown))}")
        missing = set(self.data) - set(self.weights)
        if missing:
            bad("weights", f"no weight for source(s): {', '.join(sorted(missing))}")
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            bad("weights", "must be >= 0 and not all zero")
        return self

    # ---- I/O ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "TrainConfig":
        d = _renamed_fields(d, source)
        names = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}; known: {', '.join(names)}")
        kwargs = {}
        for k, v in d.items():
            kwargs[k] = _coerce(names[k], v, source)
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        d: dict[str, Any] = {}
        if path is not None:
            p = Path(path)
            try:
                loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise ConfigError(f"{p}: config file not found") from None
            except IsADirectoryError:
                raise ConfigError(f"{p}: is a folder, not a config file") from None
            except UnicodeDecodeError as e:
                raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason})") from None
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f" at line {mark.line + 1}" if mark else ""
                raise ConfigError(f"{p}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
            if loaded is not None and not isinstance(loaded, dict):
                raise ConfigError(f"{p}: expected a mapping of field: value")
            d.update(loaded or {})
        overrides = dict(overrides or {})
        if overrides.get("init_from") and "preset" not in overrides:
            d.pop("preset", None)          # an init_from given now brings its own shape, not the file's preset
        d.update(overrides)
        return cls.from_dict(d, source=str(path) if path else "flags")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


RENAMED_FIELDS = {"out_dir": "out"}        # old name -> new; configs written before still load


def _renamed_fields(d: dict[str, Any], source: str) -> dict[str, Any]:
    """`d` with old field names under their new ones; one line on stderr for each."""
    d = dict(d)
    for old, new in RENAMED_FIELDS.items():
        if old in d:
            if new in d:
                raise ConfigError(f"{source}: fields {old} and {new} are the same field ({old} is its old name); "
                                  f"give {new} only")
            print(f"warning: {source}: config field {old} is an old name: use {new}", file=sys.stderr)
            d[new] = d.pop(old)
    return d


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    """YAML and flags give strings, ints and floats loosely; check each against its field."""
    t = str(f.type)
    try:
        if value is None:
            if "None" in t:
                return None
            raise TypeError("may not be null")
        if t.startswith("dict"):
            if not isinstance(value, dict):
                raise TypeError("expected a mapping")
            return {str(k): (float(v) if "float" in t else str(v)) for k, v in value.items()}
        if t.startswith("list"):
            if isinstance(value, str):
                value = [value]
            return [str(v) for v in value]
        if t.startswith("bool"):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise TypeError("expected true or false")
            return bool(value)
        if t.startswith("int"):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, str):
                try:
                    number = float(value.replace("_", ""))       # "2e6", "2_097_152"
                except ValueError:
                    raise TypeError("expected an integer") from None
                if not number.is_integer():
                    raise TypeError("expected an integer")
                value = int(number)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError("expected an integer")
            return value
        if t.startswith("float"):
            return float(value)
        if t.startswith("str"):
            return str(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: field {f.name}: {e} (got {value!r})") from None
    return value
