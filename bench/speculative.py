"""Speculative decoding on a target/draft pair: acceptance, speedup and efficiency against the
theory, on both backends, in one run; on constructed 7B- and 1.1B-shaped pairs with llama.cpp's
own speculative decoding beside ours.

    python -m bench.speculative [--target out/sft] [--model-draft out/draft/sft] [--k 1 2 4 6]
    python -m bench.speculative --target out/gguf/tinyllama-19m-chat-Q8_0.gguf \\
                                -md out/gguf/tinyllama-debug-chat-Q8_0.gguf [--anchor]
    python -m bench.speculative --pair 7b [--alpha 0.6 0.7 0.8]         # llama-2-7b-shaped target, 1.1B draft
    python -m bench.speculative --pair 1b                       # the quick variant (1.1B target, ~110M draft)
    python -m bench.speculative --target out/smollm2 -md out/draft/gguf/draft-Q8_0.gguf \\
                                --draft-checkpoint out/draft/sft      # with transformers' assisted generation
    python -m bench.speculative -md ngram --prompt-set copy         # prompt lookup, copy-heavy prompts
    python -m bench.speculative --pair 7b --backend torch --device cuda   # built on the GPU, eager and captured
    python -m bench.speculative --json                              # the rows as JSON

(`make run` leaves both trained pairs.) Greedy decoding of held-out questions from the SFT sample
in the chat template, `--tokens` new tokens each (EOS ignored, so every run decodes the same
length). For each k: alpha = the per-token acceptance rate, solved from the tokens produced per
target pass, (1 - alpha^(k+1)) / (1 - alpha) (accepted / drafted, also shown, undercounts it:
drafts after a rejection are never judged); c = the draft's time per token / the target's (each
measured decoding alone); v(k+1) = the target's time for one (k+1)-token verification pass
(with its cache rollback, timed inside the run's rounds) / a plain step's time; speedup = plain target time / speculative time for the
same tokens; theory = (1 - alpha^(k+1)) / ((1 - alpha)(k c + 1)) (Leviathan et al. 2023, eq. 1
with their cost model, where a pass costs the same at any length) and theory (measured v) =
(1 - alpha^(k+1)) / ((1 - alpha)(k c + v)); efficiency = speedup / theory. "same output" counts
the prompts whose output equals plain greedy decoding's: always all in PyTorch float32 (checked);
llama.cpp's kernels round differently at different batch sizes, so a GGUF run can take the other
token at a near-tie (llama.cpp's own speculative decoding likewise).

`--pair 7b|1b` builds (once, cached: bench.constructed_pair) a target that computes the draft's
own function plus lm_head noise calibrated to a CONSTRUCTED alpha, both Q4_0, and runs
llama.cpp's `llama-speculative-simple` on the same files and prompts at each k
(bench.speculative_anchor; "vs llama.cpp" = our tokens/s over its). `-md ngram[:N]` drafts by
prompt lookup (tinyllama.inference.lookup): no draft model, c taken as 0. `--prompt-set copy` uses prompts
whose answer copies from the prompt: a piece of the standard library's source, then a request to
write it again, started with its first line; `chat` (default) uses the held-out SFT questions.

With a checkpoint directory as target and the draft as one too (`--model-draft DIR`, or
`--draft-checkpoint DIR` beside a GGUF or other draft), transformers runs the same pair on the
same prompts in the same rounds (bench.speculative_transformers): LlamaForCausalLM in float32 with
sdpa, plain `generate` and assisted generation (`assistant_model`) with its default settings and at
each fixed k; their speedups are over transformers' plain `generate`. "vs transformers" = our
tokens/s over transformers' in the same configuration (plain, or k = num_assistant_tokens), and a
last row our fastest configuration over its fastest assisted one; their "same output" counts the
prompts where transformers' assisted, its plain and our plain outputs are all equal.

`--pair 7b|1b|tiny --backend torch` builds the pair in memory on `--device` instead (bf16 on a
GPU) and records, as JSON, per-token latencies eager and through captured CUDA graphs and the
generator's speculative loop in both modes against the theory (bench.speculative_torch; the
GPU suite's spec stage).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import sys
import textwrap
from pathlib import Path
from typing import Sequence

from . import chat_prompts, code_prompts, markdown_table
from .speculative_runs import DecodeRun, decode_prompts, solve_alpha, theory

COPY_SOURCES = (textwrap.dedent, textwrap.TextWrapper._split, json.JSONEncoder.iterencode, inspect.getdoc,
                 Path.relative_to, argparse.ArgumentParser.add_subparsers)


def _copy_prompts(tok, n: int, budget: int, max_code: int = 400) -> list[list[int]]:
    """Code to write out again: the answer copies from the prompt. Each prompt has at most
    `budget` tokens (the code is cut to fit)."""
    out = []
    for fn in COPY_SOURCES[:n]:
        ids = tok.encode(inspect.getsource(fn), bos=False)[:max_code]
        while True:
            code = tok.decode(ids)
            prompt = tok.encode(f"{code}\n\n# The same code again, unchanged:\n{code.splitlines()[0]}\n")
            if len(prompt) <= budget or len(ids) < 8:
                break
            ids = ids[:len(ids) * 9 // 10]
        out.append(prompt)
    return out


def run(target_path: str, draft_path: str, ks=(1, 2, 4, 6), tokens: int = 48, n_prompts: int = 6,
        repeats: int = 3, prompt_set: str = "chat", as_json: bool = False, anchor: bool = False,
        note: str = "", device: str = "cpu", eos: bool = False, draft_checkpoint: str | None = None,
        p_mins: Sequence[float] = ()) -> str:
    title, rows = measure(target_path, draft_path, ks, tokens, n_prompts, repeats, prompt_set, anchor, device, eos,
                          draft_checkpoint, p_mins)
    title += note
    if as_json:
        return json.dumps({"pair": title, "rows": rows}, indent=2)
    head = (title, "tokens/s", "accepted/drafted", "alpha", "alpha by draft position", "c", "v(k+1)", "speedup",
            "theory", "efficiency", "theory (measured v)", "efficiency (measured v)", "vs llama.cpp", "vs transformers",
            "same output")

    def cell(v, fmt):
        return "-" if v is None else fmt.format(v)

    return markdown_table(head, [(r["config"], cell(r["tokens_per_s"], "{:,.1f} tok/s"),
                                  cell(r["accepted_per_drafted"], "{:.2f}"), cell(r["alpha"], "{:.2f}"),
                                  " ".join("-" if a is None else f"{a:.2f}" for a in r["alpha_by_position"]) or "-",
                                  cell(r["c"], "{:.2f}"), cell(r["v"], "{:.2f}"), cell(r["speedup"], "{:.2f}x"),
                                  cell(r["theory"], "{:.2f}x"), cell(r["efficiency"], "{:.0%}"),
                                  cell(r["theory_v"], "{:.2f}x"), cell(r["efficiency_v"], "{:.0%}"),
                                  cell(r.get("vs_llama_cpp"), "{:.2f}x"), cell(r.get("vs_transformers"), "{:.2f}x"),
                                  cell(r["same_output_as_plain"], "{}"))
                        for r in rows])


def _check_same(config: str, outputs: list, plain: list, exact: bool) -> str:
    """'n/N': how many prompts' outputs equal plain greedy decoding's. With `exact` (PyTorch in
    float32) anything but all is a bug. llama.cpp's kernels depend on the batch size (a (k+1)-token
    verification and a 1-token step differ by a few per cent of the logits' spread: measured on
    the constructed 1.1B target), so on near-tied argmaxes a speculative GGUF run may take the
    other token, as llama.cpp's own speculative decoding does; counted, not raised."""
    same = sum(a == b for a, b in zip(outputs, plain))
    if exact and same < len(plain):
        raise AssertionError(f"{config}: speculative output differs from plain greedy decoding")
    return f"{same}/{len(plain)}"


