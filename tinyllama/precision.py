"""The compute dtype, chosen by measurement: `auto` is bf16 only where bf16 is faster here.

    choice = choose_dtype("auto", "cpu", ModelConfig.from_name("tinyllama-19m"), work="train", rows=2048)
    choice.dtype            # torch.float32 on an AVX2-only CPU, torch.bfloat16 on an AMX Xeon
    print(choice)           # "float32 (auto: bf16 matmul ...x slower than float32 (...) on <CPU> (avx2, ...))"

On a CPU, bf16 speed is a property of the instruction set, not of torch: with AMX or AVX-512
BF16 a bf16 matmul runs several times faster than a float32 one, while without them (AVX2
laptops, AMD Zen 2/3, many cloud CPUs) torch emulates it, far slower. So `auto` times a
float32 and a bf16 matmul of the model's own shapes, as the work will run them (training: many
rows of tokens, a GEMM; decoding: one row, a GEMV), and picks bf16 only when it wins by a clear
margin. The decision is cached per machine (tinyllama.measure.DecisionCache) and costs well
under a second the first time, because an emulated bf16 matmul is abandoned after one call. On
CUDA, `auto` is bf16 where the device supports it. An explicit dtype always wins.

Every timing goes through the module's `timer` (a tinyllama.measure.Timer, `time_here` by
default): a test sets another to choose the timings of each MatmulChain it is asked about.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from tinyllama.cli import DTYPE_NAMES
from tinyllama.model.config import ModelConfig
from tinyllama.errors import UserError
from tinyllama.measure import DecisionCache, Timer, cpu_identity, median_seconds

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = DTYPE_NAMES                          # what the CLIs offer: auto and DTYPES' names
WORKS = ("train", "decode")
# bf16 must cut the matmul time by this much: autocast adds casts (training), and a near-tie
# is not worth bf16's lost precision: in decoding it also changes greedy outputs. The decode
# probe overstates bf16's gain against real decoding (the probe is set beside real steps by
# bench.dtype_choice and bench.decode), so it must show 1.43x
MARGIN = {"train": 0.8, "decode": 0.7}
FLOPS_PER_PROBE = 1e9            # each training probe matmul: ~10 ms of float32 on a laptop
DECODE_PROBE_BYTES = 256 * 2**20  # float32 layer weights in the decode probe: beyond any L3
SAMPLE_SECONDS = 0.01            # each timing sample repeats its matmul chain at least this long
# What `auto` is on a CPU without measuring: the test suite's forced tiers (float32 or bfloat16,
# even where bf16 is emulated), and a user who wants one answer for every stage.
FORCE_ENV = "TINYLLAMA_AUTO_DTYPE"
_CACHE = DecisionCache("dtype-choices", version=8)


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | str | None:
    """'auto' stays 'auto'; a name becomes its torch dtype; None stays None (keep what is stored)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).strip().lower().removeprefix("torch.")
    if name == "auto":
        return "auto"
    aliases = {"bf16": "bfloat16", "fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16"}
    name = aliases.get(name, name)
    if name not in DTYPES:
        raise UserError(f"dtype {value!r}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def choose_dtype(requested: str | torch.dtype | None, device: str | torch.device, cfg: ModelConfig,
                 work: str = "train", rows: int = 2048) -> DtypeChoice:
    """The dtype to compute in: `requested` if explicit, else measured for `work` on `device`.

    cfg: the model (its d_model, ffn_dim and vocabulary are the probe's matmul shapes);
    work: "train" (autocast over `rows` tokens per micro-batch) or "decode" (one token per step).
    """
    if work not in WORKS:
        raise ValueError(f"work {work!r}: expected one of {', '.join(WORKS)}")
    dtype = parse_dtype(requested if requested is not None else "auto")
    if isinstance(dtype, torch.dtype):
        return DtypeChoice(dtype, "as asked")
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_choice(device, work)
    if device.type != "cpu":
        return DtypeChoice(torch.float32, f"auto: float32 on {device.type}")
    forced = forced_dtype()
    if forced is not None:
        return DtypeChoice(forced, f"auto: {FORCE_ENV}={os.environ[FORCE_ENV]} (not measured)")
    if work == "train" and not has_bf16_instructions():
        return DtypeChoice(torch.float32, f"auto: float32: no bf16 matrix instructions (AVX-512 BF16, AMX) on "
                                          f"{cpu_identity().describe()}, so a bf16 GEMM is emulated")
    shapes = _train_shapes(cfg, rows) if work == "train" else _decode_shapes(cfg)
    measured = _CACHE.get([work, shapes], lambda: _measure_matmuls(shapes, MARGIN[work]),
                          valid=lambda v: isinstance(v, dict) and v.get("dtype") in DTYPES)
    return DtypeChoice(DTYPES[measured["dtype"]], _reason(measured))


