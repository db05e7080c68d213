"""The model's hot kernels, each behind one function that picks an implementation by what is
installed and where the tensors live, with a pure-PyTorch fallback that defines the numbers.

Attention:

    y = attention(q, k, v)   # q (B, H, T, hd); k, v (B, Hkv, S, hd) with S >= T -> (B, H, T, hd)

Causal with the mask aligned bottom-right: query t sits at absolute position S - T + t, so
the same call serves training (S == T), prefill, one-token decoding (T == 1) and speculative
verification (1 < T < S). Grouped-query attention (H a multiple of Hkv) never materialises
repeated K/V on the backends that support it.

Order: flash-attn 2 (`flash_attn_func`, CUDA, fp16/bf16) > xformers memory-efficient
attention (CUDA) > torch `scaled_dot_product_attention`. `TINYLLAMA_ATTENTION=sdpa|flash|xformers`
forces one (an error if it cannot run). `reference_attention` is the plain-math definition
that the tests hold every backend to.

RMSNorm, rotary embeddings and cross-entropy use flash-attn's fused Triton kernels on CUDA when
flash-attn is installed (`TINYLLAMA_FUSED=0` turns them off), else the PyTorch definitions
below; a GPU-marked test holds the fused versions to them.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .errors import UserError

try:  # optional GPU extra
    from flash_attn import flash_attn_func as _flash_attn_func
except Exception:  # ImportError, or a build that does not match this torch/CUDA
    _flash_attn_func = None

try:
    import xformers.ops as _xops
except Exception:
    _xops = None

_HALF = (torch.float16, torch.bfloat16)


def available_backends() -> list[str]:
    out = ["sdpa"]
    if _xops is not None and torch.cuda.is_available():
        out.insert(0, "xformers")
    if _flash_attn_func is not None and torch.cuda.is_available():
        out.insert(0, "flash")
    return out


def select_backend(q: torch.Tensor) -> str:
    forced = os.environ.get("TINYLLAMA_ATTENTION", "").strip().lower()
    if forced:
        if forced not in ("sdpa", "flash", "xformers"):
            raise UserError(f"TINYLLAMA_ATTENTION={forced!r}: expected sdpa, flash or xformers")
        if forced == "flash" and (_flash_attn_func is None or not q.is_cuda or q.dtype not in _HALF):
            raise RuntimeError("TINYLLAMA_ATTENTION=flash needs flash-attn installed and fp16/bf16 CUDA tensors")
        if forced == "xformers" and (_xops is None or not q.is_cuda):
            raise RuntimeError("TINYLLAMA_ATTENTION=xformers needs xformers installed and CUDA tensors")
        return forced
    if q.is_cuda and q.dtype in _HALF and _flash_attn_func is not None:
        return "flash"
    if q.is_cuda and _xops is not None:
        return "xformers"
    return "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """key_lengths (B,): one query per row (T == 1) that sees only its row's first
    key_lengths[b] keys (sequences of different lengths batched together); the rest of the
    row is padding."""
    if key_lengths is not None:
        return sdpa_attention_lengths(q, k, v, key_lengths)
    backend = select_backend(q)
    if backend == "flash":
        return flash_attention(q, k, v)
    if backend == "xformers":
        return xformers_attention(q, k, v)
    return sdpa_attention(q, k, v)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    T, S = q.shape[2], k.shape[2]
    mask, causal = None, False
    if T == S:
        causal = T > 1
    elif T > 1:  # queries are the last T of S positions: a bottom-right-aligned causal mask
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          enable_gqa=q.shape[1] != k.shape[1])


def sdpa_attention_lengths(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_lengths: torch.Tensor) -> torch.Tensor:
    if q.shape[2] != 1:
        raise ValueError(f"key_lengths needs one query per row, got {q.shape[2]}")
    allowed = torch.arange(k.shape[2], device=q.device)[None, :] < key_lengths[:, None]       # (B, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None, None, :],
                                          enable_gqa=q.shape[1] != k.shape[1])


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # flash-attn takes (B, T, H, hd); its causal mask is bottom-right aligned (>= 2.1) and it
    # handles GQA natively when H is a multiple of Hkv.
    y = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    return y.transpose(1, 2)


def xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    B, H, T, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    g = H // Hkv
    # xformers' GQA layout (B, M, Hkv, g, hd): K/V are expanded as views, not copied.
    q5 = q.transpose(1, 2).reshape(B, T, Hkv, g, hd)
    k5 = k.transpose(1, 2).unsqueeze(3).expand(B, S, Hkv, g, hd)
    v5 = v.transpose(1, 2).unsqueeze(3).expand(B, S, Hkv, g, hd)
    bias = _xops.fmha.attn_bias.LowerTriangularFromBottomRightMask() if T > 1 else None
    y = _xops.memory_efficient_attention(q5, k5, v5, attn_bias=bias)   # (B, T, Hkv, g, hd)
    return y.reshape(B, T, H, hd).transpose(1, 2)


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


# ---- fused elementwise kernels (flash-attn's Triton ops on CUDA) --------------------------

try:
    from flash_attn.ops.triton.cross_entropy import cross_entropy_loss as _flash_ce
except Exception:
    _flash_ce = None
try:
    from flash_attn.ops.triton.layer_norm import rms_norm_fn as _flash_rms_norm
except Exception:
    _flash_rms_norm = None
try:
    from flash_attn.layers.rotary import apply_rotary_emb as _flash_rotary
except Exception:
    _flash_rotary = None


def _fused(t: torch.Tensor, kernel) -> bool:
    return kernel is not None and t.is_cuda and os.environ.get("TINYLLAMA_FUSED", "1") != "0"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., d) -> x / rms(x) * weight. Normalised in float32 and cast back before the weight,
    as transformers does, so bf16 checkpoints give the same numbers in both."""
    if _fused(x, _flash_rms_norm) and x.dtype == weight.dtype:
        return _flash_rms_norm(x, weight, None, eps=eps)
    if x.dtype == torch.float32:      # one fused op; the same numbers as the three below
        return weight * F.rms_norm(x, (x.shape[-1],), eps=eps)
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def prepare_rotary(cos: torch.Tensor, sin: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Done once per forward instead of once per apply_rotary call: for the PyTorch path, the
    (T, hd) tables as (T, 1, hd) (broadcast over heads) with sin's first half negated, so HF's
    rotate_half(x) * sin = cat(-x2, x1) * sin becomes x.roll(hd/2) * sin (one op instead of
    three, the same numbers: -x2 * s == x2 * -s exactly). Unchanged where flash-attn's fused kernel may run (CUDA): it
    takes plain tables, and whether it runs is decided per call by q/k's dtype (autocast)."""
    if _fused(like, _flash_rotary):
        return cos, sin
    return _broadcast_signed_tables(cos, sin)


def _broadcast_signed_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = sin.shape[-1] // 2
    return cos[:, None, :], torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)[:, None, :]   # (T, 1, hd)


def rotary_rows(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables at one position per batch row, cos, sin (B, hd) -> (B, 1, 1, hd) each, prepared
    as prepare_rotary's PyTorch path does, for x (B, 1, H, hd)."""
    cos, sin = _broadcast_signed_tables(cos, sin)                   # (B, 1, hd)
    return cos[:, None], sin[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in HF's rotate-half layout. x (B, T, H, hd); cos, sin (T, hd) with the two halves
    equal (RotaryEmbedding builds them so), or as prepare_rotary returns them."""
    if cos.dim() == 2:
        if _fused(x, _flash_rotary) and x.dtype in _HALF:
            half = cos.shape[-1] // 2
            return _flash_rotary(x, cos[:, :half].contiguous(), sin[:, :half].contiguous(), interleaved=False)
        cos, sin = _broadcast_signed_tables(cos, sin)
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy; logits (N, V), targets (N,), in float32. flash-attn's fused
    kernel on CUDA never materialises the softmax."""
    if _fused(logits, _flash_ce):
        losses, _ = _flash_ce(logits, targets)
        return losses.mean()
    return F.cross_entropy(logits.float(), targets)
