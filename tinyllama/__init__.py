"""tinyllama: the shared core of every stage (config, model, tokenizer, checkpoints).

    from tinyllama import ModelConfig, Llama, Tokenizer, load_checkpoint, save_checkpoint
    cfg = ModelConfig.from_name("tinyllama-1.1b")
    model = Llama(cfg)                        # model(ids) -> logits (B, T, vocab)
    tok = Tokenizer.llama2()                  # offline Llama-2 tokenizer
    save_checkpoint(model, tok, "out/dir")    # HF-format directory
    model, tok = load_checkpoint("out/dir")   # also any HF Llama directory
"""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import PRESETS, ModelConfig
from .model import Llama
from .tokenizer import Tokenizer

__all__ = ["ModelConfig", "PRESETS", "Llama", "Tokenizer", "load_checkpoint", "save_checkpoint", "CheckpointError"]
__version__ = "0.1.0"
