"""Choosing by measurement: what this CPU is, how long a call takes, and decisions kept per machine.

    cpu = cpu_identity()                     # CPUIdentity(model='AMD EPYC', isa='avx2', ...)
    seconds = median_seconds(fn, repeats=5)  # warmed up once
    cache = DecisionCache("dtype-choices")   # $TINYLLAMA_CACHE/dtype-choices.json
    value = cache.get(["train", shape], lambda: measure_it())   # timed once per machine and key

Decisions made by timing (tinyllama.precision's dtype, tinyllama.inference.packing's decode
layouts) take their timings from their module's `timer`, a Timer: by default the module's own
`time_here`; a test or a replay sets another there to choose the timings, and the decision, its
margins and its cache run as they do.

A default that depends on the hardware (bf16 or float32, a weight layout) is chosen by timing
it here, never by the machine this code was written on: bf16 is several times faster than
float32 with AMX and far slower where it is emulated (AVX2 only; bench.dtype_choice measures
it). Decisions are keyed by the CPU's model and
instruction-set flags, the ISA limits set in the environment (ONEDNN_MAX_CPU_ISA and
ATEN_CPU_CAPABILITY, which make an AMX machine behave like an AVX2 one), the thread count and
the torch version, so a cached decision never crosses machines or settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from tinyllama.atomic import atomic_file
from tinyllama.llamacpp.build import cpu_flags
from tinyllama.paths import cache_dir

# The flags that decide which matmul kernels exist (x86 and ARM names as /proc/cpuinfo spells them)
_ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
              "amx_tile", "amx_bf16", "amx_int8", "asimd", "asimddp", "i8mm", "bf16", "sve")
ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
# x86 matrix levels, highest first, each with the flag that shows it
_X86_LEVELS = (("amx", "amx_bf16"), ("avx512-bf16", "avx512_bf16"), ("avx512", "avx512f"), ("avx2", "avx2"),
               ("baseline", None))
_X86_ORDER = [level for level, _ in _X86_LEVELS]


def _limit_level(limit: str) -> str | None:
    """The level an ISA limit ("ONEDNN_MAX_CPU_ISA=AVX2") caps a CPU at; None: no cap. oneDNN runs
    the bf16 GEMMs, so its limit decides whether they are native. ATEN_CPU_CAPABILITY limits torch's
    own vector kernels: `default` and `avx2` cap there, `avx512` leaves oneDNN's bf16 as it is."""
    name, _, value = limit.partition("=")
    value = value.strip().upper()
    if name == "ONEDNN_MAX_CPU_ISA":
        if "AMX" in value or value in ("", "ALL", "DEFAULT"):
            return None
        if value.startswith(("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10")):
            return "avx512-bf16"
        if value.startswith("AVX512"):
            return "avx512"
        return "avx2" if value.startswith("AVX2") else "baseline"
    if name == "ATEN_CPU_CAPABILITY":
        return {"DEFAULT": "baseline", "AVX2": "avx2"}.get(value)
    return None


@dataclass(frozen=True)
class CPUIdentity:
    model: str                     # "AMD EPYC", "Intel(R) Xeon(R) Platinum 8480+"
    flags: tuple[str, ...]         # the matmul-relevant ISA flags present
    capability: str                # what torch dispatches to: "AVX2", "AVX512", "DEFAULT"
    limits: tuple[str, ...]        # ISA limits from the environment, "ONEDNN_MAX_CPU_ISA=AVX2"

    @property
    def isa(self) -> str:
        """The matrix level in one word: amx, avx512-bf16, avx512, avx2, neon or baseline; the
        environment's limits lower it (an AMX Xeon under ONEDNN_MAX_CPU_ISA=AVX2 is avx2, as its
        kernels are), so a CPU_ISA=avx2 run decides as an AVX2-only CPU would."""
        f = set(self.flags)
        if "asimd" in f or platform.machine() in ("arm64", "aarch64"):
            return "neon"
        present = next(level for level, flag in _X86_LEVELS if flag is None or flag in f)
        caps = [cap for cap in map(_limit_level, self.limits) if cap is not None]
        return max([present, *caps], key=_X86_ORDER.index)       # the lowest level wins

    def describe(self) -> str:
        """'AMD EPYC (avx2, torch AVX2), 2 threads' (+ the environment's limits)."""
        limits = f"; {' '.join(self.limits)}" if self.limits else ""
        return f"{self.model} ({self.isa}, torch {self.capability}{limits}), {torch.get_num_threads()} threads"


