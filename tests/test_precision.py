"""dtype `auto`: chosen by timing bf16 against float32 on this machine, cached per machine."""

import json

import pytest
import torch
from fakes import never_timed

from tinyllama import ModelConfig, precision
from tinyllama.measure import DecisionCache, cpu_identity
from tinyllama.precision import DtypeChoice, choose_dtype, parse_dtype

pytestmark = pytest.mark.cpu_isa

CFG = ModelConfig.from_name("tinyllama-debug")


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """A new decision file, and `auto` measured even in the suite's forced tiers (make test-dtype)."""
    monkeypatch.setenv("TINYLLAMA_DECISIONS", str(tmp_path))
    monkeypatch.delenv(precision.FORCE_ENV, raising=False)
    precision._CACHE.forget()
    yield
    precision._CACHE.forget()


def test_parse_dtype_names_and_errors():
    assert parse_dtype("auto") == "auto" and parse_dtype(None) is None
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float32") is torch.float32
    assert parse_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="dtype 'int8': expected auto"):
        parse_dtype("int8")


def test_an_explicit_dtype_always_wins(monkeypatch):
    monkeypatch.setattr(precision, "timer", never_timed("an explicit dtype must not be timed"))
    choice = choose_dtype("bfloat16", "cpu", CFG)
    assert choice == DtypeChoice(torch.bfloat16, "as asked")
    assert str(choose_dtype(torch.float32, "cpu", CFG)) == "float32 (as asked)"


def _rate_timer(fp32: float, bf16: float, calls: list):
    """A Timer (precision.timer) that answers as if each dtype ran at a fixed rate (seconds per
    GFLOP: fp32, bf16), without running anything; records what was timed, as (how, ((dtype,
    matmuls in the chain), ...)): ("race", ...) for the careful race, ("first call", ...) for a
    first look."""
    rate = {torch.float32: fp32, torch.bfloat16: bf16}

    def gflops(shape):
        m, k, n = shape
        return 2 * m * k * n / 1e9

    def timer(chains, how):
        calls.append((how, tuple((c.dtype, len(c.shapes)) for c in chains)))
        return [sum(map(gflops, c.shapes)) * rate[c.dtype] for c in chains]

    return timer


def _fake_timings(monkeypatch, fp32: float, bf16: float) -> list:
    """The probe timed by _rate_timer on a CPU with bf16 instructions; returns its record."""
    calls = []
    monkeypatch.setattr(precision, "timer", _rate_timer(fp32, bf16, calls))
    monkeypatch.setattr(precision, "has_bf16_instructions", lambda: True)      # rates given, not flags
    monkeypatch.delenv(precision.FORCE_ENV, raising=False)
    return calls


def test_training_without_bf16_instructions_is_float32_untimed(monkeypatch):
    # an x86 CPU without AVX-512 BF16 or AMX emulates a bf16 GEMM; timing it on a loaded machine
    # once picked bf16 (its float32 probe slowed by other work)
    import tinyllama.measure as m

    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(m, "_IDENTITY", m.CPUIdentity("AMD EPYC", ("avx2", "fma", "f16c"), "AVX2", ()))
    monkeypatch.setattr(precision, "timer", never_timed("training must not be timed here"))
    choice = choose_dtype("auto", "cpu", CFG, work="train")
    assert choice.dtype is torch.float32 and "no bf16 matrix instructions" in choice.reason
    measured = []
    monkeypatch.setattr(precision, "timer", _rate_timer(fp32=1.0, bf16=0.5, calls=measured))   # bf16 2x faster
    assert choose_dtype("auto", "cpu", CFG, work="decode").dtype is torch.bfloat16 and measured   # decoding is timed
    monkeypatch.setattr(m, "_IDENTITY", m.CPUIdentity("Xeon", ("avx2", "avx512f", "amx_bf16"), "AVX512", ()))
    assert precision.has_bf16_instructions()


def test_bf16_is_taken_where_it_is_clearly_faster(monkeypatch):
    _fake_timings(monkeypatch, fp32=1.0, bf16=0.3)          # an AMX Xeon: ~3x
    choice = choose_dtype("auto", "cpu", CFG, work="train")
    assert choice.dtype is torch.bfloat16
    assert "bf16 matmul 3.3x faster than float32" in choice.reason and cpu_identity().model in choice.reason


def test_emulated_bf16_is_refused_after_one_call(monkeypatch):
    calls = _fake_timings(monkeypatch, fp32=0.01, bf16=1.0)    # AVX2 only: ~100x slower
    choice = choose_dtype("auto", "cpu", CFG, work="train")
    assert choice.dtype is torch.float32 and "100.0x slower" in choice.reason
    # float32's chain (the up and down projections) raced; of bf16 one first call of its first
    # matmul: never the full bf16 probe
    assert calls == [("race", ((torch.float32, 2),)), ("first call", ((torch.bfloat16, 1),))]
    precision._CACHE.forget()
    precision._CACHE.path.unlink()
    calls = _fake_timings(monkeypatch, fp32=1.0, bf16=0.3)
    choose_dtype("auto", "cpu", CFG, work="train")              # native bf16: raced beside float32
    assert calls[-1] == ("race", ((torch.float32, 2), (torch.bfloat16, 2)))


