"""The side-by-side benchmark's load generator (bench.server_compare), against an HTTP transport
that answers like a streaming chat server: what it sends and what it counts."""

from __future__ import annotations

import asyncio
import json

import httpx

from bench.server_compare import QUESTIONS, Tally, drafted_note, one_request


def streaming_chat_transport(seen: list[str], last: dict | None = None) -> httpx.MockTransport:
    """Records each request's user message and answers with a two-token stream and its usage
    (with `last`'s fields in the usage event: a server's speculation report)."""
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content)["messages"][-1]["content"])
        events = [{"choices": [{"index": 0, "delta": {"content": "Hi"}}]},
                  {"choices": [{"index": 0, "delta": {"content": "!"}}]},
                  {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
                   **(last or {})}]
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, content=body.encode(), headers={"content-type": "text/event-stream"})
    return httpx.MockTransport(handler)


def test_no_prompt_repeats_across_tallies_as_client_counts_and_servers_take_turns():
    """Each client count (and each server) counts into a Tally of its own; the prompts must still
    never repeat in the run, or llama-server's RAM prompt cache would skip their prefill."""
    seen: list[str] = []

    async def run() -> list[Tally]:
        tallies = []
        async with httpx.AsyncClient(transport=streaming_chat_transport(seen), base_url="http://server") as client:
            for _ in range(3):                       # e.g. 1, 8 and 32 clients, or ours then llama-server
                tally = Tally()
                for question in QUESTIONS[:4] * 2:   # the same questions again in each
                    await one_request(client, tally, question, max_tokens=2)
                tallies.append(tally)
        return tallies

    tallies = asyncio.run(run())
    assert len(seen) == 3 * 8 and len(set(seen)) == len(seen), seen
    assert all(any(q in text for q in QUESTIONS[:4]) for text in seen)
    for tally in tallies:
        assert (tally.sent, tally.served, tally.tokens) == (8, 8, 16)
        assert len(tally.ttft) == 8 and tally.bad_status + tally.stream_errors + tally.transport_errors == 0


def test_drafts_are_counted_from_either_servers_report():
    """llama-server reports its speculation in `timings` (draft_n, draft_n_accepted), ours in
    `stats` (drafted, accepted); the tally sums either, and the table's note says both."""
    reports = {"llama-server": {"timings": {"predicted_n": 2, "draft_n": 3, "draft_n_accepted": 1}},
               "ours": {"stats": {"generated_tokens": 2, "drafted": 2, "accepted": 2}}}

    async def run(last: dict) -> Tally:
        tally = Tally()
        transport = streaming_chat_transport([], last)
        async with httpx.AsyncClient(transport=transport, base_url="http://server") as client:
            for question in QUESTIONS[:3]:
                await one_request(client, tally, question, max_tokens=2)
        return tally

    tallies = {server: asyncio.run(run(last)) for server, last in reports.items()}
    assert (tallies["llama-server"].drafted, tallies["llama-server"].accepted) == (9, 3)
    assert (tallies["ours"].drafted, tallies["ours"].accepted) == (6, 6)
    silent = asyncio.run(run({}))                  # a server that reports no speculation
    assert (silent.drafted, silent.accepted) == (0, 0)
    rows = [{"server": s, "clients": 1, "draft": "d.gguf", "drafted": t.drafted, "accepted": t.accepted}
            for s, t in tallies.items()] + [{"server": "ours", "clients": 8, "draft": None, "drafted": 0, "accepted": 0}]
    assert drafted_note(rows) == ("\n\nSpeculation, from the responses: llama-server at 1 client drafted 9 tokens, "
                                  "3 accepted (33%); ours at 1 client drafted 6 tokens, 6 accepted (100%).")
