"""Reading GGUF files: the one place that opens them, with gguf-py (llama.cpp's own reader).

    reader = open_gguf(path)                       # UserError naming the file if it is not a GGUF
    gguf_value(reader, "general.architecture")     # one scalar or string, None when absent
    read_metadata(path)                            # every key, plus {"_tensors": {name: type}}
    read_gguf_vocab(path, reader)                  # GGUFVocab: kind, pieces, merges, special ids
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from tinyllama.errors import UserError


def open_gguf(gguf_path: Path):
    """gguf-py's reader (llama.cpp's own) over a file, or a UserError naming it."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(gguf_path))
    except Exception as e:
        raise UserError(f"{gguf_path}: not a readable GGUF file: {e}") from None


def gguf_value(reader, name: str):
    """One scalar or string metadata value of a parsed GGUF (None when absent)."""
    from gguf import GGUFValueType

    field = reader.fields.get(name)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    return bytes(value).decode("utf-8") if field.types[0] == GGUFValueType.STRING else value[0]


def read_metadata(path: str | os.PathLike) -> dict:
    """The key/value metadata of a GGUF file (strings, numbers and short arrays), and its
    tensors' types under "_tensors"."""
    reader = open_gguf(Path(path))
    meta = {key: f.contents() for key, f in reader.fields.items() if not key.startswith("GGUF.")}
    meta["_tensors"] = {t.name: t.tensor_type.name for t in reader.tensors}
    return meta


def file_type_name(reader) -> str:
    """'Q4_K_M', 'F32', ... from general.file_type (llama.cpp's LLAMA_FTYPE numbering)."""
    import gguf

    ftype = gguf_value(reader, "general.file_type")
    try:
        return gguf.LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_").removeprefix("ALL_") if ftype is not None else "GGUF"
    except (ValueError, TypeError):
        return f"file type {ftype}"


class VocabularyNotRead(UserError):
    """A GGUF whose tokenizer is of a kind not rebuilt here (llama.cpp may still run it)."""


# tokenizer.ggml.model values read here, and what they are
TOKENIZER_MODELS = {"llama": "SentencePiece BPE (Llama-2, TinyLlama, Mistral)",
                    "gpt2": "byte-level BPE (SmolLM2, Llama-3, GPT-2)"}


# byte-level pre-tokenizers whose models start a text with BOS when the file does not say
ADDS_BOS_BY_DEFAULT = ("llama3", "llama-v3", "llama-bpe", "falcon3", "tekken")


@dataclass(frozen=True)
class GGUFVocab:
    """A GGUF's own tokenizer: what llama.cpp tokenizes with."""
    model: str                    # tokenizer.ggml.model: "llama" or "gpt2"
    pre: str                      # tokenizer.ggml.pre: the byte-level pre-tokenizer ("smollm", "llama-bpe", ...)
    pieces: list[str]
    types: list[int]              # llama.cpp's token types (1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte)
    scores: list[float]           # SentencePiece scores ("llama"); zeros where the file has none
    merges: list[str]             # "a b" pairs by rank ("gpt2"); empty for "llama"
    ids: dict[str, int] = field(default_factory=dict)     # bos, eos, unk; pad, eot, eom where present
    add_bos: bool = True          # tokenizer.ggml.add_bos_token


def read_gguf_vocab(gguf_path: Path, reader) -> GGUFVocab:
    """The vocabulary of a parsed GGUF, SentencePiece (`llama`) or byte-level BPE (`gpt2`)."""

    def field_(name: str):
        f = reader.fields.get(name)
        if f is None:
            raise UserError(f"{gguf_path}: GGUF field {name} is missing")
        return f

    def strings(name: str) -> list[str]:
        f = field_(name)
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    model = bytes(field_("tokenizer.ggml.model").parts[-1]).decode()
    if model not in TOKENIZER_MODELS:
        known = "; ".join(f"{k!r}: {v}" for k, v in TOKENIZER_MODELS.items())
        raise VocabularyNotRead(f"{gguf_path}: tokenizer.ggml.model is {model!r}; the vocabularies read here are {known}")
    pieces = strings("tokenizer.ggml.tokens")
    yf = field_("tokenizer.ggml.token_type")
    types = [int(yf.parts[i][0]) for i in yf.data]
    sf = reader.fields.get("tokenizer.ggml.scores") if model == "gpt2" else field_("tokenizer.ggml.scores")
    scores = [float(sf.parts[i][0]) for i in sf.data] if sf is not None else [0.0] * len(pieces)
    merges = strings("tokenizer.ggml.merges") if model == "gpt2" else []
    ids = {}
    for key, name in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"), ("eot", "eot"),
                      ("eom", "eom")):
        value = gguf_value(reader, f"tokenizer.ggml.{name}_token_id")
        if value is not None and 0 <= int(value) < len(pieces):
            ids[key] = int(value)
    if model == "llama":            # Llama-2's defaults, for files written before the ids were stored
        ids = {"bos": 1, "eos": 2, "unk": 0, **ids}
    elif "eos" not in ids:
        raise UserError(f"{gguf_path}: a byte-level vocabulary without tokenizer.ggml.eos_token_id")
    add_bos = gguf_value(reader, "tokenizer.ggml.add_bos_token")
    pre = str(gguf_value(reader, "tokenizer.ggml.pre") or "default")
    if add_bos is None:             # llama.cpp's defaults: SentencePiece and Llama-3's family add BOS
        add_bos = model == "llama" or pre in ADDS_BOS_BY_DEFAULT
    return GGUFVocab(model, pre, pieces, types, scores, merges, ids, bool(add_bos))
