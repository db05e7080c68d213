"""The plain-PyTorch definitions that fix the numbers: every fused or library kernel
(tinyllama.model.kernels' backends, tinyllama.model.fused's providers) is held to these in the tests and
in the providers' own check. Kept apart from both so that neither imports the other for them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(hd) + causal mask) v with K/V repeated per query group, in float32."""
    T, S = q.shape[2], k.shape[2]
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, dim=1).float()
    v = v.repeat_interleave(g, dim=1).float()
    scores = q.float() @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])          # (B, H, T, S)
    allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).to(q.dtype)


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:      # one fused op; the same numbers as the three below
        return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def broadcast_signed_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, hd) tables as (T, 1, hd), broadcast over heads, with sin's first half negated: HF's
    rotate_half(x) * sin = cat(-x2, x1) * sin becomes x.roll(hd / 2) * sin."""
    half = sin.shape[-1] // 2
    return cos[:, None, :], torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)[:, None, :]   # (T, 1, hd)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on one tensor x (B, T, H, hd), in PyTorch; cos, sin (T, hd) with the two halves
    equal (RotaryEmbedding builds them so), or as prepare_rotary returns them."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if cos.dim() == 2:
        cos, sin = broadcast_signed_tables(cos, sin)
    return _rotate(x, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin
