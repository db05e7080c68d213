"""The two things the generator can run: our PyTorch model and a GGUF file in llama.cpp.

    backend = load_backend("out/sft")                         # HF-format directory -> PyTorch
    backend = load_backend("out/gguf/x-Q4_K_M.gguf")          # GGUF -> llama.cpp (llama-cpp-python),
                                                              # any architecture llama.cpp runs
    logits = backend.logits(context_ids, n_last=3)            # (3, vocab) float32

Both keep a KV cache of the last context they saw. `logits(context, n_last)` reuses the longest
cached prefix of `context`, drops the rest (rolling back after a rejected speculative draft is
just asking for a shorter context) and runs the uncached suffix in one forward pass, returning
the logits at the last `n_last` positions (row i predicts token len(context) - n_last + i + 1).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import torch

from tinyllama.devices import gguf_gpu_layers, resolve_device
from tinyllama.errors import NotFound, UserError
from tinyllama.formats.gguf_file import VocabularyNotRead, file_type_name, gguf_value, open_gguf
from tinyllama.inference.drafters import Drafter, ModelDrafter
from tinyllama.inference.graphs import StaticDecoder
from tinyllama.inference.interface import Backend, check_context, common_prefix  # noqa: F401  (Backend: re-exported beside its implementations)
from tinyllama.inference.lookup import NgramDrafter
from tinyllama.formats.hub import ModelRef, resolve_model
from tinyllama.model.cache import KVCache, Step
from tinyllama.model.model import Llama
from tinyllama.inference.packing import pack_for_decoding, unpack
from tinyllama.inference.threads import for_torch_compute
from tinyllama.model.kernels import use_kernels
from tinyllama.formats.tokenizer import Tokenizer
from tinyllama.runtime import RuntimeOptions


MAX_GRAPH_TOKENS = 16          # a decode step, or a verification of up to 15 drafted tokens


def use_cuda_graphs(model: Llama, allowed: bool = True) -> bool:
    """Whether a TorchBackend decodes `model` through captured CUDA graphs: on CUDA, unless not
    `allowed` (--no-cuda-graphs, TINYLLAMA_CUDA_GRAPHS=0)."""
    return model.lm_head.weight.is_cuda and allowed


class TorchBackend(Backend):
    """Our Llama with its positional KV cache (batch 1)."""

    def __init__(self, model: Llama, tokenizer: Tokenizer | None = None, name: str = "model",
                 precision: str | None = None, pack: bool = True, runtime: RuntimeOptions = RuntimeOptions()) -> None:
        """pack: install the CPU decode fast path (tinyllama.inference.packing, timed once per model shape;
        removed again by close()). generate() on a bare model passes False: a model being
        trained or previewed is not given inference-only copies. runtime: its packing layout
        and whether CUDA graphs are used."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.precision = precision or str(next(model.parameters()).dtype).removeprefix("torch.")
        self.vocab_size = model.config.vocab_size
        self.context_length = model.config.max_seq_len
        self._cached: list[int] = []
        self._cache: KVCache | None = None     # this backend's own, grown in steps by _fit_cache
        self._fingerprint: str | None = None
        # fused q/k/v, gate/up, o, down and lm_head copies in the layout (transposed or oneDNN)
        # that decodes fastest here (tinyllama/inference/packing.py); dropped again by close()
        self.packed_bytes = pack_for_decoding(self.model, layout=runtime.packing) if pack else 0
        # on CUDA: decode and verification steps replayed as CUDA graphs over a cache of the
        # whole context (tinyllama.inference.graphs); eager steps would leave the GPU waiting on the host
        self.graphs = StaticDecoder(model, self.context_length) if use_cuda_graphs(model, runtime.cuda_graphs) else None

    def logits(self, context: Sequence[int], n_last: int = 1) -> torch.Tensor:
        check_context(context, n_last, self.context_length, self.name)
        for_torch_compute()
        context = list(context)
        self._fit_cache(len(context))
        start = min(common_prefix(self._cached, context), len(context) - n_last)
        new = context[start:]
        if self.graphs is not None and len(new) <= MAX_GRAPH_TOKENS:
            out = self.graphs.step(new, start)[-n_last:]           # a replayed CUDA graph, already on the host
        else:
            device = self.model.lm_head.weight.device
            # inference_mode: no version counters or view tracking, ~5% of a 19M decode step. The
            # KV cache was allocated outside it, so it stays a normal tensor.
            with torch.inference_mode():
                h = self.model.hidden_states(torch.tensor([new], device=device), self.cache,
                                             Step.span(start, len(new)))[0]
                h = h[-n_last:]                                                       # (n_last, d)
                out = self.model.head(h)                                              # (n_last, V)
            out = out.float().cpu().clone()     # a normal tensor again: callers may edit it in place
        self._cached = context
        return out

    @property
    def cache(self) -> KVCache | None:
        """The KV cache steps run in: with CUDA graphs the static decoder's (longer steps, a
        prompt, run eagerly into it), else this backend's own."""
        return self.graphs.cache if self.graphs is not None else self._cache

    def _fit_cache(self, n: int) -> None:
        """A KV cache that holds `n` positions (with CUDA graphs the static decoder's own, of the
        whole context): grown in steps, so a long generation reallocates a handful of times, not
        per token. Allocated outside inference_mode, so it stays a normal tensor."""
        if self.graphs is not None:
            return
        have = 0 if self.cache is None else self.cache.max_seq_len
        if have < n:
            size = min(self.context_length, max(n, 2 * have, 256))
            self._cache = KVCache.for_model(self.model, batch_size=1, max_seq_len=size)
            self._cached = []

    def cached_tokens(self) -> int:
        return len(self._cached)

    def trim(self, n: int) -> None:
        # positional cache: entries past n are simply overwritten by the next step
        del self._cached[n:]

    def vocab_fingerprint(self) -> str | None:
        if self.tokenizer is None:
            return None
        if self._fingerprint is None:     # computed once: generate() checks it on every call
            self._fingerprint = hashlib.sha256("\n".join(self.vocab_pieces()).encode()).hexdigest()
        return self._fingerprint

    def vocab_pieces(self) -> list[str] | None:
        if self.tokenizer is None:
            return None
        return [self.tokenizer.id_to_piece(i) or "" for i in range(self.tokenizer.vocab_size)]

    def reset(self) -> None:
        self._cached = []

    def close(self) -> None:
        self.graphs = None
        self._cache = None
        if self.packed_bytes:
            unpack(self.model)
        self._cached = []


