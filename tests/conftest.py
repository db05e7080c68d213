"""Shared fixtures: tiny random configs, the offline Llama-2 tokenizer, a saved checkpoint."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# measured decisions (dtype choices, decode layouts: tinyllama.measure) go to a folder of this
# run, not the user's cache
os.environ["TINYLLAMA_DECISIONS"] = tempfile.mkdtemp(prefix="tinyllama-test-")

from tinyllama import Llama, ModelConfig, Tokenizer  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def llama2_tokenizer() -> Tokenizer:
    # No skip: the tokenizer is part of the foundation and `make setup` builds it.
    return Tokenizer.llama2()


@pytest.fixture(scope="session")
def tiny_chat_checkpoint(tmp_path_factory, llama2_tokenizer):
    """A random tinyllama-debug checkpoint (seed 0) saved once per session as `tiny-chat/`.
    Read-only: tests that change files copy it first."""
    from tinyllama import save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-chat"
    save_checkpoint(Llama(ModelConfig.from_name("tinyllama-debug")), llama2_tokenizer, path)
    return path


@pytest.fixture
def small_config() -> ModelConfig:
    """A random small GQA config: 3 query heads per KV group, odd sizes on purpose."""
    return ModelConfig(name="test-gqa", n_layer=3, d_model=96, n_head=6, n_kv_head=2, ffn_dim=200,
                       vocab_size=320, max_seq_len=64, rope_base=10000.0, norm_eps=1e-5)


@pytest.fixture
def small_model(small_config) -> Llama:
    torch.manual_seed(0)
    model = Llama(small_config).eval()
    # Norm weights start at 1; randomise them so parity tests would notice a misplaced weight.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model
