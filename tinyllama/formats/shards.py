"""The packed token-shard format (`tinyllama-packed-v1`): the one place that writes and reads it.

    writer = ShardWriter(out_dir, "train", shard_tokens=1 << 24, dtype=packed_dtype(tok.vocab_size))  # prepare
    writer.add(ids); info = writer.close()                          # {"documents", "tokens", "shards"}
    src = PackedSource("data/tokens/natural", split="validation")   # pretrain.data, evaluation
    src.block(j, seq_len)                                           # (seq_len + 1,) int64 tokens

A source directory holds `<split>-NNNNN.bin` shards (token ids, little-endian uint16, or uint32
where the vocabulary has more than 65,536 ids) and `manifest.json` (format, name, dtype,
tokenizer fingerprint, per split its shards with token counts and sha256). prepare writes the manifest; every reader checks it through PackedSource.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from tinyllama.errors import UserError
from tinyllama.paths import check_disk_space


def packed_dtype(vocab_size: int) -> np.dtype:
    """Token ids on disk: little-endian uint16 for vocabularies of up to 65,536 ids (Llama-2,
    SmolLM2: half the bytes), uint32 beyond (Llama-3's 128,256)."""
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")

FORMAT = "tinyllama-packed-v1"


class ShardWriter:
    """Appends token ids and writes fixed-size shards (uint16, or uint32 for vocabularies over
    65,536 ids); the last one keeps its length."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, dtype: np.dtype = np.dtype("<u2")) -> None:
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.buffer = np.empty(shard_tokens, dtype=self.dtype)
        self.filled = 0
        self.shards: list[dict] = []
        self.tokens = 0
        self.documents = 0

    def add(self, ids: np.ndarray, documents: int = 1) -> None:
        """Appends `documents` whole documents' ids (one, or a run of them)."""
        self.documents += documents
        self.tokens += len(ids)
        while len(ids):
            n = min(len(ids), self.shard_tokens - self.filled)
            self.buffer[self.filled:self.filled + n] = ids[:n]
            self.filled += n
            ids = ids[n:]
            if self.filled == self.shard_tokens:
                self._flush()

    def _flush(self) -> None:
        if not self.filled:
            return
        data = self.buffer[:self.filled].tobytes()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        check_disk_space(self.out_dir / name, len(data))       # a clear error, not a short shard
        (self.out_dir / name).write_bytes(data)
        self.shards.append({"file": name, "tokens": self.filled, "sha256": hashlib.sha256(data).hexdigest()})
        self.filled = 0

    def close(self) -> dict:
        self._flush()
        return {"documents": self.documents, "tokens": self.tokens, "shards": self.shards}


def _manifest_dtype(mpath: Path, name: object) -> np.dtype:
    if name not in ("uint16", "uint32"):
        raise ShardError(f"{mpath}: dtype {name!r}; token shards are 'uint16' or 'uint32'")
    return np.dtype(name).newbyteorder("<")


class ShardError(UserError):
    """A shard directory that is missing, damaged or from another tokenizer; names the file."""


class PackedSource:
    """One source's split as a single token stream over memory-mapped shards (the manifest's
    dtype: uint16, or uint32 for vocabularies over 65,536 ids)."""

    def __init__(self, path: str | Path, split: str = "train", verify: bool = False) -> None:
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        if not mpath.exists():
            raise ShardError(f"{mpath}: not found; build the shards with `python -m prepare`")
        try:
            self.manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise ShardError(f"{mpath}: invalid JSON at line {e.lineno}: {e.msg}") from None
        if self.manifest.get("format") != FORMAT:
            raise ShardError(f"{mpath}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        if split not in self.manifest.get("splits", {}):
            raise ShardError(f"{mpath}: no split {split!r}")
        self.name = self.manifest["name"]
        self.split = split
        self.dtype = _manifest_dtype(mpath, self.manifest.get("dtype", "uint16"))
        self.arrays: list[np.memmap] = []
        for shard in self.manifest["splits"][split]["shards"]:
            f = self.path / shard["file"]
            if not f.exists():
                raise ShardError(f"{f}: shard listed in manifest.json is missing")
            expected = self.dtype.itemsize * shard["tokens"]
            if f.stat().st_size != expected:
                raise ShardError(f"{f}: {f.stat().st_size} bytes, manifest.json says {expected} "
                                "(truncated or overwritten)")
            if verify and hashlib.sha256(f.read_bytes()).hexdigest() != shard["sha256"]:
                raise ShardError(f"{f}: sha256 differs from manifest.json (corrupt shard)")
            self.arrays.append(np.memmap(f, dtype=self.dtype, mode="r"))
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])   # (n_shards + 1,)
        self.tokens = int(self.offsets[-1])

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    def check_tokenizer(self, fingerprint: str) -> None:
        if self.tokenizer_fingerprint != fingerprint:
            raise ShardError(f"{self.path / 'manifest.json'}: shards were tokenized with a different tokenizer "
                            f"(fingerprint {self.tokenizer_fingerprint[:12]}…, this run uses {fingerprint[:12]}…); "
                            "re-run prepare with the run's tokenizer")

    def num_blocks(self, seq_len: int) -> int:
        return max(0, (self.tokens - 1) // seq_len)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream, across shard boundaries."""
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        filled = 0
        while filled < length:
            local = start + filled - int(self.offsets[i])
            n = min(length - filled, len(self.arrays[i]) - local)
            out[filled:filled + n] = self.arrays[i][local:local + n]
            filled += n
            i += 1
        return out

    def block(self, j: int, seq_len: int) -> np.ndarray:
        return self.read(j * seq_len, seq_len + 1)
