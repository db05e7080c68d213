"""The fused-kernel layer (tinyllama.model.fused) on the CPU: fake modules that keep the real
libraries' calling conventions and asserts stand in for liger-kernel and flash-attn (tests/fakes.py,
held to the real signatures by test_fakes.py), and a seam makes CPU tensors count as CUDA ones.
What only a GPU can show (the Triton kernels' numbers) is in the gpu-marked tests of test_model.py."""

import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from fakes import block, flash_ops, install, liger_functional

from pretrain.train import loss_fn
from tinyllama.model import fused, kernels
from tinyllama.model.config import ModelConfig
from tinyllama.model.model import Llama
from tinyllama.runtime import RuntimeOptions


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@pytest.fixture
def on_fake_gpu(monkeypatch):
    """CPU tensors count as CUDA; providers are what the test installs (nothing cached)."""
    monkeypatch.setattr(fused, "_serves", lambda t: True)
    monkeypatch.setattr(fused, "_loaded", {})
    monkeypatch.setattr(fused, "_working", {})
    monkeypatch.setattr(fused, "_wanted_provider", "auto")     # use_provider's choice, restored after
    monkeypatch.setattr(kernels, "_attention", "auto")
    monkeypatch.setattr(kernels, "_chosen", {})                # attention's choices, made again
    return monkeypatch


def install_liger(monkeypatch, calls, module=None):
    """liger-kernel's fake as the one provider installed; returns what fused loads from it."""
    install(monkeypatch, module or liger_functional(calls))
    block(monkeypatch, "flash_attn")
    return fused._load("liger")


def install_flash(monkeypatch, calls):
    """flash-attn's fakes as the one provider installed; returns what fused loads from them."""
    install(monkeypatch, *flash_ops(calls))
    block(monkeypatch, "liger_kernel")
    return fused._load("flash")


def small_model():
    torch.manual_seed(0)
    return Llama(ModelConfig.from_name("tinyllama-debug"))


def test_fp32_weights_under_bf16_autocast_give_the_fused_rotary_one_dtype(on_fake_gpu):
    # pretraining on one GPU: fp32 weights, bf16 autocast. q/k leave their projections in bf16
    # while the tables follow the fp32 residual stream; flash-attn's kernel asserts equal dtypes.
    calls = []
    install_flash(on_fake_gpu, calls)
    model, ids = small_model(), torch.randint(0, 32000, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids[:, :-1], targets=ids[:, 1:])
    assert "flash_rope" in calls and torch.isfinite(loss)


def test_rotary_keeps_q_and_k_in_the_autocast_dtype():
    # without a fused kernel: bf16 q times fp32 tables would promote q and k to float32
    q, k = torch.randn(2, 5, 4, 16, dtype=torch.bfloat16), torch.randn(2, 5, 2, 16, dtype=torch.bfloat16)
    cos, sin = torch.randn(5, 8).repeat(1, 2), torch.randn(5, 8).repeat(1, 2)
    rq, rk = kernels.rotate_qk(q, k, cos, sin)
    assert rq.dtype == rk.dtype == torch.bfloat16
    want = q.float() * cos[:, None] + _rotate_half(q.float()) * sin[:, None]
    assert (rq.float() - want).abs().max() < 0.1


def test_liger_provider_gives_the_pytorch_model_and_loss(on_fake_gpu):
    calls = []
    install_liger(on_fake_gpu, calls)
    model, ids = small_model().to(torch.bfloat16), torch.randint(0, 32000, (2, 16))
    fused_logits = model(ids)
    fused_loss = model(ids[:, :-1], targets=ids[:, 1:])
    assert {"rope", "rms", "swiglu", "linear_ce"} <= set(calls)
    fused.use_provider("off")
    calls.clear()
    plain_logits = model(ids)
    plain_loss = loss_fn(model, ids[:, :-1], ids[:, 1:], None)
    assert calls == []
    assert (fused_logits - plain_logits).abs().max() < 1e-2
    assert abs(fused_loss.item() - plain_loss.item()) < 1e-2


