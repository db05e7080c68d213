"""The native piece cache (prepare/piece_cache.c) fuzzed against its Python twin and the Rust
BPE model: random texts over the whole Unicode range, long texts, random vocabularies.

    python tests/piece_cache_fuzz.py --rounds 200              # the library as data preparation loads it
    python tests/piece_cache_fuzz.py --sanitized --rounds 50   # built with -fsanitize=address,undefined
                                                               # (run with libasan in LD_PRELOAD)

Exits 1 naming the first text on which the native path differs; a sanitizer stops the process
itself on any memory error or undefined behaviour. Used by tests/test_piece_cache_safety.py.
"""

from __future__ import annotations

import argparse
import ctypes
import random
import string
import sys
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import normalizers
from tokenizers.models import BPE

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import prepare.pieces as pieces  # noqa: E402
from prepare.pieces import PieceEncoder, split_rules  # noqa: E402

# a bias towards what the splitter treats specially: ASCII classes, ▁, spaces, newlines, marks
COMMON = list(string.printable) + ["▁", "  ", "\n\n", "</s>", "<s>", "é", "中", "🦙", "\u200b", "\u00a0"]


def random_char(rng: random.Random) -> str:
    """Any Unicode scalar value (surrogates excluded: they are not text); ASCII half the time."""
    if rng.random() < 0.5:
        return rng.choice(COMMON)
    while True:
        code = rng.choice((rng.randrange(0x80, 0x800), rng.randrange(0x800, 0x10000), rng.randrange(0x10000, 0x110000)))
        if not 0xD800 <= code <= 0xDFFF:
            return chr(code)


def random_texts(rng: random.Random, n: int, longest: int) -> list[str]:
    return ["".join(random_char(rng) for _ in range(rng.randint(0, longest))) for _ in range(n)]


def random_backend(rng: random.Random) -> HFTokenizer:
    """A Llama-shaped tokenizer (prepend ▁, spaces to ▁, byte fallback) over a random vocabulary:
    a random alphabet, ASCII and not, and random merges of up to 8 characters."""
    chars = "".join(dict.fromkeys(["▁", *rng.sample(string.ascii_letters + string.punctuation, 20),
                                   *(random_char(rng) for _ in range(12))]))
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tokens, merges = list(chars), []
    for _ in range(rng.randint(20, 120)):
        a, b = rng.choice(tokens), rng.choice(tokens)
        # "▁" only leads a piece (Llama's vocabularies; split_rules declines any other kind)
        if (a, b) not in merges and len(a + b) <= 8 and "▁" not in (a + b).lstrip("▁"):
            merges.append((a, b))
            if a + b not in vocab:
                vocab[a + b] = len(vocab)
                tokens.append(a + b)
    backend = HFTokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    return backend


def check(backend: HFTokenizer, texts: list[str], label: str) -> None:
    """Native, Python and the Rust encoder give the same ids for every text."""
    rules = split_rules(backend)
    assert rules is not None, f"{label}: not a vocabulary the splitter takes"
    native, python = PieceEncoder(rules, backend), PieceEncoder(rules, backend, native="off")
    assert native.native, "the native library did not load"
    ids_n, len_n = native.encode_packed(texts, [1], [2])
    ids_p, len_p = python.encode_packed(texts, [1], [2])
    if np.array_equal(ids_n, ids_p) and np.array_equal(len_n, len_p):
        return
    bounds = np.cumsum(np.concatenate([[0], len_n]))
    for text, (a, b) in zip(texts, zip(bounds[:-1], bounds[1:])):
        want = [1, *backend.encode(text, add_special_tokens=False).ids, 2]
        if ids_n[a:b].tolist() != want:
            sys.exit(f"{label}: native ids differ on {text!r}")
    sys.exit(f"{label}: native and Python lengths differ")


def llama2_backend() -> HFTokenizer:
    from tinyllama.formats.tokenizer import Tokenizer
    return Tokenizer.llama2().backend


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=100, help="random vocabularies (and text batches) to try")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sanitized", action="store_true", help="load the -fsanitize=address,undefined build")
    args = ap.parse_args(argv)
    if args.sanitized:
        lib = pieces._declare(ctypes.CDLL(str(pieces._built(sanitize=True))))
        # every PieceEncoder below loads the sanitized build (the Python one, native "off", none)
        pieces.library = lambda mode="auto": None if mode == "off" else lib
    rng = random.Random(args.seed)
    llama = llama2_backend()
    for i in range(args.rounds):
        check(random_backend(rng), random_texts(rng, 20, 200), f"random vocabulary {i} (seed {args.seed})")
        check(llama, random_texts(rng, 8, 400) + random_texts(rng, 1, 20_000), f"Llama-2 round {i}")
    print(f"{args.rounds} rounds: native == Python == Rust")
    return 0


if __name__ == "__main__":
    sys.exit(main())
