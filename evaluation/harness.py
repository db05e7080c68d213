"""lm-eval-harness tasks on any model the core can run (a checkpoint directory or a GGUF).

    results = run_tasks(backend, tok, ["hellaswag", "piqa"])          # {task: {metric: value}}
    local_task_dir(Path("tasks"))                                    # the shipped offline tasks
    run_tasks(backend, tok, [LOCAL_GEN_TASK], include, apply_chat_template=True)   # prompts as chats

A backend becomes an lm-eval `LM` (lm_class): each request's continuation is scored from one
forward pass, the KV cache of a question's shared context reused across its choices, and
generation is greedy. With apply_chat_template, lm-eval's prompts are conversations rendered in
the model's own chat template and tokenized as the server tokenizes a chat request. PUBLISHED
holds TinyLlama's own figures for its seven tasks; the local tasks (python_builtins_mc, multiple
choice, and python_builtins_gen, generation) are built from the SFT sample for offline runs.
`python -m evaluation` is the command line over this.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from tinyllama.inference.backends import Backend
from tinyllama.errors import UserError
from tinyllama.formats.tokenizer import Tokenizer

# TinyLlama 1.1B, 3T tokens (arXiv 2401.02385, Table 2), and the lm-eval metric it reports.
PUBLISHED = {
    "hellaswag": (59.20, "acc_norm"), "openbookqa": (36.00, "acc_norm"), "winogrande": (59.12, "acc"),
    "arc_challenge": (30.12, "acc_norm"), "arc_easy": (55.25, "acc_norm"), "boolq": (57.83, "acc"),
    "piqa": (73.29, "acc_norm"),
}
TINYLLAMA_TASKS = list(PUBLISHED)
LOCAL_TASK = "python_builtins_mc"
LOCAL_GEN_TASK = "python_builtins_gen"
LOCAL_TASKS = (LOCAL_TASK, LOCAL_GEN_TASK)
# the metric a report shows (in %) for a task, where it is not accuracy (chrF, 0-100, is in --out)
REPORTED = {LOCAL_GEN_TASK: "exact_match"}
# accuracy of guessing, in %: 1 / choices (BoolQ, PIQA and WinoGrande have two)
CHANCE = {"hellaswag": 25.0, "openbookqa": 25.0, "winogrande": 50.0, "arc_challenge": 25.0, "arc_easy": 25.0,
          "boolq": 50.0, "piqa": 50.0, LOCAL_TASK: 25.0}


class EvalError(UserError):
    """A request the evaluator cannot run (unknown task, missing model); the message says which."""


class ChatPrompts:
    """lm-eval's chat hooks for our LM: with apply_chat_template, a prompt is the conversation
    rendered as text in the model's own template, and `_encode` turns the special-token strings
    the template wrote (BOS, turn ends) back into their ids: the ids the server gives the same chat."""

    tok: Tokenizer
    backend: Backend
    chat: bool = False

    @property
    def template(self) -> str:
        from tinyllama.formats.chat import template_of

        return template_of(self.tok, None, self.backend.name)[0]

    @property
    def tokenizer_name(self) -> str:                    # what lm-eval's request cache is keyed by
        return f"{self.backend.name}-{self.tok.fingerprint[:12]}"

    def chat_template(self, chat_template: bool | str = False) -> str:
        return self.template

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        from tinyllama.formats.chat import render_chat_text

        return render_chat_text(self.tok, chat_history, add_generation_prompt, self.template)

    def _encode(self, text: str) -> list[int]:
        if self.chat:
            from tinyllama.formats.chat import encode_rendered

            return encode_rendered(self.tok, text)
        return self.tok.encode(text)


def lm_class():
    from lm_eval.api.model import LM

    class TinyLlamaLM(ChatPrompts, LM):
        """Our backends as an lm-eval model (batch 1; context KV reuse across choices)."""

        def __init__(self, backend: Backend, tokenizer: Tokenizer, max_gen_toks: int = 128, chat: bool = False) -> None:
            """chat: prompts come from apply_chat_template (ChatPrompts)."""
            super().__init__()
            self.backend, self.tok, self.max_gen_toks, self.chat = backend, tokenizer, max_gen_toks, chat

        def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            # as lm-eval's HF model: trailing spaces of the context belong to the continuation,
            # and the continuation's ids are what the whole string adds after the context's
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:
                context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
            ctx = self._encode(context) if context else [self.tok.bos_id]      # BOS as the model adds it
            whole = self._encode(context + continuation)
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
                ids = self.tok.encode(r.args[0], bos=True)     # BOS as the prefix token, as lm-eval's own
                total, pos = 0.0, 1
                while pos < len(ids):                       # disjoint windows, each with its own context
                    end = min(pos + window - 1, len(ids))
                    start = max(0, end - window)
                    total += self.score(ids[start:pos], ids[pos:end])[0] if pos > start else 0.0
                    pos = end
                out.append(total)
            return out

        def generate_until(self, requests) -> list[str]:
            from tinyllama.inference.generate import TextStream, generate

            out = []
            for r in requests:
                context, kwargs = r.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                ids = self._encode(context)[-(self.backend.context_length - 1):]
                room = self.backend.context_length - len(ids)
                n = min(int(kwargs.get("max_gen_toks", self.max_gen_toks)), room)
                gen = generate(self.backend, ids, max_new_tokens=max(1, n), stop_ids=list(self.tok.stop_ids))
                out.append("".join(TextStream(gen, self.tok, stop=until)))
            return out

    return TinyLlamaLM


# ---- the shipped local task ------------------------------------------------------------------

def local_task_dir(out: Path, n_questions: int = 120) -> Path:
    """Writes the local tasks (YAML + JSONL, absolute paths) into `out`, over held-out questions
    of the SFT sample, deterministically: `python_builtins_mc`, pick the right first sentence of
    the answer among 4 (the other three are answers to other questions), and
    `python_builtins_gen`, write that sentence (for chat models: run it with the chat template)."""
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
    generate = [{"question": convs[i][0]["content"], "answer": firsts[i]} for i in order[:n_questions]]
    out.mkdir(parents=True, exist_ok=True)
    for name, records, yaml in ((LOCAL_TASK, rows, task_yaml), (LOCAL_GEN_TASK, generate, generation_task_yaml)):
        data = out / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        (out / f"{name}.yaml").write_text(yaml(name, data))
    return out


def task_yaml(name: str, jsonl: Path) -> str:
    """An lm-eval multiple-choice task over a local JSONL of {query, choices, label}."""
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {jsonl.resolve()}\n"
            "output_type: multiple_choice\ntest_split: test\ndoc_to_text: \"{{query}}\"\n"
            "doc_to_target: \"{{label}}\"\ndoc_to_choice: \"{{choices}}\"\nmetric_list:\n"
            "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n")


def generation_task_yaml(name: str, jsonl: Path) -> str:
    """An lm-eval generation task over a local JSONL of {question, answer}: greedy up to a
    newline (at most 32 tokens), scored by exact match and chrF (character n-grams: a graded
    score where exact matches are rare)."""
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {jsonl.resolve()}\n"
            "output_type: generate_until\ntest_split: test\ndoc_to_text: \"{{question}}\"\n"
            "doc_to_target: \"{{answer}}\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 32\n"
            "  do_sample: false\nmetric_list:\n"
            "  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n    ignore_case: true\n"
            "    ignore_punctuation: true\n"
            "  - metric: chrf\n    aggregation: chrf\n    higher_is_better: true\nmetadata:\n  version: 1.0\n")


def run_tasks(backend: Backend, tok: Tokenizer, tasks: Sequence[str], include_path: str | Path | None = None,
              num_fewshot: int | None = None, limit: int | None = None,
              apply_chat_template: bool = False) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} through lm_eval.simple_evaluate, deterministic; apply_chat_template:
    each prompt as a user turn in the model's own chat template (for chat models)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise EvalError(f"unknown task(s): {', '.join(unknown)} (lm-eval knows {len(manager.all_tasks)}; "
                        f"e.g. {', '.join(TINYLLAMA_TASKS)}, {LOCAL_TASK})")
    lm = lm_class()(backend, tok, chat=apply_chat_template)
    res = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                          bootstrap_iters=0, log_samples=False, random_seed=0, numpy_random_seed=0,
                          torch_random_seed=0, fewshot_random_seed=0, apply_chat_template=apply_chat_template)
    out = {}
    for task, metrics in res["results"].items():
        out[task] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and "stderr" not in k and k != "alias"}
    return out
