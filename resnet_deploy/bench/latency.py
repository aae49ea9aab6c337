"""Timing statistics and memory: a series of call times summarised as mean/std/min/p50/p90/p99,
throughput and a coefficient of variation (the series themselves come from ``bench.rounds``), and the
memory one artifact adds to its process (``MemoryMeter``).

Pure Python + numpy.
"""

from __future__ import annotations

import resource
import sys

import numpy as np


def summarize(times_s: np.ndarray, batch: int, noisy_cv: float = 0.10) -> dict:
    """Latency statistics in milliseconds per call, throughput in images per second.

    ``cv`` is the coefficient of variation (std / mean); a run above ``noisy_cv`` is flagged noisy:
    its figures moved more than the threshold between calls (other load, frequency scaling).
    """
    t = np.asarray(times_s, np.float64) * 1e3
    if t.size == 0:
        raise ValueError("no timed runs")
    mean = float(t.mean())
    std = float(t.std(ddof=1)) if t.size > 1 else 0.0
    cv = std / mean if mean > 0 else 0.0
    p50, p90, p99 = (float(v) for v in np.percentile(t, [50, 90, 99]))
    return {
        "batch": int(batch), "runs": int(t.size), "mean_ms": mean, "std_ms": std, "min_ms": float(t.min()),
        "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "max_ms": float(t.max()),
        "total_s": float(t.sum() / 1e3),
        "throughput_ips": batch / (mean / 1e3) if mean > 0 else float("inf"),
        "cv": cv, "noisy": bool(cv > noisy_cv),
    }


def peak_rss_bytes() -> int:
    """The peak resident set size of this process so far (since its start or the last ``reset_peak_rss``).

    On Linux this is ``VmHWM`` from /proc/self/status, the high-water mark of this process's own
    memory. ``ru_maxrss`` is not used there: Linux carries it across fork + exec, so a spawned child
    that measures one artifact would report its parent's peak (TensorFlow and the test split
    included) instead of its own. Elsewhere ``ru_maxrss`` (KiB on Linux/BSD, bytes on macOS).
    """
    hwm = _proc_status("VmHWM:")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    rss = _proc_status("VmRSS:")  # the same source as VmHWM, so the two subtract cleanly
    if rss is not None:
        return rss
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # pragma: no cover - psutil is a dependency
        return peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux >= 4.0: ``5`` into /proc/self/clear_refs).
    False where that is not possible; the high-water mark then keeps counting from the start."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class MemoryMeter:
    """The memory one artifact costs, apart from the harness around it.

    Created right before the artifact is loaded, after the runtime's import and after the test
    images have arrived: ``rss_before_load_bytes`` is that baseline. ``read()`` then gives the
    process's peak and ``artifact_rss_bytes``, the rise of the peak over the baseline while the
    artifact was loaded and run. The high-water mark is reset at the baseline where the OS allows
    it, so a transient peak before loading (unpickling the test split) cannot hide the artifact's;
    without a reset the figure is exact when the peak was reached after the baseline, and otherwise
    falls back to the current RSS over the baseline (a lower bound, flagged in ``artifact_rss_method``).
    """

    def __init__(self, reset: bool = True):
        import gc

        gc.collect()
        self.peak_before = peak_rss_bytes()
        self.reset = reset and reset_peak_rss()  # False in a caller's own process: its peak is its business
        self.baseline = current_rss_bytes()

    def read(self) -> dict:
        peak_since = peak_rss_bytes()
        if self.reset:
            method = "peak since load (VmHWM reset at the baseline) minus baseline"
        elif peak_since > self.peak_before:
            method = "peak minus baseline (the peak was reached after loading)"
        else:
            peak_since = current_rss_bytes()
            method = "current RSS minus baseline (lower bound: the peak could not be reset)"
        return {"peak_rss_bytes": max(peak_since, self.peak_before), "rss_before_load_bytes": self.baseline,
                "artifact_rss_bytes": max(0, peak_since - self.baseline), "artifact_rss_method": method}


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None
