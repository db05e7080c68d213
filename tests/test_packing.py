"""Inference-only weight packing (tinyllama/inference/packing.py): the packed forward gives the plain
forward's numbers, and a pack is never used once it could be wrong (autograd on, weights
changed in place, a module swapped for a LoRA wrapper, dtype changed)."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from fakes import never_timed, timings
from torch import nn

from tinyllama import KVCache, Step
from tinyllama.inference import packing
from tinyllama.inference.backends import TorchBackend
from tinyllama.inference.generate import generate

pytestmark = pytest.mark.cpu_isa
_NO_ONEDNN = pytest.mark.skipif(not packing.onednn_supports(torch.float32), reason="this torch has no oneDNN")
@pytest.fixture(params=["transposed", pytest.param("onednn", marks=_NO_ONEDNN)])
def always_packed(request, fresh_layout_cache, monkeypatch):
    """Packing decisions come from timing; tests choose the timings (on fresh decisions) so every
    group is packed, in each layout, and single-linear packs take the few-rows path."""
    monkeypatch.setattr(packing, "timer", timings({request.param: 0.5, "rowmajor": 0.1}))   # what auto times
    return request.param


def packs(model) -> list:
    return packing.installed_packs(model)


def count_packed_calls(model, monkeypatch) -> list:
    calls = []
    original = packing.PackedLinears.__call__

    def spy(self, x):
        calls.append(self)
        return original(self, x)

    monkeypatch.setattr(packing.PackedLinears, "__call__", spy)
    return calls


def test_packed_forward_matches_plain(small_model, always_packed, monkeypatch):
    ids = torch.randint(0, small_model.config.vocab_size, (2, 11))
    with torch.no_grad():
        plain = small_model(ids)
        n_bytes = packing.pack_for_decoding(small_model)
        calls = count_packed_calls(small_model, monkeypatch)
        packed = small_model(ids)
    # every layer's q/k/v, o, gate/up, down and the lm_head: 4 groups x 3 layers + 1
    assert len(packs(small_model)) == 4 * small_model.config.n_layer + 1
    assert len(calls) == 4 * small_model.config.n_layer + 1
    assert n_bytes == sum(p.numel() * 4 for n, p in small_model.named_parameters()
                          if n.endswith("proj.weight") or n == "lm_head.weight")
    assert {p.layout for p in packs(small_model)} == {always_packed}
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(packed.argmax(-1), plain.argmax(-1))


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9])
def test_each_row_count_path_matches_plain(small_model, always_packed, rows):
    """1 row: the packed copy; 2..8 rows: the single-linear packs (o_proj, lm_head) use
    `(W @ xᵀ)ᵀ` on the source weight; more: the packed copy again."""
    ids = torch.randint(0, small_model.config.vocab_size, (1, rows))
    with torch.no_grad():
        plain = small_model(ids)
        packing.pack_for_decoding(small_model)
        assert packing.pack_of(small_model.lm_head).few_rows == "rowmajor"
        assert packing.pack_of(small_model.model.layers[0].self_attn).few_rows is None   # fused: never
        packed = small_model(ids)
    assert packed.shape == plain.shape == (1, rows, small_model.config.vocab_size)
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)


def test_kv_cache_decoding_with_packs_matches_full_forward(small_model, always_packed):
    ids = torch.randint(0, small_model.config.vocab_size, (1, 9))
    with torch.no_grad():
        full = small_model(ids)[0]
        packing.pack_for_decoding(small_model)
        cache = KVCache.for_model(small_model, 1, 16)
        steps = [small_model(ids[:, :5], cache, Step.span(0, 5))[0]] + \
                [small_model(ids[:, t:t + 1], cache, Step.span(t, 1))[0] for t in range(5, 9)]
    torch.testing.assert_close(torch.cat(steps), full, rtol=1e-5, atol=1e-5)


def test_pack_is_not_used_with_autograd_and_gradients_reach_the_weights(small_model, always_packed, monkeypatch):
    packing.pack_for_decoding(small_model)
    calls = count_packed_calls(small_model, monkeypatch)
    ids = torch.randint(0, small_model.config.vocab_size, (1, 6))
    small_model(ids).sum().backward()
    assert calls == []
    assert small_model.model.layers[0].self_attn.q_proj.weight.grad is not None
    assert small_model.lm_head.weight.grad is not None


def test_stale_packs_fall_back_to_the_current_weights(small_model, always_packed, monkeypatch):
    ids = torch.randint(0, small_model.config.vocab_size, (1, 7))
    packing.pack_for_decoding(small_model)
    calls = count_packed_calls(small_model, monkeypatch)
    with torch.no_grad():
        small_model.model.layers[1].mlp.up_proj.weight.add_(0.5)       # an in-place update (optimizer.step)
        small_model.lm_head.weight.mul_(2.0)
        got = small_model(ids)
    layer1_gate_up = packing.pack_of(small_model.model.layers[1].mlp)
    assert layer1_gate_up not in calls and packing.pack_of(small_model.lm_head) not in calls
    assert packing.pack_of(small_model.model.layers[0].mlp) in calls      # untouched packs still run
    packing.unpack(small_model)
    with torch.no_grad():
        want = small_model(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_swapped_module_and_dtype_change_disable_the_pack(small_model, always_packed, monkeypatch):
    packing.pack_for_decoding(small_model)
    attn = small_model.model.layers[0].self_attn
    qkv = packing.pack_of(attn)

    class Wrapped(nn.Module):              # what peft does to a targeted linear
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, x):
            return self.base(x) + 1.0

    with torch.no_grad():
        assert qkv.usable()
        original = attn.q_proj
        attn.q_proj = Wrapped(original)
        assert not qkv.usable()
        attn.q_proj = original
        assert qkv.usable()
        small_model.to(torch.float64)      # .to() swaps the storage in place
        assert not qkv.usable()


def test_copies_and_pickles_of_a_packed_model_carry_no_packs(small_model, always_packed):
    ids = torch.randint(0, small_model.config.vocab_size, (1, 5))
    packing.pack_for_decoding(small_model)
    twin = copy.deepcopy(small_model)
    buffer = io.BytesIO()
    torch.save(small_model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert packs(twin) == [] and packs(loaded) == [] and packs(small_model) != []
    assert type(twin.model.layers[0].self_attn) is packing.PackedAttention      # a plain fallback now
    with torch.no_grad():
        want = small_model(ids)
        torch.testing.assert_close(twin(ids), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(ids), want, rtol=1e-5, atol=1e-5)


def test_wrapped_linears_are_not_packed(small_model, always_packed):
    attn = small_model.model.layers[0].self_attn

    class LoraLike(nn.Linear):             # a subclass runs its own forward: never packed
        pass

    lora = LoraLike(attn.q_proj.in_features, attn.q_proj.out_features, bias=False)
    attn.q_proj = lora
    packing.pack_for_decoding(small_model)
    assert packing.pack_of(attn) is None
    assert packing.pack_of(small_model.model.layers[1].self_attn) is not None


def test_nothing_is_packed_when_timing_says_no(small_model, fresh_layout_cache, monkeypatch):
    monkeypatch.setattr(packing, "timer", timings({"transposed": 0.95, "onednn": 0.97}))   # none 10% faster
    assert packing.pack_for_decoding(small_model) == 0
    assert packs(small_model) == []


def test_the_layout_is_timed_once_and_remembered_across_processes(small_model, fresh_layout_cache, monkeypatch):
    """The real timing runs the model in each layout and leaves nothing packed behind; the
    decision is reused in this process and, through the cache file, by the next one."""
    timed = []
    real = packing.timer

    def counting(candidates, how):
        if how == "race":                                             # the layouts (not the few-rows kernels)
            timed.append(1)
        return real(candidates, how)

    monkeypatch.setattr(packing, "timer", counting)
    n_bytes = packing.pack_for_decoding(small_model)
    (saved,) = json.loads(fresh_layout_cache.read_text()).values()
    layout = None if saved == "none" else saved
    assert layout in (None, *packing.LAYOUTS) and timed == [1]
    assert (n_bytes > 0) == (layout is not None)
    assert {p.layout for p in packs(small_model)} == ({layout} if layout else set())
    assert list(json.loads(fresh_layout_cache.read_text()).values()) == [layout or "none"]
    packing.unpack(small_model)
    packing.pack_for_decoding(small_model)
    packing._LAYOUTS.forget()                                         # a new process
    assert packing.pack_for_decoding(small_model) == n_bytes
    assert timed == [1]


def test_a_corrupt_cache_file_is_timed_over(small_model, fresh_layout_cache, monkeypatch):
    fresh_layout_cache.parent.mkdir()
    fresh_layout_cache.write_text("{not json")
    monkeypatch.setattr(packing, "timer", timings({"transposed": 0.5}))
    assert packing.pack_for_decoding(small_model) > 0
    assert list(json.loads(fresh_layout_cache.read_text()).values()) == ["transposed"]


@pytest.mark.parametrize("value, packed", [("none", False), ("transposed", True), (" ", True)])
def test_the_environment_forces_a_layout(small_model, fresh_layout_cache, monkeypatch, value, packed):
    """TINYLLAMA_PACKING, read once by a CLI (tinyllama.runtime), reaches the packer as its layout."""
    from tinyllama.runtime import RuntimeOptions

    monkeypatch.setattr(packing, "timer", timings({"transposed": 0.5}))   # what auto times
    layout = RuntimeOptions.from_env({"TINYLLAMA_PACKING": value}).packing
    assert (packing.pack_for_decoding(small_model, layout=layout) > 0) == packed
    backend = TorchBackend(small_model, runtime=RuntimeOptions(packing=layout))
    assert (backend.packed_bytes > 0) == packed
    backend.close()


def test_a_bad_packing_setting_is_a_clear_error(small_model, monkeypatch):
    from tinyllama.runtime import RuntimeOptions

    with pytest.raises(ValueError, match="TINYLLAMA_PACKING='fast': expected auto, none, transposed or onednn"):
        RuntimeOptions.from_env({"TINYLLAMA_PACKING": "fast"})
    with pytest.raises(ValueError, match="packing 'fast': expected auto, none, transposed or onednn"):
        packing.pack_for_decoding(small_model, layout="fast")


def test_the_timing_compares_every_layout_against_unpacked(small_model, monkeypatch):
    """With the forward timed by a fake clock that makes the onednn layout fastest (or nothing
    clearly faster), the decision follows the clock."""
    seen = []
    real_forward = type(small_model).forward

    def forward(self, ids, start_pos=None):
        p = packing.pack_of(self.lm_head)
        seen.append(None if p is None else p.layout)
        return real_forward(self, ids, start_pos)

    monkeypatch.setattr(type(small_model), "forward", forward)
    monkeypatch.setattr(packing, "onednn_supports", lambda dtype: True)
    for cost, want in [({None: 1.0, "transposed": 0.8, "onednn": 0.5}, "onednn"),
                       ({None: 1.0, "transposed": 0.95, "onednn": 0.97}, None)]:
        seen.clear()

        def perf_counter(cost=cost):
            # the clock is the summed cost of the forwards run so far: each costs its layout's
            return sum(cost[layout] for layout in seen)

        monkeypatch.setattr(packing.time, "perf_counter", perf_counter)
        plan = packing._plan(small_model)
        assert packing._fastest_layout(small_model, plan, budget=1 << 30, model_bytes=1 << 20) == want
        assert set(seen) == {None, "transposed", "onednn"} and packs(small_model) == []


def test_the_budget_caps_the_copies(small_model, always_packed):
    lm_head_bytes = small_model.lm_head.weight.numel() * 4
    n_bytes = packing.pack_for_decoding(small_model, max_bytes=lm_head_bytes - 1)
    assert 0 < n_bytes < lm_head_bytes and packing.pack_of(small_model.lm_head) is None
    assert packing.pack_of(small_model.model.layers[0].self_attn) is not None
    assert packing.default_pack_budget() >= packing.MIN_PACK_BUDGET


@pytest.mark.parametrize("layout", ["transposed", pytest.param("onednn", marks=_NO_ONEDNN)])
def test_the_few_rows_decision_follows_the_timing_and_is_cached(layout, monkeypatch):
    """Row-major wins only by 20%: the decision follows the (fake) timings, is made once per
    shape, dtype and layout, and the real timing runs both kernels on the right shapes."""
    key = (48, 32, torch.float32, layout)
    for packed, rowmajor, want in [(1.0, 0.7, True), (1.0, 0.85, False), (1.0, 1.5, False)]:
        packing._ROWMAJOR_FEW_ROWS_IS_FASTER.pop(key, None)
        seen = []

        def fake(candidates, how, times=(packed, rowmajor)):
            seen.append([tuple(f().shape) for f in candidates])          # both kernels, same output
            return list(times)

        monkeypatch.setattr(packing, "timer", fake)
        assert packing._rowmajor_few_rows_is_faster(48, 32, torch.float32, layout, flush_bytes=1 << 20) is want
        assert packing._rowmajor_few_rows_is_faster(48, 32, torch.float32, layout, flush_bytes=1 << 20) is want
        assert seen == [[(packing.VERIFY_ROWS, 48), (packing.VERIFY_ROWS, 48)]]      # timed once
    monkeypatch.undo()
    packing._ROWMAJOR_FEW_ROWS_IS_FASTER.pop(key, None)
    real = packing._rowmajor_few_rows_is_faster(48, 32, torch.float32, layout, flush_bytes=1 << 20)
    assert packing._ROWMAJOR_FEW_ROWS_IS_FASTER[key] is real


def test_an_unknown_layout_or_few_rows_path_is_refused(small_model):
    with pytest.raises(ValueError, match="layout 'blocked'"):
        packing.PackedLinears(small_model, ["lm_head"], layout="blocked")
    mlp = small_model.model.layers[0].mlp
    with pytest.raises(ValueError, match="few_rows 'rowmajor'"):
        packing.PackedLinears(mlp, ["gate_proj", "up_proj"], few_rows="rowmajor")


def test_backend_packs_and_close_unpacks(small_model, always_packed):
    backend = TorchBackend(small_model)
    assert backend.packed_bytes > 0 and packs(small_model)
    prompt = [1, 5, 9, 2]
    ids = list(generate(backend, prompt, max_new_tokens=6))
    backend.close()
    assert packs(small_model) == []
    with torch.no_grad():                  # the same greedy tokens with the plain modules
        context = list(prompt)
        for _ in range(6):
            context.append(int(small_model(torch.tensor([context]))[0, -1].argmax()))
    assert ids == context[len(prompt):]


def test_generate_on_a_bare_llama_neither_packs_nor_times(small_model, always_packed, monkeypatch):
    """A model in training (pretrain's samples, SFT's previews) is decoded as it is: no layout
    timing (up to ~40 s for 1.1B), no inference-only copies."""
    import tinyllama.inference.backends

    monkeypatch.setattr(tinyllama.inference.backends, "pack_for_decoding", lambda *a, **k: pytest.fail("packed a bare model"))
    monkeypatch.setattr(packing, "timer", never_timed("timed a bare model"))
    assert len(list(generate(small_model, [1, 2, 3], max_new_tokens=3))) == 3
    assert packs(small_model) == []


def test_packing_swaps_classes_in_place_and_back(small_model, always_packed):
    """Packed modules are subclasses installed on the instances: same parameters, same
    state-dict names; unpack restores the plain classes."""
    from tinyllama.model.model import MLP, Attention

    names = list(small_model.state_dict())
    params = [id(p) for p in small_model.parameters()]
    packing.pack_for_decoding(small_model)
    attn, mlp = small_model.model.layers[0].self_attn, small_model.model.layers[0].mlp
    assert type(attn) is packing.PackedAttention and type(mlp) is packing.PackedMLP
    assert type(attn.o_proj) is packing.PackedLinear and type(small_model.lm_head) is packing.PackedLinear
    assert isinstance(attn, Attention) and isinstance(mlp, MLP)
    assert list(small_model.state_dict()) == names and [id(p) for p in small_model.parameters()] == params
    packing.unpack(small_model)
    assert type(attn) is Attention and type(mlp) is MLP and type(small_model.lm_head) is nn.Linear
    assert packs(small_model) == []


def test_decoding_leaves_normal_tensors_behind(small_config):
    """The backend decodes under inference_mode; nothing it leaves on the model (KV cache, rope
    tables first built during generation, returned logits) may be an inference tensor, or a
    later training step or cached no_grad forward would fail."""
    from tinyllama import Llama

    torch.manual_seed(0)
    model = Llama(small_config)
    model.rope.build(2)                          # too short: rebuilt during the first decode
    backend = TorchBackend(model)
    logits = backend.logits([1, 2, 3, 4], n_last=2)
    logits[0, 0] = 0.0                           # callers may edit what they get
    assert model.rope.cos.shape[0] >= 4 and not model.rope.cos.is_inference()
    assert not backend.cache.k.is_inference()
    with torch.no_grad():
        model(torch.tensor([[5]]), backend.cache, Step.span(4, 1))  # writes into the cache outside inference_mode
    model.train()
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    assert model.model.embed_tokens.weight.grad is not None