def test_a_near_tie_keeps_float32(monkeypatch):
    _fake_timings(monkeypatch, fp32=1.0, bf16=0.85)         # within the training margin (0.8)
    assert choose_dtype("auto", "cpu", CFG, work="train").dtype is torch.float32
    tie = choose_dtype("auto", "cpu", CFG, work="decode")                            # margin 0.7
    assert tie.dtype is torch.float32 and "1.2x faster than float32" in tie.reason
    assert "1.43x bf16 needs" in tie.reason
    precision._CACHE.forget()                               # a clear win, on another machine
    precision._CACHE.path.unlink()
    _fake_timings(monkeypatch, fp32=1.0, bf16=0.65)
    assert choose_dtype("auto", "cpu", CFG, work="decode").dtype is torch.bfloat16
    assert choose_dtype("auto", "cpu", CFG, work="train").dtype is torch.bfloat16


def test_decisions_are_measured_once_and_kept_per_machine(monkeypatch, tmp_path):
    calls = _fake_timings(monkeypatch, fp32=1.0, bf16=0.3)
    first = choose_dtype("auto", "cpu", CFG, work="decode")
    saved = json.loads((tmp_path / "dtype-choices.json").read_text())
    assert [v["dtype"] for v in saved.values()] == ["bfloat16"]
    n = len(calls)
    precision._CACHE.forget()                                # a new process: read from the file
    assert choose_dtype("auto", "cpu", CFG, work="decode") == first and len(calls) == n
    # another ISA limit (CPU_ISA=avx2) is another machine as far as decisions go
    import os

    import tinyllama.measure as m

    limit = "SSE41" if os.environ.get("ONEDNN_MAX_CPU_ISA") != "SSE41" else "AVX2"
    monkeypatch.setattr(m, "_IDENTITY", None)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", limit)
    try:
        choose_dtype("auto", "cpu", CFG, work="decode")
        assert len(calls) > n
        assert f"ONEDNN_MAX_CPU_ISA={limit}" in cpu_identity().describe()
    finally:
        m._IDENTITY = None


def test_a_corrupt_cache_file_is_measured_over(monkeypatch, tmp_path):
    (tmp_path / "dtype-choices.json").write_text("{not json")
    _fake_timings(monkeypatch, fp32=1.0, bf16=0.3)
    assert choose_dtype("auto", "cpu", CFG).dtype is torch.bfloat16
    assert json.loads((tmp_path / "dtype-choices.json").read_text())


def test_cuda_auto_is_bf16_where_supported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert choose_dtype("auto", "cuda", CFG).dtype is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert choose_dtype("auto", "cuda", CFG, work="train").dtype is torch.float32
    assert choose_dtype("auto", "cuda", CFG, work="decode").dtype is torch.float16


def test_the_real_measurement_on_this_cpu():
    """Times real matmuls: the choice agrees with its figures, and an AVX2-only CPU (or
    CPU_ISA=avx2) trains in float32 (its bf16 GEMMs are emulated: 4-15x slower here). Decoding may
    take bf16 there: a memory-bound GEMV gains from half the bytes (tinyllama-1.1b 7.6 vs 6.0 tok/s)."""
    cpu = cpu_identity()
    for work in ("train", "decode"):
        choice = choose_dtype("auto", "cpu", ModelConfig.from_name("tinyllama-19m"), work=work, rows=2048)
        clear_win = "faster" in choice.reason and "bf16 needs" not in choice.reason
        assert (choice.dtype is torch.bfloat16) == clear_win, choice
        assert cpu.describe() in choice.reason
        if work == "train" and (cpu.isa in ("avx2", "baseline") or "ATEN_CPU_CAPABILITY=avx2" in cpu.limits):
            assert choice.dtype is torch.float32, choice


def test_decision_cache_keys_include_threads(monkeypatch, tmp_path):
    cache = DecisionCache("t")
    k1 = cache.key(["x"])
    old = torch.get_num_threads()
    torch.set_num_threads(1 if old != 1 else 2)
    try:
        assert cache.key(["x"]) != k1
    finally:
        torch.set_num_threads(old)


