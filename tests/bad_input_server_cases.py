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
