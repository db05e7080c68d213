"""Vocabulary conversion: a GGUF's or SentencePiece's vocabulary to the Rust `tokenizers` backend
that gives llama.cpp's ids, and to and from SentencePiece's `tokenizer.model`.

    backend = backend_from_vocab(pieces, scores, types, ids)     # SentencePiece BPE: byte fallback, Llama's normalizer
    backend = byte_level_backend(vocab, where)                   # byte-level BPE (GPT-2 style), vocab a GGUFVocab
    model_bytes = sentencepiece_model(pieces, scores, types, ids)
    pieces, scores, types, ids = read_sentencepiece_vocab(Path("tokenizer.model"))

A byte-level vocabulary is cut into pieces before BPE by its pre-tokenizer, which a GGUF names
(`tokenizer.ggml.pre`) and llama.cpp spells as regular expressions (src/llama-vocab.cpp); the
table below holds those expressions for the families known here, applied in order as llama.cpp
does, each split keeping its matches and what lies between them.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from tinyllama.errors import UserError
from tinyllama.formats.gguf_file import GGUFVocab, VocabularyNotRead

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3_SPLIT = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
# (tokenizer.ggml.pre values, the splits in order, ignore_merges: a whole word already in the
# vocabulary is taken as it is, as llama.cpp and tokenizers do for Llama-3)
PRE_TOKENIZERS = [
    (("smollm", "starcoder", "refact", "codeshell", "exaone", "command-r", "minerva"), [r"\p{N}", _GPT2_SPLIT], False),
    (("gpt-2", "phi-2", "mpt", "olmo", "jais"), [_GPT2_SPLIT], False),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"), [_LLAMA3_SPLIT], True),
    (("qwen2", "deepseek-r1-qwen", "stablelm2"), [_QWEN2_SPLIT], False),
    (("default",), [r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"], False),
]

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


def byte_level_backend(vocab: GGUFVocab, where: str | Path) -> HFTokenizer:
    """A GGUF's byte-level BPE vocabulary (tokenizer.ggml.model "gpt2") as a `tokenizers` backend:
    the pre-tokenizer's splits, then bytes mapped to GPT-2's printable characters, then the
    ranked merges. Control and user-defined tokens (<|im_start|>, <|endoftext|>) are added tokens."""
    found = next(((splits, ignore) for names, splits, ignore in PRE_TOKENIZERS if vocab.pre in names), None)
    if found is None:
        known = ", ".join(n for names, _, _ in PRE_TOKENIZERS for n in names)
        raise VocabularyNotRead(f"{where}: tokenizer.ggml.pre is {vocab.pre!r}, a byte-level pre-tokenizer not known here "
                        f"(known: {known})")
    splits, ignore_merges = found
    merges = [tuple(m.split(" ", 1)) for m in vocab.merges]
    if any(len(m) != 2 for m in merges):
        raise UserError(f"{where}: tokenizer.ggml.merges holds an entry that is not two pieces separated by a space")
    backend = HFTokenizer(BPE(vocab={p: i for i, p in enumerate(vocab.pieces)}, merges=merges,
                              ignore_merges=ignore_merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _family_pre_tokenizer(splits)
    backend.decoder = decoders.ByteLevel()
    # control tokens are special (typed in text they stay text: Tokenizer sets encode_special_tokens);
    # user-defined ones are matched in raw text before BPE, as llama.cpp does (MPT's space runs)
    backend.add_special_tokens([AddedToken(p, special=True, normalized=False)
                                for p, t in zip(vocab.pieces, vocab.types) if t == _CONTROL])
    backend.add_tokens([AddedToken(p, special=False, normalized=False)
                        for p, t in zip(vocab.pieces, vocab.types) if t == _USER_DEFINED])
    if vocab.add_bos and "bos" in vocab.ids:
        bos = vocab.pieces[vocab.ids["bos"]]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, vocab.ids["bos"])])
    return backend


# Text that tells the pre-tokenizer families apart (digits, contractions, whitespace runs, line
# breaks, punctuation runs, letters of several scripts)
_FAMILY_PROBE = ("Hello world! It's 2024: 12345 apples, 3.14 pies... they'LL go\n\n  \tIndented — naïve 東京 "
                 "🦙's   end\r\n$x+=1;  ")


def _family_pre_tokenizer(splits: list[str]):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
                                   + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def pre_tokenizer_name(backend: HFTokenizer) -> str | None:
    """The llama.cpp name (tokenizer.ggml.pre) of the family whose pre-tokenizer cuts text as
    `backend`'s does, or None: the inverse of PRE_TOKENIZERS, by behaviour on a probe text (as
    llama.cpp's converter identifies a tokenizer by what it does, not by its class)."""
    if backend.pre_tokenizer is None:
        return None
    cut = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(_FAMILY_PROBE)]
    for names, splits, _ in PRE_TOKENIZERS:
        if [piece for piece, _ in _family_pre_tokenizer(splits).pre_tokenize_str(_FAMILY_PROBE)] == cut:
            return names[0]
    return None


def is_byte_level(backend: HFTokenizer) -> bool:
    """A GPT-2-style vocabulary: text cut, then its bytes mapped to printable characters."""
    import json

    decoder = json.loads(backend.to_str()).get("decoder") or {}
    return decoder.get("type") == "ByteLevel"


def bpe_merges(backend: HFTokenizer) -> list[str]:
    """The ranked merges of a BPE backend, as "a b" strings (GGUF's tokenizer.ggml.merges)."""
    import json

    merges = json.loads(backend.to_str())["model"].get("merges") or []
    return [m if isinstance(m, str) else " ".join(m) for m in merges]
