"""Benchmarks: each measures ours and the reference in the same run and prints a table."""

import time
from typing import Callable


def markdown_table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """A Markdown table with columns padded to their widest cell."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(r: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def median_seconds(step: Callable[[], object], steps: int, warmup: int = 1) -> float:
    """Median wall time of `steps` calls of `step` after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it exec'd (VmHWM). Not ru_maxrss: Linux carries
    that across fork + exec, so a benchmark child would report its parent's footprint."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
