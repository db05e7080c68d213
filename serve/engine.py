"""One loaded model (and optional draft) behind a lock, for the CLI, the server and the demo.

    engine = Engine.load("out/gguf/tinyllama-19m-chat-Q4_K_M.gguf", draft=None)
    engine = Engine.load("TheBloke/Llama-2-7B-Chat-GGUF:Q4_K_M", draft="TinyLlama/TinyLlama-1.1B-Chat-v1.0",
                         draft_policy=DraftPolicy.parse("auto"))
    stream = engine.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_new_tokens=64, temperature=0.7))
    for delta in stream: ...                      # text deltas; stream.stats, stream.finish_reason

    models = ModelDir("models/")                  # every model in a folder, loaded on demand
    engine = models.acquire("tinyllama-19m-chat-Q4_K_M.gguf"); ...; models.release(name)

Chats are rendered in the target model's own template (tinyllama.formats.chat.apply_chat_template) and
stop on its own end-of-turn ids; a draft only drafts.

    engine = Engine.load(path, parallel=4)        # continuous batching: 4 sequences decode together

With parallel=1 the model holds one KV cache and generations run one at a time (`engine.turn()`:
the engine's lock, or the folder's one lock across its models). With parallel=N each generation
leases one of N slots of a batched KV cache (serve.batching) and every busy slot advances in
one forward pass per step; a request that finds every slot taken waits for one. With a draft,
a request speculates only while at most `speculate_max_busy` slots are busy (the draft policy
wrapped in tinyllama.inference.draft_policy.Capped): with more, a batched step already amortises
the weights' reads, and drafting would only add work. The server bounds how many requests may wait.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
from collections import Counter, OrderedDict
from pathlib import Path

from typing import Callable, ContextManager, Protocol, runtime_checkable

from tinyllama.cli import ModelArgs, add_draft_model_flag, add_model_args
from tinyllama.errors import NotFound, UserError
from tinyllama.formats.chat import apply_chat_template, template_of
from tinyllama.formats.tokenizer import Tokenizer
from tinyllama.inference import threads as torch_threads
from tinyllama.inference.backends import Backend, GGUFBackend, load_backend
from tinyllama.inference.draft_policy import Auto, Capped, DraftPolicy, add_draft_policy_flags, draft_policy_of
from tinyllama.inference.backends import open_drafter
from tinyllama.inference.drafters import Drafter, ModelDrafter
from tinyllama.inference.generate import SamplingParams, TextStream, generate
from tinyllama.runtime import INFERENCE, RuntimeOptions

from .batch_runners import batch_runner
from .batching import SlotPool


class RequestError(UserError):
    """A request that cannot be served as asked (too long, bad parameters); an HTTP 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFound(UserError):
    """A model name a ModelDir does not serve: unknown (HTTP 404) or not a plain name (400)."""

    def __init__(self, message: str, malformed: bool = False) -> None:
        super().__init__(message)
        self.malformed = malformed


