"""python -m gpu_check (make gpu-check): runs the stages in priority order, each in its own
process and time box, inside a total budget, and prints the summary last. A stage is a command
in stage_table: a benchmark's suite mode (python -m bench.X) or one of the two probes (PROBES).

Settings come from the environment (the Makefile passes them through):
    OUT      where results.jsonl, log.txt and summary.txt go (default out/gpu-check)
    BUDGET   seconds for the whole run, wheel install included (default 470: with start-up and
             the summary it fits 8 minutes on one H100/H200)
    STAGES   which stages, space-separated (default: all, in priority order)
    DRY=1    the same stages on CPU with tiny shapes: a rehearsal of the logic without a GPU

results.jsonl is appended to: a second call into the same OUT (the stages the budget skipped)
adds to the first, and its summary covers both. A stage that fails, overruns its box or finds a
library missing is recorded as such and the run goes on; a stage that would start with under
MIN_LEFT seconds left is recorded as skipped.
Exit status 1 when a stage failed or timed out, else 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.records import emit, read_results

from .summarize import write_summary

ROOT = Path(__file__).resolve().parent.parent
ORDER = ("env", "tests", "mfu", "qlora", "spec", "compile", "fsdp2", "smoke")
DEFAULT_BUDGET = 470
MIN_LEFT = 25          # seconds: less than this cannot build a model and measure anything
KILL_GRACE = 10        # seconds between SIGTERM and SIGKILL for a stage past its box


@dataclass(frozen=True)
class Stage:
    name: str
    limit: float        # its box, in seconds (shortened to what the budget has left)
    argv: tuple[str, ...]


# The stages that are not a benchmark's suite mode: what the machine is, and the gpu-marked tests
PROBES = ("gpu_check.env_probe", "gpu_check.run_tests")


def stage_table(dry: bool) -> list[Stage]:
    """The stages with their H200 boxes, each a benchmark's suite mode (`python -m bench.X`) or a
    probe (PROBES); DRY=1 gives them tiny shapes on the CPU."""
    def run(module: str, *args: str) -> tuple[str, ...]:
        return (sys.executable, "-m", module, *args)

    device = ("--device", "cpu" if dry else "cuda")
    if dry:
        # float32 on the CPU: `auto` would time bf16 there, and an emulated bf16 (AVX2) is 100x slower
        f32 = ("--dtype", "float32")
        shape = ("--preset", "tinyllama-debug", "--seq", "64", "--batch", "2", "--steps", "2", "--warmup", "1", *f32)
        qlora = ("--preset", "tinyllama-debug", "--seq", "64", "--steps", "1", *f32)
        spec = ("--pair", "tiny", "--tokens", "16", "--prompts", "2", "--k", "1", "2")
        smoke = ("--preset", "tinyllama-debug", "--seq-len", "64", "--micro-batch", "2", *f32)
    else:
        shape = ("--preset", "tinyllama-1.1b", "--seq", "2048", "--batch", "8", "--steps", "5", "--warmup", "2")
        qlora = ("--preset", "tinyllama-1.1b", "--seq", "512", "--steps", "3")
        spec = ("--pair", "7b", "--alpha", "0.8", "--tokens", "64", "--prompts", "4", "--k", "1", "2", "4")
        smoke = ()
    mfu = run("bench.train_throughput", *shape, *device)
    return [
        Stage("env", 60, run("gpu_check.env_probe", *device)),
        Stage("tests", 100, run("gpu_check.run_tests", *device)),
        Stage("mfu", 170, (*mfu, "--profile", "--variants", "eager", "unfused", "sdpa-flash", "sdpa-cudnn")),
        Stage("qlora", 170, run("bench.sft_memory", "--records", *qlora, "--methods", "qlora", "--impls", "ours", "hf",
                                "--e2e", "--timeout", "120", *device)),
        Stage("spec", 170, run("bench.speculative", "--backend", "torch", *spec, *device)),
        Stage("compile", 170, (*mfu, "--variants", "compile-blocks", "compile")),
        Stage("fsdp2", 80, (*mfu, "--variants", "fsdp2")),
        Stage("smoke", 100, run("bench.kill_resume", "--smoke", *smoke)),
    ]


def say(log: Path, text: str) -> None:
    print(text, flush=True)
    with open(log, "a") as fh:
        fh.write(text + "\n")


def run_stage(stage: Stage, limit: float, log: Path, env: dict) -> dict:
    """Runs one stage, its output appended to `log`; past `limit` seconds its whole process
    group (its own children too: qlora's measurement processes) is terminated, then killed."""
    t0 = time.monotonic()
    env = {**env, "GPU_CHECK_DEADLINE": str(time.time() + limit), "GPU_CHECK_STAGE": stage.name}
    with open(log, "ab") as fh:
        proc = subprocess.Popen(stage.argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=limit), False
        except subprocess.TimeoutExpired:
            timed_out = True
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=KILL_GRACE)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = 124                                  # what timeout(1) answers
    extra = {"timed_out": True, "limit_s": round(limit, 1)} if timed_out else {}
    return emit(stage.name, what="stage", rc=rc, seconds=round(time.monotonic() - t0, 1), **extra)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def run_stages(stages: list[Stage], selected: set[str], budget: float, log: Path, env: dict,
               t0: float | None = None, min_left: float = MIN_LEFT) -> list[dict]:
    """The selected stages in table order; each box cut to what the budget has left."""
    t0 = time.monotonic() if t0 is None else t0
    records = []
    for stage in stages:
        if stage.name not in selected:
            continue
        left = budget - (time.monotonic() - t0)
        if left < min_left:
            records.append(emit(stage.name, what="stage", skipped="budget", left_s=round(left, 1)))
            say(log, f"=== {stage.name}: skipped, {left:.0f}s of the budget left")
            continue
        limit = min(stage.limit, left)
        say(log, f"=== {stage.name} (box {limit:.0f}s, {left:.0f}s left) {time.strftime('%H:%M:%S')}")
        record = run_stage(stage, limit, log, env)
        records.append(record)
        say(log, f"    rc={record['rc']} in {record['seconds']}s" + (" (timed out)" if record.get("timed_out") else ""))
    return records


