"""Continuous batching: many generations share one model, one forward pass per step.

    pool = SlotPool(batch_runner(backend, n_slots=4))   # serve.batch_runners: PyTorch or llama.cpp
    lease = pool.lease(prompt_ids)                       # a Backend; takes a free slot on first use
    gen = generate(lease, prompt_ids, sampling, release=lease.release)   # in any thread
    for token in gen: ...                                # runs in step with the other slots' generations
    pool.spawn(lambda: consume(gen))                     # or on the compute thread, parked between steps

Each slot is one sequence of the model's KV cache (a llama.cpp seq_id, a row of our batched
cache). A lease is a Backend, so generate() and speculative decoding work on it unchanged:
`lease.logits(context, n_last)` joins the pool's next step. A step gathers what every busy slot
asked for (its uncached suffix: one token when decoding, k + 1 when verifying a draft, a chunk of
a new prompt) and runs it as one forward pass, on one compute thread for the whole process (see
_ComputeThread), once every busy slot has asked or the first request has waited about a step
(at most `max_wait`: a slot busy elsewhere, drafting or decoding text, holds nobody up for long). Prompts go in chunks of at most `runner.step_tokens` tokens, after the
decoding rows, so a long prompt never stalls the streams already running. A free slot keeps its
KV cache: a later request whose prompt starts with most of it (a chat's earlier turns, the same
question) gets that slot and computes only the rest.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import greenlet
import torch

from tinyllama.inference.backends import Backend, check_context, common_prefix
from tinyllama.inference.interface import argmax


@dataclass
class Row:
    """One slot's part of a step: `tokens` at positions [start, start + len(tokens)) of sequence
    `slot`; logits wanted at the last `n_out` of them (0 for a prompt chunk that is not the last).
    argmax: only the id of the largest logit is wanted (n_out 1: greedy decoding's next token)."""

    slot: int
    tokens: list[int]
    start: int
    n_out: int
    argmax: bool = False


class BatchRunner:
    """Runs steps for a SlotPool: the model with a KV cache of `n_slots` sequences."""

    n_slots: int
    vocab_size: int
    context_length: int          # per slot
    step_tokens: int             # most tokens one step may carry
    name: str = "model"
    precision: str = ""

    def run(self, rows: list[Row]) -> list[torch.Tensor | int | None]:
        """One forward pass over every row -> per row its logits (n_out, vocab) float32 (None when
        n_out is 0); for an `argmax` row, the id of its largest logit where the runner finds it in
        place (else its logits, and the pool takes the argmax)."""
        raise NotImplementedError

    def forget(self, slot: int, start: int) -> None:
        """Drops the cached positions >= start of sequence `slot`."""
        raise NotImplementedError

    def vocab_fingerprint(self) -> str | None:
        return None

    def close(self) -> None:
        pass


def _held_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


@dataclass(eq=False)
class _Request:
    slot: "_Slot"
    context: list[int]
    n_last: int
    argmax: bool = False                  # only the largest logit's id is wanted (n_last 1)
    since: float = field(default_factory=time.perf_counter)
    logits: torch.Tensor | int | None = None        # the answer: an int for an argmax request
    error: BaseException | None = None
    done: bool = False
    # How the request's generation waits for its answer (_submit sets one of the two). A thread:
    # on `answered`, held until the step that answers it releases it, so the thread wakes already
    # free of the compute lock (no second wait for that lock after each answer). A generation on
    # the compute thread (_ComputeThread.spawn): parked, and the answering step puts `waiter`
    # back on that thread's ready list.
    answered: threading.Lock | None = None
    waiter: greenlet.greenlet | None = None


@dataclass(eq=False)
class _Slot:
    index: int
    cached: list[int] = field(default_factory=list)   # the tokens at positions [0, len) the runner holds
    kv_len: int = 0                                   # positions held, >= len(cached) after a trim
    busy: bool = False
    last_used: int = 0                                # when it was last released (0: never used)


class _ComputeThread:
    """The one thread that runs every pool's steps, in this process. Not the generations' own
    threads: llama.cpp and torch parallelise each pass with OpenMP, and OpenMP teams started from
    several live threads slow each other down several-fold on a few cores, so all batched
    compute goes through this one. Its lock also guards every pool's slots and requests.

    Generations may run here too (spawn): each as a greenlet that parks where a thread would
    block (waiting for its step's logits or for a free slot) and is resumed once it is answered,
    all of them between two steps. A token then costs no thread wake-up and no lock hand-off:
    the step's answers are resumed in turn, each samples and asks again, and the next step
    starts. A generation in a thread of its own (the CLI, the demo) waits as a thread does.

    Each waiting thread waits on something of its own (this thread on `cond` and a pool's slot
    queue on `changed`, conditions of that lock; a request's thread on the request's `answered`
    lock), so that a step wakes the generations it answered and nobody else: with one condition
    for all, each of 8 slots' next request woke every thread already waiting, dozens of wake-ups
    per step beside llama.cpp's two threads."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)      # the compute thread's: work may be ready
        self.pools: list[SlotPool] = []
        self.thread: threading.Thread | None = None
        self.hub: greenlet.greenlet | None = None       # the thread's own greenlet: its loop
        self.ready: deque[greenlet.greenlet | Callable[[], None]] = deque()   # to start or resume

    def _start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, daemon=True, name="tinyllama-batch")
            self.thread.start()

    def add(self, pool: "SlotPool") -> None:
        with self.cond:
            self.pools.append(pool)
            self._start()

    def spawn(self, work: Callable[[], None]) -> None:
        """Runs work() on this thread, as a greenlet among the generations, from the next round on.
        What it raises is printed (as a thread's would be); the loop goes on."""
        def run() -> None:
            try:
                work()
            except greenlet.GreenletExit:
                raise
            except BaseException:           # not into the loop, which would stop every pool
                traceback.print_exc(file=sys.stderr)
        with self.cond:
            self.ready.append(run)
            self._start()
            self.cond.notify()

    def in_generation(self) -> bool:
        """Whether the caller is a generation spawned here (so it must park, not block)."""
        return self.hub is not None and greenlet.getcurrent().parent is self.hub

    def park(self) -> None:
        """Suspends the calling generation, with the lock not held, until wake() puts it back."""
        self.hub.switch()

    def wake(self, waiter: greenlet.greenlet) -> None:
        """Resumes a parked generation in the next round (lock held; from any thread)."""
        self.ready.append(waiter)
        self.cond.notify()

    def _loop(self) -> None:
        self.hub = greenlet.getcurrent()
        with self.cond:
            while True:
                if self.ready:
                    self._run_ready()
                    continue
                waits = [(pool._time_to_step(), i) for i, pool in enumerate(self.pools)]
                wait, i = min(waits, default=(float("inf"), -1))
                if wait > 0:
                    self.cond.wait(None if wait == float("inf") else wait)
                    continue
                self.pools[i]._step()

    def _run_ready(self) -> None:
        """One round: each ready generation runs until it parks or ends, with the lock released
        (they take it as threads would, and other threads may take it meanwhile)."""
        ready, self.ready = self.ready, deque()
        self.cond.release()
        try:
            for item in ready:
                (item if isinstance(item, greenlet.greenlet) else greenlet.greenlet(item)).switch()
        finally:
            self.cond.acquire()


_COMPUTE = _ComputeThread()


def _runs(indices: set[int]) -> int:
    """How many runs of consecutive integers `indices` makes ({0, 1, 3}: 2)."""
    return sum(i - 1 not in indices for i in indices)


class SlotPool:
    """`runner.n_slots` sequences of one model, leased to generations and batched step by step."""

    def __init__(self, runner: BatchRunner, max_wait: float = 0.02) -> None:
        """max_wait: the longest a ready request waits for the other busy slots' (seconds)."""
        self.runner, self.max_wait = runner, max_wait
        self.slots = [_Slot(i) for i in range(runner.n_slots)]
        self._cond = _COMPUTE.cond                 # the compute thread's
        self._changed = threading.Condition(_COMPUTE.lock)   # a slot freed, the pool closing
        self._pending: list[_Request] = []
        self._queue: deque[object] = deque()     # requests waiting for a slot, in arrival order
        self._parked: list[greenlet.greenlet] = []   # generations on the compute thread in that queue
        self._last_step = self._last_end = 0.0
        self._stepping = self._closed = False
        self._uses = 0
        self.steps = 0                    # forward passes run, the rows they carried, their seconds
        self.rows = 0
        self.run_seconds = 0.0
        _COMPUTE.add(self)

    @property
    def busy(self) -> int:
        return sum(s.busy for s in self.slots)

    def lease(self, prompt: Sequence[int] = ()) -> "Lease":
        return Lease(self, list(prompt))

    @staticmethod
    def spawn(work: Callable[[], None]) -> None:
        """Runs work() (a generation's loop over leases of this or any pool) on the compute
        thread, as a greenlet that parks while it waits (see _ComputeThread)."""
        _COMPUTE.spawn(work)

    # ---- slots ---------------------------------------------------------------------------------
    def _acquire(self, prompt: list[int]) -> _Slot:
        """A free slot (waiting in arrival order for one): the one whose cache holds the most of `prompt` when that is
        at least half of it (the same conversation, a shared system prompt), else the least
        recently used, so an unrelated prompt does not overwrite a cache that a later request
        may want (what llama-server's --slot-prompt-similarity does). Between slots otherwise
        alike, one next to the busy ones: llama.cpp puts only consecutive sequences of a
        per-slot KV cache in one pass."""
        with self._cond:
            ticket = object()              # first come, first served: no request waits for ever
            self._queue.append(ticket)
            while self._queue[0] is not ticket or all(s.busy for s in self.slots):
                if self._closed:
                    self._queue.remove(ticket)
                    raise RuntimeError(f"{self.runner.name} was closed")
                self._wait_for_change()
            self._queue.popleft()
            self._notify_change()          # the next in the queue may take another free slot
            free = [s for s in self.slots if not s.busy]
            busy = {s.index for s in self.slots if s.busy}
            best = max(free, key=lambda s: (common_prefix(s.cached, prompt), -_runs(busy | {s.index}), -s.last_used))
            if 2 * common_prefix(best.cached, prompt) < len(prompt):
                best = min(free, key=lambda s: (_runs(busy | {s.index}), s.last_used))
            best.busy = True
            return best

    def _release(self, slot: _Slot) -> None:
        with self._cond:
            slot.busy = False
            self._uses += 1
            slot.last_used = self._uses
            self._notify_change()         # a request waiting for a slot may take it
            self._cond.notify()           # the others' requests may now be all there are

    def _wait_for_change(self) -> None:
        """self._changed.wait() (lock held once), parking instead in a generation on the compute thread."""
        if not _COMPUTE.in_generation():
            self._changed.wait()
            return
        self._parked.append(greenlet.getcurrent())
        self._cond.release()
        try:
            _COMPUTE.park()
        finally:
            self._cond.acquire()

    def _notify_change(self) -> None:
        """Wakes whoever waits on the pool: a slot freed, the queue moved, the pool closing (lock held)."""
        self._changed.notify_all()
        for waiter in self._parked:
            _COMPUTE.wake(waiter)
        self._parked.clear()

    # ---- steps (run by the compute thread) -------------------------------------------------------
    def _submit(self, request: _Request) -> torch.Tensor | int:
        if _COMPUTE.in_generation():
            request.waiter = greenlet.getcurrent()
        else:
            request.answered = _held_lock()   # looked up per request, so that a test can count the answers
        with self._cond:
            if self._closed:
                raise RuntimeError(f"{self.runner.name} was closed")
            self._pending.append(request)
            if len(self._pending) == 1 or self._time_to_step() == 0.0:
                self._cond.notify()       # the first starts the wait for the others; the last ends it
        # answered once, by the step that answers it (or close); no step runs before a parked
        # generation has switched away: steps run on this same thread
        if request.waiter is not None:
            _COMPUTE.park()
        else:
            request.answered.acquire()
        if request.error is not None:
            raise request.error
        return request.logits

    def _time_to_step(self) -> float:
        """0 when every busy slot has asked (or the oldest request has waited long enough)."""
        if not self._pending:
            return float("inf")
        if len({r.slot.index for r in self._pending}) >= self.busy:
            return 0.0
        # A slot left out now costs a step of its own later, about as long as this one on a
        # memory-bound model: worth waiting up to a step (at most max_wait) for it.
        # Counted from when the request came or the last step ended, whichever is later: the
        # slots served by that step are only now coming back with their next request.
        patience = min(self.max_wait, max(0.002, self._last_step))
        return max(self._pending[0].since, self._last_end) + patience - time.perf_counter()

    def _step(self) -> None:
        """Runs one step with the lock held on entry and exit, released around the forward pass."""
        plan = self._plan()
        for request, row in plan:
            slot = request.slot
            if slot.kv_len > row.start:
                self.runner.forget(slot.index, row.start)
            del slot.cached[row.start:]
            slot.kv_len = row.start
        t0 = time.perf_counter()
        self._stepping = True
        self._cond.release()
        try:
            outputs, error = self.runner.run([row for _, row in plan]), None
        except Exception as e:            # the requests in this step fail; the pool keeps serving
            outputs, error = None, e
        finally:
            self._cond.acquire()
            self._stepping = False
        self._last_end = time.perf_counter()
        self._last_step = self._last_end - t0
        self.run_seconds += self._last_step
        self.steps += 1
        self.rows += len(plan)
        for i, (request, row) in enumerate(plan):
            slot = request.slot
            if error is not None:
                self.runner.forget(slot.index, 0)      # what the failed pass left is unknown
                slot.cached, slot.kv_len = [], 0
                request.error, request.done = error, True
                continue
            slot.cached.extend(row.tokens)
            slot.kv_len = len(slot.cached)
            if row.n_out:
                out = outputs[i]
                if request.argmax and isinstance(out, torch.Tensor):
                    out = argmax(out[0])
                request.logits, request.done = out, True
        self._pending = [r for r in self._pending if not r.done]
        for request, _ in plan:
            if request.done:
                self._answer(request)
        if self._closed:
            self._notify_change()         # close() waits for this step

    @staticmethod
    def _answer(request: _Request) -> None:
        """Lets the request's generation go on (lock held)."""
        if request.waiter is not None:
            _COMPUTE.wake(request.waiter)
        else:
            request.answered.release()

    def _plan(self) -> list[tuple[_Request, Row]]:
        """The rows of the next step: the shortest suffixes first (decoding, verification), then
        prompt chunks while the step has room; at least one row."""
        budget = self.runner.step_tokens
        plan = []
        todo = []
        for request in self._pending:
            context, slot = request.context, request.slot
            start = min(common_prefix(slot.cached, context), len(context) - request.n_last)
            todo.append((len(context) - start, start, request))
        for n, start, request in sorted(todo, key=lambda t: t[0]):
            take = min(n, budget)
            if take < n and n - take < request.n_last:     # the logits wanted all come in the last chunk
                take = n - request.n_last
            if take <= 0 or (plan and take < min(n, 16)):  # no room left worth a row
                continue
            tokens = request.context[start:start + take]
            last = take == n
            plan.append((request, Row(request.slot.index, tokens, start, request.n_last if last else 0,
                                      request.argmax and last)))
            budget -= take
            if budget <= 0:
                break
        return plan

    def close(self) -> None:
        """Stops stepping (a step under way finishes first), fails the requests still waiting
        and frees the runner."""
        with self._cond:
            self._closed = True
            _COMPUTE.pools.remove(self)
            while self._stepping:
                self._changed.wait()
            for request in self._pending:
                request.error, request.done = RuntimeError(f"{self.runner.name} was closed"), True
                self._answer(request)
            self._pending = []
            self._notify_change()
        self.runner.close()


class Lease(Backend):
    """A generation's slot in a SlotPool, as a Backend; the slot is taken on the first call (so
    waiting for one happens in the generation's thread) and given back by release()."""

    def __init__(self, pool: SlotPool, prompt: list[int]) -> None:
        runner = pool.runner
        self.pool, self.prompt = pool, prompt
        self.name, self.precision = runner.name, runner.precision
        self.vocab_size, self.context_length = runner.vocab_size, runner.context_length
        self._slot: _Slot | None = None
        self._released = False

    @property
    def slot(self) -> _Slot:
        if self._slot is None:
            if self._released:
                raise RuntimeError("this lease was released")
            self._slot = self.pool._acquire(self.prompt)
        return self._slot

    def logits(self, context: Sequence[int], n_last: int = 1) -> torch.Tensor:
        check_context(context, n_last, self.context_length, self.name)
        return self.pool._submit(_Request(self.slot, list(context), n_last))

    def argmax(self, context: Sequence[int]) -> int:
        """Greedy decoding's next token, found by the runner where the pass left the logits."""
        check_context(context, 1, self.context_length, self.name)
        return self.pool._submit(_Request(self.slot, list(context), 1, argmax=True))

    def cached_tokens(self) -> int:
        return len(self.slot.cached)

    def trim(self, n: int) -> None:
        # the positions themselves are dropped by the next step that uses this slot
        del self.slot.cached[n:]

    def vocab_fingerprint(self) -> str | None:
        return self.pool.runner.vocab_fingerprint()

    def release(self) -> None:
        """Gives the slot back (its cache stays for a later prompt with the same prefix); idempotent."""
        if self._slot is not None and not self._released:
            self.pool._release(self._slot)
        self._released = True

    close = release
