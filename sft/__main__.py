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

Examples longer than --seq-len keep their start and are cut; an example whose assistant tokens all
fall beyond the cut is dropped. Both are counted in the data summary. Loss is computed on
assistant tokens only (each reply and its closing </s>).
"""


def build_parser() -> argparse.ArgumentParser:
    from tinyllama.cli import add_flags, add_renamed_flag
    from tinyllama.runtime import TRAINING, add_runtime_args

    from .train import SFTArgs

    p = argparse.ArgumentParser(prog="python -m sft", description=__doc__, epilog=DATA_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, SFTArgs)
    add_renamed_flag(p, "--max-len", "--seq-len", dest="seq_len", type=int)
    p.add_argument("--samples", type=int, default=2, metavar="N",
                   help="print the saved model's greedy answers to N held-out questions (default: %(default)s)")
    add_runtime_args(p, TRAINING)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tinyllama.errors import UserError, report
    from tinyllama.runtime import DEST, RuntimeOptions

    from .train import SFTArgs, run_sft

    samples = args.samples
    try:
        runtime = RuntimeOptions.from_namespace(args)
        fields = {k: v for k, v in vars(args).items() if k != "samples" and not k.startswith(DEST)}
        result = run_sft(SFTArgs(**fields), runtime)
    except UserError as e:
        return report(e)
    if samples:
        show_samples(result.out, result.summary.get("sample_questions", []), samples)
    return 0


def show_samples(model_dir, questions: list[str], n: int) -> None:
    """Greedy answers of the saved chat model to held-out questions, through the chat template
    and tinyllama.inference.generate: what a user of the model would see."""
    from tinyllama import load_checkpoint
    from tinyllama.formats.chat import apply_chat_template
    from tinyllama.inference.generate import generate

    model, tok = load_checkpoint(model_dir)
    for q in (questions or ["What does `len()` do?"])[:n]:
        ids = apply_chat_template(tok, [{"role": "user", "content": q}])
        out = list(generate(model, ids, max_new_tokens=64, stop_ids=tok.stop_ids))
        stopped = bool(out) and out[-1] in tok.stop_ids
        print(f"sample (held out): {q}\n  -> {tok.decode(out).strip()}" + ("" if stopped else " [...]"))


if __name__ == "__main__":
    raise SystemExit(main())
