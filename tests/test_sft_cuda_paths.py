"""The SFT stage's CUDA paths, checked on a CPU: the trainer's checkpointing keywords for the
transformers of the GPU machines (5.17) and of this one (5.23+), the weights' dtype and the
optimiser for every method and device, and bench.sft_memory's device-wide peak (a poller driven
here by a fake reader) reported next to the allocator's."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")

from bench import sft_memory  # noqa: E402
from bench.sft_memory import PeakPoller, device_used_reader  # noqa: E402
from sft import train  # noqa: E402
from sft.train import (  # noqa: E402
    SFTArgs,
    SFTError,
    build_trainer,
    checkpointing_kwargs,
    optimizer_name,
    weight_dtype,
)

# ---- activation checkpointing: transformers 5.17 vs 5.23+ --------------------------------------


@dataclasses.dataclass
class Config517:
    """SFTConfig's checkpointing fields under transformers 5.17: the old names only, the flag
    defaulting to True (trl's default)."""
    output_dir: str | None = None
    gradient_checkpointing: bool = True
    gradient_checkpointing_kwargs: dict | None = None


@dataclasses.dataclass
class Config524(Config517):
    """Under transformers 5.23+: the new names too, the old kept as deprecated aliases."""
    activation_checkpointing: bool | None = None
    activation_checkpointing_kwargs: dict | None = None


@dataclasses.dataclass
class ConfigWithout:
    output_dir: str | None = None
    activation_checkpointing: bool = False     # no _kwargs partner: not a pair to pass


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.parametrize("config_cls, name", [(Config517, "gradient_checkpointing"),
                                              (Config524, "activation_checkpointing")])
def test_checkpointing_kwargs_follow_the_config_fields(config_cls, name, enabled):
    kwargs = checkpointing_kwargs(config_cls, enabled)
    assert kwargs == {name: enabled, f"{name}_kwargs": {"use_reentrant": False}}
    config = config_cls(**kwargs)                  # the keywords exist (no TypeError) ...
    assert getattr(config, name) is enabled        # ... and the flag is explicit, never the default True


def test_checkpointing_kwargs_refuse_a_config_without_either_pair():
    with pytest.raises(SFTError, match="neither activation_checkpointing.*nor gradient_checkpointing"):
        checkpointing_kwargs(ConfigWithout, True)


@pytest.mark.parametrize("enabled", [True, False])
def test_the_installed_sftconfig_takes_the_keywords(enabled, tmp_path):
    from trl import SFTConfig

    config = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[],
                       **checkpointing_kwargs(SFTConfig, enabled))
    assert config.gradient_checkpointing is enabled
    assert getattr(config, "activation_checkpointing", enabled) is enabled


def sftconfig_like_transformers_517():
    """The installed SFTConfig's fields without activation_checkpointing(_kwargs), as under
    transformers 5.17 (no __post_init__: its bf16-needs-a-GPU check would refuse CUDA here)."""
    from trl import SFTConfig

    specs = []
    for f in dataclasses.fields(SFTConfig):
        if not f.init or f.name.startswith("activation_checkpointing"):
            continue
        default = ({"default": f.default} if f.default is not dataclasses.MISSING else
                   {"default_factory": f.default_factory} if f.default_factory is not dataclasses.MISSING else {})
        specs.append((f.name, Any, dataclasses.field(**default)))
    return dataclasses.make_dataclass("SFTConfig", specs)


@pytest.mark.parametrize("method, device, optim, checkpointing", [
    ("full", "cuda", "adamw_torch_fused", False),
    ("lora", "cuda", "adamw_torch_fused", False),
    ("qlora", "cuda", "paged_adamw_8bit", True),
    ("full", "cpu", "adamw_torch", False),
    ("qlora", "cpu", "adamw_torch", True),
])
def test_trainer_config_under_transformers_517(monkeypatch, tmp_path, method, device, optim, checkpointing):
    """What run_sft hands trl on the GPU machines: the old keyword names, the flag explicit
    (off for full and LoRA although the 5.17 SFTConfig defaults it on), the optimiser per method."""
    import trl

    monkeypatch.setattr(trl, "SFTConfig", sftconfig_like_transformers_517())
    args = SFTArgs(base="unused", out=tmp_path / "out", method=method)
    config = train._trainer_config(args, tmp_path, device, torch.bfloat16, has_eval=False)
    assert not hasattr(config, "activation_checkpointing")
    assert config.gradient_checkpointing is checkpointing
    assert config.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert config.optim == optim and config.bf16 is True and config.fp16 is False