def test_load_backend_chooses_and_says_why(tiny_chat_checkpoint):
    from tinyllama.inference.backends import load_backend

    backend, _ = load_backend(tiny_chat_checkpoint)                 # auto
    try:
        weights = next(backend.model.parameters()).dtype
        assert backend.precision.startswith(str(weights).removeprefix("torch.") + " (auto: ")
    finally:
        backend.close()
    backend, _ = load_backend(tiny_chat_checkpoint, dtype="bfloat16")
    try:
        assert next(backend.model.parameters()).dtype is torch.bfloat16 and backend.precision == "bfloat16 (as asked)"
    finally:
        backend.close()
    backend, _ = load_backend(tiny_chat_checkpoint, dtype=None)    # as stored
    try:
        assert backend.precision == "float32"
    finally:
        backend.close()


def test_isa_limits_lower_the_level():
    """CPU_ISA=avx2 on an AMX Xeon decides as an AVX2-only CPU would: the environment's limits
    cap the level that `auto` reads, not only the kernels torch runs."""
    from tinyllama.measure import CPUIdentity

    amx = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
    cases = {(): "amx", ("ONEDNN_MAX_CPU_ISA=AVX2",): "avx2", ("ATEN_CPU_CAPABILITY=avx2",): "avx2",
             ("ONEDNN_MAX_CPU_ISA=AVX2", "ATEN_CPU_CAPABILITY=avx2"): "avx2",
             ("ONEDNN_MAX_CPU_ISA=AVX512_CORE", "ATEN_CPU_CAPABILITY=avx512"): "avx512",
             ("ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16",): "avx512-bf16", ("ONEDNN_MAX_CPU_ISA=avx512_core_amx",): "amx",
             ("ATEN_CPU_CAPABILITY=avx512",): "amx", ("ONEDNN_MAX_CPU_ISA=SSE41",): "baseline"}
    for limits, isa in cases.items():
        assert CPUIdentity("Xeon", amx, "AVX512", limits).isa == isa, limits
    # a limit never raises the level
    assert CPUIdentity("EPYC", ("avx2", "fma"), "AVX2", ("ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16",)).isa == "avx2"


def test_isa_limit_makes_training_float32_untimed(monkeypatch):
    import tinyllama.measure as m

    monkeypatch.delenv(precision.FORCE_ENV, raising=False)
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(m, "_IDENTITY", m.CPUIdentity("Xeon", ("avx2", "avx512f", "avx512_bf16", "amx_bf16"), "AVX2",
                                                      ("ONEDNN_MAX_CPU_ISA=AVX2", "ATEN_CPU_CAPABILITY=avx2")))
    monkeypatch.setattr(precision, "timer", never_timed("an emulated bf16 must not be timed"))
    choice = choose_dtype("auto", "cpu", CFG, work="train")
    assert choice.dtype is torch.float32 and "no bf16 matrix instructions" in choice.reason


def test_the_environment_can_force_what_auto_means(monkeypatch):
    """TINYLLAMA_AUTO_DTYPE: the suite's forced tiers (bf16 even where it is emulated); an
    explicit dtype and CUDA's own rule still win; a bad value is a clear error."""
    monkeypatch.setattr(precision, "timer", never_timed("a forced auto must not be timed"))
    monkeypatch.setenv(precision.FORCE_ENV, "bfloat16")
    for work in ("train", "decode"):
        choice = choose_dtype("auto", "cpu", CFG, work=work)
        assert choice.dtype is torch.bfloat16 and "TINYLLAMA_AUTO_DTYPE=bfloat16" in str(choice)
    assert choose_dtype("float32", "cpu", CFG).dtype is torch.float32
    monkeypatch.setenv(precision.FORCE_ENV, "fp32")
    assert choose_dtype("auto", "cpu", CFG).dtype is torch.float32
    monkeypatch.setenv(precision.FORCE_ENV, "float16")
    with pytest.raises(ValueError, match="TINYLLAMA_AUTO_DTYPE='float16': expected float32 or bfloat16"):
        choose_dtype("auto", "cpu", CFG)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert choose_dtype("auto", "cuda", CFG, work="train").dtype is torch.float32


def test_the_race_keeps_each_chains_quiet_time(monkeypatch):
    """Samples are interleaved and the fastest kept: load on the machine that slows some samples
    (here 5x, in bursts of 1,000 calls) does not reach the result. On a virtual clock that only
    the chains advance."""
    now = [0.0]
    monkeypatch.setattr(precision.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr("tinyllama.measure.time.perf_counter", lambda: now[0])
    calls = [0]

    def chain(cost):
        def run():
            calls[0] += 1
            now[0] += cost * (5 if (calls[0] // 1000) % 2 else 1)
        return run

    fp32, bf16 = precision._race([chain(1e-4), chain(4e-5)])
    assert fp32 == pytest.approx(1e-4) and bf16 == pytest.approx(4e-5)
    assert calls[0] >= 5 * (precision.SAMPLE_SECONDS / 1e-4)         # each sample repeated for SAMPLE_SECONDS