def install_wheels(log: Path) -> Path | None:
    """The carried wheels (.whl/, make gpu-carry) into a temporary folder that goes first on
    PYTHONPATH: the image stays untouched. Skipped when that folder already holds this set."""
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if not wheels:
        return None
    site = Path(tempfile.gettempdir()) / "gpu-check-site"
    stamp = site / ".wheels"
    names = "\n".join(w.name for w in wheels)
    if stamp.exists() and stamp.read_text() == names:
        return site
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index", "--no-deps",
           "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)]
    with open(log, "ab") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
    emit("setup", what="wheels", rc=rc, wheels=[w.name for w in wheels], seconds=round(time.monotonic() - t0, 1))
    if rc != 0:
        return None
    stamp.write_text(names)
    return site


def stage_env(out: Path, dry: bool, site: Path | None) -> dict:
    """The stages' environment: where their records go (bench.records; each stage's name and
    deadline are added per stage), offline, unbuffered, the checkout (then the wheels) first on
    the path, the carried tokenizer where one was carried."""
    env = dict(os.environ, GPU_CHECK_RESULTS=str(out / "results.jsonl"), PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    paths = [str(ROOT), *([str(site)] if site else []), *filter(None, [os.environ.get("PYTHONPATH")])]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    carried = ROOT / ".cache" / "tokenizers" / "llama2"
    if (carried / "tokenizer.json").exists() and "TINYLLAMA_TOKENIZER_DIR" not in env:
        env["TINYLLAMA_TOKENIZER_DIR"] = str(carried)
    if dry:
        env.update(DRY="1", GPU_CHECK_DEVICE="cpu")
    else:
        env.pop("GPU_CHECK_DEVICE", None)
    return env


def settings() -> tuple[Path, float, set[str], bool]:
    out = Path(os.environ.get("OUT") or "out/gpu-check")
    budget = float(os.environ.get("BUDGET") or DEFAULT_BUDGET)
    names = (os.environ.get("STAGES") or " ".join(ORDER)).split()
    unknown = sorted(set(names) - set(ORDER))
    if unknown:
        raise SystemExit(f"STAGES: unknown {' '.join(unknown)}; the stages are {' '.join(ORDER)}")
    dry = os.environ.get("DRY", "") not in ("", "0")
    return out, budget, set(names), dry


def main() -> int:
    t0 = time.monotonic()
    out, budget, selected, dry = settings()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["GPU_CHECK_RESULTS"] = str(out / "results.jsonl")     # this process's own records (emit) too
    log = out / "log.txt"
    if not dry:
        import torch

        if not torch.cuda.is_available():
            say(log, "gpu-check: no CUDA device here; DRY=1 rehearses the stages on CPU")
            return 2
    say(log, f"gpu-check: stages {' '.join(s for s in ORDER if s in selected)}; budget {budget:.0f}s; "
             f"{'DRY (CPU, tiny shapes)' if dry else 'GPU'}; results in {out}")
    site = None if dry else install_wheels(log)
    records = run_stages(stage_table(dry), selected, budget, log, stage_env(out, dry, site), t0=t0)
    summary = write_summary(read_results(out / "results.jsonl"), out / "summary.txt")
    say(log, summary + f"\ntotal {time.monotonic() - t0:.0f}s")
    return 1 if any(r.get("rc") not in (None, 0) for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
