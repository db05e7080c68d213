"""SFT memory and speed: full, LoRA and QLoRA on one preset (random weights), ours (sft.modeling,
tinyllama.model.model.Llama under transformers) vs transformers' own LlamaForCausalLM, same loop,
each in a fresh process so its peak memory is its own.

    python -m bench.sft_memory [--preset tinyllama-1.1b] [--seq 512] [--steps 2] [--methods full lora qlora]
                               [--json]

One micro-batch of `--seq` tokens per step, weights in the dtypes `python -m sft` loads them in
(sft.train.weight_dtype: float32 where they train, bf16 autocast on a GPU), AdamW over the
trainable parameters (fused on a GPU, paged 8-bit AdamW for QLoRA on CUDA, as `python -m sft`
uses), LoRA r=16 on all seven projections, QLoRA = nf4 + double quantization + gradient
checkpointing.

Peak memory, two figures side by side (table columns; JSON allocator_peak_gb, device_peak_gb):
  allocator peak    on a GPU torch.cuda.max_memory_reserved: the most PyTorch's caching allocator
                    held. It leaves out the CUDA context and what lives outside the allocator, such
                    as bitsandbytes' paged 8-bit AdamW state (CUDA managed memory). On a CPU: peak RSS.
  device-wide peak  GPU only: the most device memory in use (total - free, every process), sampled
                    every 10 ms by a background thread (PeakPoller) from before the model is loaded
                    until after the last step, minus the use measured before this process allocated
                    anything (device_baseline_gb: other processes). What the GPU must have free for
                    the run, and the figure for the target: QLoRA of tinyllama-1.1b under 4 GB at
                    seq 512. Read through NVML when nvidia-ml-py is installed, which needs no CUDA
                    context, so the figure includes this process's context; otherwise through
                    torch.cuda.mem_get_info, whose first call creates the context, which then sits in
                    the baseline and is left out (JSON device_baseline_has_context says which).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from . import markdown_table, median_seconds, peak_rss_bytes

METHODS = ("full", "lora", "qlora")


class PeakPoller:
    """The largest value `read()` (bytes in use) returns while running: read on a background
    thread every `interval` seconds, and once more at start and at stop, so a run shorter than
    the interval still counts its end state. A peak shorter than the interval can slip between
    readings, but PyTorch's caching allocator keeps what it reserved, so its share only grows."""

    def __init__(self, read: Callable[[], int], interval: float = 0.01):
        self.read, self.interval = read, interval
        self.peak = 0
        self.samples = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _sample(self) -> None:
        self.peak = max(self.peak, self.read())
        self.samples += 1

    def _loop(self) -> None:
        try:
            while not self._stopping.wait(self.interval):
                self._sample()
        except BaseException as e:          # raised again by stop(): a dead poller must not pass for a low peak
            self._error = e

    def start(self) -> PeakPoller:
        if self._thread is not None:
            raise RuntimeError("PeakPoller already started")
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="peak-poller", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        """Ends the sampling (joins the thread) and returns the peak."""
        if self._thread is None:
            raise RuntimeError("PeakPoller not started")
        self._stopping.set()
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"the memory poller failed after {self.samples} readings") from self._error
        self._sample()
        return self.peak


def device_used_reader(index: int = 0) -> tuple[Callable[[], int], str]:
    """A function returning the bytes in use on CUDA device `index` (every process), and its
    source: NVML where nvidia-ml-py is installed (it reads without creating a CUDA context),
    else torch.cuda.mem_get_info (total - free; its first call creates this process's context)."""
    import torch

    try:
        torch.cuda.device_memory_used(index)
        return (lambda: torch.cuda.device_memory_used(index)), "nvml"
    except Exception:            # no nvidia-ml-py, or an NVML that cannot read this device
        def used() -> int:
            free, total = torch.cuda.mem_get_info(index)
            return total - free

        return used, "mem_get_info"


def _load(impl: str, base: str, method: str, device: str, dtype, compute):
    """The model with weights in `dtype`; QLoRA's nf4 matmuls in `compute`."""
    if impl == "ours":
        from sft.train import load_model

        return load_model(base, method, device, dtype, compute_dtype=compute)
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    if method == "qlora":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
        return LlamaForCausalLM.from_pretrained(base, dtype=dtype, quantization_config=q,
                                                device_map={"": 0} if device == "cuda" else {"": "cpu"})
    return LlamaForCausalLM.from_pretrained(base, dtype=dtype, attn_implementation="sdpa").to(device)


def _trainable(model, method: str, device: str):
    """The model with LoRA (and QLoRA's preparation) applied, in train mode, and its optimiser."""
    import torch

    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if method == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"]))
    from sft.train import optimizer_name

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = optimizer_name(method, device)                        # what python -m sft's trainer uses
    if optim == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return model, params, bnb.optim.PagedAdamW8bit(params, lr=1e-4)
    return model, params, torch.optim.AdamW(params, lr=1e-4 if method != "full" else 1e-5,
                                            fused=True if optim == "adamw_torch_fused" else None)


