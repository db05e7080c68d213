"""Drafters and draft policies (tinyllama.inference.drafters, .draft_policy): the one parse of
`--draft-max`, each policy's k, the busy-server cap as a wrapper, both drafters behind one
protocol, and the old flag names kept as aliases that say which flag to use instead."""

from __future__ import annotations

import argparse

import pytest
import torch
from test_generate import naive_greedy, noisy_pair

from tinyllama.cli import add_draft_model_flag
from tinyllama.inference.backends import TorchBackend
from tinyllama.inference.draft_policy import (
    DEFAULT_P_MIN,
    MAX_ADAPTIVE_DRAFT,
    Adaptive,
    Auto,
    Capped,
    DraftPolicy,
    DraftPolicyError,
    Fixed,
    add_draft_policy_flags,
    draft_policy_of,
    with_p_min,
)
from tinyllama.inference.backends import open_drafter
from tinyllama.inference.drafters import Drafter, ModelDrafter
from tinyllama.inference.generate import generate
from tinyllama.inference.lookup import NgramDrafter

# ---- DraftPolicy.parse -------------------------------------------------------------------------


@pytest.mark.parametrize("spec,policy", [("4", Fixed(4)), (1, Fixed(1)), (" 7 ", Fixed(7)), ("adaptive", Adaptive(4)),
                                         ("adaptive:2", Adaptive(2)), ("auto", Auto())])
def test_parse_reads_each_policy_and_its_spec_reads_back(spec, policy):
    parsed = DraftPolicy.parse(spec)
    assert type(parsed) is type(policy) and parsed.spec == policy.spec
    assert DraftPolicy.parse(parsed.spec).spec == parsed.spec
    assert DraftPolicy.parse(parsed) is parsed                    # a policy passes through whole


@pytest.mark.parametrize("spec,message", [
    ("0", "the draft length must be an integer >= 1 (or auto), got 0"),
    ("-2", "the draft length must be an integer >= 1 (or auto), got -2"),
    ("adaptive:0", "the draft length must be an integer >= 1 (or auto), got 0"),
    ("many", "expected auto, adaptive[:K] or an integer K >= 1, got 'many'"),
    ("auto:3", "expected auto, adaptive[:K] or an integer K >= 1, got 'auto:3'"),
    ("adaptive:", "expected auto, adaptive[:K] or an integer K >= 1, got 'adaptive:'"),
    ("2.5", "expected auto, adaptive[:K] or an integer K >= 1, got '2.5'"),
    ("", "expected auto, adaptive[:K] or an integer K >= 1, got ''"),
])
def test_parse_refuses_what_is_not_a_policy(spec, message):
    with pytest.raises(DraftPolicyError) as e:
        DraftPolicy.parse(spec)
    assert str(e.value) == message
    with pytest.raises(DraftPolicyError, match="draft length"):
        Fixed(0)


# ---- each policy ----------------------------------------------------------------------------------

def test_fixed_drafts_k_within_the_cap():
    policy = Fixed(4)
    assert policy.start() is policy and not policy.decoding_plainly
    assert [policy.choose(cap) for cap in (10, 4, 2, 0)] == [4, 4, 2, 0]
    policy.record_round(4, 0, 0.1, 0.1)
    policy.record_step(0.1)
    assert policy.choose(10) == 4 and str(policy) == "k=4"


def test_adaptive_grows_after_full_acceptance_and_shrinks_after_a_rejection():
    shared = Adaptive(3)
    policy = shared.start()
    assert policy is not shared and policy.choose(10) == 3
    policy.record_round(3, 3, 0.1, 0.1)                    # all accepted: +2
    assert policy.choose(10) == 5 and policy.choose(2) == 2
    policy.record_round(2, 2, 0.1, 0.1)                    # all of a capped round accepted: +2 still
    assert policy.k == 7
    policy.record_round(7, 4, 0.1, 0.1)                    # a rejection: -1
    assert policy.k == 6
    for _ in range(10):
        policy.record_round(policy.k, 0, 0.1, 0.1)
    assert policy.k == 1                                    # never below 1
    for _ in range(20):
        policy.record_round(policy.k, policy.k, 0.1, 0.1)
    assert policy.k == MAX_ADAPTIVE_DRAFT
    assert shared.k == 3 and shared.start().k == 3          # each generation starts again at K


def test_auto_is_one_policy_across_generations():
    policy = Auto()
    assert policy.start() is policy and policy.spec == "auto"
    assert policy.choose(8) == 0 and not policy.decoding_plainly          # a plain step is measured first
    policy.record_step(0.01)
    assert policy.decoding_plainly and policy.choose(8) == 2              # then a round measures the draft


# ---- the busy cap ------------------------------------------------------------------------------------

