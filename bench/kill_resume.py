"""Crash-safety harness: SIGKILL a 2-process gloo pretraining run at random moments, resume it
with the same command each time, and compare its final weights with an uninterrupted run.

    python -m bench.kill_resume                      # 12 kills over a 24-step run (make bench)
    python -m bench.kill_resume --kills 3 --steps 8  # what tests/test_kill_resume.py runs
    python -m bench.kill_resume --smoke [--preset tinyllama-19m] [--compile]   # the GPU suite's smoke stage

Each launch is `torchrun --standalone --nproc_per_node=2 -m pretrain --config run.yaml`, in its
own session so that a kill takes the whole job, as a lost node would. Kills come in three kinds,
taken in turn:
  random         after a random delay within the uninterrupted run's duration
  during-save    the moment a checkpoint temporary appears (a training state or an HF
                 directory being written), plus a few random milliseconds
  one-worker     SIGKILL to one rank only; torchrun then tears the other one down
After every kill the harness checks the invariant that makes resuming safe: every checkpoint
under its final name is complete (training states verify against their manifests; HF
directories have their config and readable safetensors). The resumed runs print which state they
loaded; the last launch runs to the end, and its final weights must equal, bit for bit, those of
the run that was never killed.

--smoke: the same lifecycle in one process on whatever device `python -m pretrain` picks (a GPU
for the GPU suite), stopped cleanly instead of killed: 6 steps with evaluation, checkpoints and
samples, then the same command to 9, which must resume from step 6; a JSON record per run
(bench.records).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("random", "during-save", "one-worker")


@dataclass
class Kill:
    kind: str
    after_s: float
    during_write: bool          # a checkpoint temporary existed at the moment of the kill
    states_after: list[str]     # training states under their final names after the kill


@dataclass
class Campaign:
    kills: list[Kill] = field(default_factory=list)
    resumed_from: list[str] = field(default_factory=list)   # one entry per launch after the first
    reference_s: float = 0.0
    startup_s: float = 0.0      # launch to the first logged step, in the uninterrupted run
    interrupted_s: float = 0.0
    launches: int = 0
    bitwise_equal: bool = False
    tensors: int = 0
    metrics_steps_ok: bool = False


def make_shards(work: Path, topics: int | None = 60, code: str = "json", val_fraction: float = 0.2) -> dict[str, str]:
    """Two small real sources that ship with Python, as in the tests: the first `topics` of its
    English help topics (None: all) and the `code` package's source."""
    import importlib

    from pydoc_data.topics import topics as help_topics

    from prepare.prepare import PrepareConfig, prepare

    work.mkdir(parents=True, exist_ok=True)
    natural = work / "natural.jsonl"
    natural.write_text("".join(json.dumps({"text": t}) + "\n" for _, t in sorted(help_topics.items())[:topics]))
    package = Path(importlib.import_module(code).__file__).parent
    out = {}
    for name, src, kw in [("natural", natural, {}), ("code", package, {"extensions": (".py",)})]:
        if not (work / name / "manifest.json").exists():
            prepare(PrepareConfig(source=str(src), out=work / name, workers=1, val_fraction=val_fraction,
                                  progress=False, **kw))
        out[name] = str(work / name)
    return out


def write_config(shards: dict[str, str], out_dir: Path, steps: int, save_every: int) -> Path:
    from pretrain.config import TrainConfig

    cfg = TrainConfig(preset="tinyllama-debug", data=shards, weights={"natural": 0.7, "code": 0.3}, seq_len=32,
                      micro_batch=2, global_batch_tokens=128, max_steps=steps, lr=3e-3, min_lr=3e-4, warmup_steps=2,
                      dtype="float32", out=str(out_dir), save_every=save_every, keep_last=2, eval_every=0,
                      log_every=1, sample_tokens=0, tensorboard=False, progress=False, seed=5)
    path = out_dir.with_suffix(".yaml")
    path.write_text(cfg.to_yaml())
    return path


def launch(config: Path, log: Path, launched: list | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "pretrain", "--config", str(config)], cwd=ROOT, env=env, start_new_session=True,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    if launched is not None:
        launched.append(proc)
    return proc


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    except OSError:
        return []


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out += kids
        todo += kids
    return out


