"""The streaming generator over our PyTorch model: prefill once, then one token per step
from the KV cache.

    for token_id in generate(model, prompt_ids, max_new_tokens=64, temperature=0.8, top_k=50):
        print(tok.decode([token_id]), end="")

Sampling: temperature 0 is greedy; otherwise softmax(logits / temperature) restricted by top-k
and top-p (nucleus), with an optional repetition penalty (CTRL's: divide positive logits,
multiply negative ones, for tokens already in the context). Generation stops at max_new_tokens
or after yielding a stop id.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch

from .model import Llama


def process_logits(logits: torch.Tensor, context: Sequence[int], temperature: float, top_k: int | None,
                   top_p: float | None, repetition_penalty: float) -> torch.Tensor:
    """logits (vocab,) float32 -> the distribution sampling draws from, as probabilities.
    Temperature 0 gives a one-hot on the argmax."""
    logits = logits.float().clone()
    if repetition_penalty != 1.0 and len(context):
        idx = torch.tensor(sorted(set(context)), device=logits.device)
        picked = logits[idx]
        logits[idx] = torch.where(picked > 0, picked / repetition_penalty, picked * repetition_penalty)
    if temperature <= 0:
        probs = torch.zeros_like(logits)
        probs[int(logits.argmax())] = 1.0
        return probs
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and 0 < top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p          # the smallest prefix reaching top_p
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask[order[keep]] = True
        probs = torch.where(mask, probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
    return probs


@torch.no_grad()
def generate(model: Llama, prompt_ids: Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
             stop_ids: Iterable[int] = (), seed: int | None = None) -> Iterator[int]:
    """Yields new token ids one at a time (batch size 1)."""
    if not len(prompt_ids):
        raise ValueError("generate() needs at least one prompt token (e.g. BOS)")
    if max_new_tokens <= 0:
        return
    device = next(model.parameters()).device
    total = len(prompt_ids) + max_new_tokens
    model.setup_kv_cache(batch_size=1, max_seq_len=total)
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    stop = set(stop_ids)
    context = list(prompt_ids)
    try:
        logits = model(torch.tensor([context], device=device), start_pos=0)[0, -1]     # (vocab,)
        for i in range(max_new_tokens):
            probs = process_logits(logits, context, temperature, top_k, top_p, repetition_penalty)
            next_id = int(probs.argmax()) if temperature <= 0 else int(torch.multinomial(probs, 1, generator=generator))
            yield next_id
            if next_id in stop:
                return
            context.append(next_id)
            if i + 1 < max_new_tokens:
                logits = model(torch.tensor([[next_id]], device=device), start_pos=len(context) - 1)[0, -1]
    finally:
        model.clear_kv_cache()
