"""Continuous batching (serve.batching): sequences of different lengths decoded together in one
forward pass per step, each giving what it gives alone (greedy, seeded sampling, speculative),
on our PyTorch model and on a GGUF in llama.cpp; prompts in chunks; slots freed and reused;
and the server with --parallel under concurrent streaming clients."""

from __future__ import annotations

import threading

import httpx
import pytest
import torch
from test_generate import noisy_pair, random_llama

from tinyllama import KVCache, ModelConfig, Step
from tinyllama.inference.backends import TorchBackend
from serve.batch_runners import TorchRunner, batch_runner
from serve.batching import SlotPool
from tinyllama.inference.draft_policy import Fixed
from tinyllama.inference.generate import SamplingParams, generate

PROMPTS = [[1, 450, 6593, 310, 2834, 338], [1, 306], [1, 15043, 29892, 590, 1024, 338, 263, 2107, 29889, 13] * 3,
           [1, 1576, 4996, 17354], [1, 822, 1667, 7295, 13, 1678], [1, 29871, 29896, 29892, 29871, 29906]]


ON = ["threads", "compute thread", "both"]


def run_together(pool: SlotPool, prompts, sampling: SamplingParams, draft_pool: SlotPool | None = None,
                 k: int = 3, on: str = "threads") -> list[list[int]]:
    """Each prompt generated at once on leases of the pool(s): each in a thread of its own, or
    each spawned on the compute thread (SlotPool.spawn, all in one round), or every other one."""
    out: list = [None] * len(prompts)
    errors = []
    spawned = [on == "compute thread" or (on == "both" and i % 2 == 1) for i in range(len(prompts))]
    barrier = threading.Barrier(spawned.count(False)) if not all(spawned) else None
    done = threading.Semaphore(0)

    def work(i: int) -> None:
        try:
            lease = pool.lease(prompts[i])
            draft = draft_pool.lease(prompts[i]) if draft_pool is not None else None
            if not spawned[i]:
                barrier.wait()

            def release():
                lease.release()
                if draft is not None:
                    draft.release()
            out[i] = list(generate(lease, prompts[i], sampling, drafter=draft, draft_policy=Fixed(k),
                                   release=release))
        except Exception as e:       # surfaced below, not lost in the thread
            errors.append(e)
        finally:
            done.release()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts)) if not spawned[i]]
    with pool._cond:                 # the spawned ones start in one round, as the threads do
        for i in range(len(prompts)):
            if spawned[i]:
                pool.spawn(lambda i=i: work(i))
    for t in threads:
        t.start()
    for _ in prompts:
        assert done.acquire(timeout=120), "a generation did not end"
    assert not errors, errors
    return out


@pytest.fixture(scope="module")
def target_and_draft():
    return noisy_pair(ModelConfig.from_name("tinyllama-debug"))


def test_per_row_positions_equal_separate_forwards():
    model = random_llama(ModelConfig.from_name("tinyllama-debug"), 0)
    seqs = [torch.randint(0, model.config.vocab_size, (n,)) for n in (5, 9, 3, 7)]
    cache = KVCache.for_model(model, batch_size=4, max_seq_len=32)
    with torch.inference_mode():
        for row, s in enumerate(seqs):                          # each prompt into its own cache row
            model.hidden_states(s[None, :-1], cache, Step.span(0, len(s) - 1, row=row))
        order = [2, 0, 3]                                       # a subset of rows, out of order
        last = torch.stack([seqs[r][-1:] for r in order])                   # (3, 1)
        positions = torch.tensor([len(seqs[r]) - 1 for r in order])         # (3,)
        batched = model.hidden_states(last, cache, Step.per_row(order, positions))[:, 0]
        for j, r in enumerate(order):
            alone = model.hidden_states(seqs[r][None])[0, -1]
            torch.testing.assert_close(batched[j], alone, atol=1e-5, rtol=1e-5)
        run = [0, 1]                                            # consecutive rows: read as a view, not gathered
        step = Step.per_row(run, torch.tensor([len(seqs[r]) - 1 for r in run]))
        assert isinstance(step.rows, slice)
        together = model.hidden_states(torch.stack([seqs[r][-1:] for r in run]), cache, step)[:, 0]
        for j, r in enumerate(run):
            torch.testing.assert_close(together[j], model.hidden_states(seqs[r][None])[0, -1], atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="one token per row"):
            model.hidden_states(torch.zeros(2, 2, dtype=torch.long), cache, Step.per_row([0, 1], positions[:2]))


