"""Measurements as JSON records, for a suite that runs benchmarks as stages (python -m gpu_check).

A benchmark's suite mode (bench.train_throughput --variants, bench.sft_memory --records,
bench.speculative --backend torch, bench.kill_resume --smoke) calls emit() once per measurement,
the moment it is known: the record is printed, and appended to $GPU_CHECK_RESULTS when a suite
set it, so that a stage killed at the end of its time box keeps what it measured. The suite
sets, per stage:

    GPU_CHECK_RESULTS    the JSONL file every stage appends to (results.jsonl)
    GPU_CHECK_STAGE      the stage's name, written as each record's "stage" (by hand: the benchmark's own)
    GPU_CHECK_DEADLINE   the end of the stage's time box (epoch seconds), read by seconds_left()
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def results_path() -> Path | None:
    path = os.environ.get("GPU_CHECK_RESULTS")
    return Path(path) if path else None


def emit(stage: str, **fields) -> dict:
    """One record {"stage": stage, **fields}: printed, and appended to the results file if any."""
    record = {"stage": stage, **fields}
    line = json.dumps(record, default=str)
    print(line, flush=True)
    path = results_path()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(line + "\n")
    return record


def record(bench: str, **fields) -> dict:
    """emit() under the running suite stage's name, else the benchmark's own (`bench`): one
    benchmark serves several stages (train_throughput: mfu, compile, fsdp2)."""
    return emit(os.environ.get("GPU_CHECK_STAGE") or bench, **fields)


def read_results(path: str | os.PathLike | None = None) -> list[dict]:
    path = Path(path) if path else results_path()
    if path is None or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def env_ceiling(key: str) -> float | None:
    """A ceiling the suite's env probe measured earlier in this run (matmul_tflops, copy_tb_s),
    the latest; None when it did not run (or no suite runs this)."""
    found = [r[key] for r in read_results() if r.get("stage") == "env" and r.get(key)]
    return found[-1] if found else None


def seconds_left() -> float:
    """Until the end of this stage's box (unbounded when run by hand)."""
    return float(os.environ.get("GPU_CHECK_DEADLINE", "inf")) - time.time()


def error_text(e: BaseException, limit: int = 400) -> str:
    return f"{type(e).__name__}: {e}"[:limit]
