"""Serving throughput side by side: our OpenAI-compatible server (`python -m serve`, continuous
batching) and llama.cpp's own `llama-server`, on the same GGUF, with the same clients, in one run.

    python -m bench.server_compare [--model PATH] [--clients 1 8 32] [--duration 60] [--parallel 8]
    python -m bench.server_compare --model TARGET.gguf -md DRAFT.gguf --clients 1    # speculative, both servers

Both servers are started with `parallel` slots of `n_ctx` tokens (ours: --parallel N --ctx-size C;
llama-server: -np N -c N*C, its defaults otherwise), then for each client count that many
streaming chat clients send requests back to back for `duration` seconds per server, in
`--windows` turns that alternate between the servers (this machine's speed drifts from minute to
minute; turns make both see the same drift, and give a paired ratio per window) (greedy, `max_tokens`
each, questions cycled from one list and numbered once for the whole run, so no prompt repeats:
both servers keep finished prompts for reuse, llama-server also in RAM across slots, and this
measures batching, not that cache). Reported per server and client count: generated tokens/s
(all clients together, from each response's usage), requests/s, time to first token and request
latency (p50 / p99), and errors: non-200 answers, errors inside a stream, broken connections.
With -md both servers speculate with the draft by their own defaults: ours `--draft-max auto`,
llama-server `--spec-type draft-simple` (-md alone loads the draft and leaves speculation off); the
tokens each drafted and had accepted come from its responses (llama-server's `timings`, our `stats`).
The models: tinyllama-1.1b-shaped with random weights (bench.random_models; speed does not
depend on the values) as Q4_K_M, the 19M chat GGUF `make run` leaves and the real model
(SmolLM2-135M-Instruct, `make real-model`), each when present.
llama-server is built from the llama.cpp sources in the llama-cpp-python sdist
(tinyllama.llamacpp.tools, `make tools`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tinyllama.cli import add_renamed_flag

from . import markdown_table, paired
from .server_load import DEFAULT_MODEL, free_port, percentile, wait_until_up

QUESTIONS = ("Tell me about llamas.", "What is the capital of France?", "Write a haiku about the sea.",
             "How do I reverse a list in Python?", "Why is the sky blue?", "Name three prime numbers.",
             "What does a compiler do?", "Give me a tip for a job interview.")
# One numbering for the whole process, across windows, client counts and servers: llama-server
# keeps the states of earlier prompts in RAM (--cache-ram, 8 GiB by default) and skips the prefill
# of the longest one it has seen, so a numbering that restarted with each client count would
# measure that cache on the repeats instead of batching.
_PROMPT_NUMBERS = itertools.count(1)


def numbered(question: str) -> str:
    """The question with a number no earlier prompt of this process had."""
    return f"({next(_PROMPT_NUMBERS)}) {question}"


def start_server(kind: str, model: Path, port: int, parallel: int, n_ctx: int, log: Path,
                 draft: Path | None = None) -> subprocess.Popen:
    """`python -m serve` (kind "ours") or llama-server (kind "llama-server") on 127.0.0.1:port;
    with `draft`, each drafting with it by its own default settings (ours: --draft-max auto;
    llama-server: --spec-type draft-simple)."""
    if kind == "ours":
        cmd = [sys.executable, "-m", "serve", "--model", str(model), "--port", str(port), "--parallel", str(parallel),
               "--ctx-size", str(n_ctx), "--max-queue", "1000"]
    else:
        from tinyllama.llamacpp.tools import tool

        cmd = [str(tool("llama-server")), "-m", str(model), "--port", str(port), "--host", "127.0.0.1",
               "-np", str(parallel), "-c", str(parallel * n_ctx), "-t", str(os.cpu_count() or 2)]
    if draft:
        # llama-server's speculative types are off by default (--spec-type none): -md alone loads the
        # draft and never drafts. draft-simple is its draft-model speculation, at its own defaults
        # (--spec-draft-n-max 3, --spec-draft-p-min 0).
        cmd += ["-md", str(draft)] + (["--spec-type", "draft-simple"] if kind == "llama-server" else [])
    with open(log, "w") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


class Tally:
    def __init__(self) -> None:
        self.tokens = self.sent = self.served = self.bad_status = self.stream_errors = self.transport_errors = 0
        self.drafted = self.accepted = 0             # speculative drafts, as each server's responses report them
        self.ttft: list[float] = []
        self.latency: list[float] = []
        self.first_error: str | None = None

    def error(self, what: str) -> None:
        self.first_error = self.first_error or what


def draft_counts(event: dict) -> tuple[int, int] | None:
    """(drafted, accepted) from a response's last event: llama-server's `timings` (draft_n,
    draft_n_accepted) or our `stats` (drafted, accepted); None where it carries neither."""
    if "timings" in event:
        return event["timings"].get("draft_n", 0), event["timings"].get("draft_n_accepted", 0)
    if "stats" in event:
        return event["stats"].get("drafted", 0), event["stats"].get("accepted", 0)
    return None


async def one_request(client, tally: Tally, question: str, max_tokens: int) -> None:
    import httpx

    tally.sent += 1
    body = {"messages": [{"role": "user", "content": numbered(question)}], "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    t0, ttft, usage, drafts = time.perf_counter(), None, None, (0, 0)
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                tally.error(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
                tally.bad_status += 1
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    tally.error(f"in the stream: {event['error']}")
                    tally.stream_errors += 1
                    return
                if ttft is None and event.get("choices") and event["choices"][0].get("delta", {}).get("content"):
                    ttft = time.perf_counter() - t0
                usage = event.get("usage") or usage
                drafts = draft_counts(event) or drafts
    except httpx.TransportError as e:
        tally.error(f"{type(e).__name__}: {e}")
        tally.transport_errors += 1
        return
    tally.served += 1
    tally.latency.append(time.perf_counter() - t0)
    tally.tokens += usage["completion_tokens"] if usage else 0
    tally.drafted += drafts[0]
    tally.accepted += drafts[1]
    if ttft is not None:
        tally.ttft.append(ttft)


async def steady_load(url: str, clients: int, duration_s: float, max_tokens: int, tally: Tally | None = None) -> float:
    """`clients` streaming clients sending requests back to back until `duration_s` has passed
    (requests under way then are finished and counted), counted into `tally`; the seconds until
    the last one ended."""
    import httpx

    tally = tally if tally is not None else Tally()
    # A connection per request: llama-server (cpp-httplib) closes a kept-alive connection after a
    # few requests, and a request sent just then fails as a broken connection that is no error of
    # either server. Local connects cost the same for both.
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0),
                                 limits=httpx.Limits(max_connections=None, max_keepalive_connections=0)) as client:
        t0 = time.perf_counter()
        deadline = t0 + duration_s

        async def client_loop(i: int) -> None:
            n = 0
            while time.perf_counter() < deadline:
                await one_request(client, tally, QUESTIONS[(i + n) % len(QUESTIONS)], max_tokens)
                n += 1
        await asyncio.gather(*(client_loop(i) for i in range(clients)))
        return time.perf_counter() - t0


def summary(tally: Tally, clients: int, elapsed: float) -> dict:
    """One row's figures from what `clients` clients got in `elapsed` seconds."""
    return {"clients": clients, "seconds": elapsed, "served": tally.served, "tokens_per_s": tally.tokens / elapsed,
            "requests_per_s": tally.served / elapsed, "ttft_p50": percentile(tally.ttft, 0.5),
            "ttft_p99": percentile(tally.ttft, 0.99), "latency_p50": percentile(tally.latency, 0.5),
            "latency_p99": percentile(tally.latency, 0.99), "bad_status": tally.bad_status,
            "stream_errors": tally.stream_errors, "transport_errors": tally.transport_errors,
            "first_error": tally.first_error, "drafted": tally.drafted, "accepted": tally.accepted}


