"""Interleaved timing rounds and the speed-up intervals built on them (pure Python + numpy).

Timing file A for ten seconds and then file B for ten seconds compares A's ten seconds with B's:
a machine that slows down in between (other load, a frequency change) moves the ratio, and the
same file timed twice in one hour differed here by up to 15 %. So every file of a run is timed in
rounds: in each round each series (one file at one batch size) runs a short block of calls, the
order rotating from round to round, and a speed-up is computed *within* each round, where both
series saw the same machine. The speed-up reported is the median of the per-round ratios, with a
distribution-free interval for that median (order statistics of the rounds, ``median_interval``).

Rounds continue until every series is steady (the interval of its per-round medians is narrower than
``RoundsPlan.steady_width`` of its median) and the minimums are met, or until the time budget is spent.
A series is reached through a callable ``run(n) -> seconds of each of n calls`` (a child process of
one file, or a fake in the tests); ``clock`` is injectable for the same reason.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable

import numpy as np

SeriesFn = Callable[[int], np.ndarray]  # n -> seconds per call, for n timed calls


@dataclass(frozen=True)
class RoundsPlan:
    warmup: int = 10  # untimed calls per series before the first round (at least 1, to size the blocks)
    min_runs: int = 50  # timed calls per series, at least, over all rounds
    min_time_s: float = 0.0  # keep timing for at least this long
    budget_s: float = 20.0  # stop once this is spent (and the hard minimums are met)
    min_rounds: int = 6  # fewest rounds for a 95 % interval of a median (1 - 2 / 2**6 = 96.9 %)
    hard_min_rounds: int = 3  # never fewer, budget or not
    block_s: float = 0.1  # target duration of one series' block of calls in a round
    max_block: int = 1000  # most calls in one block
    steady_width: float = 0.10  # a series is steady when its median's interval is narrower than this share
    confidence: float = 0.95


class SeriesFailed(Exception):
    """A series' callable failed; ``key`` says which, ``error`` is what the caller gave (an error entry)."""

    def __init__(self, key, error):
        super().__init__(str(error))
        self.key, self.error = key, error


@dataclass
class RoundsResult:
    times: dict  # key -> list of arrays, one per round (seconds per call)
    warmup: dict  # key -> warm-up calls made
    rounds: int = 0
    elapsed_s: float = 0.0
    stopped: str = ""  # "steady" | "budget"
    failed: dict = field(default_factory=dict)  # key -> error of a series that failed (dropped from later rounds)

    def all_times(self, key) -> np.ndarray:
        return np.concatenate(self.times[key]) if self.times.get(key) else np.zeros(0)

    def round_medians(self, key) -> np.ndarray:
        return np.array([np.median(t) for t in self.times.get(key, [])])


def interleaved_rounds(series: dict[Hashable, SeriesFn], plan: RoundsPlan, clock: Callable[[], float] = time.perf_counter,
                       progress: Callable[[str], None] | None = None) -> RoundsResult:
    """Time every series in rotating rounds until steady or out of budget (see the module docstring).
    A series whose callable raises ``SeriesFailed`` is dropped (its error kept in ``failed``); the others go on."""
    progress = progress or (lambda msg: None)
    res = RoundsResult(times={k: [] for k in series}, warmup={})
    live = list(series)
    start = clock()
    blocks: dict = {}
    for k in list(live):  # warm-up, which also sizes each series' block of calls
        try:
            warm = np.asarray(series[k](max(1, plan.warmup)))
        except SeriesFailed as exc:
            _drop(res, live, k, exc)
            continue
        res.warmup[k] = len(warm)
        per_call = float(np.median(warm[len(warm) // 2:])) if len(warm) else 0.0
        need = math.ceil(plan.min_runs / plan.min_rounds)
        blocks[k] = int(min(plan.max_block, max(need, 1, round(plan.block_s / per_call) if per_call > 0 else 1)))
    start = clock()
    while live:
        order = live[res.rounds % len(live):] + live[:res.rounds % len(live)]
        for k in order:
            try:
                res.times[k].append(np.asarray(series[k](blocks[k]), np.float64))
            except SeriesFailed as exc:
                _drop(res, live, k, exc)
        res.rounds += 1
        res.elapsed_s = clock() - start
        progress(f"timing round {res.rounds} ({res.elapsed_s:.0f} s)")
        res.stopped = _stop_reason(res, live, plan)
        if res.stopped:
            break
    for k in res.failed:
        res.times.pop(k, None)
    return res


def _drop(res: RoundsResult, live: list, key, exc: SeriesFailed) -> None:
    res.failed[key] = exc.error
    live.remove(key)


def _stop_reason(res: RoundsResult, live: list, plan: RoundsPlan) -> str:
    runs = min((sum(len(t) for t in res.times[k]) for k in live), default=0)
    if res.rounds >= plan.min_rounds and runs >= plan.min_runs and res.elapsed_s >= plan.min_time_s:
        if all(series_steady(res.round_medians(k), plan) for k in live):
            return "steady"
    if res.elapsed_s >= plan.budget_s and res.rounds >= plan.hard_min_rounds:
        return "budget"
    return ""


def series_steady(round_medians: np.ndarray, plan: RoundsPlan) -> bool:
    est, lo, hi, _ = median_interval(round_medians, plan.confidence)
    return est > 0 and (hi - lo) / est <= plan.steady_width


def median_interval(values, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """Median of ``values`` and a distribution-free interval for it: order statistics k and n + 1 - k,
    with k the largest rank where P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2. Returns
    (median, low, high, coverage); with too few values for ``confidence`` the interval is the range
    and ``coverage`` says what it really covers (1 - 2 / 2**n)."""
    v = np.sort(np.asarray(values, np.float64))
    n = len(v)
    if n == 0:
        return (math.nan, math.nan, math.nan, 0.0)
    alpha = (1 - confidence) / 2
    cdf, k = 0.0, 0  # cdf = P(X <= k - 1) with X ~ Binomial(n, 1/2)
    while k < n // 2:
        nxt = cdf + math.comb(n, k) / 2 ** n
        if nxt > alpha:
            break
        cdf, k = nxt, k + 1
    k = max(k, 1)
    coverage = 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n
    return (float(np.median(v)), float(v[k - 1]), float(v[n - k]), float(coverage))


def speedup_over_rounds(base_rounds: list, rounds: list, confidence: float = 0.95) -> dict | None:
    """Speed-up of a series over its baseline from the rounds both took part in: per round, the
    baseline's median call time over the series' median; reported as the median over rounds with its
    ``median_interval``. None without a common round."""
    n = min(len(base_rounds), len(rounds))
    ratios = [float(np.median(b)) / float(np.median(a)) for b, a in zip(base_rounds[:n], rounds[:n])
              if len(a) and len(b) and np.median(a) > 0]
    if not ratios:
        return None
    est, lo, hi, coverage = median_interval(ratios, confidence)
    return {"value": est, "interval": [lo, hi], "coverage": coverage, "rounds": len(ratios),
            "relative_width": (hi - lo) / est if est > 0 else math.inf}