_IDENTITY: CPUIdentity | None = None


def cpu_identity() -> CPUIdentity:
    global _IDENTITY
    if _IDENTITY is None:
        model, flags = _read_cpuinfo()
        try:
            capability = torch.backends.cpu.get_cpu_capability()
        except (AttributeError, RuntimeError):
            capability = "unknown"
        limits = tuple(f"{k}={os.environ[k]}" for k in ISA_ENV if os.environ.get(k))
        _IDENTITY = CPUIdentity(model or platform.processor() or platform.machine(), flags, capability, limits)
    return _IDENTITY


def _read_cpuinfo() -> tuple[str, tuple[str, ...]]:
    """(model name, ISA flags): the name from /proc/cpuinfo (platform's elsewhere), the flags
    from the reader the llama.cpp build choice uses (/proc/cpuinfo, or sysctl on macOS)."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "CPU part"):
                model = value.strip()
                break
    except OSError:
        model = platform.processor()
    present = cpu_flags()
    return model, tuple(f for f in _ISA_FLAGS if f in present)


class Timer(Protocol):
    """Seconds per call of each candidate, in order (math.inf for one given up on).

    `how` is the measurement the decision asks for, as its module names them (its `time_here`
    lists them: a careful race, a first look that only rules out what is far slower, ...).
    Candidates are callables that say what they are (precision.MatmulChain: its dtype and shapes;
    packing's: a name), so a fake Timer can answer from that without running them."""

    def __call__(self, candidates: Sequence[Callable[[], Any]], how: str) -> list[float]: ...


def median_seconds(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, budget_s: float | None = None,
                   give_up: float = math.inf) -> float:
    """The median wall time of `fn()` over `repeats` calls after `warmup` untimed ones; with
    `budget_s`, stops early once that much time is spent (at least one timed call); inf as soon
    as one timed call takes longer than `give_up` (a candidate clearly out of the race)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if times[-1] > give_up:
            return math.inf
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
    times.sort()
    return times[len(times) // 2]


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it exec'd (VmHWM). Not ru_maxrss: Linux carries
    that across fork + exec, so a child process would report its parent's footprint."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if platform.system() == "Darwin" else rss * 1024      # bytes on macOS, KiB elsewhere


class DecisionCache:
    """Decisions measured once per machine: in memory, and in `$TINYLLAMA_CACHE/<name>.json`
    (written atomically; a file that cannot be read or written only costs a new measurement).
    Keys combine the caller's parts with cpu_identity(), the thread count and torch's version."""

    def __init__(self, name: str, version: int = 1) -> None:
        self.name, self.version = name, version
        self._memory: dict[str, Any] = {}

    @property
    def path(self) -> Path:
        """$TINYLLAMA_DECISIONS/<name>.json, by default in $TINYLLAMA_CACHE (tests point it elsewhere)."""
        return Path(os.environ.get("TINYLLAMA_DECISIONS") or cache_dir()) / f"{self.name}.json"

    def key(self, parts: Any) -> str:
        cpu = cpu_identity()
        ident = json.dumps([self.version, parts, cpu.model, cpu.flags, cpu.capability, cpu.limits,
                            torch.get_num_threads(), torch.__version__], default=str)
        return hashlib.sha256(ident.encode()).hexdigest()[:24]

    def get(self, parts: Any, measure: Callable[[], Any], valid: Callable[[Any], bool] = lambda v: True) -> Any:
        """The remembered value for `parts`, else `measure()` (a JSON-able value), remembered."""
        key = self.key(parts)
        if key in self._memory:
            return self._memory[key]
        saved = self._load()
        if key in saved and valid(saved[key]):
            value = saved[key]
        else:
            value = measure()
            saved = self._load()              # another process may have written meanwhile
            saved[key] = value
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_file(self.path) as tmp:
                    tmp.write_text(json.dumps(saved, indent=1, sort_keys=True))
            except OSError:
                pass
        self._memory[key] = value
        return value

    def forget(self) -> None:
        """Drops the in-memory copies (tests; the file is left as it is)."""
        self._memory.clear()

    def _load(self) -> dict:
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return saved if isinstance(saved, dict) else {}
