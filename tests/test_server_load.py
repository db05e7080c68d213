"""A short load test of `python -m serve` (the real server in a subprocess, over HTTP): many
streaming clients on a full queue, a burst beyond it, dropped streams; bench.server_load at a
small size, asserted on its figures."""

from __future__ import annotations

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

from bench.server_load import run_load, table, tiny_checkpoint  # noqa: E402

CLIENTS = 16


@pytest.mark.dtype_auto
@pytest.mark.timeout(120)
def test_server_under_load_serves_rejects_and_frees_slots(tmp_path):
    r = run_load(tiny_checkpoint(tmp_path), clients=CLIENTS, duration_s=6.0, rounds=2, max_tokens=16)
    print(table(r))
    report = {k: v for k, v in r.items() if k != "rss_bytes"}
    # nothing broke: no 5xx, no error inside a stream, no dropped connection, no traceback
    assert r["server_alive"] and r["server_tracebacks"] == 0, report
    assert r["n5xx"] == 0 and r["stream_errors"] == 0 and r["transport_errors"] == 0, report
    assert r["other_status"] == {}, report
    # the steady clients were served, several requests each, and tokens came out
    assert r["steady_served"] >= 2 * CLIENTS and r["tokens_per_s"] > 0, report
    assert 0 < r["ttft_p50"] <= r["total_p50"] <= r["total_p99"], report
    # the burst met a full queue: most of it was turned away with 429
    assert r["burst_429"] >= r["burst"] // 2, report
    # every dropped stream gave its slot back: the whole queue was admitted at once afterwards
    assert r["capacity_after_drops"] == [CLIENTS] * 2, report
    # memory is flat across rounds (the first round includes the warm-up)
    growth = r["rss_bytes"][-1] - r["rss_bytes"][0]
    assert growth < 32 * 2**20, f"server RSS grew by {growth / 2**20:.1f} MiB: {r['rss_bytes']}"
