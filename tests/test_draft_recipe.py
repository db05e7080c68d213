"""tinyllama draft: the recipe that makes a draft for any target, end to end on a tiny target,
and resumed: a second run finds every step done."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tinyllama_lifecycle.draft import steps

ROOT = Path(__file__).resolve().parents[1]


def test_the_recipe_imports_a_gguf_target_and_scales_a_short_run():
    recipe = steps("m/target.gguf", Path("o"), "tinyllama-debug", max_steps=20, corpus="raw.jsonl", limit=3,
                   sft_steps=2)
    commands = [c[0] for _, c in recipe]
    assert commands == ["import", "prepare", "pretrain", "distill", "sft", "quantize"]
    pretrain = recipe[2][1]
    assert pretrain[pretrain.index("--tokenizer") + 1] == "o/target"            # the imported target's vocabulary
    assert pretrain[pretrain.index("--embeddings-from") + 1] == "o/target"
    assert pretrain[pretrain.index("--warmup-steps") + 1] == "2" and "--tie-embeddings" in pretrain
    distill = recipe[3][1]
    assert distill[distill.index("--teacher") + 1] == "m/target.gguf" and "--code-prompts" in distill
    assert [c[0] for _, c in steps("out/sft", Path("o"), "tinyllama-19m")][:2] == ["corpus", "pretrain"]


@pytest.mark.slow
@pytest.mark.llamacpp
def test_a_draft_for_a_tiny_target_end_to_end_and_resumed(tiny_chat_checkpoint, tmp_path):
    raw = tmp_path / "raw.jsonl"
    doc = "def f{i}(x):\n    return x + {i}  # a line of text {i}\n"
    raw.write_text("".join(json.dumps({"text": doc.format(i=i) * 10}) + "\n" for i in range(600)))
    cmd = [sys.executable, "-m", "tinyllama_lifecycle", "draft", "--target", str(tiny_chat_checkpoint), "--out",
           str(tmp_path / "d"), "--preset", "tinyllama-debug", "--steps", "3", "--corpus", str(raw), "--limit", "3",
           "--sft-steps", "2", "--max-new-tokens", "4"]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    gguf = tmp_path / "d" / "gguf" / "draft-Q8_0.gguf"
    assert gguf.is_file() and (tmp_path / "d" / "distill.jsonl").is_file()
    from tinyllama.formats.checkpoint import load_config

    cfg = load_config(tmp_path / "d" / "sft")
    assert cfg.tie_embeddings and cfg.vocab_size == load_config(tiny_chat_checkpoint).vocab_size
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert again.returncode == 0 and again.stdout.count("exists: skipping") == 5, again.stdout
