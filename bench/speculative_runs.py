"""What bench.speculative and bench.speculative_torch share: a timed decode of every prompt in
one configuration (plain or speculative, through the project's generator), and the theory its
rate is held against (Leviathan et al. 2023).

    run = decode_prompts(target, prompts, 48, draft=draft, policy=Fixed(4))   # a DecodeRun
    alpha = solve_alpha(run.tokens / run.passes, 4)
    expected = theory(alpha, 4, c=0.1, v=1.2)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import sync


@dataclass
class DecodeRun:
    """Every prompt decoded once in one configuration, prefill excluded."""
    outputs: list = field(default_factory=list)
    seconds: float = 0.0
    drafted: int = 0
    accepted: int = 0
    passes: int = 0                      # target forward passes after the prefill
    rounds: list = field(default_factory=list)   # (drafted, accepted, judged) per speculative round
    verify_seconds: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(len(o) for o in self.outputs)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def decode_prompts(target, prompts, tokens: int, draft=None, policy=None, device=None, stop_ids=()) -> DecodeRun:
    """Every prompt decoded, up to `tokens` each (and to a stop id where stop_ids are given: what a
    user gets); policy: a DraftPolicy (one object for every prompt); device: a torch device to wait
    for at both ends of each timing (a GPU's queued kernels)."""
    from tinyllama.inference.generate import generate

    run = DecodeRun()
    for ids in prompts:
        for b in (target, draft):
            if b is not None:
                b.reset()
        sync(device)
        t0 = time.perf_counter()
        gen = generate(target, ids, max_new_tokens=tokens, drafter=draft, draft_policy=policy, stop_ids=stop_ids)
        run.outputs.append(list(gen))
        sync(device)
        s = gen.stats
        run.seconds += time.perf_counter() - t0 - s.prefill_seconds
        run.drafted, run.accepted, run.passes = run.drafted + s.drafted, run.accepted + s.accepted, run.passes + s.target_calls
        run.rounds += s.rounds
        run.verify_seconds += s.verify_seconds
    return run


def solve_alpha(tokens_per_pass: float, k: int) -> float:
    """alpha with (1 - alpha^(k+1)) / (1 - alpha) = tokens_per_pass (bisection; increasing in alpha)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(mid ** i for i in range(k + 1)) < tokens_per_pass:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def theory(alpha: float, k: int, c: float, v: float = 1.0) -> float:
    """Expected speedup (Leviathan et al. 2023): tokens per round, (1 - alpha^(k+1)) / (1 - alpha),
    over a round's cost in target passes, k c + v, where v = the cost of verifying k+1 tokens in
    one pass against one token (1 in the paper's model: a pass costs the same at any length)."""
    tokens = (1 - alpha ** (k + 1)) / (1 - alpha) if alpha < 1 else k + 1
    return tokens / (k * c + v)
