"""Stage `tests`: the project's CUDA tests, with one record of their outcomes.

Runs the gpu-marked tests of every test file that has them: tests/test_model.py (the attention
backends and fused kernels held to the PyTorch definitions), tests/test_gpu_paths.py (the
verification-mask attention path, forward/backward in bf16 parameters and under autocast,
KV-cache decoding against the full forward, self-speculation's identity, sampling on a CUDA
model) and any added since; records how many passed and which failed. With --device cpu (a dry
run) it runs tests/test_gpu_paths.py on the CPU (GPU_CHECK_DEVICE=cpu).

    python -m gpu_check.run_tests [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

import pytest

from bench.records import emit
from tinyllama.devices import resolve_device

ROOT = Path(__file__).resolve().parent.parent


class Outcomes:
    """A pytest plugin that counts outcomes and names the failures."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.failed: list[str] = []

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or report.outcome != "passed":      # a setup error or skip counts too
            self.counts[report.outcome] += 1
            if report.outcome == "failed":
                self._failed(report, report.when)

    def pytest_collectreport(self, report) -> None:
        if report.failed:                          # a test file that does not import here
            self.counts["collection_errors"] += 1
            self._failed(report, "collection")

    def _failed(self, report, when: str) -> None:
        last = (str(report.longrepr).splitlines() or [""])[-1]
        self.failed.append(f"{report.nodeid} ({when}): {last[:200]}")


def gpu_test_files() -> list[str]:
    """The test files with gpu-marked tests (found by their text: collecting the whole suite
    would import every stage's dependencies, some of which the GPU machine lacks)."""
    return sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in f.read_text())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda (default: %(default)s)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if resolve_device(parse_args(argv).device).type == "cuda":
        args = ["-m", "gpu", "--continue-on-collection-errors", *gpu_test_files()]
    else:
        os.environ["GPU_CHECK_DEVICE"] = "cpu"      # tests/test_gpu_paths.py's checks then run unmarked on the CPU
        args = ["tests/test_gpu_paths.py"]
    outcomes = Outcomes()
    rc = int(pytest.main(["-q", "-p", "no:cacheprovider", "-rA", *args], plugins=[outcomes]))
    emit("tests", what="pytest", rc=rc, files=[a for a in args if a.endswith(".py")], **outcomes.counts,
         failed_tests=outcomes.failed)
    return rc


if __name__ == "__main__":
    sys.exit(main())
