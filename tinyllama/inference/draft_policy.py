"""How many tokens to draft in each round of speculative decoding: one policy, chosen once from
the flags (`--draft-max K`, `adaptive`, `adaptive:K` or `auto`) and passed whole to the generator.

    policy = DraftPolicy.parse("auto")                   # or "4" (Fixed), "adaptive:2" (Adaptive)
    policy = Capped(policy, busy=lambda: pool.busy)       # a batching server: plain steps while busy
    generate(target, ids, drafter=draft, draft_policy=policy)

The generator asks `policy.start()` for the policy one generation uses (Adaptive: a copy that
restarts at its K; Auto: itself, so that what it learns about a pair carries across requests),
then each round `choose(cap)` for k (0: a plain step), and reports what happened (`record_step`
after a plain step, `record_round` after a verified draft, `record_unsure` when p_min stopped a
round before its first draft). k depends only on rounds already
decided, so no policy changes the output: greedy identity and the sampling guarantee hold.

Every policy also carries p_min (llama.cpp's --draft-p-min; 0: off): a round stops drafting at
the first position where the draft's top probability is below p_min, so a round drafts what the
draft is sure of and no more (a round that drafts nothing is a plain step). The stop depends on
the draft's distribution alone, not on the token it draws, so it too leaves the output unchanged.
Auto and Adaptive stop at DEFAULT_P_MIN unless told otherwise; a fixed k drafts k.

Fixed(k): k every round. Adaptive(k), as transformers' assisted generation: starts at k, then
k + 2 after a round whose drafts were all accepted, k - 1 (at least 1) after a rejection, never
above MAX_ADAPTIVE_DRAFT. Capped(policy, busy, max_busy): the policy while at most max_busy slots
of a batching server are busy, plain steps otherwise (a batched step already amortises the
weights' reads, and drafting would only add work); it tells the policy nothing of those steps.

Auto picks each round's k from measured acceptance and costs, 0 when speculation does not pay.
With a per-token acceptance rate α, a round of k drafts yields (1 − α^(k+1)) / (1 − α) tokens
on average (Leviathan et al. 2023) and costs k·t_draft + t_verify(k); a plain step yields one
token for t_step. The policy keeps exponentially weighted estimates of α (from the drafts each
round judged), t_draft (per drafted token), t_step and t_verify (per k; unmeasured k from a
line through the measured ones) and picks the k with the highest expected tokens per second,
if that beats plain decoding by MARGIN.
When plain wins it still probes with k = 1 now and then (after 8 plain steps, then 16, ... up
to 128) so that a draft that starts to agree is noticed; with a draft that never agrees this
costs a few per cent of plain speed at most. Where the measured costs alone rule speculation out
(not even a draft that is always right would pay: on a CPU where the target's forward is
compute-bound, verifying k+1 tokens costs nearly k+1 steps), it probes only every 1024 steps,
to notice costs that change.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Protocol

from tinyllama.cli import add_renamed_flag
from tinyllama.errors import UserError

DEFAULT_DRAFT = 4            # k of Fixed and Adaptive when none is named
MAX_ADAPTIVE_DRAFT = 16      # a longer verification pass than this costs more than it saves
MAX_AUTO_DRAFT = 8
MARGIN = 1.15                # speculate only where the model expects >= 15% more tokens/s than plain: its
                             # estimates are noisy, and rounds cost a little more than it counts (cache rollback)
HOPELESS_PROBE_GAP = 1024     # plain steps between probes when no acceptance rate could make drafting pay
PRIOR_SLOPE = 0.25           # verification cost per extra token, as a fraction of a step, before measuring
DEFAULT_P_MIN = 0.5          # auto's and adaptive's p_min (a fixed k drafts k): measured best on the real pair
MIN_SECONDS = 1e-9           # a clock too coarse to see a step must not make a cost zero (rates divide by it)
SPEC_HELP = "auto, adaptive[:K] or an integer K >= 1"


class DraftPolicyError(UserError):
    """A draft policy that is not one: a word other than auto or adaptive, a k below 1."""


class DraftPolicy(Protocol):
    """Decides each round's draft length k. Subclasses inherit the no-op hooks below."""

    p_min: float = 0.0           # stop a round's drafting where the draft's top probability is below it

    @property
    def spec(self) -> str:
        """What DraftPolicy.parse reads back into this policy: "4", "adaptive:4", "auto"."""

    def choose(self, cap: int) -> int:
        """k for the next round, at most `cap` (the tokens still allowed, less one); 0: a plain step."""

    def start(self) -> "DraftPolicy":
        """The policy one generation uses: this one, or a copy where its state is per generation."""
        return self

    @property
    def decoding_plainly(self) -> bool:
        """Whether it expects plain steps for now (the generator then leaves the draft's prefill
        to the first round that needs it)."""
        return False

    def record_step(self, seconds: float) -> None:
        """A plain step it chose took `seconds`."""

    def record_round(self, k: int, accepted: int, draft_seconds: float, verify_seconds: float) -> None:
        """A round verified k drafts and accepted the first `accepted` of them."""

    def record_unsure(self, draft_seconds: float) -> None:
        """A round it chose stopped before its first draft (the draft's top probability under
        p_min): one draft step spent, then a plain step (reported by record_step)."""

    @staticmethod
    def parse(spec: "str | int | DraftPolicy") -> "DraftPolicy":
        """The one reader of a policy from a flag or a request: "auto", "adaptive", "adaptive:K"
        or an integer K >= 1 (a policy passes through)."""
        if not isinstance(spec, (str, int)):
            return spec
        text = str(spec).strip()
        if text == "auto":
            return Auto()
        if text == "adaptive":
            return Adaptive()
        word, colon, number = text.rpartition(":")
        if word == "adaptive" or not colon:
            k = _draft_length(number, spec)
            return Adaptive(k) if word else Fixed(k)
        raise DraftPolicyError(f"expected {SPEC_HELP}, got {spec!r}")


