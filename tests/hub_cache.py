"""A Hugging Face hub cache built by hand, in huggingface_hub's own layout, for offline tests:

    HF_HOME/hub/models--org--name/blobs/<sha256>            the file contents
    HF_HOME/hub/models--org--name/snapshots/<commit>/FILE   symlinks to ../../blobs/<sha256>
    HF_HOME/hub/models--org--name/refs/main                 the commit the branch points at

    add_repo(hf_home, "acme/tiny-chat", {"config.json": Path(...), "README.md": b"..."})
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def add_repo(hf_home: Path, repo: str, files: dict[str, Path | bytes], revision: str = "main") -> Path:
    """Caches `files` as `repo` at `revision`; returns the snapshot folder."""
    root = Path(hf_home) / "hub" / ("models--" + repo.replace("/", "--"))
    commit = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
    snapshot = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        data = content if isinstance(content, bytes) else Path(content).read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    return snapshot


def add_dir(hf_home: Path, repo: str, directory: Path, revision: str = "main", skip: tuple[str, ...] = ()) -> Path:
    """Caches every file directly in `directory` as `repo`."""
    return add_repo(hf_home, repo, {p.name: p for p in sorted(Path(directory).iterdir())
                                    if p.is_file() and p.name not in skip}, revision)