def _temporaries(out_dir: Path) -> set[tuple[str, int]]:
    """Dot-named temporaries of training states and HF directories, by name and inode (a
    killed save leaves one behind, and its retry reuses the name)."""
    found = set()
    for p in [*out_dir.glob(".*.tmp-*"), *(out_dir / "state").glob(".step-*.tmp")]:
        try:
            found.add((p.name, p.stat().st_ino))
        except FileNotFoundError:
            pass
    return found


def _kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every process under it at once, as a lost node would. Not killpg:
    torchrun starts its workers in sessions of their own, which would outlive it."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def kill_once(proc: subprocess.Popen, kind: str, out_dir: Path, startup_s: float, window_s: float,
              rng: random.Random) -> Kill | None:
    """Waits for the moment `kind` calls for and kills; None when the run finished first. Random
    moments fall between half the start-up time and 80% of the launch's expected duration."""
    t0 = time.perf_counter()
    stale = _temporaries(out_dir)   # left by the previous kill
    if kind == "during-save":
        while proc.poll() is None and not (_temporaries(out_dir) - stale) and time.perf_counter() - t0 < 2 * window_s:
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.002))   # a save of this model takes milliseconds
    else:
        deadline = t0 + rng.uniform(0.5 * startup_s, 0.8 * window_s)
        while proc.poll() is None and time.perf_counter() < deadline:
            time.sleep(0.01)
    if proc.poll() is not None:
        return None
    during = bool(_temporaries(out_dir) - stale)
    after = time.perf_counter() - t0
    if kind == "one-worker" and (workers := _descendants(proc.pid)):
        os.kill(rng.choice(workers), signal.SIGKILL)
        try:
            proc.wait(timeout=60)   # torchrun notices and stops the other rank
        except subprocess.TimeoutExpired:
            pass
        for pid in workers:   # whatever torchrun did not stop, it no longer parents
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    _kill_job(proc)   # the rest of the job (or all of it), so nothing survives into the next launch
    return Kill(kind, round(after, 2), during, [])


def check_invariant(out_dir: Path) -> list[str]:
    """Every checkpoint under its final name is whole. Returns the training states present."""
    from safetensors import safe_open

    from pretrain.checkpointing import saved_states, verify_state

    for hf in [*out_dir.glob("step-*"), out_dir / "final"]:
        if hf.is_dir():
            assert (hf / "config.json").is_file(), f"{hf}: HF directory without config.json"
            with safe_open(str(hf / "model.safetensors"), "pt") as f:
                assert list(f.keys()), f"{hf}: empty safetensors"
    states = saved_states(out_dir)
    for state in states:
        problems = verify_state(state)
        assert not problems, f"a checkpoint under its final name is incomplete: {problems}"
    return [s.name for s in states]


def _final_weights(out_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out_dir / "final" / "model.safetensors"))


def run_campaign(work: Path, kills: int, steps: int, save_every: int, seed: int = 0,
                 shards: dict[str, str] | None = None, say=print) -> Campaign:
    launched: list[subprocess.Popen] = []
    try:
        return _campaign(work, kills, steps, save_every, seed, shards, say, launched)
    finally:   # an error in the harness must not leave a training job running
        for proc in launched:
            if proc.poll() is None:
                _kill_job(proc)


