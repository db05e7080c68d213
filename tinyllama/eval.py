"""Evaluation: lm-eval-harness tasks and perplexity, on a checkpoint directory or a GGUF.

    python -m tinyllama.eval --model out/sft                                   # make eval
    python -m tinyllama.eval --model out/gguf/x-Q4_K_M.gguf --tasks hellaswag piqa   # needs the hub
    python -m tinyllama.eval --model out/sft --perplexity data/tokens/natural --tasks none

Models run through `tinyllama.backends` (our PyTorch model, or llama.cpp for a GGUF) wrapped as
an lm-eval `LM`: log-likelihoods score the continuation tokens from one forward pass per request,
reusing the KV cache for the shared context of a question's choices; generation is greedy
(deterministic, TinyLlama PR #8). The default task set is TinyLlama's seven zero-shot
commonsense tasks, reported beside the paper's numbers; offline they cannot be downloaded, so
`make eval` runs the shipped local task `python_builtins_mc` (multiple choice built from the SFT
sample's held-out docstrings) and perplexity on the validation shards.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from .backends import Backend, load_backend
from .tokenizer import Tokenizer

# TinyLlama 1.1B, 3T tokens (arXiv 2401.02385, Table 2), and the lm-eval metric it reports.
PUBLISHED = {
    "hellaswag": (59.20, "acc_norm"), "openbookqa": (36.00, "acc_norm"), "winogrande": (59.12, "acc"),
    "arc_challenge": (30.12, "acc_norm"), "arc_easy": (55.25, "acc_norm"), "boolq": (57.83, "acc"),
    "piqa": (73.29, "acc_norm"),
}
TINYLLAMA_TASKS = list(PUBLISHED)
LOCAL_TASK = "python_builtins_mc"


class EvalError(ValueError):
    """A request the evaluator cannot run (unknown task, missing model); the message says which."""


def lm_class():
    from lm_eval.api.model import LM

    class TinyLlamaLM(LM):
        """Our backends as an lm-eval model (batch 1; context KV reuse across choices)."""

        def __init__(self, backend: Backend, tokenizer: Tokenizer, max_gen_toks: int = 128) -> None:
            super().__init__()
            self.backend, self.tok, self.max_gen_toks = backend, tokenizer, max_gen_toks

        def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            # as lm-eval's HF model: trailing spaces of the context belong to the continuation,
            # and the continuation's ids are what the whole string adds after the context's
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:
                context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
            ctx = self.tok.encode(context, bos=True) if context else [self.tok.bos_id]
            whole = self.tok.encode(context + continuation, bos=True)
            return ctx, whole[len(ctx):] if whole[:len(ctx)] == ctx else self.tok.encode(continuation, bos=False)

        def score(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
            """(sum of log p(cont | ctx), whether greedy decoding would produce cont)."""
            ids = (ctx + cont)[-self.backend.context_length - 1:]
            n = len(cont)
            logits = self.backend.logits(ids[:-1], n_last=n)                   # (n, vocab)
            logp = torch.log_softmax(logits.float(), dim=-1)
            target = torch.tensor(ids[-n:])
            ll = float(logp[torch.arange(n), target].sum())
            return ll, bool((logp.argmax(-1) == target).all())

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            return [self.score(*self._split(*r.args)) for r in requests]

        def loglikelihood_rolling(self, requests) -> list[float]:
            out = []
            window = self.backend.context_length
            for r in requests:
                ids = self.tok.encode(r.args[0], bos=True)
                total, pos = 0.0, 1
                while pos < len(ids):                       # disjoint windows, each with its own context
                    end = min(pos + window - 1, len(ids))
                    start = max(0, end - window)
                    total += self.score(ids[start:pos], ids[pos:end])[0] if pos > start else 0.0
                    pos = end
                out.append(total)
            return out

        def generate_until(self, requests) -> list[str]:
            from .generate import TextStream, generate

            out = []
            for r in requests:
                context, kwargs = r.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                ids = self.tok.encode(context, bos=True)[-(self.backend.context_length - 1):]
                room = self.backend.context_length - len(ids)
                n = min(int(kwargs.get("max_gen_toks", self.max_gen_toks)), room)
                gen = generate(self.backend, ids, max_new_tokens=max(1, n), stop_ids=[self.tok.eos_id])
                out.append("".join(TextStream(gen, self.tok, stop=until)))
            return out

    return TinyLlamaLM


# ---- the shipped local task ------------------------------------------------------------------

def local_task_dir(out: Path, n_questions: int = 120) -> Path:
    """Writes `python_builtins_mc` (YAML + JSONL, absolute paths) into `out`: for held-out
    questions of the SFT sample, pick the right first sentence of the answer among 4 (the other
    three are answers to other questions), deterministically."""
    import random

    from sft.data import load_conversations

    convs = load_conversations("sample")
    firsts = [c[1]["content"].split("\n")[0].split(". ")[0].rstrip(".") + "." for c in convs]
    rng = random.Random(0)
    order = list(range(len(convs)))
    rng.shuffle(order)
    rows = []
    for i in order[:n_questions]:
        wrong = rng.sample([j for j in range(len(convs)) if firsts[j] != firsts[i]], 3)
        choices = [firsts[j] for j in wrong]
        label = rng.randrange(4)
        choices.insert(label, firsts[i])
        rows.append({"query": f"Question: {convs[i][0]['content']}\nAnswer:", "choices": choices, "label": label})
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{LOCAL_TASK}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / f"{LOCAL_TASK}.yaml").write_text(task_yaml(LOCAL_TASK, data))
    return out


def task_yaml(name: str, jsonl: Path) -> str:
    """An lm-eval multiple-choice task over a local JSONL of {query, choices, label}."""
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {jsonl.resolve()}\n"
            "output_type: multiple_choice\ntest_split: test\ndoc_to_text: \"{{query}}\"\n"
            "doc_to_target: \"{{label}}\"\ndoc_to_choice: \"{{choices}}\"\nmetric_list:\n"
            "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n")


def run_tasks(backend: Backend, tok: Tokenizer, tasks: Sequence[str], include_path: str | Path | None = None,
              num_fewshot: int | None = None, limit: int | None = None) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} through lm_eval.simple_evaluate, deterministic."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise EvalError(f"unknown task(s): {', '.join(unknown)} (lm-eval knows {len(manager.all_tasks)}; "
                        f"e.g. {', '.join(TINYLLAMA_TASKS)}, {LOCAL_TASK})")
    lm = lm_class()(backend, tok)
    res = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                          bootstrap_iters=0, log_samples=False, random_seed=0, numpy_random_seed=0,
                          torch_random_seed=0, fewshot_random_seed=0)
    out = {}
    for task, metrics in res["results"].items():
        out[task] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and "stderr" not in k and k != "alias"}
    return out


# ---- perplexity --------------------------------------------------------------------------------

def perplexity(backend: Backend, shards: str | Path, seq_len: int = 256, max_blocks: int = 16) -> tuple[float, int]:
    """exp(mean next-token loss) over the first `max_blocks` validation blocks of a token-shard
    directory (pretrain.prepare's format), each (seq_len + 1) tokens as the trainer reads them."""
    from pretrain.data import PackedSource

    src = PackedSource(shards, "validation")
    n = min(max_blocks, src.num_blocks(seq_len))
    if n == 0:
        raise EvalError(f"{shards}: fewer than {seq_len + 1} validation tokens")
    total, count = 0.0, 0
    for j in range(n):
        block = [int(t) for t in src.block(j, seq_len)]                    # seq_len + 1 tokens
        backend.reset()
        logits = backend.logits(block[:-1], n_last=seq_len)                  # (seq_len, vocab)
        loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(block[1:]), reduction="sum")
        total, count = total + float(loss), count + seq_len
    return math.exp(total / count), count


