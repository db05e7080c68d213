"""Our GGUFs in llama.cpp's own server (built from the sdist's sources like the other tools): a
user who outgrows `python -m serve` moves to llama-server with the same file, and it must chat in
the model's own template and answer as ours does. Also the side-by-side load benchmark, short."""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path

import httpx
import pytest
from test_generate import random_llama

from tinyllama import ModelConfig, save_checkpoint
from tinyllama.formats.chat import CHAT_TEMPLATE, apply_chat_template

pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by make setup")
openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp, pytest.mark.usefixtures("llama_cpp_tools")]

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def chat_gguf(tmp_path_factory, llama2_tokenizer) -> Path:
    """A random tinyllama-debug chat model (sharpened, so greedy has no near-ties) with the
    project's chat template, exported as an F32 GGUF by the quantize stage's writer."""
    from quantize.export import write_gguf

    d = tmp_path_factory.mktemp("llama-server")
    tok = copy.copy(llama2_tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    save_checkpoint(random_llama(ModelConfig.from_name("tinyllama-debug"), 0), tok, d / "chat")
    return write_gguf(d / "chat", d / "chat-F32.gguf", "f32")


def llama_server(gguf: Path, log: Path, *args: str) -> tuple[str, subprocess.Popen]:
    from bench.server_load import free_port, wait_until_up
    from tinyllama.llamacpp.tools import tool

    port = free_port()
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(tool("llama-server")), "-m", str(gguf), "--port", str(port), "--host",
                                 "127.0.0.1", *args], stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, proc, log)
    except BaseException:
        proc.kill()
        raise
    return url, proc


def test_llama_server_chats_in_our_template_and_answers_as_we_do(chat_gguf, tmp_path):
    from serve.engine import Engine
    from tinyllama.inference.generate import SamplingParams

    url, proc = llama_server(chat_gguf, tmp_path / "llama-server.log", "-np", "1", "-c", "256", "-fa", "off")
    engine = Engine.load(chat_gguf, n_ctx=256)
    try:
        prompt = httpx.post(f"{url}/apply-template", json={"messages": MESSAGES}).json()["prompt"]
        theirs = httpx.post(f"{url}/tokenize", json={"content": prompt, "add_special": True,
                                                    "parse_special": True}).json()["tokens"]
        ours = apply_chat_template(engine.tokenizer, MESSAGES, add_generation_prompt=True, template=engine.template)
        assert theirs == ours                    # the same Zephyr turns, token for token
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=12, temperature=0)
        stream = engine.chat(MESSAGES, SamplingParams(max_new_tokens=12))
        assert reply.choices[0].message.content.strip() == "".join(stream).strip()
        assert reply.usage.prompt_tokens == len(ours)
    finally:
        proc.terminate()
        proc.wait(30)
        engine.close()


def test_side_by_side_load_benchmark_short(chat_gguf):
    from bench.server_compare import measure, table

    rows = measure(chat_gguf, clients=(1, 4), duration_s=2.0, parallel=4, n_ctx=128, max_tokens=8, windows=2)
    assert [(r["server"], r["clients"]) for r in rows] == [("ours", 1), ("ours", 4), ("llama-server", 1),
                                                           ("llama-server", 4)]
    for r in rows:
        assert r["served"] > 0 and r["tokens_per_s"] > 0, r
        assert r["bad_status"] + r["stream_errors"] + r["transport_errors"] == 0, r["first_error"]
        # two windows each, taken in turns: the paired ratio per window
        assert len(r["window_rates"]) == 2 and all(rate > 0 for rate in r["window_rates"]), r
    text = table(rows, 4, 128, 8)
    assert "llama-server" in text and "vs llama-server per window" in text
    ours = next(line for line in text.splitlines() if "ours" in line and "| 1 " in line)
    assert re.search(r"\| \d+\.\d\dx \(\d+\.\d\d-\d+\.\d\d\) +\|", ours), ours


def test_side_by_side_with_a_draft_speculates_in_both_servers(chat_gguf):
    """-md: both servers load the draft (the chat model drafting for itself here) and answer every
    request; the rows name the pair. llama-server really drafts (`-md` alone would leave its
    speculation off), and a draft identical to the target has nearly all its drafts accepted (a
    multi-token pass may round a near tie the other way)."""
    from bench.server_compare import measure, table

    rows = measure(chat_gguf, clients=(1,), duration_s=2.0, parallel=2, n_ctx=128, max_tokens=8, draft=chat_gguf)
    assert [r["server"] for r in rows] == ["ours", "llama-server"]
    for r in rows:
        assert r["model"] == f"{chat_gguf.name} drafted by {chat_gguf.name}"
        assert r["served"] > 0 and r["tokens_per_s"] > 0, r
        assert r["bad_status"] + r["stream_errors"] + r["transport_errors"] == 0, r["first_error"]
    theirs = rows[1]
    assert theirs["drafted"] > 0 and theirs["accepted"] >= 0.8 * theirs["drafted"], theirs
    note = table(rows, 2, 128, 8)
    assert f"llama-server at 1 client drafted {theirs['drafted']:,} tokens" in note
    assert "ours at 1 client drafted" in note