class Engine:
    def __init__(self, target: Backend, tokenizer: Tokenizer, model_id: str, draft: Backend | Drafter | None = None,
                 draft_policy: DraftPolicy | None = None, chat_template: str | None = None,
                 parallel: int = 1, speculate_max_busy: int = 1) -> None:
        """draft: a draft model's Backend or any Drafter; draft_policy: one for every request
        (default Auto(), so what it learns about this pair carries across requests); chat_template:
        a built-in template's name or a .jinja file instead of the model's own; parallel: sequences
        decoded together (continuous batching; 1: one generation at a time)."""
        if parallel < 1:
            raise UserError(f"parallel must be >= 1, got {parallel}")
        self.draft = ModelDrafter(draft) if isinstance(draft, Backend) else draft
        if self.draft is not None:
            self.draft.check(target)            # refuse a mismatched draft at load, not per request
        self.target, self.tokenizer, self.model_id = target, tokenizer, model_id
        # the target's template (its name is the fallback's hint); where it came from is printed at start-up
        self.template, self.template_origin = template_of(tokenizer, chat_template, target.name)
        self.lock = threading.Lock()
        self.parallel, self.speculate_max_busy = parallel, speculate_max_busy
        self.pool = self.draft_pool = None
        self.policy = draft_policy or Auto()
        if parallel > 1:
            self.pool = pool = SlotPool(batch_runner(target, parallel))
            self.policy = Capped(self.policy, busy=lambda: pool.busy, max_busy=speculate_max_busy)
            if isinstance(self.draft, ModelDrafter):
                self.draft_pool = SlotPool(batch_runner(self.draft.backend, parallel))
        # torch does only per-token math beside llama.cpp's models, and its threads would slow them
        self.uses_torch = not all(isinstance(m, GGUFBackend) for m in self._models())
        self._open = True
        torch_threads.engine_opened(self.uses_torch)

    @classmethod
    def load(cls, model: str | os.PathLike, draft: str | os.PathLike | None = None,
             draft_policy: DraftPolicy | None = None, n_ctx: int = 2048, dtype: str = "auto",
             n_gpu_layers: int | None = None, revision: str | None = None, chat_template: str | None = None,
             parallel: int = 1, device: str = "auto", runtime: RuntimeOptions = RuntimeOptions()) -> "Engine":
        """model, draft: model references (tinyllama.formats.hub: paths, hub ids, org/name:QUANT); draft
        `ngram` or `ngram:N`: prompt-lookup drafting, no draft model (tinyllama.inference.lookup);
        revision: the hub revision of `model`; dtype: PyTorch models' compute dtype (auto:
        measured, tinyllama.precision); device: where models run (tinyllama.devices: auto, cpu,
        cuda); n_gpu_layers: GGUF layers llama.cpp offloads to a GPU (-1: all; None: all when the
        device is auto or cuda and the build can offload); chat_template: a built-in name or .jinja file
        instead of the model's own template; parallel: sequences decoded together (n_ctx each);
        runtime: kernels, packing and CUDA graphs of PyTorch models (tinyllama.runtime)."""
        target, tok = load_backend(model, device=device, n_ctx=n_ctx, dtype=dtype, n_gpu_layers=n_gpu_layers,
                                   revision=revision, runtime=runtime)
        try:
            drafter = open_drafter(draft, device=device, n_ctx=n_ctx, dtype=dtype,
                                   n_gpu_layers=n_gpu_layers, runtime=runtime) if draft else None
        except BaseException:
            target.close()
            raise
        try:
            return cls(target, tok, target.name, drafter, draft_policy, chat_template, parallel)
        except BaseException:
            target.close()
            if drafter is not None:
                drafter.close()
            raise

    @property
    def context_length(self) -> int:
        return self.target.context_length

    # ---- requests ----------------------------------------------------------------------------
    def complete(self, prompt: str | list[int], sampling: SamplingParams, speculative: bool | None = None,
                 logprobs: int | None = None, echo: bool = False) -> TextStream:
        """Plain text continuation of `prompt`: a text (BOS added as the model does) or token ids
        (used as given). speculative None: use the draft when one is loaded. logprobs: record
        each token's logprob with this many alternatives (None: off); echo: score the prompt's
        tokens too (then max_new_tokens may be 0: the prompt's logprobs alone)."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else self._known_ids(prompt)
        return self._stream(ids, sampling, speculative, logprobs, echo)

    def chat(self, messages: list[dict], sampling: SamplingParams, speculative: bool | None = None,
             logprobs: int | None = None) -> TextStream:
        """The assistant's next turn, the prompt rendered in the target model's own chat template."""
        ids = apply_chat_template(self.tokenizer, messages, add_generation_prompt=True, template=self.template)
        return self._stream(ids, sampling, speculative, logprobs)

    def _known_ids(self, ids: list[int]) -> list[int]:
        bad = next((i for i in ids if not 0 <= i < self.target.vocab_size), None)
        if bad is not None:
            raise RequestError(f"prompt: token id {bad} is not in the vocabulary (0 to {self.target.vocab_size - 1})",
                               "prompt")
        return list(ids)

    def _stream(self, ids: list[int], s: SamplingParams, speculative: bool | None, logprobs: int | None = None,
                echo: bool = False) -> TextStream:
        """The settings were checked when `s` was made; what depends on this model is checked here."""
        if not ids:
            raise RequestError("the prompt is empty (and this model starts none with BOS)", "prompt")
        room = self.context_length - len(ids)
        if room < min(1, s.max_new_tokens):          # scoring a prompt alone needs no room after it
            raise RequestError(f"the prompt has {len(ids)} tokens; the context length is {self.context_length}",
                               "messages")
        if s.max_new_tokens < 1 and not echo:
            raise RequestError(f"max_tokens must be at least 1, got {s.max_new_tokens} (0 only with echo: the "
                               "prompt's logprobs alone)", "max_tokens")
        if s.max_new_tokens > self.context_length:
            raise RequestError(f"max_tokens {s.max_new_tokens} exceeds the context length {self.context_length}",
                               "max_tokens")
        if speculative and self.draft is None:
            raise RequestError("speculative decoding was asked for but no draft model is loaded", "speculative")
        draft = self.draft if speculative is None or speculative else None
        s = s.replace(max_new_tokens=min(s.max_new_tokens, room))
        target, release = self.target, None
        if self.pool is not None:
            target, draft, release = self._leases(ids, draft)
        gen = generate(target, ids, s, stop_ids=list(self.tokenizer.stop_ids), drafter=draft,
                       draft_policy=self.policy, release=release, logprobs=logprobs, prompt_logprobs=echo)
        return TextStream(gen, self.tokenizer)

    def _leases(self, ids: list[int], draft: Drafter | None):
        """A slot of the target's pool (and of the draft model's) as the generation's backends,
        and the callback that gives them back; the slots are taken when generation starts."""
        target = self.pool.lease(ids)
        leases = [target]
        if isinstance(draft, ModelDrafter):                 # prompt lookup holds no slot
            leases.append(self.draft_pool.lease(ids))
            draft = ModelDrafter(leases[-1])

        def release() -> None:
            for lease in leases:
                lease.release()
        return target, draft, release

    def start(self, work: Callable[[], None]) -> None:
        """Runs work(), a loop over one of this engine's streams, where its generations run best:
        with slots, on the compute thread among the other slots' generations (a greenlet that
        parks while it waits for a step: serve.batching); with one KV cache, in a thread of its own."""
        if self.pool is not None:
            self.pool.spawn(work)
        else:
            threading.Thread(target=work, daemon=True, name="generate").start()

    def turn(self):
        """What a generation holds while it runs: the engine's lock with one KV cache, nothing
        with slots (they batch)."""
        return self.lock if self.pool is None else contextlib.nullcontext()

    def slots(self) -> dict | None:
        """For a batching engine: its slots (total, busy) and the steps run so far (how many,
        the sequences they carried, the seconds spent in them); None for one KV cache."""
        if self.pool is None:
            return None
        p = self.pool
        return {"total": self.parallel, "busy": p.busy, "steps": p.steps, "rows": p.rows,
                "step_seconds": round(p.run_seconds, 3)}

    def _models(self) -> list[Backend]:
        """The models it runs: the target, and the draft's unless it drafts without one."""
        return [self.target] + ([self.draft.backend] if isinstance(self.draft, ModelDrafter) else [])

    def close(self) -> None:
        """Frees the models and their slots; closing again does nothing."""
        if not self._open:
            return
        self._open = False
        for pool in (self.pool, self.draft_pool):
            if pool is not None:
                pool.close()
        self.target.close()
        if self.draft is not None:
            self.draft.close()
        torch_threads.engine_closed(self.uses_torch)


