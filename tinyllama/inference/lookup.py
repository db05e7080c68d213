"""Prompt-lookup (n-gram) drafting: a drafter for speculative decoding that needs no model.

    drafter = NgramDrafter(max_ngram=3)               # --model-draft ngram  (or ngram:N)
    drafter.propose(context, k)                       # up to k token ids, maybe none

When the output copies from the prompt (editing code, summarising or quoting a text, filling
a form), the tokens that followed the latest earlier occurrence of the last few tokens are a
good guess for what comes next. llama.cpp's lookup decoding and transformers'
`prompt_lookup_num_tokens` do the same. The target verifies the guesses exactly as it verifies
a model's drafts, so the output is unchanged: greedy stays token-identical and sampling keeps
the target's distribution (the proposal is a point mass, accepted with probability p(x)).
It is a tinyllama.inference.drafters.Drafter; ModelDrafter is the other one.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

from tinyllama.errors import UserError

DEFAULT_MAX_NGRAM = 3
_SPEC = re.compile(r"ngram(?::(\d+))?")


class NgramDrafter:
    """Proposes the continuation of the longest (up to max_ngram tokens), most recent earlier
    match of the context's tail in the context itself (prompt and output so far)."""

    path = None                                  # what stages print for a model draft
    precision = "prompt lookup (no draft model)"
    context_length = math.inf                    # it drafts from a context of any length

    def __init__(self, max_ngram: int = DEFAULT_MAX_NGRAM, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise UserError(f"n-gram drafting needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.name = f"ngram:{max_ngram}"

    @classmethod
    def parse(cls, spec: str) -> "NgramDrafter | None":
        """`ngram` or `ngram:N` as a --model-draft value, else None (a model reference)."""
        m = _SPEC.fullmatch(str(spec).strip())
        if m is None:
            return None
        n = int(m.group(1)) if m.group(1) else DEFAULT_MAX_NGRAM
        if n < 1:
            raise UserError(f"--model-draft {spec}: the n-gram size must be at least 1")
        return cls(max_ngram=n)

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        ids = np.asarray(context, dtype=np.int64)                         # (L,)
        L = len(ids)
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            tail = ids[L - n:]
            # windows[i] = ids[i:i+n] for every start whose window ends before the tail does
            windows = np.lib.stride_tricks.sliding_window_view(ids[:L - 1], n)     # (L - n, n)
            hits = np.flatnonzero((windows == tail).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n                                 # the most recent match
                return ids[start:start + k].tolist()
        return []

    # ---- the Drafter protocol ---------------------------------------------------------------
    def draft(self, context: Sequence[int], k: int, sample=None, p_min: float = 0.0) -> tuple[list[int], None]:
        """The lookup's tokens as point masses (q = onehot(x)): nothing is sampled, and with no
        probabilities p_min has nothing to stop (as in llama.cpp's n-gram drafting)."""
        return self.propose(context, k), None

    def check(self, target) -> None:            # any vocabulary: it copies the context's own ids
        pass

    def prefill(self, context: Sequence[int]) -> None:     # a lookup keeps no cache
        pass

    def trim(self, n: int) -> None:
        pass

    def reset(self) -> None:
        pass

    def close(self) -> None:
        pass
