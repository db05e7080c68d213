"""torch's intra-op threads beside llama.cpp's: what a GGUF engine (continuous batching, as the
server runs it) delivers with torch at the process's thread count and with the one thread an
engine of llama.cpp models now gives it (tinyllama.inference.threads).

    python -m bench.torch_threads [--model M.gguf] [--requests 8] [--pairs 6]

llama.cpp runs the model on the engine's compute thread; torch does each token's sampling math
(argmax; softmax and a draw when sampling) in the generating thread. torch and llama.cpp share
one OpenMP runtime (libgomp), and once torch has started a team of its own the runtime manages
more threads than there are cores, so every team, llama.cpp's included, spins only briefly at
its barriers before sleeping, for the rest of the process's life. Hence each window runs in a
fresh process: with a torch op run first at the process's thread count (what any sampling
softmax did before), or with the engine's one thread. The two alternate `--pairs` times, each
a window of `--requests` chat requests (32 tokens, greedy, then sampled at temperature 0.7);
reported: each setting's tokens/s over all its windows, and the median and range of the ratio
pair by pair.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import markdown_table, paired
from .server_compare import QUESTIONS
from .server_load import DEFAULT_MODEL


def window(model: Path, temperature: float, requests: int, first: int, torch_team: bool) -> tuple[int, float]:
    """(tokens, seconds) of `requests` chats one after another, numbered from `first`, in a fresh
    engine; torch_team: first run a torch op at the process's thread count, as any torch op on
    a row of logits did before the engine kept torch at one thread (the team it starts stays)."""
    from serve.engine import Engine
    from tinyllama.inference.generate import SamplingParams

    threads = torch.get_num_threads()
    engine = Engine.load(model, n_ctx=512, parallel=8)
    try:
        if torch_team:
            torch.set_num_threads(threads)
            float(torch.softmax(torch.randn(1 << 16), -1).max())
        sampling = SamplingParams(max_new_tokens=32, temperature=temperature, seed=0 if temperature else None)
        chat = [{"role": "user", "content": "Hello!"}]
        "".join(engine.chat(chat, sampling))                                # warm-up
        tokens, t0 = 0, time.perf_counter()
        for i in range(first, first + requests):
            stream = engine.chat([{"role": "user", "content": f"({i}) {QUESTIONS[i % len(QUESTIONS)]}"}], sampling)
            "".join(stream)
            tokens += stream.stats.generated_tokens
        return tokens, time.perf_counter() - t0
    finally:
        engine.close()


def window_in_child(model: Path, temperature: float, requests: int, first: int, torch_team: bool) -> tuple[int, float]:
    """window() in a fresh process: a torch team, once started, stays for the process's life."""
    cmd = [sys.executable, "-m", "bench.torch_threads", "--model", str(model), "--window",
           f"{temperature},{requests},{first},{int(torch_team)}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    tokens, seconds = json.loads(out.strip().splitlines()[-1])
    return tokens, seconds


def measure(model: Path, requests: int = 8, pairs: int = 6, temperatures=(0.0, 0.7)) -> list[tuple]:
    """(temperature, tok/s with a torch team, tok/s without, the paired ratios: without over with)."""
    rows, n = [], 0
    for temperature in temperatures:
        totals = {True: [0, 0.0], False: [0, 0.0]}
        ratios = []
        for p in range(pairs):
            rates = {}
            for team in ((True, False) if p % 2 == 0 else (False, True)):
                tokens, seconds = window_in_child(model, temperature, requests, n, team)
                totals[team][0] += tokens
                totals[team][1] += seconds
                rates[team] = tokens / seconds
            n += requests                        # both settings answer the same questions
            ratios.append(rates[False] / rates[True])
            print(f"  temperature {temperature}, pair {p + 1}: without / with a torch team: {ratios[-1]:.2f}x",
                  file=sys.stderr, flush=True)
        rows.append((temperature, totals[True][0] / totals[True][1], totals[False][0] / totals[False][1], ratios))
    return rows


def table(model: Path, rows: list[tuple], threads: int, requests: int, pairs: int) -> str:
    head = ("model", "sampling", f"a torch op ran on {threads} threads, tok/s", "torch at 1 thread (the engine's), tok/s",
            "1 thread over {threads}, paired median (range)".format(threads=threads))
    out = [(model.name, "greedy" if t == 0 else f"temperature {t:g}", f"{a:.1f}", f"{b:.1f}", paired(ratios))
           for t, a, b, ratios in rows]
    return (markdown_table(head, out) + f"\n\nAn engine (8 slots, llama.cpp on its compute thread), chats of 32 "
            f"tokens one at a time; {pairs} pairs of {requests}-request windows, each in a fresh process, the order "
            "alternating.")


def default_model() -> Path | None:
    from tinyllama import real_model

    return next((m for m in (real_model.path(), DEFAULT_MODEL) if m is not None and m.exists()), None)


def run(requests: int = 8, pairs: int = 6, model: Path | None = None) -> str:
    model = model or default_model()
    if model is None:
        return "Not measured: no GGUF here (`make real-model`, or `make run` for the 19M chat GGUF)."
    threads = torch.get_num_threads()
    return table(model, measure(model, requests, pairs), threads, requests, pairs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.torch_threads", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a .gguf (default: the real model, else the 19M chat GGUF)")
    ap.add_argument("--requests", type=int, default=8, help="chat requests per window (default: %(default)s)")
    ap.add_argument("--pairs", type=int, default=6, help="pairs of windows per sampling setting (default: %(default)s)")
    ap.add_argument("--window", help=argparse.SUPPRESS)     # TEMPERATURE,REQUESTS,FIRST,TEAM: one window, as JSON
    args = ap.parse_args(argv)
    if args.model is not None and not args.model.is_file():
        ap.error(f"--model {args.model}: no such file")
    if args.window:
        temperature, requests, first, team = args.window.split(",")
        print(json.dumps(window(args.model, float(temperature), int(requests), int(first), team == "1")))
        return 0
    print(run(args.requests, args.pairs, args.model))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
