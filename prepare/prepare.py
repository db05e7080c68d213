"""Raw text or code -> packed token shards (uint16; uint32 past 65,536 ids) plus a manifest, for one source.

    python -m prepare data/raw/natural.jsonl --out data/tokens/natural
    python -m prepare /usr/lib/python3.11 --out data/tokens/code --extensions .py --exclude test tests
    python -m prepare cerebras/SlimPajama-627B --out data/tokens/slimpajama   # online
    python -m prepare cerebras/SlimPajama-627B --out /shared/tok/sp --executor slurm --tasks 1000

Format (`tinyllama-packed-v1`), in the output directory:
  train-00000.bin ...       token ids, little-endian uint16 (uint32 past 65,536 ids), `shard_tokens`
  validation-00000.bin ...  per shard; the last shard of a split holds what is left, never padded
  manifest.json             tokenizer fingerprint, document/token counts, per-shard sha256 and
                            token count, the separator policy, what was skipped and why
Separator policy: every document is `BOS + tokens + EOS`, documents are concatenated, and
training blocks are cut from that stream regardless of document boundaries. No BOS padding,
ever (TinyLlama issue #83: padding the last chunk with BOS taught the model to emit `<s>`).
Validation split: document i (in reading order) is held out when i % P == P // 2, with
P = round(1 / val_fraction); deterministic and independent of the worker count.

How it runs: the source is cut into units (files, groups of small files, line-aligned ranges of
a large .jsonl, a hub dataset's data files); datatrove's executor runs the units as tasks on
every core (--workers), or as a SLURM job array (--executor slurm), each worker reading and
tokenizing its own units; the finished units are then merged, in order, into the shards. The
bytes written do not depend on the number of workers, tasks or machines.

Resumable: each finished unit is kept in a work folder beside the output (`.NAME.prepare`).
Run the same command again after a kill, a crash or a full disk and it continues with the
units not done yet, and ends with exactly the bytes of an uninterrupted run. The output folder
itself appears only when complete (written under a temporary name, then renamed).

Speed: the Llama tokenizer cuts text where no BPE merge can cross and runs each distinct piece
through BPE once, in C (prepare/piece_cache.c, compiled by `make setup` or on first use with
the system C compiler). Without one it says so and uses the same rule in Python (its encoder ~4x slower).
--native off (TINYLLAMA_NATIVE=0) chooses the Python path; --native on (TINYLLAMA_NATIVE=1) makes a
failed build an error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tinyllama.errors import UserError, report
from tinyllama.formats.tokenizer import Tokenizer
from tinyllama.runtime import PREPARE, RuntimeOptions, add_runtime_args

from .engine import run_local, seed_tokenizer, submit_slurm
from .merge import SEPARATOR_POLICY, finish  # noqa: F401  (SEPARATOR_POLICY: part of this module's API)
from .parts import (
    Plan,
    clear_errors,
    done_units,
    first_error,
    part_path,
    progress_bar,
    remove,
    work_dir,
)
from .sources import SourceError
from .units import input_signature, plan_units

EXECUTORS = ("local", "slurm")


@dataclass
class PrepareConfig:
    source: str
    out: Path
    name: str | None = None
    text_field: str | None = None
    extensions: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    tokenizer_dir: Path | None = None          # None: the offline Llama-2 tokenizer
    workers: int = max(1, (os.cpu_count() or 1))
    shard_tokens: int = 1 << 24                 # 16M tokens = 32 MiB per shard
    val_fraction: float = 0.005
    skip_bad: bool = False
    chunk_docs: int = 256                       # a chunk of work for one tokenizer process:
    chunk_chars: int = 1 << 18                  # at most this many documents or characters
    split: str = "train"                        # HF dataset split
    progress: bool = True
    unit_mb: float | None = None                # None: about 4 units per worker, 1-64 MiB each
    tasks: int | None = None                    # engine tasks (None: 4 per worker, at most one per unit; 1 for 1 worker)
    local_tasks: int = -1                       # this machine runs tasks [rank_offset, rank_offset + local_tasks)
    rank_offset: int = 0
    retries: int = 5                            # per remote (hub) unit, with backoff
    executor: str = "local"
    slurm_partition: str | None = None
    slurm_time: str = "24:00:00"
    slurm_mem_gb: float = 2
    native: str = "auto"                        # the C piece cache: auto, off or on (tinyllama.runtime)

    def validate(self) -> None:
        if self.shard_tokens < 1024:
            raise UserError(f"shard_tokens must be >= 1024, got {self.shard_tokens}")
        if not 0 <= self.val_fraction < 0.5:
            raise UserError(f"val_fraction must be in [0, 0.5), got {self.val_fraction}")
        if self.workers < 1:
            raise UserError(f"workers must be >= 1, got {self.workers}")
        if self.tasks is not None and self.tasks < 1:
            raise UserError(f"tasks must be >= 1, got {self.tasks}")
        if self.unit_mb is not None and self.unit_mb <= 0:
            raise UserError(f"unit_mb must be > 0, got {self.unit_mb}")
        if self.executor not in EXECUTORS:
            raise UserError(f"executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if self.executor == "slurm" and not self.slurm_partition:
            raise UserError("--executor slurm needs --slurm-partition")


def _load_tokenizer(cfg: PrepareConfig) -> Tokenizer:
    return Tokenizer.from_dir(cfg.tokenizer_dir) if cfg.tokenizer_dir else Tokenizer.llama2()


def prepare(cfg: PrepareConfig) -> dict | None:
    """Tokenizes one source into `cfg.out`; returns the manifest (None when this machine ran
    its share of the tasks and other machines' units are still to come)."""
    cfg.validate()
    tok = _load_tokenizer(cfg)
    out = Path(cfg.out).absolute()
    created = _make_parents(out)
    work = work_dir(out)
    t0 = time.perf_counter()
    try:
        plan = _start(cfg, tok, out, work)
        seed_tokenizer(plan, tok)
        if cfg.executor == "slurm":
            logs = out.with_name(f"{out.name}.slurm-logs")
            ids = submit_slurm(work, logs, tasks=cfg.tasks or min(len(plan.units), 1000),
                               partition=cfg.slurm_partition, time=cfg.slurm_time, mem_per_cpu_gb=cfg.slurm_mem_gb)
            print(f"submitted SLURM jobs {ids[0]} (tokenize, array) and {ids[1]} (merge, after it); "
                  f"logs in {logs}; {out} appears when the merge job ends", file=sys.stderr)
            return None
        _tokenize(cfg, plan, work)
        pending = len(plan.units) - len(done_units(work))
        if pending:
            print(f"this machine's tasks are done; {pending} of {len(plan.units)} units are left to other "
                  f"machines' tasks. When they finish, run the same command again to merge.", file=sys.stderr)
            return None
        manifest = finish(work, progress=cfg.progress)
    except BaseException as e:
        if isinstance(e, UserError) and not getattr(e, "resumable", False):
            remove(work)                 # bad input or arguments: nothing worth resuming
        if not work.exists():
            for d in created:            # a failed run leaves no new (empty) folders behind either
                with contextlib.suppress(OSError):
                    d.rmdir()
        elif not isinstance(e, UserError) or getattr(e, "resumable", False):
            print(f"prepare stopped; its finished units are kept in {work}: run the same command again "
                  "to continue", file=sys.stderr)
        raise
    manifest["seconds"] = time.perf_counter() - t0
    return manifest


def _make_parents(out: Path) -> list[Path]:
    """Creates the missing folders above `out`; returns them, deepest first."""
    if out.exists() and not out.is_dir():
        raise SourceError(f"--out {out}: exists and is not a folder")
    missing, p = [], out.parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        raise SourceError(f"--out {out}: {p} is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    return missing


def _settings(cfg: PrepareConfig, tok: Tokenizer, out: Path) -> dict:
    """What decides the output's bytes (compared on resume), and how tasks run (not compared)."""
    return {"source": str(cfg.source), "out": str(out), "name": cfg.name or out.name, "text_field": cfg.text_field,
            "extensions": list(cfg.extensions) if cfg.extensions else None, "exclude": list(cfg.exclude),
            "tokenizer_dir": str(Path(cfg.tokenizer_dir).absolute()) if cfg.tokenizer_dir else None,
            "shard_tokens": cfg.shard_tokens, "val_fraction": cfg.val_fraction, "skip_bad": cfg.skip_bad,
            "split": cfg.split,
            "tokenizer_info": {"fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                               "eos_id": tok.eos_id, "source": tok.source},
            # not compared:
            "retries": cfg.retries, "chunk_docs": cfg.chunk_docs, "chunk_chars": cfg.chunk_chars,
            "native": cfg.native}


RUNTIME_SETTINGS = ("retries", "chunk_docs", "chunk_chars", "native")


def _start(cfg: PrepareConfig, tok: Tokenizer, out: Path, work: Path) -> Plan:
    """The plan of a new run, or of the unfinished run in `work` when it is for the same thing."""
    settings = _settings(cfg, tok, out)
    old = Plan.load(work)
    if old is not None:
        why = _stale(old, settings)
        if why is None:
            old.settings.update({k: settings[k] for k in RUNTIME_SETTINGS})
            old.save(work)
            clear_errors(work)
            done = done_units(work)
            toks = sum(json.loads(part_path(work, i, "json").read_text())["tokens"] for i in done)
            print(f"resuming {out}: {len(done)} of {len(old.units)} units already tokenized "
                  f"({toks / 1e6:.2f}M tokens), from {work}", file=sys.stderr)
            return old
        print(f"discarding the unfinished run in {work}: {why}", file=sys.stderr)
        remove(work)
    elif cfg.local_tasks == -1:
        remove(work)      # a kill during planning left parts without a plan (several machines plan alike)
    for stale in work.parent.glob(f"{work.name}.removing-*"):
        shutil.rmtree(stale, ignore_errors=True)
    # local inputs by absolute path: tasks may run elsewhere (a SLURM node, another working folder)
    source = str(Path(cfg.source).absolute()) if Path(cfg.source).exists() else str(cfg.source)
    units, code_dir = plan_units(source, unit_bytes=int(cfg.unit_mb * 2**20) if cfg.unit_mb else None,
                                 parallelism=cfg.workers, extensions=cfg.extensions, exclude=cfg.exclude,
                                 split=cfg.split)
    plan = Plan(settings, code_dir, units, input_signature(units))
    work.mkdir(parents=True, exist_ok=True)
    plan.save(work)
    return plan


def _stale(old: Plan, settings: dict) -> str | None:
    """Why an unfinished run cannot be continued by this command, or None."""
    for k, v in json.loads(json.dumps(settings)).items():
        if k not in RUNTIME_SETTINGS and old.settings.get(k) != v:
            return f"it was started with {k}={old.settings.get(k)!r}, this run has {v!r}"
    try:
        now = input_signature(old.units)
    except OSError as e:
        return f"an input is gone ({e})"
    changed = [f for f, sig in old.inputs.items() if now.get(f) != sig]
    return f"{changed[0]} changed since it started" if changed else None


def _tokenize(cfg: PrepareConfig, plan: Plan, work: Path) -> None:
    todo = len(plan.units) - len(done_units(work))
    if todo == 0:
        return
    # several tasks per worker even out units of unequal size; one worker has nothing to even
    # out, and each task costs datatrove's logger set-up (~30 ms)
    tasks = cfg.tasks or (1 if cfg.workers == 1 else min(len(plan.units), 4 * cfg.workers))
    with _progress_monitor(cfg.progress, plan, work):
        run_local(work, tasks=tasks, workers=cfg.workers, local_tasks=cfg.local_tasks, rank_offset=cfg.rank_offset)
    error = first_error(work)
    if error is not None:
        raise error


@contextlib.contextmanager
def _progress_monitor(enabled: bool, plan: Plan, work: Path):
    """A bar over finished units, fed by watching the parts folder (the units finish in other
    processes, or on other machines)."""
    if not enabled:
        yield
        return
    done = done_units(work)
    bar = progress_bar(True, f"prepare {plan.settings['name']}", len(plan.units), " units")
    bar.update(len(done))
    stop = threading.Event()
    t0, tokens = time.perf_counter(), 0

    def watch() -> None:
        nonlocal tokens
        while not stop.wait(0.5):
            new = done_units(work) - done
            for i in new:
                with contextlib.suppress(OSError, ValueError):
                    tokens += json.loads(part_path(work, i, "json").read_text())["tokens"]
            done.update(new)
            if new:
                bar.update(len(new))
                bar.set_postfix_str(f"{tokens / 1e6:.2f}M tokens, {tokens / (time.perf_counter() - t0) / 1e3:.0f}k tok/s")

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()


def summary_table(manifests: list[dict]) -> str:
    rows = [("source", "documents", "train tokens", "val tokens", "shards", "skipped", "tok/s")]
    for m in manifests:
        sp = m["splits"]
        sk = m["skipped"]
        rows.append((m["name"], f"{m['documents']:,}", f"{sp['train']['tokens']:,}", f"{sp['validation']['tokens']:,}",
                     str(len(sp["train"]["shards"]) + len(sp["validation"]["shards"])),
                     f"{sk['empty']} empty, {sk['bad']} bad, {sk['filtered']} filtered",
                     f"{m['tokens'] / m['seconds']:,.0f}" if m.get("seconds") else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="a file (.jsonl, .jsonl.zst, .parquet, .txt), a directory, or a HF dataset name")
    ap.add_argument("--out", required=True, type=Path, help="output directory for the shards and manifest.json")
    ap.add_argument("--name", help="source name in the manifest (default: the output folder's name)")
    ap.add_argument("--text-field", help="JSON/parquet field holding the text (default: text, then content)")
    ap.add_argument("--extensions", nargs="+", help="file extensions to read from a directory, e.g. .py .c")
    ap.add_argument("--exclude", nargs="+", default=[], help="directory names to skip, e.g. test tests")
    ap.add_argument("--tokenizer", type=Path, help="an HF tokenizer directory (default: the Llama-2 tokenizer)")
    ap.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1),
                    help="tokenizer processes (default: %(default)s); the output does not depend on it")
    ap.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard (default: %(default)s)")
    ap.add_argument("--val-fraction", type=float, default=0.005,
                    help="fraction of documents held out for validation (default: %(default)s)")
    ap.add_argument("--skip-bad", action="store_true",
                    help="skip and count malformed lines/rows instead of stopping at the first one")
    ap.add_argument("--split", default="train", help="split of a HF dataset (default: %(default)s)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    eng = ap.add_argument_group("engine (datatrove): how the units run; none of this changes the output")
    eng.add_argument("--executor", choices=EXECUTORS, default="local",
                     help="local: this machine's cores; slurm: submit a job array and a merge job (default: local)")
    eng.add_argument("--tasks", type=int,
                     help="tasks the units are dealt to (default: local 4 per worker, or 1 with one worker; slurm one per unit up to 1000)")
    eng.add_argument("--unit-mb", type=float,
                     help="input MiB per unit (default: about 4 units per worker, 1-64 MiB; a hub file is one unit)")
    eng.add_argument("--local-tasks", type=int, default=-1,
                     help="several machines, shared folder: run only this many of the tasks here (default: all)")
    eng.add_argument("--rank-offset", type=int, default=0, help="with --local-tasks: the first task run here")
    eng.add_argument("--retries", type=int, default=5, help="retries per hub file on network errors (default: 5)")
    eng.add_argument("--slurm-partition", help="SLURM partition (needed with --executor slurm)")
    eng.add_argument("--slurm-time", default="24:00:00", help="SLURM time limit per job (default: %(default)s)")
    eng.add_argument("--slurm-mem-gb", type=float, default=2, help="SLURM memory per task, GB (default: 2)")
    add_runtime_args(ap, PREPARE)
    args = ap.parse_args(argv)
    try:
        options = RuntimeOptions.from_namespace(args)
    except UserError as e:
        return report(e)
    print(f"prepare {args.source}: {options.describe(PREPARE)}", file=sys.stderr, flush=True)
    exts = tuple(e if e.startswith(".") else "." + e for e in args.extensions) if args.extensions else None
    cfg = PrepareConfig(source=args.source, out=args.out, name=args.name, text_field=args.text_field, extensions=exts,
                        exclude=tuple(args.exclude), tokenizer_dir=args.tokenizer, workers=args.workers,
                        shard_tokens=args.shard_tokens, val_fraction=args.val_fraction, skip_bad=args.skip_bad,
                        split=args.split, progress=not args.no_progress, executor=args.executor, tasks=args.tasks,
                        unit_mb=args.unit_mb, local_tasks=args.local_tasks, rank_offset=args.rank_offset,
                        retries=args.retries, slurm_partition=args.slurm_partition, slurm_time=args.slurm_time,
                        slurm_mem_gb=args.slurm_mem_gb, native=options.native)
    try:
        manifest = prepare(cfg)
    except UserError as e:
        return report(e)
    if manifest is None:
        return 0
    print(summary_table([manifest]))
    print(f"wrote {cfg.out}/manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
