"""The model's hot kernels, each behind one function that picks an implementation by what is
installed and where the tensors live, with a pure-PyTorch fallback that defines the numbers.

Attention:

    y = attention(q, k, v)   # q (B, H, T, hd); k, v (B, Hkv, S, hd) with S >= T -> (B, H, T, hd)

Causal with the mask aligned bottom-right: query t sits at absolute position S - T + t, so
the same call serves training (S == T), prefill, one-token decoding (T == 1) and speculative
verification (1 < T < S). Grouped-query attention (H a multiple of Hkv) never materialises
repeated K/V on the backends that support it.

Order: flash-attn 2 (`flash_attn_func`, CUDA, fp16/bf16) > xformers memory-efficient
attention (CUDA) > torch `scaled_dot_product_attention`. `use_attention("sdpa"|"flash"|"xformers")`
forces one (an error if it cannot run); CLIs call it from --attention or TINYLLAMA_ATTENTION
(tinyllama.runtime). `reference_attention` (tinyllama.model.definitions,
re-exported here) is the plain-math definition that the tests hold every backend to.

RMSNorm, rotary embeddings, SwiGLU and cross-entropy (also fused with the LM head) use Triton
kernels on CUDA, liger-kernel's or flash-attn's, whichever is installed and passes its check
(tinyllama.model.fused; `fused.use_provider("off")` turns them off), else the PyTorch definitions
(tinyllama.model.definitions); a GPU-marked test holds the fused versions to them.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from tinyllama.model import fused
from tinyllama.model.definitions import (  # noqa: F401  (re-exported: the definitions beside the kernels)
    apply_rotary,
    broadcast_signed_tables,
    reference_attention,
    reference_rms_norm,
)
from tinyllama.errors import checked_choice
from tinyllama.runtime import CHOICES, RuntimeOptions

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
    if torch.cuda.is_available() and _xformers_works(torch.device("cuda")):
        out.insert(0, "xformers")
    if _flash_attn_func is not None and torch.cuda.is_available():
        out.insert(0, "flash")
    return out


ATTENTION_CHOICES = CHOICES["attention"]      # one list, the one --attention offers
# The process's choice, as torch.backends' flags are: read per call deep inside the model's
# forward, where an argument would have to pass through every module of the model definition.
_attention = "auto"


def use_attention(choice: str = "auto") -> None:
    """auto picks by what runs here, once per device and dtype; a backend's name forces it."""
    global _attention
    _attention = checked_choice("attention", choice, ATTENTION_CHOICES)


def use_kernels(runtime: RuntimeOptions) -> None:
    """Makes runtime's attention and fused-kernel choices the process's (where a model is loaded
    for inference or training)."""
    use_attention(runtime.attention)
    fused.use_provider(runtime.fused)


# what the choice depends on -> the backend: decided on the first call for a device and dtype,
# not on every call of every layer (xformers' probe runs a kernel)
_chosen: dict[tuple, str] = {}


def select_backend(q: torch.Tensor) -> str:
    key = (q.device, q.dtype, fused._serves(q), _attention)
    if key not in _chosen:
        _chosen[key] = _decide_backend(q)
    return _chosen[key]


def _decide_backend(q: torch.Tensor) -> str:
    forced = _attention
    on_gpu = fused._serves(q)
    if forced != "auto":
        if forced == "flash" and (_flash_attn_func is None or not on_gpu or q.dtype not in _HALF):
            raise RuntimeError("attention flash (--attention, TINYLLAMA_ATTENTION) needs flash-attn installed and "
                               "fp16/bf16 CUDA tensors")
        if forced == "xformers" and not (on_gpu and _xformers_works(q.device)):
            raise RuntimeError("attention xformers (--attention, TINYLLAMA_ATTENTION) needs xformers installed with "
                               "its CUDA ops built for this torch (python -m xformers.info) and CUDA tensors")
        return forced
    if on_gpu and q.dtype in _HALF and _flash_attn_func is not None:
        return "flash"
    if on_gpu and _xformers_works(q.device):
        return "xformers"
    return "sdpa"


_xformers_ok: dict[str, bool] = {}