@pytest.mark.parametrize("on", ON)
def test_torch_slots_batch_and_equal_alone(target_and_draft, llama2_tokenizer, on):
    target, _ = target_and_draft
    backend = TorchBackend(target, llama2_tokenizer, pack=False)
    greedy = SamplingParams(max_new_tokens=20)
    seeded = SamplingParams(max_new_tokens=16, temperature=0.9, top_k=40, seed=7)
    alone = [list(generate(backend, p, greedy)) for p in PROMPTS]
    sampled_alone = [list(generate(backend, p, seeded)) for p in PROMPTS[:4]]
    runner = TorchRunner(backend, n_slots=4)
    runner.step_tokens = 16                    # the 30-token prompt goes in chunks between decode steps
    pool = SlotPool(runner)
    try:
        assert run_together(pool, PROMPTS, greedy, on=on) == alone      # 6 requests on 4 slots: two wait
        assert pool.rows > 1.5 * pool.steps                      # steps carried several sequences
        assert pool.busy == 0
        assert run_together(pool, PROMPTS[:4], seeded, on=on) == sampled_alone
    finally:
        pool.close()


def backend_alone(model, tok):
    return TorchBackend(model, tok, pack=False)


@pytest.mark.parametrize("on", ON)
def test_speculative_decoding_in_slots_is_exact(target_and_draft, llama2_tokenizer, on):
    target, draft = target_and_draft
    greedy = SamplingParams(max_new_tokens=20)
    alone = [list(generate(backend_alone(target, llama2_tokenizer), p, greedy)) for p in PROMPTS[:4]]
    pools = [SlotPool(batch_runner(TorchBackend(m, llama2_tokenizer, pack=False), 4)) for m in (target, draft)]
    try:
        assert run_together(pools[0], PROMPTS[:4], greedy, draft_pool=pools[1], on=on) == alone
    finally:
        for p in pools:
            p.close()


def test_a_free_slot_keeps_its_prefix_and_is_reused(target_and_draft, llama2_tokenizer):
    target, _ = target_and_draft
    runner = TorchRunner(TorchBackend(target, llama2_tokenizer, pack=False), n_slots=2)
    carried = []
    run = runner.run
    runner.run = lambda rows: carried.append([len(r.tokens) for r in rows]) or run(rows)
    pool = SlotPool(runner)
    try:
        chat = PROMPTS[2]
        first = list(generate(lease := pool.lease(chat), chat, max_new_tokens=4, release=lease.release))
        carried.clear()
        follow_up = chat + first + [13, 1576]          # the next turn of the same conversation
        list(generate(lease := pool.lease(follow_up), follow_up, max_new_tokens=2, release=lease.release))
        assert carried[0] == [len(follow_up) - len(chat) - 3]    # only what the slot did not hold
        gen = generate(lease := pool.lease(chat), chat, max_new_tokens=4, release=lease.release)
        gen.close()                                    # closed before it started: the slot is still given back
        assert pool.busy == 0
    finally:
        pool.close()


def test_a_new_prompt_takes_a_free_slot_next_to_the_busy_ones(target_and_draft, llama2_tokenizer):
    """llama.cpp passes only consecutive sequences of a per-slot KV cache together, so between
    free slots that are otherwise alike the pool takes one next to the busy slots (the least
    recently used of those)."""
    target, _ = target_and_draft
    pool = SlotPool(TorchRunner(TorchBackend(target, llama2_tokenizer, pack=False), n_slots=4))
    try:
        first, second = pool.lease(PROMPTS[0]), pool.lease(PROMPTS[1])
        assert (first.slot.index, second.slot.index) == (0, 1)
        first.release()
        third = pool.lease(PROMPTS[3])
        assert third.slot.index == 2         # 0 and 2 both border slot 1; 3 would not: 2 was used less recently
        fourth = pool.lease(PROMPTS[4])
        assert fourth.slot.index in (0, 3)   # either keeps 1, 2 and it one run
    finally:
        pool.close()