def _campaign(work, kills, steps, save_every, seed, shards, say, launched) -> Campaign:
    from pretrain.checkpointing import saved_states

    rng = random.Random(seed)
    shards = shards or make_shards(work / "shards")
    result = Campaign()

    ref_dir = work / "reference"
    t0 = time.perf_counter()
    proc = launch(write_config(shards, ref_dir, steps, save_every), work / "reference.log", launched)
    trained_s = 0.0   # launch to the last training state (plotting and exit come after)
    while proc.poll() is None and not trained_s:
        if not result.startup_s and (ref_dir / "metrics.jsonl").exists():
            result.startup_s = time.perf_counter() - t0
        if (ref_dir / "state" / f"step-{steps:08d}").exists():
            trained_s = time.perf_counter() - t0
        time.sleep(0.005)
    if proc.wait() != 0:
        raise RuntimeError(f"the uninterrupted run failed:\n{(work / 'reference.log').read_text()[-3000:]}")
    result.reference_s = time.perf_counter() - t0
    step_s = ((trained_s or result.reference_s) - result.startup_s) / steps
    say(f"uninterrupted run: {steps} steps in {result.reference_s:.1f} s ({result.startup_s:.1f} s to the first step)")

    cut_dir = work / "interrupted"
    config = write_config(shards, cut_dir, steps, save_every)
    t0 = time.perf_counter()
    logs = []
    while len(result.kills) < kills:
        log = work / f"launch-{result.launches}.log"
        logs.append(log)
        proc = launch(config, log, launched)
        result.launches += 1
        kind = KINDS[len(result.kills) % len(KINDS)]
        done = json.loads((states[-1] / "trainer_state.json").read_text())["step"] if (states := saved_states(cut_dir)) else 0
        # this launch's expected duration: start-up plus the steps left after its resume point
        if done >= steps and kind == "during-save":   # nothing left to save: a kill in start-up instead
            kind = "random"
        kill = kill_once(proc, kind, cut_dir, result.startup_s, result.startup_s + (steps - done) * step_s, rng)
        if kill is None:   # finished before the kill: the run is over, start it over elsewhere
            raise RuntimeError(f"launch {result.launches} finished before its {kind} kill; use more --steps")
        kill.states_after = check_invariant(cut_dir)
        result.kills.append(kill)
        say(f"kill {len(result.kills)}/{kills}: {kind} after {kill.after_s:.2f} s"
            f"{' while a checkpoint was being written' if kill.during_write else ''}; "
            f"complete training states: {', '.join(kill.states_after) or 'none'}")
    log = work / f"launch-{result.launches}.log"
    logs.append(log)
    proc = launch(config, log, launched)
    result.launches += 1
    if proc.wait() != 0:
        raise RuntimeError(f"the final resumed run failed:\n{log.read_text()[-3000:]}")
    result.interrupted_s = time.perf_counter() - t0
    check_invariant(cut_dir)

    for log in logs[1:]:
        text = log.read_text()
        m = re.search(r"resuming from \S+/step-0*(\d+) ", text)
        started = "parameters;" in text   # the banner printed once the model and data are up
        result.resumed_from.append(f"step {m.group(1)}" if m else ("step 0" if started else "killed in start-up"))
    a, b = _final_weights(ref_dir), _final_weights(cut_dir)
    result.tensors = len(a)
    result.bitwise_equal = a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    rows = [json.loads(line) for line in (cut_dir / "metrics.jsonl").read_text().splitlines()]
    result.metrics_steps_ok = [r["step"] for r in rows if "loss" in r] == list(range(1, steps + 1))
    return result


def table(c: Campaign, steps: int) -> str:
    from bench import markdown_table

    kinds = {k: sum(x.kind == k for x in c.kills) for k in KINDS}
    rows = [("kills survived (SIGKILL)", f"{len(c.kills)}: " + ", ".join(f"{n} {k}" for k, n in kinds.items())),
            ("kills that landed during a checkpoint write", str(sum(k.during_write for k in c.kills))),
            ("launches (same command each time)", str(c.launches)),
            ("resumed from", ", ".join(c.resumed_from)),
            ("incomplete checkpoints seen under a final name", "0 (checked after every kill)"),
            ("final weights vs the uninterrupted run",
             f"{'bitwise equal' if c.bitwise_equal else 'DIFFERENT'} ({c.tensors} tensors)"),
            ("metrics.jsonl", f"steps 1..{steps} once each" if c.metrics_steps_ok else "steps missing or repeated"),
            ("wall time, uninterrupted vs killed-and-resumed", f"{c.reference_s:.1f} s vs {c.interrupted_s:.1f} s")]
    return markdown_table(("2-process gloo pretraining, tinyllama-debug, CPU", "result"), rows)


