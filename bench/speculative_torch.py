"""bench.speculative --backend torch: a constructed pair built in memory on one device (a GPU)
and decoded by the project's own generator in PyTorch, eager and through captured CUDA graphs.

The pair is bench.constructed_pair's (the draft embedded in the first half of the target's
residual stream, so that target(x) == draft(x) up to rounding), built here directly on the
device (bf16 on a GPU, float32 on a CPU: embed_draft), its lm_head noise calibrated on PyTorch's
logits (add_calibrated_noise) for a CONSTRUCTED greedy agreement alpha. The target still pays for
a full forward of its shape (same shapes, dense GEMMs); a plain random model of the target's
shape is timed beside it to show that it does.

Records (bench.records), what gpu_check's spec stage collects:
  build        sizes, dtype, the calibrated noise and agreement
  latency_ms   per-token latency of draft, target and the plain target at position 256, for 1 and
               k+1 tokens, eager and through tinyllama.inference.graphs' captured static step
  draft_decode the draft's captured step against eager and against its memory floor (its weight
               bytes over the copy rate gpu_check's env probe measured)
  plain        plain decoding of target and draft through the generator, eager and captured;
               c_loop = the draft's time per token over the target's
  speculative  per k and mode: tokens/s, measured speedup, accepted/drafted, alpha solved from
               tokens per target pass, c and v from the latencies, the theory at that alpha and
               projected at 0.6-0.9, efficiency; outputs_differing_from_plain_greedy (bf16
               numerics at T=1 vs T=k+1 can flip near-tied argmaxes; float32 must give 0)

    python -m bench.speculative --pair 7b --backend torch --device cuda [--alpha 0.8] [--tokens 64] [--k 1 2 4]
    python -m bench.speculative --pair tiny --backend torch --device cpu        # tiny shapes, a CPU rehearsal
"""

from __future__ import annotations

import time

import torch

from tinyllama import KVCache, Llama, ModelConfig, Step
from tinyllama.inference.backends import TorchBackend
from tinyllama.inference.draft_policy import Fixed
from tinyllama.inference.graphs import StaticDecoder
from tinyllama.runtime import RuntimeOptions

from . import sync
from .constructed_pair import PAIRS as GGUF_PAIRS
from .constructed_pair import add_calibrated_noise, embed_draft
from .random_models import random_model
from .records import env_ceiling, record
from .speculative_runs import decode_prompts, solve_alpha, theory

# "tiny": a draft and target small enough to rehearse every step on a CPU in seconds
PAIRS = {**GGUF_PAIRS,
         "tiny": (ModelConfig(name="tiny-draft", n_layer=2, d_model=64, n_head=4, n_kv_head=2, ffn_dim=176,
                              max_seq_len=1024),
                  ModelConfig(name="tiny-target", n_layer=3, d_model=128, n_head=4, n_kv_head=4, ffn_dim=300,
                              max_seq_len=1024))}
POSITION = 256          # where the per-token latencies are timed (a KV cache of 1024)


def _emit(**fields) -> dict:
    return record("speculative", **fields)


@torch.inference_mode()
def per_token_eager(model: Llama, cache: KVCache, T: int, n: int = 20) -> float:
    """Median seconds of a T-token cached forward + head at POSITION."""
    device = model.lm_head.weight.device
    x = torch.randint(3, model.config.vocab_size, (1, T), device=device)
    times = []
    for i in range(n + 3):
        sync(device)
        t0 = time.perf_counter()
        model.head(model.hidden_states(x, cache, Step.span(POSITION, T))[0, -T:]).float()
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


def latencies(models: dict[str, Llama], ks: list[int]) -> dict:
    """(model, eager|graph, T) -> seconds; T = 1 and k+1 for the pair, 1 for the plain target."""
    out = {}
    for name, model in models.items():
        cache = KVCache.for_model(model, 1, 1024)
        for T in [1] + ([k + 1 for k in ks] if name != "plain7b" else []):
            out[(name, "eager", T)] = per_token_eager(model, cache, T)
            try:
                out[(name, "graph", T)] = per_token_graph(model, T)
            except Exception as e:                 # recorded; the eager numbers still stand
                out[(name, "graph", T)] = None
                _emit(what="graph_error", model=name, T=T, error=repr(e)[:300])
        del cache
    return out


