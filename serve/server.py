"""An OpenAI-compatible HTTP server over an Engine or a ModelSource such as ModelDir (FastAPI):

    GET  /health                 {"status": "ok", "models": [...], "in_flight": n}
    GET  /v1/models              the model(s) served
    POST /v1/completions         prompt -> text            (stream: server-sent events)
    POST /v1/chat/completions    messages -> assistant turn, through the model's chat format

    app = create_app(Engine.load(path), api_key="sk-...", max_queue=8)
    app = create_app(ModelDir("models/"))          # the request's `model` picks one, loaded on demand

Generation runs in a worker thread per request, one at a time, for an engine with one KV cache;
for one with slots (Engine(parallel=N)), batched with the others on the compute thread. At most
`max_queue` requests may be in flight (running or waiting), more get HTTP 429. A streaming
client that goes away stops its generation at the next token. Limits: request bodies over
`max_body_bytes` get 413 (on Content-Length, or as a chunked body arrives), `max_tokens` over
`max_tokens_limit` or the context length gets 400. With one Engine any `model` name is accepted (OpenAI clients send
their own); with a ModelDir it must be one the folder lists (404 otherwise, 400 for a path).
Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}} with a 4xx status (a
500 for a bug); the server keeps serving. The fields a request may carry are listed in
serve.protocol.FIELDS; any other is a 400 naming it, never silently dropped. Extensions to the
OpenAI fields: `top_k`, `repetition_penalty` in requests; `stats` (tokens/s, speculative
acceptance) in responses.

Logprobs (chat `logprobs`/`top_logprobs`, completions' integer `logprobs` and `echo`) are the
model's own log-softmax of its raw logits, before temperature or cuts (serve.logprobs), for
every generated token, the end-of-turn token included; `echo` with `max_tokens` 0 returns the
prompt's token logprobs alone (the first null), which is how lm-eval scores log-likelihoods.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections import deque
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinyllama.errors import UserError
from tinyllama.inference.generate import TextStream

from .engine import Engine, ModelNotFound, ModelSource, RequestError
from .logprobs import TokenTexts, chat_logprobs, completion_logprobs
from .protocol import ChatRequest, CompletionRequest, RequestFields


class OneModel:
    """A single Engine as a ModelSource: every name maps to it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def turn(self, engine: Engine):
        return engine.turn()

    def names(self) -> list[str]:
        return [self.engine.model_id]

    def engines(self) -> dict[str, Engine]:
        return {self.engine.model_id: self.engine}

    def check(self, name: str | None) -> None:
        pass

    def acquire(self, name: str | None) -> Engine:
        return self.engine

    acquire_loaded = acquire

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


# ---- admission control: how many requests may be in flight -----------------------------------

class Admission:
    """At most `max_queue` requests in flight (running or waiting for the model); more get 429."""

    def __init__(self, max_queue: int) -> None:
        self.max_queue, self.in_flight = max_queue, 0
        self._lock = threading.Lock()

    def admit(self) -> JSONResponse | None:
        """None when the request may proceed (pair with release()), else the 429 to send."""
        with self._lock:
            if self.in_flight >= self.max_queue:
                busy = error(429, f"server busy: {self.max_queue} requests already in flight; retry later",
                             type_="rate_limit_error", code="rate_limit_exceeded")
                busy.headers["retry-after"] = "1"       # the openai client waits this long, then retries
                return busy
            self.in_flight += 1
        return None

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1


# ---- one request's generation -----------------------------------------------------------------

