"""Which llama.cpp build this machine gets: a small function of (OS, machine, CPU flags, GPU).

    python3 -c "import runpy; runpy.run_path('tinyllama/llamacpp/build.py', run_name='__main__')"
                                                  # prints "BUILD_ID<TAB>CMAKE_ARGS" (scripts/setup.sh)
    choose_build("Linux", "x86_64", {"avx2", "fma", "f16c"}, cuda=False)   # -> Build("avx2-x86_64", [...])

Standard library only: set-up runs it before the project is installed.

Why the build is never left to `GGML_NATIVE`: on AMX Xeons the native build turns on AMX weight
repacking, which crashes on every quantized GGUF (../shared/ENVIRONMENT.md), and a wheel built
natively on one machine is cached and reused by another. So each case is explicit:
  Linux/Windows x86-64   AVX-512 (F/BW/VL/DQ, + VBMI/VNNI/BF16 where present, AMX off), else AVX2
                         (+ FMA/F16C/BMI2), else AVX, else SSE only;
  Linux aarch64          NEON always, with -march=armv8.2-a + dotprod / fp16 / sve, armv8.6-a + i8mm,
                         as the CPU's Features list them;
  macOS arm64            llama.cpp's default path: Metal on, the Apple CPU target;
  macOS x86-64           the x86 rules above from sysctl's feature lists, Metal off;
  any of them + CUDA     GGML_CUDA=on when nvidia-smi sees a GPU and nvcc is there to build
                         for it (layers offloaded with --n-gpu-layers at run time).
LLAMA_BUILD=avx2|avx512|... in the environment overrides the CPU part on x86.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Build:
    id: str                                 # names the cached wheel folder: "avx512-vnni-bf16-x86_64"
    cmake_args: list[str] = field(default_factory=list)

    @property
    def cmake(self) -> str:
        return " ".join(self.cmake_args)


_X86_BASE = ["-DGGML_NATIVE=OFF"]
_AMX_OFF = ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]


def x86_level(flags: set[str]) -> str:
    """avx512, avx2, avx or sse: the widest vector level the flags fully support."""
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "avx" if "avx" in flags else "sse"


def _x86(flags: set[str], level: str) -> tuple[str, list[str]]:
    args = list(_X86_BASE)
    build_id = level
    if level == "sse":
        return build_id, args + ["-DGGML_AVX=OFF", "-DGGML_AVX2=OFF", "-DGGML_FMA=OFF", "-DGGML_F16C=OFF"]
    args.append("-DGGML_AVX=ON")
    if level in ("avx2", "avx512"):
        args.append("-DGGML_AVX2=ON")
        # FMA/F16C/BMI2 come with every AVX2 CPU sold, but a VM may hide one: follow the flags
        for flag, option in (("fma", "FMA"), ("f16c", "F16C"), ("bmi2", "BMI2")):
            if flag in flags:
                args.append(f"-DGGML_{option}=ON")
    if level == "avx512":
        args += ["-DGGML_AVX512=ON", *_AMX_OFF]
        for flag, option, tag in (("avx512vbmi", "AVX512_VBMI", "vbmi"), ("avx512_vnni", "AVX512_VNNI", "vnni"),
                                  ("avx512_bf16", "AVX512_BF16", "bf16")):
            if flag in flags:
                args.append(f"-DGGML_{option}=ON")
                build_id += f"-{tag}"
    return build_id, args


def _arm_linux(flags: set[str]) -> tuple[str, list[str]]:
    """-march from the Features line: dotprod (asimddp), fp16 (asimdhp), sve, i8mm (needs 8.6)."""
    tags = [tag for flag, tag in (("asimddp", "dotprod"), ("asimdhp", "fp16"), ("sve", "sve"), ("i8mm", "i8mm"))
            if flag in flags]
    arch = "armv8.6-a" if "i8mm" in tags else ("armv8.2-a" if tags else "armv8-a")
    march = arch + "".join(f"+{t}" for t in tags)
    return "-".join(["neon", *tags]), ["-DGGML_NATIVE=OFF", f"-DGGML_CPU_ARM_ARCH={march}"]


def choose_build(system: str, machine: str, flags: set[str] | frozenset[str], cuda: bool = False,
                 override: str | None = None) -> Build:
    """The build for this OS (`platform.system()`), machine (`platform.machine()`), CPU flags
    (lower-case, as /proc/cpuinfo or sysctl spell them) and whether a CUDA GPU is present."""
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine.lower())
    flags = {f.lower().replace(".", "_") for f in flags}
    if system == "Darwin" and machine == "aarch64":
        build_id, args = "metal", ["-DGGML_METAL=ON"]        # llama.cpp's default on Apple silicon
    elif machine == "x86_64":
        level = override or x86_level(flags)
        if level not in ("avx512", "avx2", "avx", "sse"):
            raise ValueError(f"LLAMA_BUILD={override!r}: expected avx512, avx2, avx or sse")
        build_id, args = _x86(flags, level)
        if system == "Darwin":
            args.append("-DGGML_METAL=OFF")
    elif machine == "aarch64":
        build_id, args = _arm_linux(flags)
    else:                                                       # riscv64, ppc64le, s390x: upstream's defaults
        build_id, args = "generic", ["-DGGML_NATIVE=OFF"]
    if cuda:
        build_id, args = f"cuda-{build_id}", [*args, "-DGGML_CUDA=ON"]
    arch_suffix = "arm64" if system == "Darwin" and machine == "aarch64" else machine
    return Build(f"{build_id}-{system.lower()}-{arch_suffix}" if system != "Linux" else f"{build_id}-{arch_suffix}",
                 args)


def cpu_flags(system: str | None = None) -> set[str]:
    """This CPU's feature flags: /proc/cpuinfo on Linux, sysctl on macOS (names lower-cased,
    'AVX512F' -> 'avx512f', 'AVX2' -> 'avx2')."""
    system = system or platform.system()
    if system == "Darwin":
        out = ""
        for key in ("machdep.cpu.features", "machdep.cpu.leaf7_features"):
            try:
                out += " " + subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5).stdout
            except (OSError, subprocess.SubprocessError):
                pass
        return {f.lower().replace(".", "_") for f in out.split()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def has_cuda_gpu() -> bool:
    """nvidia-smi lists at least one GPU."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return False
    try:
        r = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0 and "GPU" in r.stdout


def has_cuda_compiler() -> bool:
    """nvcc on PATH, in $CUDACXX or in /usr/local/cuda: a GGML_CUDA build needs it."""
    return bool(shutil.which("nvcc") or (os.environ.get("CUDACXX") and Path(os.environ["CUDACXX"]).is_file())
                or Path("/usr/local/cuda/bin/nvcc").is_file())


def detect() -> Build:
    system = platform.system()
    cuda = has_cuda_gpu() and has_cuda_compiler()
    return choose_build(system, platform.machine(), cpu_flags(system), cuda=cuda,
                        override=os.environ.get("LLAMA_BUILD") or None)


if __name__ == "__main__":
    try:
        build = detect()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"{build.id}\t{build.cmake}")
