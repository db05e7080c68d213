"""HF-format model directories: the one checkpoint format every stage reads and writes.

    save_checkpoint(model, tok, "out/base")       # config.json, model.safetensors, tokenizer files,
                                                  # generation_config.json; atomic (temp dir + rename)
    model, tok = load_checkpoint("out/base")      # ours, or any HF Llama directory (TinyLlama's)

A directory we write loads unchanged in `transformers.LlamaForCausalLM`, and any HF Llama
directory with safetensors weights (single file or sharded with an index) loads here.
Weights are never unpickled: a directory with only `pytorch_model.bin` is refused with a
message saying how to convert it. Problems name the file and what is wrong with it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tinyllama.atomic import atomic_dir
from tinyllama.model.config import ModelConfig
from tinyllama.errors import NotFound, UserError
from tinyllama.model.model import Llama
from tinyllama.formats.tokenizer import Tokenizer

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3   # transformers' default shard size

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(UserError):
    """A model directory that is missing, not a Llama, or damaged; the message names the file."""


def unwrap(model: torch.nn.Module) -> Llama:
    """The Llama inside torch.compile's `_orig_mod` and DDP's `module` wrappers, so saved
    names never carry their prefixes."""
    inner = getattr(model, "_orig_mod", model)
    return getattr(inner, "module", inner)


def _unwrap_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Plain HF names on CPU; FSDP2 DTensors are gathered into full tensors."""
    inner = unwrap(model)
    sd = inner.state_dict()
    out = {}
    for name, t in sd.items():
        if inner.config.tie_embeddings and name == "lm_head.weight":
            continue   # saved once, as model.embed_tokens.weight, like transformers
        if hasattr(t, "full_tensor"):   # a DTensor from FSDP2
            t = t.full_tensor()
        out[name] = t.detach().to("cpu").contiguous()
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise CheckpointError(f"cannot save weights of dtype {dtype}; use float32, float16 or bfloat16")


def save_checkpoint(model: torch.nn.Module, tokenizer: Tokenizer | None, out_dir: str | os.PathLike, *,
                    generation_config: dict[str, Any] | None = None,
                    extra_files: dict[str, str] | None = None,
                    extra_dirs: dict[str, str | os.PathLike] | None = None,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Writes an HF-format directory atomically: into a temp sibling, then renamed over
    `out_dir` (an existing directory is replaced only once the new one is complete).
    `extra_files` maps file names to text (e.g. the resolved training config); `extra_dirs`
    maps subfolder names to existing folders copied in (e.g. a LoRA adapter)."""
    out = Path(out_dir)
    cfg: ModelConfig = unwrap(model).config
    sd = _unwrap_state_dict(model)
    dtype = _dtype_name(next(iter(sd.values())).dtype)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's embedding has "
                              f"{cfg.vocab_size} rows")

    with atomic_dir(out) as tmp:
        cfg.save_json(tmp / "config.json", dtype=dtype)
        _save_weights(sd, tmp, max_shard_bytes)
        gen = {"bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "max_length": cfg.max_seq_len,
               "do_sample": False}
        gen.update(generation_config or {})
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        for name, src in (extra_dirs or {}).items():
            shutil.copytree(src, tmp / name)
    return out


def _save_weights(sd: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / WEIGHTS_NAME), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


# ---- loading -------------------------------------------------------------------------------

def load_config(path: str | os.PathLike) -> ModelConfig:
    path = Path(path)
    if not path.exists():
        raise NotFound(f"{path}: checkpoint directory not found")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected an HF-format model directory, got a file")
    try:
        return ModelConfig.load_json(path / "config.json")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no config.json; not an HF-format model directory") from None
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _weight_files(path: Path) -> list[Path]:
    if (path / INDEX_NAME).exists():
        try:
            index = json.loads((path / INDEX_NAME).read_text())
            files = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path / INDEX_NAME}: malformed safetensors index ({e})") from None
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise CheckpointError(f"{path / INDEX_NAME}: lists shard(s) that are missing: {', '.join(missing)}")
        return [path / f for f in files]
    if (path / WEIGHTS_NAME).exists():
        return [path / WEIGHTS_NAME]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise CheckpointError(
            f"{path}: only pickled weights (*.bin/*.pt) here; they are never unpickled. Convert once with "
            "transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
    raise CheckpointError(f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME}")


def stored_dtype(path: str | os.PathLike) -> torch.dtype:
    """The weights' dtype a directory's config.json declares (`torch_dtype`, or transformers 5's
    `dtype`); float32 when it names none we write."""
    hf = json.loads((Path(path) / "config.json").read_text())
    return _DTYPES.get(hf.get("torch_dtype") or hf.get("dtype") or "float32", torch.float32)


def check_weights(path: str | os.PathLike) -> None:
    """Opens every weight file's header, which is cheap: a missing, truncated or corrupt file is
    a CheckpointError naming it before anything slow starts (safetensors checks that the header's
    offsets cover the file)."""
    for f in _weight_files(Path(path)):
        try:
            with safe_open(str(f), framework="pt") as fh:
                fh.keys()
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e})") from None


def load_state_dict(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    sd: dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        try:
            with safe_open(str(f), framework="pt", device=str(device)) as fh:
                for k in fh.keys():
                    sd[k] = fh.get_tensor(k)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e})") from None
    return sd


def model_from_state_dict(cfg: ModelConfig, sd: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                          mismatch: str = "weights do not match the config") -> Llama:
    """Our model (eval mode) holding `sd`'s tensors themselves, built on the meta device (no
    initialisation, no copy); every missing, unexpected or misshapen tensor named after `mismatch`."""
    # Old transformers checkpoints carry a rotary buffer that is derived, not learned.
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Llama(cfg)
    expected = {k: p.shape for k, p in model.state_dict().items()
                if not (cfg.tie_embeddings and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s), e.g. {', '.join(unexpected[:3])}")
        raise CheckpointError(f"{mismatch}: " + "; ".join(parts))
    for k, shape in expected.items():
        if sd[k].shape != shape:
            raise CheckpointError(f"{mismatch}: tensor {k} has shape {tuple(sd[k].shape)}, the config implies "
                                  f"{tuple(shape)}")
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rope.build(cfg.max_seq_len, device=torch.device(device))   # buffers were on meta
    return model.eval()


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, tokenizer: bool = True) -> tuple[Llama, Tokenizer | None]:
    """Loads an HF-format Llama directory into our model. dtype None keeps the stored dtype.
    Returns (model in eval mode, tokenizer or None when the directory has none and
    tokenizer=False)."""
    path = Path(path)
    cfg = load_config(path)
    sd = load_state_dict(path, device)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    model = model_from_state_dict(cfg, sd, device, f"{path}: weights do not match config.json")

    tok = None
    if tokenizer:
        try:
            tok = Tokenizer.from_dir(path)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no tokenizer.json or tokenizer.model (pass tokenizer=False to load "
                                  "weights only)") from None
        except (ValueError, RuntimeError) as e:
            raise CheckpointError(str(e)) from None
        if tok.vocab_size > cfg.vocab_size:
            raise CheckpointError(f"{path}: tokenizer has {tok.vocab_size} tokens but the embedding has "
                                  f"{cfg.vocab_size} rows")
    return model, tok
