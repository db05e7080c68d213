"""The streaming generator: plain decoding against a cache-free reference, stats, and speculative
decoding: token-identical to greedy at temperature 0 (PyTorch and llama.cpp backends), and
distributed exactly as the target when sampling (chi-square on stub models with known
distributions), with both caches rolled back to the accepted tokens after every step."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from tinyllama import Llama, ModelConfig
from tinyllama.inference.backends import Backend, TorchBackend
from tinyllama.inference.draft_policy import HOPELESS_PROBE_GAP, Adaptive, Auto, Capped, Fixed
from tinyllama.inference.drafters import ModelDrafter
from tinyllama.inference.interface import common_prefix
from tinyllama.inference.generate import SamplingParams, argmax, generate, process_logits


def random_llama(cfg: ModelConfig, seed: int) -> Llama:
    torch.manual_seed(seed)
    model = Llama(cfg).eval()
    with torch.no_grad():      # sharper distributions than the tiny init gives: fewer near-ties
        model.lm_head.weight.mul_(30)
    return model


def noisy_pair(cfg: ModelConfig) -> tuple[Llama, Llama]:
    """A target and a draft that agrees with it often but not always: the target's weights
    plus noise (an unrelated random draft would almost never be accepted)."""
    target = random_llama(cfg, 0)
    draft = Llama(cfg).eval()
    draft.load_state_dict(target.state_dict())
    torch.manual_seed(1)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * p.std() * 0.1)
    return target, draft


@pytest.fixture
def pair(small_config):
    return noisy_pair(small_config)


def naive_greedy(model: Llama, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


# ---- plain decoding ------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [
    torch.randn(49152),
    torch.tensor([1.0, 3.0, 3.0, 2.0]),                    # equal maxima: the first
    torch.tensor([1.0, float("nan"), 3.0]),                # NaN counts as the largest, as in torch
    torch.tensor([-float("inf"), -float("inf")]),
    torch.randn(64, 7)[:, 3],                              # strided
    torch.randn(500).bfloat16(),                           # no numpy dtype: torch's own
], ids=["vocab", "ties", "nan", "all -inf", "strided", "bf16"])
def test_argmax_is_torchs(values):
    assert argmax(values) == int(values.argmax())


def test_plain_greedy_equals_full_forward_and_reports_stats(pair):
    target, _ = pair
    prompt = [1, 5, 9, 13]
    gen = generate(target, prompt, max_new_tokens=20)
    out = list(gen)
    assert out == naive_greedy(target, prompt, 20)
    s = gen.stats
    assert (s.prompt_tokens, s.generated_tokens, s.stop_reason, s.drafted) == (4, 20, "length", 0)
    assert s.tokens_per_s > 0 and "20 generated" in s.describe()
    # a bare Llama keeps no state of the generation: the KV cache was the backend's
    assert {name for name, _ in target.named_buffers()} == {"rope.cos", "rope.sin"}


@pytest.mark.parametrize("sampling, logprobs, asks", [
    (SamplingParams(max_new_tokens=6), None, "argmax"),
    (SamplingParams(max_new_tokens=6), 2, "logits"),                        # logprobs read the logits
    (SamplingParams(max_new_tokens=6, repetition_penalty=1.3), None, "logits"),
    (SamplingParams(max_new_tokens=6, temperature=0.8, seed=0), None, "logits"),
])
def test_greedy_decoding_asks_the_target_for_its_token_alone(pair, sampling, logprobs, asks):
    """Where nothing reads the logits (greedy, no penalty, no logprobs) a plain step asks
    Backend.argmax, which a batching slot answers without copying the row out; the tokens are
    the same either way."""
    calls = Counter()

    class Counting(TorchBackend):
        def logits(self, context, n_last=1):
            calls["logits"] += 1
            return super().logits(context, n_last)

        def argmax(self, context):
            calls["argmax"] += 1
            return super().argmax(context)
    counted = list(generate(Counting(pair[0], pack=False), [1, 5, 9], sampling, logprobs=logprobs))
    assert counted == list(generate(TorchBackend(pair[0], pack=False), [1, 5, 9], sampling, logprobs=logprobs))
    if asks == "argmax":       # Backend.argmax itself reads the logits: once per token, through it
        assert calls["argmax"] == calls["logits"] == len(counted)
    else:
        assert calls["argmax"] == 0 and calls["logits"] == len(counted)


def test_stop_ids_and_cancel(pair):
    target, _ = pair
    prompt = [1, 5, 9, 13]
    full = naive_greedy(target, prompt, 12)
    stop = full[5]
    gen = generate(target, prompt, max_new_tokens=12, stop_ids=[stop])
    out = list(gen)
    assert out == full[: full.index(stop) + 1] and gen.stats.stop_reason == "stop_id"
    gen = generate(target, prompt, max_new_tokens=12)
    next(gen), next(gen)
    gen.close()
    assert gen.stats.stop_reason == "cancelled" and gen.stats.generated_tokens == 2
    assert list(generate(target, prompt, max_new_tokens=0)) == []


def test_bad_arguments(pair):
    target, _ = pair
    with pytest.raises(ValueError, match="at least one prompt token"):
        generate(target, [])
    with pytest.raises(ValueError, match="draft length must be an integer >= 1"):
        generate(target, [1], draft_policy=Fixed(0))
    with pytest.raises(ValueError, match="exceed the context length"):
        list(generate(target, [1] * 65, max_new_tokens=1))


# ---- speculative decoding: greedy identity and rollback --------------------------------------------

def draft_confidences(draft: Llama, context: list[int]) -> list[float]:
    """The draft's probability of its own greedy pick after each prefix context[:i], i >= 1."""
    with torch.no_grad():
        probs = torch.softmax(draft(torch.tensor([context]))[0].float(), -1)     # (T, vocab)
    return probs.max(-1).values.tolist()


