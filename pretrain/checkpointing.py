"""Training-state checkpoints (sharded, torch.distributed.checkpoint) and the HF model dirs.

Layout of a run's out_dir:
    config.yaml                     the resolved TrainConfig
    state/step-00000500/            DCP shards of model + optimizer, trainer_state.json
                                    (step, tokens, data loader position), rng-<rank>.json,
                                    manifest.json (size and sha256 of every other file)
    step-00000500/                  an HF-format model directory (loads in transformers)
    final/                          the last step's HF-format directory
Crash safety, in three layers:
  * every directory is written under a dot-prefixed temporary name, fsynced, and renamed when
    complete, so a kill at any moment leaves either the whole checkpoint or only a temporary;
  * manifest.json is written last: a state without one is not a checkpoint;
  * on resume the newest state is verified against its manifest (each rank hashes a share of
    the files); one that is truncated or altered on disk is reported and skipped for the
    previous one (keep_last >= 2 keeps one to fall back to).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from tinyllama import Llama, ModelConfig, Tokenizer, save_checkpoint
from tinyllama.errors import UserError

from .distributed import barrier, gather, rank, world_size

STATE_DIR = "state"
MANIFEST = "manifest.json"
# A single process saves without a process group on purpose.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class CorruptCheckpointError(UserError):
    """A training state on disk does not match its manifest (or has none)."""


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def saved_states(out_dir: Path) -> list[Path]:
    """Training states that finished saving, oldest first (temporaries start with a dot)."""
    root = out_dir / STATE_DIR
    return sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
        os.fsync(fh.fileno())   # the bytes reach the disk before the manifest vouches for them
    return h.hexdigest()


def _my_share(names: list[str]) -> list[str]:
    """This rank's share of the files to hash: round-robin over the sorted names, so the reading
    (~12 bytes per parameter for 1.1B: 13 GB) is split across ranks."""
    return sorted(names)[rank()::world_size()]


def _describe(path: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {n: {"bytes": (path / n).stat().st_size, "sha256": _sha256(path / n)} for n in _my_share(names)}


def verify_state(path: Path) -> list[str]:
    """Problems with a training state on disk (empty: intact). Collective under torchrun: every
    rank checks its share of the files and all ranks get the same answer."""
    problems: list[str] = []
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        problems.append(f"{path / MANIFEST}: missing (the save did not finish)")
        files = {}
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        problems.append(f"{path / MANIFEST}: unreadable ({e})")
        files = {}
    if not problems:
        for name in _my_share(list(files)):
            f, want = path / name, files[name]
            if not f.is_file():
                problems.append(f"{f}: missing")
            elif f.stat().st_size != want["bytes"]:
                problems.append(f"{f}: {f.stat().st_size:,} bytes, the manifest says {want['bytes']:,} (truncated?)")
            elif _sha256(f) != want["sha256"]:
                problems.append(f"{f}: sha256 does not match the manifest (corrupted on disk)")
    return sorted({p for rank_problems in gather(problems) for p in rank_problems})


def find_resume_state(out_dir: Path, say=print) -> Path | None:
    """The newest training state that verifies; corrupt newer ones are reported and skipped.
    Raises CorruptCheckpointError when states exist but none is intact: starting over from
    scratch silently would throw away the run."""
    states = saved_states(out_dir)
    rejected = []
    for path in reversed(states):
        problems = verify_state(path)
        if not problems:
            if rejected:
                say(f"warning: falling back to {path.name}")
            return path
        rejected.append(path)
        say(f"warning: training state {path} is corrupt, not resuming from it: " + "; ".join(problems))
    if rejected:
        raise CorruptCheckpointError(
            f"no intact training state in {out_dir / STATE_DIR} ({', '.join(p.name for p in rejected)} failed "
            "verification; see the warnings above). Move them away to start the run from scratch.")
    return None


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
    if rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    (tmp / f"rng-{rank()}.json").write_text(json.dumps(_rng_state()))
    if rank() == 0:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    barrier()
    names = sorted(p.name for p in tmp.iterdir() if p.is_file())
    files = {k: v for share in gather(_describe(tmp, names)) for k, v in share.items()}
    if rank() == 0:
        # The manifest is written last: its presence is what makes the directory a checkpoint.
        manifest = tmp / MANIFEST
        manifest.write_text(json.dumps({"step": trainer_state["step"], "world_size": world_size(), "files": files},
                                       indent=1))
        _sha256(manifest)   # fsync
        if final.exists():   # the same step saved again after a resume from an older state
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_dir(root)
        states = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in states[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".step-*.tmp"):   # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)   # makes the rename itself durable
    finally:
        os.close(fd)


class WeightsOnlyLoadPlanner(dcp.DefaultLoadPlanner):
    """DCP's default planner unpickles the non-tensor entries (the optimizer's param_groups:
    floats, tuples, strings) with `weights_only=False`, which would run code from a crafted
    checkpoint. Ours restricts them to plain data, as torch.load(weights_only=True) does."""

    def load_bytes(self, read_item, value) -> None:
        # The restricted unpickler refuses any global outside its allow-list; once it has read
        # the entry, the default planner's own unpickling of the same bytes can run nothing.
        torch.load(value, weights_only=True)
        value.seek(0)
        super().load_bytes(read_item, value)


def load_training_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path), planner=WeightsOnlyLoadPlanner())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = path / f"rng-{rank()}.json"
    if rng.exists():
        _set_rng_state(json.loads(rng.read_text()))
    return json.loads((path / "trainer_state.json").read_text())


def save_hf_model(model: torch.nn.Module, model_cfg: ModelConfig, tok: Tokenizer, out: Path,
                  extra_files: dict[str, str]) -> None:
    """Gathers the full weights (a collective under FSDP2) and writes an HF directory on rank 0."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank() == 0:
        with torch.device("meta"):
            plain = Llama(model_cfg)
        plain.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, assign=True, strict=True)
        save_checkpoint(plain, tok, out, extra_files=extra_files)
    barrier()