def measure(model: Path, clients=(1, 8, 32), duration_s: float = 60.0, parallel: int = 8, n_ctx: int = 512,
            max_tokens: int = 32, kinds=("ours", "llama-server"), draft: Path | None = None,
            windows: int = 4) -> list[dict]:
    """One row per (server, client count). Both servers run at once (an idle one costs nothing)
    and take turns: each client count's `duration_s` per server is split into `windows` windows,
    alternating which server goes first, so that a machine whose speed drifts by tens of per cent
    from minute to minute slows both alike. Each row also keeps its rate in each window
    ("window_rates"), for the paired ratio."""
    name = model.name + (f" drafted by {draft.name}" if draft else "")
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        urls = {kind: stack.enter_context(running_server(kind, model, parallel, n_ctx, Path(tmp), draft))
                for kind in kinds}
        rows = {}
        for n in clients:
            tallies, seconds, rates = {k: Tally() for k in kinds}, dict.fromkeys(kinds, 0.0), {k: [] for k in kinds}
            for w in range(windows):
                for kind in (kinds if w % 2 == 0 else kinds[::-1]):
                    tokens = tallies[kind].tokens
                    elapsed = asyncio.run(steady_load(urls[kind], n, duration_s / windows, max_tokens, tallies[kind]))
                    seconds[kind] += elapsed
                    rates[kind].append((tallies[kind].tokens - tokens) / elapsed)
            for kind in kinds:
                row = rows[kind, n] = {"server": kind, "model": name, **summary(tallies[kind], n, seconds[kind]),
                                       "window_rates": rates[kind], "draft": draft.name if draft else None}
                print(f"  {kind}, {n} clients: {row['tokens_per_s']:.1f} tok/s"
                      + (f"; first error: {row['first_error']}" if row["first_error"] else ""),
                      file=sys.stderr, flush=True)
    return [rows[kind, n] for kind in kinds for n in clients]


