"""The KV cache, owned by whoever runs the model, and the step that says where a forward's tokens
sit in it.

    cache = KVCache.for_model(model, batch_size=1, max_seq_len=512)
    logits = model(prompt, cache, Step.span(0, T))        # prefill: positions [0, T)
    logits = model(next_id, cache, Step.span(T, 1))       # decode one token at position T

The cache is indexed by absolute position: a step writes K/V at its positions and reads the keys
its tokens may see. Rolling back (speculative decoding) is just the next step starting at an
earlier position. Three kinds of step, one write and one read each:

    Step.span(start, T, row=None)   T tokens at [start, start + T) of every cache row (or of one
                                    row, B = 1): keys [0, start + T), causal bottom-right
    Step.per_row(rows, positions)   one token per batch row b, in cache row rows[b] at
                                    positions[b]: only its own row's keys up to there
    Step.static(positions, S)       T tokens at a positions tensor, attending over the whole
                                    cache of S through a (T, S) mask: the same shapes and
                                    addresses at every position (CUDA graphs)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from tinyllama.model.config import ModelConfig


@dataclass(frozen=True)
class Step:
    """Where a forward's T tokens sit in a KVCache and which keys each may see. Build it with
    span, per_row or static; the fields say what the cache and the attention need."""

    kind: str                                   # "span" | "per_row" | "static"
    n_tokens: int                               # T: the tokens of each batch row
    start: int = 0                              # span: the first position
    rows: slice | torch.Tensor = field(default_factory=lambda: slice(None))   # the cache rows read: a slice (a view) or indices (a copy)
    row_index: torch.Tensor | None = None       # per_row (B,): the cache row each batch row writes
    positions: torch.Tensor | None = None       # per_row (B,), static (T,): absolute positions
    end: int | None = None                      # keys [0, end) are read; None: the whole cache (static)
    lengths: torch.Tensor | None = None         # per_row (B,): keys visible to each row
    mask: torch.Tensor | None = None            # static (T, S) bool: key s visible to query t

    @classmethod
    def span(cls, start: int, n_tokens: int, row: int | None = None) -> "Step":
        rows = slice(None) if row is None else slice(row, row + 1)
        return cls("span", n_tokens, start=start, rows=rows, end=start + n_tokens)

    @classmethod
    def per_row(cls, rows: Sequence[int], positions: torch.Tensor) -> "Step":
        """positions (B,) on the cache's device; rows: the cache row of each batch row. A run of
        consecutive rows is read as a view, any other set through an index (a copy)."""
        if len(rows) != positions.shape[0]:
            raise ValueError(f"{len(rows)} cache rows for {positions.shape[0]} positions: one each")
        rows = list(rows)
        consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
        row_index = torch.tensor(rows, device=positions.device)
        read = slice(rows[0], rows[0] + len(rows)) if consecutive else row_index
        # the one host sync of the step: how far to read, shared by every layer
        return cls("per_row", 1, rows=read, row_index=row_index, positions=positions, end=int(positions.max()) + 1,
                   lengths=positions + 1)

    @classmethod
    def static(cls, positions: torch.Tensor, cache_len: int) -> "Step":
        keys = torch.arange(cache_len, device=positions.device)
        return cls("static", positions.shape[0], positions=positions, mask=keys[None, :] <= positions[:, None])


class KVCache:
    """Preallocated K and V for every layer: (n_layer, B, n_kv_head, max_seq_len, head_dim) each."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_seq_len: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_seq_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int = 1, max_seq_len: int | None = None,
                  dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "KVCache":
        """A cache for `model` (a Llama): its dtype and device unless given, its context length
        unless max_seq_len is."""
        ref = model.lm_head.weight
        return cls(model.config, batch_size, max_seq_len or model.config.max_seq_len, dtype or ref.dtype,
                   device or ref.device)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[3]

    def check(self, step: Step, batch: int) -> None:
        """Whether `step` over `batch` rows fits this cache: a clear error before any write."""
        if step.end is not None and step.end > self.max_seq_len:
            raise ValueError(f"KV cache overflow: position {step.end} > cache length {self.max_seq_len}; "
                             "allocate a KVCache with a larger max_seq_len")
        rows = (len(range(*step.rows.indices(self.batch_size))) if isinstance(step.rows, slice)
                else step.rows.shape[0])
        if batch != rows:
            raise ValueError(f"batch size {batch} differs from the {rows} KV cache rows the step uses")

    def write(self, layer: int, step: Step, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (B, n_kv, T, hd): the layer's keys and values at the step's positions."""
        keys, values = self.k[layer], self.v[layer]                     # (Bc, n_kv, S, hd) views
        if step.kind == "span":
            keys[step.rows, :, step.start:step.end] = k
            values[step.rows, :, step.start:step.end] = v
        elif step.kind == "per_row":
            keys[step.row_index, :, step.positions] = k[:, :, 0]     # row b at positions[b]
            values[step.row_index, :, step.positions] = v[:, :, 0]
        else:
            keys.index_copy_(2, step.positions, k)                   # the same addresses at every step
            values.index_copy_(2, step.positions, v)

    def read(self, layer: int, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys and values the step's tokens attend over: (B, n_kv, end, hd) each, the
        whole cache for a static step. Keys past a per_row step's lengths belong to nothing."""
        if step.kind == "static":
            return self.k[layer], self.v[layer]
        return self.k[layer][step.rows, :, :step.end], self.v[layer][step.rows, :, :step.end]
