"""Load test of the OpenAI-compatible server: `python -m serve` in a subprocess, driven over HTTP.

    python -m bench.server_load [--model PATH] [--clients 32] [--duration 60] [--rounds 6] [--parallel 4]

Each round: `clients` streaming chat clients send requests back to back (the server's
--max-queue equals `clients`, so the queue is full); halfway through, a burst of `burst` more
requests arrives at the full queue and is owed 429s. Then `clients` streams are opened and
dropped (half while queued, half after their first token); once the server reports nothing in
flight, `clients` requests at once must all be admitted (the dropped streams freed their
slots). The server's resident memory (VmRSS) is read after every round.

Reported: requests served, requests/s and generated tokens/s of the steady clients, p50/p99 of
time to first token and of the whole request, 429s, 5xx (must be 0), errors reported inside a
stream, and the server's RSS per round. The model: out/gguf/tinyllama-19m-chat-Q4_K_M.gguf
(what `make run` leaves) if present, else a random tinyllama-debug checkpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import markdown_table

DEFAULT_MODEL = Path("out/gguf/tinyllama-19m-chat-Q4_K_M.gguf")


def tiny_checkpoint(directory: Path) -> Path:
    """A random tinyllama-debug chat checkpoint (the project's own save_checkpoint)."""
    import torch

    from tinyllama import Llama, ModelConfig, Tokenizer, save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(Llama(ModelConfig.from_name("tinyllama-debug")), Tokenizer.llama2(), directory / "tiny-random")
    return directory / "tiny-random"


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


class Tally:
    def __init__(self) -> None:
        self.status: dict[tuple[str, int], int] = {}          # (phase, HTTP status) -> count
        self.ttft: list[float] = []
        self.total: list[float] = []
        self.tokens = 0
        self.steady_ok = 0
        self.stream_errors = 0
        self.transport_errors = 0

    def count(self, phase: str, status: int) -> None:
        self.status[phase, status] = self.status.get((phase, status), 0) + 1

    def total_of(self, status: int, phase: str | None = None) -> int:
        return sum(n for (ph, s), n in self.status.items() if s == status and phase in (None, ph))


async def chat(client, tally: Tally, phase: str, max_tokens: int, drop: str | None = None) -> int:
    """One streaming chat request. drop: 'queued' (leave after the role chunk, before any token)
    or 'token' (after the first token); None: read to the end. The 'steady' phase records
    latencies and tokens."""
    steady = phase == "steady"
    import httpx

    body = {"messages": [{"role": "user", "content": "Tell me about llamas."}], "max_tokens": max_tokens,
            "temperature": 0.8, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            tally.count(phase, r.status_code)
            if r.status_code != 200:
                await r.aread()
                return r.status_code
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    tally.stream_errors += 1
                    return 200
                if drop == "queued":
                    return 200                   # leaving the block closes the connection
                if event.get("choices") and event["choices"][0]["delta"].get("content"):
                    if drop == "token":
                        return 200
                    ttft = ttft or time.perf_counter() - t0
                if event.get("usage") and steady:
                    tally.tokens += event["usage"]["completion_tokens"]
    except httpx.TransportError:
        tally.transport_errors += 1
        return 0
    if steady:
        tally.steady_ok += 1
        tally.total.append(time.perf_counter() - t0)
        if ttft is not None:
            tally.ttft.append(ttft)
    return 200


async def drive(url: str, pid: int, clients: int, duration_s: float, rounds: int, max_tokens: int,
                burst: int) -> dict:
    import httpx

    tally = Tally()
    rss: list[int] = []
    capacity: list[int] = []
    steady_s = 0.0
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0),
                                 limits=httpx.Limits(max_connections=None, max_keepalive_connections=None)) as client:
        async def idle() -> None:
            for _ in range(600):
                health = (await client.get("/health")).json()
                if health["in_flight"] == 0:
                    return
                await asyncio.sleep(0.05)
            raise RuntimeError(f"requests still in flight 30 s after the last client left: /health says {health}")

        for _ in range(rounds):
            t0 = time.perf_counter()
            deadline = t0 + duration_s / rounds

            async def steady(deadline: float = deadline) -> None:
                while time.perf_counter() < deadline:
                    if await chat(client, tally, "steady", max_tokens) == 429:
                        await asyncio.sleep(1.0)        # a burst request took the slot: Retry-After

            async def overflow() -> None:
                await asyncio.sleep(duration_s / rounds / 2)
                await asyncio.gather(*(chat(client, tally, "burst", max_tokens) for _ in range(burst)))

            await asyncio.gather(*(steady() for _ in range(clients)), overflow())
            steady_s += time.perf_counter() - t0
            # dropped streams: half while queued, half after their first token
            await asyncio.gather(*(chat(client, tally, "drop", max_tokens, drop="queued" if i % 2 else "token")
                                   for i in range(clients)))
            await idle()
            admitted = await asyncio.gather(*(chat(client, tally, "capacity", 2) for _ in range(clients)))
            capacity.append(sum(s == 200 for s in admitted))
            await idle()
            rss.append(rss_bytes(pid))
    served = tally.total_of(200)
    return {"clients": clients, "duration_s": steady_s, "rounds": rounds, "max_tokens": max_tokens,
            "served": served, "steady_served": tally.steady_ok, "requests_per_s": tally.steady_ok / steady_s,
            "tokens_per_s": tally.tokens / steady_s,
            "ttft_p50": percentile(tally.ttft, 0.5), "ttft_p99": percentile(tally.ttft, 0.99),
            "total_p50": percentile(tally.total, 0.5), "total_p99": percentile(tally.total, 0.99),
            "burst": burst * rounds, "burst_429": tally.total_of(429, "burst"), "n429": tally.total_of(429),
            "n5xx": sum(n for (_, s), n in tally.status.items() if s >= 500),
            "other_status": {f"{ph} {s}": n for (ph, s), n in tally.status.items() if s not in (200, 429)},
            "stream_errors": tally.stream_errors, "transport_errors": tally.transport_errors,
            "capacity_after_drops": capacity, "rss_bytes": rss}


