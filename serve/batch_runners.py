"""What runs a SlotPool's steps (serve.batching): our PyTorch model with a KV cache of
n_slots rows, or a GGUF in llama.cpp with n_slots sequences, one llama_decode per step.

    runner = batch_runner(load_backend("out/gguf/x-Q4_K_M.gguf")[0], n_slots=4)
"""

from __future__ import annotations

import numpy as np
import torch

from tinyllama.inference import threads as torch_threads
from tinyllama.inference.backends import Backend, GGUFBackend, TorchBackend
from tinyllama.model.cache import KVCache, Step
from .batching import BatchRunner, Row


class TorchRunner(BatchRunner):
    """Our Llama with a batched KV cache, one row per slot. The one-token rows of a step (decoding)
    run as one batched call, each at its own position, attending to its own row only (no padding
    is recomputed); longer rows (a prompt chunk, a speculative verification) run one call each."""

    step_tokens = 512

    def __init__(self, backend: TorchBackend, n_slots: int) -> None:
        self.backend, self.model = backend, backend.model
        self.n_slots, self.name, self.precision = n_slots, backend.name, backend.precision
        self.vocab_size, self.context_length = backend.vocab_size, backend.context_length
        # the slots' cache, beside (not instead of) the backend's own batch-1 one
        self.cache = KVCache.for_model(self.model, batch_size=n_slots, max_seq_len=self.context_length)
        self.device = self.model.lm_head.weight.device

    def run(self, rows: list[Row]) -> list[torch.Tensor | None]:
        torch_threads.for_torch_compute()
        out: list[torch.Tensor | None] = [None] * len(rows)
        singles = [i for i, r in enumerate(rows) if len(r.tokens) == 1]
        with torch.inference_mode():
            if singles:
                ids = torch.tensor([rows[i].tokens for i in singles], device=self.device)           # (B, 1)
                positions = torch.tensor([rows[i].start for i in singles], device=self.device)      # (B,)
                step = Step.per_row([rows[i].slot for i in singles], positions)
                h = self.model.hidden_states(ids, self.cache, step)                                 # (B, 1, d)
                logits = self.model.head(h[:, 0]).float().cpu()                                     # (B, V)
                for j, i in enumerate(singles):
                    out[i] = logits[j:j + 1].clone() if rows[i].n_out else None
            for i, r in enumerate(rows):
                if len(r.tokens) == 1:
                    continue
                step = Step.span(r.start, len(r.tokens), row=r.slot)
                h = self.model.hidden_states(torch.tensor([r.tokens], device=self.device), self.cache, step)[0]  # (T, d)
                if r.n_out:
                    out[i] = self.model.head(h[-r.n_out:]).float().cpu().clone()                  # (n_out, V)
        return out

    def forget(self, slot: int, start: int) -> None:
        pass                              # positional cache: later steps overwrite those positions

    def vocab_fingerprint(self) -> str | None:
        return self.backend.vocab_fingerprint()

    def close(self) -> None:
        self.cache = None


class LlamaCppRunner(BatchRunner):
    """A GGUF's model (already loaded by a GGUFBackend, weights shared) in a llama.cpp context of
    its own with n_slots sequences (seq_id = slot), each with the backend's context length, as
    llama-server -np N sizes them. A step is one llama_batch through one llama_decode, logits
    requested only at the positions a row wants."""

    def __init__(self, backend: GGUFBackend, n_slots: int, step_tokens: int = 512, n_threads: int | None = None,
                 unified_kv: bool = False) -> None:
        import llama_cpp

        self.lib, self.backend = llama_cpp, backend
        self.n_slots, self.name, self.precision = n_slots, backend.name, backend.precision
        self.vocab_size, self.context_length = backend.vocab_size, backend.context_length
        self.step_tokens = step_tokens
        # the backend's own settings (attention kernel, KV types, threads), so a slot computes what
        # the backend alone would; only the sizes differ
        params = type(backend.llm.context_params).from_buffer_copy(backend.llm.context_params)
        params.n_ctx = n_slots * self.context_length
        params.n_batch = params.n_ubatch = step_tokens
        params.n_seq_max = n_slots
        if n_threads:
            params.n_threads = params.n_threads_batch = n_threads
        # a KV stream per sequence, as llama-server runs: each row attends to its own cells only,
        # where in one shared buffer it spans every slot's (bench/RESULTS.md, the 8-client gap).
        # llama.cpp passes only consecutive sequences of such a cache together, so
        # run() orders a step's rows by slot and the pool keeps busy slots consecutive.
        params.kv_unified = unified_kv
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(backend.llm._model.model, params)
        if not self.ctx:
            raise RuntimeError(f"{backend.name}: llama.cpp could not make a context of {n_slots} sequences "
                               f"x {self.context_length} tokens")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(step_tokens, 0, 1)

    def run(self, rows: list[Row]) -> list[torch.Tensor | int | None]:
        order = sorted(range(len(rows)), key=lambda i: rows[i].slot)      # sequences in increasing order
        out: list[torch.Tensor | int | None] = [None] * len(rows)
        for i, logits in zip(order, self._decode([rows[i] for i in order])):
            out[i] = logits
        return out

    def _decode(self, rows: list[Row]) -> list[torch.Tensor | int | None]:
        b, n = self.batch, 0
        for r in rows:
            first_out = len(r.tokens) - r.n_out
            for j, token in enumerate(r.tokens):
                b.token[n], b.pos[n], b.n_seq_id[n] = token, r.start + j, 1
                b.seq_id[n][0] = r.slot
                b.logits[n] = j >= first_out
                n += 1
        b.n_tokens = n
        rc = self.lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}{': no room in the KV cache' if rc == 1 else ''})")
        n_out = sum(r.n_out for r in rows)
        # the requested outputs, contiguous in batch order: (n_out, vocab)
        every = np.ctypeslib.as_array(self.lib.llama_get_logits(self.ctx), shape=(n_out, self.vocab_size))
        # greedy rows get the id of their largest logit, read where the pass left it (one call for
        # the step); only the rows that want logits are copied out, before the next pass overwrites them
        best = every.argmax(axis=1) if any(r.argmax for r in rows) else None    # (n_out,)
        out, at = [], 0
        for r in rows:
            if r.argmax:
                out.append(int(best[at]))
            else:
                out.append(torch.from_numpy(every[at:at + r.n_out].copy()) if r.n_out else None)
            at += r.n_out
        return out

    def forget(self, slot: int, start: int) -> None:
        self.lib.llama_memory_seq_rm(self.memory, slot, start, -1)

    def vocab_fingerprint(self) -> str | None:
        return self.backend.vocab_fingerprint()

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.ctx = None


def batch_runner(backend: Backend, n_slots: int) -> BatchRunner:
    """The runner for a loaded backend's model with n_slots sequences."""
    if isinstance(backend, TorchBackend):
        return TorchRunner(backend, n_slots)
    if isinstance(backend, GGUFBackend):
        return LlamaCppRunner(backend, n_slots)
    raise TypeError(f"no batched runner for {type(backend).__name__}")
