"""torch's intra-op threads while an engine of llama.cpp models is open (tinyllama.inference.threads):
one, in the opening thread and in every thread started after it, so that torch starts no OpenMP
team of its own beside llama.cpp's; the process's count again when a PyTorch model joins or the
engine closes, and in any thread where a PyTorch model computes."""

from __future__ import annotations

import threading

import pytest
import torch

from tinyllama import ModelConfig
from tinyllama.inference import threads
from tinyllama.inference.backends import TorchBackend
from tinyllama.model.model import Llama


@pytest.fixture(autouse=True)
def process_threads(monkeypatch):
    """The process's own count (at least 2, so that lowering shows), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    monkeypatch.setattr(threads, "_process_threads", None)
    monkeypatch.setattr(threads, "_open", {False: 0, True: 0})
    yield max(2, before)
    torch.set_num_threads(before)


def in_new_thread(work=lambda: None) -> int:
    """torch's count in a thread started now, after `work` ran there."""
    seen = []

    def body():
        work()
        seen.append(torch.get_num_threads())
    t = threading.Thread(target=body)
    t.start()
    t.join()
    return seen[0]


def test_an_engine_of_llama_cpp_models_gives_torch_one_thread_until_it_closes(process_threads):
    threads.engine_opened(uses_torch=False)
    assert torch.get_num_threads() == 1 and in_new_thread() == 1
    threads.engine_opened(uses_torch=False)
    threads.engine_closed(uses_torch=False)
    assert in_new_thread() == 1                         # another such engine is still open
    threads.engine_closed(uses_torch=False)
    assert torch.get_num_threads() == process_threads and in_new_thread() == process_threads


def test_a_pytorch_model_among_the_open_engines_keeps_the_process_count(process_threads):
    threads.engine_opened(uses_torch=False)
    threads.engine_opened(uses_torch=True)
    assert torch.get_num_threads() == process_threads and in_new_thread() == process_threads
    threads.engine_closed(uses_torch=True)
    assert in_new_thread() == 1


def test_engines_with_pytorch_models_alone_leave_the_users_count(process_threads):
    torch.set_num_threads(3)                            # a user's own choice, never lowered
    threads.engine_opened(uses_torch=True)
    threads.engine_closed(uses_torch=True)
    assert torch.get_num_threads() == 3


def test_a_pytorch_model_computing_in_a_lowered_thread_gets_the_process_count(process_threads):
    threads.engine_opened(uses_torch=False)
    torch.manual_seed(0)
    backend = TorchBackend(Llama(ModelConfig.from_name("tinyllama-debug")), pack=False)
    assert in_new_thread(lambda: backend.logits([1, 2, 3])) == process_threads
    threads.engine_closed(uses_torch=False)


@pytest.mark.llamacpp
def test_the_engine_lowers_for_a_gguf_and_not_for_a_pytorch_target(process_threads, tiny_chat_checkpoint, tmp_path):
    pytest.importorskip("llama_cpp")
    from quantize.export import write_gguf
    from serve.engine import Engine
    from tinyllama.inference.generate import SamplingParams

    gguf = write_gguf(tiny_chat_checkpoint, tmp_path / "m.gguf", "f32")
    engine = Engine.load(gguf, parallel=2)
    try:
        assert not engine.uses_torch
        reply = in_new_thread(lambda: "".join(engine.chat([{"role": "user", "content": "Hi"}],
                                                          SamplingParams(max_new_tokens=4, temperature=0.7))))
        assert reply == 1                               # a request's thread, as the server starts one
    finally:
        engine.close()
    engine.close()                                      # a second close counts nothing
    assert in_new_thread() == process_threads
    with_torch = Engine.load(tiny_chat_checkpoint, draft=gguf)
    try:
        assert with_torch.uses_torch and in_new_thread() == process_threads
    finally:
        with_torch.close()
