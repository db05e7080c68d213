"""How much each GGUF loses, measured by llama.cpp's own `llama-perplexity`: perplexity on
held-out text, and the KL divergence of each file's next-token distributions from the F32
file's (mean, 99th percentile, how often the top token is the same), next to the PyTorch
model's perplexity computed with llama-perplexity's protocol.

    scorer = Scorer("out/sft", f32_gguf, text, work_dir, ctx=512, chunks=32)   # PyTorch and F32 scored once
    q = scorer.score(Path("m-Q4_K_M.gguf"))                                   # KLD from the F32 logits

The protocol (llama-perplexity's): the text tokenized once with BOS, cut into `chunks` windows of
`ctx` tokens, each window's first token replaced by BOS, and only the second half of each window
scored (ctx/2 - 1 positions), so every scored token has at least ctx/2 tokens of context.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from tinyllama.formats.tokenizer import Tokenizer

from .imatrix import QuantizeError, run_tool, text_file


@dataclass
class Quality:
    ppl: float                        # perplexity of the file on the text
    kld_mean: float | None = None     # mean KL divergence from the F32 file's distributions (nats)
    kld_p99: float | None = None      # its 99th percentile
    same_top: float | None = None     # % of positions where the top token is the F32 file's
    tokens: int = 0                   # positions scored


def windows(n_tokens: int, ctx: int, chunks: int) -> int:
    """How many windows the text allows (llama-perplexity needs at least two), at most `chunks`."""
    n = min(chunks, n_tokens // ctx)
    if n_tokens < 2 * ctx:
        raise QuantizeError(f"the evaluation text has {n_tokens} tokens; llama-perplexity needs at least "
                            f"{2 * ctx} for a context of {ctx} (give longer --calibration text or a smaller --ctx-size)")
    return n


def score_base(f32_gguf: Path, text: str, logits_out: Path, ctx: int, chunks: int) -> Quality:
    """Perplexity of the F32 file, saving its logits for score_against."""
    from tinyllama.llamacpp.tools import tool

    with text_file(text, logits_out.parent) as txt:
        out = run_tool([str(tool("llama-perplexity")), "-m", str(f32_gguf), "-f", str(txt), "-c", str(ctx),
                        "-b", str(ctx), "--chunks", str(chunks), "--kl-divergence-base", str(logits_out),
                        "-t", str(os.cpu_count() or 1)], f"perplexity of {f32_gguf.name}", total=chunks,
                       expect=r"Final estimate: PPL")
    m = re.search(r"Final estimate: PPL = ([\d.]+)", out)
    if m is None:
        raise QuantizeError(f"llama-perplexity printed no estimate for {f32_gguf.name}:\n{out[-600:]}")
    scored = re.search(r"calculating perplexity over (\d+) chunks", out)
    n = int(scored[1]) if scored else chunks
    return Quality(ppl=float(m[1]), kld_mean=0.0, kld_p99=0.0, same_top=100.0, tokens=n * (ctx - ctx // 2 - 1))


def score_against(gguf: Path, logits: Path, chunks: int) -> Quality:
    """Perplexity and KL divergence of `gguf` on the tokens and F32 logits in `logits`."""
    from tinyllama.llamacpp.tools import tool

    out = run_tool([str(tool("llama-perplexity")), "-m", str(gguf), "--kl-divergence-base", str(logits),
                    "--kl-divergence", "-t", str(os.cpu_count() or 1)], f"KL divergence of {gguf.name}",
                   total=chunks, expect=r"Same top p:")

    def number(pattern: str) -> float:
        m = re.search(pattern, out)
        if m is None:
            raise QuantizeError(f"llama-perplexity's output for {gguf.name} has no {pattern!r}:\n{out[-600:]}")
        return float(m[1])

    return Quality(ppl=number(r"Mean PPL\(Q\)\s*:\s*([\d.]+)"), kld_mean=number(r"Mean\s+KLD:\s*([-\d.e]+)"),
                   kld_p99=number(r"99\.0%\s+KLD:\s*([-\d.e]+)"), same_top=number(r"Same top p:\s*([\d.]+)"))


@torch.no_grad()
def torch_perplexity(model, tok: Tokenizer, text: str, ctx: int, chunks: int) -> Quality:
    """llama-perplexity's protocol on our PyTorch model (float32 as loaded)."""
    ids = tok.encode(text)
    n = windows(len(ids), ctx, chunks)
    first = ctx // 2
    nll, count = 0.0, 0
    for i in range(n):
        window = torch.tensor(ids[i * ctx:(i + 1) * ctx])
        if tok.add_bos:                                   # as llama-perplexity: BOS only where the model adds it
            window[0] = tok.bos_id
        logits = model(window[None])[0, first:ctx - 1].float()               # (ctx - first - 1, V)
        nll += float(torch.nn.functional.cross_entropy(logits, window[first + 1:], reduction="sum"))
        count += ctx - first - 1
    return Quality(ppl=math.exp(nll / count), tokens=count)


class Scorer:
    """The held-out text scored once by the PyTorch model and the F32 GGUF (whose logits are saved
    in `work`), then any GGUF of the same model against them."""

    def __init__(self, model_dir: Path, f32: Path, text: str, work: Path, ctx: int, chunks: int) -> None:
        from tinyllama import load_checkpoint

        model, tok = load_checkpoint(model_dir, dtype=torch.float32)
        self.f32, self.logits = f32, work / "f32.kld"
        self.chunks = windows(len(tok.encode(text)), ctx, chunks)
        self.torch_ppl = torch_perplexity(model, tok, text, ctx, self.chunks).ppl
        del model
        self.base = score_base(f32, text, self.logits, ctx, self.chunks)

    def score(self, gguf: Path) -> Quality:
        return self.base if gguf.resolve() == self.f32.resolve() else score_against(gguf, self.logits, self.chunks)


def quality_table(rows: list[tuple[str, Path, Quality]], torch_ppl: float, n_params: int) -> str:
    """Markdown: type, file MB, bits/weight, perplexity, KLD mean / p99, same top token."""
    head = "| type | MB | bits/weight | perplexity | KLD mean | KLD p99 | same top token |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|", f"| PyTorch (float32) | | | {torch_ppl:.3f} | | | |"]
    for t, path, q in rows:
        size = path.stat().st_size
        kld = f"{q.kld_mean:.5f} | {q.kld_p99:.5f} | {q.same_top:.2f}%" if q.kld_mean is not None else "- | - | -"
        lines.append(f"| {t} | {size / 1e6:,.1f} | {8 * size / n_params:.2f} | {q.ppl:.3f} | {kld} |")
    return "\n".join(lines)
