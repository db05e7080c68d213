"""Byte-level BPE vocabularies (GPT-2 style: SmolLM2, Llama-3, Qwen2, StarCoder) read from a GGUF,
held to llama.cpp: its own tokenizer test vectors for each pre-tokenizer family (the vocabulary
files and vectors llama.cpp ships in models/, from the llama-cpp-python sdist), its live
tokenizer on random text, and transformers on the directory we save."""

from __future__ import annotations

import random
import tarfile

import pytest

from tinyllama.errors import UserError
from tinyllama.paths import LLAMA_CPP_VERSION, default_sdist
from tinyllama.formats.tokenizer import Tokenizer

# llama.cpp's vocabulary files, by the pre-tokenizer family they test (tokenizer.ggml.pre). Qwen2's
# and Command-R's pass too (46 of 46 vectors each) but take 10-15 s each to read with gguf-py.
FAMILIES = ("gpt-2", "llama-bpe", "starcoder", "refact", "mpt")
LIVE = ("gpt-2", "llama-bpe", "starcoder")                  # also against llama.cpp's live tokenizer
REFUSED = ("deepseek-coder", "bert-bge")                    # a pre-tokenizer, a tokenizer model not read here


@pytest.fixture(scope="session")
def vocab_dir(tmp_path_factory):
    """models/ggml-vocab-*.gguf (+ .inp/.out test vectors) out of the sdist set-up downloaded."""
    sdist = default_sdist()
    if not sdist.is_file():
        pytest.skip(f"{sdist}: the llama-cpp-python sdist is not downloaded (make setup)")
    out = tmp_path_factory.mktemp("vocabs")
    prefix = f"llama_cpp_python-{LLAMA_CPP_VERSION}/vendor/llama.cpp/models/ggml-vocab-"
    wanted = {f"{prefix}{name}.gguf{ext}" for name in FAMILIES + REFUSED for ext in ("", ".inp", ".out")}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            if member.name in wanted:
                (out / member.name.rsplit("/", 1)[-1]).write_bytes(tar.extractfile(member).read())
    return out


@pytest.fixture(scope="session")
def tokenizers(vocab_dir):
    return {name: Tokenizer.from_gguf_vocab(vocab_dir / f"ggml-vocab-{name}.gguf") for name in FAMILIES}


