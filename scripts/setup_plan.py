"""What scripts/setup.sh installs and from where: its decisions as small functions of fake-able inputs.

    python scripts/setup_plan.py torch               # 3 lines: the torch requirement, the index URL to
                                                     #   add for it (or an empty line), why
    python scripts/setup_plan.py extras              # the extras to install (EXTRAS or the default)
    python scripts/setup_plan.py requirements        # the project's requirements for them, one a line,
                                                     #   without llama-cpp-python (set-up builds it)
    python scripts/setup_plan.py llama-cpp-version   # the llama-cpp-python version (its sdist also
                                                     #   carries the Llama-2 vocabulary)
    python scripts/setup_plan.py wants-llama-cpp     # "yes" when the extras need llama-cpp-python
    python scripts/setup_plan.py constraints DEST    # the constraints file for pip -c, or nothing
    python scripts/setup_plan.py build-failure LOG   # the one line a failed llama-cpp-python build prints

Standard library only (Python 3.11's tomllib): set-up runs it with the fresh venv's interpreter,
before anything is installed. It is run by path, like tinyllama/llamacpp/build.py, and is not part
of the installed project. Tested with fake inputs in tests/test_setup_plan.py.
"""

from __future__ import annotations

import os
import platform
import re
import runpy
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "tinyllama-lifecycle"
LLAMA_CPP = "llama-cpp-python"
# What `make setup` installs unless EXTRAS says otherwise: every stage and the tests. Not `gpu`
# (CUDA-only packages, flash-attn has no wheel) and not `llama-cpp` by name: set-up builds it itself.
DEFAULT_EXTRAS = "dev,prepare,train,sft,gguf,serve,demo,eval"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PROBE_TIMEOUT = 5.0     # seconds: an unreachable index costs set-up no more than this


def canonical(name: str) -> str:
    """PEP 503's normal form: `Llama_CPP.python` and `llama-cpp-python` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


_REQ = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?\s*([^;]*)")


def parse(requirement: str) -> tuple[str, list[str], str]:
    """(canonical name, extras, version specifier) of a PEP 508 string; the marker is left to pip."""
    m = _REQ.match(requirement)
    if m is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    extras = [canonical(e) for e in (m.group(2) or "").split(",") if e.strip()]
    return canonical(m.group(1)), extras, m.group(3).strip()


def load_pyproject(path: Path = ROOT / "pyproject.toml") -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)["project"]


def requirements(project: dict, extras: list[str]) -> list[str]:
    """The core's requirements and those of `extras`, with the project's references to its own
    extras (`tinyllama-lifecycle[llama-cpp]`) expanded in place, each string once, in order."""
    optional = {canonical(k): v for k, v in project.get("optional-dependencies", {}).items()}
    out: list[str] = []
    seen: set[str] = set()

    def add(reqs: list[str]) -> None:
        for req in reqs:
            name, inner, _ = parse(req)
            if name == canonical(project["name"]):
                for extra in inner:
                    if extra not in seen:
                        seen.add(extra)
                        add(optional.get(extra, []))
            elif req not in out:
                out.append(req)

    add(project.get("dependencies", []))
    for extra in map(canonical, extras):
        if extra not in optional:
            raise ValueError(f"EXTRAS: no extra {extra!r} in pyproject.toml (extras: {', '.join(sorted(optional))})")
        if extra not in seen:
            seen.add(extra)
            add(optional[extra])
    return out


def without_llama_cpp(reqs: list[str]) -> list[str]:
    """What set-up asks pip for: everything but llama-cpp-python, which pip would compile from its
    sdist with -march=native (the build that crashes on quantized GGUFs on AMX Xeons) and, without a
    C++ compiler, fail the whole install. Set-up builds it afterwards, on its own, for this CPU."""
    return [r for r in reqs if parse(r)[0] != LLAMA_CPP]


def llama_cpp_version(project: dict) -> str:
    """The one llama-cpp-python version: the floor pyproject.toml's `llama-cpp` extra names. The
    code reaches into that release's private attributes, so set-up builds exactly it."""
    reqs = [r for r in project.get("optional-dependencies", {}).get("llama-cpp", []) if parse(r)[0] == LLAMA_CPP]
    floors = [m.group(1) for r in reqs for m in [re.search(r">=\s*([0-9][^,;\s]*)", parse(r)[2])] if m]
    if len(floors) != 1:
        raise ValueError("pyproject.toml: the llama-cpp extra must name llama-cpp-python>=VERSION exactly once")
    return floors[0]


def wants_llama_cpp(project: dict, extras: list[str]) -> bool:
    """Whether the chosen extras need llama-cpp-python (gguf and serve reach it through llama-cpp)."""
    return any(parse(r)[0] == LLAMA_CPP for r in requirements(project, extras))


def pinned(constraints: str, name: str) -> str | None:
    """The version constraints.txt pins `name` to, or None."""
    for line in constraints.splitlines():
        req = line.split("#", 1)[0].strip()
        if req and parse(req)[0] == canonical(name):
            m = re.fullmatch(r"==\s*(\S+)", parse(req)[2])
            return m.group(1) if m else None
    return None


def drop(constraints: str, name: str) -> str:
    """constraints.txt without its line for `name` (a TORCH_SPEC of the user's own must not meet
    the tested torch pin in pip's resolver)."""
    keep = [line for line in constraints.splitlines()
            if not line.split("#", 1)[0].strip() or parse(line.split("#", 1)[0])[0] != canonical(name)]
    return "\n".join(keep) + "\n"


