"""What every gpu-check stage shares: where its records go, which device it measures, and the
end of its time box.

Each stage is its own process (`python -m gpu_check.<stage>`), started by the orchestrator
(gpu_check/__main__.py) with OUT, GPU_CHECK_DEVICE and GPU_CHECK_DEADLINE in its environment.
A record is one JSON object per measurement, appended to $OUT/results.jsonl the moment it is
known (a stage killed at the end of its box keeps what it measured) and printed too, so that
log.txt shows it in order with the stage's own output.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def results_path() -> Path:
    return Path(os.environ.get("OUT", ".")) / "results.jsonl"


def emit(stage: str, **fields) -> dict:
    record = {"stage": stage, **fields}
    line = json.dumps(record, default=str)
    print(line, flush=True)
    path = results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(line + "\n")
    return record


def read_results(path: str | os.PathLike | None = None) -> list[dict]:
    path = Path(path) if path else results_path()
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def device_name() -> str:
    """cuda, or cpu for a dry run (GPU_CHECK_DEVICE=cpu) or where there is no GPU."""
    forced = os.environ.get("GPU_CHECK_DEVICE")
    if forced:
        return forced
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def seconds_left() -> float:
    """Until the end of this stage's box (the orchestrator sets it; unbounded when run by hand)."""
    return float(os.environ.get("GPU_CHECK_DEADLINE", "inf")) - time.time()


def sync(device) -> None:
    """Wait for the GPU, so that a wall-clock interval covers the kernels it launched."""
    if getattr(device, "type", device) == "cuda":
        import torch

        torch.cuda.synchronize()


def fused_provider(device) -> str | None:
    """The fused-kernel library (tinyllama.model.fused: liger-kernel, flash-attn) the model's ops use on
    `device` now, None for the PyTorch definitions."""
    import torch

    try:
        from tinyllama.model import fused

        ops = fused.provider_for(torch.zeros(1, device=device))
    except Exception as e:         # --fused / TINYLLAMA_FUSED forcing one that cannot run here
        return f"error: {error_text(e, 200)}"
    return ops.name if ops is not None else None


def error_text(e: BaseException, limit: int = 400) -> str:
    return f"{type(e).__name__}: {e}"[:limit]
