"""Model references: what a user types after --model, --base, --draft, --teacher or --init-from,
turned into local files by one function.

    resolve_model("out/sft")                                    # a local HF-format directory, as is
    resolve_model("out/gguf/tinyllama-19m-chat-Q4_K_M.gguf")    # a local GGUF, as is
    resolve_model("TinyLlama/TinyLlama-1.1B-Chat-v1.0")         # a hub repo: its cached snapshot
    resolve_model("TinyLlama/TinyLlama-1.1B-Chat-v1.0@main")    # ... at a revision (or revision=)
    resolve_model("TheBloke/Llama-2-7B-Chat-GGUF:Q4_K_M")       # the repo's GGUF of that quant type
    resolve_model("TheBloke/Llama-2-7B-Chat-GGUF/llama-2-7b-chat.Q4_K_M.gguf")   # one file of a repo
    ref.path, ref.kind ("checkpoint" | "gguf"), ref.name

A hub repo is fetched through huggingface_hub, so HF_HOME / HF_HUB_CACHE, HF_TOKEN and
HF_HUB_OFFLINE=1 mean what they mean everywhere else, and downloads show its progress bars. Only
what a stage loads is fetched: config, safetensors, tokenizer files and chat template; never
PyTorch `.bin` pickles. The `org/name:QUANT` form is llama.cpp's `-hf` convention: the file
whose name carries that quant type (a split GGUF brings all its parts).
"""

from __future__ import annotations

import fnmatch
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from tinyllama.errors import NotFound, UserError

# What a checkpoint stage reads from a repo (tinyllama.formats.checkpoint, Tokenizer.from_dir, chat).
CHECKPOINT_FILES = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "chat_template.json")
KINDS = ("checkpoint", "gguf")

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_REPO = re.compile(rf"^(?P<repo>{_NAME}/{_NAME})(?:@(?P<rev>[^:/@]+))?"
                   rf"(?::(?P<quant>[A-Za-z0-9_]+)|/(?P<file>[^@]+\.gguf))?$")
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


class HubError(UserError):
    """A model reference that cannot be resolved; the message names it and what to do."""


@dataclass(frozen=True)
class ModelRef:
    """A resolved reference: local files, whatever the user typed."""

    path: Path            # a checkpoint directory, or a .gguf file (the first part of a split one)
    kind: str             # "checkpoint" | "gguf"
    ref: str              # as typed
    repo: str | None = None

    @property
    def name(self) -> str:
        """A short id: the repo (with its quant) for hub models, the file or folder name otherwise."""
        if self.repo:
            return self.ref.split("@")[0] if self.kind == "checkpoint" else f"{self.repo}:{_quant_of(self.path.name)}"
        return self.path.name.removesuffix(".gguf")


def resolve_model(ref: str | os.PathLike | ModelRef, *, revision: str | None = None,
                  kinds: tuple[str, ...] = KINDS, flag: str = "--model") -> ModelRef:
    """A local directory or .gguf as it is, or a hub reference fetched into the hub cache (an
    already resolved ModelRef as it is). `kinds`: what the caller can load; anything else is an
    error naming `flag`."""
    text = ref.ref if isinstance(ref, ModelRef) else str(ref)
    local = Path(text).expanduser()
    if isinstance(ref, ModelRef):
        resolved = ref
    elif local.exists():
        resolved = _local(local, text, flag)
    else:
        m = _REPO.match(text)
        if m is None or text.startswith((".", "/", "~")):
            raise NotFound(f"{flag} {text}: no such file or directory (nor a Hugging Face hub reference: "
                           "org/name, org/name:QUANT or org/name/file.gguf)")
        rev = m["rev"] or revision
        resolved = _from_hub(text, m["repo"], rev, m["quant"], m["file"], flag)
    if resolved.kind not in kinds:
        want = " or ".join("an HF-format model directory" if k == "checkpoint" else "a .gguf" for k in kinds)
        raise UserError(f"{flag} {text}: is {'a GGUF file' if resolved.kind == 'gguf' else 'a checkpoint directory'}"
                        f"; this needs {want}")
    return resolved


def _local(path: Path, text: str, flag: str) -> ModelRef:
    if path.is_dir():
        return ModelRef(path, "checkpoint", text)
    if path.suffix == ".gguf":
        return ModelRef(path, "gguf", text)
    raise UserError(f"{flag} {text}: neither a model directory nor a .gguf file")


# ---- the hub ---------------------------------------------------------------------------------

def hub_cache() -> Path:
    """huggingface_hub's cache folder, read from the environment now (not at its import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _from_hub(text: str, repo: str, rev: str | None, quant: str | None, file: str | None, flag: str) -> ModelRef:
    try:
        from huggingface_hub.errors import HfHubHTTPError, HTTPError
    except ImportError:
        raise HubError(f"{flag} {text}: loading from the hub needs huggingface_hub (pip install huggingface_hub)") \
            from None
    with _hub_errors(text, repo, rev, flag, file):
        try:
            return _fetch(text, repo, rev, quant, file, local_only=offline())
        except HTTPError as e:
            if offline() or isinstance(e, HfHubHTTPError) and e.response is not None:
                raise
            ref = _fetch(text, repo, rev, quant, file, local_only=True)      # what transformers does too
            print(f"warning: the hub could not be reached ({e}); using the cached {ref.name}", file=sys.stderr)
            return ref


def _fetch(text: str, repo: str, rev: str | None, quant: str | None, file: str | None, local_only: bool) -> ModelRef:
    if file:
        return ModelRef(Path(_download(repo, file, rev, local_only)), "gguf", text, repo)
    files = _repo_files(repo, rev, local_only)
    if quant:
        parts = _pick_quant(files, quant, text, local_only)
        paths = [_download(repo, p, rev, local_only) for p in parts]
        return ModelRef(Path(paths[0]), "gguf", text, repo)
    _check_checkpoint_repo(files, text, local_only)
    return ModelRef(Path(_snapshot(repo, rev, local_only)), "checkpoint", text, repo)


def _repo_files(repo: str, rev: str | None, local_only: bool) -> list[str]:
    """The repo's file names: asked of the hub, or when offline, what the cached snapshot holds."""
    if local_only:
        root = Path(_snapshot(repo, rev, True, patterns=None))
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())
    from huggingface_hub import HfApi

    return HfApi().list_repo_files(repo, revision=rev)