# ---- report -----------------------------------------------------------------------------------

def markdown_report(runs: dict[str, tuple[dict[str, dict[str, float]], dict[str, tuple[float, int]]]]) -> str:
    """One table, a column per model: task metrics (in %), then perplexities, then TinyLlama's
    published figure where there is one."""
    names = list(runs)
    lines = ["| task | metric | " + " | ".join(f"`{n}`" for n in names) + " | TinyLlama 1.1B (3T), published |",
             "|---|---|" + "---|" * len(names) + "---|"]
    tasks = list(dict.fromkeys(t for res, _ in runs.values() for t in res))
    for task in tasks:
        pub, metric = PUBLISHED.get(task, (None, "acc_norm"))
        cells = []
        for res, _ in runs.values():
            m = res.get(task, {})
            value = m.get(metric, m.get("acc"))
            cells.append(f"{100 * value:.2f}" if value is not None else "-")
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + f" | {pub if pub is not None else '-'} |")
    shards = list(dict.fromkeys(k for _, ppl in runs.values() for k in ppl))
    for shard in shards:
        cells = [f"{ppl[shard][0]:.2f}" if shard in ppl else "-" for _, ppl in runs.values()]
        n = next(ppl[shard][1] for _, ppl in runs.values() if shard in ppl)
        lines.append(f"| perplexity, {shard} ({n:,} tokens) | ppl | " + " | ".join(cells) + " | - |")
    return "\n".join(lines)


# ---- checkpoint sweeps ----------------------------------------------------------------------

