"""CPU training steps with the C library's allocator defaults vs tinyllama.allocator's settings.

    python -m bench.allocator [--steps 6] [--preset tinyllama-19m]

The pretraining step of `pretrain/configs/cpu.yaml` (batch 8 × 256, AdamW, clipping) in float32,
each setting in a fresh process (MKL reads its setting when torch loads): wall time, user and
system CPU time and minor page faults per step, peak RSS. "system" is glibc's and MKL's
defaults (TINYLLAMA_ALLOCATOR=system, MKL's buffer pool on); "ours" is what python -m pretrain
and python -m sft run with.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from . import markdown_table


def _child(preset: str, steps: int) -> dict:
    import resource
    import time

    from tinyllama.allocator import retain_freed_memory
    from tinyllama.runtime import RuntimeOptions

    applied = retain_freed_memory(RuntimeOptions.from_env().allocator)     # as a training CLI reads it
    import torch

    from pretrain.train import loss_fn
    from tinyllama import Llama, ModelConfig
    from tinyllama.measure import peak_rss_bytes

    torch.manual_seed(0)
    model = Llama(ModelConfig.from_name(preset))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    x = torch.randint(0, model.config.vocab_size, (8, 257))

    def step() -> None:
        loss_fn(model, x[:, :-1], x[:, 1:], None).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()                                                     # warm-up: first allocations
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    return {"applied": applied, "wall": (t1 - t0) / steps, "user": (r1.ru_utime - r0.ru_utime) / steps,
            "sys": (r1.ru_stime - r0.ru_stime) / steps, "faults": (r1.ru_minflt - r0.ru_minflt) / steps,
            "rss_gb": peak_rss_bytes() / 1e9}


def _measure(setting: str, preset: str, steps: int) -> dict:
    env = dict(os.environ)
    if setting == "system":
        env["TINYLLAMA_ALLOCATOR"] = "system"
        env.pop("MKL_DISABLE_FAST_MM", None)
    else:
        env.pop("TINYLLAMA_ALLOCATOR", None)
        env["MKL_DISABLE_FAST_MM"] = "1"          # what configure_mkl() sets in the CLIs
    r = subprocess.run([sys.executable, "-m", "bench.allocator", "--child", preset, str(steps)], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"allocator bench ({setting}) failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(steps: int = 6, preset: str = "tinyllama-19m", rounds: int = 2) -> str:
    from tinyllama.measure import cpu_identity

    results: dict[str, list[dict]] = {"system": [], "ours": []}
    for _ in range(rounds):                                     # interleaved: a slow spell hits both
        for setting in results:
            results[setting].append(_measure(setting, preset, steps))
    best = {k: min(v, key=lambda r: r["wall"]) for k, v in results.items()}
    s, o = best["system"], best["ours"]
    rows = [
        ("wall time per step", f"{s['wall']:.2f} s", f"{o['wall']:.2f} s", f"{s['wall'] / o['wall']:.2f}x"),
        ("system CPU time per step", f"{s['sys']:.2f} s", f"{o['sys']:.2f} s", ""),
        ("user CPU time per step", f"{s['user']:.2f} s", f"{o['user']:.2f} s", ""),
        ("minor page faults per step", f"{s['faults']:,.0f}", f"{o['faults']:,.0f}", ""),
        ("peak RSS", f"{s['rss_gb']:.2f} GB", f"{o['rss_gb']:.2f} GB", ""),
    ]
    head = (f"{preset} float32 step, batch 8 × 256 (best of {rounds})", "glibc + MKL defaults",
            "ours (tinyllama.allocator)", "ours vs defaults")
    return f"CPU: {cpu_identity().describe()}\n\n" + markdown_table(head, rows)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(_child(sys.argv[2], int(sys.argv[3]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--preset", default="tinyllama-19m")
    args = ap.parse_args(argv)
    print(run(args.steps, args.preset))
    return 0


if __name__ == "__main__":
    sys.exit(main())
