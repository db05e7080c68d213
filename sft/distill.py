"""python -m sft.distill: chat data answered by a teacher model, to train a draft that agrees with it.

    python -m sft.distill --teacher out/sft --data sample --out out/draft/distill.jsonl
    python -m sft --base out/draft/pretrain/final --data out/draft/distill.jsonl --out out/draft/sft \
        --method full --lr 1e-3                   # as `make draft`: LoRA would freeze a 4M draft's embeddings

Speculative decoding is as fast as the draft is often right about the target's next token
(acceptance rate alpha). A draft fine-tuned on the human answers learns the data; a draft
fine-tuned on the *target's* answers to the same questions learns the target (sequence-level
knowledge distillation, Kim & Rush 2016; DistillSpec, Zhou et al. 2024, for drafts). Each
conversation keeps its system and user turns; every assistant turn is replaced by the teacher's
greedy reply to the conversation so far (earlier replies are the teacher's too), up to
--max-new-tokens, the same decoding the draft will be judged against at temperature 0.

Only the training split is answered: the held-out share that `python -m sft` would set aside
with the same --eval-fraction and --seed is left out, so evaluation questions (and
bench.speculative's prompts) stay unseen by the draft. The acceptance rate this gives is
measured by bench.speculative.

--code-prompts adds the standard library's code prompts (sft.prompts; the held-out tenth stays
for bench.speculative --prompt-set code); --samples N adds N answers sampled at --temperature per
prompt beside the greedy one (a draft then also learns the target's spread, not one path).

The teacher is a checkpoint directory or a GGUF, or a hub id (org/name, org/name:QUANT), prompted
in its own chat template and stopped at its own end-of-turn ids (kept as the SFT target after
each reply). Answers go to OUT.partial one line at a time, and a stopped run resumes from it; OUT
appears whole at the end: one {"messages": [...], "source", "decoding", "ended"} line per answer
(a format `python -m sft --data` reads; source names the prompt, ended is False where a reply was
cut at --max-new-tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tinyllama.cli import DTYPE_NAMES, MODEL_HELP, ModelArgs, add_model_args
from tinyllama.errors import UserError
from tinyllama.runtime import INFERENCE, RuntimeOptions

from tinyllama.inference.generate import SamplingParams

from .data import Conversation, load_conversations, split_eval

PARTIAL = ".partial"       # answers so far, one line each: a stopped run resumes from them


@dataclass(frozen=True)
class Job:
    """One prompt answered once: `source` names the prompt in every record ("sample:17", the
    17th conversation of the data; "code:textwrap.dedent", a code prompt), `decoding` how."""
    source: str
    decoding: str               # "greedy" or "sampled:N"
    conv: Conversation


def plan_jobs(data: str, eval_fraction: float, seed: int, limit: int | None, code: bool,
              samples: int) -> tuple[list[Job], int]:
    """The training split's conversations (and the code prompts' distillation set), each greedy and
    `samples` times sampled; and how many conversations were held out."""
    from .prompts import code_prompts

    convs = load_conversations(data)
    index = {id(c): i for i, c in enumerate(convs)}
    train, held = split_eval(convs, eval_fraction, seed)        # fraction 0 or one conversation: all train
    prompts = [(f"{data}:{index[id(c)]}", c) for c in train]
    if code:
        prompts += [(f"code:{p.name}", [{"role": "user", "content": p.text}, {"role": "assistant", "content": ""}])
                    for p in code_prompts()[0]]
    prompts = prompts[:limit]
    decodings = ["greedy", *(f"sampled:{i + 1}" for i in range(samples))]
    return [Job(source, d, conv) for source, conv in prompts for d in decodings], len(held)


def _resumed(partial: Path) -> tuple[set[tuple[str, str]], int, int]:
    """The (source, decoding) pairs a stopped run already answered, with their conversation and
    reply counts; a last line cut short by the stop is dropped."""
    done, replies, good = set(), 0, 0
    if not partial.exists():
        return done, 0, 0
    # split on "\n" alone: a reply may hold U+2028 and other characters str.splitlines() breaks at
    for line in partial.read_bytes().split(b"\n")[:-1]:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            break
        done.add((record["source"], record["decoding"]))
        replies += sum(m["role"] == "assistant" for m in record["messages"])
        good += len(line) + 1
    with open(partial, "r+b") as f:
        f.truncate(good)
    return done, len(done), replies


def teacher_reply(backend, tok, messages: Sequence[dict], max_new_tokens: int, template: str | None = None,
                  sampling: SamplingParams | None = None, ended: list | None = None) -> str:
    """The teacher's reply to `messages` (ending with a user turn) in `template` (default: the
    teacher's own), greedy unless `sampling` says otherwise, its end-of-turn id excluded. `ended`
    gets True appended where the teacher ended its turn (not cut at max_new_tokens)."""
    from tinyllama.formats.chat import apply_chat_template
    from tinyllama.inference.generate import generate

    ids = apply_chat_template(tok, messages, add_generation_prompt=True, template=template)
    budget = min(max_new_tokens, backend.context_length - len(ids))
    if budget < 1:
        return ""
    backend.reset()
    stops = list(tok.stop_ids)
    gen = generate(backend, ids, sampling or SamplingParams(), max_new_tokens=budget, stop_ids=stops)
    reply = [t for t in gen if t not in stops]
    if ended is not None:
        ended.append(gen.stats.stop_reason == "stop_id")
    return tok.decode(reply)


def distill_conversation(backend, tok, conv: Conversation, max_new_tokens: int,
                         template: str | None = None, sampling: SamplingParams | None = None,
                         ended: list | None = None) -> Conversation:
    """`conv` with every assistant turn answered by the teacher. An empty reply (the teacher
    ends at once, or the context is full) ends the conversation before the turn it answers;
    the result may then have no assistant turn at all (empty list)."""
    out: Conversation = []
    for message in conv:
        if message["role"] != "assistant":
            out.append(dict(message))
            continue
        reply = teacher_reply(backend, tok, out, max_new_tokens, template, sampling, ended)
        if not reply.strip():
            while out and out[-1]["role"] != "assistant":
                out.pop()                     # the unanswered user turn (and a lone system turn)
            break
        out.append({"role": "assistant", "content": reply})
    return out if any(m["role"] == "assistant" for m in out) else []


def distill(teacher: str | Path, data: str, out: str | Path, max_new_tokens: int = 96, eval_fraction: float = 0.05,
            seed: int = 42, limit: int | None = None, progress: bool = True, dtype: str = "stored",
            revision: str | None = None, chat_template: str | None = None, device: str = "auto",
            n_ctx: int = 2048, n_gpu_layers: int | None = None, runtime: RuntimeOptions = RuntimeOptions(),
            code: bool = False, samples: int = 0, temperature: float = 0.8) -> dict:
    """Writes the teacher-answered training split of `data` (and with `code`, the code prompts'
    distillation set) to `out` (JSONL), each prompt greedy and `samples` times sampled at
    `temperature`; returns counts. Answers go to OUT.partial as they come and a stopped run
    resumes from it; OUT appears whole at the end. The teacher loads as load_backend loads it
    (n_ctx, n_gpu_layers: a GGUF's; runtime: a checkpoint's kernels, packing and CUDA graphs)."""
    from tinyllama.inference.backends import load_backend

    for flag, value, ok, rule in (("--max-new-tokens", max_new_tokens, max_new_tokens >= 1, "must be >= 1"),
                                  ("--eval-fraction", eval_fraction, 0 <= eval_fraction < 1, "must be in [0, 1)"),
                                  ("--limit", limit, limit is None or limit >= 1, "must be >= 1"),
                                  ("--samples", samples, samples >= 0, "must be >= 0"),
                                  ("--temperature", temperature, temperature > 0, "must be > 0")):
        if not ok:
            raise UserError(f"{flag} {rule}, got {value}")
    from tinyllama.paths import check_output_parent

    check_output_parent(out, "--out")                 # before the teacher loads, not after
    jobs, held = plan_jobs(data, eval_fraction, seed, limit, code, samples)
    # the stored dtype by default: the draft learns to agree with the target as it is served (its
    # GGUF is made from these weights); a bf16 teacher's greedy answers drift from the float32
    # model's (a draft distilled from one agreed on 0.42 of tokens instead of ~0.8)
    backend, tok = load_backend(teacher, dtype=None if dtype in (None, "stored") else dtype, revision=revision,
                                flag="--teacher", device=device, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, runtime=runtime)
    print(f"teacher: {backend.name}: {backend.precision}; {runtime.describe(INFERENCE)}", flush=True)
    try:
        counts = _answer_all(backend, tok, jobs, Path(out), max_new_tokens, chat_template, temperature, progress)
    finally:
        backend.close()
    if not counts["conversations"]:
        Path(str(out) + PARTIAL).unlink(missing_ok=True)
        raise UserError(f"{teacher}: the teacher answered none of the {len(jobs)} prompts "
                        "(every first reply was empty); nothing to train a draft on")
    os.replace(str(out) + PARTIAL, out)               # whole, or not at all
    return {**counts, "held_out": held, "out": str(out)}


def _answer_all(backend, tok, jobs: list[Job], out: Path, max_new_tokens: int, chat_template: str | None,
                temperature: float, progress: bool) -> dict:
    """Every job not yet in OUT.partial answered and appended to it, one line as each ends."""
    from tqdm import tqdm

    from tinyllama.formats.chat import template_of

    template, origin = template_of(tok, chat_template, backend.name)
    print(f"teacher's chat template: {origin}", flush=True)
    partial = Path(str(out) + PARTIAL)
    done, written, replies = _resumed(partial)
    if done:
        print(f"resuming: {len(done)} answers already in {partial}", flush=True)
    cut = 0
    with open(partial, "a", encoding="utf-8") as f:
        for job in tqdm([j for j in jobs if (j.source, j.decoding) not in done], desc="teacher replies",
                        unit="prompt", disable=not progress):
            # a sampled answer's seed is a function of the job alone: a resumed run answers alike
            sampling = None if job.decoding == "greedy" else SamplingParams(
                temperature=temperature, seed=zlib.crc32(f"{job.source}|{job.decoding}".encode()))
            ended: list[bool] = []
            answered = distill_conversation(backend, tok, job.conv, max_new_tokens, template, sampling, ended)
            cut += ended.count(False)
            if answered:
                replies += sum(m["role"] == "assistant" for m in answered)
                written += 1
                f.write(json.dumps({"messages": answered, "source": job.source, "decoding": job.decoding,
                                    "ended": all(ended)}, ensure_ascii=False) + "\n")
                f.flush()
    return {"conversations": written, "dropped": len(jobs) - written, "teacher_replies": replies,
            "cut_at_max_new_tokens": cut}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sft.distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, flag="--teacher", help="the target model: " + MODEL_HELP, dtypes=("stored", *DTYPE_NAMES),
                   dtype_default="stored")
    p.add_argument("--data", default="sample", help="conversations to answer, as `python -m sft --data` "
                                                    "(default: %(default)s)")
    p.add_argument("--out", required=True, help="JSONL to write (atomically)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="per teacher reply (default: %(default)s)")
    p.add_argument("--eval-fraction", type=float, default=0.05,
                   help="held-out share left unanswered, as python -m sft splits it (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="the split's seed, as python -m sft's (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="answer only the first N prompts")
    p.add_argument("--code-prompts", dest="code", action="store_true",
                   help="also answer the standard library's code prompts (sft.prompts: their distillation set; the "
                        "held-out ones stay for bench.speculative)")
    p.add_argument("--samples", type=int, default=0,
                   help="sampled answers per prompt besides the greedy one (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="the sampled answers' temperature (default: %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tinyllama.errors import UserError, report

    try:
        teacher = ModelArgs.from_namespace(args)       # --dtype stored: None, the weights' own dtype
        counts = distill(teacher.model, args.data, args.out, args.max_new_tokens, args.eval_fraction, args.seed,
                         args.limit, args.progress, teacher.dtype, teacher.revision, teacher.chat_template,
                         teacher.device, teacher.ctx_size, teacher.n_gpu_layers, teacher.runtime, args.code,
                         args.samples, args.temperature)
    except UserError as e:
        return report(e)
    print(f"wrote {counts['out']}: {counts['conversations']} conversations, {counts['teacher_replies']} teacher "
          f"replies ({counts['cut_at_max_new_tokens']} cut at --max-new-tokens; {counts['held_out']} conversations "
          f"held out and not answered; {counts['dropped']} dropped: the teacher's first reply was empty)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
