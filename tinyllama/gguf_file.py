"""Reading GGUF files: the one place that opens them, with gguf-py (llama.cpp's own reader).

    reader = open_gguf(path)                       # UserError naming the file if it is not a GGUF
    gguf_value(reader, "general.architecture")     # one scalar or string, None when absent
    read_metadata(path)                            # every key, plus {"_tensors": {name: type}}
    read_gguf_vocab(path, reader)                  # (pieces, scores, types, special ids)
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError


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
        return gguf.LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_") if ftype is not None else "GGUF"
    except (ValueError, TypeError):
        return f"file type {ftype}"


def read_gguf_vocab(gguf_path: Path, reader) -> tuple[list[str], list[float], list[int], dict[str, int]]:
    """(pieces, scores, token types, special ids) of a parsed llama.cpp vocabulary file."""

    def field(name: str):
        f = reader.fields.get(name)
        if f is None:
            raise UserError(f"{gguf_path}: GGUF field {name} is missing")
        return f

    model = bytes(field("tokenizer.ggml.model").parts[-1]).decode()
    if model != "llama":
        raise UserError(f"{gguf_path}: tokenizer.ggml.model is {model!r}, expected 'llama' (SentencePiece)")
    tf = field("tokenizer.ggml.tokens")
    pieces = [bytes(tf.parts[i]).decode("utf-8") for i in tf.data]
    sf = field("tokenizer.ggml.scores")
    scores = [float(sf.parts[i][0]) for i in sf.data]
    yf = field("tokenizer.ggml.token_type")
    types = [int(yf.parts[i][0]) for i in yf.data]

    def special_id(name: str, default: int) -> int:
        f = reader.fields.get(f"tokenizer.ggml.{name}_token_id")
        return int(f.parts[-1][0]) if f is not None else default

    ids = {"bos": special_id("bos", 1), "eos": special_id("eos", 2), "unk": special_id("unknown", 0)}
    return pieces, scores, types, ids
