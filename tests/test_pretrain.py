"""The pretraining loop: schedule, config errors, exact resume, HF checkpoints, FSDP2 parity."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.config import ConfigError, TrainConfig
from prepare.prepare import PrepareConfig, prepare
from pretrain.schedule import lr_at
from pretrain.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two real sources: English help texts shipped with Python, and the json package's code."""
    import json as json_pkg
    from pydoc_data.topics import topics

    d = tmp_path_factory.mktemp("shards")
    natural = d / "natural.jsonl"
    natural.write_text("".join(json.dumps({"text": t}) + "\n" for _, t in sorted(topics.items())[:60]))
    out = {}
    for name, src, kw in [("natural", natural, {}), ("code", Path(json_pkg.__file__).parent, {"extensions": (".py",)})]:
        prepare(PrepareConfig(source=str(src), out=d / name, workers=1, val_fraction=0.2, progress=False, **kw))
        out[name] = str(d / name)
    return out


def tiny_config(shards, out_dir, **kw):
    base = dict(preset="tinyllama-debug", data=shards, weights={"natural": 0.7, "code": 0.3}, seq_len=32,
                micro_batch=2, global_batch_tokens=128, max_steps=8, lr=3e-3, min_lr=3e-4, warmup_steps=2,
                dtype="float32", out=str(out_dir), save_every=2, keep_last=2, eval_every=4, eval_batches=2,
                log_every=1, sample_tokens=0, tensorboard=False, progress=False, seed=5)
    base.update(kw)
    return TrainConfig(**base)


# ---- schedule ---------------------------------------------------------------------------

