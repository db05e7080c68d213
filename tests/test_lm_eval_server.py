"""lm-eval's own API clients against our server score what `python -m evaluation` scores on the
same model and task: `local-completions` on a log-likelihood task (token-id prompts, echo,
logprobs) and `local-chat-completions` on a generation task (the model's chat template), both on
the offline tasks evaluation builds from the SFT sample."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("uvicorn")

from evaluation.__main__ import main as evaluate  # noqa: E402
from evaluation.harness import LOCAL_GEN_TASK, LOCAL_TASK, local_task_dir  # noqa: E402
from serve.engine import Engine  # noqa: E402
from serve.server import create_app  # noqa: E402

LIMIT = 24           # questions per task: enough for the scores to move, a minute in all on two cores


def lm_eval_cli(model: str, model_args: dict, task: str, include: Path, out: Path, *flags: str) -> dict:
    """{metric: value} of `python -m lm_eval` on one task."""
    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", args, "--tasks", task,
           "--include_path", str(include), "--limit", str(LIMIT), "--output_path", str(out), *flags]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    [results] = list(out.rglob("results_*.json"))
    return {k.split(",")[0]: v for k, v in json.loads(results.read_text())["results"][task].items()
            if isinstance(v, float)}


def ours(model_dir: Path, task: str, out: Path, *flags: str) -> dict:
    """{metric: value} of `python -m evaluation` on one task (its own CLI, in this process)."""
    assert evaluate(["--model", str(model_dir), "--tasks", task, "--limit", str(LIMIT), "--dtype", "float32",
                     "--out", str(out), *flags]) == 0
    return json.loads(out.read_text())[model_dir.name]["tasks"][task]


@pytest.mark.slow
def test_lm_eval_through_our_server_scores_as_our_evaluation(tiny_chat_checkpoint, tmp_path):
    from test_serve import start_server

    include = local_task_dir(tmp_path / "tasks")            # the tasks `python -m evaluation` runs offline
    engine = Engine.load(tiny_chat_checkpoint, dtype="float32")   # as evaluation loads it: the same numbers
    url, server = start_server(create_app(engine))
    try:
        common = {"model": "tiny", "max_retries": 1, "num_concurrent": 1}
        # log-likelihoods: lm-eval tokenizes with the model folder's own tokenizer (BOS first, as
        # the model adds it) and sends token ids with echo, reading each prompt token's logprob
        theirs = lm_eval_cli("local-completions", common | {
            "base_url": f"{url}/v1/completions", "tokenizer": tiny_chat_checkpoint, "tokenizer_backend": "huggingface",
            "add_bos_token": True, "max_length": engine.context_length}, LOCAL_TASK, include, tmp_path / "mc")
        mine = ours(tiny_chat_checkpoint, LOCAL_TASK, tmp_path / "mc.json")
        assert theirs["acc"] == pytest.approx(mine["acc"], abs=0.01)
        assert theirs["acc_norm"] == pytest.approx(mine["acc_norm"], abs=0.01)
        # generation: lm-eval sends each question as a chat; the server renders it in the model's template
        theirs = lm_eval_cli("local-chat-completions", common | {"base_url": f"{url}/v1/chat/completions"},
                             LOCAL_GEN_TASK, include, tmp_path / "gen", "--apply_chat_template")
        mine = ours(tiny_chat_checkpoint, LOCAL_GEN_TASK, tmp_path / "gen.json", "--apply-chat-template")
        assert mine["chrf"] > 0                                  # graded: equal scores mean equal replies
        assert theirs["chrf"] == pytest.approx(mine["chrf"], abs=0.01)
        assert theirs["exact_match"] == pytest.approx(mine["exact_match"], abs=0.01)
    finally:
        server.should_exit = True
        engine.close()
