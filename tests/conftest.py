"""Shared fixtures: tiny random configs, the offline Llama-2 tokenizer, a saved checkpoint."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

# The Python processes the tests start (`python -m prepare` from a temporary folder) import this
# checkout's stages, as the tests themselves do (pyproject.toml's `pythonpath` reaches this process
# only): an installed project, editable or not, makes only `tinyllama` and `tinyllama_lifecycle`
# importable, and a second checkout's tests must not run the first one's stages.
ROOT = Path(__file__).resolve().parent.parent
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from tinyllama import Llama, ModelConfig, Tokenizer  # noqa: E402
from tinyllama.paths import cache_dir  # noqa: E402

# Measured decisions (dtype choices, decode layouts: tinyllama.measure) are kept apart from the
# user's, in a folder of the suite's own that lasts across runs on this machine: a choice measured
# near its margin (bf16 against float32 for a tiny model) is taken once and then kept, so two runs
# of the suite on one machine decide alike. (Decisions are keyed by the CPU, its ISA limits, the
# thread count and torch's version, so other settings measure their own.)
os.environ.setdefault("TINYLLAMA_DECISIONS", str(cache_dir() / "test-decisions"))


# A test that needs llama.cpp's own tools asks for the llama_cpp_tools fixture, which builds them
# once, up front, with a timeout; any other test that reaches for a missing tool gets a clear error
# (here and in the processes it starts) instead of minutes of compiling inside its own run.
os.environ["TINYLLAMA_TOOLS_BUILD"] = "never"
TOOLS_BUILD_TIMEOUT = 40 * 60        # the build: 6-9 min on a 2-core AVX2 EPYC, 8 min on an AMX Xeon


def pytest_collection_modifyitems(config, items):
    """gpu tests skip without a CUDA device; llamacpp tests without llama-cpp-python, which set-up
    leaves out, saying so, where it cannot compile it (no C++ compiler)."""
    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA device")
    if importlib.util.find_spec("llama_cpp") is None:
        skips["llamacpp"] = pytest.mark.skip(reason="needs llama-cpp-python, which make setup builds")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
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
def fresh_layout_cache(tmp_path, monkeypatch):
    """No packing decision in memory or on disk yet (as for a new model on a new machine), and
    those the test makes forgotten after it. Yields the layouts' decision file."""
    from tinyllama.inference import packing

    packing.forget_decisions()
    monkeypatch.setenv("TINYLLAMA_DECISIONS", str(tmp_path / "cache"))
    yield tmp_path / "cache" / "packing-layouts.json"
    packing.forget_decisions()


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


@pytest.fixture(scope="session")
def llama_cpp_tools(tmp_path_factory):
    """The folder of llama.cpp's own tools (llama-quantize, llama-imatrix, llama-perplexity,
    llama-server, llama-speculative-simple), built once per machine before the first test that
    needs them. A build that fails or overruns TOOLS_BUILD_TIMEOUT fails those tests with the
    build's own message and the end of its log."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by make setup")
    from tinyllama.llamacpp.tools import TOOLS, ToolBuildError, build_tools, tools_dir

    where = tools_dir()
    if all((where / name).is_file() for name in TOOLS):
        return where
    try:
        return build_tools(timeout=TOOLS_BUILD_TIMEOUT)
    except ToolBuildError as e:
        pytest.fail(f"llama.cpp's tools could not be built for the tests that need them: {e}", pytrace=False)


@pytest.fixture(scope="session")
def real_gguf():
    """SmolLM2-135M-Instruct's GGUF (tinyllama.real_model; `make real-model`, run by `make test`
    where the package registry is reachable); the tests that need it skip with the fix otherwise."""
    from tinyllama import real_model

    path = real_model.path()
    if path is None:
        pytest.skip(real_model.absent_reason())
    return path


@pytest.fixture(scope="session")
def real_checkpoint(real_gguf, tmp_path_factory):
    """The real model imported into an HF-format directory (float32, dequantized from Q4_1)."""
    from quantize.gguf_import import import_gguf

    return import_gguf(real_gguf, tmp_path_factory.mktemp("real") / "smollm2", say=lambda _: None)
