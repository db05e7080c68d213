"""Stage `spec`: speculative decoding on one GPU without real weights: tinyllama-1.1b drafting
for a llama-2-7b-shaped target.

Random weights would give a draft and a target that never agree. The target is built as
bench.constructed_pair builds it (the draft embedded in the first half of the target's residual
stream, so that target(x) == draft(x) up to rounding), here directly on the GPU in bf16; then
its lm_head gets noise calibrated (bench.constructed_pair.calibrate_noise) so that its greedy
token equals the draft's on a fraction alpha of the positions a greedy run visits. The target
still pays for a full 7B forward (same shapes, dense GEMMs).

Measured: per-token latency of draft, target and a plain random 7B (eager, and through
tinyllama.inference.graphs' captured static step, as TorchBackend decodes on CUDA), the cost of verifying
k+1 tokens vs 1, c = t_draft / t_target, and the wall-clock speedup of tinyllama.inference.generate's
speculative loop at the constructed alpha, eager and captured. Derived: the expected speedup
at alpha 0.6-0.9 from each mode's measured costs. Alpha itself
is synthetic, not TinyLlama-vs-Llama-2's acceptance; outputs_differing_from_plain_greedy counts
prompts whose speculative output differs from plain greedy (bf16 numerics at T=1 vs T=k+1 can
flip near-tied argmaxes).

    python -m gpu_check.spec [--alpha 0.8] [--tokens 64] [--prompts 4] [--ks 1 2 4]
    python -m gpu_check.spec --tiny           # tiny shapes (a CPU rehearsal)
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from bench.constructed_pair import (
    calibrate_noise,
    check_embeddable,
    embedded_tensor,
    lm_head_noise,
    target_config,
    target_shapes,
)
from bench.random_models import random_model
from bench.speculative import solve_alpha, theory
from tinyllama import Llama, ModelConfig
from tinyllama.cli import add_draft_model_flag
from tinyllama.inference.backends import TorchBackend
from tinyllama.inference.draft_policy import Fixed
from tinyllama.inference.generate import generate
from tinyllama.inference.graphs import StaticDecoder

from .common import device_name, emit, read_results, sync

TINY = (ModelConfig(name="tiny-draft", n_layer=2, d_model=64, n_head=4, n_kv_head=2, ffn_dim=176, max_seq_len=1024),
        ModelConfig(name="tiny-target", n_layer=3, d_model=128, n_head=4, n_kv_head=4, ffn_dim=300, max_seq_len=1024))
POSITION = 256          # where the per-token latencies are timed (a KV cache of 1024)


@torch.no_grad()
def embed_on_device(draft: Llama, t: ModelConfig, dtype: torch.dtype) -> Llama:
    """bench.constructed_pair's target, each tensor computed on the draft's device in float32
    and kept in `dtype` (the builder there streams to disk for llama.cpp instead)."""
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


@torch.no_grad()
def add_calibrated_noise(draft: Llama, target: Llama, prompts: list[list[int]], tokens: int, alpha: float,
                         seed: int = 0) -> dict:
    """Noise on the target's lm_head so that its greedy token equals the draft's on a fraction
    alpha of the positions: each prompt continued by the draft's own greedy tokens."""
    device = draft.lm_head.weight.device
    rows = {"draft": [], "target": [], "h": []}
    for p in prompts:
        ids = torch.tensor([p + list(generate(TorchBackend(draft, pack=False), p, max_new_tokens=tokens))], device=device)
        h = draft.hidden_states(ids)[0, len(p) - 1:-1]                      # positions predicting new tokens
        rows["h"].append(h.float())
        rows["draft"].append(draft.head(h).float())
        rows["target"].append(target(ids)[0, len(p) - 1:-1].float())
        draft.clear_kv_cache()
    h, W = torch.cat(rows["h"]), draft.lm_head.weight.detach().float().cpu()
    push = h @ lm_head_noise(W, 1.0, seed).to(device).t()                  # what unit noise adds to the logits
    sigma, agree = calibrate_noise(torch.cat(rows["draft"]), torch.cat(rows["target"]), push, alpha)
    dd = draft.config.d_model
    target.lm_head.weight[:, :dd] += lm_head_noise(W, sigma, seed).to(device, target.lm_head.weight.dtype)
    return {"sigma": sigma, "calibrated_agree": agree, "calibration_positions": int(h.shape[0])}


