import random

import pytest

from prepare.encoding import encode_batch, piece_encoder
from tinyllama import Tokenizer
from tinyllama.__main__ import main as cli_main
from tinyllama.paths import llama2_dir

KNOWN = [
    ("Hello world", [1, 15043, 3186]),
    (" Hello", [1, 29871, 15043]),          # a leading space stays a separate ▁ (ENVIRONMENT.md)
    ("   ", [1, 268]),                      # whitespace-only input: ▁ + three spaces
    ("\n", [1, 29871, 13]),
    ("", [1]),
]


@pytest.mark.parametrize("text, ids", KNOWN)
def test_known_ids(llama2_tokenizer, text, ids):
    assert llama2_tokenizer.encode(text) == ids


def test_special_ids_and_size(llama2_tokenizer):
    tok = llama2_tokenizer
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.unk_id) == (32000, 1, 2, 0)
    assert tok.encode("hi", bos=False, eos=True)[-1] == 2
    assert [tok.id_to_piece(i) for i in (0, 1, 2, 3, 259)] == ["<unk>", "<s>", "</s>", "<0x00>", "▁▁"]


def _llama_cpp_vectors():
    d = llama2_dir()
    texts = (d / "llama-spm-tests.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outs = (d / "llama-spm-tests.out").read_text(encoding="utf-8").split("\n")
    # The file ends with a separator, so the last split piece is empty on both sides.
    assert texts[-1] == "" and outs[-1] == ""
    return list(zip(texts[:-1], outs[:-1]))


def test_llama_cpp_reference_vectors(llama2_tokenizer):
    """llama.cpp's own tokenizer test vectors for this vocabulary (test-tokenizer-0)."""
    cases = _llama_cpp_vectors()
    assert len(cases) >= 40
    failures = [(t, o, llama2_tokenizer.encode(t, bos=False)) for t, o in cases
                if llama2_tokenizer.encode(t, bos=False) != [int(x) for x in o.split()]]
    assert not failures


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abcdefXYZ019 \n\t.,!?'\"<>/()[]{}_-=+#") + [
        "é", "ü", "ß", "ñ", "中", "文", "語", "🦙", "😀", "\u200b", "\r", "\u00a0", "  ", "<s>", "</s>", "<unk>",
        "▁", "def ", "return", "\x00", "\x7f", "ё", "ή", "\U0001f9d1\u200d\U0001f4bb"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 48))) for _ in range(n)]


@pytest.mark.llamacpp
def test_ids_identical_to_llama_cpp(llama2_tokenizer):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by make setup")
    llm = llama_cpp.Llama(model_path=str(llama2_dir() / "ggml-vocab-llama-spm.gguf"), vocab_only=True, verbose=False)
    try:
        texts = _random_texts(1500) + [t for t, _ in _llama_cpp_vectors()] + [
            open(random.__file__, encoding="utf-8").read()[:20000],   # real Python source
            "Ünïcödé façade — naïve café, 東京, Москва, مرحبا, 🙂🙃\n\n\tindented\n",
        ]
        for text in texts:
            assert llama2_tokenizer.encode(text, bos=False) == llm.tokenize(text.encode(), add_bos=False, special=False), text
    finally:
        llm.close()


def test_special_tokens_in_text_are_text(llama2_tokenizer):
    ids = llama2_tokenizer.encode("</s>", bos=False)
    assert 2 not in ids and len(ids) > 1


def test_batch_equals_single(llama2_tokenizer):
    """Data preparation's piece cache (prepare.encoding) must give exactly the reference encoder's ids."""
    import json as json_module

    real = [open(m.__file__, encoding="utf-8").read() for m in (random, json_module, pytest)]
    texts = _random_texts(200, seed=1) + real + real + ["x" * 5000, "1234567890" * 50, "\n\n\t  \n", ""]
    assert encode_batch(llama2_tokenizer, texts) == [llama2_tokenizer.encode(t) for t in texts]
    assert encode_batch(llama2_tokenizer, texts, bos=False, eos=True)[0][-1] == 2


