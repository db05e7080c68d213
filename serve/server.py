"""An OpenAI-compatible HTTP server over an Engine (FastAPI):

    GET  /health                 {"status": "ok", "model": ...}
    GET  /v1/models              the one model served
    POST /v1/completions         prompt -> text            (stream: server-sent events)
    POST /v1/chat/completions    messages -> assistant turn, through the model's chat format

Generation runs in a worker thread, one at a time (one KV cache); at most `max_queue` requests
may be in flight (running or waiting), more get HTTP 429. A streaming client that goes away
stops its generation at the next token. Errors are OpenAI-shaped:
{"error": {"message", "type", "param", "code"}} with a 4xx status; the server keeps serving.
Extensions to the OpenAI fields: `top_k`, `repetition_penalty` in requests; `stats` (tokens/s,
speculative acceptance) in responses.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinyllama.chat import ChatFormatError
from tinyllama.generate import TextStream

from .engine import Engine, RequestError, Sampling


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1
    stream_options: dict[str, Any] | None = None

    def sampling(self, max_tokens: int) -> Sampling:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return Sampling(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                        repetition_penalty=self.repetition_penalty, seed=self.seed, stop=stop)


class CompletionRequest(SamplingFields):
    prompt: str
    max_tokens: int = 16


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


def error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": type_, "param": param, "code": code}})


def create_app(engine: Engine, api_key: str | None = None, max_queue: int = 8) -> FastAPI:
    app = FastAPI(title="tinyllama", description=__doc__)
    inflight = {"n": 0}
    inflight_lock = threading.Lock()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return error(400, f"invalid JSON body: {first.get('msg')}")
        return error(400, f"{'.'.join(loc) or 'body'}: {first.get('msg')}", param=".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), type_="not_found_error" if exc.status_code == 404 else
                     "invalid_request_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given, f"Bearer {api_key}"):
                return error(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                             type_="authentication_error", code="invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": engine.model_id, "in_flight": inflight["n"]}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": 0,
                                            "owned_by": "tinyllama", "context_length": engine.context_length}]}

    # ---- running a generation -------------------------------------------------------------------
    def admit() -> JSONResponse | None:
        with inflight_lock:
            if inflight["n"] >= max_queue:
                return error(429, f"server busy: {max_queue} requests already in flight; retry later",
                             type_="rate_limit_error", code="rate_limit_exceeded")
            inflight["n"] += 1
        return None

    def release() -> None:
        with inflight_lock:
            inflight["n"] -= 1

    class Run:
        """A generation started in a worker thread at once (so its slot is always released),
        read as async text deltas; leaving the read early cancels it at the next token."""

        def __init__(self, stream: TextStream) -> None:
            self.stream = stream
            self.loop = asyncio.get_running_loop()
            self.queue: asyncio.Queue = asyncio.Queue()
            self.cancel = threading.Event()
            threading.Thread(target=self._work, daemon=True, name="generate").start()

        def _put(self, item: tuple) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

        def _work(self) -> None:
            try:
                with engine.lock:
                    for delta in self.stream:
                        if self.cancel.is_set():
                            self.stream.generation.close()
                            break
                        self._put(("delta", delta))
                self._put(("done", None))
            except Exception as e:          # surfaced to the request, never kills the server
                self._put(("error", e))
            finally:
                release()

        async def deltas(self) -> AsyncIterator[str]:
            try:
                while True:
                    kind, value = await self.queue.get()
                    if kind == "delta":
                        yield value
                    elif kind == "error":
                        raise value
                    else:
                        return
            finally:
                self.cancel.set()

    def usage(stream: TextStream) -> dict:
        s = stream.stats
        return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.generated_tokens,
                "total_tokens": s.prompt_tokens + s.generated_tokens}

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def serve(run: "Run", kind: str, streaming: bool, wants_usage: bool) -> Any:
        stream = run.stream
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(12)}"
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"
        base = {"id": rid, "created": created, "model": engine.model_id}

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict:
            if kind == "chat":
                delta: dict = {} if text is None else {"content": text}
                if first:
                    delta["role"] = "assistant"
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

        async def events() -> AsyncIterator[str]:
            chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
            if kind == "chat":
                yield sse({**base, "object": chunk_obj, "choices": [choice("", None, first=True)]})
            try:
                async for delta in run.deltas():
                    yield sse({**base, "object": chunk_obj, "choices": [choice(delta, None)]})
            except Exception as e:    # headers are sent: report in-band, as OpenAI does
                yield sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
                return
            last = {**base, "object": chunk_obj, "choices": [choice(None, stream.finish_reason)],
                    "stats": stream.stats.as_dict()}
            if wants_usage:
                last["usage"] = usage(stream)
            yield sse(last)
            yield "data: [DONE]\n\n"

        if streaming:
            return StreamingResponse(events(), media_type="text/event-stream")
        text = "".join([d async for d in run.deltas()])
        if kind == "chat":
            ch = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": stream.finish_reason}
        else:
            ch = {"index": 0, "text": text, "logprobs": None, "finish_reason": stream.finish_reason}
        return {**base, "object": obj, "choices": [ch], "usage": usage(stream), "stats": stream.stats.as_dict()}

    async def handle(req: SamplingFields, kind: str, build) -> Any:
        if req.n != 1:
            return error(400, "only n=1 is supported", param="n")
        busy = admit()
        if busy is not None:
            return busy
        try:
            stream = build()
        except (RequestError, ChatFormatError) as e:
            release()
            return error(400, str(e), param=getattr(e, "param", None))
        except Exception:
            release()
            raise
        wants_usage = bool((req.stream_options or {}).get("include_usage"))
        return await serve(Run(stream), kind, req.stream, wants_usage)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Any:
        return await handle(req, "text", lambda: engine.complete(req.prompt, req.sampling(req.max_tokens)))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest) -> Any:
        max_tokens = req.max_completion_tokens or req.max_tokens or engine.context_length
        messages = [m.model_dump() for m in req.messages]
        return await handle(req, "chat", lambda: engine.chat(messages, req.sampling(max_tokens)))

    return app
