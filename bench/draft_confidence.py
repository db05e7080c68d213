"""How sure a draft is, against how often it is right, and what `auto` costs where drafting does
not pay: the two measurements behind --draft-p-min's default and behind "auto never below plain".

    python -m bench.draft_confidence --target T.gguf -md D.gguf [--prompts 12] [--pairs 12]

1. Confidence: the target answers held-out chat prompts greedily (stopping at its end of turn);
   the draft reads each answer once, and at every position its top probability is set beside
   whether its top token is the target's. For each threshold P: the share of positions where
   the draft's top probability is at least P (what a round with --draft-p-min P drafts) and the
   acceptance rate α among them and below them. α at P = 0 is α at k = 1.
2. Auto against plain, paired: plain decoding and `auto` (the default policy, one for all
   prompts) in alternating order, `--pairs` times, each pair's ratio of tokens/s, and their
   median and range. A best-of-N table compares each configuration's luckiest round; a paired
   ratio takes the machine's slow and fast spells out of the comparison.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from . import chat_prompts, markdown_table
from .speculative_runs import decode_prompts

THRESHOLDS = (0.0, 0.3, 0.5, 0.6, 0.75, 0.8, 0.9)


def confidence_rows(target, draft, prompts, tokens: int, stop_ids) -> list[tuple[float, float, float, float | None]]:
    """(P, share of positions with the draft's top probability >= P, α among them, α below)."""
    from tinyllama.inference.drafters import confidence
    from tinyllama.inference.generate import generate

    sure, right = [], []
    for ids in prompts:
        target.reset()
        draft.reset()
        answer = list(generate(target, ids, max_new_tokens=tokens, stop_ids=stop_ids))
        if not answer:
            continue
        logits = draft.logits(list(ids) + answer[:-1], len(answer))            # (len(answer), vocab)
        sure += [confidence(row, None) for row in logits]                     # what the greedy stop reads
        right += (logits.argmax(-1) == torch.tensor(answer)).tolist()
    p, ok = torch.tensor(sure), torch.tensor(right, dtype=torch.float)
    rows = []
    for threshold in THRESHOLDS:
        kept = p >= threshold
        rows.append((threshold, float(kept.float().mean()), float(ok[kept].mean()) if kept.any() else None,
                     float(ok[~kept].mean()) if (~kept).any() else None))
    return rows


def paired_ratios(target, draft, prompts, tokens: int, stop_ids, pairs: int) -> list[tuple[float, float, int]]:
    """(plain tok/s, auto tok/s, tokens auto drafted) for each pair of runs, the order alternating."""
    from tinyllama.inference.draft_policy import Auto

    policy = Auto()                        # one for every prompt and pair, as the server keeps one
    out = []
    for i in range(pairs):
        order = ["plain", "auto"] if i % 2 == 0 else ["auto", "plain"]
        runs = {}
        for name in order:
            kw = dict(draft=draft, policy=policy) if name == "auto" else {}
            runs[name] = decode_prompts(target, prompts, tokens, stop_ids=stop_ids, **kw)
            print(f"pair {i + 1}/{pairs}: {name}: {runs[name].tokens_per_s:.1f} tok/s", file=sys.stderr)
        out.append((runs["plain"].tokens_per_s, runs["auto"].tokens_per_s, runs["auto"].drafted))
    return out


def run(target_path: str, draft_path: str, n_prompts: int = 12, tokens: int = 128, pairs: int = 12) -> str:
    from tinyllama.inference.backends import load_backend
    from tinyllama.inference.draft_policy import DEFAULT_P_MIN

    target, tok = load_backend(target_path, dtype="float32", device="cpu")
    draft, _ = load_backend(draft_path, dtype="float32", device="cpu")
    try:
        stop_ids = tuple(tok.stop_ids)
        prompts = chat_prompts(tok, n_prompts)
        rows = confidence_rows(target, draft, prompts, tokens, stop_ids)
        decode_prompts(target, prompts[:1], tokens)                          # warm-up
        ratios = paired_ratios(target, draft, prompts[:6], tokens, stop_ids, pairs) if pairs else []
    finally:
        draft.close()
        target.close()

    def cell(x):
        return "-" if x is None else f"{x:.2f}"

    text = (f"{target.name} drafted by {draft.name}: {n_prompts} held-out chat prompts, the target's greedy "
            f"answers up to {tokens} tokens, each position once\n\n" +
            markdown_table(("--draft-p-min P", "positions drafted (draft's top p >= P)", "alpha among them",
                            "alpha below"),
                           [(f"{t:g}", f"{share:.0%}", cell(a), cell(b)) for t, share, a, b in rows]))
    if ratios:
        r = [a / p for p, a, _ in ratios]
        text += (f"\n\nauto k (p-min {DEFAULT_P_MIN:g}, one policy throughout) against plain decoding, {len(r)} "
                 f"pairs of runs in alternating order over {min(6, n_prompts)} prompts: median {statistics.median(r):.2f}x, "
                 f"range {min(r):.2f}-{max(r):.2f}x, mean {statistics.mean(r):.2f}x; auto drafted "
                 f"{sum(d for *_, d in ratios)} tokens in all\n\n" +
                 markdown_table(("pair", "plain", "auto", "auto / plain", "drafted"),
                                [(str(i + 1), f"{p:.1f} tok/s", f"{a:.1f} tok/s", f"{a / p:.2f}x", str(d))
                                 for i, (p, a, d) in enumerate(ratios)]))
    return text


def main(argv: list[str] | None = None) -> int:
    from tinyllama.cli import add_draft_model_flag
    from tinyllama.errors import UserError, report

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="the target: a .gguf, a checkpoint directory or a hub id")
    add_draft_model_flag(ap, "the draft: a .gguf or a checkpoint directory", required=True)
    ap.add_argument("--prompts", type=int, default=12, help="held-out chat prompts (default: %(default)s)")
    ap.add_argument("--tokens", type=int, default=128, help="answer length cap (default: %(default)s)")
    ap.add_argument("--pairs", type=int, default=12,
                    help="paired plain/auto runs (0: none) (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        print(run(args.target, args.model_draft, args.prompts, args.tokens, args.pairs))
    except UserError as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