class Run:
    """A generation started at once (so its slot is always released; Engine.start: on the compute
    thread for a batching engine, else in a worker thread), read as async text deltas; leaving
    the read early cancels it at the next token. The engine (and the admission slot) are
    released when the generation ends, however it ends."""

    def __init__(self, stream: TextStream, engine: Engine, name: str | None, models: ModelSource,
                 admission: Admission) -> None:
        self.stream, self.engine, self.name = stream, engine, name
        self.models, self.admission = models, admission
        self.loop = asyncio.get_running_loop()
        self.cancel = threading.Event()
        self._arrived: deque[tuple] = deque()       # (kind, value) handed over, read on the loop
        self._wake: asyncio.Future | None = None    # set when something arrives for a waiting read
        engine.start(self._work)

    def _put(self, item: tuple) -> None:
        self.loop.call_soon_threadsafe(self._arrive, item)

    def _arrive(self, item: tuple) -> None:
        """On the event loop: keeps the item and wakes the read waiting for it (if any). A bare
        future, not an asyncio.Queue: one token costs the loop one wake-up and nothing else."""
        self._arrived.append(item)
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def stop(self) -> None:
        """The reader went away: the generation stops at its next token, the read ends now."""
        self.cancel.set()
        self._arrive(("gone", None))

    async def arrived(self) -> list[tuple]:
        """Everything handed over since the last call, (kind, value) in order, waiting until
        there is something: ("delta", (text, tokens so far)), ("error", exception), ("done" |
        "gone", None). Several deltas when the loop was busy as they came."""
        while not self._arrived:
            self._wake = self.loop.create_future()
            await self._wake
        items = list(self._arrived)
        self._arrived.clear()
        return items

    def _work(self) -> None:
        scored = self.stream.generation.token_logprobs
        try:
            with self.models.turn(self.engine):
                for delta in self.stream:
                    if self.cancel.is_set():
                        self.stream.generation.close()
                        break
                    self._put(("delta", (delta, len(scored))))     # the tokens this text came from
            self._put(("done", None))
        except Exception as e:          # surfaced to the request, never kills the server
            self._put(("error", e))
        finally:
            self.models.release(self.name)
            self.admission.release()

    async def deltas(self) -> AsyncIterator[tuple[str, int]]:
        """(text delta, how many generated tokens it comes from in all)."""
        try:
            while True:
                for kind, value in await self.arrived():
                    if kind == "delta":
                        yield value
                    elif kind == "error":
                        raise value
                    else:
                        return
        finally:
            self.cancel.set()


# ---- response bodies, OpenAI-shaped -------------------------------------------------------------

def usage(stream: TextStream) -> dict:
    s = stream.stats
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.generated_tokens,
            "total_tokens": s.prompt_tokens + s.generated_tokens}


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class Reply:
    """What a response carries besides the generated text, as its request asked: the prompt
    echoed before it (completions' echo, its text and logprobs) and each token's logprobs, in
    the endpoint's shape. Streamed, each piece carries the tokens since the last one."""

    def __init__(self, run: Run, req: RequestFields, kind: str) -> None:
        self.kind, self.top = kind, req.logprob_count
        self.gen, self.tok = run.stream.generation, run.engine.tokenizer
        self.echo: str | None = None
        if req.echoes:
            prompt = req.one_prompt()
            self.echo = prompt if isinstance(prompt, str) else self.tok.decode(prompt)
        self.sent = 0                             # generated tokens whose logprobs went out
        self.offset = len(self.echo or "")        # where the next generated token's text starts

    def piece(self, text: str, upto: int | None = None) -> tuple[str, dict | None]:
        """(text, logprobs) of the next piece: `text`, after the echoed prompt the first time, and
        the logprobs of the generated tokens up to `upto` (None: all so far)."""
        echo, self.echo = self.echo, None
        if self.top is None:
            return (echo or "") + text, None
        gen, n_prompt = self.gen, len(self.gen.prompt)
        scored = gen.token_logprobs[self.sent:upto]
        texts = TokenTexts(self.tok, gen.prompt + [s.token for s in gen.token_logprobs], n_prompt)
        first, self.sent = n_prompt + self.sent, self.sent + len(scored)
        if self.kind == "chat":
            return text, chat_logprobs(texts, scored, first)
        logprobs, self.offset = completion_logprobs(texts, scored, first, self.offset)
        if echo is not None:
            head, _ = completion_logprobs(texts, [None, *(gen.prompt_logprobs or [])], 0)
            logprobs = {k: head[k] + logprobs[k] for k in logprobs}
        return (echo or "") + text, logprobs


def choice(kind: str, text: str | None, finish: str | None, logprobs: dict | None = None,
           first: bool = False) -> dict:
    """One streamed choice: a chat delta or a completion's text."""
    if kind == "chat":
        delta: dict = {} if text is None else {"content": text}
        if first:
            delta["role"] = "assistant"
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}


def response_head(run: Run, kind: str) -> dict:
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(12)}"
    return {"id": rid, "created": int(time.time()), "model": run.engine.model_id}


def sse_text(kind: str, head: dict) -> Callable[[str], str]:
    """text -> the line sse() writes for a chunk (`head` and one choice) carrying that text alone:
    the JSON around the text is rendered once per response, not once per token."""
    marker = "\ue000"
    before, after = sse({**head, "choices": [choice(kind, marker, None)]}).rsplit(json.dumps(marker), 1)
    return lambda text: before + json.dumps(text) + after


