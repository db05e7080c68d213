"""Throughput accounting: model FLOPs utilisation (MFU), peak memory, and the metric sinks.

MFU = achieved model FLOPs / peak FLOPs of the hardware. Model FLOPs per token are
`ModelConfig.flops_per_token(seq_len)` = 6·N + 12·L·d·T (PaLM, appendix B): N the parameters
that do matrix work (all but the input embedding; the lm_head counts), and 12·L·d·T for the
attention scores and weighted sum, forward and backward. Activation recomputation is not
counted (that would be hardware FLOPs utilisation).

Peaks are dense bf16 tensor-core figures from the vendors' data sheets; a CPU's peak is
measured here once per process as the best of a few large matmuls in the training dtype.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from tinyllama.atomic import atomic_file
from tinyllama.measure import median_seconds, peak_rss_bytes

# Dense (no sparsity) bf16/fp16 tensor-core peak FLOP/s per device, from the vendors' data
# sheets, keyed by (model, form factor). A name matches a model by whole words ("NVIDIA L4" is
# not "NVIDIA L40S") and a form factor by a word in it (PCIe, NVL); "" is the SXM/default part.
GPU_PEAK_BF16 = {
    ("A100", ""): 312e12, ("A100", "PCIE"): 312e12,
    ("A10G", ""): 125e12, ("A10", ""): 125e12,
    ("L4", ""): 121e12, ("L40S", ""): 362e12, ("L40", ""): 181e12,
    ("H100", ""): 989e12, ("H100", "PCIE"): 756e12, ("H100", "NVL"): 835e12,
    ("H200", ""): 989e12, ("H200", "NVL"): 835e12, ("GH200", ""): 989e12,
    ("B200", ""): 2250e12,
}
# float32 matmuls run on the tensor cores as TF32 (half the bf16 rate on these parts) only when
# enabled, which pretraining does for a float32 run on CUDA (allow_fp32_tensor_cores).
TF32_FRACTION = 0.5


def gpu_peak_bf16(name: str) -> float | None:
    """The data-sheet bf16 peak of a CUDA device name (torch.cuda.get_device_name), or None."""
    words = {w.upper() for w in re.split(r"[^A-Za-z0-9]+", name) if w}
    model = next((m for m, _ in GPU_PEAK_BF16 if m in words), None)
    if model is None:
        return None
    form = next((f for m, f in GPU_PEAK_BF16 if m == model and f and f in words), "")
    return GPU_PEAK_BF16[(model, form)]


_cpu_peak: dict[tuple[torch.dtype, int], float] = {}


def measured_cpu_peak(dtype: torch.dtype = torch.float32, n: int = 1024) -> float:
    """The best of a few n×n matmuls in `dtype`; one, if the first takes over 0.1 s (an
    emulated bf16 matmul on an AVX2-only CPU: ~1.6 s)."""
    if (dtype, n) not in _cpu_peak:
        a = torch.randn(n, n, dtype=dtype)
        b = torch.randn(n, n, dtype=dtype)
        first = median_seconds(lambda: a @ b, repeats=1, warmup=0)        # also the warm-up
        best = first if first > 0.1 else min(median_seconds(lambda: a @ b, repeats=1, warmup=0) for _ in range(5))
        _cpu_peak[(dtype, n)] = 2 * n**3 / best
    return _cpu_peak[(dtype, n)]


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_bf16(name)
        if peak is None:
            return float("nan"), f"{name} (no peak figure known)"
        if dtype == torch.float32:
            if torch.get_float32_matmul_precision() == "highest":
                return float("nan"), f"{name}: float32 without TF32 (no peak figure known)"
            return peak * TF32_FRACTION, f"{name} data sheet, TF32"
        return peak, f"{name} data sheet"
    return measured_cpu_peak(dtype), f"measured {dtype} matmul peak on this CPU"


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return peak_rss_bytes() / 1e9


def _step_of(line: str) -> float:
    """The step of one metrics.jsonl line; infinite for a line a kill cut short (dropped)."""
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return math.inf


class MetricsLog:
    """metrics.jsonl (one JSON object per line), TensorBoard and wandb when enabled; rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, wandb: bool, config: dict,
                 resume_step: int = 0) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = self.wb = None
        if not enabled:
            return
        if self.path.exists():   # drop what a killed run logged after its last checkpoint
            keep = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
            with atomic_file(self.path) as tmp:
                tmp.write_text("".join(line + "\n" for line in keep))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:
                print("note: tensorboard is not installed; metrics go to metrics.jsonl only")
        if wandb:
            try:
                import wandb as wb

                self.wb = wb.init(project="tinyllama", config=config, resume="allow")
            except ImportError:
                print("note: wandb was asked for but is not installed (pip install wandb)")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                if self.tb is not None:
                    self.tb.add_scalar(k, v, step)
        if self.wb is not None:
            self.wb.log(record, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()


def plot_loss_curve(metrics_path: Path, out_png: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no loss curve PNG")
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["tokens"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", lw=1.2)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(f"pretraining loss: {metrics_path.parent.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