def test_capped_is_its_policy_while_few_slots_are_busy_and_plain_otherwise():
    busy = [1]
    capped = Capped(Auto(), busy=lambda: busy[0], max_busy=1).start()
    assert capped.spec == "auto" and "at most 1 busy" in str(capped)
    assert capped.choose(8) == 0 and not capped.decoding_plainly
    capped.record_step(0.01)
    assert capped.policy.t_step == pytest.approx(0.01) and capped.policy.plain_run == 1
    busy[0] = 3
    assert capped.decoding_plainly and capped.choose(8) == 0
    capped.record_step(5.0)                                   # a step the policy did not choose: not told
    assert capped.policy.t_step == pytest.approx(0.01) and capped.policy.plain_run == 1
    busy[0] = 1
    assert capped.choose(8) == 2                              # the policy's own next choice


def test_capped_starts_what_it_wraps():
    shared = Capped(Adaptive(2), busy=lambda: 0)
    started = shared.start()
    assert isinstance(started, Capped) and started.policy is not shared.policy and started.policy.k == 2
    started.record_round(2, 2, 0.1, 0.1)
    assert started.choose(10) == 4 and shared.policy.k == 2


def test_a_busy_server_decodes_plainly_and_the_same_tokens(small_config):
    target, draft = noisy_pair(small_config)
    prompt = [1, 7, 3]
    plain = naive_greedy(target, prompt, 20)
    d = TorchBackend(draft)
    gen = generate(target, prompt, max_new_tokens=20, drafter=d, draft_policy=Capped(Fixed(3), busy=lambda: 2))
    assert list(gen) == plain
    assert gen.stats.drafted == 0 and d.cached_tokens() == 0   # not even the draft's prefill
    busy = [2]
    gen = generate(target, prompt, max_new_tokens=20, drafter=TorchBackend(draft),
                   draft_policy=Capped(Fixed(3), busy=lambda: busy[0]))
    out = [next(gen) for _ in range(5)]
    busy[0] = 1                                                 # a slot freed: rounds from here on
    out += list(gen)
    assert out == plain and gen.stats.drafted > 0 and gen.stats.target_calls < 19


def test_every_policy_carries_p_min_and_the_cap_passes_it_on():
    assert Fixed(3).p_min == 0.0 and str(Fixed(3)) == "k=3"                 # a fixed k drafts k
    assert Auto().p_min == Adaptive().p_min == DEFAULT_P_MIN > 0
    for policy in (Fixed(3), Adaptive(2), Auto(), Capped(Auto(), busy=lambda: 0)):
        before = policy.p_min
        sure = with_p_min(policy, 0.75)
        assert sure.p_min == 0.75 and sure.spec == policy.spec and policy.p_min == before   # a copy
        assert "p-min 0.75" in str(sure)
        assert sure.start().p_min == 0.75                       # Adaptive's per-generation copy keeps it
    assert str(with_p_min(Auto(), 0.25)) == "auto k, p-min 0.25" and str(with_p_min(Auto(), 0)) == "auto k"
    for bad in (-0.1, 1.0, 2, float("nan")):
        with pytest.raises(DraftPolicyError, match=r"--draft-p-min\) must be in \[0, 1\)"):
            with_p_min(Fixed(2), bad)


# ---- drafters ------------------------------------------------------------------------------------------

def test_both_drafters_are_drafters(small_config):
    target, draft = noisy_pair(small_config)
    model = ModelDrafter(TorchBackend(draft))
    assert isinstance(model, Drafter) and isinstance(NgramDrafter(), Drafter)
    assert not isinstance(TorchBackend(draft), Drafter)
    context = [1, 7, 3]
    tokens, qs = model.draft(context, 3, lambda logits, ctx: (int(logits.argmax()), None))
    assert tokens == naive_greedy(draft, context, 3) and qs is None     # greedy: point masses

    def sample(logits, ctx):
        q = torch.softmax(logits.float(), -1)
        return int(q.argmax()), q
    tokens, qs = model.draft(context, 2, sample)
    assert len(tokens) == 2 and [q.shape for q in qs] == [(small_config.vocab_size,)] * 2
    assert NgramDrafter(2).draft([5, 6, 7, 5, 6], 2, sample) == ([7, 5], None)
    model.close()


def test_open_drafter_reads_lookup_or_loads_a_model(tiny_chat_checkpoint, llama2_tokenizer):
    lookup = open_drafter("ngram:2")
    assert isinstance(lookup, NgramDrafter) and lookup.max_ngram == 2
    model = open_drafter(tiny_chat_checkpoint, dtype="float32", device="cpu")
    try:
        assert isinstance(model, ModelDrafter) and model.context_length == 256 and model.name
    finally:
        model.close()


# ---- the flags, and their old names ------------------------------------------------------------------

def draft_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    add_draft_model_flag(ap, "a draft model")
    add_draft_policy_flags(ap)
    return ap