def forced_dtype() -> torch.dtype | None:
    """$TINYLLAMA_AUTO_DTYPE as a dtype (float32 or bfloat16); None when unset."""
    value = os.environ.get(FORCE_ENV, "").strip()
    if not value:
        return None
    dtype = parse_dtype(value)
    if dtype not in (torch.float32, torch.bfloat16):
        raise UserError(f"{FORCE_ENV}={value!r}: expected float32 or bfloat16 (or unset: measure)")
    return dtype


def has_bf16_instructions() -> bool:
    """False on an x86 CPU without AVX-512 BF16 or AMX: there a bf16 GEMM (training) is emulated,
    far slower than float32, and timing it can only mislead: on a loaded machine a float32
    probe slowed by other work once lost to it. Decoding is still measured there: its GEMVs
    stream weights, and bf16 halves the bytes (a large model can decode faster in bf16 even
    there; measured by bench.decode). Elsewhere (ARM, unknown CPUs) the measurement decides."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    return cpu_identity().isa in ("amx", "avx512-bf16")


def _cuda_choice(device: torch.device, work: str) -> DtypeChoice:
    name = torch.cuda.get_device_name(device)
    if torch.cuda.is_bf16_supported():
        return DtypeChoice(torch.bfloat16, f"auto: {name} supports bf16")
    if work == "decode":       # fp16 inference needs no loss scaling
        return DtypeChoice(torch.float16, f"auto: {name} has no bf16; float16 for inference")
    return DtypeChoice(torch.float32, f"auto: {name} has no bf16")


def _train_shapes(cfg: ModelConfig, rows: int) -> list[list[int]]:
    """[rows, in, out] of the model's SwiGLU up and down projections (most of a block's FLOPs),
    rows cut to 64-256 (~FLOPS_PER_PROBE each): enough for a GEMM to run compute-bound."""
    m = min(rows, max(64, min(256, int(FLOPS_PER_PROBE / (2 * cfg.d_model * cfg.ffn_dim)))))
    return [[m, cfg.d_model, cfg.ffn_dim], [m, cfg.ffn_dim, cfg.d_model]]


def _measure_matmuls(shapes: list[list[int]], margin: float) -> dict:
    """Times float32, then bf16 (given up after one call of its first matmul when that alone
    takes 4x float32's share: an emulated bf16 then costs well under a second, not minutes), then
    both again interleaved (_race), so that a load on the machine slows both alike."""
    flops = [2 * m * k * n for m, k, n in shapes]
    fp32_chains = _layout_chains(shapes, torch.float32)
    fp32 = min(timer(fp32_chains, "race"))
    first_share = flops[0] / sum(flops)
    (once,) = timer([MatmulChain(shapes[:1], torch.bfloat16)], "first call")
    if once > 4 * fp32 * first_share:
        bf16 = once / first_share
    else:
        bf16_chains = _layout_chains(shapes, torch.bfloat16)
        times = timer(fp32_chains + bf16_chains, "race")
        fp32, bf16 = min(fp32, *times[:len(fp32_chains)]), min(times[len(fp32_chains):])
    return _decision(bf16 / fp32, margin, "matmul" if shapes[0][0] > 1 else "decode GEMVs",
                     f"{sum(flops) / bf16 / 1e9:.1f} vs {sum(flops) / fp32 / 1e9:.1f} GFLOP/s")


def _decode_shapes(cfg: ModelConfig) -> list[list[int]]:
    """One token through the model's own chain of GEMVs (q/k/v, o, gate/up, down per layer, then
    lm_head), for up to DECODE_PROBE_BYTES of float32 layer weights. A decode step streams its
    weights, so whether they fit in the caches decides the winner: bf16 halves the bytes, while
    its conversions cost more than they save on small, cache-warm weights. Real decoding in each
    dtype (TorchBackend, best layout each), to set beside this probe's choice, is measured by
    bench.decode."""
    d, heads = cfg.d_model, cfg.n_head * cfg.head_dim
    layer = [[1, d, heads + 2 * cfg.kv_dim], [1, heads, d], [1, d, 2 * cfg.ffn_dim], [1, cfg.ffn_dim, d]]
    layer_bytes = 4 * sum(k * n for _, k, n in layer)
    n_layers = max(1, min(cfg.n_layer, DECODE_PROBE_BYTES // layer_bytes))
    return [shape for _ in range(n_layers) for shape in layer] + [[1, d, cfg.vocab_size]]


def _decision(ratio: float, margin: float, what: str, figures: str) -> dict:
    return {"dtype": "bfloat16" if ratio < margin else "float32", "ratio": round(ratio, 4), "what": what,
            "figures": figures, "margin": margin}


def _operands(shape: list[int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Constant operands: filling is all they cost, and values do not change a CPU kernel's speed."""
    m, k, n = shape
    return torch.full((m, k), 0.5, dtype=dtype), torch.full((n, k), 0.01, dtype=dtype)


