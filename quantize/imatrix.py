"""Importance matrices: which weights matter, measured by llama.cpp's `llama-imatrix` on
calibration text, so that low-bit types spend their precision there (and i-quants below 4 bits
work at all).

    calibration, held_out, note = texts(None, tok)          # the data pipeline's validation shards
    mat = compute_imatrix(f32_gguf, calibration, Path("out/gguf/m.imatrix"), model_key(d), chunks=64, ctx=512)

The output projection is measured too (`--process-output`, off in llama.cpp by default): in a
small model it holds a large share of the weights (85% with the embeddings in the 19M CPU default;
measured there, it is what makes the matrix lower Q4_K_M's and IQ4_XS's KL divergence).

The matrix is saved next to the GGUFs with a small JSON record of what it was computed from (the
model's weights, the text, chunks, context); the same request reuses it instead of recomputing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from tinyllama.atomic import atomic_file
from tinyllama.errors import NotFound, UserError
from tinyllama.formats.tokenizer import Tokenizer

DEFAULT_SHARDS = ("data/tokens/natural", "data/tokens/code")     # what `make data` writes


class QuantizeError(UserError):
    """Bad input to imatrix, quality or size-budget work; the message names it."""


def texts(calibration: str | Path | None, tok: Tokenizer, shards=DEFAULT_SHARDS,
          max_tokens: int = 200_000) -> tuple[str, str, str]:
    """(text for the importance matrix, held-out text for quality, where each came from). The
    data pipeline's validation shards, decoded back to text, are split by document: every other
    document calibrates, the rest are held out. `calibration` (a UTF-8 file) replaces the
    calibrating half; without shards it is both (and the note says so)."""
    given = _read_calibration(calibration) if calibration is not None else None
    docs = _validation_documents(tok, shards, max_tokens)
    if docs and len(docs) >= 2:
        held = "\n\n".join(docs[1::2])
        if given is not None:
            return given, held, f"importance matrix: {calibration}; quality: every other validation document"
        return "\n\n".join(docs[::2]), held, "importance matrix and quality: alternate validation documents"
    if given is not None:
        return given, given, f"importance matrix and quality: {calibration} (no validation shards to hold out)"
    raise QuantizeError("no calibration text: give --calibration FILE (plain text), or build the validation "
                        f"shards ({', '.join(shards)}) with `make data`")


def _read_calibration(calibration: str | Path) -> str:
    path = Path(calibration)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFound(f"--calibration {path}: no such file") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise QuantizeError(f"--calibration {path}: not a UTF-8 text file ({e})") from None
    if not text.strip():
        raise QuantizeError(f"--calibration {path}: the file is empty")
    return text


def _validation_documents(tok: Tokenizer, shards, max_tokens: int) -> list[str]:
    from tinyllama.formats.shards import PackedSource, ShardError

    docs: list[str] = []
    for d in shards:
        if not (Path(d) / "manifest.json").is_file():
            continue
        try:
            src = PackedSource(d, split="validation")
        except ShardError:
            continue
        docs += _split_documents(src.read(0, min(src.tokens, max_tokens)).tolist(), tok)
    return docs


def _split_documents(ids: list[int], tok: Tokenizer) -> list[str]:
    docs, start = [], 0
    for i, t in enumerate(ids + [tok.eos_id]):
        if t in (tok.eos_id, tok.bos_id):
            text = tok.decode(ids[start:i]).strip()
            if text:
                docs.append(text)
            start = i + 1
    return docs


def model_key(model_dir: Path) -> str:
    """Names the weights cheaply: config.json's bytes and each safetensors file's size and mtime."""
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def compute_imatrix(f32_gguf: Path, text: str, out: Path, key: str, chunks: int = 64, ctx: int = 512,
                    threads: int | None = None) -> Path:
    """llama-imatrix over `text` (at most `chunks` chunks of `ctx` tokens), written to `out`
    atomically; reused when `out` was computed from the same weights, text, chunks and ctx."""
    from tinyllama.llamacpp.tools import tool

    record = {"model": key, "text_sha256": hashlib.sha256(text.encode()).hexdigest(), "chunks": chunks, "ctx": ctx}
    meta = out.with_name(out.name + ".json")
    if out.is_file() and meta.is_file() and json.loads(meta.read_text()) == record:
        print(f"reusing the importance matrix {out} (same weights, text, chunks and context)")
        return out
    with text_file(text, out.parent) as txt, atomic_file(out) as tmp:
        cmd = [str(tool("llama-imatrix")), "-m", str(f32_gguf), "-f", str(txt), "-o", str(tmp),
               "--output-format", "gguf", "--chunks", str(chunks), "-c", str(ctx),
               "-t", str(threads or os.cpu_count() or 1), "--no-ppl", "--process-output"]
        run_tool(cmd, "importance matrix", total=chunks)
    meta.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return out


@contextlib.contextmanager
def text_file(text: str, where: Path) -> Iterator[Path]:
    """`text` in a temporary UTF-8 file in `where` (what llama.cpp's tools read), removed after."""
    fd, name = tempfile.mkstemp(prefix=".calibration-", suffix=".txt", dir=where)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    try:
        yield Path(name)
    finally:
        os.unlink(name)


def run_tool(cmd: list[str], what: str, total: int | None = None, expect: str | None = None) -> str:
    """Runs a llama.cpp tool, a progress bar over its "[N]" chunk markers; returns its output.
    A failure is a QuantizeError with the end of the tool's log. `expect`: a pattern the output's
    closing report holds; a run that exits 0 without it lost its log at exit and runs again
    (tinyllama.llamacpp.tools.LOST_LOG_ATTEMPTS)."""
    from tinyllama.llamacpp.tools import LOST_LOG_ATTEMPTS

    for attempt in range(1, LOST_LOG_ATTEMPTS + 1):
        output = _run_tool_once(cmd, what, total)
        if expect is None or re.search(expect, output) or attempt == LOST_LOG_ATTEMPTS:
            return output
    raise AssertionError("unreachable")


def _run_tool_once(cmd: list[str], what: str, total: int | None) -> str:
    from tqdm import tqdm

    bar = tqdm(total=total, desc=what, unit="chunk", file=sys.stderr, disable=total is None)
    lines = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    for line in proc.stdout:
        lines.append(line)
        done = [int(n) for n in re.findall(r"\[(\d+)\]", line)]
        if done and max(done) > bar.n:
            bar.update(min(max(done), total or 0) - bar.n)
        m = re.search(r"computing over (\d+) chunks", line)
        if m and total and int(m[1]) < total:
            bar.total = int(m[1])
            bar.refresh()
    rc = proc.wait()
    bar.close()
    output = "".join(lines)
    if rc != 0:
        raise QuantizeError(f"{Path(cmd[0]).name} failed (exit {rc}); the end of its output:\n"
                            + "".join(lines[-12:]).rstrip())
    return output
