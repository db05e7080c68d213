"""Evaluation: the lm-eval wrapper against a direct computation, a local multiple-choice task end
to end on a checkpoint and on its GGUF, perplexity against the trainer's own loss, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from evaluation.harness import EvalError, lm_class, run_tasks, task_yaml  # noqa: E402
from evaluation.perplexity import perplexity  # noqa: E402
from tinyllama import Llama, ModelConfig, load_checkpoint, save_checkpoint  # noqa: E402
from tinyllama.inference.backends import TorchBackend, load_backend  # noqa: E402

TASK_DATA = Path(__file__).with_name("data") / "mc_task.jsonl"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, llama2_tokenizer):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("eval") / "m"
    save_checkpoint(Llama(ModelConfig.from_name("tinyllama-debug")), llama2_tokenizer, d)
    return d


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    (d / "tiny_mc.yaml").write_text(task_yaml("tiny_mc", TASK_DATA))
    return d


class Req:
    def __init__(self, *args):
        self.args = args


def test_loglikelihood_equals_a_direct_computation(model_dir):
    model, tok = load_checkpoint(model_dir, dtype=torch.float32)
    lm = lm_class()(TorchBackend(model, tok), tok)
    context, continuation = "Question: Which animal says moo?\nAnswer:", " a cow"
    [(ll, greedy)] = lm.loglikelihood([Req(context, continuation)])
    ctx = tok.encode(context)
    whole = tok.encode(context + continuation)
    cont = whole[len(ctx):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole]))[0, :-1], -1)
    expected = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
    assert ll == pytest.approx(expected, abs=1e-4)
    assert greedy == all(int(logp[len(ctx) - 1 + i].argmax()) == t for i, t in enumerate(cont))
    # the rolling log-likelihood of a text is the sum over all its tokens after BOS
    [rolling] = lm.loglikelihood_rolling([Req("The quick brown fox jumps over the lazy dog.")])
    ids = tok.encode("The quick brown fox jumps over the lazy dog.")
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0, :-1], -1)
    assert rolling == pytest.approx(float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum()), abs=1e-3)


@pytest.mark.slow
@pytest.mark.llamacpp
def test_local_task_on_checkpoint_and_gguf(model_dir, task_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    from quantize.export import write_gguf

    backend, tok = load_backend(model_dir, dtype=torch.float32)      # F32 against F32
    ours = run_tasks(backend, tok, ["tiny_mc"], include_path=task_dir)["tiny_mc"]
    gguf = write_gguf(model_dir, tmp_path / "m.gguf", "f32")
    g_backend, g_tok = load_backend(gguf)
    try:
        theirs = run_tasks(g_backend, g_tok, ["tiny_mc"], include_path=task_dir)["tiny_mc"]
    finally:
        g_backend.close()
    assert 0 <= ours["acc"] <= 1 and set(ours) >= {"acc", "acc_norm"}
    assert theirs["acc"] == ours["acc"] and theirs["acc_norm"] == ours["acc_norm"]    # F32: same choices


def test_perplexity_is_exp_of_the_trainers_validation_loss(model_dir, tmp_path):
    from pydoc_data.topics import topics

    from prepare.prepare import PrepareConfig, prepare
    from tinyllama.formats.shards import PackedSource
    from pretrain.train import loss_fn

    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"text": t}) + "\n" for _, t in sorted(topics.items())[:30]))
    prepare(PrepareConfig(source=str(raw), out=tmp_path / "shards", workers=1, val_fraction=0.3, progress=False))
    model, tok = load_checkpoint(model_dir, dtype=torch.float32)
    ppl, n = perplexity(TorchBackend(model, tok), tmp_path / "shards", seq_len=32, max_blocks=4)
    src = PackedSource(tmp_path / "shards", "validation")
    blocks = torch.tensor([src.block(j, 32).astype("int64") for j in range(4)])
    with torch.no_grad():
        loss = loss_fn(model, blocks[:, :-1], blocks[:, 1:], None)
    assert n == 4 * 32 and ppl == pytest.approx(math.exp(float(loss)), rel=1e-4)


@pytest.mark.dtype_auto
def test_bad_tasks_and_models(model_dir):
    backend, tok = load_backend(model_dir)
    with pytest.raises(EvalError, match="unknown task"):
        run_tasks(backend, tok, ["no_such_task_xyz"])
    r = subprocess.run([sys.executable, "-m", "evaluation", "--model", "/nonexistent/model", "--tasks", "none"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "/nonexistent/model: no such file or directory" in r.stderr


@pytest.mark.dtype_auto
@pytest.mark.slow
def test_checkpoint_sweep_over_a_pretraining_run(tmp_path, llama2_tokenizer):
    from pydoc_data.topics import topics

    from evaluation.sweep import sweep
    from pretrain.config import TrainConfig
    from prepare.prepare import PrepareConfig, prepare
    from pretrain.train import train

    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"text": t}) + "\n" for _, t in sorted(topics.items())[:40]))
    prepare(PrepareConfig(source=str(raw), out=tmp_path / "shards", workers=1, val_fraction=0.2, progress=False))
    cfg = TrainConfig(preset="tinyllama-debug", data={"n": str(tmp_path / "shards")}, weights={"n": 1.0}, seq_len=32,
                      micro_batch=2, global_batch_tokens=128, max_steps=6, lr=3e-3, min_lr=3e-4, warmup_steps=1,
                      dtype="float32", out=str(tmp_path / "run"), save_every=2, keep_last=3, eval_every=0,
                      sample_tokens=0, tensorboard=False, progress=False)
    train(cfg)
    rows = sweep(tmp_path / "run", [tmp_path / "shards"], seq_len=32, png=tmp_path / "sweep.png")
    assert [r["step"] for r in rows] == [2, 4, 6] and [r["tokens"] for r in rows] == [256, 512, 768]
    assert rows[0]["ppl shards"] > rows[-1]["ppl shards"]                  # training lowers it
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(EvalError, match="not a pretraining run"):
        sweep(tmp_path / "shards", [])
