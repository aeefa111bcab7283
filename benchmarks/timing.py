"""The benchmarks' one timing rule: the median of repeated calls after a warm-up call."""

import statistics
import time


def median_seconds(fn, repeats=5):
    """Median wall time of fn() over `repeats` calls, after one warm-up (compilation, caches)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
