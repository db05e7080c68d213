"""The constructed speculative pair (bench.constructed_pair): the target computes the draft's own
function in PyTorch and through our GGUF writer in llama.cpp, its lm_head noise gives the
calibrated agreement; and the llama.cpp anchor (llama-speculative-simple) of bench.speculative."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.constructed_pair import build_pair, calibrate_noise, check_embeddable, embed_draft
from bench.speculative_anchor import parse_report
from tinyllama import KVCache, Llama, ModelConfig, Step

DRAFT = ModelConfig(name="d", n_layer=2, d_model=64, n_head=4, n_kv_head=2, ffn_dim=96, max_seq_len=256)
# one target KV head per draft KV group (GQA kept), a wider FFN and an extra identity layer
TARGET = ModelConfig(name="t", n_layer=3, d_model=128, n_head=4, n_kv_head=2, ffn_dim=160, max_seq_len=256)


def _draft(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    draft = Llama(DRAFT).eval()
    with torch.no_grad():        # norms away from 1, so their mapping is exercised
        for n, p in draft.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return draft


@pytest.mark.parametrize("n_kv_head", [2, 4])
def test_embedded_target_computes_the_draft_in_fp32(n_kv_head):
    draft = _draft()
    target = embed_draft(draft, TARGET.replace(n_kv_head=n_kv_head))
    ids = torch.randint(0, 32000, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = draft(ids), target(ids)
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()
        # the KV-cache path: prefill, then a 3-token verification
        dc, tc = KVCache.for_model(draft, 2, 64), KVCache.for_model(target, 2, 64)
        draft(ids[:, :30], dc, Step.span(0, 30)), target(ids[:, :30], tc, Step.span(0, 30))
        va, vb = draft(ids[:, 30:33], dc, Step.span(30, 3)), target(ids[:, 30:33], tc, Step.span(30, 3))
    assert (va - vb).abs().max() <= 1e-5 * va.abs().max()


def test_shapes_that_cannot_hold_the_draft_are_named():
    with pytest.raises(ValueError, match="target width 96 != 2 x draft width 64"):
        check_embeddable(DRAFT, TARGET.replace(d_model=96, n_head=4))
    with pytest.raises(ValueError, match="single draft KV group"):
        check_embeddable(DRAFT, TARGET.replace(n_kv_head=1))


def test_noise_is_calibrated_to_the_chosen_agreement():
    g = torch.Generator().manual_seed(0)
    draft = torch.randn(400, 1000, generator=g)
    target = draft + 0.01 * torch.randn(400, 1000, generator=g)       # quantization: a few near-ties move
    push = torch.randn(400, 1000, generator=g)
    floor = (target.argmax(-1) == draft.argmax(-1)).float().mean().item()
    assert 0.8 < floor < 1.0
    for alpha in (0.6, 0.7):
        sigma, agreement = calibrate_noise(draft, target, push, alpha)
        assert sigma > 0 and alpha - 2 / 400 <= agreement <= alpha
    # above what the pair reaches without noise: no noise, and the floor says so
    assert calibrate_noise(draft, target, push, 0.999) == (0.0, floor)


@pytest.mark.llamacpp
def test_constructed_gguf_pair_in_llama_cpp(tmp_path, llama2_tokenizer):
    """Through our GGUF writer (q/k permuted for llama.cpp's RoPE) the target reproduces the
    draft's logits with no noise, and with noise agrees on about the calibrated fraction."""
    llama_cpp = pytest.importorskip("llama_cpp")
    prompts = [llama2_tokenizer.encode(t) for t in ("Hello there, how are you today?", "Write a poem about the sea.")]
    ids = prompts[0] + list(range(100, 140))
    for alpha in (1.0, 0.7):
        where = tmp_path / str(alpha)
        where.mkdir()
        info = build_pair(DRAFT, TARGET, alpha, "f32", 0, prompts, llama2_tokenizer, where, say=lambda m: None)
        assert sorted(p.name for p in where.iterdir()) == ["draft.gguf", "target.gguf"]
        models = [llama_cpp.Llama(str(where / f), n_ctx=256, logits_all=True, verbose=False)
                  for f in ("draft.gguf", "target.gguf")]
        try:
            for m in models:
                m.eval(ids)
            a, b = (m.scores[:len(ids)].copy() for m in models)
        finally:
            for m in models:
                m.close()
        if alpha == 1.0:
            assert info["sigma"] == 0 and np.abs(a - b).max() <= 1e-3 * np.abs(a).max()
        else:
            assert info["calibration_positions"] == 2 * 64 and info["agreement_without_noise"] > 0.95
            assert 0.7 - 2 / 128 <= info["calibrated_agreement"] <= 0.7 and info["sigma"] > 0
            assert 0.3 < (a.argmax(-1) == b.argmax(-1)).mean() < 1.0      # noise moved some argmaxes, not all


LLAMA_SPECULATIVE_TAIL = """
encoded   25 tokens in    0.052 seconds, speed:  480.769 t/s
decoded   35 tokens in    0.311 seconds, speed:  112.540 t/s

n_draft   = 4
n_predict = 35
n_drafted = 36
n_accept  = 26
accept    = 72.222%
"""


def test_llama_speculative_report_is_parsed():
    rep = parse_report(LLAMA_SPECULATIVE_TAIL)
    assert rep == {"tokens": 35, "seconds": 0.311, "prompt_tokens": 25, "n_drafted": 36, "n_accept": 26}
    with pytest.raises(RuntimeError, match="no 'decoded N tokens' line"):
        parse_report("error: failed to load model")


def flaky_tool(tmp_path, report: str, lost: int) -> Path:
    """An executable standing in for a llama.cpp tool: exits 0 with its closing report lost the
    first `lost` times (llama.cpp's unflushed log worker on a loaded machine), then prints it."""
    script = tmp_path / "tool"
    (tmp_path / "runs").write_text("0")
    script.write_text(f"""#!{sys.executable}
import pathlib
runs = pathlib.Path({str(tmp_path / "runs")!r})
n = int(runs.read_text()) + 1
runs.write_text(str(n))
print("generated text")
if n > {lost}:
    print({report!r})
""")
    script.chmod(0o755)
    return script


def test_a_run_whose_log_was_lost_at_exit_runs_again(tmp_path, monkeypatch):
    from bench import speculative_anchor
    from quantize.imatrix import run_tool
    from tinyllama.llamacpp import tools as llama_cpp_tools

    script = flaky_tool(tmp_path, LLAMA_SPECULATIVE_TAIL, lost=2)
    monkeypatch.setattr(llama_cpp_tools, "tool", lambda name, **kw: script)
    assert speculative_anchor.run_once("t.gguf", "d.gguf", "hi", 8, 2)["tokens"] == 35
    assert (tmp_path / "runs").read_text() == "3"
    script = flaky_tool(tmp_path, "Final estimate: PPL = 12.5", lost=1)
    assert "Final estimate: PPL = 12.5" in run_tool([str(script)], "perplexity", expect="Final estimate")
    script = flaky_tool(tmp_path, LLAMA_SPECULATIVE_TAIL, lost=llama_cpp_tools.LOST_LOG_ATTEMPTS)
    with pytest.raises(RuntimeError, match="no 'decoded N tokens' line"):       # lost every time: said so
        speculative_anchor.run_once("t.gguf", "d.gguf", "hi", 8, 2)


@pytest.mark.slow
@pytest.mark.llamacpp
@pytest.mark.usefixtures("llama_cpp_tools")
def test_bench_speculative_with_the_llama_cpp_anchor(tmp_path, llama2_tokenizer, capsys):
    """Two GGUFs: llama-speculative-simple runs beside ours on the same prompts; the target
    drafting for itself is accepted every time by both."""
    pytest.importorskip("llama_cpp")
    from bench import speculative

    build_pair(DRAFT, TARGET, 1.0, "f32", 0, [], llama2_tokenizer, tmp_path, say=lambda m: None)
    target = str(tmp_path / "target.gguf")
    speculative.main(["--target", target, "--model-draft", target, "--anchor", "--k", "2", "--tokens", "12",
                      "--prompts", "2", "--repeats", "1", "--json"])
    rows = {r["config"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    ours, theirs = rows["speculative k=2"], rows["llama.cpp's llama-speculative-simple k=2"]
    assert ours["accepted_per_drafted"] == 1.0 and theirs["accepted_per_drafted"] == 1.0
    assert ours["v"] > 0 and ours["theory_v"] > 0 and ours["vs_llama_cpp"] > 0 and theirs["tokens_per_s"] > 0
