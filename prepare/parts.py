"""A prepare run's work folder: the plan, and each finished unit's tokens, written as it finishes.

    <out>.prepare/  (a hidden sibling of the output folder: `.NAME.prepare`)
      plan.json               the arguments, the tokenizer fingerprint, the units, the input files'
                              sizes and mtimes: a resumed run must match it
      parts/u-000042.tok      unit 42's documents, BOS + ids + EOS each, uint16 (uint32 for vocabularies
                              over 65,536 ids) little-endian
      parts/u-000042.len      each document's length in tokens, uint32 little-endian
      parts/u-000042.json     its counts and skip statistics; written last, so it marks the unit done
      parts/u-000042.error    a unit that failed on bad input: the message (the run stops)
      logs/                   the engine's (datatrove's) task logs and stats

Every file is written under a temporary name and renamed (tinyllama.atomic): a kill leaves a
unit either done or not started. The merge (prepare) reads the parts in unit order, so the final shards do
not depend on which task or machine tokenized which unit, or when.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from tinyllama.atomic import atomic_file
from tinyllama.errors import UserError
from tinyllama.formats.shards import packed_dtype
from tinyllama.formats.tokenizer import Tokenizer
from tinyllama.paths import check_disk_space

from .encoding import encode_packed
from .sources import ReadStats, SourceError
from .units import Unit, unit_documents

PLAN_VERSION = 2


def work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.prepare"


@dataclass
class Plan:
    """What a prepare run does; stored in plan.json and read back by every task and by a resume."""
    settings: dict              # the arguments that decide the output (source, out, shard size, ...)
    code_dir: bool
    units: list[Unit]
    inputs: dict[str, list[int]]

    def save(self, work: Path) -> None:
        data = {"version": PLAN_VERSION, **asdict(self), "units": [u.to_json() for u in self.units]}
        _write_atomic(work / "plan.json", (json.dumps(data, indent=1) + "\n").encode())

    @classmethod
    def load(cls, work: Path) -> "Plan | None":
        try:
            data = json.loads((work / "plan.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if data.get("version") != PLAN_VERSION:
            return None
        return cls(data["settings"], data["code_dir"], [Unit.from_json(u) for u in data["units"]], data["inputs"])

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.settings["tokenizer_info"]["fingerprint"]


# ---- one unit ------------------------------------------------------------------------------

def part_path(work: Path, index: int, ext: str) -> Path:
    return work / "parts" / f"u-{index:06d}.{ext}"


def is_done(work: Path, index: int) -> bool:
    return part_path(work, index, "json").exists()


def done_units(work: Path) -> set[int]:
    return {int(p.name[2:8]) for p in (work / "parts").glob("u-*.json")} if (work / "parts").is_dir() else set()


def read_part(work: Path, index: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(tokens uint16 or uint32, document lengths uint32, counts) of a finished unit."""
    info = json.loads(part_path(work, index, "json").read_text())
    tokens = np.fromfile(part_path(work, index, "tok"), dtype=np.dtype(info.get("dtype", "uint16")).newbyteorder("<"))
    lengths = np.fromfile(part_path(work, index, "len"), dtype="<u4")
    if len(tokens) != info["tokens"] or len(lengths) != info["documents"]:
        raise UserError(f"{part_path(work, index, 'tok')}: damaged ({len(tokens)} tokens, {len(lengths)} documents; "
                        f"its .json says {info['tokens']} and {info['documents']}); delete {work} and run again")
    return tokens, lengths, info


def tokenize_unit(work: Path, plan: Plan, index: int, tok: Tokenizer, *, chunk_docs: int = 256,
                  chunk_chars: int = 1 << 18) -> dict:
    """Tokenizes unit `index` into its part files; returns its counts."""
    s = plan.settings
    stats = ReadStats()
    docs = unit_documents(plan.units[index], text_field=s["text_field"], stats=stats, skip_bad=s["skip_bad"],
                          code_dir=plan.code_dir)
    tok_path = part_path(work, index, "tok")
    tok_path.parent.mkdir(parents=True, exist_ok=True)
    documents = tokens = 0
    with atomic_file(tok_path) as tmp_tok, atomic_file(part_path(work, index, "len")) as tmp_len, \
            open(tmp_tok, "wb") as ft, open(tmp_len, "wb") as fl:
        for texts in _chunks(docs, chunk_docs, chunk_chars):
            ids, lengths = encode_packed(tok, texts, eos=True)          # BOS where the model adds one
            check_disk_space(tok_path, ids.nbytes + lengths.nbytes)
            ft.write(ids.tobytes())
            fl.write(lengths.astype("<u4").tobytes())
            documents += len(lengths)
            tokens += len(ids)
    info = {"unit": index, "documents": documents, "tokens": tokens, "dtype": packed_dtype(tok.vocab_size).name,
            "stats": asdict(stats)}
    _write_atomic(part_path(work, index, "json"), (json.dumps(info) + "\n").encode())
    return info


def run_units(work: Path, plan: Plan, indices: Iterator[int], tok: Tokenizer, *, remote_retries: int = 5,
              chunk_docs: int = 256, chunk_chars: int = 1 << 18) -> int:
    """Tokenizes the given units that are not done yet; returns how many it did. Bad input
    is recorded as the unit's .error (the run stops there); a remote unit that fails for any
    other reason (network) is retried from its start, with backoff."""
    done = 0
    for i in indices:
        if is_done(work, i):
            continue
        if any_error(work):
            break                     # another task hit bad input: the run will stop with it
        remote = any("://" in s.path for s in plan.units[i].segments)
        for attempt in range(remote_retries + 1 if remote else 1):
            try:
                tokenize_unit(work, plan, i, tok, chunk_docs=chunk_docs, chunk_chars=chunk_chars)
                break
            except UserError as e:
                if getattr(e, "resumable", False):
                    raise
                _write_atomic(part_path(work, i, "error"), (json.dumps({"unit": i, "message": str(e)}) + "\n").encode())
                return done
            except Exception as e:
                if attempt == remote_retries or not remote:
                    raise
                wait = min(60.0, 2.0 ** attempt)
                print(f"{plan.units[i].describe()}: {type(e).__name__}: {e}; retrying in {wait:.0f} s "
                      f"({attempt + 1}/{remote_retries})", file=sys.stderr)
                time.sleep(wait)
        done += 1
    return done


def any_error(work: Path) -> bool:
    return any((work / "parts").glob("u-*.error"))


def first_error(work: Path) -> SourceError | None:
    """The bad-input error of the lowest-numbered failed unit (the first in reading order)."""
    errors = sorted((work / "parts").glob("u-*.error"))
    return SourceError(json.loads(errors[0].read_text())["message"]) if errors else None


def clear_errors(work: Path) -> None:
    for p in (work / "parts").glob("u-*.error"):
        p.unlink(missing_ok=True)


def remove(work: Path) -> None:
    """Removes a work folder all at once (renamed first: a kill mid-way cannot leave parts
    without their plan)."""
    if not work.exists():
        return
    gone = work.with_name(f"{work.name}.removing-{os.getpid()}")
    os.replace(work, gone)
    shutil.rmtree(gone, ignore_errors=True)


# ---- helpers -------------------------------------------------------------------------------

def _chunks(docs, max_docs: int, max_chars: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for d in docs:
        chunk.append(d.text)
        size += len(d.text)
        if len(chunk) >= max_docs or size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    check_disk_space(path, len(data))
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def progress_bar(enabled: bool, desc: str, total: int, unit: str):
    """prepare's bars (units tokenized, units merged), on stderr; None when not enabled."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(desc=desc, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