class EventStream(Response):
    """The streamed response, server-sent events: a role chunk (chat), a chunk per delta, the
    finish chunk with stats (and usage when asked for), [DONE]; an error after the headers went
    out is reported in-band, as OpenAI does. A client that goes away (http.disconnect) stops the
    generation at its next token.

    Its own ASGI app rather than a StreamingResponse over async generators: one coroutine takes
    what the run handed over and writes it with one `send`, so a token costs the event loop one
    wake-up, one JSON string and one socket write, which is what the per-token Python of a small
    model's server comes down to (bench/RESULTS.md, the servers side by side)."""

    media_type = "text/event-stream"

    def __init__(self, run: Run, reply: Reply, wants_usage: bool) -> None:
        self.run, self.reply, self.wants_usage = run, reply, wants_usage
        self.status_code, self.background = 200, None
        self.init_headers()

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            await self._stream(send)
        finally:
            watcher.cancel()
            self.run.cancel.set()

    async def _watch(self, receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.run.stop()

    async def _stream(self, send) -> None:
        run, reply, kind = self.run, self.reply, self.reply.kind
        base = {**response_head(run, kind), "object": "chat.completion.chunk" if kind == "chat" else "text_completion"}
        if kind == "chat":
            await send_events(send, [sse({**base, "choices": [choice(kind, "", None, first=True)]})], more=True)
        text_chunk = sse_text(kind, base)
        while True:
            events, ended = [], False
            try:
                for what, value in await run.arrived():
                    if what == "delta":
                        text, logprobs = reply.piece(*value)
                        events.append(text_chunk(text) if logprobs is None else
                                      sse({**base, "choices": [choice(kind, text, None, logprobs)]}))
                    elif what == "error":
                        raise value
                    elif what == "gone":
                        return
                    else:
                        events += [self._last(base), "data: [DONE]\n\n"]
                        ended = True
            except Exception as e:
                events.append(sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}}))
                ended = True
            await send_events(send, events, more=not ended)
            if ended:
                return

    def _last(self, base: dict) -> str:
        """The finish chunk: what is left (an unsent echo, the stop token's logprob), the finish
        reason, stats, and usage when asked for."""
        stream, kind = self.run.stream, self.reply.kind
        text, logprobs = self.reply.piece("")
        last = {**base, "stats": stream.stats.as_dict(),
                "choices": [choice(kind, text or None, stream.finish_reason, logprobs)]}
        if self.wants_usage:
            last["usage"] = usage(stream)
        return sse(last)


async def send_events(send, events: list[str], more: bool) -> None:
    await send({"type": "http.response.body", "body": "".join(events).encode(), "more_body": more})


async def whole_response(run: Run, reply: Reply) -> dict:
    """The non-streamed response: all the text, logprobs as asked, usage and stats."""
    kind, stream = reply.kind, run.stream
    text, logprobs = reply.piece("".join([d async for d, _ in run.deltas()]))
    if kind == "chat":
        ch = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
              "finish_reason": stream.finish_reason}
    else:
        ch = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": stream.finish_reason}
    return {**response_head(run, kind), "object": "chat.completion" if kind == "chat" else "text_completion",
            "choices": [ch], "usage": usage(stream), "stats": stream.stats.as_dict()}


def not_found(e: ModelNotFound) -> JSONResponse:
    if e.malformed:
        return error(400, str(e), param="model", code="invalid_model")
    return error(404, str(e), param="model", code="model_not_found")


# ---- the app -------------------------------------------------------------------------------------

def create_app(models: Engine | ModelSource, api_key: str | None = None, max_queue: int = 8,
               max_body_bytes: int = 1 << 20, max_tokens_limit: int = 4096) -> FastAPI:
    if isinstance(models, Engine):
        models = OneModel(models)
    app = FastAPI(title="tinyllama", description=__doc__)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    admission = Admission(max_queue)
    _add_error_handlers(app, max_body_bytes)
    if api_key:
        app.add_middleware(ApiKey, api_key=api_key)
    _add_model_routes(app, models, admission)
    _add_generation_routes(app, Requests(models, admission, max_tokens_limit))
    return app


def _add_error_handlers(app: FastAPI, max_body_bytes: int) -> None:
    """Every error OpenAI-shaped: validation and bad JSON 400, 413 for big bodies, 500 for bugs."""
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


