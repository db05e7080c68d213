"""Log-probabilities in the OpenAI API's two shapes, from the generator's TokenLogprobs.

    texts = TokenTexts(tokenizer, prompt_ids + generated_ids, len(prompt_ids))
    body, end = completion_logprobs(texts, scored, first=1)   # /v1/completions: tokens, token_logprobs,
                                                              # top_logprobs, text_offset; where the text ends
    chat_logprobs(texts, scored, first=len(prompt_ids))   # /v1/chat/completions: {"content": [...]}

A token's text is what it adds to the text decoded before it, so "▁cow" after "a" is " cow" and
the texts of a reply's tokens join to the reply. The prompt and the reply are decoded apart, as
the reply's text is (SentencePiece drops the space that starts a text), so offsets hold in both.
A special token (</s>, <|im_end|>) adds no text: it is shown as its piece and moves no offset.
A token that holds part of a UTF-8 character shows what decoding it alone gives.
"""

from __future__ import annotations

from typing import Sequence

from tinyllama.inference.generate import TokenLogprob

WINDOW = 4           # tokens of context a token's text is decoded in (SentencePiece's space, merges)
FLOOR = -9999.0      # JSON has no -inf; OpenAI-compatible servers report this floor instead


class TokenTexts:
    """The text each token of `ids` adds in its context, and the text an alternative would have added."""

    def __init__(self, tokenizer, ids: Sequence[int], reply_start: int = 0) -> None:
        """reply_start: where the generated tokens start; they are decoded without the prompt."""
        self.tok, self.ids, self.reply_start = tokenizer, list(ids), reply_start
        self._heads: dict[int, str] = {}

    def added(self, position: int, token: int | None = None) -> str:
        """The text `token` (default: the one there) adds at `position`; "" for a special token."""
        floor = self.reply_start if position >= self.reply_start else 0
        before = self.ids[max(floor, position - WINDOW):position]
        if position not in self._heads:
            self._heads[position] = self.tok.decode(before)
        head = self._heads[position]
        token = self.ids[position] if token is None else token
        full = self.tok.decode(before + [token])
        return full[len(head):] if full.startswith(head) else self.tok.decode([token])

    def shown(self, position: int, token: int | None = None) -> str:
        """The token as a client sees it: its text, or its piece for a special token."""
        token = self.ids[position] if token is None else token
        return self.added(position, token) or (self.tok.id_to_piece(token) or "")


def _lp(x: float) -> float:
    return max(x, FLOOR)


def completion_logprobs(texts: TokenTexts, scored: Sequence[TokenLogprob | None], first: int,
                        offset: int = 0) -> tuple[dict, int]:
    """The legacy shape for the tokens at positions first, first+1, ...: `scored[i]` None for a
    token with nothing before it (echo's first), `offset` where the first token's text starts;
    and the offset after the last. top_logprobs maps the likeliest tokens' texts, and the
    token's own (as OpenAI's legacy API does), to their logprobs."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for i, s in enumerate(scored):
        position = first + i
        out["tokens"].append(texts.shown(position))
        out["text_offset"].append(offset)
        offset += len(texts.added(position))
        if s is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        top: dict[str, float] = {}
        for t, v in (*s.top, (s.token, s.logprob)):       # likeliest first: a text shared keeps its best
            top.setdefault(texts.shown(position, t), _lp(v))
        out["token_logprobs"].append(_lp(s.logprob))
        out["top_logprobs"].append(top)
    return out, offset


def chat_logprobs(texts: TokenTexts, scored: Sequence[TokenLogprob], first: int) -> dict:
    """The chat shape for the tokens at positions first, first+1, ...: each with its bytes and
    its `top` alternatives."""
    def entry(position: int, token: int, logprob: float) -> dict:
        text = texts.shown(position, token)
        return {"token": text, "logprob": _lp(logprob), "bytes": list(text.encode("utf-8"))}

    content = [entry(first + i, s.token, s.logprob) | {
        "top_logprobs": [entry(first + i, t, v) for t, v in s.top]} for i, s in enumerate(scored)]
    return {"content": content, "refusal": None}
