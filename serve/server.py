"""An OpenAI-compatible HTTP server over an Engine or a ModelDir (FastAPI):

    GET  /health                 {"status": "ok", "models": [...], "in_flight": n}
    GET  /v1/models              the model(s) served
    POST /v1/completions         prompt -> text            (stream: server-sent events)
    POST /v1/chat/completions    messages -> assistant turn, through the model's chat format

    app = create_app(Engine.load(path), api_key="sk-...", max_queue=8)
    app = create_app(ModelDir("models/"))          # the request's `model` picks one, loaded on demand

Generation runs in a worker thread, one at a time (one KV cache); at most `max_queue` requests
may be in flight (running or waiting), more get HTTP 429. A streaming client that goes away
stops its generation at the next token. Limits: request bodies over `max_body_bytes` get 413
(on Content-Length, or as a chunked body arrives), `max_tokens` over `max_tokens_limit` or the
context length gets 400. With one Engine any `model` name is accepted (OpenAI clients send
their own); with a ModelDir it must be one the folder lists (404 otherwise, 400 for a path).
Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}} with a 4xx status (a
500 for a bug); the server keeps serving. Extensions to the OpenAI fields: `top_k`,
`repetition_penalty` in requests; `stats` (tokens/s, speculative acceptance) in responses.
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

from .engine import Engine, ModelDir, ModelNotFound, RequestError, Sampling


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)   # NaN would pass every range check

    model: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float = 1.0
    seed: int | None = Field(None, ge=-2**63, lt=2**64)                # what torch's generator takes
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

    @property
    def max_new(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class OneModel:
    """A single Engine seen as a model folder: every name maps to it."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.lock = engine, engine.lock

    def names(self) -> list[str]:
        return [self.engine.model_id]

    def engines(self) -> dict[str, Engine]:
        return {self.engine.model_id: self.engine}

    def check(self, name: str | None) -> None:
        pass

    def acquire(self, name: str | None) -> Engine:
        return self.engine

    def release(self, name: str | None) -> None:
        pass


def error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
          code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": type_, "param": param, "code": code}})


