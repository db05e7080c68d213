"""Data preparation: our `prepare` vs a TinyLlama-style loop, same corpus, one run;
the tokenizers alone; and prepare killed at random moments, then resumed.

    python -m bench.data_prep [--corpus data] [--workers N] [--large-mb 40] [--kills 3] [--json]

The reference is what TinyLlama's `scripts/prepare_slimpajama.py` does per document: a
SentencePiece `encode` (the same Llama-2 vocabulary, as `tokenizer.model`), append BOS/EOS,
`np.array(..., dtype=uint16)`, and accumulate into fixed-size chunks, in one process (its
multiprocessing runs one such process per core on disjoint files, so its rate per core is this
one). Both read the same documents and must produce the same token stream. Rates per core:
ours with one worker (the whole pipeline in one process: reading, tokenizing, writing the
parts, the merge) against the reference; ours with every core is shown beside it. Two corpora:
- the default corpus (natural.jsonl + the stdlib's .py files, ~8M tokens): mostly cold caches;
- a larger one closer to real use: the first N MB of .py files of the installed packages
  (site-packages, sorted walk), written to one JSONL first.
The projection divides TinyLlama's corpus (SlimPajama without GitHub + Starcoderdata, ~950B
Llama-2 tokens, per the paper) by the per-core rate times 64 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

from prepare.corpus import STDLIB_EXCLUDE, write_natural
from prepare.encoding import piece_encoder
from prepare.prepare import PrepareConfig, prepare
from prepare.units import read_documents
from tinyllama.measure import cpu_identity
from tinyllama.paths import llama2_dir

from . import markdown_table

ROOT = Path(__file__).resolve().parents[1]
TINYLLAMA_TOKENS = 950e9          # SlimPajama w/o GitHub + Starcoderdata, Llama-2 tokens (arXiv 2401.02385)
PROJECTION_CORES = 64


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


def _hours(tokens_per_s_per_core: float) -> str:
    return f"{TINYLLAMA_TOKENS / (tokens_per_s_per_core * PROJECTION_CORES) / 3600:.1f} h"


def throughput_row(label: str, srcs: list[tuple[str, dict]], workers: int) -> dict:
    n_ref, t_ref, s_ref = reference(srcs)
    n_one, t_one, s_one = ours(srcs, 1)
    n_all, t_all, s_all = ours(srcs, workers)
    return {"corpus": label, "tokens": n_one, "same_tokens": bool(np.array_equal(s_ref, s_one)
                                                                   and np.array_equal(s_one, s_all)),
            "ours_per_core": n_one / t_one, "ours_all": n_all / t_all, "workers": workers, "ref_per_core": n_ref / t_ref}


def tokenizer_rows(srcs: list[tuple[str, dict]]) -> list[dict]:
    """The encoders alone on the same texts, one core, cold caches: our packed piece encoder
    (C, and its Python twin), the Rust `tokenizers` batch encoder (one thread), SentencePiece.
    (Ours counts the BOS of each text; the others do not: a 0.02% difference here.)"""
    import sentencepiece as spm

    from prepare.pieces import PieceEncoder
    from tinyllama.formats.tokenizer import Tokenizer

    texts = [d.text for src, kw in srcs for d in read_documents(src, **kw)]
    tok = Tokenizer.llama2()
    sp = spm.SentencePieceProcessor(model_file=str(llama2_dir() / "tokenizer.model"))
    batches = [texts[i:i + 256] for i in range(0, len(texts), 256)]       # as prepare hands them over
    encoders = [("ours, Python: regex splitter, dict of pieces, Rust BPE (TINYLLAMA_NATIVE=0)",
                 PieceEncoder(piece_encoder(tok).rules, tok.backend, native="off"))]
    if piece_encoder(tok).native:
        encoders.insert(0, ("ours, native: splitter, BPE and piece cache in C (prepare.encoding.encode_packed)",
                            piece_encoder(tok)))
    for _, enc in encoders:
        enc.clear()                  # cold: each runs once, from an empty piece cache
    runs = [(name, lambda e=e: sum(len(e.encode_packed(b, [1], [])[0]) for b in batches)) for name, e in encoders]
    runs += [("Rust tokenizers: Tokenizer.encode_batch, 1 thread",
              lambda: sum(len(e.ids) for e in tok.backend.encode_batch(texts, add_special_tokens=False))),
             ("SentencePiece: encode per document", lambda: sum(len(sp.encode(t)) for t in texts))]
    rows = []
    for name, fn in runs:
        t0 = time.perf_counter()
        n = fn()
        rows.append({"encoder": name, "tokens": n, "tokens_per_s": n / (time.perf_counter() - t0)})
    return rows


# ---- killed and resumed -----------------------------------------------------------------------

def _cli(src: Path, out: Path, workers: int, unit_mb: float) -> list[str]:
    return [sys.executable, "-m", "prepare", str(src), "--out", str(out), "--workers", str(workers),
            "--unit-mb", str(unit_mb), "--shard-tokens", "65536", "--val-fraction", "0.01", "--no-progress"]


def kill_and_resume(src: Path, root: Path, kills: int = 3, workers: int = 2, unit_mb: float = 0.25,
                    seed: int = 0) -> dict:
    """An uninterrupted run, then the same command SIGKILLed `kills` times at random moments
    (the whole process group, as a lost machine) and run once more to the end. After every
    kill, what is under the final name must be complete or absent. Returns what happened."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    subprocess.run(_cli(src, root / "ref", workers, unit_mb), check=True, cwd=ROOT, env=env, capture_output=True)
    full = time.perf_counter() - t0
    rng, out = random.Random(seed), root / "out"
    done_at_kill, t_killed = [], time.perf_counter()
    while len(done_at_kill) < kills:
        p = subprocess.Popen(_cli(src, out, workers, unit_mb), cwd=ROOT, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.25 * full, full))      # before that, mostly interpreter start-up
        if p.poll() is not None:
            shutil.rmtree(out)                    # it finished first: start this kill over
            continue
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        if out.exists() and not (out / "manifest.json").exists():
            raise AssertionError(f"{out}: incomplete output under the final name after a kill")
        parts = root / f".{out.name}.prepare" / "parts"
        done_at_kill.append(len(list(parts.glob("u-*.json"))) if parts.exists() else 0)
    r = subprocess.run(_cli(src, out, workers, unit_mb), cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"the resumed run failed: {r.stderr[-2000:]}")
    identical = sorted(p.name for p in (root / "ref").iterdir()) == sorted(p.name for p in out.iterdir()) and all(
        (root / "ref" / p.name).read_bytes() == p.read_bytes() for p in out.iterdir() if p.name != "manifest.json")
    mr, mo = (json.loads((d / "manifest.json").read_text()) for d in (root / "ref", out))
    mr["name"] = mo["name"]
    return {"kills": kills, "units_done_at_each_kill": done_at_kill, "resumed_message": "resuming" in r.stderr,
            "identical": identical and mr == mo, "seconds_uninterrupted": full,
            "seconds_killed_and_resumed": time.perf_counter() - t_killed}