def test_p_min_drafts_only_what_the_draft_is_sure_of_and_keeps_the_output(pair):
    target, draft = pair
    prompt = [1, 7, 3]
    plain = list(generate(target, prompt, max_new_tokens=40))
    sure = draft_confidences(draft, prompt + plain)[len(prompt) - 1:]
    p_min = sorted(sure)[len(sure) // 2]                  # the median: about half the drafts pass
    # the drafter: the drafts without p-min, cut before the first whose probability is below p_min
    drafter = ModelDrafter(TorchBackend(draft))
    greedy = lambda logits, ctx: (int(logits.argmax()), None)
    for cut in range(0, 30, 3):
        context = prompt + plain[:cut]
        full, _ = drafter.draft(context, 6, greedy)
        drafter.trim(0)
        kept, _ = drafter.draft(context, 6, greedy, p_min)
        drafter.trim(0)
        p = draft_confidences(draft, context + full)[len(context) - 1:]
        n = next((i for i, x in enumerate(p[:6]) if x < p_min), 6)
        assert kept == full[:n]
    # the generator: the same tokens, fewer drafts a round, and a round that drafts none is a plain step
    gen = generate(TorchBackend(target), prompt, max_new_tokens=40, drafter=TorchBackend(draft),
                   draft_policy=Fixed(6, p_min=p_min))
    assert list(gen) == plain
    s = gen.stats
    assert 0 < s.drafted < 6 * s.draft_rounds
    assert s.target_calls > s.draft_rounds                # some rounds were plain steps



@pytest.mark.parametrize("policy", [Fixed(1), Fixed(3), Fixed(6), Adaptive(1), Adaptive(4)], ids=str)
def test_speculative_greedy_is_token_identical(pair, policy):
    target, draft = pair
    prompt = [1, 7, 3]
    plain = list(generate(target, prompt, max_new_tokens=40))
    t, d = TorchBackend(target), TorchBackend(draft)
    gen = generate(t, prompt, max_new_tokens=40, drafter=d, draft_policy=policy)
    context = list(prompt)
    snapshots = []
    for token in gen:
        context.append(token)
        snapshots += [list(b._cached) for b in (t, d)]
    # the caches only ever hold accepted tokens (rejected drafts are rolled back at once):
    # every snapshot is a prefix of the final sequence, at most one round ahead of the output
    for cached in snapshots:
        assert cached == context[: len(cached)]
    assert max(len(c) for c in snapshots) <= len(context)
    assert context[len(prompt):] == plain
    s = gen.stats
    assert s.generated_tokens == 40 and 0 < s.accepted < s.drafted
    assert s.target_calls < 40                    # fewer target passes than tokens


def test_a_perfect_draft_is_always_accepted(pair):
    target, _ = pair
    twin = Llama(target.config).eval()
    twin.load_state_dict(target.state_dict())
    gen = generate(target, [1, 2], max_new_tokens=21, drafter=twin, draft_policy=Fixed(4))
    assert list(gen) == naive_greedy(target, [1, 2], 21)
    assert gen.stats.acceptance_rate == 1.0 and gen.stats.target_calls == 21 // 5 + 1
    # adaptive k grows while every draft is accepted: k = 1, 3, 5, 7 give 2 + 4 + 6 + 8 tokens
    adaptive = generate(target, [1, 2], max_new_tokens=21, drafter=twin, draft_policy=Adaptive(1))
    assert list(adaptive) == naive_greedy(target, [1, 2], 21)
    s = adaptive.stats
    assert s.draft_rounds == 4 and s.drafted == 1 + 3 + 5 + 7 and s.target_calls == 5
    assert "mean k 4.0" in s.describe()


@pytest.mark.parametrize("draft, sampling", [(None, dict()), (None, dict(temperature=0.8, top_k=5, seed=3)),
                                             ("model", dict()), ("model", dict(temperature=1.0, seed=4)),
                                             ("ngram", dict())])
def test_logprobs_are_the_models_log_softmax(pair, draft, sampling):
    """Every produced token's logprob (and its top alternatives) is the target's own log-softmax
    of the raw logits at that position, however it was picked: plain, a speculative round's
    verification rows, prompt lookup; the prompt's are scored too (in chunks)."""
    from tinyllama.inference.lookup import NgramDrafter

    target, other = pair
    prompt = [1, 5, 9, 13, 5, 9, 13, 5, 9]
    drafter = {"model": other, "ngram": NgramDrafter(), None: None}[draft]
    gen = generate(target, prompt, max_new_tokens=12, drafter=drafter, draft_policy=Fixed(3), logprobs=4,
                   prompt_logprobs=True, **sampling)
    out = list(gen)
    ids = prompt + out
    with torch.no_grad():
        logp = torch.log_softmax(target(torch.tensor([ids]))[0], -1)                 # (T, V)
    scored = gen.prompt_logprobs + gen.token_logprobs
    assert [s.token for s in scored] == ids[1:]
    for i, s in enumerate(scored):
        assert s.logprob == pytest.approx(float(logp[i, ids[i + 1]]), abs=1e-4)
        values, top = torch.topk(logp[i], 4)
        assert [t for t, _ in s.top] == top.tolist()
        assert [v for _, v in s.top] == pytest.approx(values.tolist(), abs=1e-4)


def test_prompt_logprobs_alone_and_in_chunks(pair):
    from tinyllama.inference.generate import score_tokens

    target, _ = pair
    prompt = list(range(1, 40))
    gen = generate(target, prompt, max_new_tokens=0, prompt_logprobs=True)
    assert list(gen) == [] and gen.stats.stop_reason == "length"
    backend = TorchBackend(target, pack=False)
    chunked = score_tokens(backend, prompt, start=1, chunk=7)
    assert [s.logprob for s in gen.prompt_logprobs] == pytest.approx([s.logprob for s in chunked], abs=1e-4)
    assert len(chunked) == len(prompt) - 1 and score_tokens(backend, prompt[:1]) == []


def test_adaptive_k_shrinks_after_rejections(pair):
    target, draft = pair
    policy = Adaptive(6)
    gen = generate(target, [1, 7, 3], max_new_tokens=40, drafter=draft, draft_policy=policy)
    list(gen)
    # this random pair rejects often: k walks down from 6 towards 1
    assert gen.policy.k < 6 and gen.stats.drafted / gen.stats.draft_rounds < 6
    assert policy.k == 6                   # the generation adapted a copy: the next one starts at 6 again


def test_vocabulary_mismatch_is_refused(pair, small_config):
    target, _ = pair
    other = random_llama(small_config.replace(vocab_size=300), 2)
    with pytest.raises(ValueError, match="300 tokens but target"):
        generate(target, [1], drafter=other)


# ---- speculative sampling is exact ------------------------------------------------------------------

class Stub(Backend):
    """Logits of the next token depend only on the last token: table[last] (V,)."""

    def __init__(self, table: torch.Tensor, name: str) -> None:
        self.table, self.name = table, name
        self.vocab_size, self.context_length = table.shape[0], 10_000
        self.cached: list[int] = []

    def logits(self, context, n_last=1):
        self.cached = list(context)
        return torch.stack([self.table[c] for c in context[len(context) - n_last:]])

    def cached_tokens(self):
        return len(self.cached)

    def trim(self, n):
        del self.cached[n:]


@pytest.mark.slow
@pytest.mark.parametrize("sampling,adaptive", [(dict(temperature=1.0), False),
                                               (dict(temperature=0.7, top_k=4, repetition_penalty=1.5), False),
                                               (dict(temperature=1.0), True), (dict(temperature=1.0), "auto"),
                                               (dict(temperature=1.0), "p_min")])
def test_speculative_sampling_matches_the_target_distribution(sampling, adaptive):
    g = torch.Generator().manual_seed(0)
    target = Stub(torch.randn(6, 6, generator=g) * 1.5, "target")
    draft = Stub(torch.randn(6, 6, generator=g) * 1.5, "draft")
    # adaptive: k starts at 1 and changes with each round's outcome (k = 1 then 3, or 1 then 1)
    # auto: one policy across all trials, so its k varies with what it has seen
    # p_min: a round stops at a draft the draft gives p < 0.3, which depends on the draft alone
    policy = (Auto() if adaptive == "auto" else Fixed(2, p_min=0.3) if adaptive == "p_min" else
              Adaptive(1) if adaptive else Fixed(2))
    assert_target_distribution(target, [0], sampling, lambda s, n: generate(
        target, [0], max_new_tokens=n, seed=s, drafter=draft, draft_policy=policy, **sampling))


def assert_target_distribution(target: Stub, prompt: list[int], sampling: dict, draw, n: int = 3,
                               trials: int = 6000) -> None:
    """Chi-square: the first n tokens of `draw(seed, n)` over `trials` seeds against their exact
    distribution when sampling from the target alone."""
    V = target.vocab_size
    expected = {}
    for seq in itertools.product(range(V), repeat=n):
        prob, ctx = 1.0, list(prompt)
        for tok in seq:
            kw = {"top_k": None, "top_p": None, "repetition_penalty": 1.0, **sampling}
            prob *= float(process_logits(target.table[ctx[-1]], ctx, SamplingParams(**kw))[tok])
            ctx.append(tok)
        expected[seq] = prob
    counts = Counter(tuple(draw(s, n)) for s in range(trials))
    # chi-square over the outcomes with enough expected mass; the rest pooled
    cells = [seq for seq, p in expected.items() if p * trials >= 5]
    obs = [counts[c] for c in cells] + [trials - sum(counts[c] for c in cells)]
    exp = [expected[c] * trials for c in cells] + [trials * (1 - sum(expected[c] for c in cells))]
    pairs = [(o, e) for o, e in zip(obs, exp) if e > 0]
    chi2 = sum((o - e) ** 2 / e for o, e in pairs)
    dof = len(pairs) - 1
    # 99.9% quantile of chi-square(dof), Wilson-Hilferty approximation
    z = 3.09
    critical = dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3
    assert chi2 < critical, (chi2, critical, dof)


# ---- the llama.cpp backend -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_pair(tmp_path_factory):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by make setup")
    from quantize.export import write_gguf
    from tinyllama import Tokenizer, save_checkpoint

    tok = Tokenizer.llama2()
    target, draft = noisy_pair(ModelConfig.from_name("tinyllama-debug"))
    d = tmp_path_factory.mktemp("gguf-pair")
    files = {}
    for name, model in (("target", target), ("draft", draft)):
        save_checkpoint(model, tok, d / name)
        files[name] = write_gguf(d / name, d / f"{name}.gguf", "f32")
    return target, draft, tok, files


@pytest.mark.llamacpp
def test_gguf_backend_greedy_and_speculative(gguf_pair):
    from tinyllama.inference.backends import GGUFBackend, load_backend

    target, draft, tok, files = gguf_pair
    prompt = tok.encode("The meaning of life is")
    torch_plain = list(generate(target, prompt, max_new_tokens=24))
    g_target, g_draft = GGUFBackend(files["target"], n_ctx=128), GGUFBackend(files["draft"], n_ctx=128)
    try:
        assert list(generate(g_target, prompt, max_new_tokens=24)) == torch_plain
        # llama.cpp target and llama.cpp draft; PyTorch target and llama.cpp draft
        gen = generate(g_target, prompt, max_new_tokens=24, drafter=g_draft, draft_policy=Fixed(4))
        snapshots = []
        for _ in gen:
            snapshots.append(g_target.llm.input_ids[: g_target.cached_tokens()].tolist())
        final = prompt + torch_plain
        assert all(cached == final[: len(cached)] for cached in snapshots)     # rejected drafts rolled back
        assert gen.stats.generated_tokens == 24 and 0 < gen.stats.accepted < gen.stats.drafted
        assert list(generate(g_target, prompt, max_new_tokens=24, drafter=g_draft)) == torch_plain
        mixed = generate(TorchBackend(target, tok), prompt, max_new_tokens=24, drafter=g_draft, draft_policy=Fixed(3))
        assert list(mixed) == torch_plain
        assert g_target.vocab_fingerprint() == TorchBackend(target, tok).vocab_fingerprint()
        backend, gguf_tok = load_backend(files["target"])
        assert gguf_tok.encode("The meaning of life is") == prompt
        backend.close()
    finally:
        g_target.close()
        g_draft.close()


# ---- prompt lookup (n-gram) drafting ----------------------------------------------------------------

def test_ngram_proposals():
    from tinyllama.inference.lookup import NgramDrafter

    d = NgramDrafter(max_ngram=3)
    #            0  1  2  3  4  5  6  7  8  9
    context = [1, 5, 6, 7, 8, 9, 5, 6, 7, 2, 5, 6, 7]
    assert d.propose(context, 3) == [2, 5, 6]          # latest earlier "5 6 7" is at 6..8
    assert d.propose(context, 10) == [2, 5, 6, 7]      # never past the end of the context
    assert d.propose([1, 2, 3, 4], 4) == []             # no earlier match of any length
    assert d.propose([4, 9, 4], 2) == [9, 4]            # falls back to shorter n-grams
    assert NgramDrafter.parse("ngram").max_ngram == 3 and NgramDrafter.parse("ngram:5").max_ngram == 5
    assert NgramDrafter.parse("out/draft") is None and NgramDrafter.parse("org/ngram-model") is None


def test_ngram_drafting_is_token_identical_to_greedy(pair):
    from tinyllama.inference.lookup import NgramDrafter

    target, _ = pair
    prompt = [1, 7, 8, 9, 10, 11, 7, 8, 9, 10, 11, 7, 8]            # repetitive: lookups find matches
    ref = naive_greedy(target, prompt, 20)
    gen = generate(target, prompt, max_new_tokens=20, drafter=NgramDrafter(2), draft_policy=Fixed(3))
    assert list(gen) == ref
    assert gen.stats.drafted > 0 and gen.stats.draft_rounds > 0
    backend = TorchBackend(target)
    assert list(generate(backend, prompt, max_new_tokens=20, drafter=NgramDrafter(3), draft_policy=Adaptive())) == ref
    assert backend.cached_tokens() <= len(prompt) + 20


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_k=4, repetition_penalty=1.5)])
def test_ngram_sampling_matches_the_target_distribution(sampling):
    from tinyllama.inference.lookup import NgramDrafter

    target = Stub(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)) * 1.5, "target")
    prompt = [0, 1, 2, 0, 1]                 # the tail "0 1" recurs: the lookup proposes "2 0 ..."
    assert_target_distribution(target, prompt, sampling, lambda s, n: generate(
        target, prompt, max_new_tokens=n, seed=s, drafter=NgramDrafter(2), draft_policy=Fixed(2), **sampling))


