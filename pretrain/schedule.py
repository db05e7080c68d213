"""Learning-rate schedule on optimizer steps: linear warmup, then cosine decay to min_lr.

    lr_at(step, lr=4e-4, min_lr=4e-5, warmup=2000, total=T)

step counts optimizer updates (1-based: the first update uses lr_at(1)), never micro-batches
(TinyLlama issue #172 stepped the schedule per micro-batch and decayed 8x too fast), and the
last update uses exactly min_lr (issue #27: min_lr was never applied).
"""

from __future__ import annotations

import math


def lr_at(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    if step <= 0:
        raise ValueError(f"optimizer steps count from 1, got {step}")
    if warmup > 0 and step <= warmup:
        return lr * step / warmup
    if total <= warmup:
        return min_lr
    progress = min(1.0, (step - warmup) / (total - warmup))   # 0 just after warmup, 1 at the last step
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
