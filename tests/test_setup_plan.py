"""Set-up's decisions (scripts/setup_plan.py) for machines other than this one: fake systems, GPUs,
indexes and build logs; and the real scripts/setup.sh's llama-cpp-python step against a compiler
that fails, which must leave a working install, one line and exit status 0."""

import http.server
import os
import runpy
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "setup"
plan = runpy.run_path(str(ROOT / "scripts" / "setup_plan.py"), run_name="setup_plan")
PROJECT = plan["load_pyproject"]()


def names(reqs):
    return [plan["parse"](r)[0] for r in reqs]


# ---- which requirements, which extras ---------------------------------------------------------

def test_setup_asks_pip_for_everything_but_llama_cpp_python():
    extras = plan["DEFAULT_EXTRAS"].split(",")
    reqs = plan["requirements"](PROJECT, extras)
    assert "llama-cpp-python" in names(reqs)                    # gguf and serve reach it through llama-cpp
    asked = plan["without_llama_cpp"](reqs)
    assert "llama-cpp-python" not in names(asked)
    assert {"torch", "fastapi", "cmake", "trl", "gradio", "datatrove"} <= set(names(asked))
    assert not any(n == "tinyllama-lifecycle" for n in names(asked))       # self-references expanded
    assert plan["wants_llama_cpp"](PROJECT, extras)
    assert not plan["wants_llama_cpp"](PROJECT, ["dev", "sft", "prepare"])
    assert plan["wants_llama_cpp"](PROJECT, ["llama-cpp"])


def test_self_references_are_expanded_once_and_bad_extras_are_named():
    fake = {"name": "Proj_X", "dependencies": ["numpy>=2"],
            "optional-dependencies": {"a": ["proj-x[b]", "x>=1"], "b": ["proj.x[a,c]", "y; sys_platform == 'linux'"],
                                      "c": ["x>=1"]}}
    assert plan["requirements"](fake, ["a"]) == ["numpy>=2", "x>=1", "y; sys_platform == 'linux'"]
    with pytest.raises(ValueError, match=r"no extra 'nope'.*\(extras: a, b, c\)"):
        plan["requirements"](fake, ["a", "nope"])


def test_llama_cpp_python_is_one_version_read_from_one_place():
    from tinyllama.paths import LLAMA_CPP_VERSION

    assert plan["llama_cpp_version"](PROJECT) == LLAMA_CPP_VERSION
    for extra in ([], ["llama-cpp-python>=0.9.1", "llama-cpp-python>=0.9.2"], ["llama-cpp-python"]):
        with pytest.raises(ValueError, match="exactly once"):
            plan["llama_cpp_version"]({"optional-dependencies": {"llama-cpp": extra}})


# ---- which torch, from where ------------------------------------------------------------------

class Probe:
    def __init__(self, answer):
        self.answer, self.asked = answer, []

    def __call__(self, url):
        self.asked.append(url)
        return self.answer


def test_linux_without_gpu_takes_the_cpu_index_when_it_answers():
    cpu, probe = plan["CPU_INDEX"], Probe(True)
    assert cpu == "https://download.pytorch.org/whl/cpu"
    index, why = plan["torch_source"]("Linux", False, "torch==2.13.0", cpu, probe)
    assert index == cpu and probe.asked == [cpu]
    assert why == f"torch==2.13.0 from PyTorch's CPU index ({cpu}), no CUDA GPU here"
    index, why = plan["torch_source"]("Linux", False, "torch==2.13.0", cpu, Probe(False))
    assert index == "" and why == f"torch==2.13.0 from the default index ({cpu} is not reachable)"
    mirror = "https://mirror.example/whl/cpu"
    assert plan["torch_source"]("Linux", False, "torch", mirror, Probe(True))[0] == mirror


def test_gpu_macos_windows_and_an_empty_index_never_probe():
    probe, cpu = Probe(True), plan["CPU_INDEX"]
    assert plan["torch_source"]("Linux", True, "torch==2.13.0", cpu, probe) == \
        ("", "torch==2.13.0 from the default index (a CUDA GPU is present: the CUDA build)")
    for system in ("Darwin", "Windows"):
        assert plan["torch_source"](system, False, "torch==2.13.0", cpu, probe) == \
            ("", f"torch==2.13.0 from the default index (PyPI's {system} wheel carries no CUDA)")
    assert plan["torch_source"]("Linux", False, "torch", "", probe) == \
        ("", "torch from the default index (TORCH_INDEX_URL is empty)")
    assert probe.asked == []


def test_torch_is_pinned_by_the_constraints_and_a_users_spec_drops_the_pin():
    text = "# header\nnumpy==2.4.6\ntorch==2.13.0  # the suite's\nTorch_Audio==2.13.0\n"
    assert plan["pinned"](text, "torch") == "2.13.0" and plan["pinned"](text, "scipy") is None
    assert plan["default_torch_spec"](text, PROJECT) == "torch==2.13.0"
    assert plan["default_torch_spec"](None, PROJECT).startswith("torch>=")       # no constraints: the range
    assert plan["drop"](text, "torch") == "# header\nnumpy==2.4.6\nTorch_Audio==2.13.0\n"
    assert plan["pinned"]((ROOT / "constraints.txt").read_text(), "torch")         # the real file pins it


class _Answer(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_the_probe_is_short_and_says_yes_only_to_an_answer():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert plan["reachable"](f"http://127.0.0.1:{server.server_port}/whl/cpu", timeout=5)
    finally:
        server.shutdown()
    with socket.socket() as s:                      # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    t0 = time.monotonic()
    assert not plan["reachable"](f"http://127.0.0.1:{closed}/", timeout=2)
    assert not plan["reachable"]("not a url")
    assert time.monotonic() - t0 < 5


# ---- a failed llama-cpp-python build, in one line -----------------------------------------------

@pytest.mark.parametrize("log", ["llama-cpp-no-compiler.log", "llama-cpp-broken-compiler.log"])
def test_real_build_logs_without_a_working_compiler_say_so(log):
    """pip's output of the real llama-cpp-python sdist built with CC=gcc absent, and with a compiler that fails."""
    line = plan["build_failure_line"]((DATA / log).read_text(), "/c/wheels/build.log")
    assert line == ("GGUF stages unavailable: no working C/C++ compiler; install a C++ compiler (e.g. apt-get "
                    "install g++, xcode-select --install) and run make setup (build log: /c/wheels/build.log)")


def test_other_failures_name_their_own_error_and_the_log():
    assert plan["build_failure_reason"]("bash: cmake: command not found\nERROR: Failed building wheel") == "no cmake"
    log = ("  error: subprocess-exited-with-error\n      CMake Error at vendor/CMakeLists.txt:9 (find_package):\n"
           "        Could not find a package configuration file provided by \"Vulkan\"\n"
           "  ERROR: Failed building wheel for llama_cpp_python\nFailed to build llama_cpp_python\n")
    line = plan["build_failure_line"](log, "L")
    assert line == "GGUF stages unavailable: CMake Error at vendor/CMakeLists.txt:9 (find_package):; see L and run make setup (build log: L)"
    assert plan["build_failure_reason"]("") == "the build failed"


# ---- the command line set-up calls ----------------------------------------------------------------

def _plan_cli(*args, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("EXTRAS", "TORCH_SPEC", "CONSTRAINTS")} | env
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "setup_plan.py"), *args], capture_output=True,
                          text=True, env=full)


def test_the_cli_prints_what_setup_sh_reads(tmp_path):
    reqs = _plan_cli("requirements").stdout.splitlines()
    assert "llama-cpp-python" not in names(reqs) and "trl" in names(reqs)
    assert names(_plan_cli("requirements", EXTRAS="dev").stdout.splitlines())[-1] == "selenium"
    assert _plan_cli("wants-llama-cpp", EXTRAS="dev,serve").stdout == "yes\n"
    assert _plan_cli("wants-llama-cpp", EXTRAS="dev").stdout == "\n"
    assert _plan_cli("constraints", "x").stdout.strip() == str(ROOT / "constraints.txt")
    assert _plan_cli("constraints", "x", CONSTRAINTS="").stdout == ""
    dest = tmp_path / "c.txt"
    assert _plan_cli("constraints", str(dest), TORCH_SPEC="torch==2.14.0").stdout.strip() == str(dest)
    assert plan["pinned"](dest.read_text(), "torch") is None and plan["pinned"](dest.read_text(), "numpy")
    bad = _plan_cli("requirements", EXTRAS="dev,nope")
    assert bad.returncode == 2 and "no extra 'nope'" in bad.stderr


# ---- the real setup.sh, its llama-cpp-python step, a compiler that fails ------------------------

