"""Stage `qlora`: peak GPU memory and speed of QLoRA on tinyllama-1.1b at micro-batch 1, seq 512
(the project's target: under 4 GB), and `python -m sft --method qlora` end to end.

Measures, each in a fresh process so that its peak is its own:
  * bench.sft_memory's own measurement (`python -m bench.sft_memory --child`: nf4 + double
    quantization + gradient checkpointing + paged 8-bit AdamW), ours (sft.modeling) and
    transformers' LlamaForCausalLM: tokens/s, the allocator's peak (torch.cuda.max_memory_reserved)
    and the device-wide peak (CUDA context and bnb's managed-memory pages included), as that
    benchmark reports them;
  * --e2e: sft.train.run_sft(method=qlora, batch 1, 4 steps) on the sample data: trl's
    SFTTrainer with the optimizer sft.train picks (paged_adamw_8bit on CUDA): steps, loss, and
    the same two peaks, polled as bench.sft_memory polls them.

    python -m gpu_check.qlora_mem [--preset tinyllama-1.1b] [--seq 512] [--impls ours hf] [--e2e]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import device_name, emit, error_text, seconds_left

RESULT = "RESULT "        # the line the end-to-end child prints its record on


def e2e(base: str, work: str, seq: int, dtype: str) -> dict:
    """run_sft as `python -m sft --method qlora` runs it, with its memory peaks."""
    import torch

    from bench.sft_memory import PeakPoller, device_used_reader
    from sft.train import SFTArgs, optimizer_name, run_sft

    device = device_name()
    poller = baseline = None
    if device == "cuda":
        read, source = device_used_reader()
        baseline = read()
        poller = PeakPoller(read).start()
    t0 = time.perf_counter()
    res = run_sft(SFTArgs(base=base, out=str(Path(work) / "sft-qlora"), method="qlora", batch_size=1, seq_len=seq,
                          max_steps=4, eval_fraction=0.02, progress=False, logging_steps=1, device=device,
                          dtype=dtype))
    r = {"what": "run_sft qlora", "seconds": round(time.perf_counter() - t0, 1), "steps": res.summary["steps"],
         "train_loss": res.summary["train_loss"], "dtype": res.summary["dtype"],
         "optim": optimizer_name("qlora", device)}
    if poller is not None:
        r.update(allocator_peak_gb=round(torch.cuda.max_memory_reserved() / 1e9, 3),
                 device_peak_gb=round((poller.stop() - baseline) / 1e9, 3), device_source=source)
    return r


def save_base(preset: str, work: Path) -> str:
    import torch

    from tinyllama import Llama, ModelConfig, Tokenizer, save_checkpoint

    torch.manual_seed(0)
    with torch.device(device_name()):              # initialising 1.1B on the GPU: fast
        model = Llama(ModelConfig.from_name(preset))
    base = work / preset
    save_checkpoint(model.to(torch.bfloat16), Tokenizer.llama2(), base)     # bf16 on disk: half the write
    return str(base)


def run_child(cmd: list[str], label: dict, timeout: float) -> None:
    """One measuring process; its record (its last stdout line, JSON), or why there is none."""
    try:
        r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        emit("qlora", **label, timed_out=True, timeout_s=round(timeout), stderr_tail=tail[-800:])
        return
    sys.stderr.write(r.stderr[-4000:])                     # into log.txt: what the child said
    lines = r.stdout.strip().splitlines()
    try:
        record = json.loads(lines[-1].removeprefix(RESULT)) if r.returncode == 0 and lines else None
    except json.JSONDecodeError:
        record = None
    if record is not None and "error" not in record:
        emit("qlora", **{**label, **record})
    else:
        emit("qlora", **label, rc=r.returncode, error=(r.stderr.strip().splitlines() or ["?"])[-1][:400],
             stderr_tail=r.stderr[-1500:])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--e2e-child", nargs=4, metavar=("BASE", "WORK", "SEQ", "DTYPE"), help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="tinyllama-1.1b")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--methods", nargs="+", default=["qlora"], choices=["full", "lora", "qlora"])
    ap.add_argument("--impls", nargs="+", default=["ours"], choices=["ours", "hf"])
    ap.add_argument("--e2e", action="store_true", help="also run_sft(method=qlora) end to end")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="run_sft's compute dtype (auto: as python -m sft picks it, bf16 on a GPU)")
    ap.add_argument("--timeout", type=float, default=120, help="seconds per measuring process")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.e2e_child:
        base, work, seq, dtype = args.e2e_child
        print(RESULT + json.dumps(e2e(base, work, int(seq), dtype)), flush=True)
        return
    work = Path(tempfile.mkdtemp(prefix="gpu-check-qlora-"))
    try:
        t0 = time.perf_counter()
        try:
            base = save_base(args.preset, work)
        except Exception as e:
            emit("qlora", what="base", error=error_text(e))
            return
        emit("qlora", what="base", preset=args.preset, seconds=round(time.perf_counter() - t0, 1))
        jobs = [(["-m", "bench.sft_memory", "--child", impl, base, method, str(args.seq), str(args.steps)],
                 {"what": "measure", "impl": impl, "method": method, "seq": args.seq})
                for method in args.methods for impl in args.impls]
        if args.e2e:
            jobs.append((["-m", "gpu_check.qlora_mem", "--e2e-child", base, str(work), str(args.seq), args.dtype],
                         {"what": "run_sft qlora"}))
        for cmd, label in jobs:
            left = seconds_left() - 5
            if left < 15:
                emit("qlora", **label, skipped="deadline")
                continue
            run_child(cmd, label, min(args.timeout, left))
    finally:
        shutil.rmtree(work, ignore_errors=True)           # 2.2 GB for tinyllama-1.1b


if __name__ == "__main__":
    main()
