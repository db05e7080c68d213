"""Document readers: every input `python -m prepare` accepts, as one stream of texts.

    for doc in read_file("data/raw/natural.jsonl", "text", stats, skip_bad=False, in_code_dir=False):
        doc.text, doc.origin          # origin is "file:line" (or "file:row N") for messages
    (prepare.units.read_documents: every document of a source: a file, a folder, a hub dataset)

Inputs: local `.jsonl`, `.jsonl.zst`, `.parquet`, `.txt` files, directories (walked in sorted
order; files selected by extension), or a Hugging Face dataset name (its data files streamed
over `hf://`, one after the other). The order of documents is deterministic, so the shards
built from them are too.

Policies (documented in the README and counted in the manifest):
- empty or whitespace-only documents are skipped and counted;
- bytes that are not UTF-8 are replaced with U+FFFD and the document is counted as repaired
  (a directory of source code skips such files instead: they are rarely code);
- a malformed JSONL line, a row without the text field, a truncated `.zst`: stop with an
  error naming the file and line, unless `skip_bad=True`, which skips and counts them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tinyllama.errors import UserError

CODE_EXTENSIONS = (".py", ".c", ".h", ".cpp", ".hpp", ".cc", ".js", ".ts", ".java", ".go", ".rs", ".rb", ".sh",
                   ".lua", ".php", ".swift", ".kt", ".scala", ".sql", ".md", ".rst", ".toml", ".yaml", ".yml")
TEXT_EXTENSIONS = (".txt", ".rst", ".md")
# Starcoderdata / The Stack style schemas put text in "content"; SlimPajama in "text".
TEXT_FIELD_CANDIDATES = ("text", "content")
SLIMPAJAMA_DROPPED_SET = "RedPajamaGithub"


class SourceError(UserError):
    """Bad input; the message names the file (and line or row) and the problem."""


@dataclass
class Document:
    text: str
    origin: str


@dataclass
class ReadStats:
    documents: int = 0
    empty_skipped: int = 0
    bad_skipped: int = 0
    repaired_utf8: int = 0
    files: int = 0
    filtered: int = 0          # e.g. SlimPajama's GitHub rows
    bad_examples: list[str] = field(default_factory=list)

    def bad(self, message: str, skip_bad: bool) -> None:
        if not skip_bad:
            raise SourceError(message)
        self.bad_skipped += 1
        if len(self.bad_examples) < 5:
            self.bad_examples.append(message)


def open_binary(path: str | os.PathLike):
    """A local file, or a remote one through fsspec (`hf://datasets/...`, `s3://...`)."""
    if "://" in str(path):
        import fsspec

        return fsspec.open(str(path), "rb").open()
    return open(path, "rb")


def _decode(data: bytes, origin: str, stats: ReadStats) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        stats.repaired_utf8 += 1
        return data.decode("utf-8", errors="replace")


def _emit(text: str, origin: str, stats: ReadStats) -> Iterator[Document]:
    if not text.strip():
        stats.empty_skipped += 1
        return
    stats.documents += 1
    yield Document(text, origin)


def _field_of(row: dict, text_field: str | None, origin: str) -> object:
    if text_field is not None:
        if text_field not in row:
            raise KeyError(f"{origin}: no field {text_field!r} (fields: {', '.join(sorted(map(str, row))) or 'none'})")
        return row[text_field]
    for name in TEXT_FIELD_CANDIDATES:
        if name in row:
            return row[name]
    raise KeyError(f"{origin}: no text field; tried {', '.join(TEXT_FIELD_CANDIDATES)} "
                   f"(fields: {', '.join(sorted(map(str, row))) or 'none'}); pass --text-field")


def _slimpajama_dropped(row: dict) -> bool:
    meta = row.get("meta")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            return False
    return isinstance(meta, dict) and meta.get("redpajama_set_name") == SLIMPAJAMA_DROPPED_SET


def _rows_to_documents(rows: Iterator[tuple[str, dict]], text_field: str | None, stats: ReadStats,
                       skip_bad: bool) -> Iterator[Document]:
    for origin, row in rows:
        if _slimpajama_dropped(row):
            stats.filtered += 1
            continue
        try:
            value = _field_of(row, text_field, origin)
        except KeyError as e:
            stats.bad(str(e.args[0]), skip_bad)
            continue
        if value is None:
            value = ""
        if not isinstance(value, str):
            stats.bad(f"{origin}: text field is a {type(value).__name__}, not a string", skip_bad)
            continue
        yield from _emit(value, origin, stats)


def _jsonl_rows(lines: Iterator[bytes], name: str, stats: ReadStats, skip_bad: bool,
                first_line: int = 1) -> Iterator[tuple[str, dict]]:
    for lineno, raw in enumerate(lines, first_line):
        if not raw.strip():
            continue
        origin = f"{name}:{lineno}"
        try:
            row = json.loads(_decode(raw, origin, stats))
        except json.JSONDecodeError as e:
            stats.bad(f"{origin}: malformed JSON ({e.msg} at column {e.colno})", skip_bad)
            continue
        if not isinstance(row, dict):
            stats.bad(f"{origin}: expected a JSON object per line, got {type(row).__name__}", skip_bad)
            continue
        yield origin, row


def read_jsonl_documents(path: str | Path, text_field: str | None, stats: ReadStats, skip_bad: bool,
                         start: int = 0, end: int | None = None, first_line: int = 1) -> Iterator[Document]:
    """The documents of a .jsonl (or .jsonl.zst); for a .jsonl, only the lines in bytes
    [start, end), which begin at line `first_line`."""
    if str(path).endswith(".zst"):
        yield from _read_jsonl_zst(path, text_field, stats, skip_bad)
        return
    with open_binary(path) as fh:
        rows = _jsonl_rows(_byte_range_lines(fh, start, end), str(path), stats, skip_bad, first_line)
        yield from _rows_to_documents(rows, text_field, stats, skip_bad)


def _byte_range_lines(fh, start: int, end: int | None) -> Iterator[bytes]:
    if start:
        fh.seek(start)
    if end is None:
        yield from fh
        return
    remaining = end - start
    for line in fh:
        yield line
        remaining -= len(line)
        if remaining <= 0:
            return


def _zst_lines(path: str | Path) -> Iterator[bytes]:
    """Lines of a (multi-frame) zstd file; a stream that ends inside a frame is an error."""
    try:
        import zstandard
    except ImportError:
        raise SourceError(f"{path}: reading .zst needs the zstandard package (pip install zstandard)") from None
    dctx = zstandard.ZstdDecompressor()
    dobj, in_frame, pending = dctx.decompressobj(), False, b""
    with open_binary(path) as fh:
        while chunk := fh.read(1 << 20):
            while chunk:
                try:
                    out = dobj.decompress(chunk)
                except zstandard.ZstdError as e:
                    raise SourceError(f"{path}: corrupt zstd stream ({e})") from None
                in_frame = not dobj.eof
                chunk = dobj.unused_data if dobj.eof else b""
                if dobj.eof:
                    dobj = dctx.decompressobj()
                *lines, pending = (pending + out).split(b"\n")
                yield from lines
    if in_frame:
        raise SourceError(f"{path}: truncated zstd stream (the file ends inside a frame)")
    if pending:
        yield pending


def _read_jsonl_zst(path: str | Path, text_field: str | None, stats: ReadStats, skip_bad: bool) -> Iterator[Document]:
    rows = _jsonl_rows(_zst_lines(path), str(path), stats, skip_bad)
    yield from _rows_to_documents(rows, text_field, stats, skip_bad)


def read_parquet(path: str | Path, text_field: str | None, stats: ReadStats, skip_bad: bool) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SourceError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(open_binary(path))
    except Exception as e:
        raise SourceError(f"{path}: not a readable parquet file ({e})") from None
    columns = pf.schema_arrow.names
    name = text_field or next((c for c in TEXT_FIELD_CANDIDATES if c in columns), None)
    if name is None or name not in columns:
        raise SourceError(f"{path}: no column {text_field or ' or '.join(TEXT_FIELD_CANDIDATES)!r} "
                          f"(columns: {', '.join(columns)}); pass --text-field")
    wanted = [name] + (["meta"] if "meta" in columns else [])
    row_no = 0
    for batch in pf.iter_batches(columns=wanted, batch_size=1024):
        data = batch.to_pydict()
        for i in range(batch.num_rows):
            row_no += 1
            yield from _rows_to_documents(iter([(f"{path}:row {row_no}", {k: data[k][i] for k in wanted})]),
                                          name, stats, skip_bad)


def read_text_file(path: str | Path, stats: ReadStats, skip_non_utf8: bool = False) -> Iterator[Document]:
    with open_binary(path) as fh:
        data = fh.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        if skip_non_utf8:
            stats.bad_skipped += 1
            return
        stats.repaired_utf8 += 1
        text = data.decode("utf-8", errors="replace")
    yield from _emit(text, str(path), stats)


def walk_files(root: Path, extensions: tuple[str, ...], exclude: tuple[str, ...] = ()) -> list[str]:
    """Files under root with one of the extensions, in sorted walk order; hidden folders,
    __pycache__ and any folder or file named in `exclude` are skipped."""
    out = []
    skip = set(exclude) | {"__pycache__"}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip)
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(extensions) and f not in skip]
    return out


def looks_like_local_path(s: str) -> bool:
    # HF dataset names are "name" or "owner/name"; anything else is meant as a local path.
    return s.startswith((".", "/", "~")) or s.count("/") > 1 or s.endswith((".jsonl", ".zst", ".parquet", ".txt"))


def read_file(f: str | Path, text_field: str | None, stats: ReadStats, skip_bad: bool, in_code_dir: bool,
              start: int = 0, end: int | None = None, first_line: int = 1) -> Iterator[Document]:
    """One input file's documents (a .jsonl's lines [start, end) only, when given)."""
    name = str(f).rsplit("/", 1)[-1]
    if name.endswith((".jsonl", ".jsonl.zst", ".json.zst")):
        yield from read_jsonl_documents(f, text_field, stats, skip_bad, start, end, first_line)
    elif name.endswith(".parquet"):
        yield from read_parquet(f, text_field, stats, skip_bad)
    else:
        yield from read_text_file(f, stats, skip_non_utf8=in_code_dir and not name.endswith(TEXT_EXTENSIONS))
