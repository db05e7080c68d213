"""One end-to-end smoke test of the lifecycle through the stage CLIs, as a user runs them, on a
tiny preset: raw text -> shards -> pretrain -> SFT -> GGUF -> a chat turn in llama.cpp."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by make setup")


def cli(*argv: str, cwd: Path) -> str:
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=cwd)
    assert r.returncode == 0, f"{' '.join(argv)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.mark.slow
@pytest.mark.llamacpp
def test_raw_text_to_a_chat_model_in_llama_cpp(tmp_path):
    from pydoc_data.topics import topics

    from tinyllama import load_checkpoint
    from tinyllama.chat import CHAT_TEMPLATE

    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"text": t}) + "\n" for _, t in sorted(topics.items())[:40]))
    cli("-m", "pretrain.prepare", str(raw), "--out", "tokens", "--workers", "1", "--no-progress", cwd=tmp_path)
    cli("-m", "pretrain", "--preset", "tinyllama-debug", "--data", "natural=tokens", "--weights", "natural=1",
        "--seq-len", "64", "--micro-batch", "2", "--global-batch-tokens", "256", "--max-steps", "6",
        "--warmup-steps", "1", "--dtype", "float32", "--out-dir", "pretrain", "--eval-every", "0",
        "--sample-tokens", "0", "--no-tensorboard", "--no-progress", cwd=tmp_path)
    out = cli("-m", "sft", "--base", "pretrain/final", "--out", "chat", "--method", "lora", "--max-steps", "3",
              "--lr", "1e-3", "--no-progress", "--samples", "1", cwd=tmp_path)
    assert "eval loss (assistant tokens)" in out and "sample (held out)" in out
    model, tok = load_checkpoint(tmp_path / "chat")
    assert tok.chat_template == CHAT_TEMPLATE and model.config.name == "tinyllama-debug-chat"
    cli("-m", "quantize", "--model", "chat", "--type", "q8_0", "--out", "gguf", cwd=tmp_path)
    gguf = tmp_path / "gguf" / "tinyllama-debug-chat-Q8_0.gguf"
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=128, verbose=False)
    try:
        reply = llm.create_chat_completion(messages=[{"role": "user", "content": "What does `len()` do?"}],
                                           max_tokens=4, temperature=0.0)
        assert reply["choices"][0]["message"]["role"] == "assistant"
    finally:
        llm.close()
