"""The one streaming generator, used by the CLI, the server and the demo.

    gen = generate(model, prompt_ids, SamplingParams(max_new_tokens=64, temperature=0.8, top_k=50))
    for token_id in gen:                       # ids as they are produced
        ...
    print(gen.stats.describe())                # prompt/generated tokens, tokens/s, acceptance

    gen = generate(target, prompt_ids, drafter=draft, draft_policy=Fixed(4))   # speculative decoding
    gen = generate(model, prompt_ids, logprobs=5, prompt_logprobs=True)  # gen.token_logprobs, .prompt_logprobs

`model` is our `Llama` or any `tinyllama.inference.backends.Backend` (a GGUF in llama.cpp
included); `drafter` one of those too, or any tinyllama.inference.drafters.Drafter. How tokens
are picked is one SamplingParams (greedy by default; see its docstring). Generation stops at
max_new_tokens or after yielding a stop id; TextStream adds stop strings. Log-probabilities
(`logprobs`, `prompt_logprobs`) are those of the target's raw logits, whatever sampling did with
them (TokenLogprob).

Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): the draft proposes k tokens
one at a time from its processed distribution q; the target scores all k (+1) positions in one
forward pass; draft token x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)), where
p_i is the target's distribution after the same processing on the same context. At the first
rejection a token is drawn from norm(max(0, p_i - q_i)); when all k are accepted a bonus token
is drawn from p_{k+1}. The output is distributed exactly as sampling from the target alone, and
at temperature 0 (p and q one-hot) it is token-identical to greedy decoding of the target.
Both KV caches roll back to the accepted length by prefix reuse (see backends.py).

Each round's k comes from `draft_policy` (tinyllama.inference.draft_policy: Fixed, Adaptive, Auto,
Capped; 0 is a plain step). `drafter=NgramDrafter()` (tinyllama.inference.lookup; `--model-draft
ngram[:N]`) drafts by prompt lookup instead of a model: the continuation of the context's tail
where it occurred before. Its proposal is a point mass q = onehot(x), verified the same way
(accepted with probability p(x), else a token from p without x), so it is exact too; a round
with no match is a plain step.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch

from tinyllama.errors import UserError
from tinyllama.inference.backends import Backend, TorchBackend
from tinyllama.inference.draft_policy import DraftPolicy, Fixed
from tinyllama.inference.drafters import Drafter, ModelDrafter
from tinyllama.inference.interface import argmax
from tinyllama.model.model import Llama


class SamplingError(UserError):
    """A sampling setting out of range; `param` names it (the HTTP field)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop: one object from the HTTP request, the demo's sliders
    or the CLI's flags to the sampler, checked once, here, when it is made.

    The default is greedy decoding (temperature 0: deterministic, and what speculative decoding
    reproduces token for token); temperature > 0 samples from softmax(logits / temperature),
    restricted by top-k and top-p (nucleus), after an optional repetition penalty (CTRL's:
    positive logits divided, negative ones multiplied, for tokens already in the context).
    max_new_tokens counts generated tokens; stop strings end the text (TextStream) and are not
    part of it."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None          # None or 0: no top-k cut
    top_p: float | None = None        # None or 1: no nucleus cut
    repetition_penalty: float = 1.0
    seed: int | None = None           # None: a fresh random seed
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str) or not all(isinstance(x, str) for x in self.stop):
            raise SamplingError(f"stop must be a list of strings, got {self.stop!r}", "stop")
        object.__setattr__(self, "stop", tuple(self.stop))
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0,
               f"max_tokens must be >= 0, got {self.max_new_tokens}", "max_tokens")
        _check(math.isfinite(self.temperature) and 0 <= self.temperature <= 2,
               f"temperature must be in [0, 2], got {self.temperature}", "temperature")
        _check(self.top_p is None or (math.isfinite(self.top_p) and 0 < self.top_p <= 1),
               f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        _check(self.top_k is None or self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}", "top_k")
        _check(math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
               f"repetition_penalty must be > 0, got {self.repetition_penalty}", "repetition_penalty")
        _check(self.seed is None or -2**63 <= self.seed < 2**64,
               f"seed must be in [-2**63, 2**64), got {self.seed}", "seed")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


def _check(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise SamplingError(message, param)


def process_logits(logits: torch.Tensor, context: Sequence[int], sampling: SamplingParams) -> torch.Tensor:
    """logits (vocab,) float32 -> the distribution sampling draws from, as probabilities.
    Temperature 0 gives a one-hot on the argmax."""
    logits = logits.float().clone()
    if sampling.repetition_penalty != 1.0 and len(context):
        idx = torch.tensor(sorted(set(context)), device=logits.device)
        picked = logits[idx]
        logits[idx] = torch.where(picked > 0, picked / sampling.repetition_penalty,
                                  picked * sampling.repetition_penalty)
    if sampling.greedy:
        probs = torch.zeros_like(logits)
        probs[argmax(logits)] = 1.0
        return probs
    logits = logits / sampling.temperature
    top_k, top_p = sampling.top_k, sampling.top_p
    if top_k is not None and 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and 0 < top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p          # the smallest prefix reaching top_p
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask[order[keep]] = True
        probs = torch.where(mask, probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
    return probs


MAX_TOP_LOGPROBS = 20     # alternatives reported per position (OpenAI's limit)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model's raw logits (log-softmax before temperature,
    penalties or cuts: what the model itself says, however the token was picked) and the `top`
    likeliest tokens at that position as (id, logprob), likeliest first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int = 0) -> list[TokenLogprob]:
    """logits (n, vocab), row i the one tokens[i] was chosen from -> their TokenLogprobs."""
    logp = torch.log_softmax(logits.float(), dim=-1)                              # (n, V)
    chosen = logp[torch.arange(len(tokens)), torch.tensor(list(tokens))].tolist()
    alternatives: list[tuple] = [()] * len(tokens)
    if top > 0:
        values, ids = torch.topk(logp, min(top, logp.shape[-1]), dim=-1)          # (n, top)
        alternatives = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    return [TokenLogprob(t, c, a) for t, c, a in zip(tokens, chosen, alternatives)]


def score_tokens(model: Backend, ids: Sequence[int], start: int = 1, top: int = 0,
                 chunk: int = 256) -> list[TokenLogprob]:
    """The TokenLogprob of each of ids[start:] given the tokens before it (start >= 1), from
    passes over at most `chunk` positions each: a batching slot's step carries a few hundred
    tokens, and (chunk, vocab) logits stay small. The backend's KV cache makes each pass compute
    only its own chunk."""
    ids = list(ids)
    out: list[TokenLogprob] = []
    for first in range(max(1, start), len(ids), chunk):
        end = min(first + chunk, len(ids))
        # rows predict tokens first .. end-1 (backends.py: row i predicts len(context) - n_last + i + 1)
        logits = model.logits(ids[:end - 1], n_last=end - first)                  # (end - first, V)
        out += token_logprobs(logits, ids[first:end], top)
    return out


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0        # time spent producing tokens after the prefill
    drafted: int = 0                   # speculative: tokens proposed by the draft
    accepted: int = 0                  # speculative: of those, accepted by the target
    target_calls: int = 0              # target forward passes after the prefill
    draft_rounds: int = 0              # speculative: draft-then-verify rounds (drafted / rounds = mean k)
    draft_seconds: float = 0.0         # speculative: of decode_seconds, drafting in those rounds
    verify_seconds: float = 0.0        # speculative: of decode_seconds, their verification passes and rollback
    stop_reason: str | None = None     # "stop_id", "length", "stop_string" or "cancelled"
    # speculative: per round (drafted k, accepted, judged: drafts compared before a rejection or an
    # accepted stop id), what acceptance by draft position is computed from (alpha_by_position)
    rounds: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    def alpha_by_position(self) -> list[float | None]:
        """alpha_i: of the rounds whose i-th draft was judged (every draft before it accepted), the
        share that accepted it; None where no round judged position i."""
        return alpha_by_position(self.rounds)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d.update(tokens_per_s=round(self.tokens_per_s, 2), acceptance_rate=self.acceptance_rate)
        return d

    def describe(self) -> str:
        text = (f"{self.prompt_tokens} prompt tokens ({self.prefill_seconds:.2f} s), "
                f"{self.generated_tokens} generated at {self.tokens_per_s:.1f} tok/s, stop: {self.stop_reason}")
        if self.drafted:
            text += (f"; speculative: {self.accepted}/{self.drafted} drafted tokens accepted "
                     f"({self.acceptance_rate:.0%}), {self.target_calls} target passes, "
                     f"mean k {self.drafted / max(1, self.draft_rounds):.1f}")
        return text


def alpha_by_position(rounds: Iterable[tuple[int, int, int]]) -> list[float | None]:
    """alpha_i over rounds of (drafted, accepted, judged), i = 1 .. the longest k (see GenerationStats)."""
    rounds = list(rounds)
    longest = max((judged for _, _, judged in rounds), default=0)
    out: list[float | None] = []
    for i in range(1, longest + 1):
        judged = sum(1 for _, _, j in rounds if j >= i)
        out.append(sum(1 for _, a, _ in rounds if a >= i) / judged if judged else None)
    return out


def _as_backend(model: Llama | Backend) -> Backend:
    if isinstance(model, Backend):
        return model
    if isinstance(model, Llama):        # a model in training or a preview: no packed copies
        return TorchBackend(model, pack=False)
    raise TypeError(f"expected a tinyllama Llama or Backend, got {type(model).__name__}")


class Generation:
    """An iterator of new token ids (batch size 1) with `.stats`, filled in as it runs."""

    def __init__(self, model: Llama | Backend, prompt_ids: Sequence[int], sampling: SamplingParams = SamplingParams(),
                 stop_ids: Iterable[int] = (), drafter: Llama | Backend | Drafter | None = None,
                 draft_policy: DraftPolicy | None = None, release: Callable[[], None] | None = None,
                 logprobs: int | None = None, prompt_logprobs: bool = False) -> None:
        """drafter: what drafts (None: plain decoding); draft_policy: each round's k (default
        Fixed(4)), started once for this generation. release: called once when the generation
        ends, however it ends (a slot goes back to its pool). logprobs: record each produced
        token's TokenLogprob (its log-softmax under the target's raw logits) in
        `token_logprobs`, with this many alternatives (None: off); prompt_logprobs: also score
        the prompt's tokens after the first, before generating, into `prompt_logprobs` (with
        max_new_tokens 0, only that)."""
        if not len(prompt_ids):
            raise ValueError("generate() needs at least one prompt token (e.g. BOS)")
        self.target = _as_backend(model)
        # what is made here for a bare Llama frees its KV cache when generation ends
        self._owned: list[Backend | Drafter] = [self.target] if self.target is not model else []
        self.drafter = self._as_drafter(drafter)
        self.policy = (draft_policy or Fixed()).start()
        self.sampling = sampling
        self.greedy = sampling.greedy
        self.generator = torch.Generator()
        if sampling.seed is not None:
            self.generator.manual_seed(sampling.seed)
        else:
            self.generator.seed()
        self.prompt = list(prompt_ids)
        self.max_new_tokens = sampling.max_new_tokens
        self.stop_ids = set(stop_ids)
        self.stats = GenerationStats(prompt_tokens=len(self.prompt))
        self._release = release
        self.top_logprobs = logprobs
        self.token_logprobs: list[TokenLogprob] = []
        # greedy without a repetition penalty: the token is the raw logits' argmax; with no
        # logprobs either, a plain step needs nothing else of the target (Backend.argmax)
        self._raw_argmax = self.greedy and sampling.repetition_penalty == 1.0
        self._token_only = self._raw_argmax and logprobs is None
        self.prompt_logprobs: list[TokenLogprob] | None = [] if prompt_logprobs else None
        self._it = self._run()

    def _as_drafter(self, draft: Llama | Backend | Drafter | None) -> Drafter | None:
        if draft is None or isinstance(draft, Drafter):
            drafter = draft
        else:
            drafter = ModelDrafter(_as_backend(draft))
            if drafter.backend is not draft:
                self._owned.append(drafter)
        if drafter is not None:
            drafter.check(self.target)
        return drafter

    def __iter__(self) -> "Generation":
        return self

    def __next__(self) -> int:
        return next(self._it)

    def close(self) -> None:
        """Stops early (a client went away): the stop reason becomes "cancelled"."""
        if self.stats.stop_reason is None:
            self.stats.stop_reason = "cancelled"
        self._it.close()
        self._end()            # a generation closed before it started has not run _run's finally

    def _end(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def _run(self) -> Iterator[int]:
        try:
            if self.prompt_logprobs is not None:
                self.prompt_logprobs = score_tokens(self.target, self.prompt, 1, self.top_logprobs or 0)
            if self.max_new_tokens == 0:
                self.stats.stop_reason = "length"
                return
            yield from (self._speculative() if self.drafter is not None else self._plain())
        finally:
            for backend in self._owned:
                backend.close()
            self._end()

    # ---- helpers ---------------------------------------------------------------------------
    def _probs(self, logits: torch.Tensor, context: Sequence[int]) -> torch.Tensor:
        return process_logits(logits, context, self.sampling)

    def _next_token(self, logits: torch.Tensor, context: Sequence[int]) -> int:
        """One token from raw logits (vocab,). Greedy without a repetition penalty is the
        argmax of the logits themselves (the one-hot distribution's argmax): no copy of the
        vocabulary-sized vector on the per-token path."""
        if self._raw_argmax:
            return argmax(logits)
        return self._pick(self._probs(logits, context))

    def _pick(self, probs: torch.Tensor) -> int:
        if self.greedy:
            return argmax(probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def _emit(self, token: int, logits: torch.Tensor | None) -> bool:
        """Counts one produced token, chosen from the raw `logits` (vocab,; None when only the
        token was asked for, so no logprobs are recorded); True when generation must end after it."""
        self.stats.generated_tokens += 1
        if self.top_logprobs is not None:
            self.token_logprobs += token_logprobs(logits[None], [token], self.top_logprobs)
        if token in self.stop_ids:
            self.stats.stop_reason = "stop_id"
            return True
        if self.stats.generated_tokens >= self.max_new_tokens:
            self.stats.stop_reason = "length"
            return True
        return False

    # ---- plain decoding ----------------------------------------------------------------------
    def _plain(self) -> Iterator[int]:
        context = list(self.prompt)
        t0 = time.perf_counter()
        token, logits = self._target_next(context)
        self.stats.prefill_seconds = time.perf_counter() - t0
        while True:
            done = self._emit(token, logits)
            yield token
            if done:
                return
            context.append(token)
            t0 = time.perf_counter()
            token, logits = self._target_next(context)
            self.stats.target_calls += 1
            self.stats.decode_seconds += time.perf_counter() - t0

    def _target_next(self, context: list[int]) -> tuple[int, torch.Tensor | None]:
        """The target's next token after `context` and the logits (vocab,) it came from; the token
        alone (logits None) where nothing else reads them (greedy, no repetition penalty, no
        logprobs): Backend.argmax, which a batching slot answers without copying the row out."""
        if self._token_only:
            return self.target.argmax(context), None
        logits = self.target.logits(context, 1)[0]                              # (vocab,)
        return self._next_token(logits, context), logits

    # ---- speculative decoding ----------------------------------------------------------------
    def _speculative(self) -> Iterator[int]:
        context = list(self.prompt)
        t0 = time.perf_counter()
        # Prefill both caches (timed as the prefill). A first plain step uses the prefill's
        # logits; a round recomputes only the last context position, whose logits it needs.
        first = self.target.logits(context, 1)[0]                          # (vocab,)
        self._draft_behind = self.policy.decoding_plainly   # plain steps ran since the draft last read
        if not self._draft_behind:                # else the draft catches up in its first round
            self.drafter.prefill(context)
        self.stats.prefill_seconds = time.perf_counter() - t0
        while True:
            new_tokens, rows = self._round(context, first)
            first = None
            for token, row in zip(new_tokens, rows):      # row: the target's logits it came from
                done = self._emit(token, row)
                yield token
                if done:
                    return
                context.append(token)

    def _round(self, context: list[int], first: torch.Tensor | None
               ) -> tuple[list[int], Sequence[torch.Tensor | None]]:
        """One round: k from the policy, drafts, one verification pass; or, with no drafts, a
        plain step (on the prefill's logits `first` (vocab,) when they are still unused). The
        new tokens, and the target's logits (vocab,) each came from (a plain step's None when it
        asked for the token alone)."""
        t0 = time.perf_counter()
        room = min(self.max_new_tokens - self.stats.generated_tokens, self.target.context_length - len(context),
                   self.drafter.context_length - len(context))
        k = self.policy.choose(room - 1)                  # room for the k drafts and the bonus token
        if k >= 1 and self._draft_behind:
            self._catch_up(context)
        self._draft_behind = k == 0
        started = time.perf_counter()                     # drafting's own cost starts after the catch-up
        drafts, qs = self.drafter.draft(context, k, self._sample_draft, self.policy.p_min) if k >= 1 else ([], None)
        drafted = time.perf_counter()
        draft_seconds = drafted - started
        if k >= 1:                                        # also a round p-min stopped before any draft
            self.stats.draft_seconds += draft_seconds
            if not drafts:                                # the draft was unsure at once (p-min)
                self.policy.record_unsure(draft_seconds)
        if not drafts and first is not None:
            new_tokens, rows = [self._next_token(first, context)], first[None]
        elif not drafts:
            new_tokens, rows = self._plain_step(context)
            self.policy.record_step(time.perf_counter() - drafted)
        else:
            accepted_before = self.stats.accepted
            new_tokens, rows = self._verify(context, drafts, qs)
            accepted = self.stats.accepted - accepted_before
            self.stats.rounds.append((len(drafts), accepted, min(len(new_tokens), len(drafts))))
            verify_seconds = time.perf_counter() - drafted
            self.stats.verify_seconds += verify_seconds
            self.policy.record_round(len(drafts), accepted, draft_seconds, verify_seconds)
        self.stats.decode_seconds += time.perf_counter() - t0       # the whole round, catch-up included
        return new_tokens, rows

    def _catch_up(self, context: list[int]) -> None:
        """Has the draft read what plain steps added since it last drafted (all but the last
        token, which its first draft step reads), timed apart: a one-off cost of resuming
        speculation (the whole prompt, the first time), which must not count as the cost of
        drafting a token (auto would then think drafting dear and stay plain)."""
        t0 = time.perf_counter()
        if len(context) > 1:
            self.drafter.prefill(context[:-1])
        self.stats.draft_seconds += time.perf_counter() - t0

    def _plain_step(self, context: list[int]) -> tuple[list[int], Sequence[torch.Tensor | None]]:
        token, logits = self._target_next(context)
        self.stats.target_calls += 1
        return [token], [logits]

    def _sample_draft(self, logits: torch.Tensor, context: Sequence[int]) -> tuple[int, torch.Tensor | None]:
        """A draft model's token from its logits (vocab,), picked as the target's would be, and the
        distribution q it came from (None when greedy: a point mass)."""
        if self.greedy:
            return self._next_token(logits, context), None
        q = self._probs(logits, context)
        return self._pick(q), q

    def _verify(self, context: list[int], drafts: list[int], qs: list[torch.Tensor] | None
                ) -> tuple[list[int], torch.Tensor]:
        """One target pass over the k drafts (+1): the accepted tokens and the next one, and the
        target's logits (k+1, vocab), row i the one token i came from. qs None: the drafts are
        point masses (greedy decoding, prompt lookup)."""
        k = len(drafts)
        target_logits = self.target.logits(context + drafts, k + 1)            # (k+1, vocab)
        if qs is None:
            # a point-mass proposal: accepted with probability p(x), else resampled from p without x
            qs = [] if self.greedy else [
                torch.nn.functional.one_hot(torch.tensor(x), target_logits.shape[-1]).to(target_logits.dtype)
                for x in drafts]
        self.stats.target_calls += 1
        self.stats.draft_rounds += 1
        self.stats.drafted += k
        out: list[int] = []
        try:
            return self._accept(context, drafts, qs, target_logits, out), target_logits
        finally:
            # Roll both caches back to the accepted tokens (the last new token is not cached yet).
            n_ok = len(context) + max(0, len(out) - 1)
            self.target.trim(n_ok)
            self.drafter.trim(n_ok)

    def _accept(self, context: list[int], drafts: list[int], qs: list[torch.Tensor], target_logits: torch.Tensor,
                out: list[int]) -> list[int]:
        if self.greedy:
            return self._accept_greedy(context, drafts, target_logits, out)
        k = len(drafts)
        for i, (x, q) in enumerate(zip(drafts, qs)):
            p = self._probs(target_logits[i], context + drafts[:i])
            u = float(torch.rand((), generator=self.generator))
            if not u * float(q[x]) < float(p[x]):                        # accept iff u < min(1, p(x)/q(x))
                residual = torch.clamp(p - q, min=0)
                out.append(self._pick(residual / residual.sum() if residual.sum() > 0 else p))
                return out
            out.append(x)
            self.stats.accepted += 1
            if x in self.stop_ids:
                return out
        bonus = self._probs(target_logits[k], context + drafts)
        out.append(self._pick(bonus))
        return out

    def _accept_greedy(self, context: list[int], drafts: list[int], target_logits: torch.Tensor,
                       out: list[int]) -> list[int]:
        """p and q are one-hot: a draft is accepted iff it is the target's greedy token, and the
        token at the first rejection (or the bonus) is the target's greedy token there."""
        for i, x in enumerate(drafts):
            best = self._next_token(target_logits[i], context + drafts[:i])
            if x != best:
                out.append(best)
                return out
            out.append(x)
            self.stats.accepted += 1
            if x in self.stop_ids:
                return out
        out.append(self._next_token(target_logits[len(drafts)], context + drafts))
        return out


def generate(model: Llama | Backend, prompt_ids: Sequence[int], sampling: SamplingParams | None = None, *,
             stop_ids: Iterable[int] = (), drafter: Llama | Backend | Drafter | None = None,
             draft_policy: DraftPolicy | None = None, release: Callable[[], None] | None = None,
             logprobs: int | None = None, prompt_logprobs: bool = False, **settings) -> Generation:
    """Streams new token ids; see the module docstring. `sampling` (default: greedy, 64 tokens),
    with any SamplingParams field given as a keyword replacing its value:

        generate(model, ids, SamplingParams(temperature=0.7, seed=1))
        generate(model, ids, max_new_tokens=32, temperature=0.7)      # the same object, built here

    The returned object's `.stats` holds the counts and timings once iteration ends."""
    sampling = sampling or SamplingParams()
    if settings:
        sampling = sampling.replace(**settings)
    return Generation(model, prompt_ids, sampling, stop_ids, drafter, draft_policy, release, logprobs,
                      prompt_logprobs)


class TextStream:
    """A Generation as text deltas, with stop strings:

        stream = TextStream(generate(model, ids, stop_ids=[tok.eos_id]), tok, stop=["\\n\\n"])
        for delta in stream:
            print(delta, end="", flush=True)
        stream.text, stream.finish_reason        # "stop" (stop id or string) or "length"

    Each token's text is decoded from the newest few ids with the ones before them as context
    (SentencePiece writes a piece's leading space only after another piece), so a token costs
    the same at the end of a long reply as at its start. Text is held back while it ends in an
    incomplete UTF-8 character or in what could be the start of a stop string; a stop string
    ends generation and is not part of the text. Stop ids are not text.
    """

    def __init__(self, generation: Generation, tokenizer, stop: Sequence[str] | None = None) -> None:
        """stop: the stop strings (default: the generation's sampling.stop)."""
        self.generation = generation
        self.tokenizer = tokenizer
        self.stop = [s for s in (generation.sampling.stop if stop is None else stop) if s]
        self.ids: list[int] = []
        self.text = ""                  # what was yielded
        self._full = ""                 # the text of ids[:_read]
        self._start = self._read = 0    # ids[_start:_read]: the context the next token is decoded after
        self._context = ""              # its text

    @property
    def stats(self) -> GenerationStats:
        return self.generation.stats

    @property
    def finish_reason(self) -> str | None:
        reason = self.generation.stats.stop_reason
        return {"stop_id": "stop", "stop_string": "stop", "length": "length"}.get(reason, reason)

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self._deltas()
        finally:
            # however the text ends (a stop id, a stop string, the reader leaving), the generation
            # ends with it, so what it holds (a batching slot) is given back now, not at garbage collection
            self.generation.close()

    def _deltas(self) -> Iterator[str]:
        stop_ids = self.generation.stop_ids
        for token in self.generation:
            if token in stop_ids:
                break
            self.ids.append(token)
            full = self._decoded()
            if full is None:
                continue                          # a multi-byte character still arriving
            cut = self._first_stop(full)
            if cut is not None:
                self.generation.close()
                self.generation.stats.stop_reason = "stop_string"
                yield from self._advance(full[:cut])
                return
            yield from self._advance(full[: len(full) - self._held_back(full)])
        if self.ids:
            yield from self._advance(self.tokenizer.decode(self.ids))

    def _decoded(self) -> str | None:
        """The text of all ids so far, decoding only those since `_start`; None while it ends in
        an incomplete UTF-8 character (then the next call decodes from the same start)."""
        window = self.tokenizer.decode(self.ids[self._start:])
        if window.endswith("\ufffd"):
            return None
        if window.startswith(self._context):
            self._full += window[len(self._context):]
        else:                                     # a decoder that rewrites what came before
            self._full = self.tokenizer.decode(self.ids)
        self._start, self._read = self._read, len(self.ids)
        self._context = self.tokenizer.decode(self.ids[self._start:])
        return self._full

    def _advance(self, upto: str) -> Iterator[str]:
        if len(upto) > len(self.text) and upto.startswith(self.text):
            delta, self.text = upto[len(self.text):], upto
            yield delta

    def _first_stop(self, full: str) -> int | None:
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self, full: str) -> int:
        """Length of the longest suffix of `full` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(full)), best, -1):
                if full.endswith(s[:n]):
                    best = n
                    break
        return best
