"""The one chat format, used by SFT, the saved tokenizer_config.json, GGUF metadata, the server
and the demo: TinyLlama-1.1B-Chat-v1.0's (Zephyr) layout, with no added tokens.

    <|system|>\\n{system}</s>\\n<|user|>\\n{user}</s>\\n<|assistant|>\\n{assistant}</s>\\n

    ids, is_target = encode_chat(tok, messages)                 # SFT: train on assistant tokens
    ids, _ = encode_chat(tok, messages, add_generation_prompt=True)   # inference prompt
    text = render_chat(messages, add_generation_prompt=True)    # the same, as text (Jinja)

`<|system|>`, `<|user|>`, `<|assistant|>` are plain text, so the vocabulary stays 32000 (TinyLlama
issues #41/#56). The `</s>` after each turn is the EOS id itself. `encode_chat` builds ids piece
by piece so that a `</s>` typed inside a message stays text; for ordinary messages its ids equal
what llama.cpp (`parse_special=True`) and transformers (`apply_chat_template`) produce from the
rendered template: both encode the text between special tokens as separate pieces, each with
SentencePiece's leading "▁", exactly as `Tokenizer.encode` does per piece.
"""

from __future__ import annotations

from typing import Sequence

from .errors import UserError
from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")

# Jinja, as transformers and llama.cpp read it (tokenizer_config.json / tokenizer.chat_template).
# Turns are joined by "\n"; BOS comes from the template because transformers'
# apply_chat_template adds no special tokens of its own.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('role must be system, user or assistant') }}"
    "{% endif %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n<|assistant|>\\n' }}{% endif %}"
)


class ChatFormatError(UserError):
    """A conversation that cannot be formatted; the message says which turn and why."""


def validate(messages: Sequence[dict], for_training: bool = False) -> None:
    """Roles known, contents non-empty strings, an optional system turn first, then user and
    assistant alternating from a user turn; training examples need an assistant turn."""
    if not messages:
        raise ChatFormatError("empty conversation")
    expected = "user"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatFormatError(f"turn {i}: expected {{'role': ..., 'content': ...}}, got {m!r}"[:200])
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ChatFormatError(f"turn {i}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise ChatFormatError(f"turn {i} ({role}): empty text")
        if role == "system":
            if i != 0:
                raise ChatFormatError(f"turn {i}: a system turn may only come first")
            continue
        if role != expected:
            raise ChatFormatError(f"turn {i}: roles out of order: {role} where {expected} was expected")
        expected = "assistant" if role == "user" else "user"
    if for_training and not any(m["role"] == "assistant" for m in messages):
        raise ChatFormatError("no assistant turn to learn from")


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = False, bos_token: str = "<s>",
                eos_token: str = "</s>") -> str:
    """The conversation as text, through the Jinja template itself."""
    import jinja2

    validate(messages)

    def raise_exception(msg: str):
        raise ChatFormatError(msg)

    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    return env.from_string(CHAT_TEMPLATE).render(messages=list(messages), bos_token=bos_token, eos_token=eos_token,
                                                 add_generation_prompt=add_generation_prompt,
                                                 raise_exception=raise_exception)


def encode_chat(tok: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False,
                for_training: bool = False) -> tuple[list[int], list[bool]]:
    """(ids, is_target): BOS, then per turn the text "<|role|>\\n" + content (after the first turn
    preceded by the "\\n" that follows the previous EOS) and the EOS id. is_target marks the
    assistant contents and their EOS: the only tokens SFT computes loss on.

    The header "...<|assistant|>\\n" ends in a newline, which no multi-character piece of the
    Llama vocabulary contains, so its ids are a prefix of the ids of header + content."""
    validate(messages, for_training=for_training)
    ids, target = [tok.bos_id], [False]
    for i, m in enumerate(messages):
        header = ("\n" if i else "") + f"<|{m['role']}|>\n"
        piece = tok.encode(header + m["content"], bos=False)
        header_ids = tok.encode(header, bos=False)
        n_header = len(header_ids)
        if piece[:n_header] != header_ids:
            raise ChatFormatError(f"turn {i}: the header does not tokenize as a prefix; this tokenizer "
                                  "merges across the newline, which the chat format assumes it cannot")
        learn = m["role"] == "assistant"
        ids += piece + [tok.eos_id]
        target += [False] * n_header + [learn] * (len(piece) - n_header) + [learn]
    if add_generation_prompt:
        tail = tok.encode(("\n" if messages else "") + "<|assistant|>\n", bos=False)
        ids += tail
        target += [False] * len(tail)
    return ids, target
