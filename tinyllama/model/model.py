"""The one model definition: a Llama-2-architecture decoder, written for a single device.

    model = Llama(ModelConfig.from_name("tinyllama-debug"))
    logits = model(ids)                               # ids (B, T) -> logits (B, T, vocab)
    model.setup_kv_cache(batch_size=1, max_seq_len=512)
    logits = model(prompt, start_pos=0)               # prefill: cache positions [0, T)
    logits = model(next_id, start_pos=T)              # decode one step at position T

Pre-norm RMSNorm, rotary embeddings (HF rotate-half convention), SwiGLU MLP, grouped-query
attention, untied lm_head. Parameter names are exactly the Hugging Face Llama names, so a
state dict moves between this module and `transformers.LlamaForCausalLM` unchanged.
LoRA, quantization, FSDP, activation checkpointing, torch.compile and the inference-only weight
packing for CPU decoding (tinyllama.inference.packing, which swaps in subclasses that fuse `qkv` and
`gate_up` into one matmul each) all wrap or replace modules from outside; nothing of them lives
here.

The KV cache is indexed by absolute position: a step at `start_pos` writes K/V to
[start_pos, start_pos + T) and attends to [0, start_pos + T). Rolling back (speculative
decoding) is just calling the next step with a smaller `start_pos`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tinyllama.model.config import ModelConfig
from tinyllama.model.kernels import (
    attention,
    linear_cross_entropy,
    masked_attention,
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


@dataclass
class StaticStep:
    """A step in static shapes (Llama.static_hidden_states): where its T tokens sit and what each
    may see, as tensors, so that nothing about the step is a Python number."""
    positions: torch.Tensor      # (T,) absolute positions
    allowed: torch.Tensor        # (T, S) bool over the whole cache: key s visible to query t iff s <= positions[t]


class KVCache(nn.Module):
    """Preallocated K/V for one layer: (B, n_kv_head, max_seq_len, head_dim)."""

    def __init__(self, batch_size: int, n_kv_head: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        shape = (batch_size, n_kv_head, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor,
               row: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, n_kv, T, hd) -> the cache up to start_pos + T. row: one sequence (B = 1) kept in
        that row of a batched cache (a slot's prompt, serve.batching)."""
        end = start_pos + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache overflow: position {end} > cache length {self.k.shape[2]}; "
                             "call setup_kv_cache with a larger max_seq_len")
        keys, values = (self.k, self.v) if row is None else (self.k[row:row + 1], self.v[row:row + 1])
        if k.shape[0] != keys.shape[0]:
            raise ValueError(f"batch size {k.shape[0]} differs from the KV cache's {keys.shape[0]}")
        keys[:, :, start_pos:end] = k
        values[:, :, start_pos:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def write_at(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, n_kv, T, hd) written at positions (T,) -> the whole cache (B, n_kv, S, hd):
        the same shapes and addresses at every step (tinyllama.inference.graphs captures it)."""
        self.k.index_copy_(2, positions, k)
        self.v.index_copy_(2, positions, v)
        return self.k, self.v

    def update_rows(self, rows: list[int], positions: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token per row at its own position (batched decoding of independent sequences):
        k, v (B, n_kv, 1, hd) written to cache row rows[b] at positions[b] -> the keys and values
        of those rows up to the furthest position (B, n_kv, S, hd) and each row's valid length
        (B,); keys past a row's length belong to nothing and must be masked."""
        index = torch.tensor(rows, device=self.k.device)
        self.k[index, :, positions] = k[:, :, 0]
        self.v[index, :, positions] = v[:, :, 0]
        end = int(positions.max()) + 1
        if rows == list(range(rows[0], rows[0] + len(rows))):     # a run of rows: views, no copy
            keys, values = self.k[rows[0]:rows[0] + len(rows), :, :end], self.v[rows[0]:rows[0] + len(rows), :, :end]
        else:
            keys, values = self.k[index, :, :end], self.v[index, :, :end]
        return keys, values, positions + 1


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        self.kv_cache: KVCache | None = None

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, d) -> q (B, T, H·hd), k and v (B, T, Hkv·hd): three projections of one input
        (one fused matmul once tinyllama.inference.packing has packed this module for decoding)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int | torch.Tensor | StaticStep | None,
                rows: int | list[int] | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q, k = rotate_qk(q.view(B, T, self.n_head, self.head_dim),                   # (B, T, H, hd)
                         k.view(B, T, self.n_kv_head, self.head_dim), cos, sin)      # (B, T, Hkv, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)                     # (B, H*, T, hd)
        lengths = None
        if isinstance(start_pos, StaticStep):
            k, v = self.kv_cache.write_at(start_pos.positions, k, v)                    # (B, Hkv, S, hd)
            y = masked_attention(q, k, v, start_pos.allowed)                            # (B, H, T, hd)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))
        if start_pos is not None:
            if self.kv_cache is None:
                raise RuntimeError("start_pos given but no KV cache: call model.setup_kv_cache() first")
            if isinstance(start_pos, torch.Tensor):       # one token per row, each at its own position
                k, v, lengths = self.kv_cache.update_rows(rows, start_pos, k, v)       # (B, Hkv, S, hd)
            else:
                k, v = self.kv_cache.update(start_pos, k, v, rows)                     # (B, Hkv, S, hd)
        y = attention(q, k, v, key_lengths=lengths)                                    # (B, H, T, hd)
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
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int | torch.Tensor | StaticStep | None,
                rows: int | list[int] | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos, rows)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """`model.*` in HF names: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
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

    # ---- KV cache ----------------------------------------------------------------------
    def setup_kv_cache(self, batch_size: int = 1, max_seq_len: int | None = None,
                       dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        """Allocates per-layer caches of (batch_size, n_kv_head, max_seq_len, head_dim)."""
        cfg = self.config
        max_seq_len = max_seq_len or cfg.max_seq_len
        ref = self.lm_head.weight
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(batch_size, cfg.n_kv_head, max_seq_len, cfg.head_dim,
                                               dtype or ref.dtype, torch.device(device) if device else ref.device)

    def clear_kv_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    @property
    def kv_cache_len(self) -> int:
        cache = self.model.layers[0].self_attn.kv_cache
        return 0 if cache is None else cache.k.shape[2]

    # ---- forward -----------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, start_pos: int | None = None,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab) in float32.

        start_pos None: a plain causal forward over the T tokens (training).
        start_pos p:    the tokens sit at positions [p, p + T) and use the KV cache.
        targets (B, T): the mean cross-entropy instead (a scalar), LM head and loss in one
        (kernels.linear_cross_entropy: never the whole logits where liger-kernel runs). Inside
        forward, not beside it, so that FSDP2's hooks gather lm_head's weight for it.
        """
        h = self.hidden_states(input_ids, start_pos)                           # (B, T, d)
        if targets is not None:
            return linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten())
        return self.head(h).float()                                            # (B, T, vocab)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states (..., d) -> logits (..., vocab) in the model's dtype."""
        return self.lm_head(h)

    def hidden_states(self, input_ids: torch.Tensor, start_pos: int | torch.Tensor | None = None,
                      rows: int | list[int] | None = None) -> torch.Tensor:
        """input_ids (B, T) -> the final-normed hidden states (B, T, d), before lm_head (what a
        chunked/fused LM-head loss needs).

        Independent sequences in one batched KV cache (continuous batching, serve.batching):
        rows=i with an int start_pos runs one sequence (B = 1) in cache row i; rows=[i, j, ...]
        with start_pos a (B,) tensor runs one token per sequence (T = 1), each at its own
        position, attending only to its own row's keys up to that position."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        x = self.model.embed_tokens(input_ids)                       # (B, T, d)
        if isinstance(start_pos, torch.Tensor):
            if T != 1 or rows is None or len(rows) != input_ids.shape[0]:
                raise ValueError("per-row positions need one token per row and the cache row of each")
            cos, sin = rotary_rows(*self.rope.at(start_pos, x.dtype))   # (B, 1, 1, hd) each
        else:
            first = 0 if start_pos is None else start_pos
            cos, sin = self.rope.span(first, T, x.dtype, x.device)   # (T, hd) each
            cos, sin = prepare_rotary(cos, sin, x)                   # once for all layers
        for layer in self.model.layers:
            x = layer(x, cos, sin, start_pos, rows)
        return self.model.norm(x)

    def static_hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) at positions (T,), a tensor -> final-normed hidden states (B, T, d),
        attending over the whole preallocated KV cache through a (T, S) mask: the same shapes,
        addresses and no host synchronisation at every position, so a step can be captured as a
        CUDA graph (tinyllama.inference.graphs). The rotary tables must already cover the cache."""
        cache = self.model.layers[0].self_attn.kv_cache
        if cache is None:
            raise RuntimeError("static steps need a KV cache: call model.setup_kv_cache() first")
        x = self.model.embed_tokens(input_ids)                                       # (B, T, d)
        keys = torch.arange(cache.k.shape[2], device=positions.device)
        step = StaticStep(positions, keys[None, :] <= positions[:, None])            # mask (T, S), once per step
        cos, sin = self.rope.cos[positions].to(x.dtype), self.rope.sin[positions].to(x.dtype)   # (T, hd) each
        cos, sin = prepare_rotary(cos, sin, x)
        for layer in self.model.layers:
            x = layer(x, cos, sin, step)
        return self.model.norm(x)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
