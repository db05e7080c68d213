"""Raw text or code -> packed uint16 token shards plus a manifest, for one source.

    python -m pretrain.prepare data/raw/natural.jsonl --out data/tokens/natural
    python -m pretrain.prepare /usr/lib/python3.11 --out data/tokens/code --extensions .py --exclude test tests
    python -m pretrain.prepare cerebras/SlimPajama-627B --out data/tokens/slimpajama   # online

Format (`tinyllama-packed-v1`), in the output directory:
  train-00000.bin ...       token ids, uint16 little-endian, `shard_tokens` per shard; the last
  validation-00000.bin ...  shard of a split holds what is left and is never padded
  manifest.json             tokenizer fingerprint, document/token counts, per-shard sha256 and
                            token count, the separator policy, what was skipped and why
Separator policy: every document is `BOS + tokens + EOS`, documents are concatenated, and
training blocks are cut from that stream regardless of document boundaries. No BOS padding,
ever (TinyLlama issue #83: padding the last chunk with BOS taught the model to emit `<s>`).
Validation split: document i (in reading order) is held out when i % P == P // 2, with
P = round(1 / val_fraction); deterministic and independent of the worker count.

Tokenization runs in worker processes (`--workers`), each encoding chunks of documents with the
Rust tokenizer's batch encoder; chunks come back in order, so the bytes written are identical
for any number of workers. The whole output directory is written under a temporary name and
renamed at the end: an interrupted run leaves nothing that looks complete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from tinyllama.atomic import atomic_dir
from tinyllama.errors import UserError, report
from tinyllama.tokenizer import Tokenizer

from .shards import FORMAT, ShardWriter
from .sources import Document, ReadStats, SourceError, read_documents

SEPARATOR_POLICY = ("each document is BOS + tokens + EOS; documents are concatenated; blocks are cut from the "
                    "stream regardless of document boundaries; the last shard is not padded")


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

    def validate(self) -> None:
        if self.shard_tokens < 1024:
            raise UserError(f"shard_tokens must be >= 1024, got {self.shard_tokens}")
        if not 0 <= self.val_fraction < 0.5:
            raise UserError(f"val_fraction must be in [0, 0.5), got {self.val_fraction}")
        if self.workers < 1:
            raise UserError(f"workers must be >= 1, got {self.workers}")


# ---- tokenization in worker processes -----------------------------------------------------

_worker_tok: Tokenizer | None = None


def _init_worker() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"   # one process per core; no nested threads


def _encode_chunk(texts: list[str]) -> list[np.ndarray]:
    assert _worker_tok is not None
    return [np.asarray(ids, dtype=np.uint16) for ids in _worker_tok.encode_batch(texts, bos=True, eos=True)]


def _chunks(docs: Iterator[Document], max_docs: int, max_chars: int) -> Iterator[list[str]]:
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


def _load_tokenizer(cfg: PrepareConfig) -> Tokenizer:
    tok = Tokenizer.from_dir(cfg.tokenizer_dir) if cfg.tokenizer_dir else Tokenizer.llama2()
    if tok.vocab_size > 65536:
        raise UserError(f"tokenizer has {tok.vocab_size} tokens; uint16 shards hold at most 65536")
    return tok


def prepare(cfg: PrepareConfig) -> dict:
    """Tokenizes one source into `cfg.out`; returns the manifest."""
    cfg.validate()
    tok = _load_tokenizer(cfg)
    out = Path(cfg.out)
    created = _make_parents(out)
    try:
        return _prepare(cfg, tok, out)
    except BaseException:
        for d in created:              # a failed run leaves no new (empty) folders behind either
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


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


def _prepare(cfg: PrepareConfig, tok: Tokenizer, out: Path) -> dict:
    name = cfg.name or out.name
    stats = ReadStats()
    period = max(2, round(1 / cfg.val_fraction)) if cfg.val_fraction > 0 else 0
    t0 = time.perf_counter()

    docs = read_documents(cfg.source, text_field=cfg.text_field, extensions=cfg.extensions, stats=stats,
                          skip_bad=cfg.skip_bad, split=cfg.split, exclude=cfg.exclude)
    with atomic_dir(out) as tmp:
        writers = {"train": ShardWriter(tmp, "train", cfg.shard_tokens),
                   "validation": ShardWriter(tmp, "validation", cfg.shard_tokens)}
        bar = _progress(cfg.progress, name)
        index = 0
        global _worker_tok
        _worker_tok = tok                # forked workers inherit it, already loaded
        pool = mp.get_context("fork").Pool(cfg.workers, _init_worker) if cfg.workers > 1 else None
        try:
            if pool is None:
                encoded = map(_encode_chunk, _chunks(docs, cfg.chunk_docs, cfg.chunk_chars))
            else:
                encoded = pool.imap(_encode_chunk, _chunks(docs, cfg.chunk_docs, cfg.chunk_chars))
            for chunk in encoded:
                for ids in chunk:
                    split = "validation" if period and index % period == period // 2 else "train"
                    writers[split].add(ids)
                    index += 1
                if bar is not None:
                    done = writers["train"].tokens + writers["validation"].tokens
                    bar.update(len(chunk))
                    bar.set_postfix_str(f"{done / 1e6:.2f}M tokens, {done / (time.perf_counter() - t0) / 1e3:.0f}k tok/s")
        finally:
            if pool is not None:
                pool.terminate()
            if bar is not None:
                bar.close()
        if index == 0:
            raise SourceError(f"{cfg.source}: no documents (empty skipped: {stats.empty_skipped}, "
                              f"bad skipped: {stats.bad_skipped})")
        splits = {k: w.close() for k, w in writers.items()}
        manifest = {
            "format": FORMAT,
            "name": name,
            "source": str(cfg.source),
            "dtype": "uint16",
            "tokenizer": {"fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                          "eos_id": tok.eos_id, "source": tok.source},
            "separator_policy": SEPARATOR_POLICY,
            "val_fraction": cfg.val_fraction,
            "shard_tokens": cfg.shard_tokens,
            "documents": index,
            "tokens": sum(s["tokens"] for s in splits.values()),
            "splits": splits,
            "skipped": {"empty": stats.empty_skipped, "bad": stats.bad_skipped, "filtered": stats.filtered,
                        "repaired_utf8": stats.repaired_utf8, "examples": stats.bad_examples},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    manifest["seconds"] = time.perf_counter() - t0
    return manifest


def _progress(enabled: bool, name: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(desc=f"prepare {name}", unit=" docs", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)


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
    ap = argparse.ArgumentParser(prog="python -m pretrain.prepare", description=__doc__,
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
    args = ap.parse_args(argv)
    exts = tuple(e if e.startswith(".") else "." + e for e in args.extensions) if args.extensions else None
    cfg = PrepareConfig(source=args.source, out=args.out, name=args.name, text_field=args.text_field, extensions=exts,
                        exclude=tuple(args.exclude), tokenizer_dir=args.tokenizer, workers=args.workers,
                        shard_tokens=args.shard_tokens, val_fraction=args.val_fraction, skip_bad=args.skip_bad,
                        split=args.split, progress=not args.no_progress)
    try:
        manifest = prepare(cfg)
    except UserError as e:
        return report(e)
    print(summary_table([manifest]))
    print(f"wrote {cfg.out}/manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