def _vectors(vocab_dir, name: str) -> list[tuple[str, list[int]]]:
    texts = (vocab_dir / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outs = (vocab_dir / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    assert texts[-1] == "" and outs[-1] == ""       # each file ends with a separator
    return [(t, [int(x) for x in o.split()]) for t, o in zip(texts[:-1], outs[:-1])]


@pytest.mark.parametrize("name", FAMILIES)
def test_llama_cpp_reference_vectors(vocab_dir, tokenizers, name):
    """llama.cpp's test-tokenizer-0 vectors: whitespace runs, digits, contractions, code, emoji,
    scripts that need no spaces; MPT's space-run tokens are user-defined tokens matched in text."""
    cases = _vectors(vocab_dir, name)
    assert len(cases) >= 40
    tok = tokenizers[name]
    failures = [(t, ids, tok.encode(t, bos=False)) for t, ids in cases if tok.encode(t, bos=False) != ids]
    assert not failures


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abcXYZ019 \n\t.,!?'\"<>/()[]{}_-=+#") + [
        "é", "ß", "中", "語", "🦙", "\u200b", "\r\n", "\u00a0", "   ", "'s", "'LL", "1234567", "<|im_start|>",
        "<|endoftext|>", "</s>", "def ", "return", "\x00", "ё", "\U0001f9d1\u200d\U0001f4bb", "  \n"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(n)]


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", LIVE)
def test_ids_and_text_identical_to_llama_cpp(vocab_dir, tokenizers, name):
    """Random text with special-token strings in it (text, not control tokens, as llama.cpp's
    parse_special=False), and real Python source; decoding gives the text back."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by make setup")
    llm = llama_cpp.Llama(model_path=str(vocab_dir / f"ggml-vocab-{name}.gguf"), vocab_only=True, verbose=False)
    tok = tokenizers[name]
    try:
        for text in random_texts(300) + [open(random.__file__, encoding="utf-8").read()[:8000]]:
            ids = tok.encode(text, bos=False)
            assert ids == llm.tokenize(text.encode(), add_bos=False, special=False), text
            assert tok.decode(ids) == text
    finally:
        llm.close()


def test_bos_and_specials_come_from_the_file(tokenizers):
    """add_bos_token as llama.cpp reads it (Llama-3's family adds BOS, GPT-2's and StarCoder's
    do not); encode() follows it unless told; control tokens decode away, as in llama.cpp."""
    llama3, star = tokenizers["llama-bpe"], tokenizers["starcoder"]
    assert llama3.add_bos and llama3.encode("Hi")[0] == llama3.bos_id == 128000
    assert not star.add_bos and star.encode("Hi") == star.encode("Hi", bos=False)
    assert star.encode("Hi", bos=True)[0] == star.bos_id
    assert llama3.vocab_size == 128256 and tokenizers["mpt"].vocab_size == 50432    # no 32000 assumed
    eot = llama3.backend.token_to_id("<|eot_id|>")
    assert llama3.decode([eot] + llama3.encode("ok", bos=False)) == "ok"


@pytest.mark.parametrize("name", ["llama-bpe", "starcoder"])
def test_saved_directory_gives_the_same_ids_here_and_in_transformers(tokenizers, tmp_path, name):
    from transformers import AutoTokenizer

    tok = tokenizers[name]
    tok.save(tmp_path)
    again, hf = Tokenizer.from_dir(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    assert again.add_bos == tok.add_bos
    for text in random_texts(100, seed=1):
        ids = tok.encode(text)
        assert again.encode(text) == ids
        assert hf(text, split_special_tokens=True)["input_ids"] == ids, text


def test_vocabularies_not_read_here_are_named(vocab_dir):
    with pytest.raises(UserError, match="tokenizer.ggml.pre is 'deepseek-coder', a byte-level pre-tokenizer not "
                                        "known here"):
        Tokenizer.from_gguf_vocab(vocab_dir / "ggml-vocab-deepseek-coder.gguf")
    with pytest.raises(UserError, match="tokenizer.ggml.model is 'bert'; the vocabularies read here are 'llama'"):
        Tokenizer.from_gguf_vocab(vocab_dir / "ggml-vocab-bert-bge.gguf")


@pytest.mark.llamacpp
@pytest.mark.parametrize("name, pre", [("llama-bpe", "llama3"), ("starcoder", "smollm")])
def test_a_byte_level_checkpoint_exports_to_a_gguf_llama_cpp_reads_alike(tokenizers, tmp_path, name, pre):
    """quantize.export on a checkpoint with a byte-level vocabulary: tokenizer.ggml.model gpt2,
    the pre-tokenizer family by its llama.cpp name, the merges and token types as read, tied
    embeddings written once; llama.cpp then tokenizes as we do and computes our logits."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by make setup")
    import torch

    from quantize.export import write_gguf
    from tinyllama import Llama, ModelConfig, save_checkpoint
    from tinyllama.formats.gguf_file import open_gguf, read_gguf_vocab

    tok = tokenizers[name]
    cfg = ModelConfig(name=f"tiny-{name}", n_layer=1, d_model=64, n_head=2, n_kv_head=1, ffn_dim=96,
                      vocab_size=tok.vocab_size, max_seq_len=128, tie_embeddings=True,
                      bos_id=tok.bos_id, eos_id=tok.eos_id)
    torch.manual_seed(0)
    model = Llama(cfg).eval()
    save_checkpoint(model, tok, tmp_path / "ckpt")
    gguf_path = write_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", "f32")
    reader = open_gguf(gguf_path)
    vocab = read_gguf_vocab(gguf_path, reader)
    assert (vocab.model, vocab.pre, vocab.add_bos) == ("gpt2", pre, tok.add_bos)
    assert "output.weight" not in {t.name for t in reader.tensors}
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=128, logits_all=True, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)    # F32 throughout
    try:
        for text in random_texts(60, seed=2):
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text, bos=False), text
        ids = tok.encode("def add(a, b):\n    return a + b  # 42", bos=False)
        llm.eval(ids)
        theirs = torch.tensor(llm.scores[:len(ids)])
    finally:
        llm.close()
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([ids]))[0], theirs, rtol=0, atol=1e-3)


@pytest.mark.slow
def test_a_llama_3_vocabulary_runs_end_to_end_in_uint32_shards(tokenizers, tmp_path):
    """128,256 ids do not fit uint16: shards are uint32, their ids equal encode's, and continued
    pretraining and perplexity run on them from a checkpoint with that vocabulary."""
    import json

    import numpy as np
    import torch

    from evaluation.perplexity import perplexity
    from pretrain.config import TrainConfig
    from prepare.prepare import PrepareConfig, prepare
    from tinyllama.formats.shards import PackedSource
    from pretrain.train import train
    from tinyllama.inference.backends import load_backend
    from tinyllama.formats.checkpoint import save_checkpoint
    from tinyllama.model.config import ModelConfig
    from tinyllama.model.model import Llama

    tok = tokenizers["llama-bpe"]
    texts = [f"Привет, как дела? Grüße aus München, 日本語のテキスト {i}. def f(x): return x * {i}" for i in range(40)]
    assert max(tok.encode(texts[0])) > 65535
    torch.manual_seed(0)
    save_checkpoint(Llama(ModelConfig.from_name("tinyllama-debug").replace(vocab_size=tok.vocab_size)), tok,
                    tmp_path / "base")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    manifest = prepare(PrepareConfig(source=str(tmp_path / "d.jsonl"), out=tmp_path / "tokens", workers=1,
                                     tokenizer_dir=tmp_path / "base", val_fraction=0.2, progress=False))
    assert manifest["dtype"] == "uint32"
    src = PackedSource(tmp_path / "tokens", split="train", verify=True)
    train_texts = [t for i, t in enumerate(texts) if i % 5 != 2]          # one in five is held out
    expected = np.concatenate([tok.encode(t) + [tok.eos_id] for t in train_texts])
    assert np.array_equal(src.read(0, src.tokens), expected)

    result = train(TrainConfig(init_from=str(tmp_path / "base"), data={"natural": str(tmp_path / "tokens")},
                               weights={"natural": 1.0}, seq_len=32, micro_batch=2, global_batch_tokens=64,
                               max_steps=2, warmup_steps=1, dtype="float32", out=str(tmp_path / "run"),
                               save_every=0, eval_every=0, log_every=1, sample_tokens=0, tensorboard=False,
                               progress=False))
    assert np.isfinite(result["loss"])
    backend, run_tok = load_backend(tmp_path / "run" / "final", dtype="float32")
    assert run_tok.vocab_size == 128256 and run_tok.fingerprint == tok.fingerprint
    ppl, n = perplexity(backend, tmp_path / "tokens", seq_len=16, max_blocks=4, tokenizer=run_tok)
    assert n > 0 and 1 < ppl < float("inf")


