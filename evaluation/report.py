"""Results as Markdown: one column per model, TinyLlama's published figures beside them."""

from __future__ import annotations

from .harness import CHANCE, PUBLISHED, REPORTED


def markdown_report(runs: dict[str, tuple[dict[str, dict[str, float]], dict[str, tuple[float, int]]]]) -> str:
    """One table, a column per model: task metrics (in %), then perplexities, then chance (the
    accuracy of guessing) and TinyLlama's published figure where there are."""
    names = list(runs)
    lines = ["| task | metric | " + " | ".join(f"`{n}`" for n in names) + " | chance | TinyLlama 1.1B (3T), published |",
             "|---|---|" + "---|" * len(names) + "---|---|"]
    tasks = list(dict.fromkeys(t for res, _ in runs.values() for t in res))
    for task in tasks:
        pub, metric = PUBLISHED.get(task, (None, REPORTED.get(task, "acc_norm")))
        cells = []
        for res, _ in runs.values():
            m = res.get(task, {})
            value = m.get(metric, m.get("acc"))
            cells.append(f"{100 * value:.2f}" if value is not None else "-")
        chance = f"{CHANCE[task]:.2f}" if task in CHANCE else "-"
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + f" | {chance} | {pub if pub is not None else '-'} |")
    shards = list(dict.fromkeys(k for _, ppl in runs.values() for k in ppl))
    for shard in shards:
        cells = [f"{ppl[shard][0]:.2f}" if shard in ppl else "-" for _, ppl in runs.values()]
        n = next(ppl[shard][1] for _, ppl in runs.values() if shard in ppl)
        lines.append(f"| perplexity, {shard} ({n:,} tokens) | ppl | " + " | ".join(cells) + " | - | - |")
    return "\n".join(lines)
