"""The last step of `prepare`: every unit's tokens, in unit order, into one
`tinyllama-packed-v1` source (fixed-size shards per split, and the manifest).

Document i of the whole source (counted across units, in reading order) goes to the validation
split when i % P == P // 2 (P = round(1 / val_fraction)). Nothing here depends on how the units
were cut or who tokenized them, so the output's bytes do not either.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from tinyllama.atomic import atomic_dir
from tinyllama.errors import UserError

from .parts import Plan, first_error, is_done, progress_bar, read_part, remove
from tinyllama.formats.shards import FORMAT, ShardWriter, packed_dtype
from .sources import SourceError

SEPARATOR_POLICY = ("each document is BOS + tokens + EOS; documents are concatenated; blocks are cut from the "
                    "stream regardless of document boundaries; the last shard is not padded")
MAX_EXAMPLES = 5


def finish(work: Path, progress: bool = False) -> dict:
    """Merges a run whose units are all done into its output folder; removes the work folder.
    progress: a bar over the units merged."""
    plan = Plan.load(work)
    if plan is None:
        raise UserError(f"{work}: no plan.json; not a prepare work folder")
    error = first_error(work)
    if error is not None:
        raise error
    missing = [i for i in range(len(plan.units)) if not is_done(work, i)]
    if missing:
        raise UserError(f"{work}: {len(missing)} units are not tokenized yet (first: {plan.units[missing[0]].describe()})")
    out = Path(plan.settings["out"])
    for stale in out.parent.glob(f".{out.name}.tmp-*"):      # a merge killed midway
        shutil.rmtree(stale, ignore_errors=True)
    bar = progress_bar(progress, f"merge {plan.settings['name']}", len(plan.units), " units")
    try:
        manifest = merge(work, plan, bar)
    finally:
        if bar is not None:
            bar.close()
    remove(work)
    return manifest


def merge(work: Path, plan: Plan, progress=None) -> dict:
    """Writes the output folder (plan.settings["out"]) from the finished parts; returns the manifest."""
    s = plan.settings
    out = Path(s["out"])
    period = max(2, round(1 / s["val_fraction"])) if s["val_fraction"] > 0 else 0
    counts = {"empty": 0, "bad": 0, "filtered": 0, "repaired_utf8": 0, "examples": []}
    with atomic_dir(out) as tmp:
        dtype = packed_dtype(s["tokenizer_info"]["vocab_size"])
        writers = {"train": ShardWriter(tmp, "train", s["shard_tokens"], dtype),
                   "validation": ShardWriter(tmp, "validation", s["shard_tokens"], dtype)}
        index = 0                                        # documents merged so far
        for u in range(len(plan.units)):
            tokens, lengths, info = read_part(work, u)
            _route(tokens, lengths, index, period, writers)
            index += len(lengths)
            st = info["stats"]
            counts["empty"] += st["empty_skipped"]
            counts["bad"] += st["bad_skipped"]
            counts["filtered"] += st["filtered"]
            counts["repaired_utf8"] += st["repaired_utf8"]
            counts["examples"] = (counts["examples"] + st["bad_examples"])[:MAX_EXAMPLES]
            if progress is not None:
                progress.update(1)
        if index == 0:
            raise SourceError(f"{s['source']}: no documents (empty skipped: {counts['empty']}, "
                              f"bad skipped: {counts['bad']})")
        splits = {k: w.close() for k, w in writers.items()}
        manifest = {
            "format": FORMAT,
            "name": s["name"],
            "source": s["source"],
            "dtype": dtype.name,
            "tokenizer": s["tokenizer_info"],
            "separator_policy": SEPARATOR_POLICY,
            "val_fraction": s["val_fraction"],
            "shard_tokens": s["shard_tokens"],
            "documents": index,
            "tokens": sum(v["tokens"] for v in splits.values()),
            "splits": splits,
            "skipped": counts,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _route(tokens: np.ndarray, lengths: np.ndarray, first: int, period: int, writers: dict) -> None:
    """Sends one unit's documents to their splits. Validation documents are sparse (one in
    P), so the train documents between two of them go in as one run: a Python step per
    validation document, not per document."""
    bounds = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])      # (docs + 1,)
    if not period:
        writers["train"].add(tokens, documents=len(lengths))
        return
    doc_ids = np.arange(first, first + len(lengths))
    held = np.flatnonzero(doc_ids % period == period // 2)                  # local indices
    start = 0                                                               # first doc of the pending train run
    for d in held:
        if d > start:
            writers["train"].add(tokens[bounds[start]:bounds[d]], documents=int(d - start))
        writers["validation"].add(tokens[bounds[d]:bounds[d + 1]])
        start = d + 1
    if start < len(lengths):
        writers["train"].add(tokens[bounds[start]:], documents=int(len(lengths) - start))
