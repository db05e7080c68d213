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

The teacher is a checkpoint directory or a GGUF, or a hub id (org/name, org/name:QUANT), prompted
in its own chat template and stopped at its own end-of-turn ids; the output is written to a temporary name and
renamed, one {"messages": [...]} line per conversation (a format `python -m sft --data` reads).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from tinyllama.cli import DTYPE_NAMES, MODEL_HELP, ModelArgs, add_model_args
from tinyllama.errors import UserError
from tinyllama.runtime import INFERENCE, RuntimeOptions

from .data import Conversation, load_conversations, split_eval


def teacher_reply(backend, tok, messages: Sequence[dict], max_new_tokens: int, template: str | None = None) -> str:
    """The teacher's greedy reply to `messages` (ending with a user turn) in `template` (default:
    the teacher's own), its end-of-turn id excluded."""
    from tinyllama.formats.chat import apply_chat_template
    from tinyllama.inference.generate import generate

    ids = apply_chat_template(tok, messages, add_generation_prompt=True, template=template)
    budget = min(max_new_tokens, backend.context_length - len(ids))
    if budget < 1:
        return ""
    backend.reset()
    stops = list(tok.stop_ids)
    reply = [t for t in generate(backend, ids, max_new_tokens=budget, stop_ids=stops) if t not in stops]
    return tok.decode(reply)


def distill_conversation(backend, tok, conv: Conversation, max_new_tokens: int,
                         template: str | None = None) -> Conversation:
    """`conv` with every assistant turn answered by the teacher. An empty reply (the teacher
    ends at once, or the context is full) ends the conversation before the turn it answers;
    the result may then have no assistant turn at all (empty list)."""
    out: Conversation = []
    for message in conv:
        if message["role"] != "assistant":
            out.append(dict(message))
            continue
        reply = teacher_reply(backend, tok, out, max_new_tokens, template)
        if not reply.strip():
            while out and out[-1]["role"] != "assistant":
                out.pop()                     # the unanswered user turn (and a lone system turn)
            break
        out.append({"role": "assistant", "content": reply})
    return out if any(m["role"] == "assistant" for m in out) else []


def distill(teacher: str | Path, data: str, out: str | Path, max_new_tokens: int = 96, eval_fraction: float = 0.05,
            seed: int = 42, limit: int | None = None, progress: bool = True, dtype: str = "stored",
            revision: str | None = None, chat_template: str | None = None, device: str = "auto",
            n_ctx: int = 2048, n_gpu_layers: int | None = None, runtime: RuntimeOptions = RuntimeOptions()) -> dict:
    """Writes the teacher-answered training split of `data` to `out` (JSONL); returns counts.
    The teacher loads as tinyllama.inference.backends.load_backend loads it (n_ctx, n_gpu_layers:
    a GGUF's; runtime: a checkpoint's kernels, packing and CUDA graphs)."""
    from tqdm import tqdm

    from tinyllama.atomic import atomic_file
    from tinyllama.inference.backends import load_backend
    from tinyllama.formats.chat import template_of

    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not 0 <= eval_fraction < 1:
        raise UserError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    convs = load_conversations(data)
    train, held = split_eval(convs, eval_fraction, seed)        # fraction 0 or one conversation: all train
    if limit is not None:
        train = train[:limit]
    # the stored dtype by default: the draft learns to agree with the target as it is served (its
    # GGUF is made from these weights); a bf16 teacher's greedy answers drift from the float32
    # model's (a draft distilled from one agreed on 0.42 of tokens instead of ~0.8)
    backend, tok = load_backend(teacher, dtype=None if dtype in (None, "stored") else dtype, revision=revision,
                                flag="--teacher", device=device, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, runtime=runtime)
    print(f"teacher: {backend.name}: {backend.precision}; {runtime.describe(INFERENCE)}", flush=True)
    replies = written = 0
    try:
        template, origin = template_of(tok, chat_template, backend.name)
        print(f"teacher's chat template: {origin}", flush=True)
        with atomic_file(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for conv in tqdm(train, desc="teacher replies", unit="conv", disable=not progress):
                answered = distill_conversation(backend, tok, conv, max_new_tokens, template)
                if not answered:
                    continue
                replies += sum(m["role"] == "assistant" for m in answered)
                written += 1
                f.write(json.dumps({"messages": answered}, ensure_ascii=False) + "\n")
            if not written:
                raise UserError(f"{teacher}: the teacher answered none of the {len(train)} conversations "
                                 "(every first reply was empty); nothing to train a draft on")
    finally:
        backend.close()
    return {"conversations": written, "dropped": len(train) - written, "held_out": len(held),
            "teacher_replies": replies, "out": str(out)}


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
    p.add_argument("--limit", type=int, default=None, help="answer only the first N training conversations")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tinyllama.errors import UserError, report

    try:
        teacher = ModelArgs.from_namespace(args)       # --dtype stored: None, the weights' own dtype
        counts = distill(teacher.model, args.data, args.out, args.max_new_tokens, args.eval_fraction, args.seed,
                         args.limit, args.progress, teacher.dtype, teacher.revision, teacher.chat_template,
                         teacher.device, teacher.ctx_size, teacher.n_gpu_layers, teacher.runtime)
    except UserError as e:
        return report(e)
    print(f"wrote {counts['out']}: {counts['conversations']} conversations, {counts['teacher_replies']} teacher "
          f"replies ({counts['held_out']} held out and not answered; {counts['dropped']} dropped: the teacher's "
          "first reply was empty)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
