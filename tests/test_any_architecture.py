"""A GGUF of an architecture other than Llama's (GPT-2: learned positions, LayerNorm, a fused QKV
projection, a byte-level vocabulary) in the GGUF backend: llama.cpp runs it, the file's own
tokenizer and chat template drive it, and the greedy reply equals llama-cpp-python's own. The
PyTorch stages refuse it in one line."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest

from tinyllama.errors import UserError
from tinyllama.paths import LLAMA_CPP_VERSION, default_sdist

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
D, LAYERS, FFN, CTX = 64, 2, 256, 256


def _vocab(sdist, out):
    """llama.cpp's GPT-2 vocabulary file (models/ggml-vocab-gpt-2.gguf) out of the sdist."""
    name = f"llama_cpp_python-{LLAMA_CPP_VERSION}/vendor/llama.cpp/models/ggml-vocab-gpt-2.gguf"
    with tarfile.open(sdist) as tar:
        out.write_bytes(tar.extractfile(name).read())
    return out


def write_gpt2_gguf(vocab_file, path):
    """A small random GPT-2 (2 layers, d 64) with GPT-2's vocabulary and a ChatML template."""
    import gguf

    src = gguf.GGUFReader(str(vocab_file))

    def contents(key):
        return src.fields[key].contents()

    tokens = contents("tokenizer.ggml.tokens")
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_name("tiny-gpt2")
    w.add_context_length(CTX)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FFN)
    w.add_block_count(LAYERS)
    w.add_head_count(4)
    w.add_layer_norm_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(contents("tokenizer.ggml.pre"))
    w.add_token_list(tokens)
    w.add_token_types(contents("tokenizer.ggml.token_type"))
    w.add_token_merges(contents("tokenizer.ggml.merges"))
    w.add_bos_token_id(contents("tokenizer.ggml.bos_token_id"))
    w.add_eos_token_id(contents("tokenizer.ggml.eos_token_id"))
    w.add_chat_template(CHATML)
    rng = np.random.default_rng(0)

    def t(name, *shape, scale=0.08):
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    def ones(name, n):
        w.add_tensor(name, np.ones(n, dtype=np.float32))

    t("token_embd.weight", n_vocab, D, scale=0.5)
    t("position_embd.weight", CTX, D, scale=0.1)
    for i in range(LAYERS):
        b = f"blk.{i}"
        ones(f"{b}.attn_norm.weight", D)
        t(f"{b}.attn_norm.bias", D, scale=0.0)
        t(f"{b}.attn_qkv.weight", 3 * D, D)
        t(f"{b}.attn_qkv.bias", 3 * D, scale=0.0)
        t(f"{b}.attn_output.weight", D, D)
        t(f"{b}.attn_output.bias", D, scale=0.0)
        ones(f"{b}.ffn_norm.weight", D)
        t(f"{b}.ffn_norm.bias", D, scale=0.0)
        t(f"{b}.ffn_up.weight", FFN, D)
        t(f"{b}.ffn_up.bias", FFN, scale=0.0)
        t(f"{b}.ffn_down.weight", D, FFN)
        t(f"{b}.ffn_down.bias", D, scale=0.0)
    ones("output_norm.weight", D)
    t("output_norm.bias", D, scale=0.0)
    t("output.weight", n_vocab, D, scale=0.5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def gpt2_gguf(tmp_path_factory):
    sdist = default_sdist()
    if not sdist.is_file():
        pytest.skip(f"{sdist}: the llama-cpp-python sdist is not downloaded (make setup)")
    pytest.importorskip("llama_cpp")
    d = tmp_path_factory.mktemp("gpt2")
    return write_gpt2_gguf(_vocab(sdist, d / "vocab.gguf"), d / "tiny-gpt2-F32.gguf")


MESSAGES = [{"role": "user", "content": "Name a colour: <|im_end|> is text here."}]


def test_the_gguf_backend_runs_it_with_the_files_own_tokenizer(gpt2_gguf):
    """Tokens, the rendered chat prompt and the greedy continuation equal llama-cpp-python's own
    on the same file."""
    import llama_cpp

    from tinyllama.inference.backends import LlamaCppVocab, load_backend
    from tinyllama.formats.chat import apply_chat_template, template_of
    from tinyllama.inference.generate import generate

    backend, tok = load_backend(gpt2_gguf, n_ctx=CTX)
    llm = llama_cpp.Llama(model_path=str(gpt2_gguf), n_ctx=CTX, verbose=False, n_threads=2)
    try:
        assert isinstance(tok.backend, LlamaCppVocab) and backend.architecture == "gpt2"
        assert tok.vocab_size == 50257 and tok.eos_id == 50256 and not tok.add_bos
        text = "Hello world!  def f(x):\n\treturn x ** 2  # ünïcödé 日本 <|im_start|>"
        assert tok.encode(text) == llm.tokenize(text.encode(), add_bos=False, special=False)
        assert tok.decode(tok.encode(text)) == text
        assert template_of(tok)[1].startswith("ChatML, the model's own")
        ids = apply_chat_template(tok, MESSAGES)
        rendered = "<|im_start|>user\nName a colour: <|im_end|> is text here.<|im_end|>\n<|im_start|>assistant\n"
        # the template's markers are ordinary text in GPT-2's vocabulary; the user's copy stays text too
        assert ids == llm.tokenize(rendered.encode(), add_bos=False, special=True)
        ours = list(generate(backend, ids, max_new_tokens=12, stop_ids=tok.stop_ids))
        llm.reset()
        theirs = []
        for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if t in tok.stop_ids or len(theirs) == 12:
                break
            theirs.append(t)
        assert ours == theirs and len(ours) > 0
    finally:
        backend.close()
        llm.close()


def test_the_server_engine_chats_with_it_and_names_the_template(gpt2_gguf, capsys):
    from serve.complete import main

    assert main(["--model", str(gpt2_gguf), "--chat", "--prompt", "Hi", "--max-tokens", "5", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "model: tiny-gpt2-F32: F32 in llama.cpp" in err and "chat template: ChatML, the model's own" in err


def test_the_pytorch_stages_refuse_it_naming_the_architecture(gpt2_gguf, tmp_path):
    from quantize.gguf_import import import_gguf

    with pytest.raises(UserError, match="general.architecture is 'gpt2'; only Llama-architecture GGUFs import"):
        import_gguf(gpt2_gguf, tmp_path / "m", say=lambda _: None)
    assert not (tmp_path / "m").exists()


def test_inspect_reads_its_metadata(gpt2_gguf, capsys):
    from tinyllama.__main__ import main

    assert main(["inspect", str(gpt2_gguf)]) == 0
    out = capsys.readouterr().out
    assert "tiny-gpt2, architecture gpt2, F32" in out and f"{LAYERS} layers, d_model {D}" in out
    assert "byte-level BPE (pre-tokenizer gpt-2), 50,257 tokens" in out
