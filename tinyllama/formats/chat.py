"""Chat formats. Every model chats in its own template (`apply_chat_template`); the one this
project trains and writes (SFT, tokenizer_config.json, GGUF metadata) is TinyLlama-1.1B-Chat-v1.0's
Zephyr layout, with no added tokens, and it is also the fallback for a model that has none.

    ids = apply_chat_template(tok, messages)        # inference prompt in the model's own template

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

`apply_chat_template` renders any model's template the way transformers does (a sandboxed Jinja
environment with trim_blocks and lstrip_blocks, `bos_token`/`eos_token`/`unk_token`/`pad_token`,
`add_generation_prompt`, `raise_exception`, `strftime_now`, `tojson`) and tokenizes the text as
transformers' `apply_chat_template(..., tokenize=True)` does: the special-token strings the
template wrote become their ids and the text between them is encoded piece by piece. Special-token
strings typed inside a message stay text (transformers would parse them).
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Sequence

from tinyllama.errors import UserError
from tinyllama.formats.tokenizer import Tokenizer

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
        if not isinstance(m, dict):
            raise ChatFormatError(f"turn {i}: expected {{'role': ..., 'content': ...}}, got {m!r}"[:200])
        missing = [k for k in ("role", "content") if k not in m]
        if missing:
            raise ChatFormatError(f"turn {i}: no {' or '.join(map(repr, missing))} field (fields: "
                                  f"{', '.join(map(str, m)) or 'none'})"[:200])
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
    """The conversation as text, through the Jinja template itself (as transformers renders it)."""
    validate(messages)
    return render_template(CHAT_TEMPLATE, messages, {"bos_token": bos_token, "eos_token": eos_token},
                           add_generation_prompt)


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


# ---- any model's own template -------------------------------------------------------------------

# Private-use code points stand in for special-token strings typed inside messages while the
# template renders, so that only the template's own special tokens become special ids.
_SHIELD = 0xF0000


# Built-in templates, by name, for --chat-template and for models that carry none.
LLAMA2_CHAT_TEMPLATE = (   # meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                   "{% endif %}")
BUILTIN_TEMPLATES = {"zephyr": CHAT_TEMPLATE, "llama-2": LLAMA2_CHAT_TEMPLATE, "chatml": CHATML_TEMPLATE}
# Llama-2-chat GGUFs converted before templates were stored (TheBloke's among them) carry none;
# their names still say what they are (as llama-cpp-python's default "llama-2" format assumes).
_LLAMA2_CHAT_NAME = re.compile(r"llama[-_ ]?2.*chat", re.IGNORECASE)


# what a template's own markers say it is, in the names llama.cpp's chat formats use
_FAMILIES = (("<|im_start|>", "ChatML"), ("<|start_header_id|>", "Llama-3"), ("[INST]", "Llama-2 [INST]"),
             ("<|user|>", "Zephyr"), ("<start_of_turn>", "Gemma"))


def template_family(template: str) -> str:
    """The chat format a Jinja template renders ("ChatML", "Llama-3", ...), or "custom"."""
    return next((family for marker, family in _FAMILIES if marker in template), "custom")


def template_of(tok: Tokenizer, override: str | None = None, name: str = "") -> tuple[str, str]:
    """(the Jinja template a model chats in, where it came from): `override` (a built-in name
    or a .jinja file) first, then the model's own, then by its `name` Llama-2-chat's, else ours."""
    if override:
        if override in BUILTIN_TEMPLATES:
            return BUILTIN_TEMPLATES[override], f"--chat-template {override}"
        try:
            return Path(override).read_text(encoding="utf-8"), f"--chat-template {override}"
        except (OSError, UnicodeDecodeError) as e:
            raise ChatFormatError(f"--chat-template {override}: neither a built-in template "
                                  f"({', '.join(BUILTIN_TEMPLATES)}) nor a readable file ({e})") from None
    if tok.chat_template:
        return tok.chat_template, f"{template_family(tok.chat_template)}, the model's own ({tok.source or 'tokenizer'})"
    if _LLAMA2_CHAT_NAME.search(name):
        return LLAMA2_CHAT_TEMPLATE, f"Llama-2-chat's (the model has none; its name {name!r} says Llama-2 chat)"
    return CHAT_TEMPLATE, "the built-in Zephyr template (the model has none)"


def render_template(template: str, messages: Sequence[dict], special: dict[str, str],
                    add_generation_prompt: bool = True) -> str:
    """`template` rendered as transformers renders a chat template; `special` maps
    bos_token/eos_token/... to their strings."""
    from jinja2 import TemplateError

    try:
        return _compiled(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                          **special)
    except TemplateError as e:
        raise ChatFormatError(f"the model's chat template cannot be rendered: {e}") from None


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
    """The template compiled once (milliseconds a request otherwise, as transformers caches it too)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg: str):
        raise ChatFormatError(f"the model's chat template refuses this conversation: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template)


def apply_chat_template(tok: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True,
                        template: str | None = None) -> list[int]:
    """The prompt ids for `messages` in `template` (default: the model's own, template_of):
    equal to transformers' apply_chat_template(..., tokenize=True) for ordinary messages."""
    validate(messages)
    shield = {s: chr(_SHIELD + k) for k, s in enumerate(_special_strings(tok).values())}
    shielded = [{**m, "content": _replace_all(m["content"], shield)} for m in messages]
    text = render_chat_text(tok, shielded, add_generation_prompt, template)
    return encode_rendered(tok, text, unshield={c: s for s, c in shield.items()})


def render_chat_text(tok: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True,
                     template: str | None = None) -> str:
    """`messages` rendered as text in `template` (default: the model's own), with the
    tokenizer's special-token strings: transformers' apply_chat_template(..., tokenize=False)."""
    validate(messages)
    names = {"bos_token": tok.bos_id, "eos_token": tok.eos_id, "unk_token": tok.unk_id, "pad_token": tok.pad_id}
    special = {k: tok.id_to_piece(i) or "" for k, i in names.items()}
    return render_template(template or template_of(tok)[0], messages, special, add_generation_prompt)


def encode_rendered(tok: Tokenizer, text: str, unshield: dict[str, str] | None = None) -> list[int]:
    """The ids of a rendered chat: its special-token strings become their ids, the text between
    them is encoded piece by piece (no BOS added: the template writes it). `unshield` maps the
    stand-ins apply_chat_template put in messages back to the strings they hide."""
    specials = {t: i for i, t in _special_strings(tok).items()}
    ids: list[int] = []
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    for piece in re.split(pattern, text) if specials else [text]:
        if piece in specials:
            ids.append(specials[piece])
        elif piece:
            ids += tok.encode(_replace_all(piece, unshield or {}), bos=False)
    return ids


def encode_for_training(tok: Tokenizer, messages: Sequence[dict], template: str | None = None
                        ) -> tuple[list[int], list[bool]]:
    """(ids, is_target) of a training conversation in `template` (default: the model's own,
    template_of): is_target marks each assistant turn's tokens, found by rendering: what the
    conversation up to and including a reply adds to the conversation up to it with the
    generation prompt, up to and including its end-of-turn token (a stop id), as transformers'
    assistant masks mark them. Works for any template that renders a conversation as a prefix of its longer
    versions (ChatML, Llama-2, Zephyr: for ours the ids equal encode_chat's)."""
    validate(messages, for_training=True)
    ids: list[int] = []
    target: list[bool] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = apply_chat_template(tok, messages[:i], add_generation_prompt=True, template=template)
        full = apply_chat_template(tok, messages[:i + 1], add_generation_prompt=False, template=template)
        if prompt[:len(ids)] != ids or full[:len(prompt)] != prompt or len(full) == len(prompt):
            raise ChatFormatError(f"turn {i}: the chat template does not render this conversation as a prefix of "
                                  "its longer versions, so the reply's tokens cannot be told apart")
        reply = full[len(prompt):]
        # the reply ends at its end-of-turn token: what follows it (ChatML's "\n") is never generated
        end = next((k + 1 for k, t in enumerate(reply) if t in tok.stop_ids), len(reply))
        target += [False] * (len(prompt) - len(ids)) + [True] * end + [False] * (len(reply) - end)
        ids = full
    return ids, target


def _special_strings(tok: Tokenizer) -> dict[int, str]:
    """id -> text of the tokens a template may write as special (<s>, </s>, <unk>, added ones)."""
    found = {i: t.content for i, t in tok.backend.get_added_tokens_decoder().items() if t.special}
    for i in (tok.bos_id, tok.eos_id, tok.unk_id):
        found.setdefault(i, tok.id_to_piece(i) or "")
    return {i: s for i, s in found.items() if s}


def _replace_all(text: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        text = text.replace(old, new)
    return text
