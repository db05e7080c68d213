"""`auto` draft length: each round's k chosen from measured acceptance and costs, 0 when
speculation does not pay.

    policy = AutoDraftLength()                       # one per engine: it learns across requests
    generate(target, ids, draft_model=draft, num_draft=policy)

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
to notice costs that change. k depends only on what has already happened, so
the output is exactly what it would be without speculation (greedy identity and the sampling
guarantee hold for any such choice).
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_AUTO_DRAFT = 8
MARGIN = 1.15                # speculate only where the model expects >= 15% more tokens/s than plain: its
                             # estimates are noisy, and rounds cost a little more than it counts (cache rollback)
HOPELESS_PROBE_GAP = 1024     # plain steps between probes when no acceptance rate could make drafting pay
PRIOR_SLOPE = 0.25           # verification cost per extra token, as a fraction of a step, before measuring
MIN_SECONDS = 1e-9           # a clock too coarse to see a step must not make a cost zero (rates divide by it)


def _ema(old: float | None, new: float, weight: float = 0.2) -> float:
    new = max(new, MIN_SECONDS)
    return new if old is None else (1 - weight) * old + weight * new


@dataclass
class AutoDraftLength:
    max_k: int = MAX_AUTO_DRAFT
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
        judged = k if accepted == k else accepted + 1
        self.accepted = self.accepted * self.decay + accepted
        self.judged = self.judged * self.decay + judged
        self.t_draft = _ema(self.t_draft, draft_seconds / k)
        self.t_verify[k] = _ema(self.t_verify.get(k), verify_seconds)
        self.plain_run = 0


def resolve_num_draft(num_draft: int | str | AutoDraftLength) -> int | AutoDraftLength:
    """A fixed k (>= 1), or the policy: "auto" makes a new one, an AutoDraftLength is shared."""
    if num_draft == "auto":
        return AutoDraftLength()
    if isinstance(num_draft, AutoDraftLength) or (isinstance(num_draft, int) and num_draft >= 1):
        return num_draft
    raise ValueError(f"num_draft must be >= 1 or 'auto', got {num_draft!r}")