def _snapshot(repo: str, rev: str | None, local_only: bool, patterns: tuple[str, ...] | None = CHECKPOINT_FILES) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(repo, revision=rev, cache_dir=hub_cache(), local_files_only=local_only,
                             allow_patterns=list(patterns) if patterns else None)


def _download(repo: str, filename: str, rev: str | None, local_only: bool) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo, filename, revision=rev, cache_dir=hub_cache(), local_files_only=local_only)


def _quant_of(filename: str) -> str:
    """"llama-2-7b-chat.Q4_K_M.gguf" -> "Q4_K_M": the last dot- or dash-separated field that
    names a quant type (letters, digits and underscores, starting with Q, IQ, F or BF)."""
    stem = _SPLIT.sub(".gguf", filename).removesuffix(".gguf")
    for field in reversed(re.split(r"[.-]", stem)):
        if re.fullmatch(r"(?i)(i?q\d\w*|b?f\d+)", field):
            return field.upper()
    return stem


def _pick_quant(files: list[str], quant: str, text: str, cached: bool) -> list[str]:
    """The GGUF (all parts of a split one) whose name carries `quant`, case-insensitively."""
    ggufs = [f for f in files if f.endswith(".gguf")]
    matches = sorted(f for f in ggufs if _quant_of(Path(f).name).lower() == quant.lower())
    if not matches:
        have = ", ".join(sorted({_quant_of(Path(f).name) for f in ggufs})) or "none"
        where = " (those cached)" if cached else ""
        raise HubError(f"{text}: no GGUF of type {quant.upper()} in the repo; GGUF types there{where}: {have}")
    firsts = [f for f in matches if not _SPLIT.search(f) or _SPLIT.search(f)[1] == "00001"]
    if len(firsts) > 1:
        raise HubError(f"{text}: {len(firsts)} GGUF files carry {quant.upper()} ({', '.join(firsts)}); "
                       f"name one as org/name/FILE.gguf")
    first = firsts[0]
    if _SPLIT.search(first):         # llama.cpp loads the first part and finds the others beside it
        prefix = _SPLIT.sub("", first)
        return [first] + [f for f in matches if f != first and f.startswith(prefix)]
    return [first]


def _check_checkpoint_repo(files: list[str], text: str, cached: bool) -> None:
    names = [Path(f).name for f in files]
    has = lambda pattern: any(fnmatch.fnmatch(n, pattern) for n in names)  # noqa: E731
    if has("*.safetensors") and has("config.json"):
        return
    if has("*.gguf"):
        types = ", ".join(sorted({_quant_of(n) for n in names if n.endswith(".gguf")}))
        raise HubError(f"{text}: a GGUF repository, not a checkpoint; name a quant type as "
                       f"{text.split('@')[0]}:TYPE (here: {types})")
    if has("*.bin") or has("*.pt") or has("*.pth"):
        raise HubError(f"{text}: the repo holds only PyTorch pickle weights (.bin), which are never loaded "
                       "here; use a revision with safetensors (often an open `refs/pr/N` from the SFconvertbot)")
    what = "cached" if cached else "in the repo"
    raise HubError(f"{text}: no config.json + *.safetensors {what}; files: {', '.join(names[:12]) or 'none'}")


class _hub_errors:
    """huggingface_hub's exceptions as one HubError line naming the reference and the fix."""

    def __init__(self, text: str, repo: str, rev: str | None, flag: str, file: str | None = None) -> None:
        self.text, self.repo, self.rev, self.flag, self.file = text, repo, rev, flag, file

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if error is None:
            return False
        if isinstance(error, UserError):
            raise HubError(f"{self.flag} {error}") from None
        from huggingface_hub import errors as e

        head = f"{self.flag} {self.text}:"
        if isinstance(error, e.GatedRepoError):
            msg = (f"{head} {self.repo} is a gated repository; accept its licence on https://huggingface.co/"
                   f"{self.repo} and set HF_TOKEN (or run `hf auth login`)")
        elif isinstance(error, e.RepositoryNotFoundError):
            msg = (f"{head} no such local path, and no model repository {self.repo} on the hub (or it is private: "
                   "set HF_TOKEN)")
        elif isinstance(error, e.RevisionNotFoundError):
            msg = f"{head} {self.repo} has no revision {self.rev!r}"
        elif isinstance(error, (e.LocalEntryNotFoundError, e.OfflineModeIsEnabled)):
            what = f"{self.repo}{'@' + self.rev if self.rev else ''}{'/' + self.file if self.file else ''}"
            why = "HF_HUB_OFFLINE=1" if offline() else "the hub could not be reached"
            msg = f"{head} no such local path, and {why} with nothing cached for {what} under {hub_cache()}"
        elif isinstance(error, e.EntryNotFoundError):
            msg = f"{head} no such file in {self.repo}"
        elif isinstance(error, (e.HTTPError, OSError)):
            msg = f"{head} no such local path, and the hub could not be reached for {self.repo} ({error})"
        else:
            return False
        raise HubError(msg) from None
