"""One end-to-end smoke test of the lifecycle through the stage CLIs, as a user runs them, on a
tiny preset: raw text -> shards -> pretrain -> SFT -> GGUF -> a chat turn in llama.cpp and
through `python -m serve` with the openai client."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("trl")
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by make setup")


def cli(*argv: str, cwd: Path) -> str:
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=cwd)
    assert r.returncode == 0, f"{' '.join(argv)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.mark.dtype_auto
@pytest.mark.slow
@pytest.mark.llamacpp
def test_raw_text_to_a_chat_model_in_llama_cpp(tmp_path):
    from pydoc_data.topics import topics

    from tinyllama import load_checkpoint
    from tinyllama.formats.chat import CHAT_TEMPLATE

    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"text": t}) + "\n" for _, t in sorted(topics.items())[:40]))
    cli("-m", "prepare", str(raw), "--out", "tokens", "--workers", "1", "--no-progress", cwd=tmp_path)
    cli("-m", "pretrain", "--preset", "tinyllama-debug", "--data", "natural=tokens", "--weights", "natural=1",
        "--seq-len", "64", "--micro-batch", "2", "--global-batch-tokens", "256", "--max-steps", "6",
        "--warmup-steps", "1", "--dtype", "float32", "--out", "pretrain", "--eval-every", "0",
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

    # python -m serve (what `make serve` runs) on that GGUF, spoken to by the openai client
    openai = pytest.importorskip("openai")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "serve", "--model", str(gguf), "--port", str(port)],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "What does `len()` do?"}],
                                           max_tokens=8, temperature=0)
        assert r.choices[0].message.role == "assistant" and r.usage.prompt_tokens > 10
        assert r.model == "tinyllama-debug-chat-Q8_0"
    finally:
        server.terminate()
        server.wait(timeout=30)
