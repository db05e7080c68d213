"""Chat data for SFT: read conversations, tokenize them in the one chat format, mask the loss.

    convs = load_conversations("sample")                       # the shipped offline sample
    convs = load_conversations("my.jsonl")                     # local JSONL (3 record shapes)
    convs = load_conversations("timdettmers/openassistant-guanaco")   # a hub dataset (online)
    examples, stats = tokenize_conversations(convs, tok, max_len=512)
    # examples: [{"input_ids": [...], "labels": [-100, ..., id, ...]}, ...]

Record shapes a JSONL line (or a hub dataset row) may have:
    {"text": "### Human: ...### Assistant: ..."}               OpenAssistant-Guanaco
    {"messages": [{"role": "user", "content": ...}, ...]}      chat messages (system optional)
    {"prompt": ..., "response": ...}  ("completion"/"output" also read as the response)

Length policy (SFTConfig.max_length): an example longer than the context keeps its start and
is cut at max_len; one whose assistant tokens all fall beyond the cut is dropped. Both are
counted in `TokenStats` and printed by the CLI.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from tinyllama.formats.chat import ChatFormatError, encode_for_training, template_of, validate
from tinyllama.errors import UserError
from tinyllama.formats.tokenizer import Tokenizer

SAMPLE_PATH = Path(__file__).with_name("samples") / "python-qa-guanaco.jsonl"
GUANACO = "timdettmers/openassistant-guanaco"
IGNORE_INDEX = -100

Conversation = list[dict[str, str]]


class DataError(UserError):
    """Unreadable chat data; the message names the file and line (or dataset row) and the field."""


# ---- OpenAssistant-Guanaco text --------------------------------------------------------------

_TURN = re.compile(r"###\s*(Human|Assistant)\s*:")
_ROLE = {"Human": "user", "Assistant": "assistant"}


def parse_guanaco(text: str) -> Conversation:
    """"### Human: q### Assistant: a### Human: ..." -> [{"role": "user", ...}, ...].

    Turn markers may sit anywhere (Guanaco puts no newline before them); whitespace around
    contents is stripped. A "###" that is not followed by Human:/Assistant: stays content."""
    if not isinstance(text, str):
        raise ChatFormatError(f"field 'text' must be a string, got {type(text).__name__}")
    parts = _TURN.split(text)          # [before, role, content, role, content, ...]
    if len(parts) < 3:
        raise ChatFormatError("no '### Human:' / '### Assistant:' turns in field 'text'")
    if parts[0].strip():
        raise ChatFormatError(f"text before the first '### Human:' turn: {parts[0].strip()[:60]!r}")
    messages = [{"role": _ROLE[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]
    validate(messages, for_training=True)
    return messages


def to_guanaco(messages: Sequence[dict]) -> str:
    """The inverse of parse_guanaco, for writing data in the Guanaco layout."""
    names = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"### {names[m['role']]}: {m['content']}" for m in messages)


# ---- records ---------------------------------------------------------------------------------

def record_to_messages(record: Any) -> Conversation:
    """One JSONL record / dataset row, in any of the three shapes, -> validated messages."""
    if not isinstance(record, dict):
        raise ChatFormatError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise ChatFormatError("field 'messages' must be a list of {role, content} objects")
        messages = [dict(m) if isinstance(m, dict) else m for m in messages]
    elif "text" in record:
        return parse_guanaco(record["text"])
    elif "prompt" in record:
        reply = next((k for k in ("response", "completion", "output") if k in record), None)
        if reply is None:
            raise ChatFormatError("field 'prompt' without a 'response' (or 'completion'/'output')")
        for name in ("prompt", reply):
            if not isinstance(record[name], str) or not record[name].strip():
                raise ChatFormatError(f"field {name!r} must be a non-empty string, got {record[name]!r}"[:200])
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record[reply]}]
    else:
        raise ChatFormatError(f"no 'text', 'messages' or 'prompt' field (fields: {', '.join(sorted(record))})")
    validate(messages, for_training=True)
    return [{"role": m["role"], "content": m["content"].strip()} for m in messages]


@dataclass
class LoadStats:
    read: int = 0
    skipped: int = 0          # invalid records left out under skip_invalid=True


def read_conversations_jsonl(path: str | Path, skip_invalid: bool = False,
                             stats: LoadStats | None = None) -> list[Conversation]:
    path = Path(path)
    stats = stats if stats is not None else LoadStats()
    out: list[Conversation] = []
    records = 0
    try:
        fh = path.open("rb")             # decoded line by line, so bad bytes are named by line
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    with fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            stats.read += 1
            records += 1
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                err: Exception = DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start}: {e.reason})")
            except json.JSONDecodeError as e:
                err = DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})")
            else:
                try:
                    out.append(record_to_messages(record))
                    continue
                except ChatFormatError as e:
                    err = DataError(f"{path}:{lineno}: {e}")
            if not skip_invalid:
                raise err
            stats.skipped += 1
    if not out:
        why = "the file is empty" if not path.stat().st_size else "only blank lines" if not records else \
            f"all {records} records invalid"
        raise DataError(f"{path}: no conversations ({why})")
    return out


def load_conversations(source: str, split: str = "train", skip_invalid: bool = False,
                       stats: LoadStats | None = None) -> list[Conversation]:
    """"sample" (the shipped file), a local .jsonl path, or a Hugging Face dataset name."""
    if source == "sample":
        return read_conversations_jsonl(SAMPLE_PATH, skip_invalid, stats)
    path = Path(source)
    if path.exists() or source.endswith((".jsonl", ".json")):
        if path.is_dir():
            raise DataError(f"{path}: is a directory; give a .jsonl file")
        return read_conversations_jsonl(path, skip_invalid, stats)
    return _load_hub_dataset(source, split, skip_invalid, stats if stats is not None else LoadStats())


def _load_hub_dataset(name: str, split: str, skip_invalid: bool, stats: LoadStats) -> list[Conversation]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name}: not a local file, and loading a hub dataset needs `pip install datasets`") from None
    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as e:   # offline, unknown name, missing split: say which
        raise DataError(f"{name}: not a local file and could not be loaded as a hub dataset "
                        f"(split {split!r}): {type(e).__name__}: {e}"[:500]) from None
    out = []
    for i, row in enumerate(rows):
        stats.read += 1
        try:
            out.append(record_to_messages(row))
        except ChatFormatError as e:
            if not skip_invalid:
                raise DataError(f"{name}[{split}] row {i}: {e}") from None
            stats.skipped += 1
    return out


def split_eval(convs: list[Conversation], eval_fraction: float, seed: int) -> tuple[list[Conversation], list[Conversation]]:
    """A deterministic held-out split: shuffled by `seed`, round(fraction * n) (at least one)
    conversations held out for the evaluation loss."""
    if not 0 <= eval_fraction < 1:
        raise UserError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if not eval_fraction:
        return list(convs), []
    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(eval_fraction * len(convs))), len(convs) - 1)
    train = [convs[i] for i in order[: len(convs) - n_eval]]
    held = [convs[i] for i in order[len(convs) - n_eval:]]
    return train, held


# ---- tokens ----------------------------------------------------------------------------------

@dataclass
class TokenStats:
    examples: int = 0
    tokens: int = 0
    target_tokens: int = 0
    truncated: int = 0        # cut at max_len, some assistant tokens kept
    dropped: int = 0          # every assistant token lay beyond max_len

    def describe(self) -> str:
        return (f"{self.examples} examples, {self.tokens:,} tokens ({self.target_tokens:,} trained on); "
                f"{self.truncated} truncated to the context, {self.dropped} dropped (no assistant token fit)")


def tokenize_conversations(convs: Iterable[Conversation], tok: Tokenizer, max_len: int,
                           stats: TokenStats | None = None, template: str | None = None) -> list[dict[str, list[int]]]:
    """[{"input_ids", "labels"}] in `template` (default: the model's own, else ours: Zephyr):
    labels are the ids of each assistant reply and its end-of-turn token, IGNORE_INDEX
    everywhere else (BOS, role headers, system and user turns)."""
    stats = stats if stats is not None else TokenStats()
    template = template or template_of(tok)[0]
    out = []
    for messages in convs:
        ids, is_target = encode_for_training(tok, messages, template)
        if len(ids) > max_len:
            ids, is_target = ids[:max_len], is_target[:max_len]
            if not any(is_target):
                stats.dropped += 1
                continue
            stats.truncated += 1
        labels = [i if t else IGNORE_INDEX for i, t in zip(ids, is_target)]
        out.append({"input_ids": ids, "labels": labels})
        stats.examples += 1
        stats.tokens += len(ids)
        stats.target_tokens += sum(is_target)
    return out
