"""tinyllama: one front door to every stage of the lifecycle (the `tinyllama` console script).

    tinyllama pretrain --config pretrain/configs/cpu.yaml      # = python -m pretrain ...
    tinyllama sft --base out/pretrain/final --out out/sft      # = python -m sft ...
    tinyllama quantize --model out/sft --type q4_k_m --out out/gguf
    tinyllama import SmolLM2-135M-Instruct.Q4_1.gguf --out out/smollm2     # a GGUF -> a checkpoint
    tinyllama serve --model out/gguf/tinyllama-19m-chat-Q4_K_M.gguf
    tinyllama presets                                          # the core's own commands
    tinyllama STAGE --help                                     # each stage's options

It lives outside the core on purpose: the core (tinyllama/) imports no stage, and this only
dispatches to each stage's own `main(argv)`, loading nothing until a stage is named.
`python -m tinyllama_lifecycle ...` (and, in a checkout, `python -m lifecycle ...`) is the same.

Where the stages are. In a checkout they are top-level packages beside this folder (`python -m serve`
from the root, tests import `serve.engine`). An installed wheel puts them inside this package's
folder instead (pyproject.toml maps `tinyllama_lifecycle.serve` to `serve/`, and so on), so that
site-packages gains only `tinyllama` and `tinyllama_lifecycle`, and a stage never collides with
another distribution's `serve` or `evaluation`. The stages import one another and themselves by
their short names (`from serve.engine import Engine`), so before dispatching, `main` puts the folder
that holds them first on sys.path, and on PYTHONPATH for the Python processes a stage starts
(datatrove's SLURM workers unpickle `prepare.engine` objects). The short names are then importable
in this process and its children only: `import serve` in any other program finds nothing of ours.
They are never imported as `tinyllama_lifecycle.serve`, which would load a second copy of each
module. (Renaming the stages into this package everywhere would have changed every stage's imports,
the tests and every `python -m serve`; mapping them at packaging time changes none of them.)
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

# command -> (module whose main(argv) runs it, what it does)
STAGES = {
    "corpus": ("prepare.corpus", "build and tokenize the default corpus (make data)"),
    "prepare": ("prepare.__main__", "raw text or code -> packed token shards"),
    "pretrain": ("pretrain.__main__", "pretrain (or resume) with FSDP2 from a YAML config and flags"),
    "sft": ("sft.__main__", "chat fine-tuning: full, LoRA or QLoRA"),
    "distill": ("sft.distill", "a teacher's greedy answers as a draft model's SFT data"),
    "quantize": ("quantize.__main__", "export to GGUF files for llama.cpp, verified"),
    "draft": ("tinyllama_lifecycle.draft", "a speculative-decoding draft for a target: its vocabulary, its answers, a GGUF"),
    "import": ("quantize.gguf_import", "a GGUF file -> an HF-format checkpoint directory (dequantized)"),
    "complete": ("serve.complete", "stream a completion or a chat reply to the terminal"),
    "serve": ("serve.__main__", "the OpenAI-compatible HTTP server"),
    "demo": ("demo.__main__", "the Gradio chat app"),
    "eval": ("evaluation.__main__", "lm-eval tasks, perplexity, checkpoint sweeps"),
    "presets": ("tinyllama.__main__", "the model presets with exact parameter counts"),
    "init": ("tinyllama.__main__", "a freshly initialised checkpoint directory"),
    "inspect": ("tinyllama.__main__", "load a directory, print its shape, check it against transformers"),
    "tokenizer": ("tinyllama.__main__", "build the offline Llama-2 tokenizer, or encode a text"),
}
CORE = {"presets", "init", "inspect", "tokenizer"}


def stage_root() -> Path:
    """The folder holding the stage packages: this one in an installed wheel, its parent in a checkout."""
    here = Path(__file__).resolve().parent
    return here if (here / "serve" / "__init__.py").is_file() else here.parent


def make_stages_importable() -> Path:
    """Puts stage_root() first on sys.path and on PYTHONPATH (for child processes); returns it."""
    root = str(stage_root())
    if root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    os.environ["PYTHONPATH"] = os.pathsep.join([root, *inherited])
    return Path(root)


def usage() -> str:
    width = max(map(len, STAGES))
    lines = [__doc__.split("\n\n")[0], "", "usage: tinyllama COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what) in STAGES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in STAGES:
        print(f"tinyllama: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    make_stages_importable()
    module = importlib.import_module(STAGES[command][0])
    return module.main([command, *rest] if command in CORE else rest) or 0