def _row(config, tokens_per_s, accepted_per_drafted=None, alpha=None, c=None, speedup=None, theory=None,
         v=None, theory_v=None, same=None, by_position=()) -> dict:
    return {"config": config, "tokens_per_s": tokens_per_s, "accepted_per_drafted": accepted_per_drafted,
            "alpha_by_position": list(by_position),
            "same_output_as_plain": same,
            "alpha": alpha, "c": c, "speedup": speedup, "theory": theory,
            "efficiency": speedup / theory if speedup is not None and theory else None,
            "v": v, "theory_v": theory_v,
            "efficiency_v": speedup / theory_v if speedup is not None and theory_v else None}


def measure(target_path: str, draft_path: str, ks=(1, 2, 4, 6), tokens: int = 48, n_prompts: int = 6,
            repeats: int = 3, prompt_set: str = "chat", anchor: bool = False,
            device: str = "cpu", eos: bool = False, draft_checkpoint: str | None = None,
            p_mins: Sequence[float] = ()) -> tuple[str, list[dict]]:
    """Rows for plain target and draft, each k, adaptive and auto k, and adaptive and auto k
    again with each of `p_mins` (--draft-p-min: rounds that draft only what the draft is sure
    of); with `anchor` (two GGUFs)
    also llama.cpp's own speculative decoding at each k on the same prompts (bench.speculative_anchor);
    with a checkpoint directory as target and an HF-format draft (`draft_checkpoint`, else
    `draft_path` when it is one) also transformers' plain and assisted generation
    (bench.speculative_transformers). eos: every configuration stops at the target's end of turn
    (what a user gets), else each decodes `tokens` tokens whatever it produces."""
    from tinyllama.inference.backends import GGUFBackend, load_backend, open_drafter
    from tinyllama.inference.draft_policy import Adaptive, Auto, Fixed
    from tinyllama.inference.drafters import ModelDrafter

    from .speculative_transformers import is_checkpoint_dir

    with contextlib.ExitStack() as stack:
        # float32 for checkpoint directories: identity with plain greedy decoding is checked, and in
        # bf16 a (k+1)-token verification and a 1-token step round differently, which can flip a
        # near-tied argmax (seen on the 19M pair, which `auto` decodes in bf16 on an AVX2 CPU)
        target, tok = load_backend(target_path, dtype="float32", device=device)
        stack.callback(target.close)
        drafter = open_drafter(draft_path, dtype="float32", device=device)
        stack.callback(drafter.close)
        drafter.check(target)             # the pair: one line naming both files and the difference
        draft_checkpoint = draft_checkpoint or (draft_path if is_checkpoint_dir(draft_path) else None)
        hf = _transformers_pair(target_path, draft_checkpoint, device, ks)
        if hf:
            stack.callback(hf[0].close)
        model_draft = isinstance(drafter, ModelDrafter)
        p_mins = tuple(p_mins) if model_draft else ()                  # prompt lookup has no probabilities
        draft = drafter.backend if model_draft else drafter            # a model also decodes plainly below
        budget = target.context_length - tokens - 1
        prompts = {"copy": lambda: _copy_prompts(tok, n_prompts, budget), "code": lambda: code_prompts(tok, n_prompts),
                   "chat": lambda: chat_prompts(tok, n_prompts)}[prompt_set]()
        stop_ids = tuple(tok.stop_ids) if eos else ()
        # warm-up at full length: a 7B GGUF's first pass over its weights after loading runs ~30%
        # slower, and would be charged to whichever configuration came first
        decode_prompts(target, prompts[:1], tokens)
        if model_draft:
            decode_prompts(draft, prompts[:1], tokens)
        if hf:
            for settings in (None, {}):
                hf[0].decode(prompts[:1], tokens, settings, stop_ids)
        # Every configuration once per round, rounds repeated, each configuration's fastest round
        # kept: a slow spell of a shared machine then hits all configurations alike.
        configs = [("plain target", target, {})] + ([("plain draft", draft, {})] if model_draft else [])
        configs += [(f"speculative k={k}", target, dict(draft=draft, policy=Fixed(k))) for k in ks]
        # auto: one policy for all prompts and rounds, as the engine keeps one across requests
        for p in (0.0, *p_mins):
            configs += [(_policy_name("adaptive", p), target, dict(draft=draft, policy=Adaptive(4, p_min=p))),
                        (_policy_name("auto", p), target, dict(draft=draft, policy=Auto(p_min=p)))]
        gguf = isinstance(target, GGUFBackend)
        anchor = anchor and gguf and isinstance(draft, GGUFBackend)
        texts = [tok.decode(ids[1:], skip_special=False) for ids in prompts]    # the tool adds the BOS itself
        best, anchors = _rounds(configs, prompts, tokens, repeats, ks,
                                (target.path, draft.path, texts, eos) if anchor else None, stop_ids, hf)
        rows = _rows(best, anchors, ks, prompts, model_draft, exact=not gguf, p_mins=p_mins)
        if hf:
            rows += _transformers_rows(best, rows, [name for name, _ in hf[1]], ks)
    by = Path(draft_path).name if model_draft else drafter.name
    length = f"up to {tokens} tokens, stopping at the end of turn" if eos else f"{tokens} tokens"
    title = (f"{Path(target_path).name} drafted by {by} (greedy, {len(prompts)} held-out {prompt_set} prompts x "
             f"{length}, best of {repeats} interleaved rounds)")
    if hf:
        title += f"; transformers assisted by {draft_checkpoint}"
    return title, rows


