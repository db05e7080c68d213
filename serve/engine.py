"""One loaded model (and optional draft) behind a lock, for the CLI, the server and the demo.

    engine = Engine.load("out/gguf/tinyllama-19m-chat-Q4_K_M.gguf", draft=None)
    stream = engine.chat([{"role": "user", "content": "Hi"}], max_tokens=64, temperature=0.7)
    for delta in stream: ...                      # text deltas; stream.stats, stream.finish_reason

A model holds one KV cache, so generations run one at a time (`engine.lock`); the server
bounds how many requests may wait for it.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tinyllama.backends import Backend, load_backend
from tinyllama.chat import encode_chat
from tinyllama.generate import TextStream, check_same_vocabulary, generate
from tinyllama.tokenizer import Tokenizer


class RequestError(ValueError):
    """A request that cannot be served as asked (too long, bad parameters); an HTTP 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class Sampling:
    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=list)


class Engine:
    def __init__(self, target: Backend, tokenizer: Tokenizer, model_id: str, draft: Backend | None = None,
                 num_draft: int = 4) -> None:
        if draft is not None:
            check_same_vocabulary(target, draft)       # refuse a mismatched draft at load, not per request
        self.target, self.draft, self.tokenizer = target, draft, tokenizer
        self.model_id = model_id
        self.num_draft = num_draft
        self.lock = threading.Lock()

    @classmethod
    def load(cls, model: str | os.PathLike, draft: str | os.PathLike | None = None, num_draft: int = 4,
             n_ctx: int = 2048) -> "Engine":
        target, tok = load_backend(model, n_ctx=n_ctx)
        draft_backend = load_backend(draft, n_ctx=n_ctx)[0] if draft else None
        return cls(target, tok, Path(model).name.removesuffix(".gguf"), draft_backend, num_draft)

    @property
    def context_length(self) -> int:
        return self.target.context_length

    # ---- requests ----------------------------------------------------------------------------
    def complete(self, prompt: str, sampling: Sampling, speculative: bool | None = None) -> TextStream:
        """Plain text continuation of `prompt` (BOS added). speculative None: use the draft
        when one is loaded."""
        return self._stream(self.tokenizer.encode(prompt), sampling, speculative)

    def chat(self, messages: list[dict], sampling: Sampling, speculative: bool | None = None) -> TextStream:
        """The assistant's next turn, prompt built by the one chat format."""
        ids, _ = encode_chat(self.tokenizer, messages, add_generation_prompt=True)
        return self._stream(ids, sampling, speculative)

    def _stream(self, ids: list[int], s: Sampling, speculative: bool | None) -> TextStream:
        room = self.context_length - len(ids)
        if room < 1:
            raise RequestError(f"the prompt has {len(ids)} tokens; the context length is {self.context_length}",
                               "messages")
        if s.max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {s.max_tokens}", "max_tokens")
        if s.max_tokens > self.context_length:
            raise RequestError(f"max_tokens {s.max_tokens} exceeds the context length {self.context_length}",
                               "max_tokens")
        if s.temperature < 0 or s.temperature > 2:
            raise RequestError(f"temperature must be in [0, 2], got {s.temperature}", "temperature")
        if s.top_p is not None and not 0 < s.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {s.top_p}", "top_p")
        if s.top_k is not None and s.top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {s.top_k}", "top_k")
        if s.repetition_penalty <= 0:
            raise RequestError(f"repetition_penalty must be > 0, got {s.repetition_penalty}", "repetition_penalty")
        if speculative and self.draft is None:
            raise RequestError("speculative decoding was asked for but no draft model is loaded", "speculative")
        draft = self.draft if speculative is None or speculative else None
        gen = generate(self.target, ids, max_new_tokens=min(s.max_tokens, room), temperature=s.temperature,
                       top_k=s.top_k or None, top_p=s.top_p, repetition_penalty=s.repetition_penalty,
                       stop_ids=[self.tokenizer.eos_id], seed=s.seed, draft_model=draft, num_draft=self.num_draft)
        return TextStream(gen, self.tokenizer, stop=list(s.stop))

    def close(self) -> None:
        self.target.close()
        if self.draft is not None:
            self.draft.close()


# ---- shared by the CLIs (python -m serve, python -m serve.generate) ------------------------------

def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True, help="checkpoint directory (PyTorch) or .gguf file (llama.cpp)")
    ap.add_argument("--draft", help="a draft model with the same vocabulary (directory or .gguf), for "
                                    "speculative decoding")
    ap.add_argument("--num-draft", type=int, default=4, help="tokens drafted per step (default: %(default)s)")
    ap.add_argument("--n-ctx", type=int, default=2048,
                    help="context length for GGUF models, at most the trained one (default: %(default)s)")


def load_engine(args: argparse.Namespace) -> Engine | None:
    """Engine.load from the CLI arguments; prints one line and returns None on bad input."""
    from tinyllama.checkpoint import CheckpointError

    try:
        return Engine.load(args.model, args.draft, args.num_draft, n_ctx=args.n_ctx)
    except (FileNotFoundError, ValueError, CheckpointError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None