class GGUFBackend(Backend):
    """A GGUF in llama.cpp through llama-cpp-python, logits at every position (logits_all): any
    architecture llama.cpp runs whose KV cache can be cut back (not recurrent ones)."""

    def __init__(self, path: str | os.PathLike, n_ctx: int = 2048, n_threads: int | None = None,
                 reader=None, n_gpu_layers: int = 0) -> None:
        """`reader`: an already-parsed gguf.GGUFReader of the same file, to read it only once;
        `n_gpu_layers`: layers llama.cpp offloads to the GPU (-1: all) in a CUDA or Metal build."""
        try:
            import llama_cpp
        except ImportError:
            raise ImportError("running a GGUF needs llama-cpp-python (installed by `make setup`)") from None
        path = Path(path)
        if not path.is_file():
            raise NotFound(f"{path}: no such GGUF file")
        self._llama_cpp = llama_cpp
        reader = reader if reader is not None else open_gguf(path)
        self.architecture = gguf_value(reader, "general.architecture")
        trained = gguf_value(reader, f"{self.architecture}.context_length")
        if trained:
            n_ctx = min(n_ctx, int(trained))     # no longer than the model was trained for
        try:
            # flash attention on, as llama.cpp's own tools run it (`-fa auto`) on the CPU and GPU
            # backends; llama-cpp-python's wrapper leaves it off (measured by bench.server_compare)
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False,
                                       n_threads=n_threads or max(1, (os.cpu_count() or 2)),
                                       n_gpu_layers=n_gpu_layers, flash_attn=True)
        except ValueError as e:
            raise UserError(f"{path}: llama.cpp cannot load this file ({e})") from None
        if llama_cpp.llama_model_is_recurrent(self.llm._model.model):
            self.llm.close()             # its state cannot be cut back to a shorter context
            raise UserError(f"{path}: general.architecture is {self.architecture!r}, a recurrent model; the "
                            "generator rolls contexts back (speculative drafts, shared prefixes), which needs a KV cache")
        self.name = path.name
        self.path = path
        offload = llama_cpp.llama_supports_gpu_offload() and n_gpu_layers != 0
        self.precision = f"{file_type_name(reader)} in llama.cpp" + (
            f", {'all' if n_gpu_layers < 0 else n_gpu_layers} layers on the GPU" if offload else "")
        self.vocab_size = self.llm.n_vocab()
        self.context_length = self.llm.n_ctx()
        self._fingerprint: str | None = None

    def logits(self, context: Sequence[int], n_last: int = 1) -> torch.Tensor:
        check_context(context, n_last, self.context_length, self.name)
        cached = self.llm.input_ids[: self.llm.n_tokens].tolist()
        start = min(common_prefix(cached, context), len(context) - n_last)
        self.llm.n_tokens = start           # eval() drops the KV cache beyond n_tokens first
        self.llm.eval(list(context[start:]))
        return torch.from_numpy(self.llm.scores[len(context) - n_last: len(context)].copy())

    def cached_tokens(self) -> int:
        return int(self.llm.n_tokens)

    def trim(self, n: int) -> None:
        if n < self.llm.n_tokens:
            self.llm._ctx.kv_cache_seq_rm(-1, n, -1)
            self.llm.n_tokens = n

    def vocab_fingerprint(self) -> str | None:
        if self._fingerprint is None:     # computed once: generate() checks it on every call
            self._fingerprint = hashlib.sha256("\n".join(self.vocab_pieces()).encode()).hexdigest()
        return self._fingerprint

    def vocab_pieces(self) -> list[str]:
        return llama_cpp_pieces(self.llm)

    def reset(self) -> None:
        self.llm.reset()

    def close(self) -> None:
        self.llm.close()

    def read_tokenizer(self, reader) -> Tokenizer:
        """The file's tokenizer, kept as `self.tokenizer`: for a Llama GGUF whose vocabulary is
        read here, rebuilt with `tokenizers` (ids equal llama.cpp's; it also saves as
        tokenizer.json); for any other, llama.cpp's own through this loaded file."""
        self.tokenizer = self._file_tokenizer(reader)
        return self.tokenizer

    def _file_tokenizer(self, reader) -> Tokenizer:
        if self.architecture == "llama":
            try:
                return Tokenizer.from_gguf_vocab(self.path, reader=reader)
            except VocabularyNotRead:
                pass
        lib, vocab = self._llama_cpp, self.llm._model.vocab
        ids = {name: int(getattr(lib, f"llama_vocab_{name}")(vocab)) for name in ("bos", "eos", "eot")}
        ids = {k: v for k, v in ids.items() if 0 <= v < self.vocab_size}
        eos = ids.get("eos", ids.get("eot", 0))
        return Tokenizer(LlamaCppVocab(self.llm), bos_id=ids.get("bos", eos), eos_id=eos, unk_id=eos,
                         chat_template=gguf_value(reader, "tokenizer.chat_template"), source=str(self.path),
                         stop_ids=[i for i in (ids.get("eot"),) if i is not None],
                         add_bos=bool(lib.llama_vocab_get_add_bos(vocab)))