def test_liger_linear_cross_entropy_gets_one_dtype_under_autocast(on_fake_gpu):
    calls = []
    install_liger(on_fake_gpu, calls)
    on_fake_gpu.setattr(torch, "is_autocast_enabled", lambda device_type=None: True)
    on_fake_gpu.setattr(torch, "get_autocast_dtype", lambda device_type: torch.bfloat16)
    h, w = torch.randn(6, 16), torch.randn(32, 16)                 # fp32 norm output, fp32 weight
    loss = kernels.linear_cross_entropy(h, w, torch.arange(6))
    assert calls[-1] == "linear_ce" and torch.isfinite(loss)     # after the provider's own check


def test_a_provider_that_fails_its_check_is_skipped_with_a_warning(on_fake_gpu):
    calls = []
    liger = liger_functional(calls)
    liger.liger_rms_norm = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no kernel image for sm_90"))
    install_liger(on_fake_gpu, calls, liger)
    x, w = torch.randn(2, 3, 8, dtype=torch.bfloat16), torch.ones(8, dtype=torch.bfloat16)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert fused.provider_for(x) is None
        y = kernels.rms_norm(x, w, 1e-5)
    assert any("no kernel image" in str(m.message) for m in seen)
    assert torch.equal(y, kernels.reference_rms_norm(x, w, 1e-5))
    fused.use_provider("liger")
    with pytest.raises(RuntimeError, match=r"fused liger \(--fused, TINYLLAMA_FUSED\)"):
        fused.provider_for(x)


def test_liger_is_preferred_and_flash_is_the_fallback(on_fake_gpu):
    calls = []
    install(on_fake_gpu, liger_functional(calls), *flash_ops(calls))
    liger, flash = fused._load("liger"), fused._load("flash")
    x = torch.randn(2, 3, dtype=torch.bfloat16)
    assert fused.provider_for(x) is liger
    fused.use_provider("flash")
    assert fused.provider_for(x) is flash
    with pytest.raises(Exception, match="expected auto, off, liger, flash"):
        fused.use_provider("triton")
    with pytest.raises(Exception, match="expected 0, 1, liger or flash"):
        RuntimeOptions.from_env({"TINYLLAMA_FUSED": "triton"})
    kernels.use_kernels(RuntimeOptions.from_env({"TINYLLAMA_FUSED": "flash"}))     # the CLI's way, the same choice
    assert fused.provider_for(x) is flash


def test_no_provider_on_the_cpu():
    assert fused.provider_for(torch.randn(2, dtype=torch.bfloat16)) is None
    assert not fused.may_run(torch.randn(2))


def test_the_loss_through_forward_equals_the_loss_of_the_logits():
    model, ids = small_model(), torch.randint(0, 32000, (2, 16))
    logits = model(ids[:, :-1])
    want = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    assert torch.equal(loss_fn(model, ids[:, :-1], ids[:, 1:], None), want)


def test_xformers_without_its_cuda_ops_is_not_chosen(on_fake_gpu):
    # PyPI's xformers wheel for another torch/CUDA imports fine and fails on the first call
    def no_operator(q, k, v, attn_bias=None):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")

    on_fake_gpu.setattr(kernels, "_xops", types.SimpleNamespace(memory_efficient_attention=no_operator))
    on_fake_gpu.setattr(kernels, "_flash_attn_func", None)
    on_fake_gpu.setattr(kernels, "_xformers_ok", {})
    q = torch.randn(1, 4, 3, 16, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="No operator found"):
        assert kernels.select_backend(q) == "sdpa"
    kernels.use_attention("xformers")
    with pytest.raises(RuntimeError, match="CUDA ops"):
        kernels.select_backend(q)


def test_xformers_that_runs_is_chosen(on_fake_gpu):
    on_fake_gpu.setattr(kernels, "_xops", types.SimpleNamespace(memory_efficient_attention=lambda q, k, v, attn_bias=None: q))
    on_fake_gpu.setattr(kernels, "_flash_attn_func", None)
    on_fake_gpu.setattr(kernels, "_xformers_ok", {})
    assert kernels.select_backend(torch.randn(1, 4, 3, 16, dtype=torch.bfloat16)) == "xformers"
