"""Packed shards -> training blocks: a weighted mixture of sources, disjoint per rank and worker,
resumable exactly without replaying a batch.

    natural = PackedSource("data/tokens/natural")                # reads manifest.json, memory-maps shards
    code = PackedSource("data/tokens/code")
    mix = Mixture({"natural": natural, "code": code}, {"natural": 0.7, "code": 0.3}, seq_len=512, seed=0)
    loader = BatchLoader(mix, micro_batch=8, rank=rank, world_size=world, num_workers=1)
    for x, y in loader: ...                                        # (B, seq_len) int64 each
    state = loader.state_dict()                                    # {"next_batch": ..., ...}
    loader.load_state_dict(state)                                  # continues with the very next batch

Everything is a pure function of a global sample index g, so nothing needs replaying:
- the mixture: sample indices are grouped in periods of P (default 1000); a period holds each
  source round(w·P) times (largest remainder) in an order shuffled by (seed, period). So source
  s's k-th sample is found in O(1), and the proportions are exact to 1/P over every period
  (TinyLlama drew each sample independently: 0.693584 natural / 0.306416 code);
- within a source, the k-th sample is block perm_epoch(k mod n) of its n blocks, where
  perm_epoch is a seeded Feistel bijection of [0, n) (no n-sized arrays, even for 10^9 blocks)
  and epoch = k div n: epochs wrap with a fresh order;
- block j is tokens [j·L, j·L + L + 1) of the source's concatenated stream: input and target;
- micro-batch b of rank r holds global samples [(b·R + r)·B, (b·R + r + 1)·B), and dataloader
  worker w of W produces micro-batches b ≡ start + w (mod W). Ranks and workers therefore read
  disjoint samples (TinyLlama issue #67), and resuming is setting `next_batch`.
"""

from __future__ import annotations

import hashlib
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tinyllama.formats.shards import PackedSource, ShardError


class FeistelPermutation:
    """A seeded bijection of [0, n) in O(1) memory: a 4-round Feistel network on the next
    even power of two, cycle-walking back into range."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        bits = max(2, (max(n - 1, 1)).bit_length())
        bits += bits % 2
        self.half = bits // 2
        self.mask = (1 << self.half) - 1
        self.keys = [int.from_bytes(hashlib.blake2b(f"{seed}:{r}".encode(), digest_size=8).digest(), "little")
                     for r in range(4)]

    def _round(self, x: int, key: int) -> int:
        x = (x * 0x9E3779B97F4A7C15 + key) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
        x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        return (x ^ (x >> 32)) & self.mask

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(i)
        x = i
        while True:
            left, right = x >> self.half, x & self.mask
            for key in self.keys:
                left, right = right, left ^ self._round(right, key)
            x = (left << self.half) | right
            if x < self.n:
                return x


class Mixture:
    """Global sample index -> (seq_len + 1) tokens, mixing sources by weight."""

    def __init__(self, sources: dict[str, PackedSource], weights: dict[str, float], seq_len: int, seed: int = 0,
                 period: int = 1000, tokenizer_fingerprint: str | None = None) -> None:
        unknown = set(weights) - set(sources)
        if unknown:
            raise ShardError(f"weights name unknown source(s): {', '.join(sorted(unknown))}")
        active = {k: w for k, w in weights.items() if w > 0}
        if not active:
            raise ShardError("every source weight is zero")
        if any(w < 0 for w in weights.values()):
            raise ShardError(f"source weights must be >= 0, got {weights}")
        for name in active:
            if sources[name].num_blocks(seq_len) == 0:
                raise ShardError(f"{sources[name].path}: {sources[name].tokens} tokens, fewer than one block of "
                                f"seq_len + 1 = {seq_len + 1}")
            if tokenizer_fingerprint is not None:
                sources[name].check_tokenizer(tokenizer_fingerprint)
        fps = {sources[n].tokenizer_fingerprint for n in active}
        if len(fps) > 1:
            raise ShardError("sources were tokenized with different tokenizers: "
                            + ", ".join(f"{n}={sources[n].tokenizer_fingerprint[:12]}…" for n in active))
        self.sources = sources
        self.names = sorted(active)
        self.seq_len, self.seed, self.period = seq_len, seed, period
        total = sum(active.values())
        self.weights = {n: active[n] / total for n in self.names}
        # Largest-remainder apportionment of `period` slots.
        raw = [self.weights[n] * period for n in self.names]
        counts = [int(r) for r in raw]
        for i in sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)[: period - sum(counts)]:
            counts[i] += 1
        self.counts = counts
        self.pattern = np.repeat(np.arange(len(self.names)), counts)               # (period,)
        self._perm_cache: dict[tuple[int, int], FeistelPermutation] = {}
        self._period_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def _period_order(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        """Source id of each slot in period p, and how many earlier slots share its source."""
        if self._period_cache is None or self._period_cache[0] != p:
            order = np.random.default_rng([self.seed, p]).permutation(self.pattern)
            rank = np.empty_like(order)
            for s in range(len(self.names)):
                where = order == s
                rank[where] = np.arange(int(where.sum()))
            self._period_cache = (p, order, rank)
        return self._period_cache[1], self._period_cache[2]

    def locate(self, g: int) -> tuple[str, int]:
        """(source name, k) such that global sample g is that source's k-th sample."""
        p, o = divmod(g, self.period)
        order, rank = self._period_order(p)
        s = int(order[o])
        return self.names[s], p * self.counts[s] + int(rank[o])

    def source_block(self, g: int) -> tuple[str, int]:
        name, k = self.locate(g)
        n = self.sources[name].num_blocks(self.seq_len)
        epoch, pos = divmod(k, n)
        key = (self.names.index(name), epoch)
        perm = self._perm_cache.get(key)
        if perm is None:
            if len(self._perm_cache) > 64:
                self._perm_cache.clear()
            perm = self._perm_cache[key] = FeistelPermutation(n, seed=_stable_seed(self.seed, name, epoch))
        return name, perm(pos)

    def sample(self, g: int) -> np.ndarray:
        name, j = self.source_block(g)
        return self.sources[name].block(j, self.seq_len)

    def describe(self) -> dict:
        return {"sources": {n: {"path": str(self.sources[n].path), "tokens": self.sources[n].tokens,
                                "weight": self.weights[n]} for n in self.names},
                "seq_len": self.seq_len, "seed": self.seed, "period": self.period}


