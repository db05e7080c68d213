import math

import pytest
import torch

from tinyllama import KVCache, Llama, ModelConfig, Step
from tinyllama.model.kernels import attention, reference_attention, sdpa_attention, select_backend


def _hf_model(cfg: ModelConfig, attn: str = "eager"):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k != "torch_dtype"})
    hf_cfg._attn_implementation = attn
    return LlamaForCausalLM(hf_cfg).eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_match_transformers_ours_to_hf(small_model, small_config, attn):
    hf = _hf_model(small_config, attn)
    missing, unexpected = hf.load_state_dict(small_model.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    ids = torch.randint(0, small_config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = small_model(ids), hf(ids).logits
    assert ours.shape == (2, 37, small_config.vocab_size)
    assert (ours - ref).abs().max().item() < 1e-4


def test_logits_match_transformers_hf_to_ours(small_config):
    torch.manual_seed(3)
    hf = _hf_model(small_config)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.05)
    ours = Llama(small_config).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    ids = torch.randint(0, small_config.vocab_size, (3, 29), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() < 1e-4


def test_kv_cache_decoding_equals_full_forward(small_model):
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = small_model(ids)
        cache = KVCache.for_model(small_model, batch_size=2, max_seq_len=32)
        prefill = small_model(ids[:, :10], cache, Step.span(0, 10))
        steps = [small_model(ids[:, t:t + 1], cache, Step.span(t, 1)) for t in range(10, 24)]
    incremental = torch.cat([prefill] + steps, dim=1)
    assert (incremental - full).abs().max().item() < 1e-5


def test_kv_cache_chunked_prefill_and_rollback(small_model):
    """Speculative decoding verifies several tokens at an offset, then rolls back by position."""
    ids = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(5))
    wrong = ids.clone()
    wrong[0, 12:] = (wrong[0, 12:] + 7) % 320
    with torch.no_grad():
        full = small_model(ids)
        cache = KVCache.for_model(small_model, batch_size=1, max_seq_len=20)
        small_model(ids[:, :8], cache, Step.span(0, 8))
        small_model(wrong[:, 8:16], cache, Step.span(8, 8))        # 8 tokens at once, 4 of them wrong
        out = small_model(ids[:, 12:20], cache, Step.span(12, 8))  # roll back to 12 and continue
    assert (out - full[:, 12:20]).abs().max().item() < 1e-5


def test_kv_cache_overflow_and_misuse_are_clear(small_model):
    cache = KVCache.for_model(small_model, batch_size=1, max_seq_len=8)
    with pytest.raises(ValueError, match="KV cache overflow"):
        small_model(torch.zeros(1, 9, dtype=torch.long), cache, Step.span(0, 9))
    assert not cache.k.any()                               # refused before anything was written
    with pytest.raises(ValueError, match="batch size 2 differs"):
        small_model(torch.zeros(2, 2, dtype=torch.long), cache, Step.span(0, 2))
    with pytest.raises(ValueError, match="takes 3 tokens per row, input_ids has 2"):
        small_model(torch.zeros(1, 2, dtype=torch.long), cache, Step.span(0, 3))
    with pytest.raises(ValueError, match="pass both or neither"):
        small_model(torch.zeros(1, 2, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="pass both or neither"):
        small_model(torch.zeros(1, 2, dtype=torch.long), step=Step.span(0, 2))
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        small_model(torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("T, S", [(16, 16), (1, 16), (5, 16), (1, 1)])
@pytest.mark.parametrize("h, hkv", [(6, 2), (4, 4), (8, 1)])
def test_sdpa_matches_reference_attention(T, S, h, hkv):
    g = torch.Generator().manual_seed(T * 100 + S + h)
    q = torch.randn(2, h, T, 32, generator=g)
    k = torch.randn(2, hkv, S, 32, generator=g)
    v = torch.randn(2, hkv, S, 32, generator=g)
    assert (sdpa_attention(q, k, v) - reference_attention(q, k, v)).abs().max().item() < 1e-5


def test_reference_attention_is_causal():
    q = torch.randn(1, 2, 6, 8)
    k = torch.randn(1, 2, 6, 8)
    v = torch.randn(1, 2, 6, 8)
    v2 = v.clone()
    v2[:, :, 4:] += 100.0                   # changing future values must not move early outputs
    y1, y2 = reference_attention(q, k, v), reference_attention(q, k, v2)
    assert torch.allclose(y1[:, :, :4], y2[:, :, :4]) and not torch.allclose(y1[:, :, 4:], y2[:, :, 4:])
    assert select_backend(q) == "sdpa"       # CPU tensors never pick a CUDA kernel
    assert torch.allclose(attention(q, k, v), y1, atol=1e-6)


def test_forced_backend_is_validated(monkeypatch):
    from tinyllama.model import kernels
    from tinyllama.runtime import RuntimeOptions

    q = torch.randn(1, 2, 3, 8)
    monkeypatch.setattr(kernels, "_attention", "auto")         # restored after the test
    kernels.use_attention("flash")
    with pytest.raises(RuntimeError, match="flash-attn"):
        select_backend(q)
    with pytest.raises(ValueError, match="expected auto, sdpa"):
        kernels.use_attention("bogus")
    with pytest.raises(ValueError, match="expected sdpa"):
        RuntimeOptions.from_env({"TINYLLAMA_ATTENTION": "bogus"})


def test_tinyllama_initialisation():
    cfg = ModelConfig.from_name("tinyllama-37m")
    torch.manual_seed(0)
    model = Llama(cfg)
    std = math.sqrt(2 / (5 * cfg.d_model))
    out_std = 1 / math.sqrt(cfg.d_model) / cfg.n_layer
    sd = dict(model.named_parameters())
    assert sd["model.embed_tokens.weight"].std().item() == pytest.approx(std, rel=0.02)
    assert sd["lm_head.weight"].std().item() == pytest.approx(std, rel=0.02)
    assert sd["model.layers.0.self_attn.q_proj.weight"].std().item() == pytest.approx(std, rel=0.05)
    assert sd["model.layers.3.self_attn.o_proj.weight"].std().item() == pytest.approx(out_std, rel=0.05)
    assert sd["model.layers.7.mlp.down_proj.weight"].std().item() == pytest.approx(out_std, rel=0.05)
    assert torch.equal(sd["model.norm.weight"], torch.ones(cfg.d_model))


def test_tied_embeddings_share_storage(small_config):
    model = Llama(small_config.replace(tie_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.num_params() == small_config.replace(tie_embeddings=True).num_params()


def test_rope_extends_beyond_max_seq_len(small_model):
    ids = torch.randint(0, 320, (1, 80))        # max_seq_len is 64
    with torch.no_grad():
        assert small_model(ids).shape == (1, 80, 320)


def test_bf16_forward_tracks_fp32(small_model):
    ids = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = small_model(ids)
        low = small_model.to(torch.bfloat16)(ids)
    assert low.dtype == torch.float32   # logits are returned in float32
    assert (low - ref).abs().max().item() < 0.1


def test_backward_reaches_every_parameter(small_model):
    ids = torch.randint(0, 320, (2, 12))
    small_model.train()
    loss = torch.nn.functional.cross_entropy(small_model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in small_model.parameters())


@pytest.mark.gpu
def test_cuda_kernels_match_reference_in_bf16():
    from tinyllama.model import kernels

    q = torch.randn(2, 8, 33, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 2, 33, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 2, 33, 64, device="cuda", dtype=torch.bfloat16)
    ref = kernels.reference_attention(q, k, v).float()
    for backend in kernels.available_backends():
        y = {"flash": kernels.flash_attention, "xformers": kernels.xformers_attention,
             "sdpa": kernels.sdpa_attention}[backend](q, k, v).float()
        assert (y - ref).abs().max().item() < 2e-2, backend
        y1 = {"flash": kernels.flash_attention, "xformers": kernels.xformers_attention,
              "sdpa": kernels.sdpa_attention}[backend](q[:, :, -1:], k, v).float()
        assert (y1 - ref[:, :, -1:]).abs().max().item() < 2e-2, backend


@pytest.mark.gpu
@pytest.mark.parametrize("provider", ["liger", "flash"])
def test_fused_kernels_match_the_pytorch_definitions(provider, monkeypatch):
    from tinyllama.model import fused, kernels

    if fused._load(provider) is None:
        pytest.skip(f"{provider} is not installed (or does not import) here")
    monkeypatch.setattr(fused, "_wanted_provider", provider)
    assert fused.provider_for(torch.zeros(1, device="cuda")).name == provider
    torch.manual_seed(0)
    x = torch.randn(2, 64, 8, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 64, 2, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(64, device="cuda", dtype=torch.bfloat16) + 0.5
    cos = torch.randn(64, 32, device="cuda").repeat(1, 2)
    sin = torch.randn(64, 32, device="cuda").repeat(1, 2)
    h = torch.randn(256, 64, device="cuda", dtype=torch.bfloat16)
    head = torch.randn(32000, 64, device="cuda", dtype=torch.bfloat16) * 0.1
    logits = torch.randn(256, 32000, device="cuda")
    targets = torch.randint(0, 32000, (256,), device="cuda")

    def ops():
        return (kernels.rms_norm(x, w, 1e-5), *kernels.rotate_qk(x.clone(), k.clone(), cos, sin), kernels.swiglu(x, x),
                kernels.cross_entropy(logits, targets), kernels.linear_cross_entropy(h, head, targets))

    got = ops()
    fused.use_provider("off")
    want = ops()
    for a, b in zip(got, want):
        assert (a.float() - b.float()).abs().max().item() < 3e-2
