"""torch's intra-op threads in a process where llama.cpp runs the models.

llama.cpp and torch parallelise with one OpenMP runtime (torch's libgomp, which llama.cpp's
library then shares). Where llama.cpp runs every model of an engine, torch only does per-token
math on one row of logits (a softmax, a draw: tens of microseconds on one thread). Yet once a
torch op has run on several threads, the runtime manages more threads than there are cores and
from then on spins only briefly at every barrier before sleeping, llama.cpp's included: each
llama.cpp step of a batching engine on 2 cores took a fifth or more longer, for the rest of the
process's life (`python -m bench.torch_threads`). So while an engine whose models all run in
llama.cpp is open, and none with a PyTorch model, torch has one intra-op thread:

    engine_opened(uses_torch=False)    # torch: 1 thread
    engine_closed(uses_torch=False)    # the process's own count again, once no such engine is open
    for_torch_compute()                # a PyTorch model, before it computes, in whatever thread it runs

torch keeps the count per thread (its OpenMP runtime's), fixed when a thread first runs a
parallel op, from the count last set: threads started later follow it, and a PyTorch model
computing in an older thread restores that thread's count with for_torch_compute.
"""

from __future__ import annotations

import threading

import torch

_lock = threading.Lock()
_process_threads: int | None = None   # torch's count before the first change; None: never changed
_open = {False: 0, True: 0}           # open engines, by whether a PyTorch model is among their models


def engine_opened(uses_torch: bool) -> None:
    with _lock:
        _open[uses_torch] += 1
        _apply()


def engine_closed(uses_torch: bool) -> None:
    with _lock:
        _open[uses_torch] = max(0, _open[uses_torch] - 1)
        _apply()


def _apply() -> None:
    global _process_threads
    lower = _open[False] > 0 and _open[True] == 0
    if _process_threads is None:
        if not lower:
            return                    # nothing was lowered: the count stays the user's
        _process_threads = torch.get_num_threads()
    torch.set_num_threads(1 if lower else _process_threads)


def for_torch_compute() -> None:
    """Gives the calling thread the process's count back where it was lowered, before a PyTorch
    model computes here (a thread that first ran torch ops beside llama.cpp would keep 1)."""
    if _process_threads is not None and torch.get_num_threads() != _process_threads:
        torch.set_num_threads(_process_threads)
