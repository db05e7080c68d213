"""Decoding in static shapes, captured as CUDA graphs: what keeps a small model from being
host-bound on a GPU.

Eager decoding issues ~850 torch calls per token for tinyllama-1.1b (~39 per layer: measure
with `count_torch_calls`); at 5-10 µs of launch overhead each, that is 4-9 ms per token on any
GPU, while reading the 2.2 GB of bf16 weights takes ~0.5 ms on an H200. A CUDA graph replays
the whole step's kernels with one launch. Capture needs every shape and address fixed, which
the eager path does not give (the KV cache is read up to a Python-int end that grows each
step). The static step (`Step.static`, tinyllama.model.cache) instead:

  - writes K/V at a positions tensor (index_copy_) into the preallocated cache,
  - attends over the whole cache with a (T, S) mask built once per step from the positions,
  - gathers the rotary tables at the positions.

So one step of T tokens has the same shapes at every position, and `StaticDecoder` captures
one graph per T (1 for decoding, k+1 for a speculative verification) and replays it. On a CPU
the same static step runs eagerly (tested equal to the dynamic path there).

    decoder = StaticDecoder(model, max_seq_len=2048)        # allocates its own KV cache
    logits = decoder.step([token], start_pos=n)             # (T, vocab) float32
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

import torch
from torch.overrides import TorchFunctionMode

from tinyllama.model.cache import KVCache, Step
from tinyllama.model.model import Llama

# calls that are metadata or views: no kernel launch
_FREE = {"view", "transpose", "__getitem__", "unsqueeze", "reshape", "flatten", "dim", "size", "shape", "__get__",
         "is_cuda", "device", "dtype", "contiguous", "numel", "is_meta", "expand", "data_ptr", "is_floating_point",
         "__len__", "__hash__", "__eq__", "__bool__", "__index__", "__int__", "requires_grad", "is_inference", "type"}


class _CallCounter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name not in _FREE:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def count_torch_calls(fn: Callable[[], object]) -> tuple[int, Counter]:
    """(torch-level calls `fn` makes that are not views or metadata, by name): each is at least
    one kernel launch on a GPU in eager mode."""
    counter = _CallCounter()
    with counter:
        fn()
    return sum(counter.calls.values()), counter.calls


class StaticDecoder:
    """Steps of T tokens (batch 1) at given positions over its own preallocated KV cache of
    `max_seq_len` (static steps): captured as one CUDA graph per T on CUDA (`capture=None`: when
    the model is on CUDA), run eagerly otherwise. The graphs write into `cache` at fixed
    addresses, so it lives as long as they do (`reset()` makes both again)."""

    def __init__(self, model: Llama, max_seq_len: int | None = None, capture: bool | None = None) -> None:
        self.model = model.eval()
        self.device = model.lm_head.weight.device
        self.max_seq_len = max_seq_len or model.config.max_seq_len
        self.capture = self.device.type == "cuda" if capture is None else capture
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.reset()

    def reset(self) -> None:
        """A fresh cache (and rotary tables) of max_seq_len on the model's device; graphs re-captured."""
        self.cache = KVCache.for_model(self.model, batch_size=1, max_seq_len=self.max_seq_len)
        self.model.rope.build(self.max_seq_len, device=self.device)
        self._graphs.clear()

    @torch.inference_mode()
    def _run(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids (1, T), positions (T,) -> logits (T, vocab) in the model's dtype."""
        step = Step.static(positions, self.max_seq_len)                  # its (T, S) mask, inside the graph
        return self.model.head(self.model.hidden_states(ids, self.cache, step)[0])

    def step(self, tokens: Sequence[int], start_pos: int) -> torch.Tensor:
        """Logits (T, vocab) float32 on the CPU for `tokens` at positions [start_pos, start_pos + T)."""
        T = len(tokens)
        if start_pos + T > self.max_seq_len:
            raise ValueError(f"position {start_pos + T} > the static cache's {self.max_seq_len}")
        ids = torch.tensor([list(tokens)], device=self.device)
        positions = torch.arange(start_pos, start_pos + T, device=self.device)
        if not self.capture:
            return self._run(ids, positions).float().cpu()
        graph, ids_in, pos_in, out = self._graph(T)
        ids_in.copy_(ids)
        pos_in.copy_(positions)
        graph.replay()
        return out.float().cpu()

    def _graph(self, T: int):
        if T not in self._graphs:
            ids_in = torch.zeros(1, T, dtype=torch.long, device=self.device)
            # a capture writes K/V at these positions; the last ones, which a real step at
            # that position overwrites before reading (causal), keep the warm-up harmless
            pos_in = torch.arange(self.max_seq_len - T, self.max_seq_len, device=self.device)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):                       # warm-up: lazy inits stay out of the graph
                    self._run(ids_in, pos_in)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._run(ids_in, pos_in)
            self._graphs[T] = (graph, ids_in, pos_in, out)
        return self._graphs[T]
