"""The OpenAI API as clients send it: logprobs and echo against the model's own log-softmax
(PyTorch, batched slots, and a GGUF in llama.cpp against llama-cpp-python's own logits), text
content parts and developer messages, the fields read and the fields refused, and the official
client parsing what comes back."""

from __future__ import annotations

import json

import pytest
import torch

from tinyllama import Llama, ModelConfig
from tinyllama.inference.backends import TorchBackend
from tinyllama.inference.generate import SamplingParams

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from serve.engine import Engine  # noqa: E402
from serve.server import choice, create_app, sse, sse_text  # noqa: E402

PROMPT = "The quick brown fox jumps over"


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    return Llama(ModelConfig.from_name("tinyllama-debug")).state_dict()


def llama(weights) -> Llama:
    model = Llama(ModelConfig.from_name("tinyllama-debug")).eval()
    model.load_state_dict(weights)
    return model


@pytest.fixture(scope="module")
def reference(weights):
    """The same weights, unpacked and cache-free: the direct computation responses are checked against."""
    model = llama(weights)

    def logp(ids: list[int]) -> torch.Tensor:                       # (T, V): row i predicts token i + 1
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    return logp


@pytest.fixture(scope="module", params=[1, 2], ids=["one-cache", "slots"])
def served(request, weights, llama2_tokenizer):
    engine = Engine(TorchBackend(llama(weights), llama2_tokenizer), llama2_tokenizer, "tiny", parallel=request.param)
    with TestClient(create_app(engine), raise_server_exceptions=False) as client:
        yield engine, client
    engine.close()


def produced(engine: Engine, prompt, n: int, **sampling) -> list[int]:
    """The tokens the engine itself produces for a prompt (text or ids), to score them directly."""
    stream = engine.complete(prompt, SamplingParams(max_new_tokens=n, **sampling), logprobs=0)
    list(stream)
    return [s.token for s in stream.generation.token_logprobs]


def check_legacy(lp: dict, ids: list[int], logp: torch.Tensor, first: int, top: int) -> None:
    """`lp` the legacy logprobs of ids[first:] (first 0: echoed, its first token null)."""
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == len(ids) - first
    for k, i in enumerate(range(first, len(ids))):
        if i == 0:
            assert lp["token_logprobs"][k] is None and lp["top_logprobs"][k] is None
            continue
        row = logp[i - 1]
        assert lp["token_logprobs"][k] == pytest.approx(float(row[ids[i]]), abs=1e-4)
        alternatives = lp["top_logprobs"][k]
        assert len(alternatives) <= top + 1
        assert max(alternatives.values()) == pytest.approx(float(row.max()), abs=1e-4)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "top_k": 3, "seed": 5}], ids=["greedy", "sampled"])
def test_completion_logprobs_and_echo_are_the_models_log_softmax(served, reference, llama2_tokenizer, sampling):
    """Raw-logit log-softmax whatever sampling did: temperature and top-k change the pick, not the logprob."""
    engine, client = served
    ids = llama2_tokenizer.encode(PROMPT)
    out = produced(engine, PROMPT, 6, **sampling)
    full = ids + out
    logp = reference(full)
    body = {"prompt": PROMPT, "max_tokens": 6, "logprobs": 3, **sampling}
    plain = client.post("/v1/completions", json=body).json()["choices"][0]
    check_legacy(plain["logprobs"], full, logp, len(ids), 3)
    echoed = client.post("/v1/completions", json=body | {"echo": True}).json()["choices"][0]
    check_legacy(echoed["logprobs"], full, logp, 0, 3)
    assert echoed["text"] == PROMPT + plain["text"]
    lp, text = echoed["logprobs"], echoed["text"]
    assert lp["tokens"][0] == "<s>" and "".join(lp["tokens"][1:len(ids)]) == PROMPT
    assert lp["text_offset"][len(ids)] == len(PROMPT)            # the completion's text starts after the prompt's
    for token, offset, i in zip(lp["tokens"], lp["text_offset"], full):
        if i not in (llama2_tokenizer.bos_id, llama2_tokenizer.eos_id):      # special: shown, not in the text
            assert text[offset:offset + len(token)] == token


def test_echo_without_new_tokens_scores_the_prompt_as_lm_eval_asks(served, reference):
    """lm-eval's loglikelihood request: token ids, echo, max_tokens 0 or 1; every prompt token's
    logprob, the first null, and whether each was the greedy pick."""
    _, client = served
    ids = [1, 450, 4996, 17354, 1701, 29916, 432, 17204]
    logp = reference(ids)
    for prompt in (ids, [ids]):
        r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1})
        choice = r.json()["choices"][0]
        check_legacy(choice["logprobs"], ids, logp, 0, 1)
        assert r.json()["usage"]["completion_tokens"] == 0 and choice["finish_reason"] == "length"
    one = client.post("/v1/completions", json={"prompt": [ids], "max_tokens": 1, "echo": True, "logprobs": 1,
                                               "temperature": 0, "seed": 1234}).json()["choices"][0]["logprobs"]
    assert one["token_logprobs"][1:-1] == pytest.approx([float(logp[i - 1, ids[i]]) for i in range(1, len(ids))],
                                                          abs=1e-4)
    assert one["token_logprobs"][-1] == pytest.approx(float(logp[-1].max()), abs=1e-4)      # greedy: the argmax