def _transformers_pair(target_path: str, draft_checkpoint: str | None, device: str, ks):
    """(TransformersPair, its configurations) for transformers' rows, or None with the reason on
    stderr where the pair has no HF-format checkpoint directory for either model."""
    from tinyllama.devices import resolve_device

    from .speculative_transformers import TransformersPair, skip_reason

    why = skip_reason(target_path, draft_checkpoint)
    if why:
        print(f"transformers' assisted generation skipped: {why}", file=sys.stderr)
        return None
    pair = TransformersPair(target_path, draft_checkpoint, resolve_device(device))
    return pair, pair.configs(ks)


def _keep(best: dict, name: str, result, round_: str) -> None:
    print(f"round {round_}: {name}: {result.tokens_per_s:.1f} tok/s", file=sys.stderr)
    if name not in best or result.tokens_per_s > best[name].tokens_per_s:
        best[name] = result


def _rounds(configs, prompts, tokens: int, repeats: int, ks, anchor, stop_ids=(), transformers=None) -> tuple[dict, dict]:
    """({config: its fastest DecodeRun}, {k: llama.cpp's fastest AnchorRun}); anchor:
    (target GGUF, draft GGUF, prompt texts, stop at EOS) or None; transformers: (TransformersPair,
    its configurations) or None."""
    best: dict[str, DecodeRun] = {}
    anchors: dict[int, object] = {}
    for r in range(repeats):
        for name, model, kw in configs:
            _keep(best, name, decode_prompts(model, prompts, tokens, stop_ids=stop_ids, **kw), f"{r + 1}/{repeats}")
        if anchor:
            from .speculative_anchor import llama_cpp_speculative

            print(f"round {r + 1}/{repeats}: llama-speculative-simple, k = {list(ks)} ...", file=sys.stderr)
            *files, eos = anchor
            for a in llama_cpp_speculative(*files, tokens, ks, ignore_eos=not eos):
                if a.k not in anchors or a.tokens_per_s > anchors[a.k].tokens_per_s:
                    anchors[a.k] = a
        if transformers:
            pair, hf_configs = transformers
            for name, settings in hf_configs:
                _keep(best, name, pair.decode(prompts, tokens, settings, stop_ids), f"{r + 1}/{repeats}")
    return best, anchors