def test_schedule_warmup_midpoint_and_end():
    kw = dict(lr=4e-4, min_lr=4e-5, warmup=2000, total=10000)
    assert lr_at(1, **kw) == pytest.approx(4e-4 / 2000)
    assert lr_at(2000, **kw) == pytest.approx(4e-4)                     # end of warmup: the peak
    assert lr_at(6000, **kw) == pytest.approx((4e-4 + 4e-5) / 2)        # halfway through the cosine
    assert lr_at(10000, **kw) == 4e-5                                   # min_lr really reached
    values = [lr_at(s, **kw) for s in range(2000, 10001, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError):
        lr_at(0, **kw)


def test_schedule_counts_optimizer_steps_not_micro_batches(shards, tmp_path):
    """With 2 accumulation steps per update, 8 updates see 8 learning rates, ending at min_lr."""
    train(tiny_config(shards, tmp_path, save_every=0, eval_every=0))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert [r["step"] for r in rows if "lr" in r] == list(range(1, 9))
    assert lrs[1] == pytest.approx(3e-3) and lrs[-1] == pytest.approx(3e-4)
    assert rows[-1]["tokens"] == 8 * 128


# ---- config errors ----------------------------------------------------------------------

def test_bad_configs_name_the_problem(shards, tmp_path):
    with pytest.raises(ConfigError, match="preset: unknown preset"):
        tiny_config(shards, tmp_path, preset="gpt-9").validate()
    with pytest.raises(ConfigError, match="global_batch_tokens=100 is not divisible"):
        tiny_config(shards, tmp_path, global_batch_tokens=100).grad_accum_steps(1)
    with pytest.raises(ConfigError, match="weights: names source"):
        tiny_config(shards, tmp_path, weights={"natural": 1.0, "web": 1.0}).validate()
    with pytest.raises(ConfigError, match="min_lr"):
        tiny_config(shards, tmp_path, min_lr=1.0).validate()
    with pytest.raises(ConfigError, match=r"data.code: .*manifest.json: not found"):
        train(tiny_config(shards, tmp_path, data={**shards, "code": str(tmp_path / "nope")}))


def test_mismatched_tokenizer_is_refused(shards, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(shards["code"], other)
    m = json.loads((other / "manifest.json").read_text())
    m["tokenizer"]["fingerprint"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(Exception, match="different tokenizer"):
        train(tiny_config(shards, tmp_path / "run", data={**shards, "code": str(other)}))


def test_yaml_and_flags(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("preset: tinyllama-debug\nmax_steps: 5\nlr: 1e-3\n")
    cfg = TrainConfig.from_yaml(p, {"max_steps": "7", "compile": "false", "weights": {"natural": "1", "code": "0"}})
    assert (cfg.max_steps, cfg.lr, cfg.compile, cfg.weights["natural"]) == (7, 1e-3, False, 1.0)
    p.write_text("preset: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        TrainConfig.from_yaml(p)
    with pytest.raises(ConfigError, match="unknown field.*learning_rate"):
        TrainConfig.from_dict({"learning_rate": 1})
    with pytest.raises(ConfigError, match="field max_steps: expected an integer"):
        TrainConfig.from_dict({"max_steps": "many"})


def test_cli_errors_are_clear(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pretrain", "--preset", "nope", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "preset: unknown preset" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "pretrain", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "--global-batch-tokens" in r.stdout


# ---- checkpoints and exact resume ------------------------------------------------------

def final_weights(out_dir):
    return load_file(str(Path(out_dir) / "final" / "model.safetensors"))


def test_kill_and_resume_is_bitwise_exact(shards, tmp_path):
    full = train(tiny_config(shards, tmp_path / "full"))
    cfg = tiny_config(shards, tmp_path / "cut")
    first = train(cfg, stop_after=3)                 # checkpoints at 2; step 3 is lost, as in a kill
    assert first["step"] == 3 and not (tmp_path / "cut" / "final").exists()
    resumed = train(cfg)                             # the same command again
    assert resumed["step"] == 8
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["loss"] == full["loss"]
    # metrics.jsonl holds each step once, as if the run had never stopped
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 9))
    # keep-last-2 training states; every HF step directory stays
    assert sorted(p.name for p in (tmp_path / "cut" / "state").iterdir()) == ["step-00000006", "step-00000008"]
    assert sorted(p.name for p in (tmp_path / "cut").glob("step-*")) == ["step-00000002", "step-00000004", "step-00000006"]


def test_incomplete_checkpoint_is_ignored(shards, tmp_path):
    cfg = tiny_config(shards, tmp_path, max_steps=4)
    train(cfg, stop_after=2)
    state = tmp_path / "state"
    # a save that was killed half-way leaves only a dot-named temporary
    (state / ".step-00000004.tmp").mkdir()
    (state / ".step-00000004.tmp" / "__0_0.distcp").write_bytes(b"partial")
    summary = train(cfg)
    assert summary["step"] == 4 and (tmp_path / "final" / "model.safetensors").exists()
    assert not (state / ".step-00000004.tmp").exists()


def test_intermediate_checkpoint_loads_in_transformers(shards, tmp_path):
    from transformers import LlamaForCausalLM

    from tinyllama import load_checkpoint

    train(tiny_config(shards, tmp_path, max_steps=4))
    step_dir = tmp_path / "step-00000002"
    ours, tok = load_checkpoint(step_dir)
    hf = LlamaForCausalLM.from_pretrained(step_dir).eval()
    ids = torch.tensor([tok.encode("def loads(s):")])
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() < 1e-4
    assert "max_steps: 4" in (step_dir / "train_config.yaml").read_text()
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_loss_falls(shards, tmp_path):
    summary = train(tiny_config(shards, tmp_path, max_steps=30, save_every=0, eval_every=30, lr=1e-2, min_lr=1e-3))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[-5:]) / 5 < sum(losses[:3]) / 3 - 1.0
    assert summary["val_loss"] < 9.0


# ---- distributed ------------------------------------------------------------------------

def max_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_two_process_fsdp2_equals_one_process(shards, tmp_path):
    """Two FSDP2 ranks train the weights one process does, to float32 rounding. What rounding
    moves is measured here: AdamW turns a gradient's rounding error into a step of up to lr where
    the gradient is a sum that nearly cancels, so the same math in another summation order (one
    process with micro-batches of 1 instead of 2) sets the scale on this CPU. Both single-process
    runs use one thread, as each rank does: on AVX-512 kernels the thread count alone moved the
    weights by 2.7e-5 after 4 steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(tiny_config(shards, tmp_path / "one", max_steps=4, save_every=2, eval_every=0))
        train(tiny_config(shards, tmp_path / "reordered", max_steps=4, save_every=0, eval_every=0, micro_batch=1))
    finally:
        torch.set_num_threads(threads)
    yaml_path = tmp_path / "two.yaml"
    yaml_path.write_text(tiny_config(shards, tmp_path / "two", max_steps=4, save_every=2, eval_every=0).to_yaml())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "pretrain", "--config", str(yaml_path)], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    rounding = max_difference(one, final_weights(tmp_path / "reordered"))
    assert max_difference(one, two) < max(1e-5, 2 * rounding), rounding
    # the 2-rank run split each global batch: 2 ranks × 1 accumulation step instead of 1 × 2
    assert "2 rank(s) × 1 accumulation step(s)" in r.stdout


def _torchrun(yaml_path, n=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           "-m", "pretrain", "--config", str(yaml_path)], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)


@pytest.mark.slow
def test_two_process_fsdp2_in_bf16_trains_like_one_process_autocast_and_resumes(shards, tmp_path):
    # The GPU path: FSDP2 with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) on 2
    # gloo ranks against one process with fp32 weights under bf16 autocast; then a resume of
    # the 2-rank run from its step-2 training state (DCP) ends on the same weights.
    kw = dict(max_steps=4, save_every=2, eval_every=0, dtype="bfloat16")
    one = train(tiny_config(shards, tmp_path / "one", **kw))
    two_yaml = tmp_path / "two.yaml"
    two_yaml.write_text(tiny_config(shards, tmp_path / "two", **kw).to_yaml())
    r = _torchrun(two_yaml)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert abs(rows[-1]["loss"] - one["loss"]) < 2e-2
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 2e-2
    shutil.rmtree(tmp_path / "two" / "state" / "step-00000004")
    shutil.rmtree(tmp_path / "two" / "final")
    r = _torchrun(two_yaml)
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stderr[-3000:]
    c = final_weights(tmp_path / "two")
    assert max((b[k] - c[k]).abs().max().item() for k in b) == 0


def test_activation_checkpointing_gives_the_same_weights(shards, tmp_path):
    plain = tiny_config(shards, tmp_path / "plain", max_steps=3, save_every=0, eval_every=0)
    ckpt = tiny_config(shards, tmp_path / "ckpt", max_steps=3, save_every=0, eval_every=0,
                       activation_checkpointing=True)
    train(plain)
    train(ckpt)
    a, b = final_weights(tmp_path / "plain"), final_weights(tmp_path / "ckpt")
    assert a.keys() == b.keys()              # no wrapper prefixes leak into the saved names
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


@pytest.mark.slow
def test_compiled_training_tracks_eager(shards, tmp_path):
    eager = train(tiny_config(shards, tmp_path / "eager", max_steps=3, save_every=0, eval_every=0))
    compiled = train(tiny_config(shards, tmp_path / "compiled", max_steps=3, save_every=0, eval_every=0, compile=True))
    assert compiled["loss"] == pytest.approx(eager["loss"], abs=1e-3)


# ---- continued pretraining (init_from) ------------------------------------------------------

@pytest.fixture(scope="module")
def hub_base(shards, tmp_path_factory):
    """A briefly pretrained tinyllama-debug, cached offline as the hub repo acme/tiny-base."""
    from hub_cache import add_dir

    root = tmp_path_factory.mktemp("base")
    train(tiny_config(shards, root / "run", max_steps=4, save_every=0, eval_every=0))
    add_dir(root / "hf", "acme/tiny-base", root / "run" / "final")
    return root


def test_init_from_a_hub_id_continues_from_its_weights_and_resumes_exactly(shards, hub_base, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(hub_base / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # a learning rate of ~0: the continued run ends where the checkpoint began, not at a fresh init
    frozen = train(tiny_config(shards, tmp_path / "frozen", preset=None, init_from="acme/tiny-base", max_steps=2,
                               lr=1e-12, min_lr=0.0, warmup_steps=0, weight_decay=0.0, save_every=0, eval_every=0))
    start = load_file(str(hub_base / "run" / "final" / "model.safetensors"))
    after = final_weights(tmp_path / "frozen")
    assert frozen["step"] == 2 and all(torch.allclose(after[k], start[k], atol=1e-6) for k in start)
    # the schedule counts from zero (warm-up again), and a killed continued run resumes bitwise
    cfg = lambda out: tiny_config(shards, tmp_path / out, preset=None, init_from="acme/tiny-base")  # noqa: E731
    full = train(cfg("full"))
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "lr" in r][0] == 1 and rows[0]["lr"] == pytest.approx(3e-3 / 2)
    train(cfg("cut"), stop_after=3)
    resumed = train(cfg("cut"))
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "cut")
    assert resumed["loss"] == full["loss"] and all(torch.equal(a[k], b[k]) for k in a)
    assert "init_from: acme/tiny-base" in (tmp_path / "full" / "config.yaml").read_text()


def test_init_from_with_a_preset_that_disagrees_names_both(shards, hub_base, tmp_path):
    init = str(hub_base / "run" / "final")
    with pytest.raises(ConfigError) as e:
        train(tiny_config(shards, tmp_path, preset="tinyllama-19m", init_from=init))
    msg = str(e.value)
    assert "preset: tinyllama-19m disagrees with the init_from checkpoint" in msg and init in msg and "n_layer" in msg
    train(tiny_config(shards, tmp_path / "same", preset="tinyllama-debug", init_from=init, max_steps=1, warmup_steps=0,
                      save_every=0, eval_every=0))                          # an agreeing preset is fine
    with pytest.raises(ConfigError, match="seq_len: 4096 is longer than the"):
        train(tiny_config(shards, tmp_path / "long", preset=None, init_from=init, seq_len=4096,
                          global_batch_tokens=8192))


def test_an_init_from_flag_replaces_the_files_preset(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("preset: tinyllama-19m\nmax_steps: 5\n")
    assert TrainConfig.from_yaml(p, {"init_from": "acme/base"}).preset is None
    assert TrainConfig.from_yaml(p, {"init_from": "acme/base", "preset": "tinyllama-debug"}).preset == "tinyllama-debug"
    assert TrainConfig.from_yaml(p).preset == "tinyllama-19m"


# ---- CUDA-path accounting, on the CPU --------------------------------------------------

def test_a_step_reads_its_loss_once_not_per_micro_step(shards, tmp_path, monkeypatch):
    # loss.item() per micro-step would synchronise a GPU 8 times per optimizer step here
    from pretrain import train as train_mod

    reads, real_item, real_step = [], torch.Tensor.item, train_mod.Trainer.train_step

    def counted_step(self, it, lr):
        n = [0]

        def item(t):
            # ours only: torch's own single-tensor AdamW reads its step counts on a CPU
            n[0] += "/torch/" not in sys._getframe(1).f_code.co_filename
            return real_item(t)
        monkeypatch.setattr(torch.Tensor, "item", item)
        try:
            return real_step(self, it, lr)
        finally:
            monkeypatch.setattr(torch.Tensor, "item", real_item)
            reads.append(n[0])
    monkeypatch.setattr(train_mod.Trainer, "train_step", counted_step)
    cfg = tiny_config(shards, tmp_path, global_batch_tokens=512, max_steps=2, save_every=0, eval_every=0)
    assert cfg.grad_accum_steps(1) == 8
    train(cfg)
    assert reads == [1, 1]


def test_adamw_is_fused_on_cuda_and_multi_tensor_elsewhere(shards, tmp_path):
    from pretrain.train import build_optimizer

    cfg, model = tiny_config(shards, tmp_path), torch.nn.Linear(4, 4)
    assert build_optimizer(cfg, model, torch.device("cuda")).defaults["fused"] is True
    cpu = build_optimizer(cfg, model, torch.device("cpu")).defaults
    assert cpu["foreach"] is True and not cpu["fused"]


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA L4", 121e12), ("NVIDIA L40S", 362e12), ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", 989e12), ("NVIDIA A100-SXM4-40GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12), ("Tesla T4", None)])
def test_gpu_peaks_match_whole_model_names(name, peak):
    from pretrain.metrics import gpu_peak_bf16

    assert gpu_peak_bf16(name) == peak


def test_float32_mfu_counts_tf32_only_once_it_is_on(monkeypatch):
    from pretrain.metrics import device_peak_flops
    from pretrain.train import allow_fp32_tensor_cores

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cuda, before = torch.device("cuda"), torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        peak, source = device_peak_flops(cuda, torch.float32)
        assert peak != peak and "without TF32" in source             # nan: no TF32 figure claimed
        assert not allow_fp32_tensor_cores(cuda, torch.bfloat16) and not allow_fp32_tensor_cores(torch.device("cpu"), torch.float32)
        assert allow_fp32_tensor_cores(cuda, torch.float32)
        assert device_peak_flops(cuda, torch.float32) == (989e12 / 2, "NVIDIA H100 80GB HBM3 data sheet, TF32")
        assert device_peak_flops(cuda, torch.bfloat16)[0] == 989e12
    finally:
        torch.set_float32_matmul_precision(before)


def test_projected_embeddings_keep_the_geometry_of_tokens(tmp_path, llama2_tokenizer):
    """A draft's embeddings from its target's: projected onto the principal directions, distances
    between tokens are kept (exactly, for a table of rank <= d), at the model's own init scale."""
    from pretrain.train import projected_embeddings
    from tinyllama import Llama, ModelConfig, save_checkpoint

    big = ModelConfig.from_name("tinyllama-debug").replace(d_model=128, ffn_dim=256)
    source = Llama(big)
    g = torch.Generator().manual_seed(0)
    low_rank = torch.randn(big.vocab_size, 8, generator=g) @ torch.randn(8, 128, generator=g)    # (V, 128), rank 8
    with torch.no_grad():
        source.model.embed_tokens.weight.copy_(low_rank)
    save_checkpoint(source, llama2_tokenizer, tmp_path / "target")
    small = ModelConfig.from_name("tinyllama-debug")                                          # d_model 64
    table = projected_embeddings(str(tmp_path / "target"), small)
    assert table.shape == (big.vocab_size, 64)
    assert table.std().item() == pytest.approx((2 / (5 * 64)) ** 0.5, rel=1e-3)
    rows = torch.randint(0, big.vocab_size, (50,), generator=g)
    ratio = torch.cdist(table[rows], table[rows]) / torch.cdist(low_rank[rows], low_rank[rows]).clamp_min(1e-9)
    off_diagonal = ratio[~torch.eye(50, dtype=torch.bool)]
    assert off_diagonal.std() / off_diagonal.mean() < 1e-3                     # one scale for every pair

    with pytest.raises(ConfigError, match="config field embeddings_from: .* needs 32000 rows and at least 256"):
        projected_embeddings(str(tmp_path / "target"), small.replace(d_model=256, ffn_dim=512))