@contextlib.contextmanager
def running_server(kind: str, model: Path, parallel: int, n_ctx: int, tmp: Path, draft: Path | None):
    """A started and warmed-up server's URL; stopped on exit, which fails if it logged a traceback."""
    port, log = free_port(), tmp / f"{kind}.log"
    server = start_server(kind, model, port, parallel, n_ctx, log, draft)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, server, log)
        asyncio.run(steady_load(url, 1, 0.0, 4))            # warm-up: one short request
        yield url
    finally:
        server.terminate()
        server.wait(30)
    if "Traceback" in log.read_text():
        raise RuntimeError(f"{kind} logged a traceback:\n{log.read_text()[-3000:]}")


def paired_ratio(ours: dict, theirs: dict) -> str:
    """The median of ours over theirs window by window, with the range: "1.04x (0.97-1.10)"."""
    return paired([a / b for a, b in zip(ours.get("window_rates", []), theirs.get("window_rates", [])) if b > 0])


def table(rows: list[dict], parallel: int, n_ctx: int, max_tokens: int) -> str:
    head = ("model", "server", "clients", "generated tok/s", "vs 1 client", "vs llama-server",
            "vs llama-server per window", "requests/s", "first token p50 / p99", "latency p50 / p99", "errors")
    single = {(r["model"], r["server"]): r["tokens_per_s"] for r in rows if r["clients"] == 1}
    anchor = {(r["model"], r["clients"]): r for r in rows if r["server"] == "llama-server"}
    out = []
    for r in rows:
        one, ref = single.get((r["model"], r["server"])), anchor.get((r["model"], r["clients"]))
        out.append((r["model"], "ours (`python -m serve`)" if r["server"] == "ours" else "llama-server", str(r["clients"]),
                    f"{r['tokens_per_s']:,.1f}", f"{r['tokens_per_s'] / one:.2f}x" if one else "-",
                    f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-",
                    paired_ratio(r, ref) if ref and r is not ref else "-", f"{r['requests_per_s']:.2f}",
                    f"{r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} s", f"{r['latency_p50']:.2f} / {r['latency_p99']:.2f} s",
                    f"{r['bad_status'] + r['stream_errors'] + r['transport_errors']}"))
    windows = max((len(r.get("window_rates", [])) for r in rows), default=0)
    return (markdown_table(head, out) + drafted_note(rows) +
            f"\n\nBoth servers: {parallel} slots of {n_ctx} tokens, {os.cpu_count()} threads; streaming chat "
            f"clients back to back, greedy, max_tokens {max_tokens}; both running at once, taking turns in "
            f"{windows} windows per client count, alternating which goes first (per window: the median of ours "
            "over llama-server's window by window, and the range). errors: non-200 "
            "answers + errors inside a stream + broken connections.")


