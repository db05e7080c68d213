"""Cutting normalized text where no BPE merge can cross, and caching each piece's ids: what
`prepare.encoding.encode_packed` (data preparation) runs on.

    rules = split_rules(backend)            # None: not a Llama-style SentencePiece BPE
    enc = PieceEncoder(rules, backend)
    ids, lengths = enc.encode_packed(texts, head=[1], tail=[2])   # uint16 ids, per-text counts

A cut between characters x and y is safe when no piece of the vocabulary has x followed by y:
every merge yields a piece, so none can span the cut. `split_rules` reads three kinds of safe
cut off the vocabulary (see its docstring); every distinct piece then goes through BPE once and
its ids are kept, so a text costs a lookup per piece instead of a BPE run.

Two implementations of the same rule and cache:
- native (`piece_cache.c`, compiled with the system C compiler by `make setup` or on first
  use into ~/.cache/tinyllama/native/ and loaded with ctypes): pieces cut, looked up and, when
  new, run through BPE in C (the `tokenizers` crate's merge loop, on the model's own merges),
  no Python object per piece or token;
- Python (a regex, a dict, the Rust BPE model): where no C compiler is found, with native
  "off" (--native off, TINYLLAMA_NATIVE=0), and for the texts the C code declines (a character
  only <unk> can stand for, a text of 2 GiB or more).
Both give ids identical to `Tokenizer.encode` (tested on llama.cpp's vectors, real code and
random text; cut for cut and piece for piece against each other and the Rust model). Native
"on" (TINYLLAMA_NATIVE=1) makes a failed build an error instead of a fallback.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import re
import shutil
import string
import subprocess
import sys
import threading
import warnings
from array import array
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer as HFTokenizer

from tinyllama.atomic import atomic_file
from tinyllama.errors import UserError
from tinyllama.paths import cache_dir

CACHE_MAX = 1_000_000       # distinct pieces kept (~100 MB in Python, ~60 MB native); a full cache starts again
SOURCE = Path(__file__).with_name("piece_cache.c")
CL_L, CL_S, CL_A = 1, 2, 4  # the C side's character classes (piece_cache.c)
MAX_TEXT_BYTES = 2**31 - 1  # a longer text (a single 2 GiB document) takes the Python path


def u16(ids: Sequence[int]) -> bytes:
    """Token ids as uint16 little-endian bytes (the shard format's byte order on any machine)."""
    a = array("H", ids)
    if sys.byteorder == "big":
        a.byteswap()
    return a.tobytes()


def pack(parts: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Texts' ids as uint16 bytes -> (all ids, one uint16 array; each text's count, uint32)."""
    lengths = np.fromiter((len(p) >> 1 for p in parts), dtype=np.uint32, count=len(parts))
    return np.frombuffer(b"".join(parts), dtype="<u2"), lengths


@dataclass(frozen=True)
class SplitRules:
    """Where normalized text may be cut: `letters` (ASCII letters), `safe` (ASCII punctuation
    that never touches a letter inside a piece), `alone` (ASCII characters in no
    multi-character piece). Cuts fall before a "▁" that follows another character, around
    each `alone` character, and between a letter run and a `safe` run."""
    letters: str
    safe: str
    alone: str

    @property
    def regex(self) -> re.Pattern:
        """The rule as a regex over normalized text; findall gives the pieces."""
        alone, safe = re.escape(self.alone), re.escape(self.safe)
        letters = re.escape(self.letters)
        runs = []
        if safe:     # a letter run that ends at a safe mark (or ▁, a lone char, the end), and vice versa
            runs += [f"▁*[{letters}]+(?![^▁{alone}{safe}])", f"▁*[{safe}]+(?![^▁{alone}{letters}])"]
        if alone:
            runs.append(f"[{alone}]")
        runs += [f"▁*[^▁{alone}]+" if alone else "▁*[^▁]+", "▁+"]
        return re.compile("|".join(runs))

    def ascii_classes(self) -> bytes:
        """The class bits of each ASCII code, for piece_cache.c."""
        bits = bytearray(128)
        for chars, bit in ((self.letters, CL_L), (self.safe, CL_S), (self.alone, CL_A)):
            for ch in chars:
                bits[ord(ch)] |= bit
        return bytes(bits)


def split_rules(backend: HFTokenizer) -> SplitRules | None:
    """The safe cuts of a tokenizer, or None when it is not of the kind they are proven for:
    Llama's normalizer (prepend "▁", spaces to "▁"), no pre-tokenizer, a BPE model, no "▁"
    inside a piece. Read off the vocabulary:
    - before a "▁" that follows another character (no piece has "▁" after a non-"▁");
    - around an ASCII character that is in no multi-character piece (Llama-2: newline, tab,
      the digits);
    - between an ASCII letter and an ASCII punctuation mark that never touches a letter in a
      piece (Llama-2: all but / < >), e.g. `self.assertEqual(x,` -> self . assertEqual ( x ,
    The last keeps the number of distinct pieces down (code has ~3x fewer), so fewer go
    through BPE; a run that meets any other neighbour is left whole."""
    from tokenizers.models import BPE

    try:
        if not isinstance(backend.model, BPE) or backend.normalizer is None or backend.pre_tokenizer is not None:
            return None
        if backend.normalizer.normalize_str(" a  b") != "▁▁a▁▁b" or backend.normalizer.normalize_str("") != "":
            return None
    except Exception:
        return None
    multi = [p for p in backend.get_vocab(with_added_tokens=False)
             if len(p) > 1 and not (p.startswith("<0x") and p.endswith(">"))]
    if any("▁" in p.lstrip("▁") for p in multi):
        return None
    inside = set("".join(multi))
    alone = "".join(sorted(c for c in map(chr, range(1, 128)) if c not in inside))
    touching = _next_to_letters(multi, inside)  # characters next to an ASCII letter inside some piece
    safe = "".join(c for c in string.punctuation if c not in touching)
    return SplitRules(letters=string.ascii_letters, safe=safe, alone=alone)


def _next_to_letters(pieces: list[str], inside: set[str]) -> set[str]:
    """Every character that follows or precedes an ASCII letter inside one of the pieces."""
    sep = next(chr(c) for c in range(0x110000) if chr(c) not in inside)   # in no piece: nothing touches it
    joined, s = sep.join(pieces), re.escape(sep)
    return set(re.findall(f"(?<=[A-Za-z])[^{s}]", joined)) | set(re.findall(f"[^{s}](?=[A-Za-z])", joined))


def normalize(text: str) -> str:
    """Llama's normalizer, as split_rules checked it: "▁" in front and for every space."""
    return "▁" + text.replace(" ", "▁") if text else ""


class PieceEncoder:
    """Texts to packed uint16 ids through the piece rule and cache; native when it builds."""

    def __init__(self, rules: SplitRules, backend: HFTokenizer, native: str = "auto") -> None:
        """native: auto (C where it builds), off (the Python implementation even where the C one
        builds: benchmarks) or on (an error where it does not build)."""
        self.rules, self.mode = rules, native
        self._tokenize = backend.model.tokenize
        self._words = rules.regex
        self._cache: dict[str, bytes] = {}      # Python path: piece -> its ids as uint16 LE bytes
        self._native = _NativeCache.create(rules, backend, native)

    @property
    def native(self) -> bool:
        return self._native is not None

    def clear(self) -> None:
        """Forgets every cached piece (a cold start, for benchmarks)."""
        self._cache.clear()
        if self._native is not None:
            self._native.clear()

    def pieces(self, normalized: str) -> list[str]:
        """The pieces of one normalized text, by the implementation in use."""
        if self._native is not None:
            return self._native.pieces(normalized)
        return self._words.findall(normalized)

    def encode_packed(self, texts: Sequence[str], head: Sequence[int], tail: Sequence[int]
                      ) -> tuple[np.ndarray, np.ndarray]:
        if self._native is not None:
            try:
                data = [normalize(t).encode() for t in texts]
            except UnicodeEncodeError:        # a lone surrogate: the Python path says what it says
                data = None
            encoded = self._native.encode(data, head, tail) if data is not None else None
            if encoded is not None:
                return encoded
        return pack(self._python_parts(texts, u16(head), u16(tail)))

    def _python_parts(self, texts: Sequence[str], head: bytes, tail: bytes) -> list[bytes]:
        """Each text as uint16 bytes, from the piece cache. A text whose pieces are all cached
        (most of them, once the cache is warm) is one join; the others wait until this batch's
        new pieces have been through BPE, all at once."""
        findall = self._words.findall
        words = [findall(normalize(t)) for t in texts]
        cache = self._cache
        get = cache.__getitem__
        parts: list[bytes] = []
        retry: list[int] = []
        for k, ws in enumerate(words):
            try:
                parts.append(head + b"".join(map(get, ws)) + tail)
            except KeyError:
                parts.append(b"")
                retry.append(k)
        if retry:
            missing = set().union(*(words[k] for k in retry)).difference(cache)
            if len(cache) + len(missing) > CACHE_MAX:
                cache.clear()            # bounded memory; the retried texts' pieces are all added back
                missing = set().union(*(words[k] for k in retry))
            for w in missing:
                cache[w] = u16([t.id for t in self._tokenize(w)])
            for k in retry:
                parts[k] = head + b"".join(map(get, words[k])) + tail
        return parts


# ---- the native cache ---------------------------------------------------------------------

class _NativeCache:
    """piece_cache.c through ctypes: one PieceCache per tokenizer and process, holding the
    split rule, the BPE model's tables and the cached pieces."""

    def __init__(self, lib: ctypes.CDLL, rules: SplitRules, model: dict) -> None:
        self.lib = lib
        self.lock = threading.Lock()     # ctypes lets go of the GIL; the C cache is not thread-safe
        chars, char_lens, char_ids, byte_ids, merges = _model_tables(model)
        columns = [np.ascontiguousarray(merges[:, k]) for k in range(3)]     # held here while C copies them
        self.handle = lib.pc_new(rules.ascii_classes(), 1 if rules.safe else 0, len(char_ids), chars.ctypes.data,
                                 char_lens.ctypes.data, char_ids.ctypes.data, byte_ids.ctypes.data, len(merges),
                                 *(col.ctypes.data for col in columns))
        if not self.handle:
            raise MemoryError("piece cache: out of memory")

    @classmethod
    def create(cls, rules: SplitRules, backend: HFTokenizer, mode: str = "auto") -> "_NativeCache | None":
        """The native cache, or None where it does not build, `mode` is off, or it cannot be this
        tokenizer's BPE (options piece_cache.c does not implement)."""
        m = backend.model
        if sys.byteorder != "little" or m.ignore_merges or m.dropout or m.continuing_subword_prefix \
                or m.end_of_word_suffix:
            return None
        lib = library(mode)
        if lib is None:
            return None
        return cls(lib, rules, json.loads(backend.to_str())["model"])

    def clear(self) -> None:
        with self.lock:
            self.lib.pc_clear(self.handle)

    def __len__(self) -> int:
        return self.lib.pc_size(self.handle)

    def pieces(self, normalized: str) -> list[str]:
        data = normalized.encode()
        ends = np.empty(len(data), dtype=np.int64)
        with self.lock:
            n = self.lib.pc_split(self.handle, data, len(data), ends.ctypes.data)
        starts = [0, *ends[:n - 1].tolist()]
        return [data[a:b].decode() for a, b in zip(starts, ends[:n].tolist())]

    def bpe(self, piece: str) -> list[int] | None:
        """One piece through the C BPE, uncached (None: a byte the vocabulary lacks)."""
        data = piece.encode()
        out = np.empty(len(data), dtype=np.uint16)
        with self.lock:
            n = self.lib.pc_bpe(self.handle, data, len(data), out.ctypes.data)
        return out[:n].tolist() if n >= 0 else None

    def encode(self, data: list[bytes], head: Sequence[int], tail: Sequence[int]) -> tuple[np.ndarray, np.ndarray] | None:
        """data: each text normalized, as UTF-8. Every piece yields at most one id per byte,
        so the output fits in bytes + the head and tail ids of each text. None: a text has a
        character the vocabulary can only give <unk> for, or a text of 2 GiB or more (piece
        lengths and symbol positions are int32 in C); the caller's Python path does those."""
        sizes = np.fromiter(map(len, data), dtype=np.int64, count=len(data))
        if len(sizes) and sizes.max() >= MAX_TEXT_BYTES:
            return None
        buf = b"".join(data)
        offsets = np.zeros(len(data) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        h, t = np.asarray(head, dtype=np.uint16), np.asarray(tail, dtype=np.uint16)
        out = np.empty(len(buf) + len(data) * (len(h) + len(t)), dtype=np.uint16)
        lengths = np.empty(len(data), dtype=np.uint32)
        with self.lock:
            if len(self) > CACHE_MAX:
                self.lib.pc_clear(self.handle)    # bounded memory; one batch's new pieces may overshoot
            n = self.lib.pc_encode(self.handle, buf, offsets.ctypes.data, len(data), h.ctypes.data, len(h),
                                   t.ctypes.data, len(t), out.ctypes.data, len(out), lengths.ctypes.data)
        if n == -4:
            return None
        if n < 0:
            raise MemoryError("piece cache: out of memory") if n == -3 else RuntimeError(f"pc_encode: {n}")
        return out[:n], lengths

    def __del__(self) -> None:
        handle, self.handle = getattr(self, "handle", None), None
        if handle:
            self.lib.pc_free(handle)


def _model_tables(model: dict) -> tuple[np.ndarray, ...]:
    """A `tokenizers` BPE model (its JSON) as piece_cache.c's arrays: single characters
    (UTF-8, 4 bytes each), their lengths and ids; the 256 byte-fallback ids (-1: none); the
    merges in rank order as (left, right, merged) ids."""
    vocab: dict[str, int] = model["vocab"]
    singles = [(p.encode(), i) for p, i in vocab.items() if len(p) == 1]
    chars = np.zeros((len(singles), 4), dtype=np.uint8)
    for k, (b, _) in enumerate(singles):
        chars[k, :len(b)] = np.frombuffer(b, dtype=np.uint8)
    char_lens = np.array([len(b) for b, _ in singles], dtype=np.uint8)
    char_ids = np.array([i for _, i in singles], dtype=np.int32)
    fallback = model.get("byte_fallback")
    byte_ids = np.array([vocab.get(f"<0x{b:02X}>", -1) if fallback else -1 for b in range(256)], dtype=np.int32)
    pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
    triples = [(vocab[a], vocab[b], vocab[a + b]) for a, b in pairs if a in vocab and b in vocab and a + b in vocab]
    return chars, char_lens, char_ids, byte_ids, np.array(triples, dtype=np.int32).reshape(-1, 3)


NATIVE_MODES = ("auto", "off", "on")


@lru_cache(maxsize=None)
def library(mode: str = "auto") -> ctypes.CDLL | None:
    """piece_cache.c, compiled once per source version and machine type into the cache
    folder, loaded with ctypes; None when `mode` is off, or (with a warning) where it cannot be
    built and `mode` is auto; an error then when it is on."""
    if mode not in NATIVE_MODES:
        raise UserError(f"native {mode!r}: expected {', '.join(NATIVE_MODES)}")
    if mode == "off":
        return None
    try:
        return _declare(ctypes.CDLL(str(_built())))
    except (OSError, subprocess.SubprocessError) as e:
        if mode == "on":
            raise UserError(f"--native on (TINYLLAMA_NATIVE=1) but the native piece cache cannot be used: {e}") from None
        warnings.warn(f"native piece cache unavailable ({e}); data preparation uses the slower Python splitter "
                      "(set CC to a C compiler, or --native off / TINYLLAMA_NATIVE=0 to silence this)", stacklevel=2)
        return None


# The safety net's build (tests/test_piece_cache_safety.py): every out-of-bounds access, use after
# free and undefined behaviour stops the process instead of passing silently.
SANITIZE_FLAGS = ("-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                  "-fno-sanitize-recover=undefined")


def _built(sanitize: bool = False) -> Path:
    """The compiled library's path, compiling it first where needed; sanitize: with
    SANITIZE_FLAGS instead of -O2 (needs libasan preloaded into the process that loads it)."""
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source).hexdigest()[:16] + ("-asan" if sanitize else "")
    out = cache_dir() / "native" / f"piece_cache-{tag}-{platform.system().lower()}-{platform.machine()}.so"
    if out.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise OSError("no C compiler found (cc, gcc or clang on PATH, or CC)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:      # workers that compile at once each rename a whole file
        flags = SANITIZE_FLAGS if sanitize else ("-O2",)
        r = subprocess.run([*cc.split(), *flags, "-shared", "-fPIC", "-o", str(tmp), str(SOURCE)],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise OSError(f"{cc} failed on {SOURCE.name}: {(r.stderr or r.stdout).strip()[-500:]}")
    return out


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    sigs = {"pc_new": (p, [ctypes.c_char_p, ctypes.c_int, i64, p, p, p, p, i64, p, p, p]),
            "pc_free": (None, [p]), "pc_clear": (None, [p]), "pc_size": (i64, [p]),
            "pc_split": (i64, [p, ctypes.c_char_p, i64, p]), "pc_bpe": (i64, [p, ctypes.c_char_p, i64, p]),
            "pc_encode": (i64, [p, ctypes.c_char_p, p, i64, p, i32, p, i32, p, i64, p])}
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib
