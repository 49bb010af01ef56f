"""Throughput of ``prepare`` on the embedded python-stdlib corpus against raw tiktoken.

    python benchmarks/bench_prepare.py [--repeats 5]

Measures, in one run and on the same text: the whole pipeline (read files, tokenise in
worker processes, write shards and manifest) with 1 and 2 workers, and tiktoken's
``encode_ordinary_batch`` alone with 1 and 2 threads. Prints tokens/s and the ratios
the data-preparation issue sets targets for: 2 workers >= 1.7x one worker, and the
pipeline >= 80% of raw tiktoken at the same parallelism. Best of ``--repeats`` rounds,
and the median of ratios taken within a round; each preparation writes into a fresh
directory, so none reuses another's shards.
"""

import argparse
import json
import multiprocessing
import os
import resource
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import rounds_ratio  # noqa: E402
from data_prep.prepare import prepare  # noqa: E402
from data_prep.sources import SourceStats, read_text, stdlib_files  # noqa: E402
from hooked_gpt2.tokenizer import get_tokenizer  # noqa: E402


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _spin(seconds: float) -> None:
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass


def available_parallelism(seconds: float = 0.5) -> float:
    """How many CPUs' worth two busy processes actually get right now (2.0 on an idle
    2-core machine): the ceiling for any 2-worker speed-up measured in this run."""
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(_spin, [seconds, seconds])
    return 2 * seconds / (time.perf_counter() - start)


def timed(fn) -> tuple[float, float]:
    """Wall and CPU seconds. On a shared machine wall time also measures the neighbours;
    CPU time shows the work itself. The wall time ends when ``fn`` returns; the CPU time
    waits for its child processes to be reaped (prepare stops its pool in the background),
    so that theirs counts here and not in the next measurement."""
    start, start_cpu = time.perf_counter(), cpu_seconds()
    fn()
    wall = time.perf_counter() - start
    while multiprocessing.active_children():
        time.sleep(0.001)
    return wall, cpu_seconds() - start_cpu


def run_prepare(out: Path, workers: int) -> int:
    """One full preparation into a fresh directory; the tokens it wrote."""
    prepare("python-stdlib", out, workers=workers, progress=False, log=lambda *a: None)
    manifest = json.loads((out / "manifest.json").read_text())
    return sum(split["tokens"] for split in manifest["splits"].values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="rounds of measurements; the best time of each is kept")
    args = parser.parse_args()

    stats = SourceStats()
    texts = [t for t in (read_text(p, stats) for p in stdlib_files(Path(sysconfig.get_paths()["stdlib"]))) if t]
    enc = get_tokenizer()
    raw_tokens = sum(len(ids) + 1 for ids in enc.encode_ordinary_batch(texts))  # +1: the EOT per document
    print(f"corpus: python-stdlib, {len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f}M characters, "
          f"{raw_tokens / 1e6:.2f}M tokens (EOT included)")

    # Rounds interleave the four measurements, so a burst of load on a shared machine
    # hits all of them alike. Each ratio is reported two ways: from the best time of each
    # measurement, and as the median over rounds of the ratio within a round (the two
    # runs a second apart), which a drift in the machine's speed between rounds does not
    # move.
    best, cpu, rounds = {}, {}, []
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.repeats):
            times = {}
            for workers in (1, 2):
                out = Path(scratch) / f"w{workers}-{round_}"
                prep = timed(lambda: run_prepare(out, workers))
                tokens = run_prepare(out, workers)  # a no-op re-run: just reads the count back
                assert tokens == raw_tokens, f"pipeline wrote {tokens} tokens, tiktoken made {raw_tokens}"
                raw = timed(lambda: enc.encode_ordinary_batch(texts, num_threads=workers))
                for key, (seconds, cpu_s) in ((("prepare", workers), prep), (("raw", workers), raw)):
                    times[key] = seconds
                    if seconds < best.get(key, float("inf")):
                        best[key], cpu[key] = seconds, cpu_s
            rounds.append(times)
    rates = {key: raw_tokens / seconds for key, seconds in best.items()}
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; two busy processes get "
          f"{available_parallelism():.2f} CPUs now (the ceiling for the 2-worker speed-up)")
    for workers in (1, 2):
        print(f"{workers} worker(s): prepare {rates['prepare', workers] / 1e6:6.2f}M tok/s "
              f"({best['prepare', workers]:.2f}s wall, {cpu['prepare', workers]:.2f}s CPU)   "
              f"raw tiktoken {rates['raw', workers] / 1e6:6.2f}M tok/s "
              f"({best['raw', workers]:.2f}s wall, {cpu['raw', workers]:.2f}s CPU)")

    def paired(a, b):  # per round, time(b) / time(a): how much faster a is (median, range, rounds)
        return rounds_ratio([r[b] for r in rounds], [r[a] for r in rounds])

    scaling = rates[("prepare", 2)] / rates[("prepare", 1)]
    print(f"prepare 2 workers / 1 worker:        {scaling:.2f}x best times, "
          f"paired {paired(('prepare', 2), ('prepare', 1))}  (target >= 1.70x)")
    for workers in (1, 2):
        ratio = rates[("prepare", workers)] / rates[("raw", workers)]
        print(f"prepare / raw tiktoken, {workers} worker(s):   {ratio:.0%} best times, "
              f"paired {paired(('prepare', workers), ('raw', workers))}   (target >= 0.80x)")
    raw_scaling = rates[("raw", 2)] / rates[("raw", 1)]
    print(f"(raw tiktoken 2 threads / 1 thread:  {raw_scaling:.2f}x best times, "
          f"paired {paired(('raw', 2), ('raw', 1))}, for reference)")


if __name__ == "__main__":
    main()