def drafted_note(rows: list[dict]) -> str:
    """What each server's responses say it drafted and had accepted, for the rows with a draft."""
    def said(r: dict) -> str:
        share = f" ({r['accepted'] / r['drafted']:.0%})" if r["drafted"] else ""
        return (f"{'ours' if r['server'] == 'ours' else 'llama-server'} at {r['clients']} "
                f"client{'s' if r['clients'] > 1 else ''} drafted {r['drafted']:,} tokens, "
                f"{r['accepted']:,} accepted{share}")
    drafted = [said(r) for r in rows if r.get("draft")]
    return f"\n\nSpeculation, from the responses: {'; '.join(drafted)}." if drafted else ""


def default_models() -> list[Path]:
    from .random_models import random_gguf

    from tinyllama import real_model

    models = [random_gguf("tinyllama-1.1b", "Q4_K_M", say=lambda m: print(m, file=sys.stderr))]
    return models + [m for m in (DEFAULT_MODEL, real_model.path()) if m is not None and m.exists()]


def measure_models(models: list[Path] | None, clients, duration_s: float, parallel: int, n_ctx: int,
                   max_tokens: int, draft: Path | None = None, windows: int = 4) -> list[dict]:
    """measure() for each model (default: default_models()), the rows in one list."""
    return [r for m in (models or default_models())
            for r in measure(Path(m), clients, duration_s, parallel, n_ctx, max_tokens, draft=draft, windows=windows)]


def run(duration_s: float = 60.0, clients=(1, 8, 32), parallel: int = 8, n_ctx: int = 512, max_tokens: int = 32,
        models: list[Path] | None = None) -> str:
    return table(measure_models(models, clients, duration_s, parallel, n_ctx, max_tokens), parallel, n_ctx,
                 max_tokens)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.server_compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="a .gguf (repeatable; default: the 1.1B-shaped random "
                                                     "Q4_K_M, and the 19M chat GGUF if `make run` left it)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="client counts (default: 1 8 32)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per client count (default: %(default)s)")
    ap.add_argument("--windows", type=int, default=4, help="turns per client count each server's duration is "
                                                           "split into (default: %(default)s)")
    ap.add_argument("--parallel", type=int, default=8, help="slots in both servers (default: %(default)s)")
    ap.add_argument("-c", "--ctx-size", dest="ctx_size", type=int, default=512,
                    help="context per slot (default: %(default)s)")
    add_renamed_flag(ap, "--n-ctx", "--ctx-size", dest="ctx_size", type=int)
    ap.add_argument("--max-tokens", type=int, default=32, help="per request (default: %(default)s)")
    ap.add_argument("-md", "--model-draft", type=Path, help="a draft .gguf both servers speculate with, each by "
                                                            "its own default settings (ours --draft-max auto, "
                                                            "llama-server --spec-type draft-simple; default: none)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    args = ap.parse_args(argv)
    if args.model_draft and not args.model_draft.is_file():
        ap.error(f"--model-draft {args.model_draft}: no such file")
    rows = measure_models([Path(m) for m in args.model or []], args.clients, args.duration, args.parallel,
                          args.ctx_size, args.max_tokens, args.model_draft, args.windows)
    print(json.dumps(rows, indent=1) if args.json else table(rows, args.parallel, args.ctx_size, args.max_tokens))
    return 0 if all(r["bad_status"] + r["stream_errors"] + r["transport_errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
