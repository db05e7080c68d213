"""SFT memory and speed: full, LoRA and QLoRA on one preset (random weights), ours (sft.modeling,
tinyllama.model.model.Llama under transformers) vs transformers' own LlamaForCausalLM, same loop,
each in a fresh process so its peak memory is its own.

    python -m bench.sft_memory [--preset tinyllama-1.1b] [--seq 512] [--steps 2] [--methods full lora qlora]
                               [--impls ours hf] [--json]
    python -m bench.sft_memory --records --methods qlora --e2e --timeout 120   # the GPU suite's qlora stage

--records (what python -m gpu_check collects): a JSON record per measurement as it completes
(bench.records), the base built on --device in bf16, and with --e2e `python -m sft --method qlora`'s
own run_sft (trl's SFTTrainer, batch 1, 4 steps on the sample data) end to end last, with the
same two peaks.

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
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from . import markdown_table, median_seconds, peak_rss_bytes
from .records import error_text, record, seconds_left

METHODS = ("full", "lora", "qlora")
IMPLS = ("ours", "hf")
RESULT = "RESULT "        # a measuring process prints its record on a line starting so (run_sft prints too)


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


def _measure(impl: str, base: str, method: str, seq: int, steps: int, device: str | None = None) -> dict:
    import torch

    from sft.train import weight_dtype

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
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


def e2e(base: str, work: str, seq: int, dtype: str, device: str) -> dict:
    """run_sft as `python -m sft --method qlora` runs it (batch 1, 4 steps, on the sample data),
    with the same two peaks, polled as _measure polls them."""
    import torch

    from sft.train import SFTArgs, optimizer_name, run_sft

    poller = baseline = None
    if device == "cuda":
        read, source = device_used_reader()
        baseline = read()
        poller = PeakPoller(read).start()
    t0 = time.perf_counter()
    res = run_sft(SFTArgs(base=base, out=str(Path(work) / "sft-qlora"), method="qlora", batch_size=1, seq_len=seq,
                          max_steps=4, eval_fraction=0.02, progress=False, logging_steps=1, device=device,
                          dtype=dtype))
    r = {"seconds": round(time.perf_counter() - t0, 1), "steps": res.summary["steps"],
         "train_loss": res.summary["train_loss"], "dtype": res.summary["dtype"],
         "optim": optimizer_name("qlora", device)}
    if poller is not None:
        r.update(allocator_peak_gb=round(torch.cuda.max_memory_reserved() / 1e9, 3),
                 device_peak_gb=round((poller.stop() - baseline) / 1e9, 3), device_source=source)
    return r


def save_base(preset: str, where: Path, device: str, dtype) -> str:
    """A random `preset` checkpoint (seed 0) with the Llama-2 tokenizer, built on `device` and
    written in `dtype`."""
    import torch

    from tinyllama import Llama, ModelConfig, Tokenizer, save_checkpoint

    torch.manual_seed(0)
    with torch.device(device):
        model = Llama(ModelConfig.from_name(preset))
    base = where / preset
    save_checkpoint(model.to(dtype), Tokenizer.llama2(), base)
    return str(base)


def _child(args: list[str], timeout: float | None) -> tuple[dict, str]:
    """One measuring process (python -m bench.sft_memory ARGS): its record (its RESULT line), or
    why there is none (error, rc, stderr_tail; timed_out); and what it wrote to stderr."""
    try:
        r = subprocess.run([sys.executable, "-m", "bench.sft_memory", *args], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return {"timed_out": True, "timeout_s": round(timeout), "error": f"timed out after {timeout:.0f}s",
                "stderr_tail": tail[-800:]}, tail
    found = [line for line in r.stdout.splitlines() if line.startswith(RESULT)]
    try:                                   # run_sft prints too: the record is the RESULT line
        row = json.loads(found[-1].removeprefix(RESULT)) if r.returncode == 0 and found else None
    except json.JSONDecodeError:
        row = None
    if row is not None and "error" not in row:
        return row, r.stderr
    killed = r.returncode in (-9, 137)
    error = "out of memory (killed)" if killed else (r.stderr.strip().splitlines() or ["?"])[-1][:400]
    return {"rc": r.returncode, "error": error, "stderr_tail": r.stderr[-1500:]}, r.stderr


def measurements(base: str, work: Path, seq: int, steps: int, methods, impls, device: str,
                 e2e_dtype: str | None = None, timeout: float | None = None):
    """(label, row, stderr) per measurement, each in a fresh process, in order: every method x
    impl, then run_sft end to end when e2e_dtype is given. Under a suite's time box a process
    gets at most what the box has left, and one with under 15 s left is skipped."""
    jobs = [(["--child", impl, base, method, str(seq), str(steps), device],
             {"what": "measure", "impl": impl, "method": method, "seq": seq}) for method in methods for impl in impls]
    if e2e_dtype:
        jobs.append((["--e2e-child", base, str(work), str(seq), e2e_dtype, device], {"what": "run_sft qlora"}))
    for args, label in jobs:
        left = seconds_left() - 5
        if left < 15:
            yield label, {"skipped": "deadline"}, ""
            continue
        limit = min(timeout or math.inf, left)
        row, stderr = _child(args, None if math.isinf(limit) else limit)
        yield label, row, stderr


def measure(preset: str = "tinyllama-1.1b", seq: int = 512, steps: int = 2, methods=METHODS,
            impls=IMPLS, device: str = "auto", timeout: float | None = None) -> dict:
    """{method: {impl: row}} on a random `preset` base (float32, built on the CPU), each row
    from its own process."""
    import torch

    from tinyllama.devices import resolve_device

    results: dict = {method: {} for method in methods}
    with tempfile.TemporaryDirectory(prefix="sft-bench-") as tmp:
        base = save_base(preset, Path(tmp), "cpu", torch.float32)
        for label, row, _ in measurements(base, Path(tmp), seq, steps, methods, impls,
                                          resolve_device(device).type, timeout=timeout):
            results[label["method"]][label["impl"]] = row
    return results


def run_records(args) -> None:
    """The suite's form (--records): a record per measurement as it completes (bench.records),
    the base built on the device and written in bf16 (half the write: 2.2 GB for
    tinyllama-1.1b), and with --e2e run_sft(method=qlora) end to end last."""
    import torch

    from tinyllama.devices import resolve_device

    device = resolve_device(args.device).type
    work = Path(tempfile.mkdtemp(prefix="sft-memory-"))
    try:
        t0 = time.perf_counter()
        try:
            base = save_base(args.preset, work, device, torch.bfloat16)
        except Exception as e:
            record("sft_memory", what="base", error=error_text(e))
            return
        record("sft_memory", what="base", preset=args.preset, seconds=round(time.perf_counter() - t0, 1))
        for label, row, stderr in measurements(base, work, args.seq, args.steps, args.methods, args.impls, device,
                                               args.dtype if args.e2e else None, args.timeout):
            sys.stderr.write(stderr[-4000:])                  # what the child said, into the suite's log
            record("sft_memory", **label, **row)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(preset: str, seq: int, results: dict) -> str:
    """The table: a row per method and implementation, the allocator and device-wide peaks side by side."""
    rows_all = [r for res in results.values() for r in res.values() if "tok_s" in r]
    gpu = any(r["device"] == "cuda" for r in rows_all)
    head = (f"{preset}, seq {seq}, micro-batch 1", "model", "trainable params", "tok/s",
            "peak reserved (allocator)" if gpu else "peak RSS", "peak device-wide (above baseline)",
            "speed ours vs HF")
    names = {"ours": "ours (sft.modeling)", "hf": "transformers LlamaForCausalLM"}
    rows = []
    for method, res in results.items():
        o, h = res.get("ours", {}), res.get("hf", {})
        ratio = f"{o['tok_s'] / h['tok_s']:.2f}x" if "tok_s" in o and "tok_s" in h else "-"
        for impl, x in res.items():
            if "tok_s" not in x:
                why = x.get("error") or x.get("skipped", "?")
                rows.append((method, names[impl], "-", f"failed: {why[:120]}", "-", "-", "-"))
                continue
            device_wide = f"{x['device_peak_gb']:.2f} GB" if x.get("device_peak_gb") is not None else "-"
            rows.append((method, names[impl], f"{x['trainable']:,}", f"{x['tok_s']:,.0f}",
                         f"{x['allocator_peak_gb']:.2f} GB", device_wide, ratio if impl == "ours" else ""))
    return markdown_table(head, rows)


def run(preset: str = "tinyllama-1.1b", seq: int = 512, steps: int = 2, methods=METHODS) -> str:
    return report(preset, seq, measure(preset, seq, steps, methods))


def _run_child(argv: list[str]) -> None:
    """--child IMPL BASE METHOD SEQ STEPS [DEVICE] | --e2e-child BASE WORK SEQ DTYPE DEVICE: one
    measurement, its record printed on a RESULT line."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if argv[0] == "--child":
        impl, base, method, seq, steps, *device = argv[1:]
        row = _measure(impl, base, method, int(seq), int(steps), *device)
    else:
        base, work, seq, dtype, device = argv[1:]
        row = e2e(base, work, int(seq), dtype, device)
    print(RESULT + json.dumps(row), flush=True)


def parse_args(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tinyllama-1.1b")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), help="ours, hf or both (default)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda (default: %(default)s)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per measuring process (default: none)")
    ap.add_argument("--json", action="store_true", help="every measurement as JSON instead of the table")
    ap.add_argument("--records", action="store_true",
                    help="a JSON record per measurement as it completes (what python -m gpu_check collects); the "
                         "base built on --device in bf16")
    ap.add_argument("--e2e", action="store_true",
                    help="with --records: also run_sft(method=qlora) end to end, with the same two peaks")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="--e2e's compute dtype (auto: as python -m sft picks it, bf16 on a GPU)")
    args = ap.parse_args(argv)
    if args.e2e and not args.records:
        ap.error("--e2e needs --records")
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] in ("--child", "--e2e-child"):
        _run_child(sys.argv[1:])
        return 0
    args = parse_args(argv)
    if args.records:
        run_records(args)
        return 0
    results = measure(args.preset, args.seq, args.steps, args.methods, args.impls, args.device, args.timeout)
    print(json.dumps({"preset": args.preset, "seq": args.seq, "results": results}, indent=2) if args.json
          else report(args.preset, args.seq, results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