def sweep(run_dir: str | Path, shards: Sequence[str | Path], tasks: Sequence[str] = (), seq_len: int = 256,
          include_path: str | Path | None = None, limit: int | None = None,
          png: str | Path | None = None, dtype: str = "auto") -> list[dict]:
    """Every `step-*` checkpoint of a pretraining run (and `final`), evaluated in order of tokens
    seen (step x global_batch_tokens from the run's config.yaml); optionally plotted like
    TinyLlama's Figure 2. Returns [{"checkpoint", "step", "tokens", task/shard: value}, ...]."""
    import yaml

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise EvalError(f"{run_dir}: not a pretraining run (no config.yaml)")
    cfg = yaml.safe_load(cfg_path.read_text())
    batch_tokens = int(cfg["global_batch_tokens"])
    points = sorted((int(d.name.split("-")[1]), d) for d in run_dir.glob("step-*") if (d / "config.json").exists())
    if (run_dir / "final" / "config.json").exists():
        final_step = int(cfg.get("max_steps") or (points[-1][0] if points else 0))
        if not points or points[-1][0] < final_step:
            points.append((final_step, run_dir / "final"))
    if not points:
        raise EvalError(f"{run_dir}: no step-*/ or final/ checkpoints")
    rows = []
    for step, ckpt in points:
        backend, tok = load_backend(ckpt, dtype=dtype)
        try:
            row: dict = {"checkpoint": ckpt.name, "step": step, "tokens": step * batch_tokens}
            if tasks:
                for task, m in run_tasks(backend, tok, tasks, include_path, limit=limit).items():
                    row[task] = m.get(PUBLISHED.get(task, (None, "acc_norm"))[1], m.get("acc"))
            for shard in shards:
                row[f"ppl {Path(shard).name}"] = perplexity(backend, shard, seq_len)[0]
        finally:
            backend.close()
        rows.append(row)
    if png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = [k for k in rows[0] if k not in ("checkpoint", "step", "tokens")]
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
        for ax, key in zip(axes[0], keys):
            ax.plot([r["tokens"] / 1e6 for r in rows], [r[key] for r in rows], marker="o")
            ax.set_xlabel("tokens seen (M)")
            ax.set_title(key)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        from .atomic import atomic_file

        with atomic_file(png) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tinyllama.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", type=Path, default=None, metavar="RUN_DIR",
                    help="evaluate every step-*/ checkpoint of a pretraining run instead, and plot it")
    ap.add_argument("--model", nargs="+", default=[],
                    help="checkpoint directories and/or .gguf files (one column each, e.g. a model and its GGUF)")
    ap.add_argument("--tasks", nargs="+", default=None,
                    help=f"lm-eval task names (default: {' '.join(TINYLLAMA_TASKS)} when HF_HUB_OFFLINE is "
                         f"unset, else {LOCAL_TASK}); 'none' for perplexity only")
    ap.add_argument("--num-fewshot", type=int, default=None, help="(default: each task's own; 0 for these)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    ap.add_argument("--perplexity", nargs="*", default=[], metavar="SHARDS",
                    help="token-shard directories (pretrain.prepare) to report validation perplexity on")
    ap.add_argument("--seq-len", type=int, default=256, help="perplexity block length (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="compute dtype of checkpoint directories; auto: bf16 only where a timed bf16 matmul "
                         "decodes faster here (default: %(default)s)")
    args = ap.parse_args(argv)
    for flag, low in (("seq_len", 1), ("limit", 1), ("num_fewshot", 0)):
        value = getattr(args, flag)
        if value is not None and value < low:
            ap.error(f"--{flag.replace('_', '-')} must be >= {low}, got {value}")
    if args.out is not None and not args.out.parent.is_dir():    # before minutes of evaluation
        why = "is a file, not a folder" if args.out.parent.exists() else "output folder does not exist"
        print(f"error: {args.out.parent}: {why}", file=sys.stderr)
        return 2
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    tasks = args.tasks or ([LOCAL_TASK] if offline else TINYLLAMA_TASKS)
    tasks = [] if tasks == ["none"] else tasks
    if args.sweep is not None:
        return _main_sweep(args, tasks)
    if not args.model:
        print("error: give --model (or --sweep RUN_DIR)", file=sys.stderr)
        return 2
    missing = [m for m in args.model if not Path(m).exists()]
    if missing:
        print(f"error: {missing[0]}: no such model directory or GGUF", file=sys.stderr)
        return 2
    runs = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            include = local_task_dir(Path(tmp)) if LOCAL_TASK in tasks else None
            for m in args.model:
                backend, tok = load_backend(m, dtype=args.dtype)
                print(f"{backend.name}: {backend.precision}", file=sys.stderr, flush=True)
                try:
                    results = run_tasks(backend, tok, tasks, include, args.num_fewshot, args.limit) if tasks else {}
                    ppl = {str(p): perplexity(backend, p, args.seq_len) for p in args.perplexity}
                finally:
                    backend.close()
                runs[Path(m).name] = (results, ppl)
    except (EvalError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = markdown_report(runs)
    print(table)
    if args.out:
        _write_json(args.out, {name: {"tasks": res, "perplexity": {k: v[0] for k, v in ppl.items()}}
                               for name, (res, ppl) in runs.items()})
    return 0


def _write_json(path: Path, data) -> None:
    from .atomic import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def _main_sweep(args: argparse.Namespace, tasks: list[str]) -> int:
    png = args.out.with_suffix(".png") if args.out else args.sweep / "eval_sweep.png"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            include = local_task_dir(Path(tmp)) if LOCAL_TASK in tasks else None
            rows = sweep(args.sweep, args.perplexity, tasks, args.seq_len, include, args.limit, png, args.dtype)
    except (EvalError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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


if __name__ == "__main__":
    raise SystemExit(main())