def _draft_length(text: str, spec) -> int:
    try:
        k = int(text)
    except ValueError:
        raise DraftPolicyError(f"expected {SPEC_HELP}, got {spec!r}") from None
    _check_length(k)
    return k


def _check_length(k: int) -> None:
    if not (isinstance(k, int) and k >= 1):
        raise DraftPolicyError(f"the draft length must be an integer >= 1 (or auto), got {k!r}")


def _check_p_min(p: float) -> None:
    if not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
        raise DraftPolicyError(f"the draft's minimum probability (--draft-p-min) must be in [0, 1), got {p!r}")


def _p_min_text(p: float) -> str:
    return f", p-min {p:g}" if p else ""


def with_p_min(policy: "DraftPolicy", p_min: float) -> "DraftPolicy":
    """`policy` with its drafting stopped below p_min (a copy; Capped: the policy inside)."""
    _check_p_min(p_min)
    if isinstance(policy, Capped):
        return Capped(with_p_min(policy.policy, p_min), policy.busy, policy.max_busy)
    return dataclasses.replace(policy, p_min=float(p_min))


@dataclass(frozen=True)
class Fixed(DraftPolicy):
    k: int = DEFAULT_DRAFT
    p_min: float = 0.0

    def __post_init__(self) -> None:
        _check_length(self.k)
        _check_p_min(self.p_min)

    @property
    def spec(self) -> str:
        return str(self.k)

    def __str__(self) -> str:
        return f"k={self.k}{_p_min_text(self.p_min)}"

    def choose(self, cap: int) -> int:
        return min(self.k, cap)


@dataclass
class Adaptive(DraftPolicy):
    first: int = DEFAULT_DRAFT               # k of a generation's first round
    max_k: int = MAX_ADAPTIVE_DRAFT
    p_min: float = DEFAULT_P_MIN
    k: int = field(init=False)               # k of the next round

    def __post_init__(self) -> None:
        _check_length(self.first)
        _check_p_min(self.p_min)
        self.k = self.first

    @property
    def spec(self) -> str:
        return f"adaptive:{self.first}"

    def __str__(self) -> str:
        return f"adaptive k from {self.first}{_p_min_text(self.p_min)}"

    def start(self) -> "Adaptive":
        return Adaptive(self.first, self.max_k, self.p_min)

    def choose(self, cap: int) -> int:
        return min(self.k, cap)

    def record_round(self, k: int, accepted: int, draft_seconds: float, verify_seconds: float) -> None:
        self.k = min(self.k + 2, self.max_k) if accepted == k else max(1, self.k - 1)


