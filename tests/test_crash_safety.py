"""Crash-safe pretraining: SIGKILLed 2-process runs resume to bitwise-equal weights; training
states that are corrupt on disk are detected on load and skipped for the previous one."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.kill_resume import make_shards, run_campaign
from pretrain.__main__ import main as pretrain_main
from pretrain.checkpointing import CorruptCheckpointError, find_resume_state, verify_state
from pretrain.config import TrainConfig
from pretrain.train import train


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


def config(shards, out_dir, **kw):
    base = dict(preset="tinyllama-debug", data=shards, weights={"natural": 0.7, "code": 0.3}, seq_len=32,
                micro_batch=2, global_batch_tokens=128, max_steps=6, lr=3e-3, min_lr=3e-4, warmup_steps=2,
                dtype="float32", out=str(out_dir), save_every=2, keep_last=2, eval_every=0, log_every=1,
                sample_tokens=0, tensorboard=False, progress=False, seed=5)
    return TrainConfig(**{**base, **kw})


def weights(out_dir):
    return load_file(str(Path(out_dir) / "final" / "model.safetensors"))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigkilled_two_process_run_resumes_bitwise_equal(shards, tmp_path):
    c = run_campaign(tmp_path, kills=3, steps=12, save_every=2, seed=1, shards=shards, say=lambda _: None)
    assert len(c.kills) == 3 and {k.kind for k in c.kills} >= {"random", "one-worker"}
    assert c.launches == 4
    assert c.bitwise_equal and c.tensors == 21
    assert c.metrics_steps_ok   # each step logged once, as if never killed


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    train(config(shards, out))
    return weights(out)


def cut_run(shards, out_dir):
    """A run stopped after step 4, with training states at steps 2 and 4."""
    cfg = config(shards, out_dir)
    train(cfg, stop_after=4)
    state = out_dir / "state"
    assert sorted(p.name for p in state.iterdir()) == ["step-00000002", "step-00000004"]
    return cfg, state / "step-00000004"


def test_truncated_shard_is_detected_and_resume_falls_back(shards, tmp_path, uninterrupted, capsys):
    cfg, newest = cut_run(shards, tmp_path)
    shard = newest / "__0_0.distcp"
    size = shard.stat().st_size
    with open(shard, "r+b") as fh:
        fh.truncate(size // 2)
    capsys.readouterr()
    summary = train(cfg)
    out = capsys.readouterr().out
    assert f"{shard}: {size // 2:,} bytes, the manifest says {size:,} (truncated?)" in out
    assert "falling back to step-00000002" in out and "resuming from" in out and "(step 2," in out
    assert summary["step"] == 6 and same(weights(tmp_path), uninterrupted)


def test_altered_bytes_are_detected_by_checksum(shards, tmp_path):
    _, newest = cut_run(shards, tmp_path)
    shard = newest / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01   # one bit, the size unchanged
    shard.write_bytes(bytes(data))
    assert verify_state(newest) == [f"{shard}: sha256 does not match the manifest (corrupted on disk)"]
    assert find_resume_state(tmp_path, say=lambda _: None).name == "step-00000002"
    (newest / "manifest.json").unlink()
    assert verify_state(newest) == [f"{newest / 'manifest.json'}: missing (the save did not finish)"]


def test_no_intact_state_stops_with_a_clear_error(shards, tmp_path, capsys):
    cfg, newest = cut_run(shards, tmp_path)
    for state in newest.parent.iterdir():
        (state / "trainer_state.json").write_text("{}")
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(cfg.to_yaml())
    capsys.readouterr()
    assert pretrain_main(["--config", str(yaml_path)]) == 2
    err = capsys.readouterr().err
    assert "no intact training state" in err and "step-00000004, step-00000002" in err
    with pytest.raises(CorruptCheckpointError):
        find_resume_state(tmp_path, say=lambda _: None)
    assert not (tmp_path / "final").exists()


def test_metrics_line_cut_by_a_kill_is_dropped_on_resume(shards, tmp_path, uninterrupted):
    cfg, _ = cut_run(shards, tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "a") as fh:
        fh.write('{"step": 5, "tok')   # the write a SIGKILL interrupted
    (tmp_path / ".step-00000006.tmp-abc").mkdir()   # an HF directory temporary a kill left
    train(cfg)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert not list(tmp_path.glob(".*.tmp-*")) and same(weights(tmp_path), uninterrupted)


def test_training_state_entries_are_never_unpickled_with_code(shards, tmp_path):
    """A crafted checkpoint whose optimizer entry pickles a callable is refused on load."""
    import io
    import pickle

    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    from pretrain.checkpointing import WeightsOnlyLoadPlanner

    class Exploit:
        def __reduce__(self):
            return (print, ("owned",))

    planner = WeightsOnlyLoadPlanner()
    planner.flatten_state_dict = False
    planner.state_dict = {}
    item = ReadItem(type=LoadItemType.BYTE_IO, dest_index=MetadataIndex("optim.param_groups"), dest_offsets=(),
                    storage_index=MetadataIndex("optim.param_groups"), storage_offsets=(), lengths=())
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        planner.load_bytes(item, io.BytesIO(pickle.dumps(Exploit(), protocol=2)))
    buf = io.BytesIO()
    torch.save({"lr": 3e-4, "betas": (0.9, 0.95)}, buf)
    buf.seek(0)
    planner.load_bytes(item, buf)
    assert planner.state_dict["optim.param_groups"] == {"lr": 3e-4, "betas": (0.9, 0.95)}
