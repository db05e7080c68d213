"""Static-shape decoding (tinyllama.inference.graphs, Step.static) on the CPU: the same
numbers as the dynamic KV-cache path, traceable whole (no graph breaks, no host syncs: what a
CUDA graph capture needs), and the torch-call count it exists to collapse. Capture itself is
in the gpu-marked test."""

import pytest
import torch

from tinyllama.model.cache import KVCache, Step
from tinyllama.model.config import ModelConfig
from tinyllama.inference.draft_policy import Fixed
from tinyllama.inference.graphs import StaticDecoder, count_torch_calls
from tinyllama.model.model import Llama


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Llama(ModelConfig.from_name("tinyllama-debug")).eval()


def dynamic_logits(model, ids, chunks):
    """Logits of each chunk through the dynamic cache path (span steps)."""
    cache = KVCache.for_model(model, 1, 64)
    out, pos = [], 0
    with torch.inference_mode():
        for n in chunks:
            out.append(model(torch.tensor([ids[pos:pos + n]]), cache, Step.span(pos, n))[0])
            pos += n
    return torch.cat(out)


def test_static_steps_equal_the_dynamic_cache_path_in_float32(model):
    torch.manual_seed(1)
    ids = torch.randint(0, 32000, (20,)).tolist()
    chunks = [7, 1, 1, 5, 1, 3, 2]                 # a prefill, decode steps, verifications of k+1
    want = dynamic_logits(model, ids, chunks)
    decoder = StaticDecoder(model, max_seq_len=64)
    assert not decoder.capture                     # a CPU model runs the static step eagerly
    got, pos = [], 0
    for n in chunks:
        got.append(decoder.step(ids[pos:pos + n], pos))
        pos += n
    assert (torch.cat(got) - want).abs().max().item() < 1e-4


def test_a_rejected_draft_is_just_overwritten(model):
    # speculative rollback: verify 4 tokens at p, accept 1, then step from p+1 again
    torch.manual_seed(2)
    ids = torch.randint(0, 32000, (12,)).tolist()
    decoder = StaticDecoder(model, max_seq_len=32)
    decoder.step(ids[:8], 0)
    decoder.step([1, 2, 3, 4], 8)                  # a draft that will be rejected after its first
    got = decoder.step(ids[9:12], 9)
    want = dynamic_logits(model, ids[:8] + [1] + ids[9:12], [8, 1, 3])[-3:]
    assert (got - want).abs().max().item() < 1e-4


def test_the_static_step_traces_whole_without_graph_breaks(model):
    # fullgraph=True fails on any graph break, data-dependent Python branch or .item(): what
    # would also stop a CUDA graph capture
    decoder = StaticDecoder(model, max_seq_len=32)
    compiled = torch.compile(decoder._run, backend="eager", fullgraph=True, dynamic=False)
    ids, positions = torch.tensor([[5, 6]]), torch.tensor([3, 4])
    with torch.inference_mode():
        want = decoder._run(ids, positions)
    decoder.reset()
    got = compiled(ids, positions)
    assert (got - want).abs().max().item() < 1e-5


def test_count_torch_calls_of_an_eager_decode_step(model):
    cache = KVCache.for_model(model, 1, 32)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), cache, Step.span(0, 3))
        n, calls = count_torch_calls(lambda: model(torch.tensor([[4]]), cache, Step.span(3, 1)))
    layers = model.config.n_layer
    assert n > 10 * layers and calls["linear"] >= 7 * layers      # q, k, v, o, gate, up, down per layer


def test_steps_past_the_cache_are_refused(model):
    decoder = StaticDecoder(model, max_seq_len=8)
    with pytest.raises(ValueError, match="static cache"):
        decoder.step([1, 2, 3], 6)


@pytest.mark.gpu
def test_captured_steps_equal_eager_ones_on_cuda():
    torch.manual_seed(0)
    model = Llama(ModelConfig.from_name("tinyllama-debug")).to("cuda", torch.float32).eval()
    ids = torch.randint(0, 32000, (16,)).tolist()
    eager, captured = StaticDecoder(model, 64, capture=False), None
    want = [eager.step(ids[:8], 0), eager.step(ids[8:9], 8), eager.step(ids[9:12], 9)]
    captured = StaticDecoder(model, 64, capture=True)
    captured.step(ids[:8], 0)                       # T=8: captured too
    got = [captured.step(ids[:8], 0), captured.step(ids[8:9], 8), captured.step(ids[9:12], 9)]
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() < 1e-3


def test_a_backend_through_the_static_decoder_generates_what_the_eager_one_does(model, monkeypatch):
    # the CUDA path of TorchBackend (graphs on), run here with the static steps eager
    from tinyllama.inference import backends
    from tinyllama.inference.generate import SamplingParams, generate

    ids = [1, 450, 4996, 17354]
    plain = backends.TorchBackend(model, pack=False)
    want = list(generate(plain, ids, SamplingParams(max_new_tokens=12, temperature=0)))
    plain.close()
    monkeypatch.setattr(backends, "use_cuda_graphs", lambda m, allowed=True: allowed)
    static = backends.TorchBackend(model, pack=False)
    assert static.graphs is not None
    assert list(generate(static, ids, SamplingParams(max_new_tokens=12, temperature=0))) == want
    other_user = backends.TorchBackend(model, pack=False)      # the same model decoding elsewhere meanwhile
    list(generate(other_user, [7, 8, 9, 10], SamplingParams(max_new_tokens=6, temperature=0)))
    other_user.close()
    assert static.cached_tokens() > len(ids)                   # the next call reuses its cached prefix...
    assert list(generate(static, ids, SamplingParams(max_new_tokens=12, temperature=0))) == want   # ...untouched
    # speculative: the model drafting for itself, verifications of k+1 = 4 tokens, rollbacks
    torch.manual_seed(3)
    other = Llama(ModelConfig.from_name("tinyllama-debug")).eval()
    draft = backends.TorchBackend(other, pack=False)
    spec = list(generate(static, ids, SamplingParams(max_new_tokens=12, temperature=0), drafter=draft,
                         draft_policy=Fixed(3)))
    assert spec == want
    static.close()
    draft.close()


def test_the_bench_counts_calls_on_the_real_structures():
    from bench.graph_decode import calls_per_step

    small, large = calls_per_step("tinyllama-1.1b"), calls_per_step("llama-2-7b")
    assert 22 * 20 < small[0] < large[0]              # 22 vs 32 layers, ~30 calls each
    assert abs(small[1] - small[0]) < 0.1 * small[0]  # the static step is no fewer calls: capture is what collapses them
