"""Fused Triton kernels for training on a GPU, from whichever library is installed and works:
liger-kernel (RMSNorm, RoPE, SwiGLU, cross-entropy and the fused linear cross-entropy that
never materialises the (N, vocab) logits) or flash-attn's Triton ops (RMSNorm, RoPE,
cross-entropy). tinyllama.model.kernels asks `provider_for(tensor)` before each op and falls back to
its PyTorch definitions (which define the numbers) when it returns None.

    use_provider("auto")           liger-kernel if it works here, else flash-attn's ops, else none
    use_provider("liger"|"flash")  that one (an error naming the problem if it cannot run)
    use_provider("off")            none

CLIs make the choice from --fused or TINYLLAMA_FUSED (0, 1, liger, flash: tinyllama.runtime).

"Works" is checked, not assumed: a provider's kernels run once on small tensors of the device
they will serve and are compared with the PyTorch definitions (a wheel built for another
torch/CUDA, or a Triton that cannot compile here, is skipped with a warning instead of failing
mid-training). Only CUDA tensors go to a provider.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from tinyllama.model.definitions import apply_rotary, reference_rms_norm
from tinyllama.errors import checked_choice


class LigerOps:
    """liger-kernel's functional API. q, k in our (B, T, H, hd) layout; liger takes HF's
    (B, H, T, hd) and transposes back to (B, T, H, hd) storage itself, so views cost nothing."""

    name = "liger"

    def __init__(self) -> None:
        from liger_kernel.transformers import functional as lf

        self._lf = lf

    def rms_norm(self, x, weight, eps):
        # "llama" casting: normalise in fp32, cast back to x's dtype, then the weight (as ours)
        return self._lf.liger_rms_norm(x, weight, eps, casting_mode="llama", in_place=False)

    def rotary(self, q, k, cos, sin):
        # liger writes the rotated values into q's and k's own storage (as in HF models, where
        # q and k are fresh projection outputs nobody reads again); the returned views are them
        q, k = self._lf.liger_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)   # (B, H*, T, hd)
        return q.transpose(1, 2), k.transpose(1, 2)

    def swiglu(self, gate, up):
        return self._lf.liger_swiglu(gate, up)

    def cross_entropy(self, logits, targets):
        return self._lf.liger_cross_entropy(logits, targets)

    def linear_cross_entropy(self, h, weight, targets):
        # liger's chunked matmul writes with out= (outside autocast): give it one dtype
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else h.dtype
        return self._lf.liger_fused_linear_cross_entropy(h.to(dtype), weight.to(dtype), targets)


class FlashOps:
    """flash-attn's Triton ops: RMSNorm, RoPE (per tensor, half-width tables), cross-entropy."""

    name = "flash"

    def __init__(self) -> None:
        from flash_attn.layers.rotary import apply_rotary_emb
        from flash_attn.ops.triton.cross_entropy import cross_entropy_loss
        from flash_attn.ops.triton.layer_norm import rms_norm_fn

        self._rotary, self._ce, self._rms = apply_rotary_emb, cross_entropy_loss, rms_norm_fn

    def rms_norm(self, x, weight, eps):
        return self._rms(x, weight, None, eps=eps)

    def rotary(self, q, k, cos, sin):
        half = cos.shape[-1] // 2          # the kernel takes one half of each (duplicated) table
        cos, sin = cos[:, :half].contiguous(), sin[:, :half].contiguous()
        return (self._rotary(q, cos, sin, interleaved=False), self._rotary(k, cos, sin, interleaved=False))

    swiglu = None
    linear_cross_entropy = None

    def cross_entropy(self, logits, targets):
        losses, _ = self._ce(logits, targets)
        return losses.mean()


_PROVIDERS = {"liger": LigerOps, "flash": FlashOps}
_loaded: dict[str, object | None] = {}             # name -> instance, None if it does not import
_working: dict[tuple[str, str], bool] = {}          # (name, device) -> passed its check there


def _load(name: str):
    if name not in _loaded:
        try:
            _loaded[name] = _PROVIDERS[name]()
        except Exception:            # ImportError, or a build that does not match this torch/CUDA
            _loaded[name] = None
    return _loaded[name]


PROVIDER_CHOICES = ("auto", "off", *_PROVIDERS)
# The process's choice, as torch.backends' flags are: asked per op inside the model's forward.
_wanted_provider = "auto"


def use_provider(choice: str = "auto") -> None:
    global _wanted_provider
    _wanted_provider = checked_choice("fused", choice, PROVIDER_CHOICES)


def _wanted() -> str:
    return _wanted_provider


def _serves(t: torch.Tensor) -> bool:
    """Providers serve CUDA tensors only (a seam the CPU tests replace)."""
    return t.is_cuda


def may_run(t: torch.Tensor) -> bool:
    """Whether a provider could serve ops on `t`'s device (without running its check)."""
    return _serves(t) and _wanted() != "off" and any(_load(name) is not None for name in _PROVIDERS)


def provider_for(t: torch.Tensor):
    """The fused-kernel provider for ops on `t` (a CUDA tensor), or None for the PyTorch
    definitions. Each op decides which dtypes it sends (rotary: fp16/bf16 only)."""
    if not _serves(t):
        return None
    wanted = _wanted()
    if wanted == "off":
        return None
    for name in ((wanted,) if wanted in _PROVIDERS else tuple(_PROVIDERS)):
        ops = _load(name)
        if ops is not None and works(ops, t.device):
            return ops
        if wanted == name:
            raise RuntimeError(f"fused {name} (--fused, TINYLLAMA_FUSED): "
                               f"{'it does not import' if ops is None else 'its kernels failed their check'} "
                               f"on {t.device}; install a build for this torch/CUDA or choose auto")
    return None


def works(ops, device: torch.device) -> bool:
    """Runs each of `ops`' kernels once on small bf16 tensors of `device` against the PyTorch
    definitions; cached per (provider, device). False, with a warning, if any fails."""
    key = (ops.name, str(device))
    if key not in _working:
        try:
            _check(ops, device)
            _working[key] = True
        except Exception as e:     # noqa: BLE001 - any failure means: do not use it here
            warnings.warn(f"fused kernels from {ops.name} fail on {device} ({type(e).__name__}: {e}); "
                          f"using the PyTorch definitions", stacklevel=2)
            _working[key] = False
    return _working[key]


def _check(ops, device: torch.device) -> None:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 8, 4, 64, generator=g).to(device, torch.bfloat16)                # (B, T, H, hd)
    w = (torch.rand(64, generator=g) + 0.5).to(device, torch.bfloat16)
    cos, sin = torch.randn(8, 32, generator=g).repeat(1, 2), torch.randn(8, 32, generator=g).repeat(1, 2)
    cos, sin = cos.to(device, torch.bfloat16), sin.to(device, torch.bfloat16)
    pairs = [(ops.rms_norm(x, w, 1e-5), reference_rms_norm(x, w, 1e-5)),
             (ops.rotary(x.clone(), x[:, :, :2].clone(), cos, sin)[0], apply_rotary(x, cos, sin))]   # liger rotates in place
    if ops.swiglu is not None:
        pairs.append((ops.swiglu(x, x), F.silu(x) * x))
    logits, targets = x.flatten(0, 2)[:, :32].float(), torch.arange(64, device=device) % 32
    pairs.append((ops.cross_entropy(logits, targets), F.cross_entropy(logits, targets)))
    for got, want in pairs:
        err = (got.float() - want.float()).abs().max().item()
        if not err < 5e-2:
            raise RuntimeError(f"differs from the PyTorch definition by {err:.3g}")
