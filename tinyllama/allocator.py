"""Training on a CPU without handing memory back to the kernel every step.

    configure_mkl()            # in a CLI, before torch is imported (python -m pretrain, python -m sft)
    retain_freed_memory()      # at the start of training: glibc keeps large freed blocks
    retain_freed_memory("system")   # --allocator system (TINYLLAMA_ALLOCATOR=system): the C library's defaults

A CPU training step of tinyllama-19m allocates several 65 MB tensors (the (8, 256, 32000)
logits, their log-softmax and gradients). glibc serves any block over 32 MB with mmap and
returns it with munmap when freed, and MKL's own buffer pool does the same with its scratch
memory, so every step the kernel maps its largest buffers afresh and zero-fills them page by
page. With both settings below, most of those page faults and the system time they cost go
away, for some more peak RSS; either alone does little (glibc's alone leaves MKL's pool
faulting). Page faults, system time, step time and peak RSS with and without are measured by
bench.allocator (`python -m bench.allocator`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4        # glibc's mallopt parameters (malloc.h)
# free memory kept at the top of the heap: the most mallopt's int takes. 1 GiB was too little: a
# tinyllama-19m step frees ~1.1 GB at once, which glibc then trimmed and faulted back in.
RETAIN_BYTES = 2**31 - 1


def configure_mkl() -> None:
    """MKL_DISABLE_FAST_MM=1 unless the environment says otherwise: MKL then takes its scratch
    memory from malloc (which retain_freed_memory keeps) instead of a pool it unmaps. MKL reads
    it once, when torch loads it: call this before `import torch`."""
    os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")


def retain_freed_memory(allocator: str = "retain") -> bool:
    """Tells glibc to serve large blocks from the heap (no mmap) and to keep up to RETAIN_BYTES
    of freed memory instead of trimming it. Returns whether it applied: only on glibc, and not
    when `allocator` is "system" (tinyllama.runtime: the C library's defaults)."""
    if allocator == "system":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, RETAIN_BYTES))
    except (OSError, AttributeError):
        return False