def test_a_stop_id_gives_the_slot_back_at_once(target_and_draft, llama2_tokenizer):
    """A reply that ends on its end-of-turn id frees its slot as the text ends (regression: the
    slot stayed taken until garbage collection, and a loaded server ran out of slots)."""
    from tinyllama.inference.generate import TextStream

    target, _ = target_and_draft
    pool = SlotPool(TorchRunner(TorchBackend(target, llama2_tokenizer, pack=False), n_slots=1))
    try:
        first = list(generate(lease := pool.lease(PROMPTS[0]), PROMPTS[0], max_new_tokens=3, release=lease.release))
        for stop_ids in ([first[0]], [first[2]]):          # the first token, a later one
            gen = generate(lease := pool.lease(PROMPTS[0]), PROMPTS[0], max_new_tokens=8, stop_ids=stop_ids,
                           release=lease.release)
            stream = TextStream(gen, llama2_tokenizer)
            text = list(stream)
            assert pool.busy == 0 and stream.finish_reason == "stop", (text, stream.finish_reason)
    finally:
        pool.close()


@pytest.mark.parametrize("on", ON)
def test_requests_waiting_for_a_slot_get_one_in_arrival_order(target_and_draft, llama2_tokenizer, on):
    """...whether they wait as threads or parked on the compute thread, or some of each."""
    target, _ = target_and_draft
    pool = SlotPool(TorchRunner(TorchBackend(target, llama2_tokenizer, pack=False), n_slots=1))
    holder = pool.lease(PROMPTS[0])
    holder.slot                                    # the only slot is taken
    order, threads, done = [], [], threading.Semaphore(0)
    try:
        for i in range(4):
            def wait_for_slot(i=i):
                lease = pool.lease(PROMPTS[1])
                lease.slot
                order.append(i)
                lease.release()
                done.release()
            if on == "compute thread" or (on == "both" and i % 2):
                pool.spawn(wait_for_slot)
            else:
                threads.append(threading.Thread(target=wait_for_slot))
                threads[-1].start()
            while len(pool._queue) < i + 1:       # queued before the next one arrives
                threading.Event().wait(0.001)
        holder.release()
        for _ in range(4):
            assert done.acquire(timeout=10)
        assert order == [0, 1, 2, 3]
    finally:
        pool.close()


def test_closing_a_pool_waits_for_its_step_and_fails_what_waits(target_and_draft, llama2_tokenizer):
    import time

    target, _ = target_and_draft
    runner = TorchRunner(TorchBackend(target, llama2_tokenizer, pack=False), n_slots=2)
    events, run, close, started = [], runner.run, runner.close, threading.Event()
    runner.run = lambda rows: (started.set(), time.sleep(0.3), events.append("step ended"), run(rows))[3]
    runner.close = lambda: (events.append("runner closed"), close())
    pool = SlotPool(runner)
    errors = []

    def ask():
        try:
            list(generate(lease := pool.lease(PROMPTS[0]), PROMPTS[0], max_new_tokens=50, release=lease.release))
        except RuntimeError as e:
            errors.append(str(e))
    t = threading.Thread(target=ask)
    t.start()
    assert started.wait(10)                       # the first step is under way
    pool.close()
    t.join(10)
    assert events[:2] == ["step ended", "runner closed"]      # never freed under a running step
    assert errors and "closed" in errors[0]
    with pytest.raises(RuntimeError, match="closed"):
        pool.lease(PROMPTS[0]).logits(PROMPTS[0])


def test_closing_a_pool_fails_the_generations_parked_on_the_compute_thread(target_and_draft, llama2_tokenizer,
                                                                          capsys):
    """One waits for a step (that waits for a busy slot to ask), one for a slot; close() resumes
    both with the pool's error, and the compute thread goes on serving, past work that raised too."""
    import time

    target, _ = target_and_draft
    pool = SlotPool(TorchRunner(TorchBackend(target, llama2_tokenizer, pack=False), n_slots=2), max_wait=60)
    pool._last_step = 60.0                        # a step waits up to a minute for the busy slots
    holder = pool.lease(PROMPTS[1])
    holder.slot                                   # busy, never asking
    errors, done = [], threading.Semaphore(0)

    def ask():
        try:
            list(generate(lease := pool.lease(PROMPTS[0]), PROMPTS[0], max_new_tokens=50, release=lease.release))
        except RuntimeError as e:
            errors.append(str(e))
        finally:
            done.release()
    pool.spawn(ask)                               # takes the other slot, asks, waits for the holder
    pool.spawn(ask)                               # waits for a slot
    while len(pool._pending) < 1 or len(pool._parked) < 1:
        time.sleep(0.001)
    pool.close()
    assert done.acquire(timeout=10) and done.acquire(timeout=10), "a parked generation was never resumed"
    assert len(errors) == 2 and all("closed" in e for e in errors) and pool.steps == 0

    SlotPool.spawn(lambda: 1 / 0)                 # printed, as an uncaught error in a thread is
    again = SlotPool(TorchRunner(TorchBackend(target, llama2_tokenizer, pack=False), n_slots=2))
    try:
        assert run_together(again, PROMPTS[:2], SamplingParams(max_new_tokens=5), on="compute thread") == [
            list(generate(backend_alone(target, llama2_tokenizer), p, max_new_tokens=5)) for p in PROMPTS[:2]]
    finally:
        again.close()
    assert "ZeroDivisionError" in capsys.readouterr().err


