"""Vocabulary conversion: a SentencePiece-BPE vocabulary (pieces, scores, token types) to the
Rust `tokenizers` backend that gives llama.cpp's ids, and to and from SentencePiece's
`tokenizer.model`.

    backend = backend_from_vocab(pieces, scores, types, ids)     # byte-fallback BPE, Llama's normalizer
    model_bytes = sentencepiece_model(pieces, scores, types, ids)
    pieces, scores, types, ids = read_sentencepiece_vocab(Path("tokenizer.model"))
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, decoders, normalizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from .errors import UserError

# gguf token types (llama.cpp's llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def backend_from_vocab(pieces: list[str], scores: list[float], types: list[int],
                        ids: dict[str, int]) -> HFTokenizer:
    """A byte-fallback BPE equal to SentencePiece-BPE: merges ranked by the merged piece's score."""
    vocab = {p: i for i, p in enumerate(pieces)}
    merges: list[tuple[str, str, float]] = []
    for piece, score, typ in zip(pieces, scores, types):
        if typ != _NORMAL:
            continue
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: m[2], reverse=True)   # stable: ties keep the id order above

    backend = HFTokenizer(BPE(vocab=vocab, merges=[(a, b) for a, b, _ in merges],
                              unk_token=pieces[ids["unk"]], fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None   # SentencePiece BPE runs on the whole normalized text
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False)
                                for i, t in enumerate(types) if t in (_CONTROL, _UNKNOWN)])
    # BOS for callers that use add_special_tokens=True (transformers), as in Meta's release;
    # our own encode() adds BOS/EOS explicitly instead.
    bos = pieces[ids["bos"]]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, ids["bos"])])
    return backend


def sentencepiece_model(pieces: list[str], scores: list[float], types: list[int], ids: dict[str, int]) -> bytes:
    """The same vocabulary as a SentencePiece `tokenizer.model` (BPE, byte fallback, dummy prefix,
    no whitespace folding: Llama-2's settings), for tools that want one: sentencepiece itself,
    transformers' slow tokenizer, llama.cpp's converter."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        raise RuntimeError("writing tokenizer.model needs sentencepiece and protobuf (pip install '.[dev]')") from None
    m = pb.ModelProto()
    t = m.trainer_spec
    t.model_type = pb.TrainerSpec.BPE
    t.vocab_size = len(pieces)
    t.byte_fallback = True
    t.split_digits = True
    t.allow_whitespace_only_pieces = True
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = ids["unk"], ids["bos"], ids["eos"], -1
    n = m.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = True
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    for piece, score, typ in zip(pieces, scores, types):
        p = m.pieces.add()
        p.piece, p.score, p.type = piece, score, typ   # gguf token types use SentencePiece's numbering
    return m.SerializeToString()


def read_sentencepiece_vocab(model_file: Path) -> tuple[list[str], list[float], list[int], dict[str, int]]:
    """(pieces, scores, token types, special ids) of a SentencePiece BPE tokenizer.model."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        raise RuntimeError(f"{model_file}: reading tokenizer.model needs sentencepiece and protobuf") from None
    m = pb.ModelProto()
    try:
        m.ParseFromString(Path(model_file).read_bytes())
    except Exception as e:
        raise UserError(f"{model_file}: not a SentencePiece model ({e})") from None
    if m.trainer_spec.model_type != pb.TrainerSpec.BPE or not m.pieces:
        raise UserError(f"{model_file}: only SentencePiece BPE models (Llama's) are supported")
    t = m.trainer_spec
    ids = {"bos": t.bos_id, "eos": t.eos_id, "unk": t.unk_id}
    return [p.piece for p in m.pieces], [p.score for p in m.pieces], [p.type for p in m.pieces], ids


def convert_sentencepiece(path: Path) -> HFTokenizer:
    """A SentencePiece BPE tokenizer.model (Llama's) -> the same tokenizers backend as build."""
    return backend_from_vocab(*read_sentencepiece_vocab(path / "tokenizer.model"))