def test_a_model_built_from_scratch_takes_another_models_vocabulary(tokenizers, tmp_path):
    """A draft for a target: pretraining from scratch with config field tokenizer builds the preset
    in the target's vocabulary, special ids and chat template, tied where asked, and its
    checkpoint loads with the target's tokenizer."""
    import json

    import numpy as np
    import torch

    from prepare.prepare import PrepareConfig, prepare
    from pretrain.config import ConfigError, TrainConfig
    from pretrain.train import train
    from tinyllama.formats.checkpoint import load_checkpoint

    target = tokenizers["starcoder"].with_template("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}")
    target.save(tmp_path / "target")
    texts = [f"def f{i}(x):\n    return x * {i}  # Grüße {i}" for i in range(30)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prepare(PrepareConfig(source=str(tmp_path / "d.jsonl"), out=tmp_path / "tokens", workers=1,
                          tokenizer_dir=tmp_path / "target", val_fraction=0.2, progress=False))
    cfg = dict(preset="tinyllama-debug", data={"code": str(tmp_path / "tokens")}, weights={"code": 1.0},
               seq_len=32, micro_batch=2, global_batch_tokens=64, max_steps=2, warmup_steps=1, dtype="float32",
               out=str(tmp_path / "run"), save_every=0, eval_every=0, log_every=1, sample_tokens=0,
               tensorboard=False, progress=False)
    result = train(TrainConfig(tokenizer=str(tmp_path / "target"), tie_embeddings=True, **cfg))
    assert np.isfinite(result["loss"])

    model, tok = load_checkpoint(tmp_path / "run" / "final")
    assert model.config.vocab_size == target.vocab_size == 49152 and model.config.tie_embeddings
    assert (model.config.bos_id, model.config.eos_id) == (target.bos_id, target.eos_id)
    assert tok.fingerprint == target.fingerprint and tok.chat_template == target.chat_template
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    # embeddings_from: the draft starts from the (projected) table of a model in that vocabulary
    from pretrain.train import projected_embeddings
    from tinyllama.formats.checkpoint import save_checkpoint
    from tinyllama.model.config import ModelConfig
    from tinyllama.model.model import Llama

    save_checkpoint(Llama(ModelConfig.from_name("tinyllama-debug").replace(vocab_size=target.vocab_size, d_model=128,
                                                                            ffn_dim=256)), target, tmp_path / "big")
    train(TrainConfig(tokenizer=str(tmp_path / "target"), embeddings_from=str(tmp_path / "big"),
                      **{**cfg, "out": str(tmp_path / "run-e"), "lr": 1e-7, "min_lr": 0.0}))
    started, _ = load_checkpoint(tmp_path / "run-e" / "final")
    expected = projected_embeddings(str(tmp_path / "big"), started.config)
    torch.testing.assert_close(started.model.embed_tokens.weight, expected, rtol=0, atol=1e-4)

    with pytest.raises(ConfigError, match="config field tokenizer: only for a model built from scratch"):
        TrainConfig(init_from=str(tmp_path / "run" / "final"), tokenizer=str(tmp_path / "target"), **cfg).validate()
    with pytest.raises(ConfigError, match="config field tokenizer:.*nope"):
        train(TrainConfig(tokenizer=str(tmp_path / "nope"), **{**cfg, "out": str(tmp_path / "run2")}))


@pytest.mark.parametrize("name", ("gpt-2", "llama-bpe"))
def test_text_stream_equals_decoding_the_whole_reply(tokenizers, name):
    """A byte-level vocabulary streamed token by token (each byte its own token where a
    character is split) gives the text decoding all the ids at once gives."""
    from tests.test_serve import check_stream_is_the_whole_decode

    tok, rng = tokenizers[name], random.Random(1)
    ids = list(range(300)) + [rng.randrange(tok.vocab_size) for _ in range(3000)]
    ids = [i for i in ids if i not in set(tok.stop_ids) | {tok.bos_id}]
    check_stream_is_the_whole_decode(tok, [tok.encode(t, bos=False) for t in random_texts(100, seed=3)]
                                     + [rng.choices(ids, k=rng.randint(1, 60)) for _ in range(150)])
