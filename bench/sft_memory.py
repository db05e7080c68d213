"""SFT memory and speed: full, LoRA and QLoRA on one preset (random weights), ours (sft.modeling,
tinyllama.model.Llama under transformers) vs transformers' own LlamaForCausalLM, same loop,
each in a fresh process so its peak memory is its own.

    python -m bench.sft_memory [--preset tinyllama-1.1b] [--seq 512] [--steps 2] [--methods full lora qlora]

One micro-batch of `--seq` tokens per step, AdamW over the trainable parameters (paged 8-bit
AdamW for QLoRA on CUDA, as `python -m sft` uses), LoRA r=16 on all seven projections, QLoRA =
nf4 + double quantization + gradient checkpointing. Peak memory: `torch.cuda.max_memory_reserved`
on a GPU (the issue's target: QLoRA of tinyllama-1.1b under 4 GB at seq 512), peak RSS on a CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from . import markdown_table, median_seconds, peak_rss_bytes

METHODS = ("full", "lora", "qlora")


def _load(impl: str, base: str, method: str, device: str, dtype):
    if impl == "ours":
        from sft.train import load_model

        return load_model(base, method, device, dtype)
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    if method == "qlora":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
        return LlamaForCausalLM.from_pretrained(base, dtype=dtype, quantization_config=q,
                                                device_map={"": 0} if device == "cuda" else {"": "cpu"})
    return LlamaForCausalLM.from_pretrained(base, dtype=dtype, attn_implementation="sdpa").to(device)


def _measure(impl: str, base: str, method: str, seq: int, steps: int) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = _load(impl, base, method, device, dtype)
    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if method == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "qlora" and device == "cuda":
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW8bit(params, lr=1e-4)
    else:
        opt = torch.optim.AdamW(params, lr=1e-4 if method != "full" else 1e-5)
    ids = torch.randint(3, 32000, (1, seq), generator=torch.Generator().manual_seed(0)).to(device)

    def step() -> float:
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    dt = median_seconds(step, steps, warmup=1)       # warm-up: allocations, kernel choice
    peak = (torch.cuda.max_memory_reserved() if device == "cuda"
            else peak_rss_bytes())
    return {"tok_s": seq / dt, "peak_gb": peak / 1e9, "device": device,
            "trainable": sum(p.numel() for p in params)}


def run(preset: str = "tinyllama-1.1b", seq: int = 512, steps: int = 2, methods=METHODS) -> str:
    import torch

    from tinyllama import Llama, ModelConfig, Tokenizer, save_checkpoint

    with tempfile.TemporaryDirectory(prefix="sft-bench-") as tmp:
        base = Path(tmp) / preset
        with torch.device("cpu"):
            torch.manual_seed(0)
            save_checkpoint(Llama(ModelConfig.from_name(preset)), Tokenizer.llama2(), base)
        rows = []
        for method in methods:
            res = {}
            for impl in ("ours", "hf"):
                r = subprocess.run([sys.executable, "-m", "bench.sft_memory", "--child", impl, str(base), method,
                                    str(seq), str(steps)], capture_output=True, text=True)
                if r.returncode != 0:
                    tail = (r.stderr.strip().splitlines() or ["?"])[-1][:120]
                    res[impl] = {"error": "out of memory (killed)" if r.returncode in (-9, 137) else tail}
                else:
                    res[impl] = json.loads(r.stdout.strip().splitlines()[-1])
            o, h = res["ours"], res["hf"]

            def cell(x: dict) -> str:
                if "error" in x:
                    return f"failed: {x['error']}"
                mem = "peak reserved" if x["device"] == "cuda" else "peak RSS"
                return f"{x['tok_s']:,.0f} tok/s, {mem} {x['peak_gb']:.2f} GB"

            ratio = f"{o['tok_s'] / h['tok_s']:.2f}x" if "error" not in o and "error" not in h else "-"
            trainable = f"{o['trainable']:,}" if "trainable" in o else "-"
            rows.append((method, trainable, cell(o), cell(h), ratio))
    head = (f"{preset}, seq {seq}, micro-batch 1", "trainable params", "ours (sft.modeling)",
            "transformers LlamaForCausalLM", "speed ours vs HF")
    return markdown_table(head, rows)


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
    args = ap.parse_args(argv)
    print(run(args.preset, args.seq, args.steps, args.methods))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
