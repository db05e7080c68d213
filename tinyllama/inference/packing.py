"""Inference-only weight packing for batch-1 decoding on CPU.

    pack_for_decoding(model)      # TorchBackend does this for a model loaded for inference
    ...                           # forward passes under torch.no_grad() use the packed weights
    unpack(model)                 # TorchBackend.close()

A CPU decode step is a chain of matrix-vector products, one per weight matrix, and the layout
of those weights decides how fast they stream. Packing gives the model inference-only copies:
 - one GEMV instead of several for projections that read the same input: q/k/v (3 -> 1) and
   gate/up (2 -> 1), i.e. 4 instead of 7 per block;
 - in one of two layouts: "transposed", (in_features, out_features) contiguous so `x @ Wt`
   streams it with the vector broadcast (what a small model wants: its GEMVs are small and start
   cold, and the lm_head evicts the blocks from L3), and "onednn", oneDNN's blocked layout for its
   inner-product kernel (`torch.ops.mkldnn`, what inductor's freezing pass uses), where ATen's own
   GEMV reads well below the memory bandwidth. The gains are measured by bench.decode.
Which layout wins depends on the shapes, the dtype and the machine, so pack_for_decoding times
one- and four-token forwards of the model itself (a decode step, a verification pass) unpacked
and packed each way, and keeps the fastest layout if it beats unpacked by 10%; the choice is
cached per model shape, dtype, CPU, thread count and torch, in memory and on disk. Those timings,
and the few-rows kernels' (PackedLinears), come from the module's `timer` (a
tinyllama.measure.Timer, `time_here` by default): a test sets another to choose them, by each
candidate's name (DecodeLayout, FewRowsKernel).

The model itself knows nothing of this (as gpt-fast swaps modules from outside): packing turns
each Attention into a PackedAttention whose `qkv` is one fused matmul, each MLP into a PackedMLP
(`gate_up`), and o_proj, down_proj and lm_head into PackedLinear, in place (same parameters,
same state-dict names); unpack turns them back.

Packed weights are copies. They are used only while autograd is off and the source weights are
unchanged (same modules, same Parameter objects, same storage, same version counter); training,
LoRA wrapping, `.to()` or `load_state_dict` all make them stale, and a stale pack is never used:
the module runs its plain `nn.Linear`s. Packing is skipped off CPU (cuBLAS does not care about
the layout), and the copies stay within a budget (a quarter of the memory available when
packing, at least 512 MiB; groups past it run unpacked).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tinyllama.errors import UserError
from tinyllama.measure import DecisionCache, Timer, median_seconds
from tinyllama.model.model import MLP, Attention, Llama

MIN_PACK_BUDGET = 512 * 2**20
LAYOUT_MARGIN = 0.9                # a layout must cut the step time by 10%: memory for a near-tie is waste
LAYOUTS = ("transposed", "onednn")


def _onednn_pack(w: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked layout of a (N, K) linear weight, for batch-1 calls."""
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 1)