STUB_BACKEND = '''
"""A stand-in for llama-cpp-python's build: configures a C/C++ project with CMake (or runs $CXX where
there is no cmake), as scikit-build-core does first, and fails the same way without a compiler."""
import os, shutil, subprocess, sys, tempfile

def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    info = os.path.join(metadata_directory, "llama_cpp_python-VERSION.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\\nName: llama_cpp_python\\nVersion: VERSION\\n")
    return os.path.basename(info)

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    work = tempfile.mkdtemp()
    with open(os.path.join(work, "CMakeLists.txt"), "w") as f:
        f.write("cmake_minimum_required(VERSION 3.14)\\nproject(probe C CXX)\\n")
    cmake = shutil.which("cmake")
    cmd = [cmake, "-S", work, "-B", os.path.join(work, "build")] if cmake else [os.environ.get("CXX", "c++"), "--version"]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(r.stdout)
    if r.returncode:
        raise SystemExit("*** CMake configuration failed")
    raise SystemExit("the stub builds nothing")
'''


def _stub_sdist(where: Path, version: str) -> Path:
    src = where / f"llama_cpp_python-{version}"
    src.mkdir(parents=True)
    (src / "pyproject.toml").write_text('[build-system]\nrequires = []\nbuild-backend = "stub_backend"\n'
                                        'backend-path = ["."]\n')
    (src / "stub_backend.py").write_text(STUB_BACKEND.replace("VERSION", version))
    (src / "PKG-INFO").write_text(f"Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: {version}\n")
    sdist = where / "cache" / "sdist" / f"llama_cpp_python-{version}.tar.gz"
    sdist.parent.mkdir(parents=True)
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(src, arcname=src.name)
    return sdist


def _venv_without_llama_cpp(where: Path) -> Path:
    """A throwaway venv that sees this one's packages (read-only, through a .pth) but not llama_cpp:
    a machine where everything else is installed. pip run from it installs into it, never here."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    py = where / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    here = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "pip").is_dir())
    (site / "zz_parent.pth").write_text(f"import site; site.addsitedir({here!r})\n")
    (site / "llama_cpp").mkdir()
    (site / "llama_cpp" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'llama_cpp'\", name='llama_cpp')\n")
    return py


def _not_the_source(folder, names):
    """What a throwaway copy of the checkout leaves out: outputs, caches, the venv, git."""
    top = {".git", ".venv", "out", "data", ".cache", ".whl", ".pytest_cache", "tests"} if Path(folder) == ROOT else set()
    return [n for n in names if n in top or n == "__pycache__" or n.endswith(".egg-info")]


def test_setup_without_a_compiler_succeeds_and_says_so_in_one_line(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT, copy, ignore=_not_the_source)
    venv = tmp_path / "venv"
    py = _venv_without_llama_cpp(venv)
    version = plan["llama_cpp_version"](PROJECT)
    _stub_sdist(tmp_path, version)
    broken = tmp_path / "bin" / "g++"
    broken.parent.mkdir()
    broken.write_text('#!/bin/sh\necho "$0: not found" >&2\nexit 127\n')
    broken.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("EXTRAS", "TORCH_SPEC", "CMAKE_ARGS", "PYTHONPATH")}
    env |= {"PYTHON": str(py), "VENV": str(venv), "TINYLLAMA_CACHE": str(tmp_path / "cache"),
            "SETUP_STEPS": "llama-cpp", "CC": str(broken), "CXX": str(broken)}
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(copy / "scripts" / "setup.sh")], cwd=copy, env=env, capture_output=True,
                       text=True, timeout=240)
    took = time.monotonic() - t0
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    lines = [line for line in out.splitlines() if line.startswith("GGUF stages unavailable:")]
    assert len(lines) == 1, out
    assert lines[0].startswith("GGUF stages unavailable: no working C/C++ compiler; install a C++ compiler"), out
    assert "run make setup" in lines[0] and str(tmp_path / "cache" / "wheels") in lines[0]
    assert (venv / ".llama-cpp-missing").read_text().strip() == lines[0]        # make setup tries again
    assert "llama.cpp unavailable" in out.splitlines()[-1]
    assert not list((tmp_path / "cache" / "wheels").rglob("*.whl")) and not (venv / ".llama-cpp-build").exists()
    imports = subprocess.run([str(py), "-c", "import tinyllama, prepare, pretrain, sft, quantize, serve, demo, "
                              "evaluation, lifecycle, serve.__main__, quantize.__main__\n"
                              "try:\n import llama_cpp\nexcept ImportError: print('no llama_cpp')"],
                             cwd=copy, capture_output=True, text=True, env=env)
    assert imports.returncode == 0 and imports.stdout == "no llama_cpp\n", imports.stderr
    assert took < 60, f"the failing step took {took:.0f} s"
