"""python -m serve.complete: stream a completion to the terminal, then the stats.

    python -m serve.complete --model out/sft --prompt "What does len() do?" --chat
    python -m serve.complete --model out/gguf/tinyllama-19m-chat-Q4_K_M.gguf --prompt "def fib(n):"
    python -m serve.complete --model target.gguf -md draft.gguf --draft-max 4 --prompt "..." --temperature 0
    python -m serve.complete --model TheBloke/Llama-2-7B-Chat-GGUF:Q4_K_M \
        --model-draft TinyLlama/TinyLlama-1.1B-Chat-v1.0 --prompt "Name three prime numbers." --chat

--model and --model-draft take a checkpoint directory (PyTorch) or a .gguf file (llama.cpp), or a
Hugging Face hub id (org/name, org/name:QUANT, org/name/FILE.gguf), in any combination; the
draft must share the target's vocabulary and special ids (and its chat template, where it has one).
--chat renders the prompt in the target's own chat
template.
"""

from __future__ import annotations

import argparse
import sys

from tinyllama.inference.generate import SamplingParams

from .engine import add_model_arguments, check_model_arguments, load_engine

DEFAULTS = SamplingParams()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m serve.complete", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--prompt", required=True, help="the prompt (with --chat: the user's message)")
    ap.add_argument("--chat", action="store_true", help="format the prompt as a user turn in the model's own chat template")
    ap.add_argument("--system", help="with --chat: a system message")
    ap.add_argument("--max-tokens", type=int, default=128, help="(default: %(default)s)")
    ap.add_argument("--temperature", type=float, default=DEFAULTS.temperature,
                    help="0 is greedy (default: %(default)s)")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--repetition-penalty", type=float, default=1.0, help="(default: %(default)s)")
    ap.add_argument("--stop", nargs="*", default=[], help="stop strings")
    ap.add_argument("--seed", type=int, default=None)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    model = check_model_arguments(ap, args)

    from tinyllama.errors import UserError, report

    try:
        sampling = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                                  stop=tuple(args.stop))
    except UserError as e:                         # checked before the model loads
        return report(e)
    engine = load_engine(args, model)
    if engine is None:
        return 2
    try:
        if args.chat:
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            stream = engine.chat(messages + [{"role": "user", "content": args.prompt}], sampling)
        else:
            stream = engine.complete(args.prompt, sampling)
            print(args.prompt, end="", flush=True)
        for delta in stream:
            print(delta, end="", flush=True)
        print()
        print(f"[{stream.stats.describe()}]", file=sys.stderr)
    except UserError as e:
        return report(e)
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
