"""python -m sft: chat fine-tuning (full, LoRA or QLoRA) of an HF-format Llama directory.

    python -m sft --base out/pretrain/final --out out/sft                  # LoRA on the shipped sample
    python -m sft --base out/pretrain/final --out out/sft --method full --lr 3e-4
    python -m sft --base TinyLlama-1.1B-dir --data timdettmers/openassistant-guanaco \\
                  --eval-split test --method qlora --out out/chat           # the real recipe, on a GPU

The output directory is the merged chat model (tokenizer with the chat template,
generation_config.json) plus, for lora/qlora, the adapter alone in OUT/adapter/.
"""

from __future__ import annotations

import argparse
import sys

from tinyllama.allocator import configure_mkl

configure_mkl()          # before torch loads MKL (tinyllama/allocator.py)

DATA_HELP = """\
--data accepts:
  sample                 the shipped offline sample (815 Guanaco-format Q&A about Python built-ins)
  FILE.jsonl             one conversation per line, as {"text": "### Human: ...### Assistant: ..."},
                         {"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}
                         or {"prompt": ..., "response": ...}
  OWNER/NAME             a Hugging Face dataset with one of those fields (needs the hub), e.g.
                         timdettmers/openassistant-guanaco (with --eval-split test)

Examples longer than --max-len keep their start and are cut; an example whose assistant tokens all
fall beyond the cut is dropped. Both are counted in the data summary. Loss is computed on
assistant tokens only (each reply and its closing </s>).
"""


def build_parser() -> argparse.ArgumentParser:
    from .train import ALL_PROJECTIONS, DEFAULT_LR, METHODS, SFTArgs

    d = SFTArgs(base="", out="")
    p = argparse.ArgumentParser(prog="python -m sft", description=__doc__, epilog=DATA_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="HF-format Llama directory to fine-tune (ours or TinyLlama's)")
    p.add_argument("--out", required=True, help="output directory (written atomically; replaced if it exists)")
    p.add_argument("--data", default=d.data, help="sample, a .jsonl file or a hub dataset name (default: %(default)s)")
    p.add_argument("--method", choices=METHODS, default=d.method,
                   help="full: every weight; lora: low-rank adapters on a frozen base; qlora: lora on an nf4 "
                        "(4-bit, double-quantized) base with gradient checkpointing (default: %(default)s)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=float, default=d.epochs, help="passes over the data (default: %(default)s)")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps; overrides --epochs when > 0")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate, cosine decay (default: " +
                        ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per micro-batch (default: %(default)s)")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step (default: %(default)s)")
    g.add_argument("--max-len", type=int, default=d.max_len, help="tokens per example (default: %(default)s)")
    g.add_argument("--packing", action="store_true",
                   help="pack examples into --max-len rows (padding-free; examples never attend to each other)")
    g.add_argument("--no-group-by-length", dest="group_by_length", action="store_false",
                   help="shuffle freely instead of batching examples of similar length")
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="(default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="(default: %(default)s)")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward (default: on for qlora, off otherwise)")
    g.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=d.lora_r, help="adapter rank (default: %(default)s)")
    g.add_argument("--lora-alpha", type=int, default=d.lora_alpha, help="scale alpha/r (default: %(default)s)")
    g.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="(default: %(default)s)")
    g.add_argument("--target-modules", nargs="+", default=d.target_modules, metavar="NAME",
                   help=f"projections to adapt (default: all: {' '.join(ALL_PROJECTIONS)})")
    g = p.add_argument_group("data and runtime")
    g.add_argument("--eval-fraction", type=float, default=d.eval_fraction,
                   help="held-out share for the evaluation loss (default: %(default)s)")
    g.add_argument("--eval-split", default=None, help="a hub dataset's own evaluation split instead (e.g. test)")
    g.add_argument("--skip-invalid", action="store_true",
                   help="count and skip malformed records instead of stopping at the first")
    g.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"], help="(default: %(default)s)")
    g.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16"],
                   help="compute dtype; auto times a bf16 and a float32 matmul of the model's shapes once per "
                        "machine and takes bf16 only where it is faster (AMX, AVX-512 BF16, GPUs) "
                        "(default: %(default)s)")
    g.add_argument("--logging-steps", type=int, default=d.logging_steps, help="(default: %(default)s)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--samples", type=int, default=2, metavar="N",
                   help="print the saved model's greedy answers to N held-out questions (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tinyllama.chat import ChatFormatError
    from tinyllama.checkpoint import CheckpointError

    from .data import DataError
    from .train import SFTArgs, SFTError, run_sft

    samples = args.samples
    del args.samples
    try:
        result = run_sft(SFTArgs(**vars(args)))
    except (SFTError, DataError, CheckpointError, ChatFormatError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if samples:
        show_samples(result.out, result.summary.get("sample_questions", []), samples)
    return 0


def show_samples(model_dir, questions: list[str], n: int) -> None:
    """Greedy answers of the saved chat model to held-out questions, through the chat template
    and tinyllama.generate: what a user of the model would see."""
    from tinyllama import load_checkpoint
    from tinyllama.chat import encode_chat
    from tinyllama.generate import generate

    model, tok = load_checkpoint(model_dir)
    for q in (questions or ["What does `len()` do?"])[:n]:
        ids, _ = encode_chat(tok, [{"role": "user", "content": q}], add_generation_prompt=True)
        out = list(generate(model, ids, max_new_tokens=64, stop_ids=[tok.eos_id]))
        stopped = bool(out) and out[-1] == tok.eos_id
        print(f"sample (held out): {q}\n  -> {tok.decode(out).strip()}" + ("" if stopped else " [...]"))


if __name__ == "__main__":
    raise SystemExit(main())
