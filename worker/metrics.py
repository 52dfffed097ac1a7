"""A worker's counters and histograms, as the ``metrics`` command reports them.

Pure bookkeeping: the scheduler calls :meth:`WorkerCounters.finished`,
:meth:`~WorkerCounters.failed`, :meth:`~WorkerCounters.token_gap` and
:meth:`~WorkerCounters.cache_query` as things happen; nothing is estimated.
The counts live as long as the worker (Prometheus sees a counter reset on a restart).
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from dataclasses import dataclass, field

from llamafleet.runtime.protocol import CompletionStats, HistogramData

#: latency buckets in seconds (vLLM's scale: milliseconds to a minute)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                   1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 60.0)
#: token-count buckets
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 65536)


@dataclass
class Histogram:
    """Fixed upper bounds; ``counts[i]`` holds values in ``(bounds[i-1], bounds[i]]``,
    the last count those above every bound."""

    bounds: tuple[float, ...]
    counts: list[int] = field(init=False)
    sum: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        if not self.bounds or any(math.isnan(b) or math.isinf(b) for b in self.bounds) \
                or list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError("histogram bounds must be finite and strictly increasing")
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        """Count ``value`` in the first bucket whose bound is >= it (NaN is ignored)."""
        if math.isnan(value):
            return
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def to_wire(self) -> HistogramData:
        """The non-cumulative state, as the ``metrics`` reply carries it."""
        return HistogramData(bounds=[float(b) for b in self.bounds], counts=list(self.counts),
                             sum=self.sum)


class WorkerCounters:
    """Everything a worker counts for /metrics."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.generated_tokens = 0
        self.drafted_tokens = 0
        self.accepted_tokens = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.finish_reasons: Counter[str] = Counter()
        self.error_codes: Counter[str] = Counter()
        self.histograms = {
            "ttft_seconds": Histogram(SECONDS_BUCKETS),
            "inter_token_seconds": Histogram(SECONDS_BUCKETS),
            "e2e_seconds": Histogram(SECONDS_BUCKETS),
            "queue_seconds": Histogram(SECONDS_BUCKETS),
            "prompt_tokens": Histogram(TOKEN_BUCKETS),
            "generation_tokens": Histogram(TOKEN_BUCKETS),
        }

    def finished(self, reason: str, stats: CompletionStats) -> None:
        """A generation ended with a result (its reported stats)."""
        self.finish_reasons[reason] += 1
        self.prompt_tokens += stats.prompt_tokens
        self.cached_tokens += stats.cached_tokens
        self.generated_tokens += stats.generated_tokens
        self.drafted_tokens += stats.drafted_tokens
        self.accepted_tokens += stats.accepted_tokens
        h = self.histograms
        h["e2e_seconds"].observe(stats.total_ms / 1e3)
        if stats.queue_ms is not None:
            h["queue_seconds"].observe(stats.queue_ms / 1e3)
        if stats.ttft_ms is not None:
            h["ttft_seconds"].observe(stats.ttft_ms / 1e3)
        h["prompt_tokens"].observe(stats.prompt_tokens)
        h["generation_tokens"].observe(stats.generated_tokens)

    def failed(self, code: str) -> None:
        """A generation ended with an error (its code)."""
        self.error_codes[code] += 1

    def token_gap(self, seconds: float) -> None:
        """The time between two successive tokens of one sequence."""
        self.histograms["inter_token_seconds"].observe(seconds)

    def cache_query(self, hit: bool) -> None:
        """A prompt was looked up in the prefix cache."""
        self.prefix_cache_queries += 1
        self.prefix_cache_hits += int(hit)

    def histogram_wire(self) -> dict[str, dict[str, object]]:
        """Every histogram as a :class:`HistogramData` wire map, by name."""
        return {name: h.to_wire().to_wire() for name, h in self.histograms.items()}
