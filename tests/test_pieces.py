"""prepare.pieces: the native (C) piece splitter, BPE and cache against the Python regex
path and the Rust `tokenizers` model they stand in for."""

import json
import pickle
import random
import shutil
import string

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import normalizers
from tokenizers.models import BPE

import prepare.pieces as pieces
from prepare.encoding import clear_piece_cache, encode_batch, encode_packed, piece_encoder
from tinyllama.errors import UserError
from prepare.pieces import (
    PieceEncoder,
    SplitRules,
    _NativeCache,
    normalize,
    split_rules,
)
from tinyllama.formats.tokenizer import Tokenizer

HAS_CC = any(shutil.which(c) for c in ("cc", "gcc", "clang"))
ALPHABET = list("abcXYZ019 \n\t.,!?'\"<>/()[]{}_-=+#@~`\\") + [
    "é", "ü", "ß", "中", "語", "🦙", "\u200b", "\r", "\u00a0", "  ", "    ", "<s>", "</s>", "▁", "▁▁", "def ",
    "self.", "return", "\x00", "\x7f", "ή", "\U0001f9d1\u200d\U0001f4bb", "http://x.y/s?q=1&r=<u>", "__init__"]


def _texts(n: int, seed: int = 0, longest: int = 60) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, longest))) for _ in range(n)]


def _real_texts() -> list[str]:
    import argparse
    import json as json_module
    return [open(m.__file__, encoding="utf-8").read() for m in (random, json_module, argparse, string)]


@pytest.fixture(scope="module")
def native(llama2_tokenizer):
    if not HAS_CC:
        pytest.skip("no C compiler here: the Python path is what runs")
    enc = piece_encoder(llama2_tokenizer)
    assert enc.native, "a C compiler is on PATH but the native piece cache did not load"
    return enc


@pytest.fixture(scope="module")
def python_path(llama2_tokenizer):
    return PieceEncoder(piece_encoder(llama2_tokenizer).rules, llama2_tokenizer.backend, native="off")


def test_native_cuts_exactly_where_the_regex_does(native, python_path):
    texts = _texts(3000) + _real_texts() + ["", " ", "▁", "\n", "x" * 3000, "a.b" * 500, "é." * 50]
    for text in texts:
        assert native.pieces(normalize(text)) == python_path.pieces(normalize(text)), repr(text)


def test_native_bpe_equals_the_rust_model_piece_for_piece(native, llama2_tokenizer):
    """Every distinct piece of real code and random text, plus long and byte-fallback ones."""
    model = llama2_tokenizer.backend.model
    distinct = {p for t in _texts(1500, seed=1) + _real_texts() for p in native.pieces(normalize(t))}
    distinct |= {"▁" * 40, "a" * 2000, "▁" + "ab" * 700, "\x00\x01", "🦙🦙", "▁中文語", "\U0010ffff", "▁▁▁def"}
    for piece in sorted(distinct):
        assert native._native.bpe(piece) == [t.id for t in model.tokenize(piece)], repr(piece)


def test_encode_packed_native_python_and_encode_agree(native, python_path, llama2_tokenizer):
    texts = _texts(400, seed=2) + _real_texts() + _real_texts() + ["", "\n\n\t  \n", "1234567890" * 50]
    native.clear()
    for head, tail in (([1], [2]), ([], []), ([1], [])):
        ids_n, len_n = native.encode_packed(texts, head, tail)
        ids_p, len_p = python_path.encode_packed(texts, head, tail)
        assert ids_n.dtype == np.dtype("<u2") and len_n.dtype == np.uint32
        assert np.array_equal(ids_n, ids_p) and np.array_equal(len_n, len_p)
    bounds = np.cumsum(np.concatenate([[0], len_n]))
    for k, text in enumerate(texts):
        assert ids_n[bounds[k]:bounds[k + 1]].tolist() == llama2_tokenizer.encode(text, bos=True, eos=False)


def test_a_full_cache_starts_again_with_the_same_ids(native, python_path, monkeypatch):
    texts = _texts(300, seed=3)
    expected = python_path.encode_packed(texts, [1], [2])
    monkeypatch.setattr(pieces, "CACHE_MAX", 50)
    for batch in (texts[:100], texts[100:], texts):     # each call after the first starts over
        ids, lengths = native.encode_packed(batch, [1], [2])
        ref = python_path.encode_packed(batch, [1], [2])
        assert np.array_equal(ids, ref[0]) and np.array_equal(lengths, ref[1])
        assert len(native._native) < 50 + sum(map(len, batch))
    assert np.array_equal(native.encode_packed(texts, [1], [2])[0], expected[0])


def _tiny_backend(merges: list[tuple[str, str]], chars: str, byte_fallback: bool) -> HFTokenizer:
    """A Llama-shaped tokenizer (prepend ▁, spaces to ▁, no pre-tokenizer) over a small BPE."""
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}} if byte_fallback else {"<unk>": 0}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    backend = HFTokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=byte_fallback,
                              fuse_unk=not byte_fallback))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    return backend


def _random_merges(rng: random.Random, chars: str, n: int) -> list[tuple[str, str]]:
    """Random merges over `chars`, some of them a second pair for a token that already exists
    (the case where a queued merge is expired but names the same token)."""
    tokens, merges = list(chars), []
    while len(merges) < n:
        a, b = rng.choice(tokens), rng.choice(tokens)
        if (a, b) not in merges and len(a + b) <= 6:
            merges.append((a, b))
            if a + b not in tokens:
                tokens.append(a + b)
    return merges


