"""tinyllama: the shared core of every stage (config, model, tokenizer, checkpoints).

    from tinyllama import ModelConfig, Llama, Tokenizer, load_checkpoint, save_checkpoint
    cfg = ModelConfig.from_name("tinyllama-1.1b")
    model = Llama(cfg)                        # model(ids) -> logits (B, T, vocab)
    cache = KVCache.for_model(model)          # model(ids, cache, Step.span(0, T)): the caller's cache
    tok = Tokenizer.llama2()                  # offline Llama-2 tokenizer
    save_checkpoint(model, tok, "out/dir")    # HF-format directory
    model, tok = load_checkpoint("out/dir")   # also any HF Llama directory

The names above load on first use, so `import tinyllama.allocator` (or a CLI's --help) does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "ModelConfig": "model.config", "PRESETS": "model.config", "Llama": "model.model", "KVCache": "model.cache", "Step": "model.cache",
    "Tokenizer": "formats.tokenizer",
    "load_checkpoint": "formats.checkpoint", "save_checkpoint": "formats.checkpoint",
    "CheckpointError": "formats.checkpoint",
}
__all__ = list(_LAZY)
__version__ = "0.1.0"

if TYPE_CHECKING:
    from tinyllama.formats.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: F401
    from tinyllama.model.config import PRESETS, ModelConfig  # noqa: F401
    from tinyllama.model.cache import KVCache, Step  # noqa: F401
    from tinyllama.model.model import Llama  # noqa: F401
    from tinyllama.formats.tokenizer import Tokenizer  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
