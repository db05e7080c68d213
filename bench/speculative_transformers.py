"""transformers' own assisted generation on the same PyTorch pair and prompts as bench.speculative:
the anchor our PyTorch-target rows are compared with.

    pair = TransformersPair(target_dir, draft_dir, device)        # LlamaForCausalLM, float32, sdpa
    for name, settings in pair.configs(ks):
        run = pair.decode(prompts, tokens, settings, stop_ids)     # a DecodeRun
    pair.close()

Both checkpoint directories load as `transformers.LlamaForCausalLM` in float32 with sdpa attention;
the draft is `generate`'s `assistant_model`. Greedy; `stop_ids` become `eos_token_id` (none: EOS
ignored, every reply `tokens` long, as ours without --eos). Configurations: plain `generate` (its
own baseline), assisted with the assistant's generation config as transformers leaves it (its
defaults), and assisted at each fixed k (`num_assistant_tokens=k`, constant schedule, no
confidence stop, so every round drafts k as our Fixed(k) does). Each prompt's time excludes the
prefill as ours does: a bare forward over the prompt (the target's, and the assistant's when it
drafts), timed just before, is subtracted from the `generate` call; drafted and accepted counts
are not exposed by `generate`, so those columns stay empty.
"""

from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path

import torch

from . import sync
from .speculative_runs import DecodeRun

PLAIN = "transformers plain generate"


def is_checkpoint_dir(path) -> bool:
    """An HF-format checkpoint directory (what LlamaForCausalLM.from_pretrained reads)."""
    return path is not None and Path(path).is_dir() and (Path(path) / "config.json").is_file()


def skip_reason(target_path, draft_checkpoint) -> str | None:
    """Why transformers' rows cannot run on this pair, or None when they can."""
    if not is_checkpoint_dir(target_path):
        return f"the target {target_path} is not an HF-format checkpoint directory"
    if draft_checkpoint is None:
        return "no HF-format draft: name one with --draft-checkpoint DIR (or a checkpoint directory as --model-draft)"
    if not is_checkpoint_dir(draft_checkpoint):
        return f"--draft-checkpoint {draft_checkpoint} is not an HF-format checkpoint directory"
    return None


@contextlib.contextmanager
def _quiet():
    """transformers' warnings and progress bars off (the assistant's own generate config
    repeats a max_length notice every round), restored after."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


class TransformersPair:
    """The target and its assistant as transformers runs them, on one device."""

    def __init__(self, target_dir, draft_dir, device: torch.device | str = "cpu"):
        from transformers import LlamaForCausalLM

        from tinyllama.errors import UserError

        self.device = torch.device(device)
        with _quiet():
            self.target, self.draft = (LlamaForCausalLM.from_pretrained(p, dtype=torch.float32, attn_implementation="sdpa")
                                       .to(self.device).eval() for p in (target_dir, draft_dir))
        if self.target.config.vocab_size != self.draft.config.vocab_size:
            raise UserError(f"--draft-checkpoint {draft_dir} has a vocabulary of {self.draft.config.vocab_size} "
                            f"but target {target_dir} has {self.target.config.vocab_size}")
        self.draft_defaults = copy.deepcopy(self.draft.generation_config)

    def default_label(self) -> str:
        """The assistant's settings as transformers fills them in when the checkpoint leaves them unset."""
        config = copy.deepcopy(self.draft_defaults)
        defaults = getattr(config, "_get_default_generation_params", dict)()
        config.update(**defaults, defaults_only=True)
        return (f"transformers assisted, its defaults (num_assistant_tokens={config.num_assistant_tokens}, "
                f"{config.num_assistant_tokens_schedule}, confidence stop {config.assistant_confidence_threshold})")

    def configs(self, ks) -> list[tuple[str, dict | None]]:
        """(name, assistant settings or None for plain generate), in the order the table shows them."""
        return [(PLAIN, None), (self.default_label(), {})] + [
            (f"transformers assisted k={k} (constant)", dict(num_assistant_tokens=k, num_assistant_tokens_schedule="constant",
                                                            assistant_confidence_threshold=0.0)) for k in ks]

    @torch.inference_mode()
    def _prefill_seconds(self, model, x: torch.Tensor) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        model(x, use_cache=True, logits_to_keep=1)
        sync(self.device)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def decode(self, prompts, tokens: int, assistant: dict | None, stop_ids=()) -> DecodeRun:
        """Every prompt through `generate`; assistant None: plain, else assisted with these
        settings over the assistant's own (restored first, so a schedule that adapts starts afresh
        in every configuration and carries across its prompts)."""
        self.draft.generation_config = copy.deepcopy(self.draft_defaults)
        kw = {}
        if assistant is not None:
            self.draft.generation_config.update(**assistant)
            kw["assistant_model"] = self.draft
        eos = list(stop_ids) or None
        run = DecodeRun()
        with _quiet():
            for ids in prompts:
                x = torch.tensor([ids], device=self.device)                           # (1, T)
                prefill = self._prefill_seconds(self.target, x)
                if assistant is not None:
                    prefill += self._prefill_seconds(self.draft, x)
                sync(self.device)
                t0 = time.perf_counter()
                out = self.target.generate(x, max_new_tokens=tokens, do_sample=False, eos_token_id=eos,
                                           pad_token_id=eos[0] if eos else 0, **kw)   # (1, T + new)
                sync(self.device)
                run.seconds += time.perf_counter() - t0 - prefill
                run.outputs.append(out[0, len(ids):].tolist())
        return run

    def close(self) -> None:
        del self.target, self.draft