class MatmulChain:
    """One pass through matmuls of `shapes` ([rows, in, out] each) in `dtype`, in order, as the
    model runs them (so weights larger than the caches stream from memory): what the probe times.
    layout: "linear" keeps each weight (out, in) for F.linear; "transposed" stores it (in, out)
    contiguous for `x @ w`, as TorchBackend's packing may."""

    def __init__(self, shapes: Sequence[Sequence[int]], dtype: torch.dtype, layout: str = "linear") -> None:
        self.shapes, self.dtype, self.layout = [list(s) for s in shapes], dtype, layout
        operands = [_operands(shape, dtype) for shape in self.shapes]
        if layout == "transposed":
            operands = [(x, w.t().contiguous()) for x, w in operands]          # (in, out): x @ w
        self._operands = operands

    @torch.no_grad()
    def __call__(self) -> None:
        for x, w in self._operands:
            F.linear(x, w) if self.layout == "linear" else x @ w

    def __repr__(self) -> str:
        return f"MatmulChain({len(self.shapes)} matmuls, {self.dtype}, {self.layout})"


def _layout_chains(shapes: list[list[int]], dtype: torch.dtype) -> list[MatmulChain]:
    """The chain per weight layout worth timing. A decode chain (one row) also runs with the
    weight transposed: TorchBackend's packing picks the layout too, and float32 GEMVs gain most
    from it (measured by bench.decode). The transposed layout is dropped when its first pass takes
    twice the plain one's (bf16 `x @ Wt` on a CPU without bf16 instructions is far slower than
    F.linear)."""
    chains = [MatmulChain(shapes, dtype)]
    if shapes[0][0] == 1:
        (first,) = timer(chains, "first pass")
        transposed = MatmulChain(shapes, dtype, "transposed")
        if timer([transposed], "first pass")[0] <= 2 * first:
            chains.append(transposed)
    return chains


def time_here(candidates: Sequence[Callable[[], object]], how: str) -> list[float]:
    """The default `timer`: seconds per call of each candidate on this machine. how: "race"
    (_race: the fastest of interleaved samples), "first call" (one timed call after one untimed:
    kernel selection, weight packing) or "first pass" (one call, cold: enough to drop a layout
    that takes twice another's)."""
    if how == "race":
        return _race(list(candidates))
    if how not in ("first call", "first pass"):
        raise ValueError(f"how {how!r}: expected race, first call or first pass")
    return [median_seconds(c, repeats=1, warmup=1 if how == "first call" else 0) for c in candidates]


# Where every timing above comes from: set it to another Timer to choose the timings (tests).
timer: Timer = time_here


def _race(chains: list[Callable[[], None]], rounds: int = 5, budget_s: float = 2.0) -> list[float]:
    """Seconds per call of each chain: the fastest of `rounds` samples, taken in turn (one sample
    of each chain per round), each sample repeating its chain for at least SAMPLE_SECONDS. A
    tiny model's pass is so short that one call's jitter could decide the choice (the same CPU
    chose differently in two runs; bench.dtype_choice repeats the probe); the fastest of long
    samples is what the hardware does when nothing else runs."""
    repeats = [max(1, math.ceil(SAMPLE_SECONDS / max(median_seconds(c, repeats=1, warmup=1), 1e-9)))
               for c in chains]
    best = [math.inf] * len(chains)
    start = time.perf_counter()
    for r in range(rounds):
        for i, (chain, n) in enumerate(zip(chains, repeats)):
            t0 = time.perf_counter()
            for _ in range(n):
                chain()
            best[i] = min(best[i], (time.perf_counter() - t0) / n)
        if r >= 1 and time.perf_counter() - start > budget_s:
            break
    return best


def _reason(measured: dict) -> str:
    ratio = measured["ratio"]
    speed = f"{1 / ratio:.1f}x faster" if ratio < 1 else f"{ratio:.1f}x slower"
    short = f", not the {1 / measured['margin']:.2f}x bf16 needs," if ratio < 1 and measured["dtype"] == "float32" else ""
    return (f"auto: bf16 {measured['what']} {speed} than float32 ({measured['figures']}){short} on "
            f"{cpu_identity().describe()}")
