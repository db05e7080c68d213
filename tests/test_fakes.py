"""The GPU libraries' fakes (tests/fakes.py) held to the real functions: a call that binds to a
fake must bind to the real function, and mean the same there. Each check skips, saying why, where
the real package is not installed (the CPU machines: liger-kernel and flash-attn are GPU extras);
the comparison itself is checked here on plain functions, so it runs everywhere."""

from __future__ import annotations

import inspect

import pytest
from fakes import all_fakes

FAKED = [(module.__name__, name) for module in all_fakes()
         for name, f in vars(module).items() if inspect.isfunction(f)]
DISTRIBUTION = {"liger_kernel": "liger-kernel", "flash_attn": "flash-attn"}

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def signature_mismatches(fake, real) -> list[str]:
    """Why a call that binds to `fake` might not bind to `real`, or bind otherwise: each of the
    fake's parameters must be the real function's of that name, at the same place if it can be
    given by position, never positional-only there when the fake takes it by keyword, with the
    real default if the fake has one; each parameter the real function requires must be required
    by the fake; and the fake takes no *args or **kwargs (which would accept any call)."""
    fake_params, real_params = inspect.signature(fake).parameters, inspect.signature(real).parameters
    real_positional = [n for n, p in real_params.items() if p.kind in _POSITIONAL]
    out = []
    for i, (name, p) in enumerate(fake_params.items()):
        r = real_params.get(name)
        if p.kind in _VARIADIC:
            out.append(f"{p}: the fake accepts any call")
        elif r is None:
            out.append(f"{name}: not a parameter of the real function")
        else:
            if p.kind in _POSITIONAL and real_positional[i:i + 1] != [name]:
                where = f"position {real_positional.index(name)}" if name in real_positional else "keyword-only"
                out.append(f"{name}: position {i} in the fake, {where} in the real function")
            if p.kind is not inspect.Parameter.POSITIONAL_ONLY and r.kind is inspect.Parameter.POSITIONAL_ONLY:
                out.append(f"{name}: positional-only in the real function")
            if p.default is not p.empty and r.default is r.empty:
                out.append(f"{name}: optional in the fake, required by the real function")
            elif p.default is not p.empty and p.default != r.default:
                out.append(f"{name}: default {p.default!r} in the fake, {r.default!r} in the real function")
    for name, r in real_params.items():
        if r.kind not in _VARIADIC and r.default is r.empty and name not in fake_params:
            out.append(f"{name}: required by the real function, missing from the fake")
    return out


@pytest.mark.parametrize("module, name", FAKED, ids=[f"{m}.{n}" for m, n in FAKED])
def test_each_fake_has_the_real_signature(module, name):
    package = module.split(".")[0]
    real = pytest.importorskip(module, exc_type=ImportError,
                               reason=f"{DISTRIBUTION[package]} is not installed here (or does not import): "
                                      f"no real {module}.{name} to hold the fake to")
    fake = getattr(next(m for m in all_fakes() if m.__name__ == module), name)
    assert signature_mismatches(fake, getattr(real, name)) == [], f"{module}.{name}"


def test_the_fakes_are_what_fused_imports():
    """Every function LigerOps and FlashOps take from their library has a fake (and so a check)."""
    assert {("liger_kernel.transformers.functional", n) for n in
            ("liger_rope", "liger_rms_norm", "liger_swiglu", "liger_cross_entropy",
             "liger_fused_linear_cross_entropy")} <= set(FAKED)
    assert {("flash_attn.layers.rotary", "apply_rotary_emb"), ("flash_attn.ops.triton.layer_norm", "rms_norm_fn"),
            ("flash_attn.ops.triton.cross_entropy", "cross_entropy_loss")} <= set(FAKED)


def _real(a, b, c=1, *, d=2):
    pass


def _prefix(a, b):
    pass


def _keyword(a, b, *, c=1):        # the real c, passed by keyword only: stricter, never wrong
    pass


def _renamed(a, x):
    pass


def _swapped(b, a):
    pass


def _other_default(a, b, c=5):
    pass


def _optional(a, b=0):
    pass


def _anything(*args, **kwargs):
    pass


@pytest.mark.parametrize("fake, problems", [
    (_prefix, []),
    (_keyword, []),
    (_real, []),
    (_renamed, ["x: not a parameter", "b: required by the real function, missing"]),
    (_swapped, ["b: position 0 in the fake, position 1", "a: position 1 in the fake, position 0"]),
    (_other_default, ["c: default 5 in the fake, 1 in the real function"]),
    (_optional, ["b: optional in the fake, required"]),
    (_anything, ["*args: the fake accepts any call", "**kwargs: the fake accepts any call",
                 "a: required by the real function", "b: required by the real function"]),
])
def test_the_signature_check_finds_what_would_bind_otherwise(fake, problems):
    found = signature_mismatches(fake, _real)
    assert len(found) == len(problems), found
    for got, want in zip(found, problems):
        assert got.startswith(want), (got, want)