def torch_source(system: str, cuda: bool, spec: str, index: str, index_reachable) -> tuple[str, str]:
    """(index URL to add for torch or "", why). Only Linux without a CUDA GPU needs PyTorch's CPU
    `index` (TORCH_INDEX_URL; empty: never): there PyPI's torch is the multi-GB CUDA build. PyPI's
    macOS and Windows wheels carry no CUDA; with a GPU the CUDA build is what is wanted.
    `index_reachable(url)` is asked only where it matters (a probe costs up to PROBE_TIMEOUT)."""
    if system != "Linux":
        return "", f"{spec} from the default index (PyPI's {system} wheel carries no CUDA)"
    if cuda:
        return "", f"{spec} from the default index (a CUDA GPU is present: the CUDA build)"
    if index and index_reachable(index):
        return index, f"{spec} from PyTorch's CPU index ({index}), no CUDA GPU here"
    why = "TORCH_INDEX_URL is empty" if not index else f"{index} is not reachable"
    return "", f"{spec} from the default index ({why})"


def reachable(url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """A HEAD request answers (any HTTP status but 5xx) within `timeout` seconds."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url.rstrip("/") + "/", method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError as e:
        return e.code < 500
    except (OSError, ValueError):
        return False


def default_torch_spec(constraints: str | None, project: dict) -> str:
    """torch pinned to the version constraints.txt holds (the one the suite passed with), else the
    project's own torch range."""
    version = pinned(constraints, "torch") if constraints else None
    if version:
        return f"torch=={version}"
    return next(r for r in project["dependencies"] if parse(r)[0] == "torch")


# ---- a failed llama-cpp-python build, in one line ---------------------------------------------
_COMPILER_MISSING = [
    r"No CMAKE_(?:C|CXX)_COMPILER could be found",
    r"CMAKE_(?:C|CXX)_COMPILER not set",
    r"Could not find compiler set in environment variable (?:CC|CXX)",
    r"is not a full path to an existing compiler tool",
    r"The (?:C|CXX) compiler[\s\"]+\S+[\s\"]+is not able to compile a simple test program",
    r"(?:cc|c\+\+|g\+\+|gcc|clang\+*): (?:command )?not found",
]
_CMAKE_MISSING = [r"[Cc]ould not find (?:a )?(?:working )?cmake", r"cmake: (?:command )?not found",
                  r"CMake (?:is )?(?:not found|was not found)"]


def build_failure_reason(log: str) -> str:
    """Why the llama-cpp-python build failed, in a few words, from pip's output."""
    if any(re.search(p, log) for p in _COMPILER_MISSING):
        return "no working C/C++ compiler"
    if any(re.search(p, log) for p in _CMAKE_MISSING):
        return "no cmake"
    for line in reversed(log.splitlines()):
        line = line.strip()
        if re.match(r"(CMake Error|error|ERROR|fatal error)\b", line) and "subprocess-exited-with-error" not in line \
                and "Failed to build" not in line and "Failed building wheel" not in line:
            return line[:200]
    return "the build failed"


def build_failure_line(log: str, log_path: str) -> str:
    """The one line set-up prints when llama-cpp-python could not be built (set-up still succeeds)."""
    reason = build_failure_reason(log)
    fix = ("install a C++ compiler (e.g. apt-get install g++, xcode-select --install) and run make setup"
           if reason == "no working C/C++ compiler" else
           "install cmake and run make setup" if reason == "no cmake" else
           f"see {log_path} and run make setup")
    return f"GGUF stages unavailable: {reason}; {fix} (build log: {log_path})"


# ---- the command line setup.sh calls -----------------------------------------------------------
def _has_cuda_gpu() -> bool:
    """tinyllama/llamacpp/build.py's answer, loaded by path (standard library only; nothing is
    installed yet, and importing the package would run the core's __init__)."""
    return runpy.run_path(str(ROOT / "tinyllama" / "llamacpp" / "build.py"), run_name="_llamacpp_build")["has_cuda_gpu"]()


def _constraints_text() -> str | None:
    path = os.environ.get("CONSTRAINTS", str(ROOT / "constraints.txt"))
    return Path(path).read_text() if path and Path(path).is_file() else None


def _extras() -> list[str]:
    return [e for e in (os.environ.get("EXTRAS") or DEFAULT_EXTRAS).split(",") if e.strip()]


def main(argv: list[str]) -> int:
    command, *args = argv or ["help"]
    project = load_pyproject()
    if command == "torch":
        spec = os.environ.get("TORCH_SPEC") or default_torch_spec(_constraints_text(), project)
        index, why = torch_source(platform.system(), _has_cuda_gpu(), spec,
                                  os.environ.get("TORCH_INDEX_URL", CPU_INDEX), reachable)
        print(f"{spec}\n{index}\n{why}")
    elif command == "extras":
        print(",".join(_extras()))
    elif command == "requirements":
        print("\n".join(without_llama_cpp(requirements(project, _extras()))))
    elif command == "llama-cpp-version":
        print(llama_cpp_version(project))
    elif command == "wants-llama-cpp":
        print("yes" if wants_llama_cpp(project, _extras()) else "")
    elif command == "constraints":
        text = _constraints_text()
        if text is None:
            return 0
        if os.environ.get("TORCH_SPEC"):
            Path(args[0]).write_text(drop(text, "torch"))
            print(args[0])
        else:
            print(os.environ.get("CONSTRAINTS", str(ROOT / "constraints.txt")))
    elif command == "build-failure":
        print(build_failure_line(Path(args[0]).read_text(errors="replace"), args[0]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main(sys.argv[1:]))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