def llama_cpp_pieces(llm) -> list[str]:
    """Every token's text in a loaded GGUF's vocabulary, as llama.cpp holds it."""
    import llama_cpp

    vocab = llm._model.vocab
    return [llama_cpp.llama_vocab_get_text(vocab, i).decode("utf-8", "replace") for i in range(llm.n_vocab())]


class LlamaCppVocab:
    """What Tokenizer asks of its `tokenizers` backend, answered by llama.cpp's own vocabulary in
    a loaded GGUF: for the architectures and tokenizers that are not rebuilt here."""

    encode_special_tokens = True           # as Tokenizer sets it: special-token text stays text

    def __init__(self, llm) -> None:
        import llama_cpp

        self.llm, vocab = llm, llm._model.vocab
        self._pieces = llama_cpp_pieces(llm)
        self._control = {i for i in range(len(self._pieces)) if llama_cpp.llama_vocab_is_control(vocab, i)}

    def no_padding(self) -> None:
        pass

    def no_truncation(self) -> None:
        pass

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return len(self._pieces)

    def encode(self, text: str, add_special_tokens: bool = False) -> "_Encoding":
        return _Encoding(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list["_Encoding"]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._control]
        return self.llm.detokenize(list(ids), special=not skip_special_tokens).decode("utf-8", "replace")

    def id_to_token(self, i: int) -> str | None:
        return self._pieces[i] if 0 <= i < len(self._pieces) else None

    def get_vocab(self, with_added_tokens: bool = True) -> dict[str, int]:
        return {p: i for i, p in enumerate(self._pieces)}

    def get_added_tokens_decoder(self) -> dict:
        from tokenizers import AddedToken

        return {i: AddedToken(self._pieces[i], special=True) for i in sorted(self._control)}

    def save(self, path: str) -> None:
        raise UserError(f"{self.llm.model_path}: this tokenizer is llama.cpp's, read from the GGUF; it is not "
                        "saved as tokenizer.json")


