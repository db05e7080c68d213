"""Drafters for speculative decoding: what proposes the tokens that a round's one target pass
verifies. Two kinds: a small model with the target's vocabulary (either backend), and prompt
lookup (tinyllama.inference.lookup.NgramDrafter), which needs no model.

    drafter = open_drafter("out/draft/sft")          # a model reference (tinyllama.inference.backends)
    drafter = open_drafter("ngram:2")                # prompt lookup
    drafter = ModelDrafter(backend)                  # a Backend already loaded (a batching slot)
    generate(target, ids, drafter=drafter, draft_policy=Fixed(4))

A proposal comes with the distributions q its tokens were drawn from, the q of the acceptance
test min(1, p(x) / q(x)) (Leviathan et al. 2023); None when every token is a point mass
(greedy decoding, prompt lookup), which the generator verifies as q = onehot(x).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch

from tinyllama.errors import UserError
from tinyllama.inference.interface import Backend, common_prefix

# the generator's sampler: logits (vocab,) after a context -> a token and the q (vocab,) it was
# drawn from, None for a point mass (greedy)
Sample = Callable[[torch.Tensor, Sequence[int]], "tuple[int, torch.Tensor | None]"]


@runtime_checkable
class Drafter(Protocol):
    name: str
    path: Path | None                    # the model's files, None for prompt lookup (what stages print)
    precision: str
    context_length: float                # the longest context it drafts from

    def check(self, target: Backend) -> None:
        """Raises UserError unless it can draft for `target` (a model: the same vocabulary, special
        ids and chat template: check_pair)."""

    def prefill(self, context: Sequence[int]) -> None:
        """Reads the prompt before the first round (a model fills its KV cache)."""

    def draft(self, context: Sequence[int], k: int, sample: Sample, p_min: float = 0.0
              ) -> tuple[list[int], list[torch.Tensor] | None]:
        """Up to k tokens to follow `context` (maybe none), with their q (vocab,) each or None;
        none from the first position where the drafter's top probability is below p_min (where
        it has probabilities: drafters.confidence)."""

    def trim(self, n: int) -> None:
        """Keeps only the first n context tokens cached (after rejected drafts)."""

    def close(self) -> None:
        """Frees what it holds (a model's weights and KV cache)."""


class ModelDrafter:
    """A draft model behind a Backend: k tokens one at a time, each picked as the target would pick it."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._checked: Backend | None = None

    name = property(lambda self: self.backend.name)
    path = property(lambda self: self.backend.path)
    precision = property(lambda self: self.backend.precision)
    context_length = property(lambda self: self.backend.context_length)

    def check(self, target: Backend) -> None:
        if target is not self._checked:           # once per target: the generator checks on every call
            check_pair(target, self.backend)
            self._checked = target

    def prefill(self, context: Sequence[int]) -> None:
        self.backend.logits(context, 1)

    def draft(self, context: Sequence[int], k: int, sample: Sample, p_min: float = 0.0
              ) -> tuple[list[int], list[torch.Tensor] | None]:
        drafts: list[int] = []
        qs: list[torch.Tensor | None] = []
        for _ in range(k):
            ahead = [*context, *drafts]
            logits = self.backend.logits(ahead, 1)[0]                             # (vocab,)
            token, q = sample(logits, ahead)
            if p_min and confidence(logits, q) < p_min:
                break                       # the draft is unsure: the target decides from here
            drafts.append(token)
            qs.append(q)
        return drafts, None if any(q is None for q in qs) else qs

    def trim(self, n: int) -> None:
        self.backend.trim(n)

    def reset(self) -> None:
        self.backend.reset()

    def close(self) -> None:
        self.backend.close()


def confidence(logits: torch.Tensor, q: torch.Tensor | None) -> float:
    """How sure the draft is at one position: the top probability of the q (vocab,) it samples
    from, else (greedy) of the softmax of its raw logits (vocab,), as llama.cpp's p-min reads it.
    Not the probability of the token it drew: a stop that depended on the draw would bias which
    drafts reach the target, and sampling would no longer follow the target's distribution."""
    return float((q if q is not None else torch.softmax(logits.float(), -1)).max())


def check_pair(target: Backend, draft: Backend) -> None:
    """Raises UserError, in one line naming both models' files and the difference, unless `draft`
    can draft for `target`: the same vocabulary id for id; the same BOS (where either starts its
    texts with one), EOS and end-of-turn ids; and where both carry a chat template, the same ids
    for a sample conversation. A draft with no template of its own is fine: the target's renders
    every prompt. Tokenizer checks are skipped where a backend does not know its tokenizer (a
    bare model, a batching slot: a pair checked when it was loaded)."""
    check_same_vocabulary(target, draft)
    check_same_special_ids(target, draft)
    check_same_template(target, draft)


def check_same_vocabulary(target: Backend, draft: Backend) -> None:
    """A draft must share the target's vocabulary, id for id (as llama.cpp requires)."""
    t, d = where(target), where(draft)
    if target.vocab_size != draft.vocab_size:
        raise UserError(f"draft {d} has {draft.vocab_size} tokens but target {t} has "
                        f"{target.vocab_size}: speculative decoding needs the same vocabulary")
    a, b = target.vocab_fingerprint(), draft.vocab_fingerprint()
    if a is not None and b is not None and a != b:
        tp, dp = target.vocab_pieces(), draft.vocab_pieces()
        first = None if tp is None or dp is None else _first_difference(tp, dp)
        at = "" if first is None else (f": token {first} is {_piece(dp, first)} in the draft, "
                                       f"{_piece(tp, first)} in the target")
        raise UserError(f"draft {d} and target {t} have different vocabularies (same size, different "
                        f"tokens){at}; speculative decoding needs the same tokenizer")


def check_same_special_ids(target: Backend, draft: Backend) -> None:
    """BOS (where either model starts its texts with one), EOS, and the end-of-turn ids both
    name (the stop ids besides EOS): a draft whose turns end on another token drafts past the
    target's end of turn."""
    tt, dt = getattr(target, "tokenizer", None), getattr(draft, "tokenizer", None)
    if tt is None or dt is None:
        return
    specials = [("EOS", tt.eos_id, dt.eos_id)]
    if tt.add_bos or dt.add_bos:
        specials.insert(0, ("BOS", tt.bos_id, dt.bos_id))
    for what, a, b in specials:
        if a != b:
            raise UserError(f"draft {where(draft)} has {what} id {b} ({dt.id_to_piece(b)!r}) but target "
                            f"{where(target)} has {what} id {a} ({tt.id_to_piece(a)!r}): speculative decoding "
                            "needs the same special tokens")
    t_end, d_end = tt.stop_ids[1:], dt.stop_ids[1:]
    if t_end and d_end and set(t_end) != set(d_end):
        raise UserError(f"draft {where(draft)} ends a turn on {_ids(dt, d_end)} but target {where(target)} on "
                        f"{_ids(tt, t_end)}: speculative decoding needs the same end-of-turn tokens")


# a conversation both templates render when both models carry one: a system turn is left out,
# since some templates refuse one
SAMPLE_CHAT = ({"role": "user", "content": "What does len() do?"},
               {"role": "assistant", "content": "It counts the items."},
               {"role": "user", "content": "And sum()?"})


def check_same_template(target: Backend, draft: Backend) -> None:
    """Where both models carry a chat template, they must render SAMPLE_CHAT (with the generation
    prompt) to the same ids: a draft trained on another layout drafts the wrong turn markers. A
    template that cannot render the sample is left to the chat that uses it."""
    from tinyllama.formats.chat import ChatFormatError, apply_chat_template, template_family

    tt, dt = getattr(target, "tokenizer", None), getattr(draft, "tokenizer", None)
    if tt is None or dt is None or not tt.chat_template or not dt.chat_template \
            or tt.chat_template == dt.chat_template:
        return
    try:
        a = apply_chat_template(tt, list(SAMPLE_CHAT), template=tt.chat_template)
        b = apply_chat_template(dt, list(SAMPLE_CHAT), template=dt.chat_template)
    except ChatFormatError:
        return
    if a == b:
        return
    i = _first_difference(a, b)
    raise UserError(f"draft {where(draft)} ({template_family(dt.chat_template)} template) and target "
                    f"{where(target)} ({template_family(tt.chat_template)} template) render a chat differently: "
                    f"token {i} of a sample conversation is {_at(dt, b, i)} in the draft, {_at(tt, a, i)} in the "
                    "target; a draft with no chat template of its own uses the target's")


def where(backend: Backend) -> str:
    """A backend as a message names it: the file or folder it was loaded from, else its name."""
    return str(backend.path) if getattr(backend, "path", None) is not None else backend.name


def _first_difference(a: Sequence, b: Sequence) -> int | None:
    """The first index where two sequences differ (the shorter one's length where one is a
    prefix of the other); None where they are equal."""
    i = common_prefix(a, b)
    return None if i == len(a) == len(b) else i


def _piece(pieces: list[str], i: int) -> str:
    return repr(pieces[i]) if i < len(pieces) else "absent"


def _ids(tok, ids: Sequence[int]) -> str:
    return ", ".join(f"{i} ({tok.id_to_piece(i)!r})" for i in ids)


def _at(tok, ids: Sequence[int], i: int) -> str:
    return f"{ids[i]} ({tok.id_to_piece(ids[i])!r})" if i < len(ids) else "the end"