# ---- auto draft length ---------------------------------------------------------------------------------

class VirtualClock:
    """The generator's clock, advanced only by SlowStub: the policy's timings are then exact, so
    the tests do not depend on how long sleeps and Python really take on the machine."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> VirtualClock:
    import tinyllama.inference.generate as gen_module

    virtual = VirtualClock()
    monkeypatch.setattr(gen_module, "time", virtual)
    return virtual


class SlowStub(Stub):
    """A Stub that takes time like a model on `clock`: `step` seconds a call plus `per_token` per
    extra position."""

    def __init__(self, table, name, clock, step, per_token=0.0):
        super().__init__(table, name)
        self.clock, self.step, self.per_token = clock, step, per_token

    def logits(self, context, n_last=1):
        self.clock.now += self.step + self.per_token * (n_last - 1)
        return super().logits(context, n_last)


class ReadingStub(Stub):
    """A Stub whose calls take `per_token` seconds on `clock` for each token it had not read."""

    def __init__(self, table, name, clock, per_token):
        super().__init__(table, name)
        self.clock, self.per_token = clock, per_token

    def logits(self, context, n_last=1):
        read = common_prefix(self.cached, context)
        self.clock.now += self.per_token * max(n_last, len(context) - read)
        return super().logits(context, n_last)


class Recording(Fixed):
    """Fixed(k) that keeps what each round reported."""

    def __init__(self, k):
        super().__init__(k)
        object.__setattr__(self, "reported", [])

    def record_round(self, k, accepted, draft_seconds, verify_seconds):
        self.reported.append((k, draft_seconds))


def test_a_draft_catching_up_after_plain_steps_is_not_charged_to_drafting(clock):
    """After plain steps (a busy server, or auto decoding plainly) the draft first reads what it
    missed, the prompt included: that one-off cost is the draft's, but the policy's per-token
    draft cost must not include it, or auto would judge drafting too dear and stay plain."""
    V = 8
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(6)) * 3
    tgt, draft = ReadingStub(table, "target", clock, 0.01), ReadingStub(table, "draft", clock, 0.001)
    policy, busy = Recording(2), [2]
    gen = generate(tgt, list(range(1, 8)) * 10, max_new_tokens=40, drafter=draft,
                   draft_policy=Capped(policy, busy=lambda: busy[0]))
    out = [next(gen) for _ in range(12)]            # 12 plain steps: the draft never read the prompt
    busy[0] = 1
    out += list(gen)
    assert out == list(generate(tgt, list(range(1, 8)) * 10, max_new_tokens=40))
    # each round's draft time: k calls reading one or two new tokens each, never the 82 missed
    assert policy.reported and all(s <= 0.001 * (k + 1) + 1e-9 for k, s in policy.reported)
    assert gen.stats.draft_seconds >= 0.001 * 80                 # the catch-up is still counted


def test_auto_draft_length_is_exact(pair):
    target, draft = pair
    prompt = [1, 5, 9, 2]
    ref = naive_greedy(target, prompt, 24)
    assert list(generate(target, prompt, max_new_tokens=24, drafter=draft, draft_policy=Auto())) == ref


def test_auto_survives_a_clock_that_does_not_advance(pair, clock):
    """A clock too coarse to see a step (every cost measures 0 s) must not divide by zero."""
    target, draft = pair
    ref = naive_greedy(target, [1, 5, 9, 2], 16)
    assert list(generate(target, [1, 5, 9, 2], max_new_tokens=16, drafter=draft, draft_policy=Auto())) == ref


def test_auto_drafts_long_rounds_when_a_cheap_draft_always_agrees(clock):
    V = 8
    # sharp logits: a draft sure of every token, so the default p-min stops no round early
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(3)) * 10
    tgt, good = SlowStub(table, "target", clock, 0.004, 0.0004), SlowStub(table, "draft", clock, 0.0003)
    policy = Auto()
    gen = generate(tgt, [0], max_new_tokens=120, drafter=good, draft_policy=policy)
    out = list(gen)
    assert out == list(generate(tgt, [0], max_new_tokens=120))
    assert gen.stats.drafted / gen.stats.draft_rounds >= 3 and policy.alpha > 0.9


def test_auto_falls_back_to_plain_when_the_draft_is_always_wrong(clock):
    V = 8
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(4)) * 3
    wrong = table.clone()
    for last in range(V):          # the draft's choice is never the target's
        wrong[last] = -table[last]
    tgt, bad = SlowStub(table, "target", clock, 0.003, 0.0005), SlowStub(wrong, "draft", clock, 0.0015)
    policy = Auto()
    gen = generate(tgt, [0], max_new_tokens=300, drafter=bad, draft_policy=policy)
    out = list(gen)
    assert out == list(generate(tgt, [0], max_new_tokens=300))
    # after the first probe it decodes plainly, probing ever more rarely: the extra work stays
    # under 5% of plain decoding's 300 target passes (a probe costs one draft call and a 2-token pass)
    assert gen.stats.accepted == 0 and gen.stats.draft_rounds <= 8, gen.stats
    assert policy.last_k == 0 and policy.alpha < 0.2          # the prior (0.5 over 2 drafts) decays away


class CountingSlowStub(SlowStub):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.calls = 0

    def logits(self, context, n_last=1):
        self.calls += 1
        return super().logits(context, n_last)


def test_auto_goes_plain_when_the_draft_is_never_sure_enough(clock):
    """A draft whose top probability is always under p-min stops every round before its first
    draft, yet each such round costs a draft step. Auto counts it (the draft's cost, a position
    left to the target) and decodes plainly, probing now and then; it does not try a measuring
    round again at every token, which cost a server with such a draft a fifth of its speed."""
    V = 8
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(7)) * 3
    tgt = SlowStub(table, "target", clock, 0.003, 0.0005)
    unsure = CountingSlowStub(torch.zeros(V, V), "draft", clock, 0.0005)    # uniform: top p 1/8 < 0.5
    policy = Auto()
    gen = generate(tgt, [0], max_new_tokens=300, drafter=unsure, draft_policy=policy)
    assert list(gen) == list(generate(tgt, [0], max_new_tokens=300))
    assert gen.stats.drafted == 0 and unsure.calls <= 20, (unsure.calls, gen.stats)
    assert policy.last_k == 0 and policy.alpha < 0.2 and policy.t_draft is not None


def test_auto_does_not_probe_where_even_perfect_drafts_cannot_pay(clock):
    """A compute-bound target (verifying k+1 tokens costs k+1 steps, as 7B-shaped GGUFs measure on
    a 2-core AVX2 CPU) with a draft that is always right: no acceptance rate could pay, so after
    the first measuring round auto decodes plainly without probing."""
    V = 8
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(5)) * 3
    tgt, right = SlowStub(table, "target", clock, 0.002, 0.002), SlowStub(table, "draft", clock, 0.0004)
    policy = Auto()
    gen = generate(tgt, [0], max_new_tokens=200, drafter=right, draft_policy=policy)
    assert list(gen) == list(generate(tgt, [0], max_new_tokens=200))
    assert gen.stats.draft_rounds == 1 and policy.alpha > 0.6 and policy.probe_after == HOPELESS_PROBE_GAP
    assert not policy.could_pay(8) and policy.last_k == 0


def test_acceptance_by_draft_position(pair):
    """alpha_i counts only rounds that judged position i: a draft that is always right is 1.0 at
    every position; the rounds log agrees with the totals."""
    from tinyllama.inference.generate import alpha_by_position

    target, _ = pair
    twin = generate(target, [1, 2], max_new_tokens=20, drafter=target, draft_policy=Fixed(3))
    list(twin)
    s = twin.stats
    assert s.alpha_by_position() == [1.0, 1.0, 1.0]
    assert sum(k for k, _, _ in s.rounds) == s.drafted and sum(a for _, a, _ in s.rounds) == s.accepted
    # two rounds of k=3: one rejects at position 2, one at 1; a third accepts all and stops nowhere
    assert alpha_by_position([(3, 1, 2), (3, 0, 1), (3, 3, 3)]) == [2 / 3, 1 / 2, 1.0]
    assert alpha_by_position([(2, 1, 1)]) == [1.0]          # an accepted stop id: position 2 never judged
    assert alpha_by_position([]) == []
