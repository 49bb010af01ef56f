"""Shared timing helpers: interleaved repeats, medians, peak-memory readings."""

import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, calling them round-robin so that load
    from elsewhere on the machine falls on all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def reset_peak_rss() -> None:
    """Reset the kernel's high-water mark of this process's resident memory (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")


def rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")
