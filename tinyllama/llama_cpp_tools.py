"""llama.cpp's own command-line tools (llama-quantize, llama-imatrix, llama-perplexity, ...), built
once per machine from the llama.cpp sources inside the llama-cpp-python sdist that set-up already
downloads, with the same CPU flags as the wheel (tinyllama.llama_cpp_build), and cached beside it.

    tool("llama-imatrix")                      # the binary's Path; the first call builds every TOOLS
    python -m tinyllama.llama_cpp_tools        # build them now (`make tools`); prints where they are

Why not llama-cpp-python's API: `llama_model_quantize`'s `imatrix` field is an opaque pointer to a
C++ map, so imatrix quantization, importance matrices and KL-divergence perplexity need the tools
themselves; llama-server and llama-speculative-simple are the anchors the serving and speculative
benchmarks compare with. Built statically (no shared libraries to find at run time), without tests,
the server's web page, network access or OpenSSL; 6-9 minutes on 2 cores, once.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .errors import NotFound, UserError
from .paths import LLAMA_CPP_VERSION, cache_dir, default_sdist

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-server", "llama-speculative-simple")
_SOURCE_PREFIX = f"llama_cpp_python-{LLAMA_CPP_VERSION}/vendor/llama.cpp/"
_CMAKE_FIXED = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_EXAMPLES=ON", "-DLLAMA_BUILD_TOOLS=ON",
                # the server without its web page: no npm, no download of prebuilt assets
                "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_APP=OFF", "-DGGML_CCACHE=OFF"]


class ToolBuildError(UserError):
    """llama.cpp's tools could not be built here; the message says what is missing."""


def tools_dir() -> Path:
    """~/.cache/tinyllama/tools/llama.cpp-<version>-<build id>/bin ($TINYLLAMA_CACHE moves it)."""
    from .llama_cpp_build import detect

    return cache_dir() / "tools" / f"llama.cpp-{LLAMA_CPP_VERSION}-{detect().id}" / "bin"


def tool(name: str, say=print) -> Path:
    """The path of llama.cpp tool `name` (one of TOOLS), building them all on first use."""
    if name not in TOOLS:
        raise ValueError(f"{name}: not one of the tools built here ({', '.join(TOOLS)})")
    path = tools_dir() / name
    if not path.is_file():
        build_tools(say=say)
    return path


def build_tools(targets: tuple[str, ...] = TOOLS, jobs: int | None = None, say=print) -> Path:
    """Extracts llama.cpp from the sdist, builds `targets` with this machine's flags and installs
    them into tools_dir() in one rename (a killed build leaves nothing that looks built)."""
    from .llama_cpp_build import detect

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
    with tempfile.TemporaryDirectory(prefix=".build-", dir=dest.parent) as tmp:
        src = _extract_sources(sdist, Path(tmp) / "src")
        out = Path(tmp) / "build"
        _run([cmake, "-S", str(src), "-B", str(out), *build.cmake_args, *_CMAKE_FIXED], out.parent / "configure.log")
        _run([cmake, "--build", str(out), "--target", *targets, "-j", str(jobs or os.cpu_count() or 2)],
             out.parent / "build.log", progress=True)
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


def _run(cmd: list[str], log: Path, progress: bool = False) -> None:
    """Runs a build step with its output in `log`; with `progress`, CMake's [ NN%] as a bar."""
    from tqdm import tqdm

    bar = tqdm(total=100, desc="llama.cpp tools", unit="%", disable=not progress, file=sys.stderr)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            m = re.match(r"\[\s*(\d+)%\]", line)
            if m and int(m[1]) > bar.n:
                bar.update(int(m[1]) - bar.n)
        rc = proc.wait()
    bar.close()
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise ToolBuildError(f"`{' '.join(cmd[:3])} ...` failed (exit {rc}); the end of its log:\n{tail}")


if __name__ == "__main__":
    from .errors import report

    try:
        where = build_tools()
    except UserError as e:
        raise SystemExit(report(e))
    for name in TOOLS:
        print(where / name)