def _policy_name(word: str, p_min: float) -> str:
    """A configuration's name: "speculative auto k", "speculative auto k, p-min 0.75"."""
    return f"speculative {word} k" + (f", p-min {p_min:g}" if p_min else "")


def _rows(best: dict, anchors: dict, ks, prompts, model_draft: bool, exact: bool,
          p_mins: Sequence[float] = ()) -> list[dict]:
    """The table's rows from the rounds' results. Rates are each configuration's own tokens over
    its own time (with EOS honoured a GGUF run can end a prompt a token apart at a near-tie)."""
    from tinyllama.inference.generate import alpha_by_position

    plain = best["plain target"]
    rows = [_row("plain target", plain.tokens_per_s, speedup=1.0)]
    step = plain.seconds / max(1, plain.tokens)                    # one plain target step
    if model_draft:
        c = plain.tokens_per_s / best["plain draft"].tokens_per_s
        rows.append(_row("plain draft", best["plain draft"].tokens_per_s))
    else:
        c = 0.0                                        # a lookup costs microseconds, not a forward pass
    for k in ks:
        run = best[f"speculative k={k}"]
        same = _check_same(f"k={k}", run.outputs, plain.outputs, exact)
        # the last pass of a prompt may be cut short by max_new_tokens or EOS: a slight underestimate
        alpha = solve_alpha(run.tokens / run.passes, k) if run.passes else 0.0
        speedup = run.tokens_per_s / plain.tokens_per_s
        # v: the run's own verification passes (with their rollback), in plain target steps
        v = (run.verify_seconds / len(run.rounds)) / step if run.rounds else None
        rows.append(_row(f"speculative k={k}", run.tokens_per_s, run.accepted / max(1, run.drafted), alpha, c,
                         speedup, theory(alpha, k, c), v, theory(alpha, k, c, v) if v else None, same,
                         alpha_by_position(run.rounds)))
        if k in anchors:
            rows[-1]["vs_llama_cpp"] = run.tokens_per_s / anchors[k].tokens_per_s
    for k, a in sorted(anchors.items()):
        same = "" if all(n == len(p) for n, p in zip(a.prompt_tokens, prompts)) else ", other prompt tokens"
        rows.append(_row(f"llama.cpp's llama-speculative-simple k={k}{same}", a.tokens_per_s,
                         a.accepted / max(1, a.drafted), speedup=a.tokens_per_s / plain.tokens_per_s))
    for p in (0.0, *p_mins):
        for word, label in (("adaptive", "from 4; mean {:.1f}"), ("auto", "mean {:.1f} per target pass")):
            name = _policy_name(word, p)
            run = best[name]
            same = _check_same(name, run.outputs, plain.outputs, exact)
            rows.append(_row(f"{name} ({label.format(run.drafted / max(1, run.passes))})", run.tokens_per_s,
                             run.accepted / run.drafted if run.drafted else None, c=c,
                             speedup=run.tokens_per_s / plain.tokens_per_s, same=same,
                             by_position=alpha_by_position(run.rounds)))
    return rows