def run(kills: int = 12, steps: int = 24, save_every: int = 2, seed: int = 0) -> str:
    """One campaign in a temporary folder; its table (what `make bench` records)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kill-resume-") as tmp:
        c = run_campaign(Path(tmp), kills, steps, save_every, seed)
    if not (c.bitwise_equal and c.metrics_steps_ok):
        raise RuntimeError("the killed-and-resumed run differs from the uninterrupted one:\n" + table(c, steps))
    return table(c, steps)


# ---- --smoke: one process on the default device, stopped cleanly and resumed -----------------------

SMOKE_RUNS = (("first", 6), ("resume", 9))     # (label, --max-steps): checkpoints at 3 and 6, resumed at 6


def smoke_command(args, data: dict[str, str], run_dir: Path) -> list[str]:
    batch_tokens = 2 * args.micro_batch * args.seq_len               # two micro-batches: accumulation runs too
    return [sys.executable, "-m", "pretrain", "--preset", args.preset,
            "--data", *[f"{k}={v}" for k, v in data.items()], "--weights", "natural=0.7", "code=0.3",
            "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
            "--global-batch-tokens", str(batch_tokens), "--save-every", "3", "--eval-every", "3",
            "--eval-batches", "2", "--log-every", "1", "--sample-tokens", "16", "--warmup-steps", "2",
            "--no-tensorboard", "--no-progress", "--out", str(run_dir), *args.extra]


def smoke_run(label: str, cmd: list[str], run_dir: Path, timeout: float) -> bool:
    """One `python -m pretrain`, recorded: exit status, seconds, whether it resumed, its last
    metrics rows, whether final/ and samples.txt were written."""
    from .records import record

    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        record("kill_resume", what=label, timed_out=True, timeout_s=round(timeout))
        return False
    sys.stdout.write(r.stdout[-3000:])
    sys.stderr.write(r.stderr[-3000:])
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    record("kill_resume", what=label, rc=r.returncode, seconds=round(time.perf_counter() - t0, 1),
           resumed="resuming from" in r.stdout, last_rows=rows[-2:],
           final=(run_dir / "final" / "config.json").exists(), samples=(run_dir / "samples.txt").exists(),
           stdout_tail=r.stdout[-600:], stderr_tail=r.stderr[-1500:] if r.returncode else "")
    return r.returncode == 0


def smoke(args) -> None:
    """The real `python -m pretrain` end to end on whatever device it picks (the GPU suite's
    smoke stage): shards from all of Python's help topics and the asyncio package, 6 steps with
    evaluation, the training state and HF checkpoint saved every 3 and the samples generated;
    then the same command to 9 steps, which must resume from step 6. A JSON record per run."""
    import shutil
    import tempfile

    from .records import record, seconds_left

    work = Path(tempfile.mkdtemp(prefix="smoke-pretrain-"))
    try:
        t0 = time.perf_counter()
        data = make_shards(work, topics=None, code="asyncio", val_fraction=0.1)
        record("kill_resume", what="shards", seconds=round(time.perf_counter() - t0, 1))
        for label, steps in SMOKE_RUNS:
            cmd = smoke_command(args, data, work / "run") + ["--max-steps", str(steps)]
            if not smoke_run(label, cmd, work / "run", max(10.0, min(300.0, seconds_left() - 5))):
                break
    finally:
        shutil.rmtree(work, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags; with --smoke, those it does not know are kept in .extra for python -m pretrain."""
    ap = argparse.ArgumentParser(prog="python -m bench.kill_resume", description=__doc__, allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=12, help="SIGKILLs before the run may finish (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps of the run (default: %(default)s)")
    ap.add_argument("--save-every", type=int, default=2, help="steps between checkpoints (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the kill moments (default: %(default)s)")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    sm = ap.add_argument_group("--smoke (one process, stopped after 6 steps and resumed to 9; other flags go to "
                               "python -m pretrain, e.g. --compile, --dtype float32)")
    sm.add_argument("--smoke", action="store_true", help="instead of the kill campaign")
    sm.add_argument("--preset", default="tinyllama-19m")
    sm.add_argument("--seq-len", type=int, default=256)
    sm.add_argument("--micro-batch", type=int, default=8)
    args, args.extra = ap.parse_known_args(argv)
    if args.extra and not args.smoke:
        ap.error(f"unrecognized arguments: {' '.join(args.extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        smoke(args)
        return 0
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kill-resume-") as tmp:
        work = args.work or Path(tmp)
        c = run_campaign(work, args.kills, args.steps, args.save_every, args.seed)
    print(table(c, args.steps))
    return 0 if c.bitwise_equal and c.metrics_steps_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