@torch.inference_mode()
def per_token_eager(model: Llama, T: int, n: int = 20) -> float:
    """Median seconds of a T-token cached forward + head at POSITION."""
    device = model.lm_head.weight.device
    x = torch.randint(3, model.config.vocab_size, (1, T), device=device)
    times = []
    for i in range(n + 3):
        sync(device)
        t0 = time.perf_counter()
        model.head(model.hidden_states(x, start_pos=POSITION)[0, -T:]).float()
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def per_token_graph(model: Llama, T: int, reps: int = 20) -> float | None:
    """Median seconds of a T-token step at POSITION through tinyllama.inference.graphs.StaticDecoder's
    captured CUDA graph, as TorchBackend decodes on CUDA (ids in, logits back on the host)."""
    device = model.lm_head.weight.device
    if device.type != "cuda":
        return None
    decoder = StaticDecoder(model, 1024, capture=True)
    tokens = torch.randint(3, model.config.vocab_size, (T,)).tolist()
    times = []
    for i in range(reps + 3):                              # the first call captures
        sync(device)
        t0 = time.perf_counter()
        decoder.step(tokens, POSITION)
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def draft_decode_report(draft: Llama, lat: dict) -> None:
    """The GPU-inference target: the draft's one-token step captured against eager (>= 5x) and
    against its memory floor, its weight bytes over the env stage's measured copy rate (<= 1.5x)."""
    eager, graph = lat.get(("draft", "eager", 1)), lat.get(("draft", "graph", 1))
    env = next((r for r in read_results() if r.get("stage") == "env" and r.get("copy_tb_s")), None)
    weight_bytes = sum(p.numel() * p.element_size() for p in draft.parameters())
    floor = weight_bytes / (env["copy_tb_s"] * 1e12) if env else None
    emit("spec", what="draft_decode", eager_ms=eager and round(eager * 1e3, 3), graph_ms=graph and round(graph * 1e3, 3),
         eager_over_graph=round(eager / graph, 2) if eager and graph else None,
         floor_ms=floor and round(floor * 1e3, 3), graph_over_floor=round(graph / floor, 2) if graph and floor else None,
         targets="eager_over_graph >= 5 or graph_over_floor <= 1.5")


def latencies(models: dict[str, Llama], ks: list[int]) -> dict:
    """(model, eager|graph, T) -> seconds; T = 1 and k+1 for the pair, 1 for the plain 7B."""
    out = {}
    for name, model in models.items():
        model.setup_kv_cache(1, 1024)
        for T in [1] + ([k + 1 for k in ks] if name != "plain7b" else []):
            out[(name, "eager", T)] = per_token_eager(model, T)
            try:
                out[(name, "graph", T)] = per_token_graph(model, T)
            except Exception as e:                 # recorded; the eager numbers still stand
                out[(name, "graph", T)] = None
                emit("spec", what="graph_error", model=name, T=T, error=repr(e)[:300])
        model.clear_kv_cache()
    return out


def decode(target: TorchBackend, prompts: list[list[int]], tokens: int, draft: TorchBackend | None = None,
           k: int = 4) -> tuple[list[list[int]], float, dict]:
    """The project's generator over every prompt: outputs, decode seconds (prefill excluded), counts."""
    outs, seconds, counts = [], 0.0, {"drafted": 0, "accepted": 0, "target_calls": 0}
    device = target.model.lm_head.weight.device
    for p in prompts:
        target.reset()
        if draft is not None:
            draft.reset()
        sync(device)
        t0 = time.perf_counter()
        g = generate(target, p, max_new_tokens=tokens, drafter=draft, draft_policy=Fixed(k))
        outs.append(list(g))
        sync(device)
        seconds += time.perf_counter() - t0 - g.stats.prefill_seconds
        for key in counts:
            counts[key] += getattr(g.stats, key)
    return outs, seconds, counts


