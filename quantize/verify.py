"""Checks a GGUF against the PyTorch model it came from, through llama.cpp itself.

    report = verify_gguf("model-Q4_K_M.gguf", model, tok, text)

Tokenization: llama.cpp's ids for the sample must equal ours. Logits: every position's
next-token logits from llama.cpp (llama-cpp-python, logits for all positions) against our
model's, reported as max |Δlogit|, top-1 agreement and the perplexity of both on the text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinyllama import Llama, Tokenizer

SAMPLE_TEXT = ("The quick brown fox jumps over the lazy dog. To be, or not to be, that is the question:\n"
               "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n")

# Max |Δlogit| allowed, relative to the largest |logit| of the PyTorch model (at least 1).
FLOAT_TOLERANCE = {"f32": 1e-3, "f16": 2e-2, "bf16": 5e-2}


@dataclass
class VerifyReport:
    path: str
    tokens: int
    tokenization_equal: bool
    max_abs_diff: float
    top1_agreement: float
    ppl_gguf: float
    ppl_torch: float

    def line(self) -> str:
        return (f"{Path(self.path).name}: tokenization {'equal' if self.tokenization_equal else 'DIFFERENT'}, "
                f"max |Δlogit| {self.max_abs_diff:.2e}, top-1 agreement {self.top1_agreement:.1%}, "
                f"perplexity {self.ppl_gguf:.2f} (llama.cpp) vs {self.ppl_torch:.2f} (PyTorch), {self.tokens} tokens")


def _perplexity(logits: np.ndarray, ids: list[int]) -> float:
    x = torch.from_numpy(np.asarray(logits[:-1], dtype=np.float32))
    nll = torch.nn.functional.cross_entropy(x, torch.tensor(ids[1:]))
    return math.exp(nll.item())


def gguf_logits(path: str | Path, ids: list[int], text: str) -> tuple[np.ndarray, list[int]]:
    """(llama.cpp's logits for every position of ids (T, vocab), llama.cpp's own ids for text)."""
    import llama_cpp

    # An F32 KV cache (llama.cpp defaults to F16) so that F32 files can be held to float tolerance.
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(64, len(ids) + 8), logits_all=True, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        theirs = llm.tokenize(text.encode(), add_bos=True, special=False)
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32), theirs
    finally:
        llm.close()


def verify_gguf(path: str | Path, model: Llama, tok: Tokenizer, text: str = SAMPLE_TEXT) -> VerifyReport:
    ids = tok.encode(text)
    logits, theirs = gguf_logits(path, ids, text)
    with torch.no_grad():
        ours = model(torch.tensor([ids], device=next(model.parameters()).device))[0].float().cpu().numpy()
    diff = float(np.abs(ours - logits).max())
    top1 = float((ours.argmax(-1) == logits.argmax(-1)).mean())
    return VerifyReport(str(path), len(ids), theirs == ids, diff, top1, _perplexity(logits, ids), _perplexity(ours, ids))