def _measure(impl: str, base: str, method: str, seq: int, steps: int) -> dict:
    import torch

    from sft.train import weight_dtype

    device = "cuda" if torch.cuda.is_available() else "cpu"
    compute = torch.bfloat16 if device == "cuda" else torch.float32
    row: dict = {"device": device}
    if device == "cuda":
        read, row["device_source"] = device_used_reader()
        baseline = read()                                  # before this process allocates anything
        row["device_baseline_gb"] = baseline / 1e9
        row["device_baseline_has_context"] = torch.cuda.is_initialized()
        poller = PeakPoller(read).start()
    torch.manual_seed(0)
    model = _load(impl, base, method, device, weight_dtype(method, device, compute), compute)
    model, params, opt = _trainable(model, method, device)
    ids = torch.randint(3, 32000, (1, seq), generator=torch.Generator().manual_seed(0)).to(device)

    def step() -> float:
        with torch.autocast(device, dtype=compute, enabled=device == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    dt = median_seconds(step, steps, warmup=1)       # warm-up: allocations, kernel choice
    if device == "cuda":
        row["device_peak_gb"] = (poller.stop() - baseline) / 1e9
        row["allocator_peak_gb"] = torch.cuda.max_memory_reserved() / 1e9
    else:
        row["allocator_peak_gb"] = peak_rss_bytes() / 1e9
    return {"tok_s": seq / dt, **row, "trainable": sum(p.numel() for p in params)}


def _child(impl: str, base: Path, method: str, seq: int, steps: int) -> dict:
    """One measurement in a fresh process: its JSON line, or {"error": ...}."""
    r = subprocess.run([sys.executable, "-m", "bench.sft_memory", "--child", impl, str(base), method,
                        str(seq), str(steps)], capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1][:120]
        return {"error": "out of memory (killed)" if r.returncode in (-9, 137) else tail}
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure(preset: str = "tinyllama-1.1b", seq: int = 512, steps: int = 2, methods=METHODS) -> dict:
    """{method: {"ours": row, "hf": row}} on a random `preset` base, each row from its own process."""
    import torch

    from tinyllama import Llama, ModelConfig, Tokenizer, save_checkpoint

    with tempfile.TemporaryDirectory(prefix="sft-bench-") as tmp:
        base = Path(tmp) / preset
        with torch.device("cpu"):
            torch.manual_seed(0)
            save_checkpoint(Llama(ModelConfig.from_name(preset)), Tokenizer.llama2(), base)
        return {method: {impl: _child(impl, base, method, seq, steps) for impl in ("ours", "hf")}
                for method in methods}


def report(preset: str, seq: int, results: dict) -> str:
    """The table: a row per method and implementation, the allocator and device-wide peaks side by side."""
    rows_all = [r for res in results.values() for r in res.values() if "error" not in r]
    gpu = any(r["device"] == "cuda" for r in rows_all)
    head = (f"{preset}, seq {seq}, micro-batch 1", "model", "trainable params", "tok/s",
            "peak reserved (allocator)" if gpu else "peak RSS", "peak device-wide (above baseline)",
            "speed ours vs HF")
    names = {"ours": "ours (sft.modeling)", "hf": "transformers LlamaForCausalLM"}
    rows = []
    for method, res in results.items():
        o, h = res["ours"], res["hf"]
        ratio = f"{o['tok_s'] / h['tok_s']:.2f}x" if "error" not in o and "error" not in h else "-"
        for impl, x in res.items():
            if "error" in x:
                rows.append((method, names[impl], "-", f"failed: {x['error']}", "-", "-", "-"))
                continue
            device_wide = f"{x['device_peak_gb']:.2f} GB" if x.get("device_peak_gb") is not None else "-"
            rows.append((method, names[impl], f"{x['trainable']:,}", f"{x['tok_s']:,.0f}",
                         f"{x['allocator_peak_gb']:.2f} GB", device_wide, ratio if impl == "ours" else ""))
    return markdown_table(head, rows)


def run(preset: str = "tinyllama-1.1b", seq: int = 512, steps: int = 2, methods=METHODS) -> str:
    return report(preset, seq, measure(preset, seq, steps, methods))


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        import logging

        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        impl, base, method, seq, steps = sys.argv[2:7]
        print(json.dumps(_measure(impl, base, method, int(seq), int(steps))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tinyllama-1.1b")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--json", action="store_true", help="every measurement as JSON instead of the table")
    args = ap.parse_args(argv)
    results = measure(args.preset, args.seq, args.steps, args.methods)
    print(json.dumps({"preset": args.preset, "seq": args.seq, "results": results}, indent=2) if args.json
          else report(args.preset, args.seq, results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
