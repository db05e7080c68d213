"""GGUF -> HF-format checkpoint directory: models that ship only as a GGUF train, fine-tune and
evaluate in PyTorch like any other.

    import_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "out/smollm2")
    python -m quantize.gguf_import FILE.gguf --out DIR [--verify]     (also: tinyllama import ...)

Each tensor is dequantized to float32 by gguf-py (llama.cpp's own reference dequantizers, in
numpy), renamed through gguf-py's TensorNameMap (the table llama.cpp's converter writes with),
and Q/K are permuted back from llama.cpp's interleaved RoPE rows to HF's rotate-half ones (the
inverse of quantize.export.permute_for_llama_cpp). The config comes from the file's
hyperparameters (tied embeddings where it has no output.weight, as llama.cpp then reads
token_embd), the tokenizer from its own vocabulary (tokenizer.json, add_bos_token, the chat
template, end-of-turn ids), and README.md and import.json record what was dequantized from what.
`--verify` runs the GGUF in llama.cpp beside the new checkpoint in PyTorch and prints their
top-1 agreement and largest logit difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from tinyllama.formats.checkpoint import model_from_state_dict, save_checkpoint
from tinyllama.model.config import ModelConfig
from tinyllama.errors import NotFound, UserError, report
from tinyllama.formats.gguf_file import gguf_value, open_gguf
from tinyllama.model.model import Llama
from tinyllama.formats.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ImportError_(UserError):
    """A GGUF that cannot become a PyTorch checkpoint here; nothing was written."""


def import_gguf(gguf: str | Path, out: str | Path, dtype: str = "float32", say=print) -> Path:
    """Writes `out` (atomically) from a Llama-architecture GGUF; returns it."""
    gguf, out = Path(gguf), Path(out)
    if not gguf.is_file():
        raise NotFound(f"{gguf}: no such GGUF file")
    if dtype not in DTYPES:
        raise ImportError_(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    reader = open_gguf(gguf)
    cfg = gguf_config(reader, gguf)
    tok = Tokenizer.from_gguf_vocab(gguf, reader=reader, with_sentencepiece=_is_sentencepiece(reader))
    state, types = dequantized_state(reader, cfg, gguf, say)
    model = model_from_state_dict(cfg, {k: torch.from_numpy(v).to(DTYPES[dtype]) for k, v in state.items()},
                                  mismatch=f"{gguf}: tensors do not match the file's hyperparameters")
    record = {"source": gguf.name, "sha256": _sha256(gguf), "architecture": "llama",
              "tensor_types": dict(sorted(types.items())), "dtype": dtype,
              "general.name": gguf_value(reader, "general.name")}
    save_checkpoint(model, tok, out, generation_config={"eos_token_id": tok.generation_eos, "pad_token_id": tok.pad_id},
                    extra_files={"import.json": json.dumps(record, indent=2) + "\n", "README.md": _card(record, cfg)})
    say(f"wrote {out}: {cfg.n_layer} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}"
        f"{', tied embeddings' if cfg.tie_embeddings else ''}; dequantized from "
        f"{', '.join(f'{n} {t}' for t, n in sorted(types.items()))} tensors to {dtype}")
    return out


def _is_sentencepiece(reader) -> bool:
    return gguf_value(reader, "tokenizer.ggml.model") == "llama"


def gguf_config(reader, where: Path) -> ModelConfig:
    """The model's shape from the file's llama.* hyperparameters; refuses what our model is not."""
    arch = gguf_value(reader, "general.architecture")
    if arch != "llama":
        raise ImportError_(f"{where}: general.architecture is {arch!r}; only Llama-architecture GGUFs import into "
                           "PyTorch here (llama.cpp still runs this file as it is: complete/serve --model FILE)")

    def get(key: str, default=None):
        value = gguf_value(reader, f"llama.{key}")
        if value is None and default is None:
            raise ImportError_(f"{where}: GGUF field llama.{key} is missing")
        return default if value is None else value

    if gguf_value(reader, "llama.rope.scaling.type") not in (None, "none"):
        raise ImportError_(f"{where}: llama.rope.scaling.type is {gguf_value(reader, 'llama.rope.scaling.type')!r}; "
                           "only plain RoPE is supported")
    n_head, d_model = int(get("attention.head_count")), int(get("embedding_length"))
    rope_dim = int(get("rope.dimension_count", d_model // n_head))
    if rope_dim != d_model // n_head:
        raise ImportError_(f"{where}: llama.rope.dimension_count {rope_dim} is not the head size "
                           f"{d_model // n_head}; partial RoPE is not supported")
    names = {t.name for t in reader.tensors}
    vocab = gguf_value(reader, "llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    try:
        return ModelConfig(
            name=_slug(where.name), n_layer=int(get("block_count")), d_model=d_model, n_head=n_head,
            n_kv_head=int(get("attention.head_count_kv", n_head)), ffn_dim=int(get("feed_forward_length")),
            vocab_size=int(vocab), max_seq_len=int(get("context_length")), rope_base=float(get("rope.freq_base", 10000.0)),
            norm_eps=float(get("attention.layer_norm_rms_epsilon")), tie_embeddings="output.weight" not in names,
            bos_id=int(gguf_value(reader, "tokenizer.ggml.bos_token_id") or 1),
            eos_id=int(gguf_value(reader, "tokenizer.ggml.eos_token_id") or 2))
    except UserError as e:
        raise ImportError_(f"{where}: {e}") from None


def _slug(file_name: str) -> str:
    """"SmolLM2-135M-Instruct.Q4_1.gguf" -> "SmolLM2-135M-Instruct" (names the GGUFs exported later)."""
    stem = re.sub(r"\.gguf$", "", file_name, flags=re.I)
    stem = re.sub(r"[.-](I?Q\d\w*|F(16|32)|BF16)$", "", stem, flags=re.I)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem) or "imported"


def dequantized_state(reader, cfg: ModelConfig, where: Path, say=print) -> tuple[dict[str, np.ndarray], Counter]:
    """HF-named float32 arrays of every tensor, and how many tensors of each GGML type there were."""
    import gguf
    from tqdm import tqdm

    hf_names = _hf_names(cfg)
    state, types = {}, Counter()
    for t in tqdm(reader.tensors, desc=f"dequantizing {where.name}", unit="tensor", file=sys.stderr,
                  disable=not sys.stderr.isatty()):
        if t.name not in hf_names:
            if t.name == "rope_freqs.weight":
                raise ImportError_(f"{where}: tensor rope_freqs.weight (scaled RoPE frequencies) is not supported")
            raise ImportError_(f"{where}: tensor {t.name} has no place in a Llama model")
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ImportError_(f"{where}: tensor {t.name} is {t.tensor_type.name}, which gguf-py cannot dequantize; "
                               "import a file of another type (Q8_0, Q4_K_M, F16, ...)") from None
        name = hf_names[t.name]
        data = np.array(data, dtype=np.float32).reshape(tuple(reversed([int(n) for n in t.shape])))   # a copy: F32 tensors are views of the memory-mapped file
        state[name] = _unpermute(name, data, cfg)
        types[t.tensor_type.name] += 1
    missing = sorted(set(hf_names.values()) - set(state) - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    if missing:
        raise ImportError_(f"{where}: tensors missing for {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    return state, types


def _hf_names(cfg: ModelConfig) -> dict[str, str]:
    """GGUF tensor name -> HF name, for every weight of the model (gguf-py's table, inverted)."""
    import gguf

    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layer)
    with torch.device("meta"):
        names = list(Llama(cfg.replace(tie_embeddings=False)).state_dict())
    found = {}
    for hf in names:
        g = table.get_name(hf, try_suffixes=(".weight", ".bias"))
        if g is not None:
            found[g] = hf
    return found


