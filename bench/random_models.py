"""Random-weight models of a preset's shape, for throughput benchmarks (speed does not depend on
the weights' values): GGUFs made once and cached under ~/.cache/tinyllama/bench/, and PyTorch
models built straight on a device in a dtype.

    path = random_gguf("tinyllama-1.1b", "Q4_K_M")      # ~670 MB; a few minutes the first time
    model = random_model(ModelConfig.from_name("llama-2-7b"), torch.device("cuda"), torch.bfloat16)
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path


def random_model(cfg, device, dtype):
    """Llama(cfg) in eval mode, built on `device` in `dtype` (seeded by the caller): no float32
    copy on the way, which for a 7B would need 27 GB."""
    import torch

    from tinyllama import Llama

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return Llama(cfg).eval()
    finally:
        torch.set_default_dtype(default)


def random_gguf(preset: str = "tinyllama-1.1b", qtype: str = "Q4_K_M", say=print) -> Path:
    """A GGUF of `preset` with random weights (seed 0) and the Llama-2 tokenizer, quantized to
    `qtype` by llama.cpp's quantizer; cached, written under a temporary name and renamed."""
    import torch

    from quantize.export import quantize_gguf, write_gguf
    from tinyllama import Llama, ModelConfig, Tokenizer, save_checkpoint
    from tinyllama.paths import cache_dir

    out = cache_dir() / "bench" / f"{preset}-random-{qtype}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    say(f"making {out.name} (random weights, once) ...")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".make-") as tmp:
        torch.manual_seed(0)
        save_checkpoint(Llama(ModelConfig.from_name(preset)), Tokenizer.llama2(), Path(tmp) / "model")
        f32 = write_gguf(Path(tmp) / "model", Path(tmp) / "F32.gguf", "f32")
        shutil.rmtree(Path(tmp) / "model")
        quantize_gguf(f32, Path(tmp) / "q.gguf", qtype.lower()).rename(out)
    return out
