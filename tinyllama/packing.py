"""Inference-only weight packing for batch-1 decoding on CPU.

    pack_for_decoding(model)      # TorchBackend does this; generate() on a bare Llama too
    ...                           # forward passes under torch.no_grad() use the packed weights
    unpack(model)

A CPU decode step is a chain of matrix-vector products, one per weight matrix, and a small
model's step is dominated by them: tinyllama-19m reads 12 MB of block weights and a 33 MB
lm_head per token, and the lm_head read evicts the blocks from a 32 MB L3, so every block GEMV
starts cold. Two things make those reads cheaper (measured on this project's 2-core EPYC, fp32):
 - one GEMV instead of several for projections that read the same input: q/k/v (3 -> 1) and
   gate/up (2 -> 1), i.e. 4 instead of 7 per block;
 - the weight stored transposed, (in_features, out_features) contiguous, so `x @ Wt` streams
   it with the vector broadcast (1.1 ms vs 3.6 ms for the 32000x256 lm_head; 99 us vs 2x113 us
   cold for gate+up of the 19M block).
Together: 3.65 -> 3.08 ms per 19M token (fusing without transposing: no gain). Neither helps
tinyllama-1.1b in bf16 (ATen's bf16 GEMV is slower transposed), so each fused shape and dtype
is timed once, cold, in the conditions of a decode step, and packed only where `x @ Wt` wins
by a clear margin (20%).

Packed weights are copies. They are used only while autograd is off and the source weights are
unchanged (same modules, same Parameter objects, same storage, same version counter); training,
LoRA wrapping, `.to()` or `load_state_dict` all make them stale, and a stale pack is never used:
the module runs its plain `nn.Linear`s. Packing is skipped off CPU (cuBLAS does not care about
the layout) and when the copies would exceed MAX_PACKED_BYTES.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MAX_PACKED_BYTES = 512 * 2**20     # a bigger model's GEMVs stream from DRAM either way

# (out_features, in_features, dtype) -> whether `x @ Wt` beat `F.linear(x, W)` when timed cold
_TRANSPOSED_IS_FASTER: dict[tuple, bool] = {}


class PackedLinears:
    """Several bias-free nn.Linear of one module that read the same input, as one weight kept
    transposed: Wt = cat(weights)ᵀ, (in_features, sum of out_features) contiguous, so a decode
    step is one `x @ Wt`.

    A few rows at once (a speculative verification pass scores k + 1 positions) are another
    matter: MKL's small-M GEMM on the original row-major weight, `(W @ xᵀ)ᵀ`, can beat both
    layouts by 2x (the 32000x256 lm_head, 2-8 rows: 1.2-2.9 ms vs 3-6 ms for `x @ Wt` and 7-8 ms
    for F.linear). `few_rows_rowmajor` (single-linear packs; timed) says to use it for 2..FEW_ROWS
    rows; the source weight is used as is, no second copy."""

    FEW_ROWS = 8

    def __init__(self, owner: nn.Module, names: Sequence[str], few_rows_rowmajor: bool = False) -> None:
        self.owner, self.names = owner, tuple(names)
        self.modules = tuple(getattr(owner, n) for n in self.names)
        self.sources = tuple(m.weight for m in self.modules)
        self.stamp = self._stamp()
        self.sizes = [w.shape[0] for w in self.sources]
        self.weight = torch.cat([s.detach() for s in self.sources]).t().contiguous()   # (K, N)
        self.few_rows_rowmajor = few_rows_rowmajor and len(self.sources) == 1

    def _stamp(self) -> list:
        return [(w.data_ptr(), w._version) for w in self.sources]     # .to() / in-place updates

    def usable(self) -> bool:
        """Under no_grad and with the source weights unchanged since packing (a few µs)."""
        if torch.is_grad_enabled():
            return False
        for n, m, w in zip(self.names, self.modules, self.sources):
            if getattr(self.owner, n) is not m or m.weight is not w:
                return False
        return self._stamp() == self.stamp

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (..., K) -> one (..., out_i) per source linear."""
        rows = x.numel() // x.shape[-1]
        if self.few_rows_rowmajor and 1 < rows <= self.FEW_ROWS:
            w = self.sources[0].detach()                                       # (N, K)
            y = (w @ x.reshape(rows, -1).t()).t().contiguous()                 # (rows, N)
            return (y.view(*x.shape[:-1], w.shape[0]),)
        y = x @ self.weight
        return y.split(self.sizes, dim=-1) if len(self.sizes) > 1 else (y,)