def test_a_failed_step_fails_its_requests_only(target_and_draft, llama2_tokenizer):
    target, _ = target_and_draft
    runner = TorchRunner(TorchBackend(target, llama2_tokenizer, pack=False), n_slots=2)
    pool = SlotPool(runner)
    run, calls = runner.run, []

    def flaky(rows):
        calls.append(rows)
        if len(calls) == 2:
            raise RuntimeError("llama_decode failed (1: no room in the KV cache)")
        return run(rows)
    runner.run = flaky
    try:
        with pytest.raises(RuntimeError, match="no room"):
            list(generate(lease := pool.lease(PROMPTS[0]), PROMPTS[0], max_new_tokens=5, release=lease.release))
        assert pool.busy == 0
        again = list(generate(lease := pool.lease(PROMPTS[0]), PROMPTS[0], max_new_tokens=5, release=lease.release))
        assert again == list(generate(backend_alone(target, llama2_tokenizer), PROMPTS[0], max_new_tokens=5))
    finally:
        pool.close()


def test_a_step_wakes_only_the_generations_it_answered(target_and_draft, llama2_tokenizer, monkeypatch):
    """Each logits() call waits once and is woken once, by the step that answers it: a
    generation already waiting is not woken when another slot asks, and wakes without waiting
    again for the pool's lock (every wake-up of a Python thread takes CPU from llama.cpp's
    threads between and during passes)."""
    import serve.batching as batching

    target, _ = target_and_draft
    pool = SlotPool(TorchRunner(TorchBackend(target, llama2_tokenizer, pack=False), n_slots=6))
    wait, cond_wakes, answers = threading.Condition.wait, [], []

    def counted_wait(cond, timeout=None):
        woke = wait(cond, timeout)
        if threading.current_thread().name.startswith("gen-"):
            cond_wakes.append(threading.current_thread().name)
        return woke

    class CountedLock:
        """The request's answer lock, counting who releases it."""

        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.lock.acquire()

        def acquire(self) -> bool:
            return self.lock.acquire()

        def release(self) -> None:
            answers.append(threading.current_thread().name)
            self.lock.release()                 # a second release of one answer would raise
    monkeypatch.setattr(threading.Condition, "wait", counted_wait)
    monkeypatch.setattr(batching, "_held_lock", CountedLock)
    calls, lock, submit = [], threading.Lock(), pool._submit

    def counted_submit(request):               # every request a lease makes (logits or argmax)
        with lock:
            calls.append(threading.current_thread().name)
        return submit(request)
    pool._submit = counted_submit

    def work(i: int) -> None:
        lease = pool.lease(PROMPTS[i])
        list(generate(lease, PROMPTS[i], max_new_tokens=12, release=lease.release))
    threads = [threading.Thread(target=work, args=(i,), name=f"gen-{i}") for i in range(len(PROMPTS))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        monkeypatch.undo()
        pool.close()
    assert len(calls) == 12 * len(PROMPTS)
    assert len(answers) == len(calls) and set(answers) == {"tinyllama-batch"}, "an answer released twice or elsewhere"
    assert not cond_wakes, f"{len(cond_wakes)} wake-ups of generations on the pool's conditions"


def test_generations_on_the_compute_thread_park_and_wake_no_thread(target_and_draft, llama2_tokenizer, monkeypatch):
    """Spawned generations are resumed by the compute thread itself: no request's answer lock
    is ever taken or released, and the work runs on that thread."""
    import serve.batching as batching

    target, _ = target_and_draft
    answers, names = [], set()

    class CountedLock:
        def acquire(self) -> bool:
            answers.append("acquire")
            return True

        def release(self) -> None:
            answers.append("release")
    monkeypatch.setattr(batching, "_held_lock", CountedLock)
    submit = batching.SlotPool._submit
    monkeypatch.setattr(batching.SlotPool, "_submit", lambda pool, request: (
        names.add(threading.current_thread().name), submit(pool, request))[1])
    pool = SlotPool(TorchRunner(TorchBackend(target, llama2_tokenizer, pack=False), n_slots=4))
    greedy = SamplingParams(max_new_tokens=8)
    try:
        got = run_together(pool, PROMPTS[:4], greedy, on="compute thread")
    finally:
        pool.close()
    assert got == [list(generate(backend_alone(target, llama2_tokenizer), p, greedy)) for p in PROMPTS[:4]]
    assert answers == [] and names == {"tinyllama-batch"}
    assert pool.rows >= 3 * pool.steps            # in lockstep: the steps carry (nearly) all four


@pytest.mark.llamacpp
def test_gguf_runner_finds_greedy_tokens_where_the_pass_left_the_logits(tmp_path, target_and_draft,
                                                                       llama2_tokenizer):
    """An argmax row (a greedy generation's step) gets the id of its largest logit and no copy of
    them; a row in the same pass that wants logits gets them, as it would without the other."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by make setup")
    from quantize.export import write_gguf
    from tinyllama import save_checkpoint
    from tinyllama.inference.backends import GGUFBackend
    from tinyllama.inference.interface import argmax
    from serve.batch_runners import LlamaCppRunner
    from serve.batching import Row

    save_checkpoint(target_and_draft[0], llama2_tokenizer, tmp_path / "m")
    runner = LlamaCppRunner(GGUFBackend(write_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32"), n_ctx=128), n_slots=2)

    def step(greedy: bool) -> list:
        for slot in (0, 1):
            runner.forget(slot, 0)
        return runner.run([Row(1, PROMPTS[1], 0, 2), Row(0, PROMPTS[0], 0, 1, argmax=greedy)])
    try:
        logits, token = step(True)
        logits_alone, row = step(False)
    finally:
        runner.close()
    assert isinstance(token, int) and token == argmax(row[0])
    assert logits.shape == (2, runner.vocab_size) and torch.equal(logits, logits_alone)


@pytest.mark.llamacpp
def test_gguf_slots_batch_in_one_llama_decode_and_equal_alone(tmp_path, target_and_draft, llama2_tokenizer):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by make setup")
    from quantize.export import write_gguf
    from tinyllama import save_checkpoint
    from tinyllama.inference.backends import GGUFBackend
    from serve.batch_runners import LlamaCppRunner

    save_checkpoint(target_and_draft[0], llama2_tokenizer, tmp_path / "m")
    backend = GGUFBackend(write_gguf(tmp_path / "m", tmp_path / "m.gguf", "f32"), n_ctx=128)
    greedy = SamplingParams(max_new_tokens=20)
    alone = [list(generate(backend, p, greedy)) for p in PROMPTS]
    runner = LlamaCppRunner(backend, n_slots=4, step_tokens=16)      # the long prompt goes in chunks
    decodes = []
    run = runner.run
    runner.run = lambda rows: decodes.append(len(rows)) or run(rows)
    pool = SlotPool(runner)
    try:
        assert run_together(pool, PROMPTS, greedy) == alone
        assert max(decodes) >= 3 and sum(decodes) > 1.5 * len(decodes)   # one llama_decode, many sequences
    finally:
        pool.close()
        backend.close()


def test_server_with_slots_streams_concurrent_clients(target_and_draft, llama2_tokenizer):
    openai = pytest.importorskip("openai")
    from test_serve import start_server

    from serve.engine import Engine
    from serve.server import create_app

    target, _ = target_and_draft
    engine = Engine(TorchBackend(target, llama2_tokenizer, pack=False), llama2_tokenizer, "tiny", parallel=3)
    url, server = start_server(create_app(engine, max_queue=8))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    questions = ["What is 2+2?", "Name a colour.", "Say hi.", "Count to three.", "Why is the sky blue?"]

    def ask(q: str, stream: bool) -> str:
        kw = dict(model="tiny", messages=[{"role": "user", "content": q}], max_tokens=12, stream=stream)
        if not stream:
            return client.chat.completions.create(**kw).choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw) if c.choices)
    try:
        alone = [ask(q, stream=False) for q in questions]
        together: list = [None] * len(questions)
        threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(questions[i], True)))
                   for i in range(len(questions))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert together == alone
        assert engine.pool.rows > engine.pool.steps            # some steps carried several requests
        health = httpx.get(f"{url}/health").json()
        slots = health["slots"]["tiny"]
        assert (slots["total"], slots["busy"]) == (3, 0) and slots["rows"] > slots["steps"] > 0
    finally:
        server.should_exit = True
        engine.close()
