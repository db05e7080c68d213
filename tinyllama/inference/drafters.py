"""Drafters for speculative decoding: what proposes the tokens that a round's one target pass
verifies. Two kinds: a small model with the target's vocabulary (either backend), and prompt
lookup (tinyllama.inference.lookup.NgramDrafter), which needs no model.

    drafter = open_drafter("out/draft/sft")          # a model reference (tinyllama.inference.backends)
    drafter = open_drafter("ngram:2")                # prompt lookup
    drafter = ModelDrafter(backend)                  # a Backend already loaded (a batching slot)
    generate(target, ids, drafter=drafter, draft_policy=Fixed(4))

A proposal comes with the distributions q its tokens were drawn from, the q of the acceptance
test min(1, p(x) / q(x)) (Leviathan et al. 2023); None when every token is a point mass
(greedy decoding, prompt lookup), which the generator verifies as q = onehot(x).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch

from tinyllama.errors import UserError
from tinyllama.inference.interface import Backend

# the generator's sampler: logits (vocab,) after a context -> a token and the q (vocab,) it was
# drawn from, None for a point mass (greedy)
Sample = Callable[[torch.Tensor, Sequence[int]], "tuple[int, torch.Tensor | None]"]


@runtime_checkable
class Drafter(Protocol):
    name: str
    path: Path | None                    # the model's files, None for prompt lookup (what stages print)
    precision: str
    context_length: float                # the longest context it drafts from

    def check(self, target: Backend) -> None:
        """Raises UserError unless it can draft for `target` (a model: the same vocabulary)."""

    def prefill(self, context: Sequence[int]) -> None:
        """Reads the prompt before the first round (a model fills its KV cache)."""

    def draft(self, context: Sequence[int], k: int, sample: Sample) -> tuple[list[int], list[torch.Tensor] | None]:
        """Up to k tokens to follow `context` (maybe none), with their q (vocab,) each or None."""

    def trim(self, n: int) -> None:
        """Keeps only the first n context tokens cached (after rejected drafts)."""

    def close(self) -> None:
        """Frees what it holds (a model's weights and KV cache)."""


class ModelDrafter:
    """A draft model behind a Backend: k tokens one at a time, each picked as the target would pick it."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    name = property(lambda self: self.backend.name)
    path = property(lambda self: self.backend.path)
    precision = property(lambda self: self.backend.precision)
    context_length = property(lambda self: self.backend.context_length)

    def check(self, target: Backend) -> None:
        check_same_vocabulary(target, self.backend)

    def prefill(self, context: Sequence[int]) -> None:
        self.backend.logits(context, 1)

    def draft(self, context: Sequence[int], k: int, sample: Sample) -> tuple[list[int], list[torch.Tensor] | None]:
        drafts: list[int] = []
        qs: list[torch.Tensor | None] = []
        for _ in range(k):
            ahead = [*context, *drafts]
            logits = self.backend.logits(ahead, 1)[0]                             # (vocab,)
            token, q = sample(logits, ahead)
            drafts.append(token)
            qs.append(q)
        return drafts, None if any(q is None for q in qs) else qs

    def trim(self, n: int) -> None:
        self.backend.trim(n)

    def reset(self) -> None:
        self.backend.reset()

    def close(self) -> None:
        self.backend.close()


def check_same_vocabulary(target: Backend, draft: Backend) -> None:
    """A draft must share the target's vocabulary, id for id (as llama.cpp requires)."""
    if target.vocab_size != draft.vocab_size:
        raise UserError(f"draft {draft.name} has {draft.vocab_size} tokens but target {target.name} has "
                        f"{target.vocab_size}: speculative decoding needs the same vocabulary")
    a, b = target.vocab_fingerprint(), draft.vocab_fingerprint()
    if a is not None and b is not None and a != b:
        raise UserError(f"draft {draft.name} and target {target.name} have different vocabularies "
                        "(same size, different tokens): speculative decoding needs the same tokenizer")