def _transformers_rows(best: dict, ours: list[dict], names: list[str], ks) -> list[dict]:
    """transformers' rows (names: plain generate first, then its assisted configurations), their
    speedups over transformers' plain generate; "vs transformers" on our plain and fixed-k rows
    (ours over transformers' at the same k), and a last row: our fastest PyTorch-target
    configuration over transformers' fastest assisted one. "same output" counts the prompts whose
    output equals our plain greedy decoding's and, for assisted rows, transformers' plain one's:
    counted, not raised (other kernels may take the other token at a near-tie)."""
    from .speculative_transformers import PLAIN

    plain, mine = best[PLAIN], best["plain target"].outputs
    by_name = {r["config"]: r for r in ours}
    by_name["plain target"]["vs_transformers"] = by_name["plain target"]["tokens_per_s"] / plain.tokens_per_s
    for k in ks:
        by_name[f"speculative k={k}"]["vs_transformers"] = (by_name[f"speculative k={k}"]["tokens_per_s"]
                                                            / best[f"transformers assisted k={k} (constant)"].tokens_per_s)
    n = len(mine)
    rows = [_row(PLAIN, plain.tokens_per_s, speedup=1.0, same=f"{sum(a == b for a, b in zip(plain.outputs, mine))}/{n}")]
    for name in names[1:]:
        run = best[name]
        same = sum(a == b == c for a, b, c in zip(run.outputs, plain.outputs, mine))
        rows.append(_row(name, run.tokens_per_s, speedup=run.tokens_per_s / plain.tokens_per_s, same=f"{same}/{n}"))
    fastest = max((r for r in ours if r["config"] == "plain target" or r["config"].startswith("speculative")),
                  key=lambda r: r["tokens_per_s"])
    theirs = max(rows[1:], key=lambda r: r["tokens_per_s"])
    rows.append(_row(f"ours, fastest ({fastest['config']}) vs transformers assisted, fastest ({theirs['config']})", None))
    rows[-1]["vs_transformers"] = fastest["tokens_per_s"] / theirs["tokens_per_s"]
    return rows


