"""python -m pretrain: pretrain (or resume) a model from a YAML config and/or flags.

    python -m pretrain --config pretrain/configs/cpu.yaml                 # the CPU default (make pretrain)
    python -m pretrain --config pretrain/configs/cpu.yaml --max-steps 50 --lr 1e-3
    torchrun --nproc_per_node=2 -m pretrain --config pretrain/configs/cpu.yaml
    python -m pretrain --preset tinyllama-19m --data natural=data/tokens/natural code=data/tokens/code \\
        --weights natural=0.7 code=0.3 --seq-len 256 --micro-batch 8 --global-batch-tokens 4096 --max-steps 100
    python -m pretrain --init-from TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T --data mine=data/tokens/mine \\
        --weights mine=1 --lr 1e-4 --warmup-steps 100 --max-steps 2000 --out out/continued   # continued pretraining

Every field of the config is a flag (`--field-name value`); flags override the YAML file.
Re-running the same command resumes from the newest complete checkpoint in --out.
The runtime flags (--attention, --fused, --allocator) default to their TINYLLAMA_* variables.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from tinyllama.allocator import configure_mkl

configure_mkl()          # before torch loads MKL (tinyllama/allocator.py: ~280k page faults a step less)

from tinyllama.cli import add_flags, add_renamed_flag  # noqa: E402
from tinyllama.errors import UserError, report  # noqa: E402
from tinyllama.runtime import TRAINING, RuntimeOptions, add_runtime_args  # noqa: E402

from .config import ConfigError, TrainConfig  # noqa: E402

_HELP = {
    "preset": "model preset (python -m tinyllama presets; default: the --init-from checkpoint's shape, else "
              "tinyllama-1.1b)",
    "init_from": "continue pretraining from a Llama checkpoint: an HF-format directory or a hub id (org/name, "
                 "org/name@REVISION, e.g. one of TinyLlama's intermediate checkpoints); new optimizer state, the "
                 "schedule from step 0; given as a flag it replaces the config file's preset",
    "tokenizer": "build from scratch in this model's vocabulary: a checkpoint directory or hub id whose tokenizer, "
                 "special ids and chat template the new model takes (a draft for that model; its shards must be "
                 "prepared with the same tokenizer); unset: Llama-2's",
    "tie_embeddings": "lm_head shares the embedding table (unset: as the preset has it); halves a small "
                      "model's parameters in a large vocabulary",
    "embeddings_from": "start the embedding table from this checkpoint's (same vocabulary; a draft's target), "
                       "projected onto its d_model principal directions",
    "data": "sources as NAME=SHARD_DIR ... (from python -m prepare)",
    "weights": "mixture weights as NAME=WEIGHT ...",
    "global_batch_tokens": "tokens per optimizer step, across ranks and accumulation",
    "max_steps": "optimizer steps (default: max_tokens / global_batch_tokens)",
    "dtype": "auto (bf16 where a timed bf16 matmul beats float32 on this CPU; bf16 on CUDA), bfloat16 or float32",
    "save_every": "optimizer steps between checkpoints (0: only the final one)",
    "keep_last": "training-state checkpoints to keep",
    "out": "the run's folder: checkpoints, training state, metrics (re-running resumes from it)",
}


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for v in values:
        if "=" not in v:
            raise ConfigError(f"--{flag}: expected NAME=VALUE, got {v!r}")
        k, val = v.split("=", 1)
        out[k] = val
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="a YAML file of config fields (see pretrain/configs/)")
    add_flags(ap, TrainConfig, raw=True, helps=_HELP)      # every field; values are checked by TrainConfig
    add_renamed_flag(ap, "--out-dir", "--out", dest="out")
    add_runtime_args(ap, TRAINING)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {}
    try:
        for f in dataclasses.fields(TrainConfig):
            v = getattr(args, f.name)
            if v is None:
                continue
            overrides[f.name] = _pairs(v, f.name.replace("_", "-")) if str(f.type).startswith("dict") else v
        cfg = TrainConfig.from_yaml(args.config, overrides).validate()
        runtime = RuntimeOptions.from_namespace(args)
        from .train import train  # torch and friends load only once the config is sound

        summary = train(cfg, runtime=runtime)
    except UserError as e:
        return report(e)
    if summary["loss"] != summary["loss"]:   # NaN: resumed from the last step, nothing left to train
        print(f"done: step {summary['step']}, {summary['tokens']:,} tokens (the run was already complete)")
        return 0
    print(f"done: step {summary['step']}, {summary['tokens']:,} tokens, final train loss {summary['loss']:.4f}"
          + (f", validation loss {summary['val_loss']:.4f}" if "val_loss" in summary else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
