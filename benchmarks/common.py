"""Shared timing helpers: interleaved repeats, medians, peak-memory readings."""

import gc
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# A ratio whose rounds spread wider than this (max - min, over the median) does not settle
# a comparison on a shared machine: the benchmarks say so beside it.
WIDE_SPREAD = 0.25


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


@dataclass(frozen=True)
class RoundsRatio:
    """A ratio taken once per round (both sides timed seconds apart), summarised over rounds."""

    median: float
    low: float
    high: float
    rounds: int

    @property
    def spread(self) -> float:
        """max - min over the median: 0.25 means the rounds disagree by a quarter."""
        return (self.high - self.low) / self.median

    @property
    def too_wide(self) -> bool:
        return self.rounds < 3 or self.spread > WIDE_SPREAD

    def short(self) -> str:
        """For a table cell: ``1.23x [1.10-1.31] n=5``, flagged ``too spread`` when it is."""
        return f"{self.median:.2f}x [{self.low:.2f}-{self.high:.2f}] n={self.rounds}" + (
            " too spread" if self.too_wide else "")

    def __str__(self) -> str:
        text = f"{self.median:.2f}x (median of {self.rounds} rounds, range {self.low:.2f}-{self.high:.2f})"
        if self.too_wide:
            why = "fewer than 3 rounds" if self.rounds < 3 else f"range {self.spread:.0%} of the median"
            text += f"  WARNING: too spread to conclude ({why}; rerun with more rounds on a quieter machine)"
        return text


def rounds_ratio(numerators: list[float], denominators: list[float]) -> RoundsRatio:
    """``numerators[i] / denominators[i]`` per round, summarised (see ``paired_ratio``)."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError(f"need one time of each side per round, got {len(numerators)} and {len(denominators)}")
    ratios = [x / y for x, y in zip(numerators, denominators)]
    return RoundsRatio(statistics.median(ratios), min(ratios), max(ratios), len(ratios))


def machine_load() -> str:
    """The load average and core count, printed with every benchmark's numbers."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


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
