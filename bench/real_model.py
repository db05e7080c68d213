"""SmolLM2-135M-Instruct through every stage, in one run: its import and its Q4_1 GGUF evaluated,
LoRA and QLoRA fine-tunes of it, their GGUF exports in llama.cpp, continued pretraining from it.

    python -m bench.real_model [--sft-steps 30] [--pretrain-steps 6]

Held-out data, all in the model's own vocabulary: natural text (Python's help topics) and code
(the json package) as token shards (prepare, 20% held out), the shipped Guanaco-format
SFT sample (5% held out, as `make sft` splits it) and the local multiple-choice task built from
that sample's held-out answers (evaluation.harness). Each model's greedy reply to "What is the
capital of France?" in its own chat template is printed beside its scores. Needs the real model
(`make real-model`) and llama.cpp through llama-cpp-python.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

from . import markdown_table

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def held_out_shards(ckpt: Path, out: Path) -> dict[str, Path]:
    """Python's help topics and the json package as token shards in the checkpoint's vocabulary."""
    import json as json_pkg

    from pydoc_data.topics import topics

    from prepare.prepare import PrepareConfig, prepare

    natural = out / "natural.jsonl"
    natural.write_text("".join(json.dumps({"text": t}) + "\n" for _, t in sorted(topics.items())))
    shards = {}
    for name, src, kw in [("natural", natural, {}), ("code", Path(json_pkg.__file__).parent, {"extensions": (".py",)})]:
        shards[name] = out / f"tok-{name}"
        prepare(PrepareConfig(source=str(src), out=shards[name], workers=1, val_fraction=0.2, progress=False,
                              tokenizer_dir=ckpt, **kw))
    return shards


def scores(model: Path, shards: dict[str, Path], task_dir: Path, limit: int) -> dict:
    """Perplexity on each held-out source, the local task's acc_norm, the greedy Paris reply."""
    from evaluation.harness import LOCAL_TASK, run_tasks
    from evaluation.perplexity import perplexity
    from tinyllama.inference.backends import load_backend
    from tinyllama.formats.chat import apply_chat_template
    from tinyllama.inference.generate import generate

    backend, tok = load_backend(model, dtype="float32")
    try:
        row = {name: perplexity(backend, path, 256, max_blocks=16, tokenizer=tok)[0] for name, path in shards.items()}
        row["mc"] = run_tasks(backend, tok, [LOCAL_TASK], task_dir, limit=limit)[LOCAL_TASK]["acc_norm"] * 100
        ids = list(generate(backend, apply_chat_template(tok, QUESTION), max_new_tokens=24, stop_ids=tok.stop_ids))
        row["reply"] = tok.decode([i for i in ids if i not in tok.stop_ids]).strip()
    finally:
        backend.close()
    return row


def fine_tune(ckpt: Path, out: Path, method: str, steps: int) -> dict:
    from sft.train import SFTArgs, run_sft

    s = run_sft(SFTArgs(base=ckpt, out=out, method=method, max_steps=steps, progress=False, dtype="float32")).summary
    return {"method": method, "steps": s["steps"], "seconds": s["train_seconds"], "before": s["eval_loss_before"],
            "after": s["eval_loss_after"]}


def continued_pretraining(ckpt: Path, shards: dict[str, Path], out: Path, steps: int) -> dict:
    """The first and last logged training loss of a short run from the checkpoint, 7:3 natural:code."""
    from pretrain.config import TrainConfig
    from pretrain.train import train

    train(TrainConfig(init_from=str(ckpt), data={k: str(v) for k, v in shards.items()},
                      weights={"natural": 0.7, "code": 0.3}, seq_len=256, micro_batch=4, global_batch_tokens=4096,
                      max_steps=steps, lr=1e-4, min_lr=1e-5, warmup_steps=1, dtype="float32", out=str(out),
                      save_every=0, eval_every=steps, eval_batches=4, log_every=1, sample_tokens=0,
                      tensorboard=False, progress=False))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return {"first": losses[0], "last": losses[-1], "val": next(r["val_loss"] for r in rows if "val_loss" in r)}


