import json

import pytest
import torch

from tinyllama import PRESETS, Llama, ModelConfig


def test_tinyllama_1b_is_exactly_tinyllama():
    cfg = ModelConfig.from_name("tinyllama-1.1b")
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim) == (22, 2048, 32, 4, 64)
    assert (cfg.ffn_dim, cfg.vocab_size, cfg.max_seq_len, cfg.rope_base, cfg.norm_eps) == (5632, 32000, 2048, 10000.0, 1e-5)
    assert cfg.tie_embeddings is False
    with torch.device("meta"):
        model = Llama(cfg)
    assert model.num_params() == 1_100_048_384
    assert cfg.num_params() == 1_100_048_384
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_counts_its_module(name):
    cfg = ModelConfig.from_name(name)
    with torch.device("meta"):
        model = Llama(cfg)
    assert model.num_params() == cfg.num_params()


def test_llama2_7b_shape():
    cfg = ModelConfig.from_name("llama-2-7b")
    assert cfg.num_params() == 6_738_415_616
    assert (cfg.n_head, cfg.n_kv_head, cfg.max_seq_len) == (32, 32, 4096)


def test_120m_is_tinyllamas_config():
    cfg = ModelConfig.from_name("tinyllama-120m")
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.ffn_dim) == (12, 768, 12, 1, 2048)


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(KeyError, match="tinyllama-1.1b"):
        ModelConfig.from_name("tinyllama-9000b")


@pytest.mark.parametrize("bad, message", [
    (dict(d_model=100, n_head=3), "not divisible by n_head"),
    (dict(n_head=6, n_kv_head=4, d_model=96), "not divisible by n_kv_head"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(d_model=60, n_head=4, n_kv_head=4), "must be even"),
])
def test_invalid_config_is_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**bad)


def test_config_is_frozen():
    cfg = ModelConfig.from_name("tinyllama-debug")
    with pytest.raises(Exception):
        cfg.n_layer = 3


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_round_trip(name):
    cfg = ModelConfig.from_name(name)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_hf_config_round_trip_through_transformers(small_config, tmp_path):
    from transformers import LlamaConfig

    hf = LlamaConfig(**{k: v for k, v in small_config.to_hf_dict().items() if k != "torch_dtype"})
    hf.save_pretrained(tmp_path)
    back = ModelConfig.load_json(tmp_path / "config.json")
    assert back.replace(name=small_config.name) == small_config


def test_reads_tinyllamas_published_config_json():
    # The config.json of TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T, as published.
    published = {
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5632, "max_position_embeddings": 2048,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 22, "num_key_value_heads": 4,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.31.0.dev0",
        "use_cache": True, "vocab_size": 32000,
    }
    cfg = ModelConfig.from_hf_dict(published)
    assert cfg.replace(name="tinyllama-1.1b") == ModelConfig.from_name("tinyllama-1.1b")


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "not a Llama model"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"num_attention_heads": 5}, "head_dim|divisible"),
])
def test_unsupported_hf_configs_name_the_field(change, message):
    hf = ModelConfig.from_name("tinyllama-debug").to_hf_dict()
    hf.update(change)
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_dict(hf)


def test_missing_field_is_named():
    hf = ModelConfig.from_name("tinyllama-debug").to_hf_dict()
    del hf["hidden_size"]
    with pytest.raises(ValueError, match="missing field.*hidden_size"):
        ModelConfig.from_hf_dict(hf)


def test_bad_json_names_file_and_line(tmp_path):
    p = tmp_path / "config.json"
    p.write_text('{\n  "model_type": "llama",\n  "hidden_size": ,\n}')
    with pytest.raises(ValueError, match=r"config.json: invalid JSON at line 3"):
        ModelConfig.load_json(p)


def test_flops_per_token_matches_6n_rule():
    cfg = ModelConfig.from_name("tinyllama-1.1b")
    # 6N for the non-embedding parameters plus the lm_head, plus attention's 12·L·d·T.
    assert cfg.flops_per_token(2048) == 6 * (1_100_048_384 - 32000 * 2048) + 12 * 22 * 2048 * 2048
    json.dumps(cfg.to_hf_dict())  # serialisable
