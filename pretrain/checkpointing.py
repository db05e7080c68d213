"""Training-state checkpoints (sharded, torch.distributed.checkpoint) and the HF model dirs.

Layout of a run's out_dir:
    config.yaml                     the resolved TrainConfig
    state/step-00000500/            DCP shards of model + optimizer, trainer_state.json
                                    (step, tokens, data loader position), rng-<rank>.json
    step-00000500/                  an HF-format model directory (loads in transformers)
    final/                          the last step's HF-format directory
Every directory is written under a dot-prefixed temporary name and renamed when complete, so
resuming never sees a half-written checkpoint; keep-last-K prunes old training states.
"""

from __future__ import annotations

import base64
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from tinyllama import Llama, ModelConfig, Tokenizer, save_checkpoint

STATE_DIR = "state"
# A single process saves without a process group on purpose.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _is_dist():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def latest_state(out_dir: Path) -> Path | None:
    """The newest complete training state (temporaries start with a dot and are ignored)."""
    root = out_dir / STATE_DIR
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if (p / "trainer_state.json").exists() and (p / ".metadata").exists())
    return done[-1] if done else None


def _rng_state() -> dict[str, str]:
    out = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        out["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return out


def _set_rng_state(state: dict[str, str]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def save_training_state(out_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        trainer_state: dict[str, Any], keep_last: int) -> Path:
    root = out_dir / STATE_DIR
    final = root / step_name(step)
    tmp = root / f".{step_name(step)}.tmp"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    (tmp / f"rng-{_rank()}.json").write_text(json.dumps(_rng_state()))
    _barrier()
    if _rank() == 0:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        states = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in states[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".step-*.tmp"):   # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return final


def load_training_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = path / f"rng-{_rank()}.json"
    if rng.exists():
        _set_rng_state(json.loads(rng.read_text()))
    return json.loads((path / "trainer_state.json").read_text())


def save_hf_model(model: torch.nn.Module, model_cfg: ModelConfig, tok: Tokenizer, out: Path,
                  extra_files: dict[str, str]) -> None:
    """Gathers the full weights (a collective under FSDP2) and writes an HF directory on rank 0."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _rank() == 0:
        with torch.device("meta"):
            plain = Llama(model_cfg)
        plain.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, assign=True, strict=True)
        save_checkpoint(plain, tok, out, extra_files=extra_files)
    _barrier()