def run(sft_steps: int = 30, pretrain_steps: int = 6, limit: int = 100) -> str:
    from evaluation.harness import CHANCE, LOCAL_TASK, local_task_dir
    from quantize.export import quantize_gguf, write_gguf
    from quantize.gguf_import import import_gguf
    from tinyllama import real_model
    from tinyllama.measure import cpu_identity

    gguf = real_model.path()
    if gguf is None:
        raise SystemExit(f"error: {real_model.absent_reason()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = import_gguf(gguf, tmp / "smollm2", say=lambda _: None)
        shards = held_out_shards(ckpt, tmp)
        task_dir = local_task_dir(tmp / "task")
        tuned = {m: fine_tune(ckpt, tmp / m, m, sft_steps) for m in ("lora", "qlora")}
        f16 = write_gguf(tmp / "lora", tmp / "lora-F16.gguf", "f16")
        q4 = quantize_gguf(f16, tmp / "lora-Q4_K_M.gguf", "q4_k_m")
        models = [("import, float32 (PyTorch)", ckpt), (f"{gguf.name} (llama.cpp)", gguf),
                  (f"+ LoRA, {sft_steps} steps (PyTorch)", tmp / "lora"), ("+ LoRA, F16 GGUF (llama.cpp)", f16),
                  ("+ LoRA, Q4_K_M GGUF (llama.cpp)", q4), (f"+ QLoRA, {sft_steps} steps (PyTorch)", tmp / "qlora")]
        evaluated = [(name, scores(path, shards, task_dir, limit)) for name, path in models]
        cont = continued_pretraining(ckpt, shards, tmp / "continued", pretrain_steps)
    base = evaluated[0][1]
    held_out = 0.7 * math.log(base["natural"]) + 0.3 * math.log(base["code"])
    eval_table = markdown_table(
        ("SmolLM2-135M-Instruct", "ppl natural", "ppl code", f"{LOCAL_TASK} acc_norm (chance {CHANCE[LOCAL_TASK]:.0f}%)",
         'greedy reply to "What is the capital of France?"'),
        [(name, f"{r['natural']:.2f}", f"{r['code']:.2f}", f"{r['mc']:.1f}%", r["reply"]) for name, r in evaluated])
    sft_table = markdown_table(
        ("method", "steps", "train seconds", "held-out assistant-token loss, before -> after"),
        [(t["method"], str(t["steps"]), f"{t['seconds']:.0f}", f"{t['before']:.3f} -> {t['after']:.3f}")
         for t in tuned.values()])
    return "\n\n".join([
        f"CPU: {cpu_identity().describe()}", eval_table,
        f"Perplexity: up to 16 held-out blocks of 256 tokens per source. {LOCAL_TASK}: {limit} questions.",
        "SFT on the shipped Guanaco-format sample in the model's own ChatML template (774 conversations for "
        "training, 41 held out; batch 8, float32):", sft_table,
        f"Continued pretraining from the import (7:3 natural:code, 4,096 tokens a step, lr 1e-4): first logged loss "
        f"{cont['first']:.3f}, after {pretrain_steps} steps {cont['last']:.3f} (validation {cont['val']:.3f}); the "
        f"model's own held-out loss on that mixture is {held_out:.3f}, a random start's ln(49,152) = 10.80.",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft-steps", type=int, default=30, help="optimizer steps of each fine-tune (default: %(default)s)")
    ap.add_argument("--pretrain-steps", type=int, default=6, help="(default: %(default)s)")
    ap.add_argument("--limit", type=int, default=100, help="multiple-choice questions (default: %(default)s)")
    args = ap.parse_args(argv)
    print(run(args.sft_steps, args.pretrain_steps, args.limit))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