@pytest.mark.parametrize("seed", range(6))
def test_native_bpe_merge_order_on_random_models(seed):
    """The merge loop itself (ranks, leftmost first, expired entries, byte fallback) against
    the Rust model on random vocabularies, where Llama's would never reach the odd cases."""
    if not HAS_CC:
        pytest.skip("no C compiler here")
    rng = random.Random(seed)
    backend = _tiny_backend(_random_merges(rng, "abc", 40), "abc", byte_fallback=seed % 2 == 0)
    rules = SplitRules(letters=string.ascii_letters, safe="", alone="\n")
    cache = _NativeCache(pieces.library(), rules, json.loads(backend.to_str())["model"])
    for _ in range(800):
        piece = "".join(rng.choice("aaabbbccd") for _ in range(rng.randint(1, 30)))
        expected = [t.id for t in backend.model.tokenize(piece)]
        got = cache.bpe(piece)
        if seed % 2 == 0 or "d" not in piece:
            assert got == expected, piece
        else:
            assert got is None        # <unk>: the C loop declines, the Python path answers


def test_a_text_too_long_for_int32_takes_the_python_path(native, python_path, monkeypatch):
    texts = ["short one", "a longer text " * 10]
    monkeypatch.setattr(pieces, "MAX_TEXT_BYTES", 40)
    assert native._native.encode([normalize(t).encode() for t in texts], [1], [2]) is None
    ids, lengths = native.encode_packed(texts, [1], [2])
    ref = python_path.encode_packed(texts, [1], [2])
    assert np.array_equal(ids, ref[0]) and np.array_equal(lengths, ref[1])


def test_unknown_characters_without_byte_fallback_take_the_python_path():
    if not HAS_CC:
        pytest.skip("no C compiler here")
    backend = _tiny_backend([("▁", "a"), ("b", "c"), ("▁a", "bc")], "▁abc\n", byte_fallback=False)
    rules = split_rules(backend)
    assert rules is not None
    enc = PieceEncoder(rules, backend)
    assert enc.native
    texts = ["abc abc", "abx zz abc", "", "a\nb c"]
    ids, lengths = enc.encode_packed(texts, [], [])
    bounds = np.cumsum(np.concatenate([[0], lengths]))
    assert [ids[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])] == \
        [backend.encode(t, add_special_tokens=False).ids for t in texts]


def test_a_tokenizer_crosses_processes_without_its_cache(llama2_tokenizer):
    texts = _texts(50, seed=4)
    expected = encode_packed(llama2_tokenizer, texts)
    copy = pickle.loads(pickle.dumps(llama2_tokenizer))
    assert piece_encoder(copy) is not piece_encoder(llama2_tokenizer)     # built afresh where used
    ids, lengths = encode_packed(copy, texts)
    assert np.array_equal(ids, expected[0]) and np.array_equal(lengths, expected[1])


def test_native_mode_switch(monkeypatch, tmp_path, llama2_tokenizer):
    monkeypatch.setenv("TINYLLAMA_CACHE", str(tmp_path))       # nothing built here yet
    pieces.library.cache_clear()
    try:
        assert pieces.library("off") is None
        tok = Tokenizer.from_dir(llama2_tokenizer.source)
        assert not piece_encoder(tok, native="off").native
        assert piece_encoder(tok).mode == "off"                # kept: a later call without a mode reuses it
        pieces.library.cache_clear()

        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        with pytest.raises(UserError, match=r"--native on \(TINYLLAMA_NATIVE=1\) but the native piece cache cannot be used"):
            pieces.library("on")
        pieces.library.cache_clear()

        with pytest.warns(UserWarning, match="slower Python splitter"):
            assert pieces.library("auto") is None
        assert not list(tmp_path.rglob("*.so"))            # nothing half-built left behind
        pieces.library.cache_clear()

        with pytest.raises(UserError, match="native 'yes': expected auto, off, on"):
            pieces.library("yes")
    finally:
        pieces.library.cache_clear()


def test_native_mode_from_the_environment():
    """TINYLLAMA_NATIVE keeps its spellings (0, 1, auto), read once by the CLI (tinyllama.runtime)."""
    from tinyllama.runtime import RuntimeOptions

    assert [RuntimeOptions.from_env({"TINYLLAMA_NATIVE": v}).native for v in ("0", "1", "auto", "")] == \
        ["off", "on", "auto", "auto"]
    with pytest.raises(UserError, match="expected 0 .off., 1 .required. or auto"):
        RuntimeOptions.from_env({"TINYLLAMA_NATIVE": "yes"})


def test_compiled_once_per_source_version(monkeypatch, tmp_path):
    if not HAS_CC:
        pytest.skip("no C compiler here")
    monkeypatch.setenv("TINYLLAMA_CACHE", str(tmp_path))
    pieces.library.cache_clear()
    try:
        assert pieces.library() is not None
        built = list((tmp_path / "native").glob("piece_cache-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        pieces.library.cache_clear()
        assert pieces.library() is not None and built[0].stat().st_mtime_ns == stamp
    finally:
        pieces.library.cache_clear()


def test_threads_share_one_tokenizer(llama2_tokenizer):
    """ctypes lets go of the GIL during a C call: encoding from many threads at once must
    still give every text its own ids (the C cache is used under a lock)."""
    from concurrent.futures import ThreadPoolExecutor

    clear_piece_cache(llama2_tokenizer)
    texts = [t * 40 for t in _texts(64, seed=5)]
    expected = [llama2_tokenizer.encode(t) for t in texts]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda t: encode_batch(llama2_tokenizer, [t])[0], texts * 4))
    assert got == expected * 4