def _unpermute(hf_name: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """llama.cpp's interleaved RoPE rows -> HF's rotate-half rows: (heads, hd/2, 2) -> (heads, 2, hd/2)."""
    heads = cfg.n_head if hf_name.endswith("q_proj.weight") else cfg.n_kv_head if hf_name.endswith("k_proj.weight") else 0
    if not heads:
        return w
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _card(record: dict, cfg: ModelConfig) -> str:
    kinds = ", ".join(f"{n} {t}" for t, n in record["tensor_types"].items())
    return (f"# {cfg.name}\n\nImported from the GGUF file `{record['source']}` (SHA-256 {record['sha256']}, "
            f"general.name {record['general.name']!r}).\n\nThe weights were **dequantized** from the file's "
            f"quantized tensors ({kinds}) to {record['dtype']}: they hold the quantized values exactly, not the "
            "original full-precision weights. Tokenizer and chat template are the file's own.\n")


def verify(gguf: Path, out: Path, text: str, n_ctx: int = 512) -> dict:
    """llama.cpp on the GGUF against PyTorch on the imported directory, over `text`: top-1
    agreement per position and the largest logit difference."""
    from tinyllama.inference.backends import GGUFBackend
    from tinyllama.formats.checkpoint import load_checkpoint

    model, tok = load_checkpoint(out, dtype=torch.float32)
    ids = tok.encode(text)[:n_ctx]
    backend = GGUFBackend(gguf, n_ctx=n_ctx)
    try:
        theirs = backend.logits(ids, n_last=len(ids))
    finally:
        backend.close()
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].float()
    return {"tokens": len(ids), "top1_agreement": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item(),
            "max_abs_diff": (ours - theirs).abs().max().item()}


VERIFY_TEXT = ("The capital of France is Paris. It lies on the Seine, and its museums hold works from every age. "
               "def mean(xs):\n    return sum(xs) / len(xs)\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m quantize.gguf_import", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", help="a Llama-architecture .gguf file (any type gguf-py dequantizes: F32, F16, Q8_0, Q4_K_M, ...)")
    ap.add_argument("--out", required=True, help="the checkpoint directory to write (atomically)")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights' dtype (default: %(default)s)")
    ap.add_argument("--verify", action="store_true",
                    help="then compare llama.cpp on the GGUF with PyTorch on the directory (top-1, max |Δlogit|)")
    args = ap.parse_args(argv)
    try:
        from tinyllama.paths import check_output_dir

        out = import_gguf(args.gguf, check_output_dir(args.out, "--out"), args.dtype)
        if args.verify:
            v = verify(Path(args.gguf), out, VERIFY_TEXT * 4)
            print(f"llama.cpp on {Path(args.gguf).name} vs PyTorch on {out}, {v['tokens']} tokens: top-1 agreement "
                  f"{v['top1_agreement']:.1%}, max |Δlogit| {v['max_abs_diff']:.3f}")
    except UserError as e:
        return report(e)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
