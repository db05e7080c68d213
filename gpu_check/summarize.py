"""The summary of a gpu-check run: one line per record worth reading, printed last (so that a
truncated log still ends with it) and written to $OUT/summary.txt.

    python -m gpu_check.summarize out/gpu-check/results.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _stage(r: dict) -> str:
    if "skipped" in r:
        return f"skipped ({r['skipped']}, {r.get('left_s')}s left)"
    return f"rc={r['rc']} in {r['seconds']}s" + (" TIMED OUT" if r.get("timed_out") else "")


def _env(r: dict) -> str:
    versions = " ".join(f"{k} {r.get(k)}" for k in ("torch", "cuda", "cudnn", "triton", "transformers", "peft", "trl",
                                                     "bitsandbytes", "liger-kernel"))
    return (f"{r.get('device', r.get('device_type'))}: {versions}; {r.get('matmul_dtype')} matmul "
            f"{r.get('matmul_tflops')} TFLOP/s, copy {r.get('copy_tb_s')} TB/s; attention {r.get('attention_backends')}; "
            f"sdpa {r.get('sdpa_choice', '-')}")


def _mfu(r: dict) -> str:
    if "tokens_per_s" not in r:
        return json.dumps(r)[:400]
    pct = lambda x: f"{x:.1%}" if x is not None else "-"              # noqa: E731
    return (f"{r['variant']:14s} B{r['micro_batch']} T{r['seq']} {r['dtype']}: {r['tokens_per_s']:>10,.0f} tok/s, "
            f"MFU {pct(r['mfu_vs_datasheet'])} of {r['peak_datasheet_tflops']} TFLOP/s ({r['peak_source']}), "
            f"{pct(r['mfu_vs_measured'])} of the env stage's matmul; fwd+bwd {r['fwd_bwd_ms_median']} ms, opt {r['optimizer_ms']} ms, "
            f"first step {r['first_step_s']} s, peak {r.get('peak_alloc_gb', '-')} GB; "
            f"attention kernels {r.get('attention_kernels', '-')}")


def _smoke(r: dict) -> str:
    if r.get("what") == "shards":
        return f"shards in {r['seconds']}s"
    return (f"{r['what']}: rc={r.get('rc')} {r.get('seconds')}s resumed={r.get('resumed')} final={r.get('final')} "
            f"samples={r.get('samples')} last {str(r.get('last_rows', ''))[:200]} {r.get('stderr_tail', '')[-300:]}")


def line(r: dict) -> str:
    stage = r.get("stage")
    if r.get("what") == "stage":
        text = _stage(r)
    elif stage == "env":
        text = _env(r)
    elif stage in ("mfu", "compile", "fsdp2"):
        text = _mfu(r)
    elif stage == "smoke":
        text = _smoke(r)
    else:
        text = json.dumps({k: v for k, v in r.items() if k not in ("stage", "trace", "stderr_tail")})[:600]
    return f"[{stage}] {text}"


def write_summary(records: list[dict], path: Path) -> str:
    text = "\n".join(["== gpu-check summary", *map(line, records)])
    path.write_text(text + "\n")
    return text


if __name__ == "__main__":
    results = Path(sys.argv[1])
    print(write_summary([json.loads(x) for x in results.read_text().splitlines() if x.strip()],
                        results.with_name("summary.txt")))