@dataclass
class Capped(DraftPolicy):
    """`policy` while busy() <= max_busy, plain steps otherwise; those steps are not reported."""

    policy: DraftPolicy
    busy: Callable[[], int]
    max_busy: int = 1
    _allowed: bool = True                    # whether the last choice was the policy's

    @property
    def spec(self) -> str:
        return self.policy.spec

    @property
    def p_min(self) -> float:
        return self.policy.p_min

    def __str__(self) -> str:
        return f"{self.policy}, speculating while at most {self.max_busy} busy"

    def start(self) -> "Capped":
        return Capped(self.policy.start(), self.busy, self.max_busy)

    @property
    def decoding_plainly(self) -> bool:
        return self.busy() > self.max_busy or self.policy.decoding_plainly

    def choose(self, cap: int) -> int:
        self._allowed = self.busy() <= self.max_busy
        return self.policy.choose(cap) if self._allowed else 0

    def record_step(self, seconds: float) -> None:
        if self._allowed:
            self.policy.record_step(seconds)

    def record_round(self, k: int, accepted: int, draft_seconds: float, verify_seconds: float) -> None:
        self.policy.record_round(k, accepted, draft_seconds, verify_seconds)

    def record_unsure(self, draft_seconds: float) -> None:
        self.policy.record_unsure(draft_seconds)


def _ema(old: float | None, new: float, weight: float = 0.2) -> float:
    new = max(new, MIN_SECONDS)
    return new if old is None else (1 - weight) * old + weight * new


@dataclass
class Auto(DraftPolicy):
    """k from measured acceptance and costs (see the module docstring); one per engine, so
    start() is the policy itself and what it learns carries across requests."""

    max_k: int = MAX_AUTO_DRAFT
    p_min: float = DEFAULT_P_MIN
    decay: float = 0.95                       # per round, on the acceptance counts
    accepted: float = 1.0                     # prior: α = 0.5 with the weight of two drafts
    judged: float = 2.0
    t_step: float | None = None
    t_draft: float | None = None
    t_verify: dict[int, float] = field(default_factory=dict)
    probe_after: int = 8
    plain_run: int = 0                        # plain steps since the last round
    last_k: int = 0
    _best: int | None = None                  # the last decision, reused until a round or a probe is due

    @property
    def spec(self) -> str:
        return "auto"

    def __post_init__(self) -> None:
        _check_p_min(self.p_min)

    def __str__(self) -> str:
        return f"auto k{_p_min_text(self.p_min)}"

    @property
    def alpha(self) -> float:
        return min(0.99, max(0.0, self.accepted / self.judged))

    @property
    def decoding_plainly(self) -> bool:
        """Whether the last choice, made with a plain step already measured, was plain decoding
        (the generator then leaves the draft's prefill to the first round that needs it)."""
        return self.last_k == 0 and self.t_step is not None

    def verify_seconds(self, k: int) -> float:
        if k in self.t_verify:
            return self.t_verify[k]
        slopes = [(t - self.t_step) / j for j, t in self.t_verify.items()]
        slope = max(0.0, sum(slopes) / len(slopes)) if slopes else PRIOR_SLOPE * self.t_step
        return self.t_step + slope * k

    def expected_rate(self, k: int) -> float:
        """Expected tokens per second of a round with k drafts (k = 0: a plain step)."""
        if k == 0:
            return 1.0 / self.t_step
        a = self.alpha
        tokens = (1 - a ** (k + 1)) / (1 - a)
        return tokens / (k * self.t_draft + self.verify_seconds(k))

    def choose(self, cap: int) -> int:
        """k for the next round, at most `cap` (0: a plain step)."""
        cap = min(cap, self.max_k)
        if self._best == 0 and cap >= 1 and self.plain_run < self.probe_after and self.plain_run % 16:
            return 0                                         # plain decoding: re-decided every 16 steps
        if cap < 1 or self.t_step is None:
            k = 0                                            # measure a plain step first
        elif self.t_draft is None:
            k = min(2, cap)                                  # then one round, to measure the draft
        else:
            k = max(range(1, cap + 1), key=self.expected_rate)
            if self.expected_rate(k) < MARGIN * self.expected_rate(0):
                k = 0
            if k == 0 and self.plain_run >= self.probe_after:
                if self.could_pay(cap):
                    k, self.probe_after = 1, min(self.probe_after * 2, 128)
                elif self.probe_after >= HOPELESS_PROBE_GAP:
                    k = 1                                     # a rare re-measure of the costs
                else:
                    self.probe_after = HOPELESS_PROBE_GAP
            elif k > 0:
                self.probe_after = 8
        self.last_k = k
        self._best = k if self.t_draft is not None else None
        return k

    def could_pay(self, cap: int) -> bool:
        """Whether some k <= cap would beat plain decoding by MARGIN if every draft were accepted
        (k + 1 tokens a round), at the measured costs."""
        best = max((k + 1) / (k * self.t_draft + self.verify_seconds(k)) for k in range(1, cap + 1))
        return best >= MARGIN * self.expected_rate(0)

    def record_step(self, seconds: float) -> None:
        self.t_step = _ema(self.t_step, seconds)
        self.plain_run += 1

    def record_round(self, k: int, accepted: int, draft_seconds: float, verify_seconds: float) -> None:
        self._judge(accepted, k if accepted == k else accepted + 1, draft_seconds / k)
        self.t_verify[k] = _ema(self.t_verify.get(k), verify_seconds)

    def record_unsure(self, draft_seconds: float) -> None:
        """Counted as one draft rejected at no verification cost: the draft step's time is the
        draft's cost, and the position judged against drafting. Without it a draft never sure
        enough would leave t_draft unmeasured, and every round would be a measuring one."""
        self._judge(0, 1, draft_seconds)

    def _judge(self, accepted: int, judged: int, seconds_per_draft: float) -> None:
        """A round's verdict on `judged` draft positions (`accepted` of them taken) and the draft's
        cost per token; the plain steps since the last round start again from 0."""
        self.accepted = self.accepted * self.decay + accepted
        self.judged = self.judged * self.decay + judged
        self.t_draft = _ema(self.t_draft, seconds_per_draft)
        self.plain_run = 0




