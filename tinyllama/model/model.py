"""The one model definition: a Llama-2-architecture decoder, written for a single device.

    model = Llama(ModelConfig.from_name("tinyllama-debug"))
    logits = model(ids)                                        # ids (B, T) -> logits (B, T, vocab)
    cache = KVCache.for_model(model, batch_size=1, max_seq_len=512)   # the caller's, not the model's
    logits = model(prompt, cache, Step.span(0, T))             # prefill: cache positions [0, T)
    logits = model(next_id, cache, Step.span(T, 1))            # decode one step at position T

Pre-norm RMSNorm, rotary embeddings (HF rotate-half convention), SwiGLU MLP, grouped-query
attention, untied lm_head. Parameter names are exactly the Hugging Face Llama names, so a
state dict moves between this module and `transformers.LlamaForCausalLM` unchanged.
LoRA, quantization, FSDP, activation checkpointing, torch.compile and the inference-only weight
packing for CPU decoding (tinyllama.inference.packing, which swaps in subclasses that fuse `qkv` and
`gate_up` into one matmul each) all wrap or replace modules from outside; nothing of them lives
here.

The model holds no state between calls: the KV cache (tinyllama.model.cache) belongs to whoever
decodes (a backend, the CUDA-graph decoder, the server's batch runner), and a `Step` says where
the call's tokens sit in it. It is indexed by absolute position, so rolling back (speculative
decoding) is just the next step starting at an earlier position.
"""

from __future__ import annotations

import math
import torch
from torch import nn

from tinyllama.model.cache import KVCache, Step
from tinyllama.model.config import ModelConfig
from tinyllama.model.kernels import (
    attention,
    linear_cross_entropy,
    prepare_rotary,
    rms_norm,
    rotary_rows,
    rotate_qk,
    swiglu,
)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions [0, max_seq_len); shape (max_seq_len, head_dim)."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float) -> None:
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self.build(max_seq_len)

    @torch.inference_mode(False)      # normal tensors even when first built during generation
    def build(self, max_seq_len: int, device: torch.device | None = None) -> None:
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim))
        t = torch.arange(max_seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)                  # (S, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)           # (S, hd): rotate-half layout
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def span(self, first: int, T: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables for positions [first, first + T): slices, no gather and no device sync
        (a decode step's few microseconds matter on CPU). Rebuilt lazily when the tables are on
        another device (a model built on the meta device, then loaded with assign=True) or too
        short."""
        if self.cos.device != device or first + T > self.cos.shape[0]:
            self.build(max(first + T, self.cos.shape[0]), device=device)
        return self.cos[first:first + T].to(dtype), self.sin[first:first + T].to(dtype)   # (T, hd) each

    def at(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables at one position per batch row: positions (B,) -> cos, sin (B, hd)."""
        last = int(positions.max()) + 1
        if self.cos.device != positions.device or last > self.cos.shape[0]:
            self.build(max(last, self.cos.shape[0]), device=positions.device)
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx                    # which of a KVCache's layers is this one's
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, d) -> q (B, T, H·hd), k and v (B, T, Hkv·hd): three projections of one input
        (one fused matmul once tinyllama.inference.packing has packed this module for decoding)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                step: Step | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q, k = rotate_qk(q.view(B, T, self.n_head, self.head_dim),                   # (B, T, H, hd)
                         k.view(B, T, self.n_kv_head, self.head_dim), cos, sin)      # (B, T, Hkv, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)                     # (B, H*, T, hd)
        if cache is not None:
            cache.write(self.layer_idx, step, k, v)
            k, v = cache.read(self.layer_idx, step)                                     # (B, Hkv, S, hd)
            y = attention(q, k, v, key_lengths=step.lengths, mask=step.mask)            # (B, H, T, hd)
        else:
            y = attention(q, k, v)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, d) -> gate and up (B, T, ffn): one fused matmul once packed for decoding."""
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down_proj(swiglu(gate, up))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                step: Step | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, step)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """`model.*` in HF names: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        self.reset_parameters()

    # ---- initialisation ----------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """TinyLlama's initialisation: N(0, sqrt(2/(5d))) everywhere (embeddings, projections,
        lm_head); the residual-branch outputs (o_proj, down_proj) N(0, 1/sqrt(d)/n_layer);
        RMSNorm weights 1. A no-op on the meta device."""
        cfg = self.config
        std = math.sqrt(2.0 / (5 * cfg.d_model))
        out_std = 1.0 / math.sqrt(cfg.d_model) / cfg.n_layer
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=out_std)
            elif name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    # ---- forward -----------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, step: Step | None = None,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab) in float32.

        No cache: a plain causal forward over the T tokens (training).
        cache and step: the tokens sit where `step` says (tinyllama.model.cache) and attend to
        what the cache holds.
        targets (B, T): the mean cross-entropy instead (a scalar), LM head and loss in one
        (kernels.linear_cross_entropy: never the whole logits where liger-kernel runs). Inside
        forward, not beside it, so that FSDP2's hooks gather lm_head's weight for it.
        """
        h = self.hidden_states(input_ids, cache, step)                        # (B, T, d)
        if targets is not None:
            return linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten())
        return self.head(h).float()                                            # (B, T, vocab)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states (..., d) -> logits (..., vocab) in the model's dtype."""
        return self.lm_head(h)

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                      step: Step | None = None) -> torch.Tensor:
        """input_ids (B, T) -> the final-normed hidden states (B, T, d), before lm_head (what a
        chunked/fused LM-head loss needs). With a cache, `step` places the tokens in it."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if (cache is None) != (step is None):
            raise ValueError("a KV cache and a Step go together: pass both or neither")
        if step is not None:
            if step.n_tokens != input_ids.shape[1]:
                takes = "one token" if step.n_tokens == 1 else f"{step.n_tokens} tokens"
                raise ValueError(f"the step takes {takes} per row, input_ids has {input_ids.shape[1]}")
            cache.check(step, input_ids.shape[0])
        x = self.model.embed_tokens(input_ids)                       # (B, T, d)
        cos, sin = self.rotary(x, step)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, step)
        return self.model.norm(x)

    def rotary(self, x: torch.Tensor, step: Step | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables for the step's positions, prepared once for all layers: (T, hd) as
        prepare_rotary gives them, or (B, 1, 1, hd) for one position per row."""
        if step is not None and step.kind == "per_row":
            return rotary_rows(*self.rope.at(step.positions, x.dtype))
        if step is not None and step.kind == "static":      # gathered: no Python number (CUDA graphs)
            cos, sin = self.rope.cos[step.positions].to(x.dtype), self.rope.sin[step.positions].to(x.dtype)
        else:
            cos, sin = self.rope.span(0 if step is None else step.start, x.shape[1], x.dtype, x.device)
        return prepare_rotary(cos, sin, x)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