def run_load(model: str | os.PathLike | None = None, clients: int = 32, duration_s: float = 60.0,
             rounds: int = 6, max_tokens: int = 32, burst: int | None = None, parallel: int = 4) -> dict:
    """Starts `python -m serve --model MODEL --max-queue CLIENTS --parallel N` on a free local port, drives it
    (see the module docstring) and stops it. Returns the figures; `server_tracebacks` counts
    tracebacks in the server's log."""
    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            model = DEFAULT_MODEL if DEFAULT_MODEL.exists() else tiny_checkpoint(Path(tmp))
        port = free_port()
        log = Path(tmp) / "server.log"
        with open(log, "w") as fh:
            server = subprocess.Popen([sys.executable, "-m", "serve", "--model", str(model), "--port", str(port),
                                       "--max-queue", str(clients), "--parallel", str(parallel)],
                                      stdout=fh, stderr=subprocess.STDOUT,
                                      env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until_up(url, server, log)
            result = asyncio.run(drive(url, server.pid, clients, duration_s, rounds, max_tokens,
                                       burst if burst is not None else clients))
            result["server_alive"] = server.poll() is None
        finally:
            server.terminate()
            server.wait(30)
        result["server_tracebacks"] = log.read_text().count("Traceback")
        result["model"], result["parallel"] = Path(model).name, parallel
    return result


def wait_until_up(url: str, server: subprocess.Popen, log: Path, timeout_s: float = 180.0) -> None:
    import httpx

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited ({server.returncode}):\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the server did not answer /health within {timeout_s:.0f} s")


def table(r: dict) -> str:
    mb = [b / 2**20 for b in r["rss_bytes"]]
    growth = f" ({mb[-1] - mb[0]:+.1f} MiB over all rounds"           # the first round includes warm-up
    growth += f", {mb[-1] - mb[1]:+.1f} MiB from round 2 on)" if len(mb) > 2 else ")"
    head = ("measure", "value")
    rows = [
        ("model", f"{r['model']} (`python -m serve`, --max-queue {r['clients']}, --parallel {r['parallel']})"),
        ("load", f"{r['clients']} streaming chat clients, max_tokens {r['max_tokens']}, "
                 f"{r['rounds']} rounds, {r['duration_s']:.0f} s"),
        ("requests served (all phases)", f"{r['served']:,}"),
        ("steady clients: requests/s", f"{r['requests_per_s']:.2f}"),
        ("steady clients: generated tokens/s", f"{r['tokens_per_s']:,.0f}"),
        ("time to first token p50 / p99", f"{r['ttft_p50']:.2f} s / {r['ttft_p99']:.2f} s"),
        ("request latency p50 / p99", f"{r['total_p50']:.2f} s / {r['total_p99']:.2f} s"),
        ("429s: burst requests at the full queue / all", f"{r['burst_429']:,} of {r['burst']:,} / {r['n429']:,}"),
        ("5xx / errors inside a stream / broken connections",
         f"{r['n5xx']} / {r['stream_errors']} / {r['transport_errors']}"),
        ("admitted at once after dropped streams, per round",
         " ".join(f"{n}/{r['clients']}" for n in r["capacity_after_drops"])),
        ("server RSS after each round", " ".join(f"{m:.0f}" for m in mb) + " MiB" + growth),
    ]
    return markdown_table(head, rows)


def run(duration_s: float = 60.0, clients: int = 32) -> str:
    return table(run_load(clients=clients, duration_s=duration_s))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help=f"checkpoint folder or .gguf (default: {DEFAULT_MODEL} if present, else a "
                                    "random tinyllama-debug checkpoint)")
    ap.add_argument("--clients", type=int, default=32, help="concurrent streaming clients = the server's "
                                                            "--max-queue (default: %(default)s)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of steady load (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=6, help="rounds the load is split into (default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=32, help="per request (default: %(default)s)")
    ap.add_argument("--parallel", type=int, default=4, help="the server's --parallel (default: %(default)s)")
    ap.add_argument("--json", action="store_true", help="print the raw figures as JSON too")
    args = ap.parse_args(argv)
    r = run_load(args.model, args.clients, args.duration, args.rounds, args.max_tokens, parallel=args.parallel)
    print(table(r))
    if args.json:
        print(json.dumps(r, indent=1))
    return 0 if r["n5xx"] == 0 and r["server_alive"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