def test_chat_logprobs_streamed_and_whole(served, reference, llama2_tokenizer):
    from tinyllama.formats.chat import apply_chat_template

    engine, client = served
    messages = [{"role": "user", "content": "Name a colour."}]
    body = {"messages": messages, "max_tokens": 8, "logprobs": True, "top_logprobs": 4}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    prompt = apply_chat_template(llama2_tokenizer, messages, template=engine.template)
    stream = engine.chat(messages, SamplingParams(max_new_tokens=8), logprobs=0)
    list(stream)
    out = [s.token for s in stream.generation.token_logprobs]
    full = prompt + out
    logp = reference(full)
    content = whole["logprobs"]["content"]
    assert len(content) == len(out)
    for k, entry in enumerate(content):
        row = logp[len(prompt) + k - 1]
        assert entry["logprob"] == pytest.approx(float(row[out[k]]), abs=1e-4)
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(torch.topk(row, 4).values.tolist(),
                                                                               abs=1e-4)
        assert bytes(entry["bytes"]).decode() == entry["token"]
    assert "".join(e["token"] for e in content if e["token"] != "</s>") == whole["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = [e for c in chunks for e in ((c["choices"][0]["logprobs"] or {}).get("content") or [])]
    # equal up to float noise: a KV cache reused from an earlier request changes the sums' order
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content], abs=1e-4)


def test_streamed_completion_with_echo_equals_the_whole_one(served):
    _, client = served
    body = {"prompt": PROMPT, "max_tokens": 5, "logprobs": 2, "echo": True}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
        chunks = [json.loads(line[6:])["choices"][0] for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    def joined(key: str) -> list:
        return [x for c in chunks if c["logprobs"] for x in c["logprobs"][key]]
    assert joined("tokens") == whole["logprobs"]["tokens"] and joined("text_offset") == whole["logprobs"]["text_offset"]
    assert joined("token_logprobs")[1:] == pytest.approx(whole["logprobs"]["token_logprobs"][1:], abs=1e-4)


def test_text_parts_and_developer_messages(served):
    _, client = served

    def reply(messages, **extra) -> str:
        r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 6, **extra})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    plain = reply([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello\nthere"}])
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    assert reply([{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                  {"role": "user", "content": parts}]) == plain
    # what OpenAI clients send at their defaults, and unset fields as null: accepted, changing nothing
    assert reply([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello\nthere",
                                                             "name": None}],
                 n=1, presence_penalty=0, frequency_penalty=0.0, user="u-1", logit_bias=None, tools=[],
                 response_format=None, logprobs=False, model="anything") == plain


def test_the_fields_listed_are_the_fields_read():
    from serve.protocol import FIELDS, ChatRequest, CompletionRequest

    for model in (ChatRequest, CompletionRequest):
        assert set(FIELDS[model.path]) == set(model.model_fields), model.path


def test_nulls_are_fields_not_sent(served):
    _, client = served
    body = {"prompt": "Hi", "max_tokens": 2, "stream": None, "echo": None, "logprobs": None, "temperature": None,
            "stop": None, "suffix": None}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None, r.text
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi", "name": None}],
                                                  "max_tokens": 2, "logprobs": None, "top_logprobs": None})
    assert r.status_code == 200, r.text


def test_the_openai_client_reads_logprobs(weights, llama2_tokenizer):
    openai = pytest.importorskip("openai")
    from test_serve import start_server

    engine = Engine(TorchBackend(llama(weights), llama2_tokenizer), llama2_tokenizer, "tiny")
    url, server = start_server(create_app(engine))
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, logprobs=2, echo=True)
        lp = r.choices[0].logprobs
        assert lp.token_logprobs[0] is None and len(lp.tokens) == r.usage.prompt_tokens + r.usage.completion_tokens
        c = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                           logprobs=True, top_logprobs=2)
        assert len(c.choices[0].logprobs.content) == c.usage.completion_tokens
        assert all(len(t.top_logprobs) == 2 for t in c.choices[0].logprobs.content)
        with pytest.raises(openai.BadRequestError, match="response_format"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                           response_format={"type": "json_object"})
    finally:
        server.should_exit = True
        engine.close()


@pytest.mark.llamacpp
def test_gguf_logprobs_are_llama_cpps_own(tiny_chat_checkpoint, tmp_path):
    """A GGUF served through llama.cpp: echo and generated logprobs equal the log-softmax of the
    logits llama-cpp-python itself computes for the same ids, one cache and slots alike."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by make setup")
    from quantize.export import write_gguf

    gguf = write_gguf(tiny_chat_checkpoint, tmp_path / "m.gguf", "f32")
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, logits_all=True, verbose=False,
                          flash_attn=True)       # as GGUFBackend runs it
    try:
        for parallel in (1, 2):
            engine = Engine.load(gguf, parallel=parallel)
            try:
                with TestClient(create_app(engine)) as client:
                    ids = engine.tokenizer.encode(PROMPT)
                    out = produced(engine, PROMPT, 5)
                    llm.reset()
                    llm.eval(ids)                    # as the engine runs it: the prompt in one pass,
                    for token in out:                # then a pass per token (flash attention's sums
                        llm.eval([token])            # follow the pass's shape)
                    logp = torch.log_softmax(torch.from_numpy(llm.scores[:len(ids) + len(out)].copy()), -1)
                    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 5, "logprobs": 2,
                                                             "echo": True})
                    check_legacy(r.json()["choices"][0]["logprobs"], ids + out, logp, 0, 2)
            finally:
                engine.close()
    finally:
        llm.close()


@pytest.mark.parametrize("kind", ["chat", "text"])
def test_a_text_chunk_is_the_json_of_the_whole_chunk(kind):
    head = {"id": "chatcmpl-1", "created": 1, "model": 'a "model" \ue000 name', "object": "chat.completion.chunk"}
    render = sse_text(kind, head)
    for text in ["", " llama", 'quotes " and \\ backslash', "line\nbreak\ttab", "🦙 中文 é", "\ue000", "\x00\x1f"]:
        assert render(text) == sse({**head, "choices": [choice(kind, text, None)]})
