"""The llama.cpp build choice (tinyllama/llamacpp/build.py) for machines other than this one:
fake uname / cpuinfo inputs, since only Linux x86-64 runs here."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinyllama.llamacpp import build as lb
from tinyllama.llamacpp.build import choose_build

ROOT = Path(__file__).resolve().parent.parent
# /proc/cpuinfo flag sets of real CPUs (abridged to what matters)
EPYC_ZEN3 = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"}
SAPPHIRE_RAPIDS = EPYC_ZEN3 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vbmi", "avx512_vnni",
                               "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}
GRAVITON3 = {"fp", "asimd", "asimddp", "asimdhp", "sve", "i8mm", "bf16"}
RPI4 = {"fp", "asimd", "crc32"}
PIXEL_A76 = {"fp", "asimd", "asimddp", "asimdhp"}


def test_avx2_only_cpu_gets_the_avx2_build_without_avx512():
    b = choose_build("Linux", "x86_64", EPYC_ZEN3)
    assert b.id == "avx2-x86_64"
    assert "-DGGML_NATIVE=OFF" in b.cmake_args and "-DGGML_AVX2=ON" in b.cmake_args
    assert {"-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON"} <= set(b.cmake_args)
    assert not any("AVX512" in a for a in b.cmake_args)


def test_amx_xeon_gets_avx512_with_its_extensions_and_amx_off():
    b = choose_build("Linux", "x86_64", SAPPHIRE_RAPIDS)
    assert b.id == "avx512-vbmi-vnni-bf16-x86_64"
    for opt in ("AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"):
        assert f"-DGGML_{opt}=ON" in b.cmake_args
    for amx in ("AMX_TILE", "AMX_INT8", "AMX_BF16"):
        assert f"-DGGML_{amx}=OFF" in b.cmake_args        # AMX repacking crashes on quantized files
    assert "-DGGML_NATIVE=OFF" in b.cmake_args


def test_partial_avx512_is_not_enough_and_a_vm_hiding_fma_is_followed():
    b = choose_build("Linux", "x86_64", {"avx", "avx2", "avx512f"})       # no BW/VL/DQ
    assert b.id.startswith("avx2") and "-DGGML_FMA=ON" not in b.cmake_args
    assert choose_build("Linux", "x86_64", {"avx"}).id == "avx-x86_64"
    sse = choose_build("Linux", "x86_64", {"sse4_2"})
    assert sse.id == "sse-x86_64" and "-DGGML_AVX=OFF" in sse.cmake_args


def test_override_and_bad_override():
    assert choose_build("Linux", "x86_64", SAPPHIRE_RAPIDS, override="avx2").id == "avx2-x86_64"
    with pytest.raises(ValueError, match="LLAMA_BUILD"):
        choose_build("Linux", "x86_64", EPYC_ZEN3, override="avx9")


@pytest.mark.parametrize("flags,march,build_id", [
    (GRAVITON3, "armv8.6-a+dotprod+fp16+sve+i8mm", "neon-dotprod-fp16-sve-i8mm-aarch64"),
    (PIXEL_A76, "armv8.2-a+dotprod+fp16", "neon-dotprod-fp16-aarch64"),
    (RPI4, "armv8-a", "neon-aarch64"),
])
def test_linux_arm_march_follows_the_features_line(flags, march, build_id):
    b = choose_build("Linux", "aarch64", flags)
    assert b.id == build_id
    assert f"-DGGML_CPU_ARM_ARCH={march}" in b.cmake_args and "-DGGML_NATIVE=OFF" in b.cmake_args
    assert not any("AVX" in a for a in b.cmake_args)     # never x86 flags on ARM


def test_macos_arm64_takes_metal_and_no_x86_flags():
    b = choose_build("Darwin", "arm64", set())
    assert b.id == "metal-darwin-arm64"
    assert b.cmake_args == ["-DGGML_METAL=ON"]
    intel_mac = choose_build("Darwin", "x86_64", {"avx1_0", "avx2", "fma", "f16c"})
    assert intel_mac.id == "avx2-darwin-x86_64" and "-DGGML_METAL=OFF" in intel_mac.cmake_args


def test_cuda_is_added_to_the_cpu_part():
    b = choose_build("Linux", "x86_64", SAPPHIRE_RAPIDS, cuda=True)
    assert b.id == "cuda-avx512-vbmi-vnni-bf16-x86_64"
    assert "-DGGML_CUDA=ON" in b.cmake_args and "-DGGML_AVX512=ON" in b.cmake_args
    assert "-DGGML_CUDA=ON" in choose_build("Linux", "aarch64", GRAVITON3, cuda=True).cmake_args  # GH200


def test_cpu_flags_reads_proc_cpuinfo_and_macos_sysctl(monkeypatch, tmp_path):
    real = Path("/proc/cpuinfo")
    if real.is_file():
        assert lb.cpu_flags("Linux")          # this machine's own flags are read
    seen = []

    class R:
        stdout = "FPU AVX1.0 AVX2 FMA F16C"

    monkeypatch.setattr(lb.subprocess, "run", lambda cmd, **kw: seen.append(cmd) or R())
    flags = lb.cpu_flags("Darwin")
    assert {"avx2", "fma", "f16c", "avx1_0"} <= flags
    assert seen[0][:2] == ["sysctl", "-n"]


def test_the_script_prints_id_and_args_for_setup(monkeypatch):
    out = subprocess.run([sys.executable, "-c", "import runpy; runpy.run_path('tinyllama/llamacpp/build.py', "
                          "run_name='__main__')"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    build_id, _, cmake = out.strip().partition("\t")
    assert build_id and ("-DGGML_NATIVE=OFF" in cmake or "-DGGML_METAL=ON" in cmake)
    bad = subprocess.run([sys.executable, "-c", "import runpy; runpy.run_path('tinyllama/llamacpp/build.py', "
                          "run_name='__main__')"], cwd=ROOT, capture_output=True, text=True,
                         env={"LLAMA_BUILD": "avx9", "PATH": "/usr/bin:/bin"})
    import platform
    if platform.machine() in ("x86_64", "AMD64"):
        assert bad.returncode == 2 and "LLAMA_BUILD" in bad.stderr


# ---- llama.cpp's own tools (tinyllama/llamacpp/tools.py) ------------------------------------------

def test_tools_are_cached_per_build_and_a_missing_sdist_is_named(tmp_path, monkeypatch):
    import pytest

    from tinyllama.llamacpp import tools as llama_cpp_tools
    from tinyllama.errors import NotFound
    from tinyllama.paths import LLAMA_CPP_VERSION

    monkeypatch.setenv("TINYLLAMA_CACHE", str(tmp_path))
    where = llama_cpp_tools.tools_dir()
    assert where.parent.parent == tmp_path / "tools" and where.parent.name.startswith(f"llama.cpp-{LLAMA_CPP_VERSION}-")
    with pytest.raises(ValueError, match="not one of the tools"):
        llama_cpp_tools.tool("llama-cli")
    # the suite runs with TINYLLAMA_TOOLS_BUILD=never: a missing tool is named, nothing is built
    with pytest.raises(llama_cpp_tools.ToolBuildError, match="llama-quantize is not built, and "
                       "TINYLLAMA_TOOLS_BUILD=never forbids building it on first use; run `make tools` first"):
        llama_cpp_tools.tool("llama-quantize")
    monkeypatch.delenv(llama_cpp_tools.BUILD_ENV)
    with pytest.raises(NotFound, match="sdist is not downloaded; run `make setup`"):
        llama_cpp_tools.tool("llama-quantize", say=lambda _: None)
    assert not where.exists()                                 # nothing that looks built
    monkeypatch.setattr(llama_cpp_tools.shutil, "which", lambda *a, **k: None)
    with pytest.raises(llama_cpp_tools.ToolBuildError, match="needs cmake"):
        llama_cpp_tools.build_tools()


def test_a_build_step_that_overruns_is_stopped_with_its_log(tmp_path):
    """The build's own timeout: the step is killed, its log's end is in the error, and the
    progress goes to stderr (a command's --json output stays clean while it builds)."""
    import pytest

    from tinyllama.llamacpp import tools as llama_cpp_tools

    script = "import time; print('[ 10%] Building CXX object ggml.o', flush=True); time.sleep(60)"
    t0 = time.monotonic()
    with pytest.raises(llama_cpp_tools.ToolBuildError, match=r"did not finish in time(.|\n)*\[ 10%\] Building CXX"):
        llama_cpp_tools._run([sys.executable, "-c", script], tmp_path / "build.log", progress=True,
                             deadline=time.monotonic() + 2)
    assert time.monotonic() - t0 < 30
    with pytest.raises(llama_cpp_tools.ToolBuildError, match=r"failed \(exit 3\)(.|\n)*oops"):
        llama_cpp_tools._run([sys.executable, "-c", "import sys; print('oops'); sys.exit(3)"], tmp_path / "b.log")


def test_build_messages_go_to_stderr(tmp_path, monkeypatch, capsys):
    """A tool built on first use says so on stderr: `bench.speculative --anchor --json` printed
    the build's lines into its JSON (the anchor test's failure on a fresh clone)."""
    from tinyllama.llamacpp import tools as llama_cpp_tools

    monkeypatch.setenv("TINYLLAMA_CACHE", str(tmp_path))
    monkeypatch.delenv(llama_cpp_tools.BUILD_ENV)

    def fake_build(say):
        say("building llama.cpp's tools ...")
        llama_cpp_tools.tools_dir().mkdir(parents=True)
        (llama_cpp_tools.tools_dir() / "llama-quantize").write_text("")

    monkeypatch.setattr(llama_cpp_tools, "build_tools", fake_build)
    assert llama_cpp_tools.tool("llama-quantize").is_file()
    out, err = capsys.readouterr()
    assert out == "" and "building llama.cpp's tools" in err
