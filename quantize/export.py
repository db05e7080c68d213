"""HF-format Llama directory -> GGUF, with llama.cpp's own tools: gguf-py writes F32/F16/BF16,
llama.cpp's quantizer (`llama_cpp.llama_model_quantize`) makes the quantized types.

    write_gguf("out/sft/final", "out/gguf/model-F16.gguf", "f16")
    quantize_gguf("out/gguf/model-F16.gguf", "out/gguf/model-Q4_K_M.gguf", "q4_k_m")

Tensor names come from gguf-py's `TensorNameMap` for the llama architecture (the table
llama.cpp's converter uses). Q and K projections are permuted from HF's rotate-half layout to
the interleaved pairs llama.cpp's RoPE expects: rows (heads, 2, hd/2) -> (heads, hd/2, 2).
Metadata: architecture hyperparameters, the full tokenizer (pieces, SentencePiece scores and
token types, BOS/EOS/UNK/PAD ids), the chat template when the directory has one, a name.
Every file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tinyllama.atomic import atomic_file
from tinyllama.formats.checkpoint import load_config, load_state_dict
from tinyllama.errors import UserError
from tinyllama.formats.gguf_file import GGUFVocab
from tinyllama.formats.tokenizer import Tokenizer
from tinyllama.formats.vocab import bpe_merges, is_byte_level, pre_tokenizer_name

FLOAT_TYPES = ("f32", "f16", "bf16")
QUANT_TYPES = ("q8_0", "q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q4_0", "iq4_xs", "iq4_nl", "q3_k_m",
               "iq3_m", "q2_k")
ALL_TYPES = FLOAT_TYPES + QUANT_TYPES
# i-quants below 4 bits are poor without an importance matrix (llama.cpp refuses the 2-bit ones)
NEEDS_IMATRIX = ("iq3_m",)


class ExportError(UserError):
    """Bad input to the exporter; the message names the file or value at fault."""


def check_imatrix(types: list[str], have_matrix: bool) -> None:
    """ExportError unless every type that needs an importance matrix (NEEDS_IMATRIX) has one."""
    needs = [t for t in types if t in NEEDS_IMATRIX]
    if needs and not have_matrix:
        raise ExportError(f"{', '.join(needs)}: an i-quant below 4 bits needs an importance matrix; add --imatrix "
                          "(computed from the validation shards or --calibration FILE)")


def _llama_ftype(name: str) -> int:
    import llama_cpp

    return getattr(llama_cpp, f"LLAMA_FTYPE_{'ALL_F32' if name == 'f32' else 'MOSTLY_' + name.upper()}")


def permute_for_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp's interleaved RoPE rows. w (n_head * hd, d_in)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def vocab_metadata(model_dir: Path, tok: Tokenizer) -> GGUFVocab:
    """The vocabulary as llama.cpp reads it from a GGUF.

    SentencePiece (`llama`): with tokenizer.model (what our checkpoints and Meta's carry),
    gguf-py's SentencePieceVocab, as llama.cpp's converter reads it (exact scores). A directory
    with only tokenizer.json: its BPE vocabulary, scored -rank. gguf-py's LlamaHfVocab would give
    every piece -1000, and llama.cpp's SentencePiece tokenizer merges by score, so ties would
    change its ids; Llama's pieces are numbered in score order, so -id keeps SentencePiece's merge
    priority (tested: llama.cpp tokenizes like us).

    Byte-level BPE (`gpt2`: SmolLM2, Llama-3): the pieces, the ranked merges and the
    pre-tokenizer family's llama.cpp name (tinyllama.formats.vocab.pre_tokenizer_name); added tokens are
    control tokens when special, user-defined otherwise."""
    import gguf

    ids = {"bos": tok.bos_id, "eos": tok.eos_id, "unk": tok.unk_id, "pad": tok.pad_id}
    if is_byte_level(tok.backend):
        pre = pre_tokenizer_name(tok.backend)
        if pre is None:
            raise ExportError(f"{model_dir}: tokenizer.json's pre-tokenizer is not one llama.cpp knows by a name here; "
                              "llama.cpp would tokenize this model differently")
        pieces = _pieces(tok)
        added = tok.backend.get_added_tokens_decoder()
        types = [int(gguf.TokenType.NORMAL) if i not in added else
                 int(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
                 for i in range(len(pieces))]
        return GGUFVocab("gpt2", pre, pieces, types, [0.0] * len(pieces), bpe_merges(tok.backend), ids, tok.add_bos)
    if (model_dir / "tokenizer.model").exists():
        sp = gguf.vocab.SentencePieceVocab(model_dir)
        pieces, scores, types = zip(*sp.all_tokens())
        return GGUFVocab("llama", "default", list(pieces), [int(t) for t in types], list(scores), [], ids, tok.add_bos)
    pieces = _pieces(tok)
    special = {tok.bos_id, tok.eos_id}
    types = [gguf.TokenType.UNKNOWN if i == tok.unk_id else gguf.TokenType.CONTROL if i in special
             else gguf.TokenType.BYTE if p.startswith("<0x") and p.endswith(">") and len(p) == 6
             else gguf.TokenType.NORMAL for i, p in enumerate(pieces)]
    return GGUFVocab("llama", "default", pieces, [int(t) for t in types], [-float(i) for i in range(len(pieces))], [],
                     ids, tok.add_bos)


def _pieces(tok: Tokenizer) -> list[str]:
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    pieces = [""] * len(vocab)
    for piece, i in vocab.items():
        pieces[i] = piece
    return pieces


def write_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, ftype: str = "f16", name: str | None = None) -> Path:
    """Writes an F32, F16 or BF16 GGUF of an HF-format Llama directory (atomically)."""
    model_dir, out = Path(model_dir), Path(out)
    cfg, tok, sd, vocab = _read_model(model_dir)
    shapes = [(n, tuple(t.shape)) for n, t in sd.items() if not n.endswith("rotary_emb.inv_freq")]
    arrays = (sd[n].float().numpy() for n, _ in shapes)
    return write_gguf_tensors(out, cfg, tok, vocab, shapes, arrays, ftype,
                              name or (cfg.name if cfg.name != "custom" else model_dir.name), where=model_dir)


def write_gguf_tensors(out: str | os.PathLike, cfg, tok: Tokenizer, vocab: GGUFVocab,
                       shapes: list[tuple[str, tuple[int, ...]]], arrays, ftype: str = "f16", name: str = "model",
                       where: str | os.PathLike = "", keep_f32: frozenset[str] = frozenset()) -> Path:
    """Writes a GGUF from HF-named tensors, streamed: `shapes` lists every (HF name, shape) in
    file order, `arrays` yields their float32 values (HF layout) in that order, one at a time,
    so a model larger than memory can be written. `vocab` is vocab_metadata's; tensors named in
    `keep_f32` stay F32 whatever `ftype` is."""
    import gguf

    if ftype not in FLOAT_TYPES:
        raise ExportError(f"write_gguf writes {', '.join(FLOAT_TYPES)}; {ftype!r} is made by quantize_gguf")
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[ftype]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layer)
    kinds = {n: "f32" if n in keep_f32 else ftype for n, _ in shapes}
    out = Path(out)
    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        w.add_name(name)
        _add_metadata(w, cfg, tok, vocab, file_type)
        for hf_name, shape in shapes:
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ExportError(f"{where}: tensor {hf_name} has no GGUF name for the llama architecture")
            dtype, raw = _stored_type(len(shape), kinds[hf_name])
            width = 4 if dtype == np.float32 else 2            # bytes a value: F32, or F16 / BF16
            n_bytes = int(np.prod(shape)) * width
            if raw is not None:                 # stored as bytes: gguf-py takes the byte shape
                shape = (*shape[:-1], shape[-1] * width)
            w.add_tensor_info(gguf_name, shape, np.dtype(dtype), n_bytes, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for (hf_name, shape), data in zip(shapes, arrays, strict=True):
            w.write_tensor_data(_stored_tensor(hf_name, np.asarray(data, dtype=np.float32), cfg, kinds[hf_name]))
        w.close()
    return out


def _stored_type(ndim: int, ftype: str):
    """(numpy dtype, GGML raw type or None) a tensor is stored in: norms stay F32, as llama.cpp's
    converter keeps them."""
    import gguf

    if ftype == "f32" or ndim == 1:
        return np.float32, None
    if ftype == "f16":
        return np.float16, None
    return np.uint8, gguf.GGMLQuantizationType.BF16


def _stored_tensor(hf_name: str, data: np.ndarray, cfg, ftype: str) -> np.ndarray:
    """One tensor as written: q/k permuted for llama.cpp's RoPE, converted to its stored type."""
    import gguf

    if hf_name.endswith("q_proj.weight"):
        data = permute_for_llama_cpp(data, cfg.n_head)
    elif hf_name.endswith("k_proj.weight"):
        data = permute_for_llama_cpp(data, cfg.n_kv_head)
    dtype, raw = _stored_type(data.ndim, ftype)
    if raw is not None:
        return gguf.quants.quantize(data, raw)
    return np.ascontiguousarray(data.astype(dtype))


def _read_model(model_dir: Path):
    """(config, tokenizer, state dict, (pieces, scores, types)), every problem an ExportError."""
    try:
        cfg = load_config(model_dir)
        tok = Tokenizer.from_dir(model_dir)
    except (UserError, RuntimeError) as e:
        raise ExportError(str(e)) from None
    if tok.vocab_size != cfg.vocab_size:
        raise ExportError(f"{model_dir}: the tokenizer has {tok.vocab_size} tokens but the embedding has "
                          f"{cfg.vocab_size} rows; llama.cpp needs them equal")
    try:
        sd = load_state_dict(model_dir)
        vocab = vocab_metadata(model_dir, tok)
    except (UserError, ValueError, RuntimeError) as e:
        raise ExportError(str(e)) from None
    if cfg.tie_embeddings:      # written once, as token_embd, which llama.cpp then also uses as the output
        sd.pop("lm_head.weight", None)
    return cfg, tok, sd, vocab


def _add_metadata(w, cfg, tok: Tokenizer, vocab: GGUFVocab, file_type) -> None:
    """Architecture hyperparameters and the whole tokenizer, as llama.cpp's converter writes them."""
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(file_type)
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.pieces)
    w.add_token_types(vocab.types)
    if vocab.model == "llama":
        w.add_token_scores(vocab.scores)
    else:
        w.add_token_merges(vocab.merges)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_unk_token_id(tok.unk_id)
    w.add_pad_token_id(tok.pad_id)
    if len(tok.stop_ids) > 1:          # an end-of-turn token besides EOS (Llama-3's <|eot_id|>)
        w.add_eot_token_id(tok.stop_ids[1])
    w.add_add_bos_token(tok.add_bos)
    w.add_add_eos_token(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


_QUANTIZE_CHILD = """
import sys, llama_cpp
src, dst, ftype, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = ftype
params.nthread = threads
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
sys.exit(0 if rc == 0 else 3)
"""


def quantize_gguf(src: str | os.PathLike, out: str | os.PathLike, qtype: str, threads: int | None = None,
                  imatrix: str | os.PathLike | None = None) -> Path:
    """llama.cpp's quantizer, in a child process: a crash in native code becomes an error
    message here, and the temporary output is removed. With an importance matrix it is
    llama.cpp's `llama-quantize` tool (the Python API cannot pass one)."""
    if qtype not in QUANT_TYPES:
        raise ExportError(f"unknown quantization type {qtype!r}; choose from {', '.join(QUANT_TYPES)}")
    check_imatrix([qtype], imatrix is not None)
    src, out = Path(src), Path(out)
    threads = str(threads or os.cpu_count() or 1)
    with atomic_file(out) as tmp:
        if imatrix is not None:
            from tinyllama.llamacpp.tools import tool

            cmd = [str(tool("llama-quantize")), "--imatrix", str(imatrix), str(src), str(tmp), qtype.upper(), threads]
        else:
            cmd = [sys.executable, "-c", _QUANTIZE_CHILD, str(src), str(tmp), str(_llama_ftype(qtype)), threads]
        r = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
        if r.returncode != 0:
            how = f"killed by signal {-r.returncode}" if r.returncode < 0 else f"exit code {r.returncode}"
            raise ExportError(f"llama.cpp's quantizer failed on {src} -> {qtype} ({how}): {r.stderr.strip()[-800:]}")
    return out
