"""Shared timing helpers: interleaved repeats, medians, peak-memory readings."""

import gc
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                        until_steady: int = 0) -> dict[str, float]:
    """Median seconds per call of each function (see ``interleaved_times``)."""
    return medians(interleaved_times(fns, repeats, warmup, until_steady))


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(ts) for name, ts in times.items()}


def paired_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median over rounds of one time over another taken in the same round: pairs
    taken seconds apart cancel the slow drifts in a shared machine's speed that a ratio
    of medians keeps."""
    return statistics.median(x / y for x, y in zip(numerators, denominators))


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                      until_steady: int = 0) -> dict[str, list[float]]:
    """Seconds per call of each function in each of ``repeats`` rounds, calling them
    round-robin so that load from elsewhere on the machine falls on all of them alike.

    After ``warmup`` rounds, up to ``until_steady`` more warm-up rounds run until a round
    touches no new memory pages: the C heap grows over the first few steps of a model
    whose blocks are hundreds of MB, and a step that lands on fresh pages pays the kernel
    to zero them, which would time the heap's history rather than the model.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for _ in range(until_steady):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for fn in fns.values():
            fn()
        if resource.getrusage(resource.RUSAGE_SELF).ru_minflt == before:
            break
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def reset_peak_rss() -> None:
    """Reset the kernel's high-water mark of this process's resident memory (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")


def rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")
