"""What the CPU tests stand in for: timings, and the GPU libraries they cannot import.

Timings: Timers (tinyllama.measure.Timer) to set as a deciding module's `timer`.

    monkeypatch.setattr(packing, "timer", timings({"onednn": 0.5}))   # onednn decodes fastest
    monkeypatch.setattr(precision, "timer", never_timed("an explicit dtype must not be timed"))

GPU libraries: liger-kernel's functional API and flash-attn's Triton ops, as modules installed
where the real ones are imported from, so tinyllama.model.fused imports them as it imports the
real packages. Each function keeps the real one's signature as far as it goes (test_fakes.py
holds the two together where the real package is installed) and its layout and dtype asserts,
with the PyTorch reference math inside; `calls` records which ran.

    calls = []
    install(monkeypatch, liger_functional(calls))       # fused.LigerOps() now imports the fake
    block(monkeypatch, "flash_attn")                      # as if flash-attn were not installed
"""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F

from tinyllama.model.definitions import reference_rms_norm

# ---- timings ---------------------------------------------------------------------------------------


def timings(seconds: dict[str, float], default: float = 1.0):
    """A Timer that answers from `seconds` by each candidate's name (packing's DecodeLayout and
    FewRowsKernel: "none", a layout, "rowmajor"), `default` for the rest; runs nothing."""
    def timer(candidates, how):
        return [seconds.get(c.name, default) for c in candidates]
    return timer


def never_timed(why: str):
    """A Timer that fails the test if the decision times anything."""
    def timer(candidates, how):
        import pytest

        pytest.fail(why)
    return timer


# ---- GPU libraries ---------------------------------------------------------------------------------

LIGER = "liger_kernel.transformers.functional"
FLASH_ROTARY = "flash_attn.layers.rotary"
FLASH_LAYER_NORM = "flash_attn.ops.triton.layer_norm"
FLASH_CROSS_ENTROPY = "flash_attn.ops.triton.cross_entropy"


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _module(name: str, **functions) -> types.ModuleType:
    module = types.ModuleType(name)
    for f in functions.values():
        f.__module__ = name
    module.__dict__.update(functions)
    return module


def liger_functional(calls: list) -> types.ModuleType:
    """liger_kernel.transformers.functional: the functions LigerOps calls."""
    def liger_rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        calls.append("rope")
        assert q.dim() == 4 and cos.dim() == 2 and q.shape[2] == cos.shape[0], "q (B, H, T, hd), cos (T, hd)"
        assert q.dtype == cos.dtype == k.dtype, (q.dtype, cos.dtype)
        c, s = cos[None, None], sin[None, None]
        rq, rk = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
        return q.copy_(rq), k.copy_(rk)              # liger rotates in place, in q's and k's storage

    # liger's own parameter names throughout (X, W; input, target): a keyword must mean the same
    def liger_rms_norm(X, W, eps, offset=0.0, casting_mode="llama", in_place=True):
        calls.append("rms")
        assert casting_mode == "llama" and not in_place
        return W * (X.float() * torch.rsqrt(X.float().pow(2).mean(-1, keepdim=True) + eps)).to(X.dtype)

    def liger_swiglu(a, b):
        calls.append("swiglu")
        return F.silu(a) * b

    def liger_cross_entropy(input, target):
        calls.append("ce")
        return F.cross_entropy(input.float(), target)

    def liger_fused_linear_cross_entropy(input, weight, target):
        calls.append("linear_ce")
        assert input.dtype == weight.dtype, "liger's chunked matmul needs one dtype"
        return F.cross_entropy((input @ weight.T).float(), target)

    return _module(LIGER, liger_rope=liger_rope, liger_rms_norm=liger_rms_norm, liger_swiglu=liger_swiglu,
                   liger_cross_entropy=liger_cross_entropy,
                   liger_fused_linear_cross_entropy=liger_fused_linear_cross_entropy)


def flash_ops(calls: list) -> list[types.ModuleType]:
    """flash-attn's modules FlashOps imports: rotary (half-width tables, and its dtype assert),
    the Triton RMSNorm and cross-entropy."""
    def apply_rotary_emb(x, cos, sin, interleaved=False):
        calls.append("flash_rope")
        assert x.dtype == cos.dtype, f"Input and cos/sin must have the same dtype, got {x.dtype} and {cos.dtype}"
        assert not interleaved
        c, s = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]
        return x * c + _rotate_half(x) * s

    def rms_norm_fn(x, weight, bias, *, eps=1e-6):      # eps is keyword-only here: 8th in flash-attn's
        calls.append("flash_rms")
        assert bias is None
        return reference_rms_norm(x, weight, eps)

    def cross_entropy_loss(logits, labels):
        calls.append("flash_ce")
        return F.cross_entropy(logits.float(), labels, reduction="none"), None     # (losses, z-losses)

    return [_module(FLASH_ROTARY, apply_rotary_emb=apply_rotary_emb),
            _module(FLASH_LAYER_NORM, rms_norm_fn=rms_norm_fn),
            _module(FLASH_CROSS_ENTROPY, cross_entropy_loss=cross_entropy_loss)]


def all_fakes() -> list[types.ModuleType]:
    """Every fake module (test_fakes.py checks each function of each against the real one)."""
    return [liger_functional([]), *flash_ops([])]


def install(monkeypatch, *modules: types.ModuleType) -> None:
    """Makes each module importable by its name, under fake parent packages (made once, so the
    three flash-attn modules share one `flash_attn`), each an attribute of its parent."""
    for module in modules:
        parts = module.__name__.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if i == len(parts):
                monkeypatch.setitem(sys.modules, name, module)
            elif not getattr(sys.modules.get(name), "__fake__", False):
                package = types.ModuleType(name)
                package.__path__, package.__fake__ = [], True
                monkeypatch.setitem(sys.modules, name, package)
            if i > 1:
                setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], sys.modules[name])


def block(monkeypatch, package: str) -> None:
    """Makes `package` and everything under it fail to import, as if it were not installed."""
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, package, None)
