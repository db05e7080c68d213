"""llama.cpp's own command-line tools (llama-quantize, llama-imatrix, llama-perplexity, ...), built
once per machine from the llama.cpp sources inside the llama-cpp-python sdist that set-up already
downloads, with the same CPU flags as the wheel (tinyllama.llamacpp.build), and cached beside it.

    tool("llama-imatrix")                      # the binary's Path; the first call builds every TOOLS
    python -m tinyllama.llamacpp.tools        # build them now (`make tools`); prints where they are

TINYLLAMA_TOOLS_BUILD=never makes a missing tool an error instead of minutes of compiling on first
use (a server, CI, the test suite: they build once, up front). Build messages go to stderr, so a
command's own output (`--json`) stays clean while it builds.

Why not llama-cpp-python's API: `llama_model_quantize`'s `imatrix` field is an opaque pointer to a
C++ map, so imatrix quantization, importance matrices and KL-divergence perplexity need the tools
themselves; llama-server and llama-speculative-simple are the anchors the serving and speculative
benchmarks compare with. Built statically (no shared libraries to find at run time), without tests,
the server's web page, network access or OpenSSL; a few minutes, once per machine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from tinyllama.errors import NotFound, UserError
from tinyllama.paths import LLAMA_CPP_VERSION, cache_dir, default_sdist

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-server", "llama-speculative-simple")
_SOURCE_PREFIX = f"llama_cpp_python-{LLAMA_CPP_VERSION}/vendor/llama.cpp/"
_CMAKE_FIXED = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_EXAMPLES=ON", "-DLLAMA_BUILD_TOOLS=ON",
                # the server without its web page: no npm, no download of prebuilt assets
                "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_APP=OFF", "-DGGML_CCACHE=OFF"]


BUILD_ENV = "TINYLLAMA_TOOLS_BUILD"      # "never": do not build on first use
# The tools log through a worker thread that nothing flushes at exit (llama.cpp's common/log.cpp
# says so): on a loaded machine a tool can exit 0 with the last lines of its report lost. Callers
# that parse a closing report run the tool again, up to this many times in all.
LOST_LOG_ATTEMPTS = 3


class ToolBuildError(UserError):
    """llama.cpp's tools could not be built here; the message says what is missing."""


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def tools_dir() -> Path:
    """~/.cache/tinyllama/tools/llama.cpp-<version>-<build id>/bin ($TINYLLAMA_CACHE moves it)."""
    from tinyllama.llamacpp.build import detect

    return cache_dir() / "tools" / f"llama.cpp-{LLAMA_CPP_VERSION}-{detect().id}" / "bin"


def tool(name: str, say=_to_stderr) -> Path:
    """The path of llama.cpp tool `name` (one of TOOLS), building them all on first use."""
    if name not in TOOLS:
        raise ValueError(f"{name}: not one of the tools built here ({', '.join(TOOLS)})")
    path = tools_dir() / name
    if not path.is_file():
        if os.environ.get(BUILD_ENV, "").strip().lower() == "never":
            raise ToolBuildError(f"{path}: llama.cpp's {name} is not built, and {BUILD_ENV}=never forbids "
                                 "building it on first use; run `make tools` first")
        build_tools(say=say)
    return path