def draft_decode_report(draft: Llama, lat: dict) -> None:
    """The GPU-inference target: the draft's one-token step captured against eager (>= 5x) and
    against its memory floor, its weight bytes over the env probe's measured copy rate (<= 1.5x)."""
    eager, graph = lat.get(("draft", "eager", 1)), lat.get(("draft", "graph", 1))
    copy_tb_s = env_ceiling("copy_tb_s")
    weight_bytes = sum(p.numel() * p.element_size() for p in draft.parameters())
    floor = weight_bytes / (copy_tb_s * 1e12) if copy_tb_s else None
    _emit(what="draft_decode", eager_ms=eager and round(eager * 1e3, 3), graph_ms=graph and round(graph * 1e3, 3),
          eager_over_graph=round(eager / graph, 2) if eager and graph else None,
          floor_ms=floor and round(floor * 1e3, 3), graph_over_floor=round(graph / floor, 2) if graph and floor else None,
          targets="eager_over_graph >= 5 or graph_over_floor <= 1.5")


def speculative_runs(draft: Llama, target: Llama, prompts: list[list[int]], tokens: int, ks: list[int],
                     lat: dict) -> None:
    """The generator's plain and speculative loops, eager and through captured graphs
    (TorchBackend on CUDA: RuntimeOptions(cuda_graphs=False) turns capture off)."""
    modes = ("eager", "graph") if target.lm_head.weight.is_cuda else ("eager",)
    for how in modes:
        _speculative_mode(draft, target, prompts, tokens, ks, lat, how)


def _speculative_mode(draft, target, prompts, tokens, ks, lat, how: str) -> None:
    device = target.lm_head.weight.device
    runtime = RuntimeOptions(cuda_graphs=how == "graph")
    tb, db = TorchBackend(target, pack=False, runtime=runtime), TorchBackend(draft, pack=False, runtime=runtime)
    decode_prompts(tb, prompts, tokens, device=device)                          # warm-up (and captures)
    plain = decode_prompts(tb, prompts, tokens, device=device)
    t_plain, t_draft = plain.seconds, decode_prompts(db, prompts, tokens, device=device).seconds
    n_tok = tokens * len(prompts)
    _emit(what="plain", mode=how, target_tok_s=n_tok / t_plain, draft_tok_s=n_tok / t_draft, c_loop=t_draft / t_plain)
    for k in ks:
        run = decode_prompts(tb, prompts, tokens, db, Fixed(k), device=device)
        outs, secs, drafted, accepted, passes = run.outputs, run.seconds, run.drafted, run.accepted, run.passes
        alpha = solve_alpha(n_tok / passes, k) if passes else 0.0
        t1, d1, tk = lat.get(("target", how, 1)), lat.get(("draft", how, 1)), lat.get(("target", how, k + 1))
        rec = {"k": k, "mode": how, "tok_s": n_tok / secs, "speedup_measured": t_plain / secs,
               "accepted_over_drafted": accepted / max(1, drafted), "alpha_solved": alpha,
               "outputs_differing_from_plain_greedy": sum(a != b for a, b in zip(outs, plain.outputs))}
        if t1 and d1 and tk:
            rec.update(c=d1 / t1, v=tk / t1, theory=theory(alpha, k, d1 / t1, tk / t1),
                       projected_speedup={str(a): round(theory(a, k, d1 / t1, tk / t1), 3) for a in (0.6, 0.7, 0.8, 0.9)})
            rec["efficiency"] = rec["speedup_measured"] / rec["theory"]
        _emit(what="speculative", **rec)
    tb.close()
    db.close()


def run_torch_pair(pair: str, alpha: float, ks: list[int], tokens: int, n_prompts: int, device: torch.device) -> None:
    """Builds PAIRS[pair] on `device` at a constructed `alpha` and records every measurement."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dcfg, tcfg = PAIRS[pair]
    tcfg = tcfg.replace(max_seq_len=dcfg.max_seq_len)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    draft = random_model(dcfg, device, dtype)
    prompts = [torch.randint(3, dcfg.vocab_size, (24,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(n_prompts)]
    target = embed_draft(draft, tcfg, dtype)
    noise = add_calibrated_noise(draft, target, prompts, tokens, alpha)
    _emit(what="build", seconds=round(time.perf_counter() - t0, 1), draft=dcfg.name, target=tcfg.name,
          dtype=str(dtype).removeprefix("torch."), draft_params=draft.num_params(), target_params=target.num_params(),
          gpu_mem_gb=round(torch.cuda.memory_allocated() / 1e9, 2) if device.type == "cuda" else None, **noise)
    plain7b = random_model(tcfg, device, dtype)              # is the constructed target as slow as a real one?
    lat = latencies({"draft": draft, "target": target, "plain7b": plain7b}, ks)
    del plain7b
    _emit(what="latency_ms", **{f"{m}/{how}/T{T}": round(s * 1e3, 3) if s else None for (m, how, T), s in lat.items()})
    draft_decode_report(draft, lat)
    speculative_runs(draft, target, prompts, tokens, ks, lat)
