"""Where things go: the project's cache, and checks on outputs made before any work (a bad
--out fails in a second, not after an hour of training).

    cache_dir()                                            # $TINYLLAMA_CACHE, ~/.cache/tinyllama
    llama2_dir(), default_sdist()                          # the offline tokenizer and its source
    check_output_parent(Path("out/model.gguf"), "--out")   # out/ must exist and be a folder
    check_output_dir(Path("out/sft"), "--out")             # and out/sft, if it exists, a folder
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import NotFound, UserError

LLAMA_CPP_VERSION = "0.3.36"       # the llama-cpp-python sdist make setup downloads and builds


def cache_dir() -> Path:
    return Path(os.environ.get("TINYLLAMA_CACHE", Path.home() / ".cache" / "tinyllama"))


def llama2_dir() -> Path:
    return Path(os.environ.get("TINYLLAMA_TOKENIZER_DIR", cache_dir() / "tokenizers" / "llama2"))


def default_sdist() -> Path:
    return cache_dir() / "sdist" / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"


def check_output_parent(path: str | os.PathLike, flag: str | None = None) -> Path:
    """Raises NotFound unless the folder `path` would be written into exists and is a folder."""
    path = Path(path)
    parent = path.parent
    label = f"{flag} {path}: " if flag else ""
    if parent.exists() and not parent.is_dir():
        raise NotFound(f"{label}{parent}: is a file, not a folder")
    if not parent.is_dir():
        raise NotFound(f"{label}{parent}: output folder does not exist")
    return path


def check_output_dir(path: str | os.PathLike, flag: str | None = None) -> Path:
    """check_output_parent, and `path` itself must be a folder if it exists (it is replaced)."""
    path = check_output_parent(path, flag)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag + ' ' if flag else ''}{path}: exists and is not a folder")
    return path