@runtime_checkable
class ModelSource(Protocol):
    """What the server asks of the models it serves: one Engine under any name (server.OneModel)
    or every model in a folder (ModelDir). docs/life-of-a-request.md follows a request through it."""

    def names(self) -> list[str]:
        """The names GET /v1/models lists."""

    def engines(self) -> dict[str, "Engine"]:
        """The engines loaded now, by name."""

    def check(self, name: str | None) -> None:
        """Raises ModelNotFound unless a request may name `name` (before it is queued)."""

    def acquire(self, name: str | None) -> "Engine":
        """The engine for `name`, loaded if needed; every acquire is paired with one release."""

    def acquire_loaded(self, name: str | None) -> "Engine | None":
        """acquire(name) when `name` is loaded already (never blocks: no load, no lock held for
        long), else None; a request then calls acquire off the event loop."""

    def release(self, name: str | None) -> None:
        """Gives back what acquire took (a loaded model may then be closed)."""

    def turn(self, engine: "Engine") -> ContextManager:
        """What a generation holds while it runs on `engine` (a lock, or nothing when it batches)."""


class ModelDir:
    """Every model directly in one folder, named by its file or folder name: `*.gguf` files and
    checkpoint folders (config.json + *.safetensors). Loaded on first use; at most `max_loaded`
    stay loaded, the least recently used closed first once no request holds it.

    Names come from clients, so they are confined to the folder: no paths, no hidden names, no
    symlink that leads out of it. One `lock` serialises loads and generations across all the
    models (one CPU, one model computing at a time)."""

    def __init__(self, directory: str | os.PathLike, max_loaded: int = 2, n_ctx: int = 2048, dtype: str = "auto",
                 n_gpu_layers: int | None = None, chat_template: str | None = None, parallel: int = 1,
                 device: str = "auto", runtime: RuntimeOptions = RuntimeOptions()) -> None:
        self.root = Path(directory).resolve()
        if not self.root.is_dir():
            raise NotFound(f"{directory}: not a directory")
        self.max_loaded, self.n_ctx = max_loaded, n_ctx
        self.load_options = {"dtype": dtype, "n_gpu_layers": n_gpu_layers, "chat_template": chat_template,
                             "parallel": parallel, "device": device, "runtime": runtime}
        self.lock = threading.Lock()
        self._state = threading.Lock()          # guards _loaded and _users; held only briefly
        self._loaded: OrderedDict[str, Engine] = OrderedDict()
        self._users: Counter[str] = Counter()

    def _servable(self, name: str) -> bool:
        if name.startswith("."):
            return False
        try:
            real = (self.root / name).resolve(strict=True)
        except (OSError, RuntimeError):         # dangling or looping symlink
            return False
        if not real.is_relative_to(self.root):
            return False
        if real.is_file():
            return name.endswith(".gguf")
        return real.is_dir() and (real / "config.json").is_file() and any(real.glob("*.safetensors"))

    def names(self) -> list[str]:
        return sorted(e.name for e in os.scandir(self.root) if self._servable(e.name))

    def turn(self, engine: Engine):
        """The folder's one lock for an engine with one KV cache; nothing for a batching one."""
        return self.lock if engine.pool is None else contextlib.nullcontext()

    def check(self, name: str | None) -> None:
        """Raises ModelNotFound unless `name` is a model this folder serves."""
        if not name:
            raise ModelNotFound("'model' is required: one of the names GET /v1/models lists", malformed=True)
        if name in (".", "..") or any(c in name for c in "/\\\0") or name.startswith("."):
            raise ModelNotFound(f"invalid model name {name!r}: a name from GET /v1/models, not a path",
                                malformed=True)
        if not self._servable(name):
            raise ModelNotFound(f"model {name!r} does not exist; GET /v1/models lists the models served")

    def engines(self) -> dict[str, Engine]:
        """The models loaded now, least recently used first."""
        with self._state:
            return dict(self._loaded)

    def acquire(self, name: str) -> Engine:
        """The engine for `name`, loading it if needed (blocks while a generation runs); pair with
        release(name). A file that does not load is a RequestError (an HTTP 400), not a crash."""
        self.check(name)
        with self._state:
            if name in self._loaded:
                return self._use(name)
        with self.lock:
            with self._state:
                if name in self._loaded:        # loaded by another request while we waited
                    return self._use(name)
            try:
                engine = Engine.load(self.root / name, n_ctx=self.n_ctx, **self.load_options)
            except Exception as e:              # any unloadable file: the server keeps serving
                reason = str(e).replace(f"{self.root}{os.sep}", "")       # no server paths to clients
                raise RequestError(f"model {name!r} is not a usable model: {reason}", "model") from None
            engine.model_id = name
            with self._state:
                self._loaded[name] = engine
                engine = self._use(name)
                self._evict()
            return engine

    def acquire_loaded(self, name: str) -> Engine | None:
        # no check(name) here: a request checks its name as it comes in, and a name that is not
        # loaded (valid or not) gives None, after which acquire() checks it
        with self._state:
            return self._use(name) if name in self._loaded else None

    def release(self, name: str) -> None:
        with self._state:
            self._users[name] -= 1
            self._evict()

    def close(self) -> None:
        with self._state:
            while self._loaded:
                self._loaded.popitem()[1].close()

    def _use(self, name: str) -> Engine:
        self._loaded.move_to_end(name)
        self._users[name] += 1
        return self._loaded[name]

    def _evict(self) -> None:
        for name in list(self._loaded)[:-self.max_loaded]:
            if self._users[name] == 0:          # one a request holds is closed on its release
                self._loaded.pop(name).close()


