"""Bad input for the HTTP server (`python -m serve`): one row per case, no tests here.

Each case is sent to a fresh-enough server and owes: the status given, an OpenAI-shaped body
{"error": {"message", "type", "param", "code"}} whose message contains `message`, and a server
that still answers /health and a normal request afterwards. tests/test_bad_input.py runs them.

The servers the cases assume (`server` field):
  "one": create_app(<random tinyllama-debug chat model, context 256>, **SERVER)
  "dir": create_app(ModelDir(build_models_dir(tmp, <a tinyllama-debug checkpoint>)), **SERVER)

`body`: a dict (sent as JSON), bytes (sent as is, with Content-Length), a tuple of bytes (sent
chunked, no Content-Length), or None.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

API_KEY = "sk-test"
MAX_BODY_BYTES = 64 * 1024
MAX_TOKENS_LIMIT = 64
SERVER = dict(api_key=API_KEY, max_queue=4, max_body_bytes=MAX_BODY_BYTES, max_tokens_limit=MAX_TOKENS_LIMIT)


class ServerCase(NamedTuple):
    id: str
    method: str
    path: str
    headers: dict[str, Any]
    body: Any
    status: int
    message: str
    server: str = "one"


AUTH = {"Authorization": f"Bearer {API_KEY}"}
JSON = {**AUTH, "Content-Type": "application/json"}
CHAT, COMPLETE = "/v1/chat/completions", "/v1/completions"
HI = [{"role": "user", "content": "hi"}]
TOO_BIG = b'{"prompt": "' + b"x" * MAX_BODY_BYTES + b'"}'


def chat(**fields) -> dict:
    return {"messages": HI, "max_tokens": 2, **fields}


def in_dir(model: Any) -> dict:
    return {"model": model, "messages": HI, "max_tokens": 2}


CASES = [
    # ---- malformed bodies and fields ------------------------------------------------------------
    ServerCase("invalid-json", "POST", CHAT, JSON, b"{not json", 400, "invalid JSON"),
    ServerCase("body-not-an-object", "POST", CHAT, JSON, b"[1, 2]", 400, "valid dictionary"),
    ServerCase("messages-not-a-list", "POST", CHAT, JSON, {"messages": "hi"}, 400, "messages"),
    ServerCase("empty-messages", "POST", CHAT, JSON, {"messages": []}, 400, "messages: List should have at least 1"),
    ServerCase("wrong-role", "POST", CHAT, JSON, {"messages": [{"role": "robot", "content": "hi"}]}, 400,
               "messages.0.role"),
    ServerCase("missing-content", "POST", CHAT, JSON, {"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ServerCase("roles-out-of-order", "POST", CHAT, JSON, {"messages": [{"role": "assistant", "content": "hi"}]},
               400, "roles out of order"),
    ServerCase("prompt-not-a-string", "POST", COMPLETE, JSON, {"prompt": 5}, 400, "prompt"),
    ServerCase("max-tokens-string", "POST", CHAT, JSON, chat(max_tokens="many"), 400, "max_tokens"),
    ServerCase("max-tokens-fraction", "POST", CHAT, JSON, chat(max_tokens=3.5), 400, "max_tokens"),
    ServerCase("max-tokens-negative", "POST", CHAT, JSON, chat(max_tokens=-3), 400, "max_tokens must be >= 0, got -3"),
    ServerCase("max-tokens-zero", "POST", COMPLETE, JSON, {"prompt": "hi", "max_tokens": 0}, 400,
               "max_tokens must be at least 1, got 0"),
    ServerCase("max-tokens-over-cap", "POST", CHAT, JSON, chat(max_tokens=MAX_TOKENS_LIMIT + 1), 400,
               f"exceeds this server's limit of {MAX_TOKENS_LIMIT}"),
    ServerCase("max-tokens-huge", "POST", COMPLETE, JSON, {"prompt": "hi", "max_tokens": 10 ** 30}, 400,
               "exceeds this server's limit"),
    ServerCase("max-completion-tokens-over-cap", "POST", CHAT, JSON, chat(max_completion_tokens=10 ** 6), 400,
               "exceeds this server's limit"),
    ServerCase("chat-prompt-over-context", "POST", CHAT, JSON,
               chat(messages=[{"role": "user", "content": "word " * 400}]), 400, "the context length is 256"),
    ServerCase("completion-prompt-over-context", "POST", COMPLETE, JSON, {"prompt": "word " * 400}, 400,
               "the context length is 256"),
    ServerCase("temperature-nan", "POST", CHAT, JSON,
               b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400,
               "temperature: Input should be a finite number"),
    ServerCase("temperature-out-of-range", "POST", CHAT, JSON, chat(temperature=7), 400, "temperature must be in"),
    ServerCase("seed-overflow", "POST", CHAT, JSON, chat(seed=10 ** 30), 400, "seed"),
    ServerCase("n-two", "POST", CHAT, JSON, chat(n=2), 400, "only n=1"),

    # ---- the OpenAI API's shapes: what is read, what is refused by name --------------------------------
    ServerCase("content-part-image", "POST", CHAT, JSON,
               chat(messages=[{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                           {"type": "image_url", "image_url": {"url": "data:,"}}]}]),
               400, "messages.0.content.1: a content part of type 'image_url' is not supported"),
    ServerCase("content-part-audio-second-message", "POST", CHAT, JSON,
               chat(messages=[{"role": "system", "content": "be brief"},
                              {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": ""}}]}]),
               400, "messages.1.content.0: a content part of type 'input_audio'"),
    ServerCase("content-part-file", "POST", CHAT, JSON,
               chat(messages=[{"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]}]),
               400, "of type 'file' is not supported"),
    ServerCase("content-part-without-type", "POST", CHAT, JSON,
               chat(messages=[{"role": "user", "content": [{"text": "hi"}]}]), 400, "a content part without a type"),
    ServerCase("content-part-text-not-a-string", "POST", CHAT, JSON,
               chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]), 400,
               "messages.0.content.0.text: a text part needs a string"),
    ServerCase("content-not-text", "POST", CHAT, JSON, chat(messages=[{"role": "user", "content": 5}]), 400,
               "messages.0.content"),
    ServerCase("developer-not-first", "POST", CHAT, JSON,
               chat(messages=[*HI, {"role": "developer", "content": "be brief"}]), 400,
               "system turn may only come first"),
    ServerCase("tool-message", "POST", CHAT, JSON,
               chat(messages=[*HI, {"role": "assistant", "content": "x"},
                              {"role": "tool", "content": "42", "tool_call_id": "call_1"}]),
               400, "messages.2: role 'tool' is not supported"),
    ServerCase("message-tool-calls", "POST", CHAT, JSON,
               chat(messages=[*HI, {"role": "assistant", "content": "x", "tool_calls": [{"id": "call_1"}]}, *HI]),
               400, "messages.1.tool_calls is not supported"),
    ServerCase("message-name", "POST", CHAT, JSON, chat(messages=[{"role": "user", "content": "hi", "name": "bob"}]),
               400, "messages.0.name is not supported"),
    ServerCase("tools", "POST", CHAT, JSON, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400,
               "tools: tool calling is not supported"),
    ServerCase("tool-choice", "POST", CHAT, JSON, chat(tool_choice="auto"), 400,
               "tool_choice: tool calling is not supported"),
    ServerCase("response-format", "POST", CHAT, JSON, chat(response_format={"type": "json_object"}), 400,
               "response_format is not supported by this server; /v1/chat/completions reads messages, model"),
    ServerCase("logit-bias", "POST", CHAT, JSON, chat(logit_bias={"50": -100}), 400, "logit_bias is not supported"),
    ServerCase("chat-echo", "POST", CHAT, JSON, chat(echo=True), 400, "echo is not supported by this server"),
    ServerCase("completion-suffix", "POST", COMPLETE, JSON, {"prompt": "def f(", "suffix": "return 1"}, 400,
               "suffix is not supported by this server; /v1/completions reads prompt, model"),
    ServerCase("presence-penalty", "POST", CHAT, JSON, chat(presence_penalty=0.5), 400,
               "presence_penalty=0.5 is not supported: only presence_penalty=0"),
    ServerCase("best-of-two", "POST", COMPLETE, JSON, {"prompt": "hi", "best_of": 2}, 400,
               "best_of=2 is not supported: only best_of=1"),
    ServerCase("stream-options-unknown", "POST", CHAT, JSON,
               chat(stream=True, stream_options={"continuous_usage_stats": True}), 400,
               "stream_options.continuous_usage_stats is not supported"),
    ServerCase("top-logprobs-negative", "POST", CHAT, JSON, chat(logprobs=True, top_logprobs=-1), 400,
               "top_logprobs must be in [0, 20], got -1"),
    ServerCase("top-logprobs-over-20", "POST", CHAT, JSON, chat(logprobs=True, top_logprobs=21), 400,
               "top_logprobs must be in [0, 20], got 21"),
    ServerCase("top-logprobs-without-logprobs", "POST", CHAT, JSON, chat(top_logprobs=2), 400,
               "top_logprobs needs logprobs: true"),
    ServerCase("chat-logprobs-not-a-bool", "POST", CHAT, JSON, chat(logprobs="many"), 400, "logprobs"),
    ServerCase("completion-logprobs-negative", "POST", COMPLETE, JSON, {"prompt": "hi", "logprobs": -1}, 400,
               "logprobs must be in [0, 20], got -1"),
    ServerCase("completion-logprobs-over-20", "POST", COMPLETE, JSON, {"prompt": "hi", "logprobs": 21}, 400,
               "logprobs must be in [0, 20], got 21"),
    ServerCase("completion-logprobs-true", "POST", COMPLETE, JSON, {"prompt": "hi", "logprobs": True}, 400,
               "logprobs: Input should be a valid integer"),
    ServerCase("echo-not-a-bool", "POST", COMPLETE, JSON, {"prompt": "hi", "echo": 5}, 400, "echo"),
    ServerCase("echo-prompt-over-context", "POST", COMPLETE, JSON,
               {"prompt": "word " * 400, "echo": True, "max_tokens": 0}, 400, "the context length is 256"),
    ServerCase("prompt-batch", "POST", COMPLETE, JSON, {"prompt": ["a", "b"]}, 400,
               "prompt: a batch of 2 prompts is not supported"),
    ServerCase("prompt-no-ids", "POST", COMPLETE, JSON, {"prompt": []}, 400, "prompt: no token ids"),
    ServerCase("prompt-id-out-of-range", "POST", COMPLETE, JSON, {"prompt": [1, 32000]}, 400,
               "token id 32000 is not in the vocabulary (0 to 31999)"),
    ServerCase("prompt-id-negative", "POST", COMPLETE, JSON, {"prompt": [[1, -1]]}, 400, "token id -1 is not in"),
    ServerCase("prompt-ids-not-ints", "POST", COMPLETE, JSON, {"prompt": [1, "a"]}, 400, "prompt"),

    # ---- the API key -------------------------------------------------------------------------------
    ServerCase("api-key-missing", "POST", CHAT, {}, chat(), 401, "invalid or missing API key"),
    ServerCase("api-key-wrong", "GET", "/v1/models", {"Authorization": "Bearer sk-wrong"}, None, 401,
               "invalid or missing API key"),
    ServerCase("api-key-non-ascii", "GET", "/v1/models", {"Authorization": b"Bearer \xe9\xff"}, None, 401,
               "invalid or missing API key"),

    # ---- size limits ---------------------------------------------------------------------------
    ServerCase("body-over-limit", "POST", COMPLETE, JSON, TOO_BIG, 413, "request body too large"),
    ServerCase("chunked-body-over-limit", "POST", COMPLETE, JSON,
               tuple(TOO_BIG[i:i + 4096] for i in range(0, len(TOO_BIG), 4096)), 413, "request body too large"),

    # ---- routing -------------------------------------------------------------------------------
    ServerCase("unknown-endpoint", "GET", "/v1/nope", AUTH, None, 404, "Not Found"),
    ServerCase("wrong-method", "GET", CHAT, AUTH, None, 405, "Method Not Allowed"),

    # ---- --models-dir: names confined to the folder ---------------------------------------------
    ServerCase("dir-model-missing", "POST", CHAT, JSON, chat(), 400, "'model' is required", "dir"),
    ServerCase("dir-model-parent", "POST", CHAT, JSON, in_dir("../x"), 400, "invalid model name", "dir"),
    ServerCase("dir-model-dotdot", "POST", CHAT, JSON, in_dir(".."), 400, "invalid model name", "dir"),
    ServerCase("dir-model-absolute", "POST", CHAT, JSON, in_dir("/etc/passwd"), 400, "invalid model name", "dir"),
    ServerCase("dir-model-separator", "POST", CHAT, JSON, in_dir("a/b"), 400, "invalid model name", "dir"),
    ServerCase("dir-model-backslash", "POST", CHAT, JSON, in_dir("..\\tiny"), 400, "invalid model name", "dir"),
    ServerCase("dir-model-nul", "POST", CHAT, JSON, in_dir("tiny\x00"), 400, "invalid model name", "dir"),
    ServerCase("dir-model-hidden", "POST", CHAT, JSON, in_dir(".hidden"), 400, "invalid model name", "dir"),
    ServerCase("dir-model-not-a-string", "POST", CHAT, JSON, in_dir(["tiny"]), 400, "model", "dir"),
    ServerCase("dir-model-unknown", "POST", CHAT, JSON, in_dir("nope"), 404, "'nope' does not exist", "dir"),
    ServerCase("dir-model-symlink-out", "POST", CHAT, JSON, in_dir("escape"), 404, "does not exist", "dir"),
    ServerCase("dir-model-not-a-model-file", "POST", CHAT, JSON, in_dir("notes.txt"), 404, "does not exist", "dir"),
    ServerCase("dir-model-pickled-weights", "POST", CHAT, JSON, in_dir("pickled"), 404, "does not exist", "dir"),
    ServerCase("dir-model-random-bytes-gguf", "POST", CHAT, JSON, in_dir("broken.gguf"), 400,
               "'broken.gguf' is not a usable model", "dir"),
    ServerCase("dir-model-truncated-safetensors", "POST", CHAT, JSON, in_dir("truncated"), 400,
               "corrupt or truncated safetensors", "dir"),
]


def build_models_dir(root: Path, checkpoint: Path) -> Path:
    """root/models for the "dir" cases: `tiny` (a good checkpoint), `broken.gguf` (random bytes),
    `truncated` (a checkpoint cut short), `pickled` (config.json + pytorch_model.bin: never
    unpickled, so never listed), `notes.txt`, `.hidden` (a checkpoint, hidden), and `escape` (a
    symlink to a checkpoint outside the folder)."""
    models = root / "models"
    models.mkdir(parents=True)
    shutil.copytree(checkpoint, models / "tiny")
    shutil.copytree(checkpoint, models / ".hidden")
    (models / "broken.gguf").write_bytes(os.urandom(4096))
    (models / "truncated").mkdir()
    shutil.copy(checkpoint / "config.json", models / "truncated")
    data = (checkpoint / "model.safetensors").read_bytes()
    (models / "truncated" / "model.safetensors").write_bytes(data[: len(data) // 2])
    (models / "pickled").mkdir()
    shutil.copy(checkpoint / "config.json", models / "pickled")
    (models / "pickled" / "pytorch_model.bin").write_bytes(b"a pickle would run code on load")
    (models / "notes.txt").write_text(json.dumps({"not": "a model"}))
    (models / "escape").symlink_to(checkpoint.resolve(), target_is_directory=True)
    return models
