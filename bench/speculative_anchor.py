"""llama.cpp's own speculative decoding (`llama-speculative-simple`, built from the llama.cpp
sources in the llama-cpp-python sdist by tinyllama.llamacpp.tools) on the same two GGUFs and
the same prompts as bench.speculative: the anchor our llama.cpp pair is compared with.

    rows = llama_cpp_speculative(target_gguf, draft_gguf, prompt_texts, tokens=48, ks=(1, 2, 4))

Greedy on both sides (--temp 0 --top-k 1, the draft's --spec-draft-p-min 0 so every round
drafts k tokens as ours does), EOS ignored, the decode time the tool reports (its prompt
processing excluded, as ours is). The tool stops after the round that passes `tokens`, so it
can produce up to k more; the rate is its own tokens over its own time.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

_DECODED = re.compile(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds")
_ENCODED = re.compile(r"encoded\s+(\d+) tokens in")
_COUNTS = {name: re.compile(rf"{name}\s*=\s*(\d+)") for name in ("n_drafted", "n_accept")}


@dataclass
class AnchorRun:
    """One configuration over all prompts."""
    k: int
    tokens: int = 0
    seconds: float = 0.0
    drafted: int = 0
    accepted: int = 0
    prompt_tokens: list[int] | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def parse_report(text: str) -> dict:
    """The figures llama-speculative-simple prints at the end of a run."""
    decoded = _DECODED.search(text)
    if decoded is None:
        raise RuntimeError(f"llama-speculative-simple printed no 'decoded N tokens' line:\n{text[-1500:]}")
    out = {"tokens": int(decoded.group(1)), "seconds": float(decoded.group(2))}
    encoded = _ENCODED.search(text)
    out["prompt_tokens"] = int(encoded.group(1)) if encoded else None
    for name, pattern in _COUNTS.items():
        m = pattern.search(text)
        out[name] = int(m.group(1)) if m else 0
    return out


def run_once(target, draft, prompt: str, tokens: int, k: int, threads: int | None = None, n_ctx: int = 2048,
             ignore_eos: bool = True) -> dict:
    """One prompt through llama-speculative-simple; its parsed report."""
    from tinyllama.llamacpp.tools import LOST_LOG_ATTEMPTS, tool

    threads = str(threads or os.cpu_count() or 1)
    cmd = [str(tool("llama-speculative-simple")), "-m", str(target), "-md", str(draft), "-p", prompt,
           "-n", str(tokens), *(["--ignore-eos"] if ignore_eos else []), "--temp", "0", "--top-k", "1", "--seed", "0", "-c", str(n_ctx),
           "-t", threads, "-td", threads, "--spec-type", "draft-simple", "--spec-draft-n-max", str(k), "--spec-draft-n-min", "0",
           "--spec-draft-p-min", "0", "-ngl", "0", "-ngld", "0"]
    for attempt in range(1, LOST_LOG_ATTEMPTS + 1):
        r = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
        if r.returncode != 0:
            raise RuntimeError(f"llama-speculative-simple failed (exit {r.returncode}): {r.stderr.strip()[-1500:]}")
        text = r.stdout + r.stderr
        if _DECODED.search(text) or attempt == LOST_LOG_ATTEMPTS:
            return parse_report(text)
    raise AssertionError("unreachable")


def llama_cpp_speculative(target, draft, prompts: list[str], tokens: int, ks=(1, 2, 4),
                          threads: int | None = None, ignore_eos: bool = True) -> list[AnchorRun]:
    """Every k over every prompt: one AnchorRun per k; ignore_eos False: each reply ends at the
    end of turn, as ours does with --eos."""
    runs = []
    for k in ks:
        run = AnchorRun(k, prompt_tokens=[])
        for prompt in prompts:
            rep = run_once(target, draft, prompt, tokens, k, threads, ignore_eos=ignore_eos)
            run.tokens += rep["tokens"]
            run.seconds += rep["seconds"]
            run.drafted += rep["n_drafted"]
            run.accepted += rep["n_accept"]
            run.prompt_tokens.append(rep["prompt_tokens"])
        runs.append(run)
    return runs