def project(packed: PackedLinears | None, linears: Sequence[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The outputs of `linears` on x: through their pack when it is usable, else one by one."""
    if packed is not None and packed.usable():
        return packed(x)
    return tuple(lin(x) for lin in linears)


# (module attribute that holds the pack, the linears it packs) for each kind of module
_GROUPS = {
    "Attention": (("packed_qkv", ("q_proj", "k_proj", "v_proj")), ("packed_o", ("o_proj",))),
    "MLP": (("packed_gate_up", ("gate_proj", "up_proj")), ("packed_down", ("down_proj",))),
    "Llama": (("packed_lm_head", ("lm_head",)),),
}


def _packable(owner: nn.Module, names: Sequence[str]) -> bool:
    mods = [getattr(owner, n, None) for n in names]
    # exactly nn.Linear: LoRA, bitsandbytes and other wrappers run their own forward
    return all(type(m) is nn.Linear and m.bias is None for m in mods) and \
        len({(m.weight.shape[1], m.weight.dtype, m.weight.device) for m in mods}) == 1


def pack_for_decoding(model: nn.Module) -> int:
    """Packs every packable group of `model` whose timing favours it; returns the bytes packed
    (0: nothing packed, the model runs as before)."""
    unpack(model)
    ref = next(model.parameters(), None)
    if ref is None or ref.device.type != "cpu":
        return 0
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    plan = []
    for module in model.modules():
        for attr, names in _GROUPS.get(type(module).__name__, ()):
            if hasattr(module, attr) and _packable(module, names):
                plan.append((module, attr, names))
    shapes = {(sum(getattr(m, n).weight.shape[0] for n in names), getattr(m, names[0]).weight.shape[1],
               getattr(m, names[0]).weight.dtype) for m, _, names in plan}
    faster = {s: _transposed_is_faster(*s, flush_bytes=weight_bytes) for s in shapes}
    packed = 0
    for module, attr, names in plan:
        ws = [getattr(module, n).weight for n in names]
        if not faster[(sum(w.shape[0] for w in ws), ws[0].shape[1], ws[0].dtype)]:
            continue           # fusing alone (no transpose) measured no gain: keep the memory
        size = sum(w.numel() * w.element_size() for w in ws)
        if packed + size > MAX_PACKED_BYTES:
            continue
        rowmajor = len(names) == 1 and _rowmajor_few_rows_is_faster(*ws[0].shape, ws[0].dtype, weight_bytes)
        setattr(module, attr, PackedLinears(module, names, few_rows_rowmajor=rowmajor))
        packed += size
    return packed


def unpack(model: nn.Module) -> None:
    """Drops every pack (frees the copies)."""
    for module in model.modules():
        for attr, _ in _GROUPS.get(type(module).__name__, ()):
            if getattr(module, attr, None) is not None:
                setattr(module, attr, None)


def _time_cold(candidates: Sequence, flush_bytes: int, repeats: int = 7) -> list[float]:
    """Median seconds of each callable, each run after reading `flush_bytes` (what the rest of
    a decode step reads, so weights start as cold as they would there), runs interleaved so a
    slow spell of the machine hits all alike."""
    flush = torch.ones(min(flush_bytes, 256 * 2**20) // 4 + 1)
    times: list[list[float]] = [[] for _ in candidates]
    with torch.no_grad():
        for _ in range(repeats):
            for f, ts in zip(candidates, times):
                flush.sum()
                t0 = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t0)
    return [sorted(ts)[len(ts) // 2] for ts in times]


def _clearly_faster(cache: dict, out_features: int, in_features: int, dtype: torch.dtype, rows: int,
                    baseline, candidate, flush_bytes: int) -> bool:
    """Whether candidate(x, W, Wt) beats baseline(x, W, Wt) by 20% on `rows` token rows, timed
    cold once per shape and dtype (a clear margin: the real wins are 1.4-3x, and a noisy near-tie
    must not cost memory)."""
    key = (out_features, in_features, dtype)
    if key not in cache:
        w = torch.randn(out_features, in_features).to(dtype)
        wt = w.t().contiguous()
        x = torch.randn(rows, in_features).to(dtype)
        base, cand = _time_cold([lambda: baseline(x, w, wt), lambda: candidate(x, w, wt)], flush_bytes)
        cache[key] = cand < 0.8 * base
    return cache[key]


# (out_features, in_features, dtype) -> whether `(W @ xᵀ)ᵀ` beat `x @ Wt` for 4 rows, timed cold
_ROWMAJOR_FEW_ROWS_IS_FASTER: dict[tuple, bool] = {}


def _rowmajor_few_rows_is_faster(out_features: int, in_features: int, dtype: torch.dtype, flush_bytes: int) -> bool:
    return _clearly_faster(_ROWMAJOR_FEW_ROWS_IS_FASTER, out_features, in_features, dtype, 4,
                           lambda x, w, wt: x @ wt, lambda x, w, wt: (w @ x.t()).t().contiguous(), flush_bytes)


def _transposed_is_faster(out_features: int, in_features: int, dtype: torch.dtype, flush_bytes: int) -> bool:
    """`F.linear(x, W)` against `x @ Wt` for one token, timed cold; cached per shape and dtype."""
    return _clearly_faster(_TRANSPOSED_IS_FASTER, out_features, in_features, dtype, 1,
                           lambda x, w, wt: F.linear(x, w), lambda x, w, wt: x @ wt, flush_bytes)