def _parser() -> argparse.ArgumentParser:
    from tinyllama.cli import add_draft_model_flag
    from tinyllama.inference.draft_policy import p_min_arg

    from .constructed_pair import qtypes

    types = qtypes()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="out/sft")
    add_draft_model_flag(ap, "a draft model, or ngram[:N] for prompt lookup (default: %(default)s)",
                         default="out/draft/sft")
    ap.add_argument("--draft-checkpoint", metavar="DIR",
                    help="the draft as an HF-format checkpoint directory (the same model as a GGUF --model-draft) "
                         "for transformers' assisted generation beside ours, with a checkpoint directory as --target "
                         "(default: --model-draft where it is one; without either, transformers' rows are skipped, "
                         "saying why)")
    ap.add_argument("--pair", choices=["7b", "1b", "tiny"],
                    help="instead of --target/--model-draft: a constructed pair (bench.constructed_pair): 7b = "
                         "tinyllama-1.1b drafting for a llama-2-7b-shaped target, 1b = a ~110M draft for a "
                         "tinyllama-1.1b-shaped target; both GGUFs, alpha constructed; adds llama.cpp's own "
                         "speculative decoding as the anchor; tiny = tiny shapes, --backend torch only")
    ap.add_argument("--backend", choices=["gguf", "torch"], default="gguf",
                    help="--pair's backend: gguf (the cached Q4_0 files, llama.cpp beside ours) or torch (built in "
                         "memory on --device, bf16 on a GPU, timed eager and captured: bench.speculative_torch, "
                         "JSON records) (default: %(default)s)")
    ap.add_argument("--alpha", type=float, nargs="+", default=[0.8],
                    help="--pair's constructed acceptance rate; several: one pair and table each (default 0.8)")
    ap.add_argument("--qtype", default="q4_0", choices=types, metavar="TYPE",
                    help=f"--pair's GGUF type, one of {', '.join(types)} (default q4_0)")
    ap.add_argument("--anchor", action="store_true",
                    help="with two GGUFs: also run llama.cpp's llama-speculative-simple (always with --pair)")
    ap.add_argument("--k", type=int, nargs="+", help="draft lengths (default 1 2 4 6; with --pair 1 2 4)")
    ap.add_argument("--tokens", type=int, help="new tokens per prompt (default 48; with --pair 32)")
    ap.add_argument("--prompts", type=int, help="prompts (default 6; with --pair 4)")
    ap.add_argument("--repeats", type=int, help="interleaved rounds; each row keeps its fastest (default 3; "
                                                 "with --pair 1)")
    ap.add_argument("--prompt-set", choices=["chat", "code", "copy"], default="chat",
                    help="chat: held-out SFT questions; code: held-out code prompts (sft.prompts); copy: code to "
                         "write out again (default: chat)")
    ap.add_argument("--eos", action="store_true",
                    help="stop each reply at the target's end of turn, as a user gets it (default: decode --tokens "
                         "tokens whatever comes)")
    ap.add_argument("--device", default=None, help="where --target/--model-draft run: cpu, cuda or auto (GGUFs: all "
                                                   "layers offloaded unless cpu) (default: cpu; with --backend torch: "
                                                   "auto)")
    ap.add_argument("--draft-p-min", type=p_min_arg, nargs="+", default=[], metavar="P",
                    help="also run adaptive and auto k with each P as --draft-p-min (rounds that stop drafting "
                         "where the draft's top probability falls below P)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, with the defaults that depend on --pair filled in; refuses combinations that
    cannot run."""
    ap = _parser()
    args = ap.parse_args(argv)
    pair = args.pair is not None
    defaults = dict(k=[1, 2, 4], tokens=32, prompts=4, repeats=1) if pair else \
        dict(k=[1, 2, 4, 6], tokens=48, prompts=6, repeats=3)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if pair and not all(0 < a <= 1 for a in args.alpha):
        ap.error(f"--alpha must be in (0, 1], got {' '.join(map(str, args.alpha))}")
    if args.backend == "torch" and not pair:
        ap.error("--backend torch needs --pair")
    if args.pair == "tiny" and args.backend != "torch":
        ap.error("--pair tiny runs with --backend torch only")
    return args


def main(argv: list[str] | None = None) -> int:
    """Prints the tables; a model that cannot be loaded or a draft that cannot draft for the target
    is one line on stderr and exit status 2."""
    from tinyllama.errors import UserError, report

    args = parse_args(argv)
    try:
        return _main(args)
    except UserError as e:
        return report(e)


def _main(args: argparse.Namespace) -> int:
    if args.backend == "torch":
        from tinyllama.devices import resolve_device

        from .speculative_torch import run_torch_pair

        for a in args.alpha:
            run_torch_pair(args.pair, a, args.k, args.tokens, args.prompts, resolve_device(args.device or "auto"))
    elif args.pair:
        print("\n\n".join(run_pair(args.pair, a, args.qtype, args.k, args.tokens, args.prompts, args.repeats, args.json)
                          for a in args.alpha))
    else:
        print(run(args.target, args.model_draft, args.k, args.tokens, args.prompts, args.repeats, args.prompt_set, args.json,
                  anchor=args.anchor, device=args.device or "cpu", eos=args.eos, draft_checkpoint=args.draft_checkpoint,
                  p_mins=args.draft_p_min))
    return 0


def run_pair(pair: str = "7b", alpha: float = 0.8, qtype: str = "q4_0", ks=(1, 2, 4), tokens: int = 32,
             n_prompts: int = 4, repeats: int = 1, as_json: bool = False) -> str:
    """run() on a constructed pair (bench.constructed_pair, built once and cached), with
    llama.cpp's own speculative decoding beside ours."""
    from .constructed_pair import constructed_pair

    draft, target, info = constructed_pair(pair, alpha, qtype, say=lambda m: print(m, file=sys.stderr))
    note = (f"; a {info['target']}-shaped target built to compute the {info['draft']} draft, with lm_head noise "
            f"for a CONSTRUCTED alpha of {alpha} ({info['calibrated_agreement']:.2f} on its calibration positions, "
            f"{info['agreement_without_noise']:.2f} without noise), both {qtype.upper()}")
    return run(str(target), str(draft), ks, tokens, n_prompts, repeats, "chat", as_json, anchor=True, note=note)


if __name__ == "__main__":
    raise SystemExit(main())
