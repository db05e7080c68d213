"""What the OpenAI-compatible endpoints read from a request body, in one place.

    req = ChatRequest.model_validate(body); req.check()     # RequestError (an HTTP 400) naming the field

Types are checked by pydantic, ranges of the sampling settings by SamplingParams, and the rest
here. A field this server does not act on is refused with a 400 that names it and lists the
fields it reads (FIELDS), never silently dropped: output that ignored `response_format` or
`logit_bias` would look like an answer to a question that was not asked. A field sent as null,
[] or {} counts as not sent (clients serialise unset fields so). A few fields clients send at
their default are read only at the value that asks for nothing (NEUTRAL: n=1, penalties 0).
Tool calling is not done here, so `tools`, `tool_choice` and `tool` messages are refused.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tinyllama.inference.generate import MAX_TOP_LOGPROBS, SamplingParams

from .engine import RequestError

SHARED = ("model", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop", "stream",
          "stream_options", "user")
FIELDS = {
    "/v1/completions": ("prompt", *SHARED, "logprobs", "echo"),
    "/v1/chat/completions": ("messages", *SHARED, "max_completion_tokens", "logprobs", "top_logprobs"),
}
# fields accepted only at the value that means "nothing asked"
NEUTRAL = {"n": 1, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0}
TOOL_FIELDS = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls")
MESSAGE_ROLES = ("system", "developer", "user", "assistant")


class Unsupported(RequestError):
    """A field, value or message part this server does not act on (OpenAI's code for it)."""

    code = "unsupported_parameter"


def _sent(extra: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (extra or {}).items() if v not in (None, [], {})}


def _without_nulls(data: Any) -> Any:
    """A field sent as null is a field not sent, declared or not (clients serialise unset fields so)."""
    return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


def _neutral(name: str, value: Any) -> bool:
    """Whether `value` is the do-nothing value of `name` (1 and 1.0 alike, never True for 1)."""
    want = NEUTRAL[name]
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value == want


class RequestFields(BaseModel):
    """The fields both endpoints read. Unknown ones are kept (extra="allow") so that check() can
    name them."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)   # NaN would pass every range check

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None          # None: SamplingParams' default (greedy)
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None                   # an end-user id, for the client's own bookkeeping

    path: ClassVar[str] = ""
    _nulls = model_validator(mode="before")(_without_nulls)

    def sampling(self, max_tokens: int) -> SamplingParams:
        """The one sampling object, from the fields the client sent (SamplingError if out of range)."""
        sent = {k: v for k in ("temperature", "top_p", "top_k", "repetition_penalty", "seed")
                if (v := getattr(self, k)) is not None}
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(max_new_tokens=max_tokens, stop=tuple(stop), **sent)

    @property
    def wants_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def check(self) -> None:
        """RequestError for a field sent that this server would not act on."""
        for name, value in _sent(self.model_extra).items():
            if name in TOOL_FIELDS:
                raise Unsupported(f"{name}: tool calling is not supported by this server", name)
            if name in NEUTRAL:
                if not _neutral(name, value):
                    raise Unsupported(f"{name}={value!r} is not supported: only {name}={NEUTRAL[name]}", name)
                continue
            raise Unsupported(f"{name} is not supported by this server; {self.path} reads "
                              f"{', '.join(FIELDS[self.path])}, and {self._neutral_text()}", name)
        unknown = set(_sent(self.stream_options)) - {"include_usage"}
        if unknown:
            raise Unsupported(f"stream_options.{min(unknown)} is not supported; only include_usage is",
                              "stream_options")

    @staticmethod
    def _neutral_text() -> str:
        return f"{', '.join(NEUTRAL)} only at their defaults ({', '.join(map(str, NEUTRAL.values()))})"

    @property
    def logprob_count(self) -> int | None:
        """Alternatives per token the response reports with each token's logprob; None: no logprobs."""
        return None

    @property
    def echoes(self) -> bool:
        """Whether the response starts with the prompt (its text and logprobs)."""
        return False


class CompletionRequest(RequestFields):
    """POST /v1/completions. `prompt`: a string or token ids (used as given: no BOS added), or a
    list of one of those (what lm-eval sends); `logprobs`: the legacy integer (alternatives per
    token, 0-20); `echo`: the prompt's text and logprobs before the completion's."""

    path: ClassVar[str] = "/v1/completions"
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int = 16
    logprobs: int | None = Field(None, strict=True)
    echo: bool = False

    @property
    def logprob_count(self) -> int | None:
        return self.logprobs

    @property
    def echoes(self) -> bool:
        return self.echo

    def check(self) -> None:
        super().check()
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}", "logprobs")
        self.one_prompt()

    def one_prompt(self) -> str | list[int]:
        """The prompt as text or ids; a batch of several is refused (one prompt per request)."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) > 1:
                raise Unsupported(f"prompt: a batch of {len(p)} prompts is not supported; send one prompt per "
                                  "request (concurrent requests are batched by the server)", "prompt")
            p = p[0]
        if isinstance(p, list) and not p:
            raise RequestError("prompt: no token ids", "prompt")
        return p


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    _nulls = model_validator(mode="before")(_without_nulls)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Any]


class ChatRequest(RequestFields):
    """POST /v1/chat/completions. `developer` messages are system messages; `content` is a string
    or a list of text parts, joined by newlines; `logprobs` true with `top_logprobs` (0-20)
    alternatives per token."""

    path: ClassVar[str] = "/v1/chat/completions"
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    @property
    def max_new(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
                raise RequestError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}",
                                   "top_logprobs")
            if not self.logprobs:
                raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
        self.chat_messages()

    def chat_messages(self) -> list[dict]:
        """[{"role", "content"}] as the chat templates take them."""
        return [_chat_message(i, m) for i, m in enumerate(self.messages)]


def _chat_message(i: int, m: Message) -> dict:
    if m.role == "tool":
        raise Unsupported(f"messages.{i}: role 'tool' is not supported: this server does not call tools",
                          f"messages.{i}.role")
    extra = next(iter(_sent(m.model_extra)), None)
    if extra is not None:
        raise Unsupported(f"messages.{i}.{extra} is not supported; a message has a role "
                          f"({', '.join(MESSAGE_ROLES)}) and a content", f"messages.{i}.{extra}")
    role = "system" if m.role == "developer" else m.role     # OpenAI's newer name for the system turn
    return {"role": role, "content": _text(i, m.content)}


def _text(i: int, content: str | list[Any]) -> str:
    """A message's text: the string, or its text parts joined by newlines (as vLLM joins them)."""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            what = f"of type {kind!r}" if kind else "without a type"
            raise Unsupported(f"messages.{i}.content.{j}: a content part {what} is not supported; only text "
                              "parts ({\"type\": \"text\", \"text\": ...})", f"messages.{i}.content")
        if not isinstance(part.get("text"), str):
            raise RequestError(f"messages.{i}.content.{j}.text: a text part needs a string 'text'",
                               f"messages.{i}.content")
        extra = next(iter(_sent({k: v for k, v in part.items() if k not in ("type", "text")})), None)
        if extra is not None:
            raise Unsupported(f"messages.{i}.content.{j}.{extra} is not supported", f"messages.{i}.content")
        texts.append(part["text"])
    return "\n".join(texts)