def speculative_runs(draft: Llama, target: Llama, prompts: list[list[int]], tokens: int, ks: list[int],
                     lat: dict) -> None:
    """The generator's plain and speculative loops, eager and through captured graphs
    (TinyLlama's TorchBackend on CUDA: TINYLLAMA_CUDA_GRAPHS=0 turns capture off)."""
    modes = ("eager", "graph") if target.lm_head.weight.is_cuda else ("eager",)
    for how in modes:
        os.environ["TINYLLAMA_CUDA_GRAPHS"] = "1" if how == "graph" else "0"
        try:
            _speculative_mode(draft, target, prompts, tokens, ks, lat, how)
        finally:
            os.environ.pop("TINYLLAMA_CUDA_GRAPHS", None)


def _speculative_mode(draft, target, prompts, tokens, ks, lat, how: str) -> None:
    tb, db = TorchBackend(target, pack=False), TorchBackend(draft, pack=False)
    decode(tb, prompts, tokens)                                       # warm-up (and captures)
    plain, t_plain, _ = decode(tb, prompts, tokens)
    _, t_draft, _ = decode(db, prompts, tokens)
    n_tok = tokens * len(prompts)
    emit("spec", what="plain", mode=how, target_tok_s=n_tok / t_plain, draft_tok_s=n_tok / t_draft,
         c_loop=t_draft / t_plain)
    for k in ks:
        outs, secs, n = decode(tb, prompts, tokens, db, k)
        alpha = solve_alpha(n_tok / n["target_calls"], k) if n["target_calls"] else 0.0
        t1, d1, tk = lat.get(("target", how, 1)), lat.get(("draft", how, 1)), lat.get(("target", how, k + 1))
        rec = {"k": k, "mode": how, "tok_s": n_tok / secs, "speedup_measured": t_plain / secs,
               "accepted_over_drafted": n["accepted"] / max(1, n["drafted"]), "alpha_solved": alpha,
               "outputs_differing_from_plain_greedy": sum(a != b for a, b in zip(outs, plain))}
        if t1 and d1 and tk:
            rec.update(c=d1 / t1, v=tk / t1, theory=theory(alpha, k, d1 / t1, tk / t1),
                       projected_speedup={str(a): round(theory(a, k, d1 / t1, tk / t1), 3) for a in (0.6, 0.7, 0.8, 0.9)})
            rec["efficiency"] = rec["speedup_measured"] / rec["theory"]
        emit("spec", what="speculative", **rec)
    tb.close()
    db.close()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny draft and target (a CPU rehearsal)")
    add_draft_model_flag(ap, "the draft's preset (random weights) (default: %(default)s)", default="tinyllama-1.1b")
    ap.add_argument("--target", default="llama-2-7b")
    ap.add_argument("--alpha", type=float, default=0.8, help="the constructed greedy agreement")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4], help="draft lengths")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(device_name())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dcfg, tcfg = TINY if args.tiny else (ModelConfig.from_name(args.model_draft), ModelConfig.from_name(args.target))
    tcfg = tcfg.replace(max_seq_len=dcfg.max_seq_len)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    draft = random_model(dcfg, device, dtype)
    prompts = [torch.randint(3, dcfg.vocab_size, (24,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(args.prompts)]
    target = embed_on_device(draft, tcfg, dtype)
    noise = add_calibrated_noise(draft, target, prompts, args.tokens, args.alpha)
    emit("spec", what="build", seconds=round(time.perf_counter() - t0, 1), draft=dcfg.name, target=tcfg.name,
         dtype=str(dtype).removeprefix("torch."), draft_params=draft.num_params(), target_params=target.num_params(),
         gpu_mem_gb=round(torch.cuda.memory_allocated() / 1e9, 2) if device.type == "cuda" else None, **noise)
    plain7b = random_model(tcfg, device, dtype)              # is the constructed target as slow as a real one?
    lat = latencies({"draft": draft, "target": target, "plain7b": plain7b}, args.ks)
    del plain7b
    emit("spec", what="latency_ms", **{f"{m}/{how}/T{T}": round(s * 1e3, 3) if s else None
                                        for (m, how, T), s in lat.items()})
    draft_decode_report(draft, lat)
    speculative_runs(draft, target, prompts, args.tokens, args.ks, lat)


if __name__ == "__main__":
    main()