# ---- the flags, as llama.cpp names them -------------------------------------------------------

def draft_policy_arg(value: str) -> DraftPolicy:
    """argparse type of --draft-max: a DraftPolicy, read once."""
    try:
        return DraftPolicy.parse(value)
    except DraftPolicyError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def p_min_arg(value: str) -> float:
    """argparse type of --draft-p-min: a probability in [0, 1)."""
    try:
        p = float(value)
        _check_p_min(p)
    except (ValueError, DraftPolicyError):
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {value!r}") from None
    return p


def add_draft_policy_flags(ap: argparse.ArgumentParser, default: str = "auto") -> None:
    """--draft-max, with --num-draft and --adaptive-draft as the old names."""
    ap.add_argument("--draft-max", type=draft_policy_arg, default=default, metavar="K|adaptive[:K]|auto",
                    help="tokens drafted per round: K every round; adaptive[:K]: from K (default "
                         f"{DEFAULT_DRAFT}), +2 after a fully accepted round, -1 after a rejection; auto: "
                         "chosen each round from the measured acceptance rate and costs, 0 (plain decoding) "
                         "when drafting does not pay (default: %(default)s)")
    ap.add_argument("--draft-p-min", type=p_min_arg, default=None, metavar="P",
                    help="a round stops drafting where the draft's top probability falls below P, "
                         "so it drafts only what it is sure of (0: always the full k; as llama.cpp's "
                         f"--draft-p-min; default: {DEFAULT_P_MIN} with auto and adaptive, 0 with a fixed K)")
    add_renamed_flag(ap, "--num-draft", "--draft-max", dest="draft_max", type=draft_policy_arg)
    add_renamed_flag(ap, "--adaptive-draft", "--draft-max adaptive[:K]", dest="adaptive_draft", nargs=0)


def draft_policy_of(args: argparse.Namespace) -> DraftPolicy:
    """--draft-max's policy with --draft-p-min's stop; the old --adaptive-draft turns a fixed K into
    adaptive:K (with auto it never did anything)."""
    policy = args.draft_max
    if getattr(args, "adaptive_draft", False) and isinstance(policy, Fixed):
        policy = Adaptive(policy.k)
    p_min = getattr(args, "draft_p_min", None)
    return policy if p_min is None else with_p_min(policy, p_min)