class ApiKey:
    """401 for a /v1/ request without `Authorization: Bearer <api_key>`. Plain ASGI, not
    @app.middleware("http"): that one relays every streamed chunk through a task of its own."""

    def __init__(self, app, api_key: str) -> None:
        # bytes, not str: compare_digest refuses non-ASCII str, which a client controls
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                return await error(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                                   type_="authentication_error", code="invalid_api_key")(scope, receive, send)
        await self.app(scope, receive, send)


def _add_model_routes(app: FastAPI, models: ModelSource, admission: Admission) -> None:
    @app.get("/health")
    async def health() -> dict:
        slots = {name: state for name, e in models.engines().items() if (state := e.slots()) is not None}
        return {"status": "ok", "models": list(models.engines()), "in_flight": admission.in_flight} | (
            {"slots": slots} if slots else {})

    @app.get("/v1/models")
    async def list_models() -> dict:
        loaded = models.engines()
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "tinyllama"}
            | ({"context_length": loaded[name].context_length} if name in loaded else {})
            for name in models.names()]}


def _add_generation_routes(app: FastAPI, requests: "Requests") -> None:
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Any:
        return await requests.handle(req, "text", req.max_tokens, lambda engine, s: engine.complete(
            req.one_prompt(), s, logprobs=req.logprob_count, echo=req.echo))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest) -> Any:
        return await requests.handle(req, "chat", req.max_new, lambda engine, s: engine.chat(
            req.chat_messages(), s, logprobs=req.logprob_count))


class Requests:
    """A generation request from its admission to its response: a slot, the model, the sampling
    settings, the stream; every early exit gives back what it took."""

    def __init__(self, models: ModelSource, admission: Admission, max_tokens_limit: int) -> None:
        self.models, self.admission, self.max_tokens_limit = models, admission, max_tokens_limit

    async def handle(self, req: RequestFields, kind: str, max_tokens: int | None, build) -> Any:
        """build(engine, sampling) -> TextStream; max_tokens None: as many as fit, up to the cap."""
        try:
            req.check()                         # fields not acted on, shapes: before anything is taken
        except RequestError as e:
            return error(400, str(e), param=e.param, code=getattr(e, "code", None))
        try:
            self.models.check(req.model)        # before taking a slot: a bad name is never queued
        except ModelNotFound as e:
            return not_found(e)
        busy = self.admission.admit()
        if busy is not None:
            return busy
        started = await self._start(req, max_tokens, build)
        if isinstance(started, JSONResponse):
            return started
        stream, engine = started
        run = Run(stream, engine, req.model, self.models, self.admission)
        reply = Reply(run, req, kind)
        if req.stream:
            return EventStream(run, reply, req.wants_usage)
        return await whole_response(run, reply)

    async def _start(self, req: RequestFields, max_tokens: int | None, build):
        """(stream, engine), or the 4xx response after giving back the slot and the model."""
        engine = None
        try:
            engine = await self._acquire(req.model)
            n = max_tokens if max_tokens is not None else min(self.max_tokens_limit, engine.context_length)
            self._check_max_tokens(n, engine)
            return build(engine, req.sampling(n)), engine
        except ModelNotFound as e:              # removed from the folder since the check
            self.admission.release()
            return not_found(e)
        except UserError as e:                  # bad settings, prompt or chat format: a 400
            if engine is not None:
                self.models.release(req.model)
            self.admission.release()
            return error(400, str(e), param=getattr(e, "param", None))
        except BaseException:
            if engine is not None:
                self.models.release(req.model)
            self.admission.release()
            raise

    def _check_max_tokens(self, n: int, engine: Engine) -> None:
        # Over the context length the engine says so; below it, the server's own cap applies.
        if n > self.max_tokens_limit and self.max_tokens_limit < engine.context_length:
            raise RequestError(f"max_tokens {n} exceeds this server's limit of {self.max_tokens_limit}",
                               "max_tokens")

    async def _acquire(self, name: str | None) -> Engine:
        """The engine, loaded already, or models.acquire off the event loop (it may load); if this
        request is cancelled meanwhile, the engine it gets is released when the load ends, so it
        is never held for ever."""
        engine = self.models.acquire_loaded(name)
        if engine is not None:                  # no thread hop for a model that is loaded
            return engine
        job = asyncio.ensure_future(asyncio.to_thread(self.models.acquire, name))
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            job.add_done_callback(lambda j: j.cancelled() or j.exception() or self.models.release(name))
            raise
