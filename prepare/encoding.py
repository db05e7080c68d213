"""Tokenizing a corpus at speed: many texts -> one packed id array, the form token shards take.

    ids, lengths = encode_packed(tok, texts, eos=True)   # little-endian uint16/uint32 ids, per-text counts
    encode_batch(tok, texts, bos=False)                  # the same ids as lists, one per text

Ids equal `Tokenizer.encode`'s. For SentencePiece-style Llama vocabularies each text is cut where
no merge can cross and every distinct piece runs through BPE once, its ids kept (prepare.pieces,
in C where a compiler is found); other vocabularies use the Rust batch encoder. The piece encoder
belongs to this process: it is built once per tokenizer, before data preparation's workers fork
(so they share it), and never travels with a pickled tokenizer. Whether its cache is the C one
is `native` (auto, off or on: tinyllama.runtime, which a CLI reads from --native or
TINYLLAMA_NATIVE), given where data preparation first builds it:

    piece_encoder(tok, native="off")                     # the Python path, even where C builds
"""

from __future__ import annotations

import weakref
from typing import Sequence

import numpy as np

from tinyllama.formats.shards import packed_dtype
from tinyllama.formats.tokenizer import Tokenizer

from .pieces import PieceEncoder, pack, split_rules, u16

_NONE = object()                      # "this vocabulary has no piece encoder", cached as such
_ENCODERS: "weakref.WeakKeyDictionary[Tokenizer, object]" = weakref.WeakKeyDictionary()


def piece_encoder(tok: Tokenizer, native: str | None = None) -> PieceEncoder | None:
    """The tokenizer's piece cutter and cache; None where the vocabulary is not of the kind its
    cuts are proven for. Built on first use (~0.2 s) and kept while the tokenizer lives.
    native: the C piece cache's mode (tinyllama.runtime's `native`: auto, off or on), the one it
    is built with; a later call that names another builds it again; None: as built, else auto."""
    enc = _ENCODERS.get(tok)
    if enc is None or (native is not None and enc is not _NONE and enc.mode != native):
        rules = split_rules(tok.backend)
        enc = PieceEncoder(rules, tok.backend, native=native or "auto") if rules is not None else _NONE
        _ENCODERS[tok] = enc
    return None if enc is _NONE else enc


def clear_piece_cache(tok: Tokenizer) -> None:
    """Forgets the cached pieces (a cold start, for benchmarks)."""
    enc = piece_encoder(tok)
    if enc is not None:
        enc.clear()


def encode_packed(tok: Tokenizer, texts: Sequence[str], bos: bool | None = None,
                  eos: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """All texts' ids concatenated, as one little-endian array of the shard dtype for this
    vocabulary, and each text's length (uint32). bos None: where the model adds one."""
    add_bos = tok.add_bos if bos is None else bos
    head, tail = [tok.bos_id] if add_bos else [], [tok.eos_id] if eos else []
    wide = packed_dtype(tok.vocab_size).itemsize > 2
    enc = piece_encoder(tok)
    if enc is not None and not wide:
        return enc.encode_packed(texts, head, tail)
    encoded = tok.backend.encode_batch(list(texts), add_special_tokens=False)
    if not wide:
        return pack([u16(head + e.ids + tail) for e in encoded])
    lengths = np.array([len(head) + len(e.ids) + len(tail) for e in encoded], dtype=np.uint32)
    ids = np.fromiter((i for e in encoded for i in (*head, *e.ids, *tail)), dtype="<u4", count=int(lengths.sum()))
    return ids, lengths


def encode_batch(tok: Tokenizer, texts: Sequence[str], bos: bool | None = None, eos: bool = False) -> list[list[int]]:
    """encode_packed's ids, one list per text."""
    data, lengths = encode_packed(tok, texts, bos=bos, eos=eos)
    bounds = np.cumsum(np.concatenate([[0], lengths]))
    return [data[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]
