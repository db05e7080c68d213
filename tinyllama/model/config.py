"""Model configuration: one frozen dataclass and the named presets.

    cfg = ModelConfig.from_name("tinyllama-1.1b")
    cfg.num_params()            # 1_100_048_384
    hf = cfg.to_hf_dict()       # a transformers LlamaConfig / config.json dict
    ModelConfig.from_hf_dict(hf) == cfg

Derived sizes (head_dim, kv_dim) are properties, never stored twice.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinyllama.errors import NotFound, UserError


class UnknownPreset(UserError, KeyError):
    """A preset name that is not in PRESETS (a KeyError too, for dict-like callers)."""

    def __str__(self) -> str:               # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "custom"
    n_layer: int = 22
    d_model: int = 2048
    n_head: int = 32
    n_kv_head: int = 4            # grouped-query attention: n_head // n_kv_head queries share a K/V
    ffn_dim: int = 5632           # SwiGLU hidden size
    vocab_size: int = 32000
    max_seq_len: int = 2048
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # TinyLlama and Llama-2 keep lm_head separate
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        problems = []
        for f in ("n_layer", "d_model", "n_head", "n_kv_head", "ffn_dim", "vocab_size", "max_seq_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                problems.append(f"{f} must be a positive integer, got {v!r}")
        if not problems:
            if self.d_model % self.n_head:
                problems.append(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
            if self.n_head % self.n_kv_head:
                problems.append(f"n_head {self.n_head} is not divisible by n_kv_head {self.n_kv_head}")
            elif (self.d_model // self.n_head) % 2:
                problems.append(f"head_dim {self.d_model // self.n_head} must be even for RoPE")
        if not (self.rope_base > 0):
            problems.append(f"rope_base must be > 0, got {self.rope_base!r}")
        if not (self.norm_eps > 0):
            problems.append(f"norm_eps must be > 0, got {self.norm_eps!r}")
        if problems:
            raise UserError(f"invalid ModelConfig {self.name!r}: " + "; ".join(problems))

    # ---- derived sizes -----------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    def num_params(self, embeddings: bool = True) -> int:
        """Exact parameter count of `Llama(self)` (checked against the module in the tests)."""
        d, kv = self.d_model, self.kv_dim
        attn = d * d + 2 * d * kv + d * d          # q, k, v, o
        mlp = 3 * d * self.ffn_dim                 # gate, up, down
        per_layer = attn + mlp + 2 * d             # + two RMSNorm weights
        total = self.n_layer * per_layer + d       # + final norm
        if embeddings:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        elif not self.tie_embeddings:
            total += self.vocab_size * d           # lm_head still does compute
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12·L·d·T."""
        t = seq_len or self.max_seq_len
        return 6 * self.num_params(embeddings=False) + 12 * self.n_layer * self.d_model * t

    # ---- presets -----------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise UnknownPreset(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face LlamaConfig ------------------------------------------------------
    def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.d_model,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv_head,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_base,
            "rope_scaling": None,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "initializer_range": (2 / (5 * self.d_model)) ** 0.5,
            "torch_dtype": dtype,
            "tinyllama_preset": self.name,
        }

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Reads a transformers LlamaConfig dict; raises ValueError naming the field at fault."""
        arch = hf.get("architectures") or []
        model_type = hf.get("model_type")
        if model_type != "llama" and "LlamaForCausalLM" not in arch:
            raise UserError(
                f"{source}: not a Llama model (model_type={model_type!r}, architectures={arch!r}); "
                "expected model_type 'llama' / LlamaForCausalLM"
            )
        required = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
        missing = [k for k in required if k not in hf]
        if missing:
            raise UserError(f"{source}: missing field(s) {', '.join(missing)}")
        for unsupported in ("attention_bias", "mlp_bias"):
            if hf.get(unsupported):
                raise UserError(f"{source}: field {unsupported}=true is not supported (Llama has no biases)")
        if hf.get("rope_scaling") not in (None, {}) and _rope_type(hf["rope_scaling"]) != "default":
            raise UserError(f"{source}: field rope_scaling={hf['rope_scaling']!r} is not supported (plain RoPE only)")
        if hf.get("hidden_act", "silu") != "silu":
            raise UserError(f"{source}: field hidden_act={hf['hidden_act']!r} is not supported (SwiGLU uses silu)")
        n_head = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // n_head
        if head_dim * n_head != hf["hidden_size"]:
            raise UserError(f"{source}: field head_dim={head_dim} × {n_head} heads != hidden_size {hf['hidden_size']}")
        rope_base = hf.get("rope_theta")
        if rope_base is None and isinstance(hf.get("rope_parameters"), dict):
            rope_base = hf["rope_parameters"].get("rope_theta")
        eos = hf.get("eos_token_id", 2)
        try:
            return cls(
                name=hf.get("tinyllama_preset") or hf.get("_name_or_path") or "custom",
                n_layer=hf["num_hidden_layers"],
                d_model=hf["hidden_size"],
                n_head=n_head,
                n_kv_head=hf.get("num_key_value_heads") or n_head,
                ffn_dim=hf["intermediate_size"],
                vocab_size=hf["vocab_size"],
                max_seq_len=hf.get("max_position_embeddings", 2048),
                rope_base=float(rope_base if rope_base is not None else 10000.0),
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                bos_id=hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 1,
                eos_id=(eos[0] if isinstance(eos, list) else eos) if eos is not None else 2,
            )
        except ValueError as e:
            raise UserError(f"{source}: {e}") from None

    def save_json(self, path: str | Path, dtype: str = "float32") -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(dtype), indent=2) + "\n")

    @classmethod
    def load_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            hf = json.loads(path.read_text())
        except FileNotFoundError:
            raise NotFound(f"{path}: no such file (an HF-format model directory needs config.json)") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text") from None
        if not isinstance(hf, dict):
            raise UserError(f"{path}: expected a JSON object, got {type(hf).__name__}")
        return cls.from_hf_dict(hf, source=str(path))


def _rope_type(rope_scaling: Any) -> str:
    if isinstance(rope_scaling, dict):
        return rope_scaling.get("rope_type") or rope_scaling.get("type") or "default"
    return "unknown"


def _preset(name: str, **kw: Any) -> ModelConfig:
    return ModelConfig(name=name, **kw)


# Exact TinyLlama shapes, plus small presets sized for 2 CPU cores. Parameter counts are
# ModelConfig.num_params() (embeddings and lm_head included); `python -m tinyllama presets`
# prints the table.
PRESETS: dict[str, ModelConfig] = {
    p.name: p
    for p in [
        # TinyLlama-1.1B (arXiv 2401.02385): 1,100,048,384 parameters.
        _preset("tinyllama-1.1b", n_layer=22, d_model=2048, n_head=32, n_kv_head=4, ffn_dim=5632),
        # TinyLlama's tiny_LLaMA_120M config (12 layers, 768 wide, 1 KV group).
        _preset("tinyllama-120m", n_layer=12, d_model=768, n_head=12, n_kv_head=1, ffn_dim=2048),
        # The speculative-decoding target's shape (Llama-2-7B): 6,738,415,616 parameters.
        _preset("llama-2-7b", n_layer=32, d_model=4096, n_head=32, n_kv_head=32, ffn_dim=11008, max_seq_len=4096),
        # Small presets: GQA like TinyLlama, the real 32000-token vocabulary.
        _preset("tinyllama-37m", n_layer=8, d_model=384, n_head=6, n_kv_head=2, ffn_dim=1024, max_seq_len=1024),
        _preset("tinyllama-19m", n_layer=4, d_model=256, n_head=4, n_kv_head=2, ffn_dim=704, max_seq_len=512),
        _preset("tinyllama-debug", n_layer=2, d_model=64, n_head=4, n_kv_head=2, ffn_dim=176, max_seq_len=256),
    ]
}