def _stable_seed(seed: int, name: str, epoch: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}:{epoch}".encode(), digest_size=8).digest(), "little")


class _MicroBatches(IterableDataset):
    def __init__(self, mixture: Mixture, micro_batch: int, rank: int, world_size: int, start: int) -> None:
        super().__init__()
        self.mixture, self.micro_batch, self.rank, self.world_size, self.start = mixture, micro_batch, rank, world_size, start

    def batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        g0 = (b * self.world_size + self.rank) * self.micro_batch
        blocks = torch.from_numpy(np.stack([self.mixture.sample(g0 + i) for i in range(self.micro_batch)]))
        return blocks[:, :-1], blocks[:, 1:]                                     # (B, L) each

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        w, W = (info.id, info.num_workers) if info is not None else (0, 1)
        b = self.start + w
        while True:
            yield self.batch(b)
            b += W


class BatchLoader:
    """Endless micro-batches for one rank, with exact `state_dict` / `load_state_dict`."""

    def __init__(self, mixture: Mixture, micro_batch: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, start_batch: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.mixture, self.micro_batch, self.rank, self.world_size = mixture, micro_batch, rank, world_size
        self.num_workers = num_workers
        self.next_batch = start_batch
        self._it: Iterator | None = None

    def _identity(self) -> dict:
        return {"micro_batch": self.micro_batch, "world_size": self.world_size, **self.mixture.describe()}

    def __iter__(self) -> "BatchLoader":
        ds = _MicroBatches(self.mixture, self.micro_batch, self.rank, self.world_size, self.next_batch)
        if self.num_workers > 0:
            self._it = iter(DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                       persistent_workers=False, prefetch_factor=2))
        else:
            self._it = iter(ds)
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            iter(self)
        x, y = next(self._it)
        self.next_batch += 1
        return x, y

    def state_dict(self) -> dict:
        return {"next_batch": self.next_batch, **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        mine = self._identity()
        changed = {k: (state.get(k), v) for k, v in mine.items() if k != "sources" and state.get(k) != v}
        src_then = {n: (s["tokens"], s["weight"]) for n, s in state.get("sources", {}).items()}
        src_now = {n: (s["tokens"], s["weight"]) for n, s in mine["sources"].items()}
        if src_then != src_now:
            changed["sources"] = (src_then, src_now)
        if changed:
            detail = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise ShardError(f"cannot resume: the data configuration changed ({detail})")
        self.next_batch = int(state["next_batch"])
        self._it = None
