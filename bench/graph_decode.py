"""Per-token decode cost, eager against static-shape and captured (tinyllama.inference.graphs): torch
calls per step (each at least one kernel launch on a GPU), milliseconds per token, and the
memory-bandwidth floor (weight bytes / the measured copy rate) it is meant to approach.

    python -m bench.graph_decode [--presets tinyllama-1.1b llama-2-7b] [--device auto] [--tokens 32]

On a CPU the captured column is "-" (CUDA graphs are a CUDA feature) and models run in float32;
on CUDA in bf16, and a preset that does not fit in memory is skipped. Torch calls are counted on
the real structure (layers, heads) at shrunken widths, so every preset is counted anywhere.
"""

from __future__ import annotations

import argparse
import time

import torch

from tinyllama.model.config import ModelConfig
from tinyllama.devices import resolve_device
from tinyllama.inference.graphs import StaticDecoder, count_torch_calls
from tinyllama.model.cache import KVCache, Step
from tinyllama.model.model import Llama

from . import sync
from .random_models import random_model


def calls_per_step(preset: str) -> tuple[int, int]:
    """(eager calls, static calls) per one-token step of `preset`'s structure."""
    cfg = ModelConfig.from_name(preset)
    small = cfg.replace(d_model=cfg.n_head * 4, ffn_dim=64, vocab_size=128, max_seq_len=64)
    model = Llama(small).eval()
    cache = KVCache.for_model(model, 1, 64)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), cache, Step.span(0, 3))
        eager, _ = count_torch_calls(lambda: model.head(model.hidden_states(torch.tensor([[4]]), cache, Step.span(3, 1))))
    decoder = StaticDecoder(model, 64, capture=False)
    static, _ = count_torch_calls(lambda: decoder._run(torch.tensor([[4]]), torch.tensor([3])))
    return eager, static


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20) -> float:
    """Bytes/s of an `nbytes` device-to-device copy, the best of 5 (read + write counted)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() / best


def ms_per_token(step, tokens: int, device: torch.device) -> float:
    step(0)                                           # warm-up (and capture)
    sync(device)
    t = time.perf_counter()
    for i in range(1, tokens + 1):
        step(i)
    sync(device)
    return (time.perf_counter() - t) / tokens * 1e3


def time_preset(preset: str, device: torch.device, tokens: int) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = ModelConfig.from_name(preset)
    weight_bytes = cfg.num_params() * torch.finfo(dtype).bits // 8
    if device.type == "cuda" and weight_bytes * 1.3 > torch.cuda.mem_get_info(device)[0]:
        return {"skipped": "does not fit in free GPU memory"}
    torch.manual_seed(0)
    model = random_model(cfg.replace(max_seq_len=256), device, dtype)
    prompt = list(range(1, 9))
    eager = StaticDecoder(model, 256, capture=False)     # owns a cache of 256; the eager path reuses it
    eager.step(prompt, 0)

    def dynamic(i):
        with torch.inference_mode():
            model.head(model.hidden_states(torch.tensor([[7]], device=device), eager.cache, Step.span(8 + i, 1)))
    row = {"eager ms": ms_per_token(dynamic, tokens, device),
           "static ms": ms_per_token(lambda i: eager.step([7], 8 + i), tokens, device)}
    if device.type == "cuda":
        captured = StaticDecoder(model, 256, capture=True)
        captured.step(prompt, 0)
        row["captured ms"] = ms_per_token(lambda i: captured.step([7], 8 + i), tokens, device)
    row["floor ms"] = weight_bytes / copy_bandwidth(device) * 1e3     # every weight read once per token
    return row


def report(presets, device: torch.device, tokens: int) -> str:
    lines = [f"Decode step cost on {device} ({'bf16' if device.type == 'cuda' else 'float32'}), "
             f"{tokens} tokens after an 8-token prompt",
             "| preset | torch calls eager | static | eager ms/token | static ms/token | captured ms/token "
             "| memory floor ms | eager / captured |", "|---|---|---|---|---|---|---|---|"]
    for preset in presets:
        eager_calls, static_calls = calls_per_step(preset)
        row = time_preset(preset, device, tokens)
        if "skipped" in row:
            lines.append(f"| {preset} | {eager_calls} | {static_calls} | {row['skipped']} | | | | |")
            continue
        cap = row.get("captured ms")
        captured, ratio = ("-", "-") if cap is None else (f"{cap:.2f}", f"{row['eager ms'] / cap:.1f}x")
        lines.append(f"| {preset} | {eager_calls} | {static_calls} | {row['eager ms']:.2f} | {row['static ms']:.2f} | "
                     f"{captured} | {row['floor ms']:.2f} | {ratio} |")
    if device.type != "cuda":
        lines.append("\nOn a CPU no step is captured (CUDA graphs are a CUDA feature) and TorchBackend keeps the "
                     "dynamic path with its packed weights (bench.decode); the static step, attending over the "
                     "whole cache, is timed here only to show what it costs without capture. The captured "
                     "figures come from `make gpu-check` (its spec stage) on a GPU.")
    return "\n".join(lines)


def run(presets=None, device: str = "auto", tokens: int = 32) -> str:
    """The table for `presets` (default: tinyllama-1.1b, plus llama-2-7b on CUDA) on `device`."""
    device = resolve_device(device)
    presets = presets or (["tinyllama-1.1b", "llama-2-7b"] if device.type == "cuda" else ["tinyllama-1.1b"])
    return report(presets, device, tokens)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=None,
                    help="model shapes (default: tinyllama-1.1b, plus llama-2-7b on CUDA)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda (default: %(default)s)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens timed per row (default: %(default)s)")
    args = ap.parse_args(argv)
    print(run(args.presets, args.device, args.tokens))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