def _onednn_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """(rows, K) @ packedᵀ -> (rows, N): oneDNN's inner product on a prepacked weight."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [None], "")


# dtype -> whether oneDNN's prepacked inner product runs here and gives F.linear's numbers
_ONEDNN_WORKS: dict[torch.dtype, bool] = {}


def onednn_supports(dtype: torch.dtype) -> bool:
    """oneDNN packing needs a torch built with mkldnn (x86 and most ARM wheels) and, for bf16 or
    fp16, CPU support; the ops are private to torch, so they are tried, not assumed."""
    if dtype not in _ONEDNN_WORKS:
        try:
            w, x = torch.randn(24, 16).to(dtype), torch.randn(3, 16).to(dtype)
            y = _onednn_linear(x, _onednn_pack(w))
            _ONEDNN_WORKS[dtype] = torch.backends.mkldnn.is_available() and \
                torch.allclose(y.float(), F.linear(x, w).float(), rtol=3e-2, atol=3e-2)
        except (RuntimeError, AttributeError, NotImplementedError):
            _ONEDNN_WORKS[dtype] = False
    return _ONEDNN_WORKS[dtype]


class PackedLinears:
    """Several bias-free nn.Linear of one module that read the same input, as one fused copy of
    cat(weights) (sum of out_features N, in_features K), so a decode step is one GEMV: stored
    transposed, (K, N) contiguous, for `x @ Wt`, or in oneDNN's blocked layout.

    A few rows at once (a speculative verification pass scores k + 1 positions) may want another
    kernel: `few_rows="rowmajor"` (single-linear packs; timed per shape) runs 2..FEW_ROWS rows
    through MKL's small-M GEMM on the source weight, `(W @ xᵀ)ᵀ`, no second copy (faster than
    `x @ Wt` for a wide lm_head; measured by bench.decode and bench.speculative). A second,
    oneDNN-layout copy for the few-rows case was tried and lost: decode and verification then
    evict each other's copy."""

    FEW_ROWS = 8

    def __init__(self, owner: nn.Module, names: Sequence[str], layout: str = "transposed",
                 few_rows: str | None = None) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
        if few_rows not in (None, "rowmajor") or (few_rows == "rowmajor" and len(names) != 1):
            raise ValueError(f"few_rows {few_rows!r}: expected None or (one linear) 'rowmajor'")
        self.owner, self.names, self.layout = owner, tuple(names), layout
        self.modules = tuple(getattr(owner, n) for n in self.names)
        self.sources = tuple(m.weight for m in self.modules)
        self.stamp = self._stamp()
        self.sizes = [w.shape[0] for w in self.sources]
        fused = torch.cat([s.detach() for s in self.sources]) if len(self.sources) > 1 else self.sources[0].detach()
        # transposed: (K, N) contiguous; onednn: oneDNN's blocked copy of the (N, K) weight
        self.weight = fused.t().contiguous() if layout == "transposed" else _onednn_pack(fused)
        self.few_rows = few_rows

    def __reduce__(self):
        # a pack is a cache: copies and pickles of the model (copy.deepcopy, torch.save) carry
        # none (oneDNN's opaque tensors cannot be copied), and the copy runs its plain linears
        return (_dropped_pack, ())

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
        if self.few_rows == "rowmajor" and 1 < rows <= self.FEW_ROWS:
            w = self.sources[0].detach()                                       # (N, K)
            y = (w @ x.reshape(rows, -1).t()).t().contiguous()                 # (rows, N)
            return (y.view(*x.shape[:-1], w.shape[0]),)
        if self.layout == "onednn":
            y = _onednn_linear(x.reshape(rows, -1), self.weight).view(*x.shape[:-1], -1)
        else:
            y = x @ self.weight
        return y.split(self.sizes, dim=-1) if len(self.sizes) > 1 else (y,)


def _dropped_pack() -> None:
    return None


# ---- installed from outside the model: packed subclasses swapped in, and out again ----------

class _Packed:
    """Mixin of the packed subclasses: `_decode_pack` is the PackedLinears (None in a copy)."""

    _decode_pack: PackedLinears | None = None

    def _pack_if_usable(self) -> PackedLinears | None:
        pack = self.__dict__.get("_decode_pack")
        return pack if pack is not None and pack.usable() else None


class PackedAttention(_Packed, Attention):
    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pack = self._pack_if_usable()
        return pack(x) if pack is not None else super().qkv(x)


class PackedMLP(_Packed, MLP):
    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pack = self._pack_if_usable()
        return pack(x) if pack is not None else super().gate_up(x)