def build_tools(targets: tuple[str, ...] = TOOLS, jobs: int | None = None, say=_to_stderr,
                timeout: float | None = None) -> Path:
    """Extracts llama.cpp from the sdist, builds `targets` with this machine's flags and installs
    them into tools_dir() in one rename (a killed build leaves nothing that looks built).
    `timeout`: seconds for the whole build, after which it is stopped with a ToolBuildError."""
    from tinyllama.llamacpp.build import detect

    # the cmake the [gguf] extra installs beside this interpreter, else the system's
    cmake = shutil.which("cmake", path=str(Path(sys.executable).parent)) or shutil.which("cmake")
    for exe, found in (("cmake", cmake), ("c++", shutil.which("c++"))):
        if found is None:
            raise ToolBuildError(f"building llama.cpp's tools needs {exe} (pip install cmake; apt-get install g++)")
    sdist = default_sdist()
    if not sdist.is_file():
        raise NotFound(f"{sdist}: the llama-cpp-python sdist is not downloaded; run `make setup`")
    build = detect()
    dest = tools_dir()
    dest.parent.mkdir(parents=True, exist_ok=True)
    say(f"building llama.cpp's {', '.join(targets)} for {build.id} (once per machine, a few minutes) ...")
    deadline = None if timeout is None else time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix=".build-", dir=dest.parent) as tmp:
        src = _extract_sources(sdist, Path(tmp) / "src")
        out = Path(tmp) / "build"
        _run([cmake, "-S", str(src), "-B", str(out), *build.cmake_args, *_CMAKE_FIXED], out.parent / "configure.log",
             deadline=deadline)
        _run([cmake, "--build", str(out), "--target", *targets, "-j", str(jobs or os.cpu_count() or 2)],
             out.parent / "build.log", progress=True, deadline=deadline)
        staged = Path(tmp) / "bin"
        staged.mkdir()
        for t in targets:
            shutil.copy2(out / "bin" / t, staged / t)
        if dest.exists():
            shutil.rmtree(dest)
        staged.rename(dest)
    say(f"llama.cpp tools in {dest}")
    return dest


def _extract_sources(sdist: Path, dest: Path) -> Path:
    """vendor/llama.cpp/ of the sdist, and nothing outside it."""
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(_SOURCE_PREFIX)]
        if not members:
            raise ToolBuildError(f"{sdist}: no {_SOURCE_PREFIX} inside; not the llama-cpp-python sdist expected")
        tar.extractall(dest, members=members, filter="data")
    return dest / _SOURCE_PREFIX


def _run(cmd: list[str], log: Path, progress: bool = False, deadline: float | None = None) -> None:
    """Runs a build step with its output in `log`; with `progress`, CMake's [ NN%] as a bar (on
    stderr); stopped at `deadline` (time.monotonic())."""
    from tqdm import tqdm

    bar = tqdm(total=100, desc="llama.cpp tools", unit="%", disable=not progress, file=sys.stderr)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True)
        while True:
            try:
                rc = proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                if deadline is not None and time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    raise ToolBuildError(f"`{' '.join(cmd[:3])} ...` did not finish in time; the end of its log:\n"
                                         f"{_tail(log)}") from None
            _advance(bar, log)
        _advance(bar, log)
    bar.close()
    if rc != 0:
        raise ToolBuildError(f"`{' '.join(cmd[:3])} ...` failed (exit {rc}); the end of its log:\n{_tail(log)}")


def _advance(bar, log: Path) -> None:
    """Moves the bar to the last [ NN%] CMake wrote to the log."""
    found = re.findall(r"^\[\s*(\d+)%\]", log.read_text(errors="replace"), re.M)
    if found and int(found[-1]) > bar.n:
        bar.update(int(found[-1]) - bar.n)


def _tail(log: Path, lines: int = 15) -> str:
    return "".join(log.read_text(errors="replace").splitlines(keepends=True)[-lines:])


def main(argv: list[str] | None = None) -> int:
    import argparse

    from tinyllama.errors import report

    ap = argparse.ArgumentParser(prog="python -m tinyllama.llamacpp.tools",
                                 description=f"Builds llama.cpp's {', '.join(TOOLS)} once per machine (a few "
                                             "minutes) and prints where they are.")
    ap.add_argument("--timeout", type=float, help="stop the build after this many seconds (default: none)")
    ap.add_argument("--force", action="store_true", help="build again even where the tools are present")
    args = ap.parse_args(argv)
    try:
        where = tools_dir()
        if args.force or not all((where / name).is_file() for name in TOOLS):
            where = build_tools(timeout=args.timeout)
    except UserError as e:
        return report(e)
    for name in TOOLS:
        print(where / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
