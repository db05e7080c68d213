"""Writes that are all or nothing: build under a temporary sibling name, then rename.

    with atomic_dir("out/final") as tmp:      # tmp is a fresh directory beside out/final
        write_everything_into(tmp)
    # out/final now holds the complete result; an exception leaves the old one untouched

    with atomic_file("model.gguf") as tmp:    # tmp is a path beside model.gguf
        write(tmp)

A crash or kill mid-write leaves only a dot-named temporary, never a half-written final name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tinyllama.paths import check_output_parent


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


@contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    final = Path(final)
    check_output_parent(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                os.chmod(f, 0o644)   # mkstemp and safetensors create 0600; results are meant to be shared
                _fsync(f)
        os.chmod(tmp, 0o755)
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[Path]:
    final = Path(final)
    check_output_parent(final)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        _fsync(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