@pytest.mark.parametrize("new,old", [
    (["-md", "d.gguf"], ["--draft", "d.gguf"]),
    (["--model-draft", "d.gguf", "--draft-max", "3"], ["--draft", "d.gguf", "--num-draft", "3"]),
    (["--draft-max", "adaptive:1"], ["--num-draft", "1", "--adaptive-draft"]),
    (["--draft-max", "adaptive:1"], ["--adaptive-draft", "--num-draft", "1"]),
    (["--draft-max", "auto"], ["--adaptive-draft"]),          # adaptive never changed auto
])
def test_old_flag_names_do_what_the_new_ones_do_and_say_so(new, old, capsys):
    ap = draft_parser()
    a = ap.parse_args(new)
    assert capsys.readouterr().err == ""
    b = ap.parse_args(old)
    lines = capsys.readouterr().err.splitlines()
    renamed = {"--draft": "use --model-draft", "--num-draft": "use --draft-max",
               "--adaptive-draft": "use --draft-max adaptive[:K]"}
    assert len(lines) == sum(f in renamed for f in old)        # one line for each old flag
    for flag, line in zip([f for f in old if f in renamed], lines):
        assert line == f"warning: {flag} is an old name: {renamed[flag]}"
    assert a.model_draft == b.model_draft
    assert str(draft_policy_of(a)) == str(draft_policy_of(b))


def test_draft_p_min_flag(capsys):
    ap = draft_parser()
    policy = draft_policy_of(ap.parse_args(["--draft-max", "adaptive:2", "--draft-p-min", "0.8"]))
    assert isinstance(policy, Adaptive) and policy.first == 2 and policy.p_min == 0.8
    assert draft_policy_of(ap.parse_args([])).p_min == DEFAULT_P_MIN                   # auto's own
    assert draft_policy_of(ap.parse_args(["--draft-max", "3"])).p_min == 0.0
    assert draft_policy_of(ap.parse_args(["--draft-max", "3", "--draft-p-min", "0.6"])) == Fixed(3, p_min=0.6)
    for bad in ("1.5", "-1", "sure"):
        with pytest.raises(SystemExit) as e:
            ap.parse_args(["--draft-p-min", bad])
        assert e.value.code == 2
        assert f"--draft-p-min: expected a probability in [0, 1), got '{bad}'" in capsys.readouterr().err


def test_defaults_and_help():
    ap = draft_parser()
    a = ap.parse_args([])
    assert a.model_draft is None and isinstance(draft_policy_of(a), Auto)
    assert ap.parse_args([]).draft_max is not a.draft_max         # each parse makes its own Auto
    text = ap.format_help()
    assert "--model-draft" in text and "--draft-max" in text and "--num-draft" not in text


def test_bench_speculative_takes_both_names(capsys):
    from bench.speculative import parse_args

    assert parse_args([]).model_draft == "out/draft/sft"
    assert parse_args(["-md", "tinyllama-debug"]).model_draft == "tinyllama-debug"
    assert parse_args(["--draft", "tinyllama-debug"]).model_draft == "tinyllama-debug"
    assert "warning: --draft is an old name: use --model-draft" in capsys.readouterr().err


def test_complete_cli_with_old_and_new_flags(tiny_chat_checkpoint, capsys):
    """The target drafting for itself, adaptive from 1 with no p-min stop: k = 1, 3, 5, all accepted."""
    from serve.complete import main

    ckpt = str(tiny_chat_checkpoint)
    base = ["--model", ckpt, "--prompt", "Hi", "--max-tokens", "12", "--dtype", "float32", "--draft-p-min", "0"]
    for flags, warnings in [(["-md", ckpt, "--draft-max", "adaptive:1"], 0),
                            (["--draft", ckpt, "--num-draft", "1", "--adaptive-draft"], 3)]:
        assert main(base + flags) == 0
        err = capsys.readouterr().err
        assert "9/9 drafted tokens accepted (100%)" in err and "mean k 3.0" in err, err
        assert err.count("is an old name: use --") == warnings
        assert "adaptive k from 1" in err                       # the policy, said at start-up


def test_a_batching_engine_caps_its_policy(tiny_chat_checkpoint, llama2_tokenizer):
    from serve.engine import Engine

    policy = Fixed(2)
    one = Engine.load(str(tiny_chat_checkpoint), draft="ngram", draft_policy=policy, dtype="float32")
    many = Engine.load(str(tiny_chat_checkpoint), draft="ngram", draft_policy=policy, dtype="float32", parallel=2)
    try:
        assert one.policy is policy
        assert isinstance(many.policy, Capped) and many.policy.policy is policy and many.policy.max_busy == 1
        assert many.policy.busy() == 0
    finally:
        one.close()
        many.close()