def _xformers_works(device: torch.device) -> bool:
    """Whether xformers' attention runs here. Importing is not enough: a PyPI wheel built for
    another torch/CUDA imports without its C++/CUDA ops and fails on the first call. So one
    small call on `device` decides, once per device."""
    if _xops is None:
        return False
    if str(device) not in _xformers_ok:
        try:
            q = torch.zeros(1, 2, 2, 1, 64, device=device, dtype=torch.bfloat16)        # (B, M, Hkv, g, hd)
            _xops.memory_efficient_attention(q, q, q)
            _xformers_ok[str(device)] = True
        except Exception as e:      # noqa: BLE001 - NotImplementedError "No operator found", a missing .so, ...
            warnings.warn(f"xformers is installed but its attention does not run on {device} "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); using SDPA", stacklevel=2)
            _xformers_ok[str(device)] = False
    return _xformers_ok[str(device)]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_lengths: torch.Tensor | None = None,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """The one entry point the model calls. Causal bottom-right by default, else:
    key_lengths (B,): one query per row (T == 1) that sees only its row's first key_lengths[b]
    keys (sequences of different lengths batched together); the rest of the row is padding.
    mask (T, S) bool: query t sees key s where True (a static-shape step over a whole
    preallocated cache, tinyllama.inference.graphs)."""
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
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
    elif T > 1:
        # Queries are the last T of S positions (speculative verification): a bottom-right
        # causal bias, which SDPA's flash kernel takes as such on CUDA; a boolean mask would keep
        # it off that kernel. Elsewhere the bias is materialised as that mask.
        mask = causal_lower_right(T, S)
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


# ---- elementwise kernels: fused on a GPU (tinyllama.model.fused), else these definitions --------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., d) -> x / rms(x) * weight. Normalised in float32 and cast back before the weight,
    as transformers does, so bf16 checkpoints give the same numbers in both."""
    ops = fused.provider_for(x)
    if ops is not None and x.dtype == weight.dtype:
        return ops.rms_norm(x, weight, eps)
    return reference_rms_norm(x, weight, eps)


def prepare_rotary(cos: torch.Tensor, sin: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Done once per forward instead of once per apply_rotary call: for the PyTorch path, the
    (T, hd) tables as (T, 1, hd) (broadcast over heads) with sin's first half negated, so HF's
    rotate_half(x) * sin = cat(-x2, x1) * sin becomes x.roll(hd/2) * sin (one op instead of
    three, the same numbers: -x2 * s == x2 * -s exactly). Unchanged where a fused kernel may run
    (CUDA): it takes plain tables, and whether it runs is decided per call by q/k's dtype
    (under autocast they are bf16 while `like`, the residual stream, is float32)."""
    if fused.may_run(like):
        return cos, sin
    return broadcast_signed_tables(cos, sin)


def rotary_rows(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables at one position per batch row, cos, sin (B, hd) -> (B, 1, 1, hd) each, prepared
    as prepare_rotary's PyTorch path does, for x (B, 1, H, hd)."""
    cos, sin = broadcast_signed_tables(cos, sin)                   # (B, 1, hd)
    return cos[:, None], sin[:, None]


def rotate_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q (B, T, H, hd) and k (B, T, Hkv, hd) in HF's rotate-half layout, with tables as
    apply_rotary takes them. The tables follow q's dtype: under bf16 autocast q and k come out of
    their projections in bf16 while the tables were built for the float32 residual stream, and
    mixing the two would upcast q and k to float32 (twice the traffic and activation memory)
    and fail flash-attn's kernel, which asserts equal dtypes."""
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    if cos.dim() == 2 and q.dtype in _HALF:
        ops = fused.provider_for(q)
        if ops is not None:
            return ops.rotary(q, k, cos, sin)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, (..., ffn) each; one fused kernel where liger-kernel runs."""
    ops = fused.provider_for(gate)
    if ops is not None and ops.swiglu is not None and up.dtype == gate.dtype:
        return ops.swiglu(gate, up)
    return F.silu(gate) * up


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy; logits (N, V), targets (N,), in float32. The fused kernels on
    CUDA never materialise the softmax."""
    ops = fused.provider_for(logits)
    if ops is not None:
        return ops.cross_entropy(logits, targets)
    return F.cross_entropy(logits.float(), targets)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """cross_entropy(h @ weightᵀ, targets) for h (N, d), weight (V, d), targets (N,): the LM head
    and the loss in one, which liger-kernel computes chunk by chunk so the (N, V) logits (1 GB
    for 8 × 2048 tokens of a 32k vocabulary in fp32) never exist. Elsewhere the logits are
    computed (in the autocast dtype if one is active) and taken to float32, as `Llama.forward`
    does."""
    ops = fused.provider_for(h)
    if ops is not None and ops.linear_cross_entropy is not None:
        return ops.linear_cross_entropy(h, weight, targets)
    return cross_entropy(F.linear(h, weight).float(), targets)