# ---- shared by the CLIs (python -m serve, python -m serve.complete) ------------------------------


def add_model_arguments(ap: argparse.ArgumentParser, required: bool = True) -> None:
    add_model_args(ap, required=required)
    add_draft_model_flag(ap, "a draft model with the same vocabulary, for speculative decoding: any form "
                             "--model takes (org/name@REV for a revision); or `ngram[:N]`: prompt lookup, drafts "
                             "copied from where the last N (default 3) tokens occurred before, no model")
    add_draft_policy_flags(ap)


def check_model_arguments(ap: argparse.ArgumentParser, args: argparse.Namespace, *more: str) -> ModelArgs:
    """The model arguments as ModelArgs; ap.error unless they (and the CLI's own counts in `more`)
    are in range and the TINYLLAMA_* variables are valid."""
    for flag in more:
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    try:
        return ModelArgs.from_namespace(args)
    except UserError as e:
        ap.error(str(e))


def load_engine(args: argparse.Namespace, model: ModelArgs) -> Engine | None:
    """Engine.load from the CLI arguments; prints one line and returns None on bad input."""
    try:
        engine = Engine.load(model.model, args.model_draft, draft_policy_of(args), n_ctx=model.ctx_size,
                             dtype=model.dtype, n_gpu_layers=model.n_gpu_layers, device=model.device,
                             revision=model.revision, chat_template=model.chat_template,
                             parallel=getattr(args, "parallel", 1), runtime=model.runtime)
    except (UserError, ImportError) as e:        # ImportError: llama-cpp-python is not installed
        print(f"error: {e}", file=sys.stderr)
        return None
    describe(engine, model.runtime)
    return engine


def describe(engine: Engine, runtime: RuntimeOptions | None = None) -> None:
    """The loaded models, their precision (and the runtime options), the chat template, on stderr."""
    print(f"model: {engine.target.name}: {engine.target.precision}"
          + (f"; {runtime.describe(INFERENCE)}" if runtime else ""), file=sys.stderr, flush=True)
    print(f"chat template: {engine.template_origin}", file=sys.stderr, flush=True)
    if engine.draft is not None:
        print(f"draft: {engine.draft.name}: {engine.draft.precision}; {engine.policy}", file=sys.stderr, flush=True)
    if engine.pool is not None:
        print(f"continuous batching: {engine.parallel} slots of {engine.context_length} tokens",
              file=sys.stderr, flush=True)
