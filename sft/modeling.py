"""The transformers face of `tinyllama.model.model.Llama`, so trl, peft and bitsandbytes train it.

    model = TinyLlamaForCausalLM.from_pretrained("out/pretrain/final")            # fp32 / bf16
    model = TinyLlamaForCausalLM.from_pretrained(dir, quantization_config=nf4)     # QLoRA base

There is no second architecture here. `__init__` builds our `Llama` and registers its own
submodules (`model`, `lm_head`) under the same Hugging Face names, so
- `from_pretrained` / `save_pretrained` read and write the same safetensors layout,
- peft finds `model.layers.N.self_attn.q_proj` etc. and an adapter trained here loads onto
  `transformers.LlamaForCausalLM` unchanged (and vice versa),
- bitsandbytes swaps the `nn.Linear`s in place, inside the very modules `Llama.forward` calls.

Forward accepts what trl's collator sends: right-padded batches (padding sits after every real
token, so causal attention never lets a real token see it; its labels are -100), or a
padding-free packed row with `position_ids` that restart at 0 for each example. A packed row
is split at those restarts and each example runs on its own, so packing never lets one
example attend to another: the loss equals the unpacked loss.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import GenerationConfig, LlamaConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast

from tinyllama.model.config import ModelConfig
from tinyllama.model.model import Block, Llama


class TinyLlamaForCausalLM(PreTrainedModel):
    config_class = LlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]
    # a model with tied embeddings (SmolLM2) stores only the embedding; transformers ties lm_head to
    # it after loading (config.tie_word_embeddings), as for its own LlamaForCausalLM. Without this,
    # lm_head was "missing" and freshly initialised: SFT on SmolLM2 started from a loss of 1e22.
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        cfg = ModelConfig.from_hf_dict(config.to_dict())
        llama = Llama(cfg)
        # The Llama itself is kept out of the module tree (no "llama." prefix on any name);
        # its children are registered here under their HF names and stay shared with it.
        object.__setattr__(self, "llama", llama)
        self.model = llama.model
        self.lm_head = llama.lm_head
        self.rope = llama.rope
        object.__setattr__(self, "_backbone", HFBackbone(llama))
        self.generation_config = GenerationConfig(bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id)
        self.post_init()

    # ---- what PreTrainedModel needs ------------------------------------------------------
    def _init_weights(self, module: torch.nn.Module) -> None:
        # Weights always come from a checkpoint (missing tensors are an error there), so this
        # only has to leave modules alone; Llama.reset_parameters is the initialiser.
        pass

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None,
                                    every_n_layers: int = 1) -> None:
        # Recompute each block's activations in backward. The blocks keep their names (no
        # wrapper module), so adapter and checkpoint keys do not change.
        func = gradient_checkpointing_func or functools.partial(checkpoint, use_reentrant=False)
        for i, block in enumerate(self.model.layers):
            if "forward" in block.__dict__:
                del block.forward
            if enable and i % every_n_layers == 0:
                block.forward = functools.partial(func, Block.forward.__get__(block))

    @property
    def is_checkpointing_blocks(self) -> bool:
        return any("forward" in block.__dict__ for block in self.model.layers)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> "TinyLlamaForCausalLM":
        kwargs.setdefault("use_safetensors", True)   # never unpickle a pytorch_model.bin
        model = super().from_pretrained(*args, **kwargs)
        # The cos/sin tables are non-persistent buffers: transformers materialises them from the
        # meta device without values, so rebuild them where the weights landed.
        model.rope.build(model.tinyllama_config.max_seq_len, device=model.lm_head.weight.device)
        return model

    @property
    def tinyllama_config(self) -> ModelConfig:
        return self.llama.config

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> dict:
        # peft's causal-LM wrapper looks this up; generation itself is tinyllama.inference.generate's job.
        raise NotImplementedError("this training wrapper does not generate; load the saved directory with "
                                  "tinyllama.load_checkpoint and use tinyllama.inference.generate")

    @property
    def base_model(self) -> "HFBackbone":
        """What transformers and trl call the backbone: `base_model(input_ids=..., ...)` returns
        `.last_hidden_state` (trl's fused LM-head loss projects it through lm_head in chunks)."""
        return self._backbone

    # ---- forward -------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                num_items_in_batch: int | torch.Tensor | None = None, **kwargs: Any) -> CausalLMOutputWithPast:
        """input_ids (B, T) -> logits (B, T, vocab) float32; with labels, loss = next-token cross
        entropy over labels != -100, averaged over those tokens (or over num_items_in_batch
        when the Trainer passes it, so gradient accumulation weighs every token equally)."""
        hidden = self._backbone(input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        logits = self.lm_head(hidden).float()                                  # (B, T, V)
        loss = None
        if labels is not None:
            if position_ids is not None:
                # The last token of one packed example must not predict the next example's first.
                labels = labels.masked_fill(position_ids == 0, -100)
            shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])         # (B*(T-1), V)
            shift_labels = labels[:, 1:].reshape(-1).to(logits.device)          # (B*(T-1),)
            loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
            n = (shift_labels != -100).sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
            loss = loss / torch.as_tensor(n, device=loss.device)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


class HFBackbone(torch.nn.Module):
    """A view of `Llama.hidden_states` with the keyword arguments transformers and trl pass.
    Not registered as a submodule (it owns no weights); `TinyLlamaForCausalLM.base_model`."""

    _tp_plan = None
    _pp_plan = None

    def __init__(self, llama: Llama) -> None:
        super().__init__()
        object.__setattr__(self, "llama", llama)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **unused: Any) -> BaseModelOutput:
        """(B, T) -> last_hidden_state (B, T, d). Right padding only (pads come after every
        real token, so causal attention never lets a real token see one); a padding-free
        packed row (B = 1, position_ids restarting at 0 per example) runs example by example."""
        if attention_mask is not None and bool((attention_mask[:, :-1] < attention_mask[:, 1:]).any()):
            raise ValueError("left padding is not supported: pad on the right (padding_side='right')")
        if position_ids is not None and input_ids.shape[0] == 1 and bool((position_ids[0, 1:] == 0).any()):
            hidden = torch.cat([self.llama.hidden_states(seg) for seg in _split_packed(input_ids, position_ids)], dim=1)
        else:
            hidden = self.llama.hidden_states(input_ids)                       # (B, T, d)
        return BaseModelOutput(last_hidden_state=hidden)


def _split_packed(input_ids: torch.Tensor, position_ids: torch.Tensor) -> list[torch.Tensor]:
    """(1, T) packed ids + positions restarting at 0 per example -> [(1, T_i), ...]."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    bounds = starts[1:] + [input_ids.shape[1]]
    return [input_ids[:, s:e] for s, e in zip(starts, bounds) if e > s]
