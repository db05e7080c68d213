"""dtype `auto` on this CPU: how often the probe decides each way, and whether it is right.

    python -m bench.dtype_choice [--repeats 10] [--presets tinyllama-debug tinyllama-19m]

For each preset the training probe (tinyllama.precision) is measured `--repeats` times afresh
(no cache) and its ratio (bf16 time / float32 time) and choice are shown as min / median / max
and counts; beside it, what the probe stands for: real training steps of that preset (forward,
backward and AdamW on a batch of 8 x 256 tokens, float32 against bf16 autocast, interleaved,
the fastest of each). A probe that flips between runs or disagrees with the real step is what
this table is for; run it under CPU_ISA=avx2 or ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 to see
another CPU class's decision on this machine.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from . import markdown_table

BATCH, SEQ = 8, 256


def probe_ratios(cfg, repeats: int) -> list[float]:
    """The training probe's bf16 / float32 ratio, measured `repeats` times without the cache."""
    from tinyllama import precision

    shapes = precision._train_shapes(cfg, BATCH * SEQ)
    return [precision._measure_matmuls(shapes, precision.MARGIN["train"])["ratio"] for _ in range(repeats)]


def step_ratio(cfg, steps: int = 4) -> float:
    """Real training steps: bf16-autocast seconds / float32 seconds (the fastest of `steps` each,
    interleaved so that load on the machine reaches both alike)."""
    import time

    from tinyllama import Llama

    torch.manual_seed(0)
    model = Llama(cfg.replace(max_seq_len=max(cfg.max_seq_len, SEQ + 1)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1))

    def step(dtype: torch.dtype) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
            logits = model(x[:, :-1])
        F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
    for i in range(steps + 1):
        for dtype in best:
            seconds = step(dtype)
            if i:                               # the first round warms both up
                best[dtype] = min(best[dtype], seconds)
    return best[torch.bfloat16] / best[torch.float32]


def run(presets: tuple[str, ...] = ("tinyllama-debug", "tinyllama-19m"), repeats: int = 10) -> str:
    from tinyllama import ModelConfig, precision
    from tinyllama.measure import cpu_identity

    rows = []
    for name in presets:
        cfg = ModelConfig.from_name(name)
        if not precision.has_bf16_instructions():
            rows.append((name, "not measured: no bf16 instructions, auto trains in float32 untimed", "", "", ""))
            continue
        ratios = probe_ratios(cfg, repeats)
        bf16 = sum(r < precision.MARGIN["train"] for r in ratios)
        real = step_ratio(cfg)
        rows.append((name, f"{min(ratios):.2f} / {statistics.median(ratios):.2f} / {max(ratios):.2f}",
                     f"bf16 {bf16}, float32 {repeats - bf16}", f"{real:.2f} ({1 / real:.2f}x)",
                     "bf16" if real < precision.MARGIN["train"] else "float32"))
    head = ("preset", f"probe bf16/fp32 ratio, min / median / max of {repeats}", "probe's choices",
            f"real train step bf16/fp32 (B={BATCH}, T={SEQ})", "the step's choice")
    return (f"CPU: {cpu_identity().describe()}\n\n" + markdown_table(head, rows) +
            f"\n\nbf16 is chosen below a ratio of {precision.MARGIN['train']} (1.25x faster).")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tinyllama-debug", "tinyllama-19m"])
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    print(run(tuple(args.presets), args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
