"""The CUDA paths tests/test_model.py's two GPU tests leave out: speculative verification's
bottom-right mask, training forward/backward as FSDP2 (bf16 parameters) and one process (fp32 +
bf16 autocast) compute it, KV-cache decoding against the full forward, self-speculation's
identity, sampling on a CUDA model. `make gpu-check` runs them (its `tests` stage).

gpu-marked, so skipped without CUDA; GPU_CHECK_DEVICE=cpu runs the same checks on the CPU,
unmarked (gpu-check's DRY=1 rehearsal: the logic checked before GPU time is spent on it).
"""

import copy
import os

import pytest
import torch

from tinyllama import KVCache, Llama, ModelConfig, Step
from tinyllama.model import kernels
from tinyllama.inference.backends import TorchBackend
from tinyllama.inference.draft_policy import Fixed
from tinyllama.inference.generate import generate

DEV = os.environ.get("GPU_CHECK_DEVICE", "cuda")
pytestmark = [pytest.mark.gpu] if DEV == "cuda" else []
CFG = ModelConfig(name="t", n_layer=3, d_model=256, n_head=8, n_kv_head=2, ffn_dim=512, vocab_size=4096,
                  max_seq_len=512)
ATTENTION = {"flash": kernels.flash_attention, "xformers": kernels.xformers_attention, "sdpa": kernels.sdpa_attention}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


def test_verification_mask_path_matches_reference():
    # 1 < T < S: the bottom-right-aligned causal mask of a k=4 verification pass, bf16, GQA
    q = torch.randn(1, 8, 5, 64, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 77, 64, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(1, 2, 77, 64, device=DEV, dtype=torch.bfloat16)
    ref = kernels.reference_attention(q.double(), k.double(), v.double())
    for backend in kernels.available_backends():
        assert rel(ATTENTION[backend](q, k, v), ref) < 1e-2, backend


@pytest.mark.parametrize("mode", ["bf16_params", "autocast"])
def test_model_forward_backward(mode):
    torch.manual_seed(0)
    ref_model = Llama(CFG).double()
    ids = torch.randint(0, CFG.vocab_size, (2, 64))
    with torch.no_grad():
        ref = ref_model(ids)
    model = Llama(CFG).to(DEV)
    model.load_state_dict(ref_model.state_dict())
    x = ids.to(DEV)
    if mode == "bf16_params":                   # what FSDP2's MixedPrecisionPolicy computes with
        out = model.to(torch.bfloat16)(x)
    else:                                       # one process: fp32 weights, bf16 autocast
        with torch.autocast(DEV, dtype=torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.float32
    assert rel(out, ref) < 3e-2
    loss = torch.nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_decode_matches_full_forward(dtype):
    torch.manual_seed(0)
    model = Llama(CFG).to(DEV).to(dtype).eval()
    ids = torch.randint(0, CFG.vocab_size, (1, 40), device=DEV)
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, 1, 64)
        prefill = model(ids[:, :30], cache, Step.span(0, 30))
        verify = model(ids[:, 30:35], cache, Step.span(30, 5))                  # a k=4 verification pass
        steps = torch.cat([model(ids[:, i:i + 1], cache, Step.span(i, 1)) for i in range(35, 40)], 1)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert rel(prefill, full[:, :30]) < tol
    assert rel(verify, full[:, 30:35]) < tol
    assert rel(steps, full[:, 35:40]) < tol


def test_self_speculation_is_greedy_identical_and_fully_accepted():
    torch.manual_seed(0)
    model = Llama(CFG).to(DEV).eval()           # float32: the same argmax at T=1 and T=k+1
    prompt = list(range(5, 25))
    plain = list(generate(TorchBackend(model, pack=False), prompt, max_new_tokens=32))
    # the draft is a copy: a backend owns its model's KV cache
    g = generate(TorchBackend(model, pack=False), prompt, max_new_tokens=32,
                 drafter=TorchBackend(copy.deepcopy(model), pack=False), draft_policy=Fixed(4))
    assert list(g) == plain
    assert g.stats.drafted > 0 and g.stats.accepted == g.stats.drafted


def test_sampling_on_a_device_model():
    torch.manual_seed(0)
    model = Llama(CFG).to(DEV).eval()
    out = list(generate(model, [1, 2, 3], max_new_tokens=8, temperature=0.8, top_k=40, top_p=0.9, seed=1))
    again = list(generate(model, [1, 2, 3], max_new_tokens=8, temperature=0.8, top_k=40, top_p=0.9, seed=1))
    assert len(out) == 8 and out == again      # seeded: the same tokens
    assert all(0 <= t < CFG.vocab_size for t in out)
