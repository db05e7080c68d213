"""Validation perplexity of a model on a token-shard directory, as the trainer measures loss.

    ppl, tokens = perplexity(backend, "data/tokens/natural", seq_len=256)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tinyllama.formats.shards import PackedSource, ShardError
from tinyllama.inference.backends import Backend
from tinyllama.formats.tokenizer import Tokenizer

from .harness import EvalError


def perplexity(backend: Backend, shards: str | Path, seq_len: int = 256, max_blocks: int = 16,
               tokenizer: Tokenizer | None = None) -> tuple[float, int]:
    """exp(mean next-token loss) over the first `max_blocks` validation blocks of a token-shard
    directory (prepare's format), each (seq_len + 1) tokens as the trainer reads them.
    `tokenizer`: the model's; shards tokenized with another vocabulary are refused (their ids
    would mean other text to this model, and the perplexity nothing)."""
    src = PackedSource(shards, "validation")
    if tokenizer is not None:
        try:
            src.check_tokenizer(tokenizer.fingerprint)
        except ShardError as e:
            raise EvalError(f"{e} (the model {backend.name} has {tokenizer.vocab_size:,} tokens; the shards' "
                            f"tokenizer has {src.manifest['tokenizer'].get('vocab_size', '?')})") from None
    n = min(max_blocks, src.num_blocks(seq_len))
    if n == 0:
        raise EvalError(f"{shards}: fewer than {seq_len + 1} validation tokens")
    total, count = 0.0, 0
    for j in range(n):
        block = [int(t) for t in src.block(j, seq_len)]                    # seq_len + 1 tokens
        backend.reset()
        logits = backend.logits(block[:-1], n_last=seq_len)                  # (seq_len, vocab)
        loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(block[1:]), reduction="sum")
        total, count = total + float(loss), count + seq_len
    return math.exp(total / count), count
