"""prepare at corpus scale: units, the datatrove engine (1 vs N tasks, several
machines, SLURM), resuming after kills, a full disk and network errors on hub files."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prepare import parts, sources, units
from prepare.encoding import encode_packed
from prepare.prepare import PrepareConfig, prepare
from prepare.units import jsonl_ranges, plan_units
from tinyllama import paths

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the quick brown fox jumps over lazy dogs while naïve 東京 coders write def f(x): return x + 1 "
         "and some_identifier.attribute[42] = {'key': value} # comment").split()


def corpus(path: Path, docs: int, seed: int = 0, words: tuple[int, int] = (5, 80)) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(docs):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))
            fh.write(json.dumps({"text": f"doc {i}: {text}"}) + "\n")
    return path


def run(src, out, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("shard_tokens", 4096)
    kw.setdefault("val_fraction", 0.05)
    kw.setdefault("progress", False)
    return prepare(PrepareConfig(source=str(src), out=out, **kw))


def tree(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def same_output(a: Path, b: Path) -> None:
    ta, tb = tree(a), tree(b)
    ma, mb = json.loads(ta.pop("manifest.json")), json.loads(tb.pop("manifest.json"))
    for m in (ma, mb):
        m.pop("name")
    assert ma == mb
    assert ta == tb and len(ta) > 2


# ---- units -----------------------------------------------------------------------------------

def test_jsonl_ranges_cut_at_lines_and_number_them(tmp_path):
    f = corpus(tmp_path / "c.jsonl", 300)
    size = f.stat().st_size
    segs = jsonl_ranges(f, size, 2000)
    assert len(segs) > 5 and segs[0].start == 0 and segs[-1].end is None
    data = f.read_bytes()
    for a, b in zip(segs, segs[1:]):
        assert a.end == b.start and data[b.start - 1:b.start] == b"\n"
        assert b.first_line == data[:b.start].count(b"\n") + 1
    # reading the units one by one gives exactly the file's documents
    us, _ = plan_units(str(f), unit_bytes=2000)
    stats = sources.ReadStats()
    docs = [d for u in us for d in units.unit_documents(u, text_field=None, stats=stats, skip_bad=False, code_dir=False)]
    assert [d.text for d in docs] == [d.text for d in units.read_documents(f)]
    assert docs[123].origin == f"{f}:124"


def test_error_in_a_later_range_names_the_true_line(tmp_path):
    f = corpus(tmp_path / "c.jsonl", 300)
    lines = f.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[250] = '{"text": "broken\n'
    f.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(sources.SourceError, match=r"c.jsonl:251: malformed JSON"):
        run(f, tmp_path / "out", unit_mb=0.002)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.prepare").exists()


def test_directory_units_group_small_files(tmp_path):
    d = tmp_path / "code"
    d.mkdir()
    for i in range(20):
        (d / f"m{i:02d}.py").write_text(f"x{i} = {i}\n" * 50)
    us, code_dir = plan_units(str(d), unit_bytes=2500, extensions=(".py",))
    assert code_dir and 3 <= len(us) < 20
    assert [s.path for u in us for s in u.segments] == [str(p) for p in sorted(d.iterdir())]


# ---- the engine: same bytes for any task count, unit size, worker count ------------------------

def test_one_task_and_many_give_identical_bytes(tmp_path):
    src = corpus(tmp_path / "c.jsonl", 400)
    run(src, tmp_path / "whole", unit_mb=64)                                  # one unit
    m1 = run(src, tmp_path / "one", unit_mb=0.004, tasks=1)
    m2 = run(src, tmp_path / "many", unit_mb=0.004, tasks=7, workers=2)       # datatrove's process pool
    assert m1["documents"] == m2["documents"] == 400
    same_output(tmp_path / "whole", tmp_path / "one")
    same_output(tmp_path / "one", tmp_path / "many")
    assert not list(tmp_path.glob(".*.prepare"))                            # work folders removed


def test_machines_share_the_tasks_and_the_last_command_merges(tmp_path, capsys):
    src = corpus(tmp_path / "c.jsonl", 300)
    run(src, tmp_path / "ref", unit_mb=0.004)
    kw = dict(unit_mb=0.004, tasks=3)
    assert run(src, tmp_path / "out", local_tasks=1, rank_offset=0, **kw) is None     # machine A
    assert "units are left to other machines" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert run(src, tmp_path / "out", local_tasks=2, rank_offset=1, **kw) is not None  # machine B: all done, merges
    assert "resuming" in capsys.readouterr().err
    same_output(tmp_path / "ref", tmp_path / "out")


def test_resume_reports_progress_and_a_changed_run_starts_over(tmp_path, capsys):
    src = corpus(tmp_path / "c.jsonl", 300)
    assert run(src, tmp_path / "out", unit_mb=0.004, tasks=4, local_tasks=1) is None
    capsys.readouterr()
    done = len(parts.done_units(tmp_path / ".out.prepare"))
    m = run(src, tmp_path / "out", unit_mb=0.004, tasks=4, local_tasks=2, shard_tokens=8192)
    err = capsys.readouterr().err
    assert m is None and "discarding the unfinished run" in err and "shard_tokens=4096" in err
    assert run(src, tmp_path / "out", unit_mb=0.004, tasks=4, shard_tokens=8192) is not None
    assert f"resuming {tmp_path / 'out'}: " in capsys.readouterr().err
    assert done > 0


def test_full_disk_keeps_the_work_and_the_same_command_finishes(tmp_path, monkeypatch, capsys):
    src = corpus(tmp_path / "c.jsonl", 300)
    run(src, tmp_path / "ref")
    real = paths.shutil.disk_usage

    def nearly_full(p):
        u = real(p)
        return type(u)(u.total, u.used, paths.DISK_MARGIN + 100) if "tmp-" in str(p) else u

    monkeypatch.setattr(paths.shutil, "disk_usage", nearly_full)     # the shards' folder is full
    with pytest.raises(paths.DiskSpaceError, match=r"train-00000.bin: needs .* MiB free"):
        run(src, tmp_path / "out")
    assert "run the same command again" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.prepare" / "plan.json").exists()
    monkeypatch.setattr(paths.shutil, "disk_usage", real)
    run(src, tmp_path / "out")
    same_output(tmp_path / "ref", tmp_path / "out")


# ---- killed at random moments ----------------------------------------------------------------

@pytest.mark.slow
def test_killed_three_times_then_identical(tmp_path):
    from bench.data_prep import kill_and_resume, synthetic_corpus

    r = kill_and_resume(synthetic_corpus(tmp_path / "c.jsonl", 8), tmp_path, kills=3, workers=2, seed=1)
    assert r["identical"] and len(r["units_done_at_each_kill"]) == 3
    if r["units_done_at_each_kill"][-1]:
        assert r["resumed_message"]                   # it continued from the units already done
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]      # no work folder, no temporaries


# ---- hub files: fsspec URLs, retries -----------------------------------------------------------

def test_hub_dataset_files_stream_with_retries(tmp_path, monkeypatch, capsys):
    import zstandard

    files = []
    for k in range(3):
        raw = corpus(tmp_path / f"chunk{k}.jsonl", 60, seed=k)
        z = tmp_path / f"example_train_{k}.jsonl.zst"
        z.write_bytes(zstandard.ZstdCompressor().compress(raw.read_bytes()))
        files.append(z)
    local = run(tmp_path, tmp_path / "ref", extensions=(".jsonl.zst",))
    monkeypatch.setattr(units, "hub_data_files", lambda name, split: [f"file://{f}" for f in files])
    failures = {"left": 2}
    real_open = sources.open_binary

    def flaky(path):
        if "example_train_1" in str(path) and failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("connection reset by peer")
        return real_open(path)

    monkeypatch.setattr(sources, "open_binary", flaky)
    monkeypatch.setattr(parts.time, "sleep", lambda s: None)
    m = run("cerebras/SlimPajama-627B", tmp_path / "hub")
    assert "ConnectionError: connection reset by peer; retrying" in capsys.readouterr().err
    assert failures["left"] == 0 and m["documents"] == local["documents"] == 180
    for split in ("train", "validation"):
        assert [s["sha256"] for s in m["splits"][split]["shards"]] == \
            [s["sha256"] for s in local["splits"][split]["shards"]]


def test_hub_file_that_keeps_failing_stops_resumably(tmp_path, monkeypatch):
    monkeypatch.setattr(units, "hub_data_files", lambda name, split: ["file:///nonexistent/dir/a.jsonl.zst"])
    monkeypatch.setattr(parts.time, "sleep", lambda s: None)
    with pytest.raises(FileNotFoundError):
        run("org/data", tmp_path / "hub", retries=2)
    assert (tmp_path / ".hub.prepare" / "plan.json").exists()        # kept: the same command resumes


# ---- SLURM: datatrove's job array and merge job, run here as SLURM would --------------------------

def test_slurm_submission_runs_as_a_job_array(tmp_path, monkeypatch):
    src = corpus(tmp_path / "c.jsonl", 300)
    run(src, tmp_path / "ref", unit_mb=0.004)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "sbatch.log"
    (bindir / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" >> {log}\necho Submitted batch job $((100 + $(wc -l < {log})))\n")
    (bindir / "scontrol").write_text("#!/bin/sh\necho localhost\n")       # `scontrol show hostnames`
    for tool in ("sbatch", "scontrol"):
        (bindir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    assert run(src, tmp_path / "out", unit_mb=0.004, executor="slurm", tasks=3, slurm_partition="cpu") is None
    calls = log.read_text().splitlines()
    assert any("--dependency=afterok:101" in c for c in calls)          # the merge waits for the array
    work = tmp_path / ".out.prepare"
    logs = tmp_path / "out.slurm-logs"
    script = (logs / "tokenize" / "launch_script.slurm").read_text()
    assert "#SBATCH --array=0-2" in script and "#SBATCH --partition=cpu" in script
    env = {**os.environ, "SLURM_NODELIST": "localhost", "RUN_OFFSET": "0"}
    for job, n in (("tokenize", 3), ("merge", 1)):                     # what the cluster would run
        for i in range(n):
            subprocess.run([sys.executable, "-m", "datatrove.tools.launch_pickled_pipeline",
                            str(logs / job / "executor.pik")], check=True, cwd=ROOT,
                           env={**env, "SLURM_ARRAY_TASK_ID": str(i)}, capture_output=True)
    same_output(tmp_path / "ref", tmp_path / "out")
    assert not work.exists()


def test_packed_encoder_equals_encode(llama2_tokenizer):
    texts = ["", " ", "hello  world", "def f(x):\n\treturn x  # ünïcode 東京 🙂", "a" * 3000 + " b"]
    ids, lengths = encode_packed(llama2_tokenizer, texts, bos=True, eos=True)
    assert ids.dtype == np.dtype("<u2") and lengths.tolist() == [len(llama2_tokenizer.encode(t, eos=True)) for t in texts]
    assert ids.tolist() == [i for t in texts for i in llama2_tokenizer.encode(t, bos=True, eos=True)]