class PackedLinear(_Packed, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pack = self._pack_if_usable()
        return pack(x)[0] if pack is not None else super().forward(x)


_PACKED_CLASS = {Attention: PackedAttention, MLP: PackedMLP, nn.Linear: PackedLinear}
_PLAIN_CLASS = {v: k for k, v in _PACKED_CLASS.items()}


def pack_of(module: nn.Module) -> PackedLinears | None:
    """The pack installed on `module` (an Attention's q/k/v, an MLP's gate/up, a Linear), if any."""
    return module.__dict__.get("_decode_pack") if isinstance(module, _Packed) else None


def installed_packs(model: nn.Module) -> list[PackedLinears]:
    return [p for m in model.modules() if (p := pack_of(m)) is not None]


def _install(target: nn.Module, pack: PackedLinears) -> None:
    target.__class__ = _PACKED_CLASS[type(target)]
    target._decode_pack = pack


def _packable(owner: nn.Module, names: Sequence[str]) -> bool:
    mods = [getattr(owner, n, None) for n in names]
    # exactly nn.Linear: LoRA, bitsandbytes and other wrappers run their own forward
    return all(type(m) is nn.Linear and m.bias is None for m in mods) and \
        len({(m.weight.shape[1], m.weight.dtype, m.weight.device) for m in mods}) == 1


def _plan(model: nn.Module) -> list[tuple[nn.Module, tuple[str, ...], nn.Module]]:
    """(owner, linear names, module the pack is installed on) for every packable group, in the
    order packs are made while the budget lasts: the lm_head first, then per layer q/k/v, o,
    gate/up and down."""
    groups: list[tuple[nn.Module, tuple[str, ...], nn.Module]] = []
    for module in model.modules():
        if type(module) is Llama:
            groups.append((module, ("lm_head",), module.lm_head))
        elif type(module) is Attention:
            groups += [(module, ("q_proj", "k_proj", "v_proj"), module), (module, ("o_proj",), module.o_proj)]
        elif type(module) is MLP:
            groups += [(module, ("gate_proj", "up_proj"), module), (module, ("down_proj",), module.down_proj)]
    return [g for g in groups if _packable(g[0], g[1])]


def pack_for_decoding(model: nn.Module, max_bytes: int | None = None, layout: str = "auto") -> int:
    """Packs the packable groups of `model` in the layout that decodes fastest here (timed once
    per model shape, dtype and thread count), within `max_bytes` of copies (default: a quarter
    of the available memory, at least MIN_PACK_BUDGET); returns the bytes packed (0: nothing
    packed, the model runs as before). layout: auto (timed), none, transposed or onednn
    (tinyllama.runtime's packing: --packing, TINYLLAMA_PACKING)."""
    unpack(model)
    ref = next(model.parameters(), None)
    if ref is None or ref.device.type != "cpu":
        return 0
    plan = _plan(model)
    if not plan:
        return 0
    budget = default_pack_budget() if max_bytes is None else max_bytes
    # what one forward reads: the few-rows timings flush this much so weights start cold
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    layout = forced_layout(ref.dtype, layout)
    if layout == "auto":
        layout = _remembered_layout(model, plan, budget, model_bytes)
    if layout is None:
        return 0
    return _pack(plan, layout, budget, flush_bytes=model_bytes)


def forced_layout(dtype: torch.dtype, value: str = "auto") -> str | None:
    """`value` checked: auto (timed), None for none, or the layout asked for."""
    if value not in ("auto", "none", *LAYOUTS):
        raise UserError(f"packing {value!r}: expected auto, none, {' or '.join(LAYOUTS)}")
    if value == "onednn" and not onednn_supports(dtype):
        raise UserError(f"packing onednn (--packing, TINYLLAMA_PACKING): oneDNN does not run {dtype} here "
                         "(torch without mkldnn, or a CPU without that dtype's instructions)")
    return None if value == "none" else value


# the fastest layout per model shape, dtype and packed size ("none": unpacked), kept per machine
# (CPU, ISA limits, threads, torch: tinyllama.measure); bump the version when the timing changes
_LAYOUTS = DecisionCache("packing-layouts", version=3)


def _remembered_layout(model: nn.Module, plan, budget: int, model_bytes: int) -> str | None:
    """The layout timed for this model shape, dtype and packed size on this machine: from
    memory, from $TINYLLAMA_CACHE/packing-layouts.json, or timed now (and saved)."""
    shapes = [list(getattr(m, n).weight.shape) for m, names, _ in plan for n in names]
    plan_bytes = _plan_bytes(plan)

    def measure() -> str:
        if plan_bytes > 256 * 2**20:               # tinyllama-1.1b: 15-40 s, so say why
            print(f"tinyllama: timing CPU decode layouts for this model shape, once (saved in {_LAYOUTS.path})",
                  file=sys.stderr, flush=True)
        return _fastest_layout(model, plan, budget, model_bytes) or "none"

    layout = _LAYOUTS.get([shapes, str(next(model.parameters()).dtype), min(budget, plan_bytes)], measure,
                          valid=lambda v: v in ("none", *LAYOUTS))
    return None if layout == "none" else layout


def default_pack_budget() -> int:
    """A quarter of MemAvailable (Linux; elsewhere MIN_PACK_BUDGET), at least MIN_PACK_BUDGET."""
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return MIN_PACK_BUDGET
    return max(MIN_PACK_BUDGET, kib * 1024 // 4)


def _plan_bytes(plan) -> int:
    return sum(getattr(m, n).weight.numel() * getattr(m, n).weight.element_size() for m, names, _ in plan for n in names)


def _pack(plan, layout: str, budget: int, flush_bytes: int | None) -> int:
    """Packs the groups of `plan` in order while the copies fit in `budget`; with flush_bytes,
    also times each shape's few-rows path (else they use the layout for any number of rows)."""
    packed = 0
    for module, names, target in plan:
        ws = [getattr(module, n).weight for n in names]
        size = sum(w.numel() * w.element_size() for w in ws)
        if packed + size > budget:
            continue
        rowmajor = flush_bytes is not None and len(ws) == 1 and \
            _rowmajor_few_rows_is_faster(*ws[0].shape, ws[0].dtype, layout, flush_bytes)
        _install(target, PackedLinears(module, names, layout=layout, few_rows="rowmajor" if rowmajor else None))
        packed += size
    return packed


VERIFY_ROWS = 4     # the rows of a typical speculative verification pass (k = 3)


class DecodeLayout:
    """A candidate of the layout timing: `model` with the groups of `plan` packed in `name`
    ("none": unpacked, or one of LAYOUTS). Its cost is a one-token forward (a decode step) plus a
    VERIFY_ROWS-token one (a speculative verification pass): where single-token times tie, the
    layout that also verifies fast wins. prepare() packs the model so (untimed); a call runs both
    forwards on the model as it is."""

    def __init__(self, model: nn.Module, name: str, plan, budget: int, model_bytes: int) -> None:
        self.model, self.name, self.plan, self.budget, self.model_bytes = model, name, plan, budget, model_bytes
        self.inputs = [torch.zeros(1, rows, dtype=torch.long) for rows in (1, VERIFY_ROWS)]

    def prepare(self) -> None:
        unpack(self.model)
        if self.name != "none":
            _pack(self.plan, self.name, self.budget, flush_bytes=self.model_bytes)

    def __call__(self) -> None:
        for ids in self.inputs:
            self.model(ids)

    def __repr__(self) -> str:
        return f"DecodeLayout({self.name})"


def _fastest_layout(model: nn.Module, plan, budget: int, model_bytes: int) -> str | None:
    """The fastest layout this machine runs, timed against unpacked by `timer`, if it beats
    unpacked by LAYOUT_MARGIN, else None. Leaves the model unpacked."""
    dtype = next(model.parameters()).dtype
    names = ["none"] + [l for l in LAYOUTS if l != "onednn" or onednn_supports(dtype)]
    candidates = [DecodeLayout(model, name, plan, budget, model_bytes) for name in names]
    try:
        seconds = dict(zip(names, timer(candidates, "race")))
    finally:
        unpack(model)
    fastest = min(names[1:], key=seconds.__getitem__, default=None)
    return fastest if fastest is not None and seconds[fastest] < LAYOUT_MARGIN * seconds["none"] else None


def _race_layouts(candidates: Sequence[DecodeLayout], rounds: int = 3) -> list[float]:
    """Seconds per decode cost of each candidate, the first (unpacked) the baseline. Up to
    `rounds` interleaved rounds, so a slow spell hits all alike, as many as fit in ~2 s; each time
    the median of several steps. A layout whose first step takes over twice the baseline is
    dropped at once (oneDNN's bf16 kernels on a CPU without bf16 instructions: seconds a step).
    A large model gets one round."""
    best = [math.inf] * len(candidates)
    steps = 3
    stop = time.perf_counter() + 2.0          # a big model gets one round: its steps are long
    with torch.inference_mode():
        for round_ in range(rounds):
            if time.perf_counter() > stop:
                break
            for i, candidate in enumerate(candidates):
                if round_ and best[i] == math.inf:
                    continue                      # given up in the first round
                candidate.prepare()
                cost = _decode_cost(candidate.model, candidate.inputs, steps, give_up=2 * best[0] if i else math.inf)
                best[i] = min(best[i], cost)
                # ~0.1 s of steps per layout and round: many for a small model, 3 for 1.1B
                steps = max(steps, min(30, int(0.1 / max(best[0], 1e-6))))
    return best


def _decode_cost(model: nn.Module, inputs: Sequence[torch.Tensor], steps: int, give_up: float) -> float:
    """Median seconds of a forward on each input, summed; inf as soon as a timed call exceeds
    `give_up`."""
    cost = 0.0
    for ids in inputs:
        cost += median_seconds(lambda: model(ids), repeats=steps, warmup=1, give_up=give_up)
        if cost == math.inf:
            break
    return cost


def unpack(model: nn.Module) -> None:
    """Removes every pack: the packed subclasses become the plain modules again (frees the copies)."""
    for module in model.modules():
        if isinstance(module, _Packed):
            module.__dict__.pop("_decode_pack", None)
            module.__class__ = _PLAIN_CLASS[type(module)]


class FewRowsKernel:
    """A candidate of the few-rows timing: `name` ("rowmajor", or the layout of the packed copy)
    and its kernel on VERIFY_ROWS rows. prepare() reads `flush` (what the rest of a decode step
    reads), so the weights start as cold as they would there."""

    def __init__(self, name: str, run: Callable[[], torch.Tensor], flush: torch.Tensor) -> None:
        self.name, self.run, self.flush = name, run, flush

    def prepare(self) -> None:
        self.flush.sum()

    def __call__(self) -> torch.Tensor:
        return self.run()

    def __repr__(self) -> str:
        return f"FewRowsKernel({self.name})"


def _time_cold(candidates: Sequence[FewRowsKernel], repeats: int = 7) -> list[float]:
    """Median seconds of each candidate, each run right after its prepare(), runs interleaved so
    a slow spell of the machine hits all alike."""
    times: list[list[float]] = [[] for _ in candidates]
    with torch.no_grad():
        for _ in range(repeats):
            for c, ts in zip(candidates, times):
                c.prepare()
                t0 = time.perf_counter()
                c()
                ts.append(time.perf_counter() - t0)
    return [sorted(ts)[len(ts) // 2] for ts in times]


# (out_features, in_features, dtype, layout) -> whether `(W @ xᵀ)ᵀ` beat the layout's copy on 4 rows
_ROWMAJOR_FEW_ROWS_IS_FASTER: dict[tuple, bool] = {}


def _rowmajor_few_rows_is_faster(out_features: int, in_features: int, dtype: torch.dtype, layout: str,
                                 flush_bytes: int) -> bool:
    """MKL's small-M GEMM on the row-major weight against the `layout` copy for VERIFY_ROWS token
    rows, timed cold once per shape, dtype and layout; it must win by 20% (the real wins are 2-3x)."""
    key = (out_features, in_features, dtype, layout)
    if key not in _ROWMAJOR_FEW_ROWS_IS_FASTER:
        w = torch.randn(out_features, in_features).to(dtype)
        x = torch.randn(VERIFY_ROWS, in_features).to(dtype)
        if layout == "onednn":
            p = _onednn_pack(w)
            packed = lambda: _onednn_linear(x, p)
        else:
            wt = w.t().contiguous()
            packed = lambda: x @ wt
        flush = torch.ones(min(flush_bytes, 256 * 2**20) // 4 + 1)
        base, rowmajor = timer([FewRowsKernel(layout, packed, flush),
                                FewRowsKernel("rowmajor", lambda: (w @ x.t()).t().contiguous(), flush)], "cold")
        _ROWMAJOR_FEW_ROWS_IS_FASTER[key] = rowmajor < 0.8 * base
    return _ROWMAJOR_FEW_ROWS_IS_FASTER[key]


def time_here(candidates: Sequence, how: str) -> list[float]:
    """The default `timer`: seconds per call of each candidate on this machine. how: "race"
    (DecodeLayouts, _race_layouts) or "cold" (FewRowsKernels, _time_cold)."""
    if how == "race":
        return _race_layouts(candidates)
    if how == "cold":
        return _time_cold(candidates)
    raise ValueError(f"how {how!r}: expected race or cold")


# Where every timing of this module comes from: set it to another Timer to choose them (tests).
timer: Timer = time_here


def forget_decisions() -> None:
    """Drops the layout and few-rows decisions kept in memory (tests; the file is left as it is)."""
    _LAYOUTS.forget()
    _ROWMAJOR_FEW_ROWS_IS_FASTER.clear()
