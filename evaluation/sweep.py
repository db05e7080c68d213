"""Checkpoint sweeps: every step-*/ directory of a pretraining run evaluated in order of tokens
seen, and plotted like TinyLlama's Figure 2.

    rows = sweep("out/pretrain", ["data/tokens/natural"], tasks=[], png="out/pretrain/eval_sweep.png")
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pretrain.checkpointing import step_name
from pretrain.config import ConfigError, TrainConfig
from tinyllama.atomic import atomic_file
from tinyllama.inference.backends import load_backend
from tinyllama.runtime import RuntimeOptions

from .harness import PUBLISHED, REPORTED, EvalError, run_tasks
from .perplexity import perplexity


def run_checkpoints(run_dir: Path) -> tuple[TrainConfig, list[tuple[int, Path]]]:
    """The run's resolved config (its config.yaml, through TrainConfig) and its HF checkpoints as
    (optimizer step, directory), step-* in order and then final/ at the run's last step."""
    try:
        cfg = TrainConfig.from_yaml(run_dir / "config.yaml")
    except ConfigError as e:
        raise EvalError(f"{run_dir}: not a pretraining run ({e})") from None
    points = sorted((step, d) for d in run_dir.glob("step-*")
                    if (step := _step_of(d)) is not None and (d / "config.json").exists())
    if (run_dir / "final" / "config.json").exists() and (not points or points[-1][0] < cfg.total_steps):
        points.append((cfg.total_steps, run_dir / "final"))
    if not points:
        raise EvalError(f"{run_dir}: no step-*/ or final/ checkpoints")
    return cfg, points


def _step_of(directory: Path) -> int | None:
    """The step a `step-NNNNNNNN` directory holds; None for any other name."""
    try:
        step = int(directory.name.removeprefix("step-"))
    except ValueError:
        return None
    return step if directory.name == step_name(step) else None


def sweep(run_dir: str | Path, shards: Sequence[str | Path], tasks: Sequence[str] = (), seq_len: int = 256,
          include_path: str | Path | None = None, limit: int | None = None,
          png: str | Path | None = None, dtype: str = "auto", device: str = "auto",
          runtime: RuntimeOptions = RuntimeOptions()) -> list[dict]:
    """[{"checkpoint", "step", "tokens", task/shard: value}, ...] for every checkpoint of the run
    (tokens = step × the run's global_batch_tokens); plotted into `png` when given."""
    cfg, points = run_checkpoints(Path(run_dir))
    rows = []
    for step, ckpt in points:
        backend, tok = load_backend(ckpt, dtype=dtype, device=device, runtime=runtime)
        try:
            row: dict = {"checkpoint": ckpt.name, "step": step, "tokens": step * cfg.global_batch_tokens}
            if tasks:
                for task, m in run_tasks(backend, tok, tasks, include_path, limit=limit).items():
                    row[task] = m.get(PUBLISHED.get(task, (None, REPORTED.get(task, "acc_norm")))[1], m.get("acc"))
            for shard in shards:
                row[f"ppl {Path(shard).name}"] = perplexity(backend, shard, seq_len, tokenizer=tok)[0]
        finally:
            backend.close()
        rows.append(row)
    if png:
        plot(rows, Path(png))
    return rows


def plot(rows: list[dict], png: Path) -> None:
    """One panel per metric against tokens seen (millions), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in rows[0] if k not in ("checkpoint", "step", "tokens")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot([r["tokens"] / 1e6 for r in rows], [r[key] for r in rows], marker="o")
        ax.set_xlabel("tokens seen (M)")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
