"""A draft/target pair with a constructed acceptance rate, for measuring speculative decoding on
realistic shapes without real weights (the hubs are out of reach here).

Random weights would give a draft and a target that never agree. Instead the target is built
to compute the draft's own function: the draft lives in the first half of the target's residual
stream (embeddings, every projection and the lm_head read and write only those dims), head dims
are mapped so that RoPE frequencies and the rotate-half pairing match, the attention scale and
RMSNorm's mean over twice the width are compensated, GQA groups are mapped, and the target's
extra layers have zero output projections (identity blocks). Then the target's lm_head gets
Gaussian noise of a size calibrated, on llama.cpp's own logits of the two quantized files, so
that the target's greedy token equals the draft's on a chosen fraction alpha of the positions a
greedy run visits. The target still pays for a full forward of its own shape (same GEMMs, same
bytes); only alpha is synthetic, and every table says so.

    draft, target, info = constructed_pair("7b", alpha=0.8)   # cached; ~6 min the first time
    python -m bench.constructed_pair --pair 1b --alpha 0.8     # build (or find) a pair

Pairs: "7b" = tinyllama-1.1b drafting for a llama-2-7b-shaped target, "1b" (the quick variant) =
a ~110M half-width draft for a tinyllama-1.1b-shaped target. Both GGUFs are quantized to the same
type (default Q4_0: every block of the draft's rows reappears unchanged in the target's rows, so
quantization does not move the constructed alpha much). Tensors are produced one at a time and
streamed to disk: the 7B target never sits in memory (peak RSS 15 GB while building the 7b pair, ~6 minutes; 10 GB while it runs).
On a GPU the same pair is built in memory instead (embed_draft, then add_calibrated_noise on
PyTorch's logits): bench.speculative --backend torch.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from tinyllama import Llama, ModelConfig, Tokenizer
from tinyllama.atomic import atomic_dir

# The quick variant's draft: half of tinyllama-1.1b's width and head dim, its 32 heads and 4 KV
# heads, 4 layers (~110M parameters, 65M of them embeddings and lm_head).
HALF_DRAFT = ModelConfig(name="tinyllama-1.1b-half", n_layer=4, d_model=1024, n_head=32, n_kv_head=4, ffn_dim=2816)
PAIRS = {"7b": (ModelConfig.from_name("tinyllama-1.1b"), ModelConfig.from_name("llama-2-7b").replace(max_seq_len=2048)),
         "1b": (HALF_DRAFT, ModelConfig.from_name("tinyllama-1.1b"))}
VERSION = 4                # bump when the construction changes: cached pairs are rebuilt
CALIBRATION_PROMPTS, CALIBRATION_TOKENS = 8, 64


def check_embeddable(d: ModelConfig, t: ModelConfig) -> None:
    """ValueError unless target shape t can hold draft shape d exactly."""
    problems = [what for ok, what in [
        (t.d_model == 2 * d.d_model, f"target width {t.d_model} != 2 x draft width {d.d_model}"),
        (t.n_head == d.n_head, f"head counts differ ({t.n_head} vs {d.n_head})"),
        (t.head_dim == 2 * d.head_dim, f"target head dim {t.head_dim} != 2 x draft's {d.head_dim}"),
        (t.ffn_dim >= d.ffn_dim and t.n_layer >= d.n_layer, "the target has fewer FFN dims or layers"),
        (t.vocab_size == d.vocab_size, "vocabularies differ"),
        ((d.n_head // d.n_kv_head) % (t.n_head // t.n_kv_head) == 0,
         "each target KV head must serve query heads of a single draft KV group")] if not ok]
    if problems:
        raise ValueError(f"cannot embed {d.name} in {t.name}: " + "; ".join(problems))


def _head_dims(hd_d: int) -> torch.Tensor:
    """Where draft head dim j goes in a target head (hd_t = 2 hd_d): rotate-half pairs j and
    j + hd_d/2 share RoPE frequency index j, which is index 2j of the target's; so j < hd_d/2 -> 2j,
    else 2(j - hd_d/2) + hd_d (its partner in the target's pairing)."""
    j = torch.arange(hd_d)
    half = hd_d // 2
    return torch.where(j < half, 2 * j, 2 * (j - half) + hd_d)


def _head_rows(n_heads: int, hd_d: int, hd_t: int, src_head, rope: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(target rows, draft rows) of every head's mapped dims; src_head(h) = the draft head that
    target head h copies. rope: q and k, whose dims must keep their RoPE frequency (_head_dims);
    v (and o_proj's columns) take each head's first hd_d dims instead, so that o_proj's input
    holds the draft's values in whole 32-wide blocks: a quantized o_proj then has exactly the
    draft's blocks (interleaved with zeros they quantize differently, and greedy tokens flip)."""
    dims = _head_dims(hd_d) if rope else torch.arange(hd_d)
    tgt = torch.cat([h * hd_t + dims for h in range(n_heads)])
    src = torch.cat([src_head(h) * hd_d + torch.arange(hd_d) for h in range(n_heads)])
    return tgt, src


@functools.lru_cache(maxsize=8)
def target_shapes(t: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Every (HF name, shape) of a Llama of shape t, in checkpoint order (no memory used)."""
    with torch.device("meta"):
        return [(n, tuple(p.shape)) for n, p in Llama(t).state_dict().items()]


def embedded_tensor(name: str, draft: dict[str, torch.Tensor], d: ModelConfig, t: ModelConfig,
                    lm_head_noise: torch.Tensor | None = None) -> torch.Tensor:
    """The target's tensor `name` (float32, HF layout) that makes the target compute the draft.
    Shapes: x_t = [x_d, 0] in the residual stream (t.d_model = 2 d.d_model); mean(x_t^2) =
    mean(x_d^2) / 2, so norm weights are divided by sqrt(2) (and eps halved in the config); q is
    multiplied by sqrt(2) because the score scale is 1/sqrt(hd_t) = 1/(sqrt(2) sqrt(hd_d))."""
    s2 = math.sqrt(2.0)
    dd = d.d_model
    shape = dict(target_shapes(t))[name]
    out = torch.zeros(shape)
    m = re.match(r"model\.layers\.(\d+)\.(.+)$", name)
    if m is None:
        if name == "model.embed_tokens.weight":
            out[:, :dd] = draft[name]
        elif name == "model.norm.weight":
            out[:dd] = draft[name] / s2
        elif name == "lm_head.weight":
            out[:, :dd] = draft[name] if lm_head_noise is None else draft[name] + lm_head_noise
        else:
            raise KeyError(name)
        return out
    layer, part = int(m.group(1)), m.group(2)
    if layer >= d.n_layer:           # identity block: zero output projections, unit norms
        return out.fill_(1.0) if part.endswith("layernorm.weight") else out
    src = lambda p: draft[f"model.layers.{layer}.{p}"]                                     # noqa: E731
    gd, gt = d.n_head // d.n_kv_head, t.n_head // t.n_kv_head
    kv_group = lambda g: (g * gt) // gd                                                    # noqa: E731
    if part.endswith("layernorm.weight"):
        out[:dd] = src(part) / s2
    elif part == "self_attn.q_proj.weight":
        rows, from_rows = _head_rows(t.n_head, d.head_dim, t.head_dim, lambda h: h, rope=True)
        out[rows, :dd] = s2 * src(part)[from_rows]
    elif part in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
        rows, from_rows = _head_rows(t.n_kv_head, d.head_dim, t.head_dim, kv_group, rope=part.startswith("self_attn.k"))
        out[rows, :dd] = src(part)[from_rows]
    elif part == "self_attn.o_proj.weight":
        cols, from_cols = _head_rows(t.n_head, d.head_dim, t.head_dim, lambda h: h, rope=False)
        out[:dd, cols] = src(part)[:, from_cols]
    elif part in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
        out[:d.ffn_dim, :dd] = src(part)
    elif part == "mlp.down_proj.weight":
        out[:dd, :d.ffn_dim] = src(part)
    else:
        raise KeyError(name)
    return out


def target_config(d: ModelConfig, t: ModelConfig) -> ModelConfig:
    """t with the draft's RMSNorm eps halved: mean(x_t^2) + eps_t = (mean(x_d^2) + eps_d) / 2."""
    return t.replace(norm_eps=d.norm_eps / 2, name=f"{t.name}-embeds-{d.name}")


@torch.no_grad()
def embed_draft(draft: Llama, t: ModelConfig, dtype: torch.dtype = torch.float32) -> Llama:
    """The whole target in memory, on the draft's device in `dtype`, each tensor computed there in
    float32 (small shapes, tests, and a 7B on a GPU for the PyTorch runs of bench.speculative;
    the GGUF builder streams to disk instead). Built on the meta device first: no float32 copy
    of a 7B on the way."""
    d = draft.config
    check_embeddable(d, t)
    device = draft.lm_head.weight.device
    sd = {k: v.float() for k, v in draft.state_dict().items()}
    with torch.device("meta"):
        target = Llama(target_config(d, t))
    with torch.device(device):
        weights = {name: embedded_tensor(name, sd, d, t).to(dtype) for name, _ in target_shapes(t)}
    target.load_state_dict(weights, assign=True)        # the RoPE tables rebuild on first use
    return target.eval()


def calibrate_noise(draft_logits: torch.Tensor, target_logits: torch.Tensor, push: torch.Tensor,
                    alpha: float) -> tuple[float, float]:
    """(sigma, agreement): the target's logits become target_logits + sigma * push with lm_head
    noise of size sigma; the smallest sigma whose greedy tokens equal the draft's on at most a
    fraction `alpha` of the positions. All (positions, vocab). Where the pair already agrees on
    fewer than alpha without noise (quantization moved near-ties), sigma is 0 and the agreement
    that floor."""
    best = draft_logits.argmax(-1)

    def agree(sigma: float) -> float:
        return ((target_logits + sigma * push).argmax(-1) == best).float().mean().item()

    if agree(0.0) <= alpha:
        return 0.0, agree(0.0)
    lo, hi = 0.0, 1.0
    while agree(hi) > alpha and hi < 1e4:
        hi *= 2
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if agree(mid) > alpha else (lo, mid)
    return hi, agree(hi)


def _noise_direction(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def lm_head_noise(draft_head: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """The target's lm_head noise (vocab, draft width): sigma * std(W) * E, E ~ N(0, 1) seeded."""
    return sigma * draft_head.float().std() * _noise_direction(draft_head.shape, seed)


@torch.no_grad()
def add_calibrated_noise(draft: Llama, target: Llama, prompts: list[list[int]], tokens: int, alpha: float,
                         seed: int = 0) -> dict:
    """For an in-memory pair (embed_draft): noise on the target's lm_head so that its greedy token
    equals the draft's on a fraction alpha of the positions, calibrated on PyTorch's own logits
    (calibration_logits does it on llama.cpp's for the GGUF pair): each prompt continued by the
    draft's own greedy tokens."""
    from tinyllama.inference.backends import TorchBackend
    from tinyllama.inference.generate import generate

    device = draft.lm_head.weight.device
    rows = {"draft": [], "target": [], "h": []}
    for p in prompts:
        ids = torch.tensor([p + list(generate(TorchBackend(draft, pack=False), p, max_new_tokens=tokens))], device=device)
        h = draft.hidden_states(ids)[0, len(p) - 1:-1]                      # positions predicting new tokens
        rows["h"].append(h.float())
        rows["draft"].append(draft.head(h).float())
        rows["target"].append(target(ids)[0, len(p) - 1:-1].float())
    h, W = torch.cat(rows["h"]), draft.lm_head.weight.detach().float().cpu()
    push = h @ lm_head_noise(W, 1.0, seed).to(device).t()                  # what unit noise adds to the logits
    sigma, agree = calibrate_noise(torch.cat(rows["draft"]), torch.cat(rows["target"]), push, alpha)
    dd = draft.config.d_model
    target.lm_head.weight[:, :dd] += lm_head_noise(W, sigma, seed).to(device, target.lm_head.weight.dtype)
    return {"sigma": sigma, "calibrated_agree": agree, "calibration_positions": int(h.shape[0])}


def calibration_logits(draft_gguf: Path, target_gguf: Path, draft: Llama, prompts: list[list[int]], tokens: int,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(draft logits, noise-free target logits, push), each (positions, vocab), at the positions
    a greedy run visits while the pair agrees: each prompt continued by the draft's own greedy
    tokens, in llama.cpp (the quantized files as they will run). push = h E^T std(W): what unit
    lm_head noise adds to the target's logits (h = the draft's final hidden states, fp32)."""
    from tinyllama.inference.backends import GGUFBackend
    from tinyllama.inference.generate import generate

    d_gguf, t_gguf = GGUFBackend(draft_gguf), GGUFBackend(target_gguf)
    W = draft.lm_head.weight.detach()
    E = _noise_direction(W.shape, seed)
    d_rows, t_rows, pushes = [], [], []
    try:
        for p in prompts:
            d_gguf.reset()
            ids = list(p) + list(generate(d_gguf, p, max_new_tokens=tokens))
            n = len(ids) - len(p)                         # rows predicting each continuation token
            d_rows.append(d_gguf.logits(ids[:-1], n))
            t_rows.append(t_gguf.logits(ids[:-1], n))
            with torch.no_grad():
                h = draft.hidden_states(torch.tensor([ids[:-1]]))[0, -n:]          # (n, d_model)
                pushes.append(h @ E.T * W.std())
    finally:
        d_gguf.close()
        t_gguf.close()
    return torch.cat(d_rows), torch.cat(t_rows), torch.cat(pushes)


def pair_dir(pair: str, alpha: float, qtype: str, seed: int) -> Path:
    from tinyllama.paths import cache_dir

    return cache_dir() / "bench" / f"spec-{pair}-alpha{alpha:g}-{qtype}-seed{seed}-v{VERSION}"


def constructed_pair(pair: str = "7b", alpha: float = 0.8, qtype: str = "q4_0", seed: int = 0,
                     prompts: list[list[int]] | None = None, say=print) -> tuple[Path, Path, dict]:
    """(draft GGUF, target GGUF, info) for PAIRS[pair] at constructed `alpha`, built once and
    cached under ~/.cache/tinyllama/bench/ (an interrupted build leaves nothing there). prompts:
    the ids to calibrate on (default: the speculative benchmark's chat prompts)."""
    d, t = PAIRS[pair]
    out = pair_dir(pair, alpha, qtype, seed)
    if (out / "info.json").is_file():
        return out / "draft.gguf", out / "target.gguf", json.loads((out / "info.json").read_text())
    tok = Tokenizer.llama2()
    if prompts is None:
        from . import chat_prompts
        prompts = chat_prompts(tok, CALIBRATION_PROMPTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        info = build_pair(d, t, alpha, qtype, seed, prompts, tok, tmp, say)
        (tmp / "info.json").write_text(json.dumps(info, indent=2))
    return out / "draft.gguf", out / "target.gguf", info


def build_pair(d: ModelConfig, t: ModelConfig, alpha: float, qtype: str, seed: int, prompts: list[list[int]],
               tok: Tokenizer, where: Path, say=print) -> dict:
    """Writes where/draft.gguf and where/target.gguf; returns what was built (sigma, agreement).
    The target is written without noise first; the noise is calibrated on llama.cpp's logits of
    the two files as they will run, then written into the target's lm_head and quantized again."""
    import time

    from quantize.export import FLOAT_TYPES, vocab_metadata

    check_embeddable(d, t)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    draft = Llama(d).eval()
    with torch.no_grad():          # the weights both files hold: F16-rounded, so both quantize the same values
        for p in draft.parameters():
            p.copy_(p.half().float())
    sd = {k: v.detach() for k, v in draft.state_dict().items()}
    tok.save(where / "tokenizer")
    vocab = vocab_metadata(where / "tokenizer", tok)
    ftype = qtype if qtype in FLOAT_TYPES else "f16"
    files = {role: _write(role, cfg, sd, d, t, tok, vocab, ftype, qtype, where, say)
             for role, cfg in (("draft", d), ("target", target_config(d, t)))}
    sigma, agreement, floor, positions = 0.0, 1.0, 1.0, 0
    if alpha < 1:
        say(f"calibrating lm_head noise for alpha {alpha} on {len(prompts)} prompts x {CALIBRATION_TOKENS} tokens ...")
        d_logits, t_logits, push = calibration_logits(files["draft"], files["target"], draft, prompts,
                                                      CALIBRATION_TOKENS, seed)
        floor = (t_logits.argmax(-1) == d_logits.argmax(-1)).float().mean().item()
        sigma, agreement = calibrate_noise(d_logits, t_logits, push, alpha)
        positions = len(push)
        if sigma > 0:
            say(f"writing the noise (sigma {sigma:.4f}) into the target's lm_head ...")
            flat = where / f"target-{ftype}.gguf"
            _add_head_noise(flat, lm_head_noise(sd["lm_head.weight"], sigma, seed))
            if ftype != qtype:
                _quantize(flat, where / "target.gguf", qtype, say)
            else:
                shutil.copyfile(flat, where / "target.gguf")
    for role in files:
        (where / f"{role}-{ftype}.gguf").unlink(missing_ok=True)
    shutil.rmtree(where / "tokenizer")
    return {"draft": d.name, "target": t.name, "alpha_constructed": alpha, "calibrated_agreement": agreement,
            "agreement_without_noise": floor, "sigma": sigma, "qtype": qtype, "seed": seed,
            "calibration_positions": positions, "build_seconds": round(time.perf_counter() - t0, 1)}


def _write(role: str, cfg: ModelConfig, sd: dict, d: ModelConfig, t: ModelConfig, tok, vocab, ftype: str,
           qtype: str, where: Path, say) -> Path:
    """where/{role}.gguf (no noise), through where/{role}-{ftype}.gguf, which is kept for the noise."""
    from quantize.export import write_gguf_tensors

    say(f"writing the {role} ({cfg.name}, {ftype}) ...")
    shapes = target_shapes(cfg)
    if role == "draft":
        arrays = (sd[n].numpy() for n, _ in shapes)
        exact = frozenset()
    else:
        arrays = (embedded_tensor(n, sd, d, t).numpy() for n, _ in shapes)
        # the target's q_proj is sqrt(2) x the draft's: kept F32 until llama.cpp quantizes it, so
        # that its blocks quantize to the draft's quants (an F16 copy of sqrt(2) w rounds some across)
        exact = frozenset(n for n, _ in shapes if n.endswith("q_proj.weight"))
    flat = write_gguf_tensors(where / f"{role}-{ftype}.gguf", cfg, tok, vocab, shapes, arrays, ftype, cfg.name,
                              keep_f32=exact)
    if ftype == qtype:
        shutil.copyfile(flat, where / f"{role}.gguf")
        return where / f"{role}.gguf"
    return _quantize(flat, where / f"{role}.gguf", qtype, say)


def _quantize(src: Path, out: Path, qtype: str, say) -> Path:
    from quantize.export import quantize_gguf

    say(f"quantizing {out.name} to {qtype.upper()} ...")
    return quantize_gguf(src, out, qtype)


def _add_head_noise(flat_gguf: Path, noise: torch.Tensor) -> None:
    """Adds noise (vocab, draft width) to the first columns of output.weight, in place, in an
    F32/F16 GGUF (row-major (vocab, width) there)."""
    import gguf

    reader = gguf.GGUFReader(str(flat_gguf), "r+")
    head = next(t for t in reader.tensors if t.name == "output.weight")
    data = head.data.reshape(noise.shape[0], -1)                       # a writable view of the file
    width = noise.shape[1]
    data[:, :width] = (data[:, :width].astype(np.float32) + noise.numpy()).astype(data.dtype)
    reader.data.flush()
    del reader, head, data


def qtypes() -> list[str]:
    """The GGUF types a pair can be built in: every type llama.cpp makes without an importance
    matrix (there is no calibration text for one here)."""
    from quantize.export import ALL_TYPES, NEEDS_IMATRIX

    return [t for t in ALL_TYPES if t not in NEEDS_IMATRIX]


def main(argv: list[str] | None = None) -> int:
    types = qtypes()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", choices=sorted(PAIRS), default="7b")
    ap.add_argument("--alpha", type=float, default=0.8, help="constructed acceptance rate (default 0.8)")
    ap.add_argument("--qtype", default="q4_0", choices=types, metavar="TYPE",
                    help=f"GGUF type of both files, one of {', '.join(types)} (default q4_0)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not 0 < args.alpha <= 1:
        ap.error(f"--alpha must be in (0, 1] (1: no noise, the target computes the draft), got {args.alpha}")
    draft, target, info = constructed_pair(args.pair, args.alpha, args.qtype, args.seed)
    print(json.dumps({"draft_gguf": str(draft), "target_gguf": str(target), **info}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