def synthetic_corpus(path: Path, mb: float, seed: int = 0) -> Path:
    """Random documents over a small mixed prose/code vocabulary (about `mb` MB)."""
    words = ("the quick brown fox jumps over lazy dogs while naïve 東京 coders write def f(x): return x + 1 "
             "and some_identifier.attribute[42] = {'key': value} # comment").split()
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        i = written = 0
        while written < mb * 1e6:
            line = json.dumps({"text": f"doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(50, 250)))})
            fh.write(line + "\n")
            written += len(line) + 1
            i += 1
    return path


# ---- the tables -----------------------------------------------------------------------------------

def run(corpus: Path = Path("data"), workers: int | None = None, large_mb: int = 40, kills: int = 3,
        kill_mb: float = 40, as_json: bool = False) -> str:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"        # one thread: every figure is per core
    workers = workers or os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp())
    try:
        corpora = [("default corpus (natural + stdlib)", sources(corpus))]
        if large_mb > 0:
            corpora.append((f"installed packages' code ({large_mb} MB)",
                            [(str(large_code_corpus(tmp / "site-packages.jsonl", large_mb)), {})]))
        rows = [throughput_row(label, srcs, workers) for label, srcs in corpora]
        enc = tokenizer_rows(corpora[0][1])
        killed = None
        if kills > 0:
            (tmp / "k").mkdir()
            killed = kill_and_resume(synthetic_corpus(tmp / "synthetic.jsonl", kill_mb), tmp / "k", kills, workers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if as_json:
        return json.dumps({"cpu": cpu_identity().describe(), "throughput": rows, "encoders": enc,
                           "kill_and_resume": killed}, indent=2)
    return render(rows, enc, killed)


def render(rows: list[dict], enc: list[dict], killed: dict | None) -> str:
    head = ("benchmark", "ours, 1 worker (per core)", "ours, all workers", "TinyLlama-style (per core)",
            "ours vs ref, per core", "950B tokens on 64 cores: ours / ref")
    table = [(f"{r['corpus']}: {r['tokens'] / 1e6:.1f}M tokens, {'same tokens' if r['same_tokens'] else 'TOKENS DIFFER'}",
              f"{r['ours_per_core']:,.0f} tok/s", f"{r['ours_all']:,.0f} tok/s ({r['workers']} workers)",
              f"{r['ref_per_core']:,.0f} tok/s", f"{r['ours_per_core'] / r['ref_per_core']:.2f}x",
              f"{_hours(r['ours_per_core'])} / {_hours(r['ref_per_core'])}") for r in rows]
    out = [f"CPU: {cpu_identity().describe()}", "", markdown_table(head, table), "",
           "Encoders alone, same texts (default corpus), one core, cold caches:", "",
           markdown_table(("encoder", "tokens/s per core"), [(e["encoder"], f"{e['tokens_per_s']:,.0f}") for e in enc])]
    if killed:
        k = killed
        out += ["", f"Killed and resumed (`kill_and_resume`): {k['kills']} SIGKILLs of the whole process group at "
                f"random moments, then the same command to the end", "",
                markdown_table(("what", "result"), [
                    ("units finished when each kill landed", ", ".join(map(str, k["units_done_at_each_kill"]))),
                    ("final output vs uninterrupted run", "byte-identical" if k["identical"] else "DIFFERENT"),
                    ("the resumed run said it resumed", "yes" if k["resumed_message"] else "no"),
                    ("wall time, uninterrupted vs killed-and-resumed",
                     f"{k['seconds_uninterrupted']:.1f} s vs {k['seconds_killed_and_resumed']:.1f} s")])]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("data"))
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--large-mb", type=int, default=40, help="size of the larger code corpus (0: skip it)")
    ap.add_argument("--kills", type=int, default=3, help="SIGKILLs in the resume check (0: skip it)")
    ap.add_argument("--kill-mb", type=float, default=40, help="size of the resume check's corpus, MB")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    print(run(args.corpus, args.workers, args.large_mb, args.kills, args.kill_mb, args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
