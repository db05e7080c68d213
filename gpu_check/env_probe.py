"""Stage `env`: what the machine is and the two ceilings every later number is read against
(bench.train_throughput's MFU against the measured matmul rate, bench.speculative_torch's memory
floor against the copy rate read them back from the run's results).

Measures: package versions (torch, CUDA, cuDNN, triton, transformers, peft, bitsandbytes,
liger-kernel, ...) and on a GPU whether each imports, the device, which SDPA backend torch picks for the project's training,
decode and speculative-verification shapes, the project's attention backends, and the ceilings:
a bf16 8192³ matmul's FLOP/s (the measured MFU denominator: random data, warmed up, median of
10 timed by CUDA events) and device-to-device copy bandwidth (bench.graph_decode.copy_bandwidth,
the rate its memory floor uses). A dry run measures a float32
1024³ matmul and a 64 MiB copy on the CPU instead.

    python -m gpu_check.env_probe [--device cpu]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import sys
import time

import torch

from bench.graph_decode import copy_bandwidth
from bench.records import emit, error_text
from bench.train_throughput import fused_provider
from tinyllama.devices import resolve_device

PACKAGES = ("triton", "transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes", "liger-kernel",
            "xformers", "flash-attn", "pyarrow", "huggingface-hub", "tokenizers", "safetensors", "gguf", "numpy")
IMPORTS = ("transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes", "liger_kernel", "flash_attn",
           "xformers")
# (B, H, Hkv, T, S, head_dim, bottom-right mask): training, one-token decode, k=4 verification
SDPA_SHAPES = {"train_1.1b_B8_T2048_gqa": (8, 32, 4, 2048, 2048, 64, False),
               "decode_1.1b_T1_S512": (1, 32, 4, 1, 512, 64, False),
               "verify_1.1b_T5_S512_mask": (1, 32, 4, 5, 512, 64, True),
               "verify_7b_T5_S512_mask": (1, 32, 32, 5, 512, 128, True)}


def versions() -> dict:
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    from tinyllama.model import kernels

    out["attention_backends"] = kernels.available_backends()      # flash / xformers / sdpa, as the model picks
    return out


def cuda_device() -> dict:
    p = torch.cuda.get_device_properties(0)
    return {"device": torch.cuda.get_device_name(0), "capability": f"{p.major}.{p.minor}",
            "sms": p.multi_processor_count, "mem_gb": round(p.total_memory / 2**30, 1),
            "flash_sdp": torch.backends.cuda.flash_sdp_enabled(), "cudnn_sdp": torch.backends.cuda.cudnn_sdp_enabled(),
            "mem_eff_sdp": torch.backends.cuda.mem_efficient_sdp_enabled()}


def sdpa_choices() -> dict:
    """The backend torch's dispatcher picks per shape (a private API: an error is recorded)."""
    from torch.nn.attention import SDPBackend

    names = {int(v): n for n, v in vars(SDPBackend).items() if isinstance(v, SDPBackend)}
    out = {}
    for label, (B, H, Hkv, T, S, hd, masked) in SDPA_SHAPES.items():
        q = torch.randn(B, H, T, hd, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, Hkv, S, hd, device="cuda", dtype=torch.bfloat16)
        mask = torch.ones(T, S, dtype=torch.bool, device="cuda").tril(S - T) if masked else None
        try:
            choice = torch._fused_sdp_choice(q, k, k, mask, 0.0, not masked and T == S, scale=None,
                                             enable_gqa=H != Hkv)
            out[label] = names.get(int(choice), str(choice))
        except Exception as e:
            out[label] = f"error: {error_text(e, 160)}"
    return out


def _timed(fn, device: str) -> float:
    """Seconds of one call, by CUDA events on a GPU (no host overhead), by the clock on a CPU."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def ceilings(device: str) -> dict:
    n, dtype, copy_bytes = (8192, torch.bfloat16, 4 << 30) if device == "cuda" else (1024, torch.float32, 64 << 20)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        _timed(lambda: a @ b, device)
    times = sorted(_timed(lambda: a @ b, device) for _ in range(10))
    copy = copy_bandwidth(torch.device(device), copy_bytes)      # the rate bench.graph_decode's floor uses
    return {"matmul_n": n, "matmul_dtype": str(dtype).removeprefix("torch."),
            "matmul_tflops": round(2 * n**3 / times[len(times) // 2] / 1e12, 3),
            "copy_tb_s": round(copy / 1e12, 4)}                              # read + write


def optional_libraries() -> dict:
    """Whether each library a later stage needs imports (a carried wheel can lack a dependency
    the image does not have), and whether bitsandbytes found its CUDA library."""
    out = {"imports": {}}
    for name in IMPORTS:
        try:
            importlib.import_module(name)
            out["imports"][name] = "ok"
        except Exception as e:
            out["imports"][name] = error_text(e, 200)
    try:
        from bitsandbytes.cextension import lib

        out["bnb_lib"] = getattr(lib, "_name", None) or str(getattr(lib, "_lib", lib))[:120]
    except Exception as e:
        out["bnb_lib"] = f"error: {error_text(e, 200)}"
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda (default: %(default)s)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from tinyllama.model.kernels import use_kernels
    from tinyllama.runtime import RuntimeOptions

    use_kernels(RuntimeOptions.from_env())          # TINYLLAMA_ATTENTION / _FUSED, as every CLI reads them
    device = resolve_device(parse_args(argv).device).type
    record = {"device_type": device, **versions()}
    if device == "cuda":
        record.update(cuda_device())
        record["sdpa_choice"] = sdpa_choices()
        record.update(optional_libraries(), fused=fused_provider("cuda"))
    record.update(ceilings(device))
    emit("env", what="probe", **record)


if __name__ == "__main__":
    main()
