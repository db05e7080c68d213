"""The interface every model runs behind: what the generator, the drafters and the server ask
of a model, whichever backend (tinyllama.inference.backends: PyTorch or llama.cpp) answers.

    backend.logits(context, n_last)     # (n_last, vocab) float32 logits after context's last tokens
    backend.argmax(context)             # greedy decoding's next token, without handing the logits out
    backend.trim(n)                     # speculative decoding's rollback: keep the first n positions
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from tinyllama.formats.tokenizer import Tokenizer


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if list(a[:n]) == list(b[:n]):      # the usual decode step: one is a prefix of the other
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def argmax(values: torch.Tensor) -> int:
    """The index of the largest of 1-D `values` (the first of equal ones, as torch.argmax). A
    float32 CPU tensor goes through numpy, whose argmax is vectorised where torch's CPU one is
    not: over a 49,152-token vocabulary that is most of the Python a greedy token costs."""
    if values.device.type == "cpu" and values.dtype == torch.float32:
        return int(values.numpy().argmax())
    return int(values.argmax())


class Backend:
    """What generate() needs from a model."""

    name: str = "model"
    path: Path | None = None       # the files it was loaded from (load_backend sets it)
    precision: str = ""            # what the weights compute in, and why ("float32 (auto: ...)", "Q4_K_M in llama.cpp")
    vocab_size: int
    context_length: int
    # the model's own tokenizer where the backend knows it (load_backend sets it): what a draft's
    # special ids and chat template are checked against; None skips those checks
    tokenizer: "Tokenizer | None" = None

    def logits(self, context: Sequence[int], n_last: int = 1) -> torch.Tensor:
        raise NotImplementedError

    def argmax(self, context: Sequence[int]) -> int:
        """The token greedy decoding picks after `context`: argmax(logits(context, 1)[0]). A
        backend that can find it without handing its logits out overrides it (a batching slot:
        no copy of the vocabulary-sized row)."""
        return argmax(self.logits(context, 1)[0])

    def cached_tokens(self) -> int:
        """How many leading context tokens the KV cache currently holds."""
        raise NotImplementedError

    def trim(self, n: int) -> None:
        """Forgets cached positions from n on (speculative decoding's rollback)."""
        raise NotImplementedError

    def vocab_fingerprint(self) -> str | None:
        """sha256 of the token pieces, to refuse a draft with another vocabulary."""
        return None

    def vocab_pieces(self) -> list[str] | None:
        """Every token's text by id (what the fingerprint hashes), to name the first token two
        vocabularies disagree on; None where unknown."""
        return None

    def reset(self) -> None:
        pass

    def close(self) -> None:
        pass


def check_context(context: Sequence[int], n_last: int, context_length: int, name: str) -> None:
    if not 1 <= n_last <= len(context):
        raise ValueError(f"n_last={n_last} must be in [1, {len(context)}]")
    if len(context) > context_length:
        raise ValueError(f"{name}: {len(context)} tokens exceed the context length {context_length}")
