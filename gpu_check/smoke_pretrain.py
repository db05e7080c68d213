"""Stage `smoke`: the real `python -m pretrain` on the GPU, end to end, then a resume.

Shards from texts that ship with Python (pydoc's topics as natural text, the asyncio package as
code, through prepare), then tinyllama-19m for 6 steps with bf16 autocast, evaluation,
the sharded training state and HF checkpoint saved every 3 steps and the final samples generated
on the GPU; then the same command to 9 steps, which must resume from step 6. Records per run:
exit status, seconds, whether it resumed, the last metrics rows (loss, tokens/s, MFU, memory),
and whether final/ and samples.txt were written.

    python -m gpu_check.smoke_pretrain [--preset tinyllama-19m] [--seq-len 256] [--micro-batch 8] [--compile]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import emit, seconds_left

RUNS = (("first", 6), ("resume", 9))     # (label, --max-steps): checkpoints at 3 and 6, resumed at 6


def shards(work: Path) -> dict[str, str]:
    import asyncio as code_package
    from pydoc_data.topics import topics

    from prepare.prepare import PrepareConfig, prepare

    natural = work / "natural.jsonl"
    natural.write_text("".join(json.dumps({"text": t}) + "\n" for _, t in sorted(topics.items())))
    out = {}
    for name, src, kw in (("natural", natural, {}), ("code", Path(code_package.__file__).parent, {"extensions": (".py",)})):
        prepare(PrepareConfig(source=str(src), out=work / name, workers=1, val_fraction=0.1, progress=False, **kw))
        out[name] = str(work / name)
    return out


def pretrain_command(args, data: dict[str, str], run_dir: Path) -> list[str]:
    batch_tokens = 2 * args.micro_batch * args.seq_len               # two micro-batches: accumulation runs too
    return [sys.executable, "-m", "pretrain", "--preset", args.preset,
            "--data", *[f"{k}={v}" for k, v in data.items()], "--weights", "natural=0.7", "code=0.3",
            "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
            "--global-batch-tokens", str(batch_tokens), "--save-every", "3", "--eval-every", "3",
            "--eval-batches", "2", "--log-every", "1", "--sample-tokens", "16", "--warmup-steps", "2",
            "--no-tensorboard", "--no-progress", "--out-dir", str(run_dir), *args.extra]


def run(label: str, cmd: list[str], run_dir: Path, timeout: float) -> bool:
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        emit("smoke", what=label, timed_out=True, timeout_s=round(timeout))
        return False
    sys.stdout.write(r.stdout[-3000:])
    sys.stderr.write(r.stderr[-3000:])
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    emit("smoke", what=label, rc=r.returncode, seconds=round(time.perf_counter() - t0, 1),
         resumed="resuming from" in r.stdout, last_rows=rows[-2:],
         final=(run_dir / "final" / "config.json").exists(), samples=(run_dir / "samples.txt").exists(),
         stdout_tail=r.stdout[-600:], stderr_tail=r.stderr[-1500:] if r.returncode else "")
    return r.returncode == 0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tinyllama-19m")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=8)
    args, extra = ap.parse_known_args(argv)
    args.extra = extra                                     # the rest goes to pretrain: --compile, ...
    work = Path(tempfile.mkdtemp(prefix="gpu-check-smoke-"))
    try:
        t0 = time.perf_counter()
        data = shards(work)
        emit("smoke", what="shards", seconds=round(time.perf_counter() - t0, 1))
        for label, steps in RUNS:
            cmd = pretrain_command(args, data, work / "run") + ["--max-steps", str(steps)]
            if not run(label, cmd, work / "run", max(10.0, min(300.0, seconds_left() - 5))):
                break
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