@pytest.mark.parametrize("report_to, want", [("none", []), ("tensorboard", ["tensorboard"]), ("wandb", ["wandb"])])
def test_float16_on_cuda_is_the_trainer_s_fp16(monkeypatch, tmp_path, report_to, want):
    """--dtype float16 on a GPU without bf16: the trainer's fp16 (autocast + gradient scaler),
    and --report-to as trl's report_to."""
    import trl

    monkeypatch.setattr(trl, "SFTConfig", sftconfig_like_transformers_517())
    args = SFTArgs(base="unused", out=tmp_path / "out", method="lora", dtype="float16", report_to=report_to)
    config = train._trainer_config(args, tmp_path, "cuda", torch.float16, has_eval=False)
    assert config.fp16 is True and config.bf16 is False and config.report_to == want


# ---- weights' dtype and optimiser --------------------------------------------------------------

@pytest.mark.parametrize("method, device, expected", [
    ("full", "cuda", torch.float32),       # trained weights: a float32 master copy under bf16 autocast
    ("lora", "cuda", torch.bfloat16),      # a frozen base in the compute dtype; peft's adapters are float32
    ("qlora", "cuda", torch.bfloat16),     # nf4 projections; the unquantized layers in the compute dtype
    ("full", "cpu", torch.float32),
    ("lora", "cpu", torch.float32),
    ("qlora", "cpu", torch.float32),
])
def test_weight_dtype(method, device, expected):
    assert weight_dtype(method, device, torch.bfloat16) == expected
    assert weight_dtype(method, device, torch.float32) == torch.float32


@pytest.mark.parametrize("method, device, expected", [
    ("full", "cuda", "adamw_torch_fused"), ("lora", "cuda", "adamw_torch_fused"),
    ("qlora", "cuda", "paged_adamw_8bit"),
    ("full", "cpu", "adamw_torch"), ("lora", "cpu", "adamw_torch"), ("qlora", "cpu", "adamw_torch"),
])
def test_optimizer_name(method, device, expected):
    assert optimizer_name(method, device) == expected


class _Loaded(Exception):
    pass


@pytest.mark.parametrize("method, expected", [("full", torch.float32), ("lora", torch.bfloat16),
                                              ("qlora", torch.bfloat16)])
def test_build_trainer_loads_cuda_weights_in_weight_dtype(monkeypatch, tmp_path, llama2_tokenizer, method, expected):
    """build_trainer on CUDA (stopped at the load): full fine-tuning gets float32 weights, not bf16."""
    seen = {}

    def fake_load(base, method, device, dtype, compute_dtype=None):
        seen.update(device=device, dtype=dtype, compute_dtype=compute_dtype)
        raise _Loaded

    monkeypatch.setattr(train, "load_model", fake_load)
    args = SFTArgs(base="unused", out=tmp_path / "out", method=method)
    with pytest.raises(_Loaded):
        build_trainer(args, None, llama2_tokenizer, tmp_path, "cuda", torch.bfloat16)
    assert seen == {"device": "cuda", "dtype": expected, "compute_dtype": torch.bfloat16}


# ---- bench.sft_memory: the device-wide peak ----------------------------------------------------

def _wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_peak_poller_keeps_the_max_and_stops():
    values = [100, 500, 300, 900, 200]
    calls = []

    def read() -> int:
        calls.append(threading.current_thread().name)
        return values[len(calls) - 1] if len(calls) <= len(values) else 50

    poller = PeakPoller(read, interval=0.001).start()
    _wait_for(lambda: len(calls) > len(values) + 2)        # the thread read them all, and more
    assert "peak-poller" in calls                             # on the background thread
    assert poller.stop() == 900 and poller.peak == 900
    assert not poller._thread.is_alive()
    n = len(calls)
    time.sleep(0.02)
    assert len(calls) == n and poller.samples == n            # nothing reads after stop()


