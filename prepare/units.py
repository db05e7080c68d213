"""Units of work for `prepare`: the source cut into pieces that tokenize independently.

    units = plan_units(source, unit_bytes=64 << 20, extensions=(".py",))
    for doc in unit_documents(units[3], text_field=None, stats=stats, skip_bad=False, code_dir=True): ...

A unit is a list of segments, each a whole file or, for an uncompressed `.jsonl`, a byte
range that starts and ends at line boundaries (with the number of its first line, so that
errors still name `file:line`). Units come in reading order: concatenating their documents
gives exactly the documents `read_documents(source)` yields. That is what makes the output of
prepare independent of how many tasks, processes or machines tokenized the units.

- a local file: one unit, or byte ranges of `unit_bytes` for a large `.jsonl`;
- a local directory: consecutive files grouped until a unit holds `unit_bytes`;
- a Hugging Face dataset name: one unit per data file of the split (SlimPajama's
  `chunk*/example_train_*.jsonl.zst`, Starcoderdata's parquet files), read over `hf://`
  with fsspec: a shard is the unit a resumed run restarts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .sources import (
    CODE_EXTENSIONS,
    TEXT_EXTENSIONS,
    Document,
    ReadStats,
    SourceError,
    looks_like_local_path,
    read_file,
    walk_files,
)


@dataclass(frozen=True)
class Segment:
    path: str                   # a local path or an fsspec URL (hf://datasets/...)
    start: int = 0              # byte range [start, end) of a .jsonl; end None: to the end
    end: int | None = None
    first_line: int = 1         # line number of the byte at `start`

    def to_json(self) -> list:
        return [self.path, self.start, self.end, self.first_line]

    @classmethod
    def from_json(cls, v: list) -> "Segment":
        return cls(*v)


@dataclass(frozen=True)
class Unit:
    segments: tuple[Segment, ...]
    bytes: int                  # input bytes (0 where unknown: remote files)

    def to_json(self) -> dict:
        return {"segments": [s.to_json() for s in self.segments], "bytes": self.bytes}

    @classmethod
    def from_json(cls, v: dict) -> "Unit":
        return cls(tuple(Segment.from_json(s) for s in v["segments"]), v["bytes"])

    def describe(self) -> str:
        first = self.segments[0]
        where = f"{first.path}:{first.first_line}" if first.start else first.path
        return where + (f" (+{len(self.segments) - 1} files)" if len(self.segments) > 1 else "")


# ---- planning ------------------------------------------------------------------------------

def plan_units(source: str, *, unit_bytes: int | None = None, parallelism: int = 1,
               extensions: tuple[str, ...] | None = None, exclude: tuple[str, ...] = (),
               split: str = "train") -> tuple[list[Unit], bool]:
    """The source's units in reading order, and whether it is a code directory (its
    non-UTF-8 files are skipped rather than repaired). unit_bytes None: about 4 units per
    process (`parallelism`), between 1 and 64 MiB each."""
    path = Path(source)
    if path.is_dir():
        exts = extensions or (".jsonl", ".jsonl.zst", ".parquet") + TEXT_EXTENSIONS + CODE_EXTENSIONS
        files = walk_files(path, tuple(exts), exclude)
        if not files:
            raise SourceError(f"{path}: no files with extension {', '.join(exts)}")
        return _group(files, unit_bytes or auto_unit_bytes(files, parallelism)), True
    if path.exists():
        return _group([str(path)], unit_bytes or auto_unit_bytes([str(path)], parallelism)), False
    if looks_like_local_path(str(source)):
        raise SourceError(f"{source}: no such file or directory")
    return [Unit((Segment(url),), 0) for url in hub_data_files(str(source), split)], False


def auto_unit_bytes(files: list[str], parallelism: int) -> int:
    total = sum(os.path.getsize(f) for f in files)
    return int(min(64 << 20, max(1 << 20, total // (4 * max(1, parallelism)))))


def _group(files: list[str], unit_bytes: int) -> list[Unit]:
    """Consecutive files up to `unit_bytes` per unit; a large .jsonl alone, in line-aligned ranges."""
    units: list[Unit] = []
    group: list[Segment] = []
    size = 0
    for f in files:
        n = os.path.getsize(f)
        if f.endswith(".jsonl") and n > unit_bytes:
            if group:
                units.append(Unit(tuple(group), size))
                group, size = [], 0
            units += [Unit((seg,), (seg.end or n) - seg.start) for seg in jsonl_ranges(f, n, unit_bytes)]
            continue
        group.append(Segment(f))
        size += n
        if size >= unit_bytes:
            units.append(Unit(tuple(group), size))
            group, size = [], 0
    if group:
        units.append(Unit(tuple(group), size))
    return units


def jsonl_ranges(path: str | Path, size: int, unit_bytes: int) -> list[Segment]:
    """[start, end) ranges of about unit_bytes each, cut just after a newline, with the line
    number each starts at (newlines counted once, at memory speed)."""
    segments, start, line = [], 0, 1
    with open(path, "rb") as fh:
        while True:
            target = start + unit_bytes
            if target >= size:
                segments.append(Segment(str(path), start, None, line))
                return segments
            fh.seek(start)
            body = fh.read(target - start)
            rest = fh.readline()                  # the rest of the line the cut falls in
            end = target + len(rest)
            segments.append(Segment(str(path), start, end if end < size else None, line))
            if end >= size:
                return segments
            line += body.count(b"\n") + rest.count(b"\n")
            start = end


def hub_data_files(name: str, split: str) -> list[str]:
    """The data files of a Hugging Face dataset's split, as pinned hf:// URLs, in order
    (what `datasets` would stream), each one unit."""
    try:
        import datasets
    except ImportError:
        raise SourceError(f"{name}: reading a Hugging Face dataset needs the datasets package "
                          "(pip install datasets)") from None
    try:
        builder = datasets.load_dataset_builder(name)
        files = builder.config.data_files
    except Exception as e:
        raise SourceError(f"{name}: cannot open Hugging Face dataset ({type(e).__name__}: {e}); "
                          "offline, pass local files instead") from None
    if not files or split not in files:
        raise SourceError(f"{name}: no split {split!r} (splits: {', '.join(files or {}) or 'none'})")
    return [str(f) for f in files[split]]


def input_signature(units: list[Unit]) -> dict[str, list[int]]:
    """Size and modification time of every local input file: a resumed run checks them."""
    sig: dict[str, list[int]] = {}
    for u in units:
        for s in u.segments:
            if "://" not in s.path and s.path not in sig:
                st = os.stat(s.path)
                sig[s.path] = [st.st_size, st.st_mtime_ns]
    return sig


# ---- reading -------------------------------------------------------------------------------

def unit_documents(unit: Unit, *, text_field: str | None, stats: ReadStats, skip_bad: bool,
                   code_dir: bool) -> Iterator[Document]:
    """The unit's documents, in order."""
    for seg in unit.segments:
        stats.files += 1
        yield from read_file(seg.path, text_field, stats, skip_bad, in_code_dir=code_dir,
                             start=seg.start, end=seg.end, first_line=seg.first_line)


def read_documents(source: str | os.PathLike, *, text_field: str | None = None, extensions: tuple[str, ...] | None = None,
                   stats: ReadStats | None = None, skip_bad: bool = False, split: str = "train",
                   exclude: tuple[str, ...] = ()) -> Iterator[Document]:
    """Yields the documents of one source in a deterministic order: the documents of its
    units, one after the other."""
    stats = stats if stats is not None else ReadStats()
    units, code_dir = plan_units(str(source), unit_bytes=1 << 62, extensions=extensions, exclude=exclude, split=split)
    for unit in units:
        yield from unit_documents(unit, text_field=text_field, stats=stats, skip_bad=skip_bad, code_dir=code_dir)