def test_safe_cuts_between_letters_and_marks(llama2_tokenizer):
    """The splitter cuts between ASCII letters and the punctuation that never touches a letter
    in a piece; where a mark does (</s>, 's>, /s), or a non-ASCII letter is next, it must not."""
    cut = piece_encoder(llama2_tokenizer).pieces
    assert cut("▁self.assertEqual(x,") == ["▁self", ".", "assertEqual", "(", "x", ","]
    assert cut("▁</s>") == ["▁</s>"] and cut("▁naïve.") == ["▁naïve."]
    texts = ["</s> <s> <unk> a/s b<s c<u k> s> http://x.y/s?q=1&r=<u>", "naïve.café,über(é)ñ[ß]", "it's 'quoted' \"x\"",
             "x->y <=> a<b>c a_b__c __init__ self._x.y_z() #!/usr/bin/env", "«guillemets».”quote”, ‘x’"]
    texts += ["".join(random.Random(i).choice("aZ/<>'.,_(é東 ") for _ in range(200)) for i in range(300)]
    assert encode_batch(llama2_tokenizer, texts) == [llama2_tokenizer.encode(t) for t in texts]


@pytest.mark.parametrize("text", ["Hello world", "  two leading spaces", "def f(x):\n    return x ** 2\n",
                                  "naïve 東京 🦙", "byte fallback: \x01\x02"])
def test_decode_round_trip(llama2_tokenizer, text):
    assert llama2_tokenizer.decode(llama2_tokenizer.encode(text)) == text


def test_saved_directory_loads_in_transformers(llama2_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    llama2_tokenizer.save(tmp_path)
    ours = Tokenizer.from_dir(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ["Hello world", " Hello", "   ", "naïve 東京 🦙\n\nx", "def f():\n\treturn 1"]:
        assert ours.encode(text) == llama2_tokenizer.encode(text) == hf(text)["input_ids"]
    assert ours.fingerprint == llama2_tokenizer.fingerprint
    assert (hf.bos_token_id, hf.eos_token_id, len(hf)) == (1, 2, 32000)


def test_from_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Tokenizer.from_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: not a valid tokenizers file"):
        Tokenizer.from_dir(tmp_path)


def test_encode_rejects_non_text(llama2_tokenizer):
    with pytest.raises(TypeError, match="takes a str"):
        llama2_tokenizer.encode(b"bytes")


def test_build_cli_is_atomic_and_clear(tmp_path, capsys):
    out = tmp_path / "tok"
    assert cli_main(["tokenizer", "build", "--gguf", str(llama2_dir() / "ggml-vocab-llama-spm.gguf"), "--out", str(out)]) == 0
    assert Tokenizer.from_dir(out).encode("Hello world") == [1, 15043, 3186]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    assert cli_main(["tokenizer", "build", "--gguf", str(bad), "--out", str(tmp_path / "tok2")]) == 2
    assert "bad.gguf" in capsys.readouterr().err
    assert not (tmp_path / "tok2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".build-")]


def test_sentencepiece_model_gives_the_same_ids(llama2_tokenizer):
    """The tokenizer.model written beside tokenizer.json is the same vocabulary for SentencePiece."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(llama2_dir() / "tokenizer.model"))
    assert sp.vocab_size() == 32000 and (sp.bos_id(), sp.eos_id(), sp.unk_id()) == (1, 2, 0)
    for text in _random_texts(500, seed=7) + [t for t, _ in _llama_cpp_vectors()]:
        assert sp.encode(text) == llama2_tokenizer.encode(text, bos=False), text


def test_save_carries_tokenizer_model(llama2_tokenizer, tmp_path):
    llama2_tokenizer.save(tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == (llama2_dir() / "tokenizer.model").read_bytes()


def test_directory_with_only_tokenizer_model(llama2_tokenizer, tmp_path):
    """Some Llama repositories ship only SentencePiece's tokenizer.model: same ids."""
    import shutil

    shutil.copy(llama2_dir() / "tokenizer.model", tmp_path / "tokenizer.model")
    tok = Tokenizer.from_dir(tmp_path)
    for text in _random_texts(300, seed=11):
        assert tok.encode(text) == llama2_tokenizer.encode(text)
    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="tokenizer.model: not a SentencePiece model"):
        Tokenizer.from_dir(tmp_path)
