"""GGUF export through llama.cpp's own tools, verified against the PyTorch model."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyllama import Llama, ModelConfig, save_checkpoint

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by make setup")

from quantize.export import ExportError, permute_for_llama_cpp, quantize_gguf, write_gguf  # noqa: E402
from quantize.verify import SAMPLE_TEXT, verify_gguf  # noqa: E402
from tinyllama.formats.gguf_file import read_metadata  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}<|assistant|>\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, llama2_tokenizer):
    """A small model (d_model 256, so k-quants apply) trained for a few seconds on Python's
    help texts, so that its next-token distributions are peaked like a real model's and
    quantization error shows up as lost top-1 agreement, not as ties flipping. With a chat
    template, to check it reaches the GGUF."""
    from pydoc_data.topics import topics

    torch.manual_seed(0)
    cfg = ModelConfig(name="gguf-test", n_layer=2, d_model=256, n_head=4, n_kv_head=2, ffn_dim=512, max_seq_len=256)
    model = Llama(cfg)
    ids = torch.tensor([i for _, t in sorted(topics.items())[:40] for i in llama2_tokenizer.encode(t)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=g)
        batch = torch.stack([ids[s:s + 65] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    d = tmp_path_factory.mktemp("gguf") / "model"
    llama2_tokenizer.chat_template = TEMPLATE
    try:
        save_checkpoint(model, llama2_tokenizer, d)
    finally:
        llama2_tokenizer.chat_template = None
    return d, model.eval()


@pytest.fixture(scope="module")
def f32_file(model_dir, tmp_path_factory):
    return write_gguf(model_dir[0], tmp_path_factory.mktemp("f32") / "m-F32.gguf", "f32")


def test_permutation_matches_llama_cpps_converter():
    w = np.arange(4 * 8 * 3).reshape(4 * 8, 3)      # 4 heads of head_dim 8
    p = permute_for_llama_cpp(w, 4)
    # head 0, original rows 0..7 = [first half 0..3 | second half 4..7] -> interleaved 0,4,1,5,...
    assert p[:8, 0].tolist() == [0, 12, 3, 15, 6, 18, 9, 21]


def test_f32_logits_match_pytorch(model_dir, f32_file, llama2_tokenizer):
    report = verify_gguf(f32_file, model_dir[1], llama2_tokenizer)
    assert report.tokenization_equal
    assert report.max_abs_diff < 1e-3
    assert report.top1_agreement == 1.0
    assert report.ppl_gguf == pytest.approx(report.ppl_torch, rel=1e-3)


def test_metadata_round_trips(model_dir, f32_file, llama2_tokenizer):
    meta = read_metadata(f32_file)
    cfg = model_dir[1].config
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == cfg.n_layer and meta["llama.embedding_length"] == cfg.d_model
    assert meta["llama.attention.head_count"] == 4 and meta["llama.attention.head_count_kv"] == 2
    assert meta["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert meta["llama.context_length"] == 256
    assert meta["tokenizer.ggml.model"] == "llama"
    assert len(meta["tokenizer.ggml.tokens"]) == 32000 and meta["tokenizer.ggml.tokens"][15043] == "▁Hello"
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert meta["tokenizer.chat_template"] == TEMPLATE
    assert meta["_tensors"]["blk.0.attn_q.weight"] == "F32"


@pytest.mark.parametrize("qtype, max_top1_loss, max_rank", [("q8_0", 0.03, 0), ("q4_k_m", 0.1, 2), ("q4_0", 0.15, 2)])
def test_quantized_types_load_generate_and_agree(model_dir, f32_file, llama2_tokenizer, tmp_path, qtype, max_top1_loss,
                                                 max_rank):
    """Each quantized file loads in llama.cpp, and llama.cpp's own greedy continuation is what the
    PyTorch model would pick: token for token for q8_0, within its top 3 at every step for 4-bit."""
    out = quantize_gguf(f32_file, tmp_path / f"m-{qtype}.gguf", qtype)
    assert out.stat().st_size < f32_file.stat().st_size / (3 if qtype != "q8_0" else 2)
    report = verify_gguf(out, model_dir[1], llama2_tokenizer)
    assert report.tokenization_equal
    assert report.top1_agreement >= 1 - max_top1_loss
    prompt = llama2_tokenizer.encode("The meaning of")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, verbose=False)
    try:
        theirs = []
        for token in llm.generate(prompt, temp=0.0, top_k=1):
            theirs.append(token)
            if len(theirs) == 12:
                break
    finally:
        llm.close()
    with torch.no_grad():                                     # PyTorch's view of the same sequence
        logits = model_dir[1](torch.tensor([prompt + theirs]))[0, len(prompt) - 1:-1]        # (12, vocab)
    ranks = [int((row > row[t]).sum()) for row, t in zip(logits, theirs)]
    assert max(ranks) <= max_rank, (qtype, ranks)


def test_f16_and_bf16(model_dir, llama2_tokenizer, tmp_path):
    for t in ("f16", "bf16"):
        path = write_gguf(model_dir[0], tmp_path / f"m-{t}.gguf", t)
        report = verify_gguf(path, model_dir[1], llama2_tokenizer)
        assert report.top1_agreement > 0.9 and report.max_abs_diff < 0.1, (t, report)


def test_cli_writes_types_with_a_size_table(model_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "quantize", "--model", str(model_dir[0]), "--type", "q8_0", "f16",
                        "--out", str(tmp_path / "gguf")], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "bits/weight" in r.stdout and "top-1 agreement" in r.stdout
    names = sorted(p.name for p in (tmp_path / "gguf").iterdir())
    assert names == ["gguf-test-F16.gguf", "gguf-test-Q8_0.gguf"]        # the F32 intermediate is gone


# ---- bad input: a clear message, exit 2, no .gguf under the final name --------------------

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "quantize", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_missing_model_directory(tmp_path):
    r = run_cli("--model", tmp_path / "nope", "--type", "f16", "--out", tmp_path / "x.gguf")
    assert r.returncode == 2 and "nope: no such file or directory" in r.stderr
    assert not (tmp_path / "x.gguf").exists()


def test_non_llama_directory(model_dir, tmp_path):
    import shutil

    d = shutil.copytree(model_dir[0], tmp_path / "gpt2")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (d / "config.json").write_text(json.dumps(cfg))
    r = run_cli("--model", d, "--type", "f16", "--out", tmp_path / "x.gguf")
    assert r.returncode == 2 and "not a Llama model" in r.stderr


def test_unknown_type_and_missing_folder(model_dir, tmp_path):
    r = run_cli("--model", model_dir[0], "--type", "q3_weird", "--out", tmp_path / "x.gguf")
    assert r.returncode == 2 and "unknown type(s) q3_weird" in r.stderr
    r = run_cli("--model", model_dir[0], "--type", "f16", "--out", tmp_path / "no" / "such" / "x.gguf")
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_tokenizer_size_differs_from_embedding(tmp_path, llama2_tokenizer):
    torch.manual_seed(0)
    model = Llama(ModelConfig(name="big-vocab", n_layer=1, d_model=64, n_head=2, n_kv_head=1, ffn_dim=128,
                              vocab_size=32064, max_seq_len=64))
    save_checkpoint(model, llama2_tokenizer, tmp_path / "m")
    with pytest.raises(ExportError, match="32000 tokens but the embedding has 32064 rows"):
        write_gguf(tmp_path / "m", tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()


def test_failed_quantization_leaves_nothing(tmp_path):
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(ExportError, match="quantizer failed"):
        quantize_gguf(bad, tmp_path / "out.gguf", "q4_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-model.gguf"]


def test_the_verification_text_spans_prose_and_code(llama2_tokenizer):
    """verify_gguf compares logits over SAMPLE_TEXT's tokens: enough positions, and a spread of
    ids (prose, code keywords, newlines and indentation) so a layer that only breaks some rows
    of the embedding or lm_head still shows."""
    ids = llama2_tokenizer.encode(SAMPLE_TEXT)
    newline = llama2_tokenizer.encode("\n", bos=False)[-1]
    code = {i for i in llama2_tokenizer.encode("def return", bos=False)}
    assert len(ids) >= 64 and len(set(ids)) >= 40, (len(ids), len(set(ids)))
    assert newline in ids and code & set(ids)
