import json

import pytest
import torch
from safetensors.torch import save_file

from tinyllama import CheckpointError, Llama, ModelConfig, load_checkpoint, save_checkpoint
from tinyllama.formats.checkpoint import load_state_dict


@pytest.fixture(scope="module")
def debug_dir(tmp_path_factory, llama2_tokenizer):
    """A saved tinyllama-debug checkpoint (32000 vocab, with the Llama-2 tokenizer)."""
    torch.manual_seed(0)
    model = Llama(ModelConfig.from_name("tinyllama-debug"))
    out = tmp_path_factory.mktemp("ckpt") / "debug"
    save_checkpoint(model, llama2_tokenizer, out)
    return out, model


def test_layout_is_hf(debug_dir):
    out, _ = debug_dir
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json"} <= names
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "float32"
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


def test_round_trip_is_exact(debug_dir):
    out, model = debug_dir
    loaded, tok = load_checkpoint(out)
    assert loaded.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert tok.encode("Hello world") == [1, 15043, 3186]
    ids = torch.tensor([tok.encode("round trip")])
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), loaded(ids))


def test_transformers_loads_ours_with_same_logits(debug_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    out, model = debug_dir
    hf = LlamaForCausalLM.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([hf_tok("The same logits, both ways.")["input_ids"]])
    with torch.no_grad():
        assert (hf(ids).logits - model.eval()(ids)).abs().max().item() < 1e-4


def test_ours_loads_a_transformers_directory(tmp_path, llama2_tokenizer):
    """Any HF Llama directory (like a real TinyLlama checkpoint) loads with the same logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.05)
    hf.save_pretrained(tmp_path / "hf")
    llama2_tokenizer.save(tmp_path / "hf")
    ours, tok = load_checkpoint(tmp_path / "hf")
    ids = torch.tensor([tok.encode("TinyLlama checkpoints load unchanged.")])
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() < 1e-4
    assert ours.config.n_kv_head == 2


def test_sharded_save_and_load(tmp_path, small_model):
    out = save_checkpoint(small_model, None, tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    loaded, tok = load_checkpoint(out, tokenizer=False)
    assert tok is None
    assert all(torch.equal(a, b) for a, b in zip(small_model.state_dict().values(), loaded.state_dict().values()))


def test_bf16_save_keeps_dtype_and_load_can_cast(tmp_path, small_model):
    out = save_checkpoint(small_model.to(torch.bfloat16), None, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    m, _ = load_checkpoint(out, tokenizer=False)
    assert m.lm_head.weight.dtype == torch.bfloat16
    m32, _ = load_checkpoint(out, tokenizer=False, dtype=torch.float32)
    assert m32.lm_head.weight.dtype == torch.float32


def test_tied_embeddings_round_trip(tmp_path, small_config):
    from transformers import LlamaForCausalLM

    torch.manual_seed(2)
    model = Llama(small_config.replace(tie_embeddings=True)).eval()
    out = save_checkpoint(model, None, tmp_path / "tied")
    assert "lm_head.weight" not in load_state_dict(out)
    loaded, _ = load_checkpoint(out, tokenizer=False)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, 320, (1, 9))
    hf = LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-4


def test_compiled_or_wrapped_model_saves_plain_names(tmp_path, small_model):
    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    save_checkpoint(Wrapper(small_model), None, tmp_path / "wrapped")
    assert all(k.startswith(("model.", "lm_head.")) for k in load_state_dict(tmp_path / "wrapped"))


def test_overwrite_is_atomic(tmp_path, small_model, monkeypatch):
    out = save_checkpoint(small_model, None, tmp_path / "ckpt")
    before = (out / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("tinyllama.formats.checkpoint.save_file", boom)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(small_model, None, out)
    assert (out / "model.safetensors").read_bytes() == before           # old checkpoint intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]             # no temp left behind
    with pytest.raises(OSError):
        save_checkpoint(small_model, None, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_save_into_missing_parent_is_clear(tmp_path, small_model):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_checkpoint(small_model, None, tmp_path / "no" / "such" / "dir")


def test_tokenizer_larger_than_embedding_is_refused(tmp_path, small_model, llama2_tokenizer):
    with pytest.raises(CheckpointError, match="32000 tokens.*320 rows"):
        save_checkpoint(small_model, llama2_tokenizer, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ---- damaged or wrong directories: each error names the file and the problem -----------

def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "nope")


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="got a file"):
        load_checkpoint(f)


def test_no_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)


def test_bad_config_json(debug_dir, tmp_path):
    d = _copy(debug_dir[0], tmp_path / "d")
    (d / "config.json").write_text('{\n "model_type": "llama",\n oops\n}')
    with pytest.raises(CheckpointError, match=r"config.json: invalid JSON at line 3"):
        load_checkpoint(d)


def test_not_a_llama(debug_dir, tmp_path):
    d = _copy(debug_dir[0], tmp_path / "d")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json: not a Llama model"):
        load_checkpoint(d)


def test_truncated_weights(debug_dir, tmp_path):
    d = _copy(debug_dir[0], tmp_path / "d")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        load_checkpoint(d)


def test_garbage_weights(debug_dir, tmp_path):
    d = _copy(debug_dir[0], tmp_path / "d")
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        load_checkpoint(d)


def test_weights_that_do_not_match_config(debug_dir, tmp_path):
    d = _copy(debug_dir[0], tmp_path / "d")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing \d+ tensor\(s\), e.g. model.layers.2"):
        load_checkpoint(d)


def test_wrong_shape(debug_dir, tmp_path):
    d = _copy(debug_dir[0], tmp_path / "d")
    sd = load_state_dict(d)
    sd["model.norm.weight"] = torch.ones(65)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.norm.weight has shape \(65,\)"):
        load_checkpoint(d)


def test_pickled_weights_are_refused(debug_dir, tmp_path):
    d = _copy(debug_dir[0], tmp_path / "d")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"pickle would run code")
    with pytest.raises(CheckpointError, match="never unpickled"):
        load_checkpoint(d)


def test_index_listing_a_missing_shard(debug_dir, tmp_path):
    d = _copy(debug_dir[0], tmp_path / "d")
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="missing: model-00001-of-00002.safetensors"):
        load_checkpoint(d)


def test_missing_tokenizer(debug_dir, tmp_path):
    d = _copy(debug_dir[0], tmp_path / "d")
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_checkpoint(d)
    model, tok = load_checkpoint(d, tokenizer=False)
    assert tok is None and model.config.name == "tinyllama-debug"