class BodyLimit:
    """413 for a request body over `max_bytes`: on its Content-Length before reading a byte, or,
    for a chunked body, as soon as the bytes received pass the limit (so at most the limit plus
    one chunk is ever held). FastAPI's own `max_body_size` answers the first case in plain text,
    not in the OpenAI error shape."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            return await too_large(self.max_bytes)(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:   # FastAPI passes an HTTPException from the body read to _http
                raise StarletteHTTPException(413)
            return message

        await self.app(scope, limited_receive, send)


def too_large(limit: int) -> JSONResponse:
    r = error(413, f"request body too large: the limit is {limit} bytes", code="request_too_large")
    r.headers["connection"] = "close"           # else uvicorn reads (and drops) the rest of the upload
    return r


def create_app(models: Engine | ModelDir, api_key: str | None = None, max_queue: int = 8,
               max_body_bytes: int = 1 << 20, max_tokens_limit: int = 4096) -> FastAPI:
    if isinstance(models, Engine):
        models = OneModel(models)
    app = FastAPI(title="tinyllama", description=__doc__)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
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
        if exc.status_code == 413:
            return too_large(max_body_bytes)
        return error(exc.status_code, str(exc.detail), type_="not_found_error" if exc.status_code == 404 else
                     "invalid_request_error")

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        return error(500, f"internal error: {type(exc).__name__}", type_="server_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            # bytes, not str: compare_digest refuses non-ASCII str, which a client controls
            given = request.headers.get("authorization", "").encode("latin-1")
            if not secrets.compare_digest(given, f"Bearer {api_key}".encode()):
                return error(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                             type_="authentication_error", code="invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": list(models.engines()), "in_flight": inflight["n"]}

    @app.get("/v1/models")
    async def list_models() -> dict:
        loaded = models.engines()
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "tinyllama"}
            | ({"context_length": loaded[name].context_length} if name in loaded else {})
            for name in models.names()]}

    # ---- running a generation -------------------------------------------------------------------
    def admit() -> JSONResponse | None:
        with inflight_lock:
            if inflight["n"] >= max_queue:
                busy = error(429, f"server busy: {max_queue} requests already in flight; retry later",
                             type_="rate_limit_error", code="rate_limit_exceeded")
                busy.headers["retry-after"] = "1"       # the openai client waits this long, then retries
                return busy
            inflight["n"] += 1
        return None

    def release() -> None:
        with inflight_lock:
            inflight["n"] -= 1

    class Run:
        """A generation started in a worker thread at once (so its slot is always released),
        read as async text deltas; leaving the read early cancels it at the next token."""

        def __init__(self, stream: TextStream, engine: Engine, name: str | None) -> None:
            self.stream, self.engine, self.name = stream, engine, name
            self.loop = asyncio.get_running_loop()
            self.queue: asyncio.Queue = asyncio.Queue()
            self.cancel = threading.Event()
            threading.Thread(target=self._work, daemon=True, name="generate").start()

        def _put(self, item: tuple) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

        def _work(self) -> None:
            try:
                with models.lock:
                    for delta in self.stream:
                        if self.cancel.is_set():
                            self.stream.generation.close()
                            break
                        self._put(("delta", delta))
                self._put(("done", None))
            except Exception as e:          # surfaced to the request, never kills the server
                self._put(("error", e))
            finally:
                models.release(self.name)
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
        base = {"id": rid, "created": created, "model": run.engine.model_id}

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

    def check_max_tokens(n: int, engine: Engine) -> None:
        # Over the context length the engine says so; below it, the server's own cap applies.
        if n > max_tokens_limit and max_tokens_limit < engine.context_length:
            raise RequestError(f"max_tokens {n} exceeds this server's limit of {max_tokens_limit}", "max_tokens")

    def not_found(e: ModelNotFound) -> JSONResponse:
        if e.malformed:
            return error(400, str(e), param="model", code="invalid_model")
        return error(404, str(e), param="model", code="model_not_found")

    async def acquire(name: str | None) -> Engine:
        """models.acquire off the event loop (it may load); if this request is cancelled meanwhile,
        the engine it gets is released when the load ends, so it is never held for ever."""
        job = asyncio.ensure_future(asyncio.to_thread(models.acquire, name))
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            job.add_done_callback(lambda j: j.cancelled() or j.exception() or models.release(name))
            raise

    async def handle(req: SamplingFields, kind: str, max_tokens: int | None, build) -> Any:
        """build(engine, sampling) -> TextStream; max_tokens None: as many as fit, up to the cap."""
        if req.n != 1:
            return error(400, "only n=1 is supported", param="n")
        try:
            models.check(req.model)             # before taking a slot: a bad name is never queued
        except ModelNotFound as e:
            return not_found(e)
        busy = admit()
        if busy is not None:
            return busy
        engine = None
        try:
            engine = await acquire(req.model)
            n = max_tokens if max_tokens is not None else min(max_tokens_limit, engine.context_length)
            check_max_tokens(n, engine)
            stream = build(engine, req.sampling(n))
        except (RequestError, ChatFormatError) as e:
            if engine is not None:
                models.release(req.model)
            release()
            return error(400, str(e), param=getattr(e, "param", None))
        except ModelNotFound as e:              # removed from the folder since the check
            release()
            return not_found(e)
        except BaseException:
            if engine is not None:
                models.release(req.model)
            release()
            raise
        wants_usage = bool((req.stream_options or {}).get("include_usage"))
        return await serve(Run(stream, engine, req.model), kind, req.stream, wants_usage)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Any:
        return await handle(req, "text", req.max_tokens, lambda engine, s: engine.complete(req.prompt, s))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest) -> Any:
        messages = [m.model_dump() for m in req.messages]
        return await handle(req, "chat", req.max_new, lambda engine, s: engine.chat(messages, s))

    return app
