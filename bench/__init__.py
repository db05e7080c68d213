"""Benchmarks: each measures ours and the reference in the same run and prints a table."""

import statistics

from tinyllama.measure import median_seconds, peak_rss_bytes  # noqa: F401  (the benchmarks' helpers)


def markdown_table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """A Markdown table with columns padded to their widest cell."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(r: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def paired(ratios: list[float]) -> str:
    """Ratios of paired runs as their median and range: "1.04x (0.97-1.10)"; "-" when there are none."""
    if not ratios:
        return "-"
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def chat_prompts(tok, n: int) -> list[list[int]]:
    """The speculative benchmarks' prompts: the first n questions `make sft` held out of the SFT
    sample, in the model's own chat template."""
    from sft.data import load_conversations, split_eval
    from tinyllama.formats.chat import apply_chat_template

    _, held = split_eval(load_conversations("sample"), 0.05, seed=42)
    return [apply_chat_template(tok, [c[0]]) for c in held[:n]]


def code_prompts(tok, n: int) -> list[list[int]]:
    """The first n held-out code prompts (sft.prompts: never in a draft's distillation data), each
    a user turn in the model's own chat template."""
    from sft.prompts import code_prompts as prompts
    from tinyllama.formats.chat import apply_chat_template

    _, held = prompts()
    return [apply_chat_template(tok, [{"role": "user", "content": p.text}]) for p in held[:n]]


def sync(device) -> None:
    """Waits for the GPU, so that a wall-clock interval covers the kernels it launched (a no-op
    on a CPU)."""
    if getattr(device, "type", device) == "cuda":
        import torch

        torch.cuda.synchronize(device)
