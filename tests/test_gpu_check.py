"""make gpu-check without a GPU: the stage table (benchmarks and probes that exist and take its
flags), the orchestrator's time boxes and budget (fast), and a DRY=1 rehearsal of the stages a
CPU can run in a few minutes (slow), held to what they record."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpu_check.__main__ import ORDER, PROBES, Stage, run_stages, stage_table

ROOT = Path(__file__).resolve().parent.parent
# compile is left out: inductor's C++ compile takes minutes on a small CPU
REHEARSED = ("env", "tests", "mfu", "qlora", "spec", "fsdp2", "smoke")


def stage_records(records: list[dict]) -> dict[str, dict]:
    return {r["stage"]: r for r in records if r.get("what") == "stage"}


@pytest.mark.parametrize("dry", [True, False], ids=["dry", "cuda"])    # not "gpu": that id is the GPU marker
def test_the_stage_table_runs_benchmarks_and_probes_that_exist_with_flags_they_take(dry):
    """Every stage is `python -m MODULE ARGS`, MODULE a bench module or one of the GPU-only probes,
    and MODULE's own parser accepts ARGS: the GPU table's flags are checked here, on a CPU."""
    stages = stage_table(dry)
    assert tuple(s.name for s in stages) == ORDER
    for stage in stages:
        python, dash_m, module, *args = stage.argv
        assert (python, dash_m) == (sys.executable, "-m"), stage
        assert module.startswith("bench.") or module in PROBES, f"{stage.name}: {module} is neither"
        assert importlib.util.find_spec(module) is not None, f"{stage.name}: no module {module}"
        parsed = importlib.import_module(module).parse_args(args)          # SystemExit on a flag it lacks
        # every stage but the pretraining smoke names its device (pretrain picks its own)
        assert module == "bench.kill_resume" or parsed.device == ("cpu" if dry else "cuda"), stage
        assert not getattr(parsed, "extra", None) or dry, f"{stage.name}: {module} would pass on {parsed.extra}"
    assert {s.argv[2] for s in stages} >= set(PROBES)


def test_a_failing_stage_is_recorded_and_one_past_its_box_is_stopped(tmp_path, monkeypatch):
    monkeypatch.setenv("GPU_CHECK_RESULTS", str(tmp_path / "results.jsonl"))
    stages = [Stage("broken", 10, ("sh", "-c", "exit 3")), Stage("slow", 1, ("sleep", "30")),
              Stage("after", 10, ("true",)), Stage("unselected", 10, ("true",))]
    t0 = time.monotonic()
    records = run_stages(stages, {"broken", "slow", "after"}, budget=60, log=tmp_path / "log.txt",
                         env=dict(os.environ), min_left=1)
    assert time.monotonic() - t0 < 10                             # `sleep 30` was stopped at its 1 s box
    by_stage = stage_records(records)
    assert by_stage["broken"]["rc"] == 3 and "timed_out" not in by_stage["broken"]
    assert by_stage["slow"]["timed_out"] and by_stage["slow"]["rc"] == 124
    assert by_stage["after"]["rc"] == 0                           # the run went on after both
    assert "unselected" not in by_stage
    written = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert written == records                                      # each written as it happened


def test_the_budget_cuts_a_box_short_and_skips_what_no_longer_fits(tmp_path, monkeypatch):
    monkeypatch.setenv("GPU_CHECK_RESULTS", str(tmp_path / "results.jsonl"))
    stages = [Stage("long", 100, ("sleep", "30")), Stage("next", 100, ("true",))]
    records = run_stages(stages, {"long", "next"}, budget=1.5, log=tmp_path / "log.txt", env=dict(os.environ),
                         min_left=0.5)
    by_stage = stage_records(records)
    assert by_stage["long"]["timed_out"] and by_stage["long"]["limit_s"] <= 1.5
    assert by_stage["next"]["skipped"] == "budget"
    assert "=== next: skipped" in (tmp_path / "log.txt").read_text()


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """One DRY=1 run of the rehearsed stages: (records, seconds, OUT)."""
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "DRY": "1", "OUT": str(out), "STAGES": " ".join(REHEARSED), "BUDGET": "900"}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "gpu_check"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    seconds = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return records, seconds, out


def of(records: list[dict], stage: str, **match) -> list[dict]:
    return [r for r in records if r["stage"] == stage and r.get("what") != "stage"
            and all(r.get(k) == v for k, v in match.items())]


@pytest.mark.slow
def test_dry_run_records_every_stage(rehearsal):
    records, seconds, out = rehearsal
    by_stage = stage_records(records)
    assert sorted(by_stage) == sorted(REHEARSED)
    assert all(r["rc"] == 0 and not r.get("timed_out") for r in by_stage.values()), by_stage
    summary = (out / "summary.txt").read_text()
    assert all(f"[{name}]" in summary for name in REHEARSED)
    assert "=== smoke" in (out / "log.txt").read_text()
    print(f"DRY=1 rehearsal of {' '.join(REHEARSED)}: {seconds:.0f}s")


@pytest.mark.slow
def test_dry_run_measures_real_numbers(rehearsal):
    records, _, _ = rehearsal
    (env,) = of(records, "env", what="probe")
    assert env["torch"] and env["matmul_tflops"] > 0 and env["copy_tb_s"] > 0
    (tests,) = of(records, "tests", what="pytest")
    assert tests["rc"] == 0 and tests["passed"] >= 7 and not tests["failed_tests"]
    for variant in ("eager", "unfused", "sdpa-flash"):
        (m,) = of(records, "mfu", variant=variant)
        assert m["tokens_per_s"] > 0 and m["mfu_vs_measured"] > 0 and m["first_loss"] > 0
    (fsdp2,) = of(records, "fsdp2", variant="fsdp2")
    assert fsdp2["tokens_per_s"] > 0
    for impl in ("ours", "hf"):
        (q,) = of(records, "qlora", what="measure", impl=impl)
        assert q["tok_s"] > 0 and q["allocator_peak_gb"] > 0
    (sft,) = of(records, "qlora", what="run_sft qlora")
    assert sft["steps"] == 4


@pytest.mark.slow
def test_dry_run_records_a_failed_measurement_and_goes_on(rehearsal):
    records, _, _ = rehearsal
    (cudnn,) = of(records, "mfu", variant="sdpa-cudnn")          # no cuDNN attention on a CPU
    assert "error" in cudnn and "tokens_per_s" not in cudnn
    assert stage_records(records)["mfu"]["rc"] == 0


@pytest.mark.slow
def test_dry_run_speculative_and_pretraining_smoke(rehearsal):
    records, _, _ = rehearsal
    (build,) = of(records, "spec", what="build")
    assert 0 < build["calibrated_agree"] <= 1
    (latency,) = of(records, "spec", what="latency_ms")
    assert all(v > 0 for k, v in latency.items() if "/eager/" in k)
    for spec in of(records, "spec", what="speculative"):
        assert spec["tok_s"] > 0 and 0 <= spec["accepted_over_drafted"] <= 1
        assert spec["outputs_differing_from_plain_greedy"] == 0       # float32: greedy identity
    assert sorted(r["k"] for r in of(records, "spec", what="speculative")) == [1, 2]
    first, resume = of(records, "smoke", what="first"), of(records, "smoke", what="resume")
    assert first[0]["rc"] == 0 and first[0]["final"] and first[0]["samples"]
    assert resume[0]["rc"] == 0 and resume[0]["resumed"]
    assert resume[0]["last_rows"][-1]["step"] == 9
