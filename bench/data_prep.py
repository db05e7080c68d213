"""Data preparation throughput: our `pretrain.prepare` vs a TinyLlama-style loop, same corpus,
same cores, one run.

    python -m bench.data_prep [--corpus data] [--workers N] [--large-mb 40]

The reference is what TinyLlama's `scripts/prepare_slimpajama.py` does per document: a
SentencePiece `encode` (the same Llama-2 vocabulary, as `tokenizer.model`), append BOS/EOS,
`np.array(..., dtype=uint16)`, and accumulate into fixed-size chunks, all in one process.
Both read the same documents and must produce the same token stream. Two corpora:
- the default corpus (natural.jsonl + the stdlib's .py files, ~5M tokens): mostly cold caches;
- a larger one closer to real use: the first N MB of .py files of the installed packages
  (site-packages, sorted walk), written to one JSONL first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

from pretrain.corpus import STDLIB_EXCLUDE, write_natural
from pretrain.prepare import PrepareConfig, prepare
from pretrain.sources import read_documents
from tinyllama.paths import llama2_dir

from . import markdown_table


def sources(corpus: Path) -> list[tuple[str, dict]]:
    natural = corpus / "raw" / "natural.jsonl"
    if not natural.exists():
        natural.parent.mkdir(parents=True, exist_ok=True)
        write_natural(natural)
    stdlib = sysconfig.get_paths()["stdlib"]
    return [(str(natural), {}), (stdlib, {"extensions": (".py",), "exclude": STDLIB_EXCLUDE})]


def large_code_corpus(out: Path, max_mb: int) -> Path:
    """The first `max_mb` MB of the installed packages' Python sources, as one JSONL file."""
    site = Path(sysconfig.get_paths()["purelib"])
    total = 0
    with open(out, "w", encoding="utf-8") as fh:
        for doc in read_documents(site, extensions=(".py",), exclude=("tests", "test")):
            fh.write(json.dumps({"text": doc.text}) + "\n")
            total += len(doc.text.encode())
            if total >= max_mb * 1e6:
                break
    return out


def reference(srcs: list[tuple[str, dict]], chunk_tokens: int = 1 << 24) -> tuple[int, float, np.ndarray]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(llama2_dir() / "tokenizer.model"))
    t0 = time.perf_counter()
    buf, chunks, total = [], [], 0
    for src, kw in srcs:
        for doc in read_documents(src, **kw):
            ids = np.array([1] + sp.encode(doc.text) + [2], dtype=np.uint16)
            buf.append(ids)
            total += len(ids)
            if sum(map(len, buf)) >= chunk_tokens:
                chunks.append(np.concatenate(buf))
                buf = []
    chunks.append(np.concatenate(buf))
    return total, time.perf_counter() - t0, np.concatenate(chunks)


def ours(srcs: list[tuple[str, dict]], workers: int) -> tuple[int, float, np.ndarray]:
    tmp = Path(tempfile.mkdtemp())
    try:
        t0 = time.perf_counter()
        total, streams = 0, []
        for i, (src, kw) in enumerate(srcs):
            m = prepare(PrepareConfig(source=src, out=tmp / str(i), workers=workers, val_fraction=0,
                                      progress=False, **kw))
            total += m["tokens"]
        elapsed = time.perf_counter() - t0
        for i in range(len(srcs)):
            streams += [np.fromfile(f, dtype="<u2") for f in sorted((tmp / str(i)).glob("train-*.bin"))]
        return total, elapsed, np.concatenate(streams)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _row(label: str, srcs: list[tuple[str, dict]], workers: int) -> tuple[str, str, str, str]:
    n_ref, t_ref, s_ref = reference(srcs)
    n_ours, t_ours, s_ours = ours(srcs, workers)
    same = "same tokens" if np.array_equal(s_ref, s_ours) else "TOKENS DIFFER"
    return (f"{label}: {n_ours / 1e6:.1f}M tokens, {same}", f"{n_ours / t_ours:,.0f} tok/s ({workers} workers)",
            f"{n_ref / t_ref:,.0f} tok/s (1 process)", f"{t_ref / t_ours:.2f}x")


def run(corpus: Path = Path("data"), workers: int | None = None, large_mb: int = 40) -> str:
    workers = workers or os.cpu_count() or 1
    rows = [_row("default corpus (natural + stdlib)", sources(corpus), workers)]
    if large_mb > 0:
        tmp = Path(tempfile.mkdtemp())
        try:
            big = large_code_corpus(tmp / "site-packages.jsonl", large_mb)
            rows.append(_row(f"installed packages' code ({large_mb} MB)", [(str(big), {})], workers))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    head = ("benchmark", "ours (pretrain.prepare)", "TinyLlama-style (SentencePiece per doc)", "ours vs ref")
    return markdown_table(head, rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("data"))
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--large-mb", type=int, default=40, help="size of the larger code corpus (0: skip it)")
    args = ap.parse_args(argv)
    print(run(args.corpus, args.workers, args.large_mb))
    return 0


if __name__ == "__main__":
    sys.exit(main())