class _Encoding:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids


def _llama_cpp_offloads() -> bool:
    """Whether the installed llama.cpp can run layers on a GPU (a CUDA or Metal build)."""
    try:
        import llama_cpp
    except ImportError:
        return False              # GGUFBackend says what to install
    return bool(llama_cpp.llama_supports_gpu_offload())


def load_backend(model: str | os.PathLike | ModelRef, device: str | torch.device | None = "auto",
                 dtype: str | torch.dtype | None = "auto", n_ctx: int = 2048, n_gpu_layers: int | None = None,
                 revision: str | None = None, flag: str = "--model",
                 runtime: RuntimeOptions = RuntimeOptions()) -> tuple[Backend, Tokenizer]:
    """A model reference (tinyllama.formats.hub: a checkpoint directory or .gguf file, or a hub id, a hub
    GGUF as org/name:QUANT) loaded in PyTorch (directories) or llama.cpp (GGUFs), with its
    tokenizer: the directory's own, or for a GGUF the file's (GGUFBackend.read_tokenizer); either is
    also `backend.tokenizer`.
    `backend.name` is the reference's short name.

    dtype (PyTorch): "auto" measures what decodes faster here (tinyllama.precision: bf16 only on
    CPUs with bf16 instructions, bf16 on CUDA), a torch dtype or name forces one, None keeps the
    stored dtype. `backend.precision` says what was chosen and why.

    device (tinyllama.devices): auto, cpu, cuda or cuda:N. A directory's model goes there; for a
    GGUF it decides `n_gpu_layers` unless that is given (auto: all, where llama.cpp's build can
    offload).

    runtime (tinyllama.runtime): the attention and fused kernels (made the process's choice
    here), CPU packing and CUDA graphs of a PyTorch model."""
    from tinyllama.formats.checkpoint import load_checkpoint, load_config
    from tinyllama.precision import choose_dtype

    ref = resolve_model(model, revision=revision, flag=flag)
    if ref.kind == "checkpoint":
        device = resolve_device(device)
        choice = None if dtype is None else choose_dtype(dtype, device, load_config(ref.path), work="decode")
        model, tok = load_checkpoint(ref.path, device=device, dtype=choice.dtype if choice else None)
        use_kernels(runtime)
        backend = TorchBackend(model, tok, name=ref.name, precision=str(choice) if choice else None, runtime=runtime)
        backend.path = ref.path
        return backend, tok
    reader = open_gguf(ref.path)                       # parsed once, for both
    backend = GGUFBackend(ref.path, n_ctx=n_ctx, reader=reader,
                          n_gpu_layers=gguf_gpu_layers(device, n_gpu_layers, _llama_cpp_offloads()))
    backend.name = ref.name
    return backend, backend.read_tokenizer(reader)


def open_drafter(spec: str | os.PathLike, **load_options) -> Drafter:
    """`ngram[:N]` (prompt lookup) or a model reference loaded as load_backend loads it
    (load_options: device, dtype, n_ctx, n_gpu_layers)."""
    return NgramDrafter.parse(str(spec)) or ModelDrafter(load_backend(spec, flag="--model-draft", **load_options)[0])
