"""python -m evaluation: lm-eval-harness tasks and perplexity, on checkpoint directories and GGUFs.

    python -m evaluation --model out/sft out/gguf/x-Q4_K_M.gguf        # make eval: one column each
    python -m evaluation --model out/sft --tasks hellaswag,piqa         # TinyLlama's tasks (needs the hub)
    python -m evaluation --model out/sft --perplexity data/tokens/natural --tasks none
    python -m evaluation --model out/sft --tasks python_builtins_gen --apply-chat-template   # prompts as chats
    python -m evaluation --sweep out/pretrain --perplexity data/tokens/natural   # every step-*/ + a plot

Models run through `tinyllama.inference.backends` (our PyTorch model, or llama.cpp for a GGUF) wrapped as
an lm-eval `LM`: log-likelihoods score the continuation tokens from one forward pass per request,
reusing the KV cache for the shared context of a question's choices; generation is greedy
(deterministic, TinyLlama PR #8). The default task set is TinyLlama's seven zero-shot
commonsense tasks, reported beside the paper's numbers; offline they cannot be downloaded, so
`make eval` runs the shipped local task `python_builtins_mc` (multiple choice built from the SFT
sample's held-out docstrings) and perplexity on the validation shards; `python_builtins_gen`
asks a chat model to write those answers (greedy; exact match and chrF).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from tinyllama.cli import ModelArgs, add_model_args, comma_list
from tinyllama.errors import UserError, report
from tinyllama.paths import check_output_parent
from tinyllama.runtime import INFERENCE

from .harness import LOCAL_GEN_TASK, LOCAL_TASK, LOCAL_TASKS, TINYLLAMA_TASKS


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", type=Path, default=None, metavar="RUN_DIR",
                    help="evaluate every step-*/ checkpoint of a pretraining run instead, and plot it")
    add_model_args(ap, required=False, many=True, only=("device", "dtype", "ctx_size", "n_gpu_layers", "runtime"),
                   help="models, one column each (e.g. a model and its GGUF): checkpoint directories, .gguf files "
                        "or hub references (org/name, org/name:Q4_K_M, org/name/FILE.gguf; org/name@REV)")
    ap.add_argument("--tasks", nargs="+", default=None, metavar="TASK[,TASK...]",
                    help=f"lm-eval task names, as lm-eval takes them (a,b) or space-separated (default: "
                         f"{','.join(TINYLLAMA_TASKS)} when HF_HUB_OFFLINE is unset, else {LOCAL_TASK}; offline "
                         f"also {LOCAL_GEN_TASK}); 'none' for perplexity only")
    ap.add_argument("--apply-chat-template", action="store_true",
                    help="give each prompt as a user turn in the model's own chat template, tokenized as the "
                         "server tokenizes a chat request (for chat models)")
    ap.add_argument("--num-fewshot", type=int, default=None, help="(default: each task's own; 0 for these)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    ap.add_argument("--perplexity", nargs="*", default=[], metavar="SHARDS",
                    help="token-shard directories (prepare) to report validation perplexity on")
    ap.add_argument("--seq-len", type=int, default=256, help="perplexity block length (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    for flag, low in (("seq_len", 1), ("limit", 1), ("num_fewshot", 0)):
        value = getattr(args, flag)
        if value is not None and value < low:
            ap.error(f"--{flag.replace('_', '-')} must be >= {low}, got {value}")
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    tasks = comma_list(args.tasks) or ([LOCAL_TASK] if offline else TINYLLAMA_TASKS)
    tasks = [] if tasks == ["none"] else tasks
    try:
        model = ModelArgs.from_namespace(args)
        if args.out is not None:
            check_output_parent(args.out, "--out")            # before minutes of evaluation
        if args.sweep is not None:
            return _sweep(args, model, tasks)
        if not model.model:
            raise UserError("give --model (or --sweep RUN_DIR)")
        return _models(args, model, tasks)
    except UserError as e:
        return report(e)


def _models(args: argparse.Namespace, model: ModelArgs, tasks: list[str]) -> int:
    from tinyllama.inference.backends import load_backend
    from tinyllama.formats.hub import resolve_model

    from .harness import local_task_dir, run_tasks
    from .perplexity import perplexity
    from .report import markdown_report

    refs = [resolve_model(m) for m in model.model]     # all resolved (and fetched) before minutes of work
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        include = local_task_dir(Path(tmp)) if set(tasks) & set(LOCAL_TASKS) else None
        for ref in refs:
            backend, tok = load_backend(ref, **model.backend_kwargs())
            print(f"{backend.name}: {backend.precision}; {model.runtime.describe(INFERENCE)}", file=sys.stderr,
                  flush=True)
            try:
                results = run_tasks(backend, tok, tasks, include, args.num_fewshot, args.limit,
                                    args.apply_chat_template) if tasks else {}
                ppl = {str(p): perplexity(backend, p, args.seq_len, tokenizer=tok) for p in args.perplexity}
            finally:
                backend.close()
            runs[backend.name] = (results, ppl)
    print(markdown_report(runs))
    if args.out:
        _write_json(args.out, {name: {"tasks": res, "perplexity": {k: v[0] for k, v in ppl.items()}}
                               for name, (res, ppl) in runs.items()})
    return 0


def _sweep(args: argparse.Namespace, model: ModelArgs, tasks: list[str]) -> int:
    from .harness import local_task_dir
    from .sweep import sweep

    png = args.out.with_suffix(".png") if args.out else args.sweep / "eval_sweep.png"
    print(f"sweep {args.sweep}: dtype {model.dtype}; {model.runtime.describe(INFERENCE)}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        include = local_task_dir(Path(tmp)) if set(tasks) & set(LOCAL_TASKS) else None
        rows = sweep(args.sweep, args.perplexity, tasks, args.seq_len, include, args.limit, png, model.dtype,
                     model.device, model.runtime)
    keys = [k for k in rows[0] if k != "checkpoint"]
    print("| checkpoint | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['checkpoint']} | " + " | ".join(f"{r[k]:,.4g}" if isinstance(r[k], float) else f"{r[k]:,}"
                                                   for k in keys) + " |")
    print(f"plot: {png}")
    if args.out:
        _write_json(args.out, rows)
    return 0


def _write_json(path: Path, data) -> None:
    from tinyllama.atomic import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
