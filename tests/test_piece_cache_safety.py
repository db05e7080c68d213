"""The C piece cache's safety net: the same code built with AddressSanitizer and UBSan runs the
fuzzer (a memory error or undefined behaviour stops it), and a longer fuzz against the Python
twin runs in the slow tier (tests/piece_cache_fuzz.py)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).with_name("piece_cache_fuzz.py")
CC = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _libasan() -> str | None:
    """The compiler's own AddressSanitizer runtime: ctypes loads the sanitized library into a
    Python that was not built with it, so the runtime must be preloaded."""
    if not CC:
        return None
    path = subprocess.run([CC, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def _fuzz(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FUZZ), *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **(env or {})})


def test_the_sanitized_build_runs_the_fuzzer_clean():
    asan = _libasan()
    if asan is None:
        pytest.skip("no C compiler with AddressSanitizer here")
    r = _fuzz("--sanitized", "--rounds", "12", "--seed", "1",
              env={"LD_PRELOAD": asan, "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0",
                   "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"})
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "native == Python == Rust" in r.stdout


def test_the_sanitizer_would_catch_a_memory_error(tmp_path):
    """The net has no hole: the same flags and preload stop a one-byte overflow."""
    asan = _libasan()
    if asan is None:
        pytest.skip("no C compiler with AddressSanitizer here")
    from prepare.pieces import SANITIZE_FLAGS
    src = tmp_path / "bad.c"
    src.write_text("#include <stdlib.h>\nint poke(int i) { char *p = malloc(4); int v = p[i]; free(p); return v; }\n")
    lib = tmp_path / "bad.so"
    subprocess.run([CC, *SANITIZE_FLAGS, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    code = f"import ctypes; ctypes.CDLL({str(lib)!r}).poke(4)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "LD_PRELOAD": asan, "ASAN_OPTIONS": "detect_leaks=0"})
    assert r.returncode != 0, r.stderr[-2000:]
    # whichever of the two sees it first: ASan's heap-buffer-overflow or UBSan's object-size check
    assert "heap-buffer-overflow" in r.stderr or "runtime error: load of address" in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_native_equals_python_on_a_long_fuzz():
    if not CC:
        pytest.skip("no C compiler here: only the Python path runs")
    r = _fuzz("--rounds", "150", "--seed", "7")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