def test_peak_poller_reads_at_start_and_stop_and_stops_without_waiting_an_interval():
    readings = iter([10, 70])
    poller = PeakPoller(lambda: next(readings), interval=60).start()
    t0 = time.perf_counter()
    assert poller.stop() == 70                 # the end state counts though no interval passed
    assert time.perf_counter() - t0 < 1 and poller.samples == 2


def test_peak_poller_reports_a_failed_reader():
    calls = []

    def read() -> int:
        calls.append(1)
        if len(calls) > 1:
            raise OSError("NVML gone")
        return 1

    poller = PeakPoller(read, interval=0.001).start()
    _wait_for(lambda: not poller._thread.is_alive())
    with pytest.raises(RuntimeError, match="memory poller failed") as e:
        poller.stop()
    assert isinstance(e.value.__cause__, OSError)


def test_device_used_reader_falls_back_where_nvml_is_missing():
    """With no nvidia-ml-py (the CPU machines' torch), the real torch.cuda.device_memory_used
    raises and the reader takes mem_get_info instead of failing."""
    import importlib.util

    if importlib.util.find_spec("pynvml") is not None:
        pytest.skip("nvidia-ml-py is installed here")
    _, source = device_used_reader()
    assert source == "mem_get_info"


@pytest.mark.gpu
def test_device_used_reader_sees_an_allocation():
    """On a GPU, the device-wide reading rises by what this process allocates, whichever source
    the reader took, and agrees with total - free."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    read, source = device_used_reader()
    torch.cuda.synchronize()
    before = read()
    block = torch.empty(512 << 20, dtype=torch.uint8, device="cuda")      # 512 MiB
    torch.cuda.synchronize()
    after = read()
    free, total = torch.cuda.mem_get_info()
    assert after - before >= 500 << 20, (source, before, after)
    assert abs(after - (total - free)) <= 64 << 20, (source, after, total - free)
    del block


def _row(device: str, tok_s: float, allocator: float, device_peak: float | None) -> dict:
    row = {"device": device, "tok_s": tok_s, "allocator_peak_gb": allocator, "trainable": 1_000}
    if device_peak is not None:
        row.update(device_peak_gb=device_peak, device_source="nvml", device_baseline_gb=0.5,
                   device_baseline_has_context=False)
    return row


def test_report_puts_allocator_and_device_wide_peaks_side_by_side():
    results = {"qlora": {"ours": _row("cuda", 2000, 1.23, 2.34), "hf": _row("cuda", 1000, 1.5, 2.75)},
               "full": {"ours": _row("cuda", 900, 9.0, 9.9), "hf": {"error": "out of memory (killed)"}}}
    table = sft_memory.report("tinyllama-1.1b", 512, results)
    head, _, *rows = table.splitlines()
    assert "peak reserved (allocator)" in head and "peak device-wide" in head
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    assert cells[0][:7] == ["qlora", "ours (sft.modeling)", "1,000", "2,000", "1.23 GB", "2.34 GB", "2.00x"]
    assert cells[1][4:6] == ["1.50 GB", "2.75 GB"]
    assert cells[3][3] == "failed: out of memory (killed)" and cells[2][6] == "-"


def test_report_on_a_cpu_gives_rss_and_no_device_wide_figure():
    results = {"lora": {"ours": _row("cpu", 300, 0.8, None), "hf": _row("cpu", 200, 0.9, None)}}
    head, _, ours, hf = sft_memory.report("tinyllama-debug", 64, results).splitlines()
    assert "peak RSS" in head and "allocator" not in head
    assert "0.80 GB" in ours and ours.rstrip(" |").endswith("1.50x")
    assert [c.strip() for c in hf.strip("|").split("|")][5] == "-"


@pytest.mark.parametrize("impl", ["ours", "hf"])
def test_measure_on_the_cpu_reports_rss(tiny_chat_checkpoint, impl):
    """The CPU path of the benchmark's child, in process: peak RSS, no device-wide figure."""
    row = sft_memory._measure(impl, str(tiny_chat_checkpoint), "lora", seq=16, steps=1)
    assert row["device"] == "cpu" and row["allocator_peak_gb"] > 0 and row["tok_s"] > 0
    assert "device_peak_gb" not in row and row["trainable"] > 0
