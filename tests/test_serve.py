"""The OpenAI-compatible server, driven by the official `openai` client over real HTTP, and
text streaming with stop strings."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from tinyllama import Llama, ModelConfig
from tinyllama.inference.backends import Backend, TorchBackend
from tinyllama.formats.chat import encode_chat
from tinyllama.inference.generate import TextStream, generate

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from serve.engine import Engine  # noqa: E402
from serve.server import create_app  # noqa: E402

KEY = "sk-test"


class Slow(Backend):
    """A backend that takes `delay` seconds per call, to observe cancellation."""

    def __init__(self, inner: Backend, delay: float) -> None:
        self.inner, self.delay, self.name = inner, delay, inner.name
        self.vocab_size, self.context_length = inner.vocab_size, inner.context_length
        self.calls = 0

    def logits(self, context, n_last=1):
        self.calls += 1
        time.sleep(self.delay)
        return self.inner.logits(context, n_last)

    def cached_tokens(self):
        return self.inner.cached_tokens()

    def trim(self, n):
        self.inner.trim(n)


@pytest.fixture(scope="module")
def engine(llama2_tokenizer):
    torch.manual_seed(0)
    model = Llama(ModelConfig.from_name("tinyllama-debug")).eval()
    return Engine(TorchBackend(model, llama2_tokenizer), llama2_tokenizer, "tiny-chat")


def start_server(app) -> tuple[str, uvicorn.Server]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server


@pytest.fixture(scope="module")
def server(engine):
    url, srv = start_server(create_app(engine, api_key=KEY, max_queue=2))
    yield url
    srv.should_exit = True


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


# ---- the openai client -------------------------------------------------------------------------------

def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_chat_completion_matches_the_generator(client, engine, llama2_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does len() do?"}]
    r = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12, temperature=0)
    ids, _ = encode_chat(llama2_tokenizer, messages, add_generation_prompt=True)
    expected = list(generate(engine.target, ids, max_new_tokens=12, stop_ids=[llama2_tokenizer.eos_id]))
    text = llama2_tokenizer.decode([i for i in expected if i != llama2_tokenizer.eos_id])
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(expected)
    assert r.choices[0].finish_reason == ("stop" if expected[-1] == llama2_tokenizer.eos_id else "length")


def test_streaming_equals_non_streaming(client):
    kw = dict(model="tiny-chat", max_tokens=16, temperature=0.9, seed=7)
    messages = [{"role": "user", "content": "Tell me a story."}]
    whole = client.chat.completions.create(messages=messages, **kw).choices[0].message.content
    chunks = list(client.chat.completions.create(messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].choices[0].finish_reason in ("stop", "length")

    text = client.completions.create(prompt="Once upon a time", **kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(prompt="Once upon a time", stream=True,
                                                                              **kw))
    assert streamed == text and len(text) > 0


def test_stop_strings_and_seeds(client):
    kw = dict(model="tiny-chat", prompt="The", max_tokens=30, temperature=1.0)
    a = client.completions.create(seed=3, **kw).choices[0].text
    assert client.completions.create(seed=3, **kw).choices[0].text == a
    stop = a[5:8]
    r = client.completions.create(seed=3, stop=[stop], **kw)
    assert r.choices[0].text == a[: a.index(stop)] and r.choices[0].finish_reason == "stop"


# ---- bad input ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "invalid JSON"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400, "max_tokens must be >= 0, got -3"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 9}, 400, "exceeds the context length"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 7}, 400, "temperature"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "roles out of order"),
    ({"messages": [{"role": "user", "content": "word " * 400}]}, 400, "context length is 256"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "only n=1"),
])
def test_bad_requests_get_openai_errors(server, body, status, message):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server}/v1/chat/completions", content=data, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"] == "invalid_request_error"
    assert httpx.get(f"{server}/health").status_code == 200          # still serving


def test_api_key_is_required(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(f"{server}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0).models.list()


def test_streams_pass_no_http_middleware(engine):
    """Starlette's @app.middleware("http") relays every streamed chunk through a task of its
    own (CPU a 2-core server takes from llama.cpp's threads): the key check is plain ASGI, and
    without a key there is none."""
    from starlette.middleware.base import BaseHTTPMiddleware

    from serve.server import ApiKey

    for key in (None, KEY):
        app = create_app(engine, api_key=key)
        assert not [m for m in app.user_middleware if m.cls is BaseHTTPMiddleware]
        assert any(m.cls is ApiKey for m in app.user_middleware) == (key is not None)


def _event_stream_run(tok, text: str, **req):
    """(EventStream, Run) for a chat request whose generation emits `text`, on a running loop."""
    from serve.protocol import ChatRequest
    from serve.server import Admission, EventStream, OneModel, Reply, Run

    ids = tok.encode(text, bos=False) + [tok.eos_id]
    engine = Engine(Scripted(ids, prompt_len=1, vocab=tok.vocab_size), tok, "scripted")
    gen = generate(engine.target, [tok.bos_id], max_new_tokens=len(ids), stop_ids=[tok.eos_id])
    admission = Admission(1)
    admission.admit()
    request = ChatRequest(messages=[{"role": "user", "content": "hi"}], stream=True, **req)
    run = Run(TextStream(gen, tok), engine, None, OneModel(engine), admission)
    return EventStream(run, Reply(run, request, "chat"), request.wants_usage), run, admission


def _events(body: bytes) -> list:
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
            for line in body.decode().split("\n\n") if line]


def test_event_stream_writes_what_arrived_together_with_one_send(llama2_tokenizer):
    """Deltas that reach the event loop before it runs go out in one body message, in order,
    with the finish chunk and [DONE] when the generation ended meanwhile: a token costs the loop
    a wake-up and a write, and a busy loop catches up with one."""
    import asyncio

    text = "Llamas eat grass and hay."
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        await asyncio.sleep(3600)           # the client stays

    async def main():
        response, run, admission = _event_stream_run(llama2_tokenizer, text, stream_options={"include_usage": True})
        for _ in range(200):                # the loop blocked (no await) while the generation runs to its end
            if admission.in_flight == 0:
                break
            time.sleep(0.01)
        await response(None, receive, send)
        return run

    run = asyncio.run(main())
    assert [m["type"] for m in sent] == ["http.response.start"] + ["http.response.body"] * 2
    assert (b"content-type", b"text/event-stream; charset=utf-8") in sent[0]["headers"]
    role, = _events(sent[1]["body"])
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""} and sent[1]["more_body"]
    *deltas, last, done = _events(sent[2]["body"])
    assert len(deltas) > 1 and "".join(d["choices"][0]["delta"]["content"] for d in deltas) == text
    assert last["choices"][0]["finish_reason"] == "stop" and last["usage"]["completion_tokens"] == len(deltas) + 1
    assert done == "[DONE]" and sent[2]["more_body"] is False
    assert run.cancel.is_set()              # set however the response ends; the generation had ended


def test_event_stream_stops_the_generation_when_the_client_goes(llama2_tokenizer):
    """http.disconnect ends the response without another write and cancels the generation at
    its next token (it gives its slot back: nothing stays in flight)."""
    import asyncio

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.disconnect"}

    async def main():
        response, run, admission = _event_stream_run(llama2_tokenizer, "word " * 5000)
        await response(None, receive, send)
        for _ in range(200):
            if admission.in_flight == 0:
                break
            await asyncio.sleep(0.01)
        return run, admission

    run, admission = asyncio.run(main())
    assert run.cancel.is_set() and admission.in_flight == 0
    assert run.stream.finish_reason == "cancelled" and run.stream.stats.generated_tokens < 5000
    assert all(m.get("more_body", True) for m in sent)     # no end of body written to a client that left


def test_full_queue_is_429_and_disconnect_cancels(llama2_tokenizer):
    torch.manual_seed(0)
    inner = TorchBackend(Llama(ModelConfig.from_name("tinyllama-debug")).eval(), llama2_tokenizer)
    slow = Slow(inner, delay=0.05)
    engine = Engine(slow, llama2_tokenizer, "slow")
    url, srv = start_server(create_app(engine, max_queue=1))
    try:
        body = {"prompt": "Hello", "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data:"))            # generation is running
            busy = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1})
            assert busy.status_code == 429 and busy.json()["error"]["code"] == "rate_limit_exceeded"
        # the client went away after one chunk: the generation stops long before 200 tokens
        for _ in range(100):
            if httpx.get(f"{url}/health").json()["in_flight"] == 0:
                break
            time.sleep(0.05)
        assert httpx.get(f"{url}/health").json()["in_flight"] == 0
        assert slow.calls < 100
        ok = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200
    finally:
        srv.should_exit = True


# ---- text streaming ------------------------------------------------------------------------------------------

class Scripted(Backend):
    """Emits a fixed id sequence greedily, whatever the context."""

    def __init__(self, ids: list[int], prompt_len: int, vocab: int = 32000) -> None:
        self.ids, self.prompt_len, self.name = ids, prompt_len, "scripted"
        self.vocab_size, self.context_length = vocab, 10_000

    def logits(self, context, n_last=1):
        rows = []
        for n in range(len(context) - n_last + 1, len(context) + 1):
            row = torch.zeros(self.vocab_size)
            row[self.ids[min(n - self.prompt_len, len(self.ids) - 1)]] = 10.0
            rows.append(row)
        return torch.stack(rows)

    def cached_tokens(self):
        return 0

    def trim(self, n):
        pass


def stream_of(tok, text: str, stop=(), max_new=100):
    ids = tok.encode(text, bos=False) + [tok.eos_id]
    gen = generate(Scripted(ids, prompt_len=1), [tok.bos_id], max_new_tokens=max_new, stop_ids=[tok.eos_id])
    return TextStream(gen, tok, stop=stop)


def stream_ids(tok, ids: list[int]) -> TextStream:
    """A TextStream over a generation that emits `ids`, then EOS."""
    gen = generate(Scripted(ids + [tok.eos_id], prompt_len=1, vocab=tok.vocab_size), [tok.bos_id],
                   max_new_tokens=len(ids) + 1, stop_ids=[tok.eos_id])
    return TextStream(gen, tok)


def check_stream_is_the_whole_decode(tok, samples: list[list[int]]) -> None:
    """Streamed token by token, each id sequence gives exactly the text decoding it at once
    gives, and no delta ends in half a character that the text completes."""
    for ids in samples:
        deltas = list(stream_ids(tok, ids))
        assert "".join(deltas) == tok.decode(ids), ids
        assert not any(d.endswith("\ufffd") for d in deltas if "\ufffd" not in tok.decode(ids)), ids


def test_text_stream_equals_decoding_the_whole_reply(llama2_tokenizer):
    """What incremental decoding must keep: SentencePiece's leading spaces, byte-fallback pieces
    of one character split across tokens, and random ids (lone bytes: replacement characters
    in mid-text)."""
    import random

    tok, rng = llama2_tokenizer, random.Random(0)
    texts = ["Llamas 🦙 eat grass.", " leading space", "a  b\n\n c", "中文 and 語 ё", "x" * 300, "🦙🦙🦙"]
    specials = set(tok.stop_ids) | {tok.bos_id}
    ids = [i for i in range(tok.vocab_size) if i not in specials]
    check_stream_is_the_whole_decode(tok, [tok.encode(t, bos=False) for t in texts]
                                     + [rng.choices(ids, k=rng.randint(1, 60)) for _ in range(200)])


def test_text_stream_utf8_and_stop_strings(llama2_tokenizer):
    tok = llama2_tokenizer
    s = stream_of(tok, "Llamas 🦙 eat grass.\n\nThe end.")
    deltas = list(s)
    assert "".join(deltas) == "Llamas 🦙 eat grass.\n\nThe end." and s.finish_reason == "stop"
    assert not any("\ufffd" in d for d in deltas)               # no half characters, ever
    s = stream_of(tok, "Llamas 🦙 eat grass.\n\nThe end.", stop=["\n\n", "grass!"])
    deltas = list(s)
    assert "".join(deltas) == "Llamas 🦙 eat grass." and s.stats.stop_reason == "stop_string"
    assert not any(d.endswith("\n") for d in deltas)            # a stop string's start is held back
    s = stream_of(tok, "one two three four", max_new=2)
    assert "".join(s) == tok.decode(tok.encode("one two three four", bos=False)[:2]) and s.finish_reason == "length"


@pytest.mark.dtype_auto
def test_cli_generate_streams_and_reports(tmp_path, llama2_tokenizer):
    from tinyllama import save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(Llama(ModelConfig.from_name("tinyllama-debug")), llama2_tokenizer, tmp_path / "m")
    r = subprocess.run([sys.executable, "-m", "serve.complete", "--model", str(tmp_path / "m"), "--prompt", "Hi",
                        "--chat", "--max-tokens", "5"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "prompt tokens" in r.stderr and "generated at" in r.stderr
    # speculative with an adaptive k and no p-min stop (a random model is sure of nothing): the
    # model drafts for itself, so every draft is accepted
    r = subprocess.run([sys.executable, "-m", "serve.complete", "--model", str(tmp_path / "m"), "--prompt", "Hi",
                        "-md", str(tmp_path / "m"), "--draft-max", "adaptive:1", "--draft-p-min", "0", "--max-tokens", "12",
                        "--temperature", "0"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "9/9 drafted tokens accepted (100%)" in r.stderr and "mean k 3.0" in r.stderr, r.stderr   # k = 1, 3, 5
    r = subprocess.run([sys.executable, "-m", "serve.complete", "--model", str(tmp_path / "nope"), "--prompt", "x"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "error:" in r.stderr
