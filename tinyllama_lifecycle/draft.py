"""tinyllama draft (make draft TARGET=...): a speculative-decoding draft for any Llama-family target.

    tinyllama draft --target ~/.cache/tinyllama/models/SmolLM2-135M-Instruct.Q4_1.gguf
    tinyllama draft --target out/sft --preset tinyllama-debug --out out/draft
    tinyllama draft --target HuggingFaceTB/SmolLM2-135M-Instruct --steps 600

The recipe, one stage after another through their own command lines (each step is skipped when
its output is already there, so the same command resumes where it stopped):
  1. a GGUF target is imported into a checkpoint (its tokenizer, template and embeddings);
  2. the default corpus is tokenized in the target's vocabulary (prepare.corpus --tokenizer);
  3. a small preset is pretrained from scratch in that vocabulary, lm_head tied to the embeddings,
     the embedding table started from the target's projected onto the preset's width;
  4. the target answers the SFT sample's training questions and the standard library's code
     prompts (sft.distill; the held-out questions and code prompts stay unseen: they are what
     bench.speculative measures on);
  5. the draft is fully fine-tuned on those answers (sft --method full): it learns to agree with
     the model it drafts for;
  6. it is exported to a Q8_0 GGUF for llama.cpp.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from . import stage_root


DEFAULT_STEPS = 3000        # 6M tokens, under one pass over the default corpus


def _run(args: list[str]) -> None:
    """One stage, as `tinyllama STAGE ...` would run it; a failure stops the recipe with its status."""
    print(f"\n== tinyllama {' '.join(args)}", flush=True)
    code = subprocess.call([sys.executable, "-m", "tinyllama_lifecycle", *args])
    if code:
        raise SystemExit(code)


def steps(target: str, out: Path, preset: str, max_steps: int | None = None, init_embeddings: bool = True,
          max_new_tokens: int = 256, corpus: str | None = None, limit: int | None = None,
          sft_steps: int | None = None) -> list[tuple[Path, list[str]]]:
    """(the output that marks a step done, its command) for every step of the recipe. corpus: raw
    text (a file or folder python -m prepare reads) instead of the default corpus; limit: answer
    only that many prompts; sft_steps: fine-tuning steps instead of 3 epochs (a quick run)."""
    checkpoint = out / "target" if target.endswith(".gguf") else None
    tok = str(checkpoint or target)
    tokens = out / "corpus" / "tokens"
    config = stage_root() / "pretrain" / "configs" / "cpu-draft.yaml"
    sources = ["natural"] if corpus else ["natural", "code"]
    pretrain = ["pretrain", "--config", str(config), "--preset", preset, "--tokenizer", tok, "--tie-embeddings",
                "--data", *(f"{n}={tokens / n}" for n in sources), "--weights",
                *(["natural=1"] if corpus else ["natural=0.7", "code=0.3"]), "--out", str(out / "pretrain")]
    pretrain += ["--embeddings-from", tok] if init_embeddings else []
    if max_steps:               # a shorter run than the config's: its warm-up, evaluation and saves scaled down
        pretrain += ["--max-steps", str(max_steps), "--warmup-steps", str(max(1, max_steps // 10)),
                     "--eval-every", str(max_steps), "--save-every", "0"]
    tokenize = ["prepare", corpus, "--out", str(tokens / "natural"), "--tokenizer", tok, "--no-progress"] if corpus \
        else ["corpus", "--out", str(out / "corpus"), "--tokenizer", tok]
    distill = ["distill", "--teacher", target, "--data", "sample", "--code-prompts", "--max-new-tokens",
               str(max_new_tokens), "--out", str(out / "distill.jsonl"), *(["--limit", str(limit)] if limit else [])]
    sft = ["sft", "--base", str(out / "pretrain" / "final"), "--data", str(out / "distill.jsonl"), "--out",
           str(out / "sft"), "--method", "full", "--lr", "1e-3", "--samples", "0",
           *(["--max-steps", str(sft_steps)] if sft_steps else ["--epochs", "3"])]
    return [
        *([(checkpoint / "config.json", ["import", target, "--out", str(checkpoint)])] if checkpoint else []),
        (tokens / sources[-1] / "manifest.json", tokenize),
        (out / "pretrain" / "final" / "config.json", pretrain),
        (out / "distill.jsonl", distill),
        (out / "sft" / "config.json", sft),
        (out / "gguf" / "draft-Q8_0.gguf", ["quantize", "--model", str(out / "sft"), "--type", "q8_0",
                                            "--name", "draft", "--out", str(out / "gguf")]),
    ]


def default_out(target: str, root: Path = Path("out")) -> Path:
    """out/draft-NAME, NAME the target's file or folder name without .gguf (where the demo and the
    server look for the real model's draft: tinyllama.real_model.draft_path)."""
    return root / f"draft-{Path(target.rstrip('/')).name.removesuffix('.gguf') or 'target'}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tinyllama draft", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="the model to draft for: a checkpoint directory, a .gguf file "
                                                    "or a hub id")
    ap.add_argument("--out", type=Path, help="where the draft and every intermediate go (default: out/draft-NAME)")
    ap.add_argument("--preset", default="tinyllama-19m", help="the draft's shape, in the target's vocabulary "
                                                              "(python -m tinyllama presets; default: %(default)s)")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                    help="pretraining steps, 2,048 tokens each (default: %(default)s, ~30 minutes for tinyllama-19m "
                         "on 2 cores; the acceptance rate grew with them: bench/RESULTS.md)")
    ap.add_argument("--no-embeddings-init", dest="init_embeddings", action="store_false",
                    help="start the embedding table at random instead of from the target's")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="per teacher reply (default: %(default)s)")
    ap.add_argument("--corpus", help="raw text to pretrain on, as python -m prepare reads it (default: the default "
                                     "corpus, natural text and code)")
    ap.add_argument("--limit", type=int, help="answer only this many of the distillation prompts (a quick run)")
    ap.add_argument("--sft-steps", type=int, help="fine-tuning steps instead of 3 epochs (a quick run)")
    args = ap.parse_args(argv)
    out = args.out or default_out(args.target)
    out.mkdir(parents=True, exist_ok=True)        # the steps write into it (import checks its parent exists)
    for done, command in steps(args.target, out, args.preset, args.steps, args.init_embeddings,
                               args.max_new_tokens, args.corpus, args.limit, args.sft_steps):
        if done.exists():
            print(f"== {done} exists: skipping `tinyllama {command[0]}`", flush=True)
            continue
        _run(command)
    print(f"\ndraft: {out / 'gguf' / 'draft-Q8_0.gguf'} (checkpoint {out / 'sft'})\n"
          f"measure it: python -m bench.speculative --target {args.target} -md {out / 'gguf' / 'draft-Q8_0.gguf'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
