"""The worker's metrics bookkeeping (worker/metrics.py), in-process: histogram buckets,
and the counters a Scheduler over the fake backend keeps as it serves, fails and
restores prompts. Every expected number comes from the results the scheduler sent."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from llamafleet.backends import get_backend
from llamafleet.backends.base import Backend
from llamafleet.runtime.errors import LlamafleetError, Overloaded
from llamafleet.runtime.protocol import Completion, CompletionStats, HistogramData
from llamafleet.runtime.sampling import SamplingParams
from llamafleet.worker.generation import Generation
from llamafleet.worker.metrics import SECONDS_BUCKETS, TOKEN_BUCKETS, Histogram, WorkerCounters
from llamafleet.worker.prefix_cache import PrefixCache
from llamafleet.worker.scheduler import KVCache, Outgoing, Scheduler

PROMPT = "the quick brown fox jumps"
HISTOGRAMS = {"ttft_seconds", "inter_token_seconds", "e2e_seconds", "queue_seconds",
              "prompt_tokens", "generation_tokens"}


# -- the histogram ----------------------------------------------------------------------------
def test_a_value_on_a_bound_falls_in_that_bound_s_bucket() -> None:
    h = Histogram((1.0, 2.0, 5.0))
    for v in (1.0, 2.0, 5.0):  # Prometheus' le: the bound is inclusive
        h.observe(v)
    assert h.counts == [1, 1, 1, 0]
    h.observe(math.nextafter(1.0, math.inf))  # just above a bound: the next bucket
    h.observe(math.nextafter(5.0, math.inf))  # just above the last: overflow
    assert h.counts == [1, 2, 1, 1]


def test_below_the_first_bound_and_above_the_last() -> None:
    h = Histogram((1.0, 10.0))
    for v in (-3.0, 0.0, 0.5, 11.0, 1e9, math.inf):
        h.observe(v)
    assert h.counts == [3, 0, 3]
    assert h.count == 6


def test_sum_and_wire_form() -> None:
    h = Histogram((1, 2, 5))
    for v in (0.5, 1.5, 1.5, 7):
        h.observe(v)
    wire = h.to_wire()
    assert wire == HistogramData(bounds=[1.0, 2.0, 5.0], counts=[1, 2, 0, 1], sum=10.5)
    assert wire.count == 4
    assert len(wire.counts) == len(wire.bounds) + 1
    # the reply carries a copy: later observations do not change a sent snapshot
    h.observe(3)
    assert wire.counts == [1, 2, 0, 1] and h.counts == [1, 2, 1, 1]
    assert HistogramData.from_wire(wire.to_wire()) == wire


def test_nan_is_not_counted() -> None:
    h = Histogram((1.0,))
    h.observe(math.nan)
    assert h.counts == [0, 0] and h.sum == 0.0


@pytest.mark.parametrize("bounds", [(), (2.0, 1.0), (1.0, 1.0), (1.0, math.inf),
                                    (math.nan,)])
def test_bad_bounds_are_refused(bounds: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        Histogram(bounds)


def test_bucket_scales() -> None:
    assert SECONDS_BUCKETS[0] == 0.001 and SECONDS_BUCKETS[-1] == 60.0
    assert TOKEN_BUCKETS[:4] == (1, 2, 5, 10) and TOKEN_BUCKETS[-1] == 65536
    for scale in (SECONDS_BUCKETS, TOKEN_BUCKETS):
        assert list(scale) == sorted(set(scale))
    c = WorkerCounters()
    assert set(c.histograms) == HISTOGRAMS
    assert all(HistogramData.from_wire(w).count == 0 for w in c.histogram_wire().values())


def test_finished_records_the_reported_stats() -> None:
    c = WorkerCounters()
    c.finished("length", CompletionStats(prompt_tokens=7, cached_tokens=3, generated_tokens=4,
                                         queue_ms=5.0, ttft_ms=20.0, total_ms=250.0))
    c.finished("stop", CompletionStats(prompt_tokens=2, generated_tokens=0, total_ms=1.0))
    assert (c.prompt_tokens, c.cached_tokens, c.generated_tokens) == (9, 3, 4)
    assert dict(c.finish_reasons) == {"length": 1, "stop": 1}
    h = {k: v.to_wire() for k, v in c.histograms.items()}
    assert h["e2e_seconds"].count == 2 and h["e2e_seconds"].sum == pytest.approx(0.251)
    # a missing timing is not observed (nothing is made up)
    assert h["queue_seconds"].count == 1 and h["queue_seconds"].sum == pytest.approx(0.005)
    assert h["ttft_seconds"].count == 1 and h["ttft_seconds"].sum == pytest.approx(0.02)
    assert h["prompt_tokens"].sum == 9 and h["generation_tokens"].counts[0] == 1  # the 0
    assert h["inter_token_seconds"].count == 0


# -- a scheduler's counters --------------------------------------------------------------------
class Rig:
    """A loaded fake backend and a Scheduler over it, recording what it sent."""

    def __init__(self, *, cache: KVCache | None = None, max_queue: int = 64,
                 **options: Any) -> None:
        self.be: Backend = get_backend("fake")({"n_seq_max": 2, **options})
        self.be.load()
        self.sent: list[tuple[int, Outgoing]] = []
        self.sched = Scheduler(self.be, send=lambda p, r, out: self.sent.append((r, out)),
                               max_queue=max_queue, cache=cache, stream_interval=0.0)

    @property
    def counters(self) -> WorkerCounters:
        return self.sched.counters

    def submit(self, req_id: int, prompt: str | Sequence[int] = PROMPT, *,
               max_tokens: int = 8, stop: list[str] | None = None,
               deadline: float | None = None) -> Generation:
        tokens = self.be.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        g = Generation(peer=b"client", req_id=req_id, stream=False, prompt_tokens=tokens,
                       params=SamplingParams(temperature=0), max_tokens=max_tokens,
                       stop=stop or [], ignore_eos=True, seq=None, deadline=deadline,
                       session=None)
        self.sched.submit(g)
        return g

    def run(self) -> None:
        for _ in range(10_000):
            if not self.sched.busy:
                return
            if not self.sched.running and not self.sched.queue:
                time.sleep(0.001)  # results wait for the publisher thread
            self.sched.tick()
        raise AssertionError("scheduler did not go idle")

    def results(self) -> list[Completion]:
        return [out for _, out in self.sent if isinstance(out, Completion)]

    def errors(self) -> list[LlamafleetError]:
        return [out for _, out in self.sent if isinstance(out, LlamafleetError)]

    def hist(self, name: str) -> HistogramData:
        return HistogramData.from_wire(self.counters.histogram_wire()[name])


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[PrefixCache]:
    c = PrefixCache(ram_bytes=1 << 20, disk_dir=tmp_path / "pc", disk_bytes=1 << 24,
                    min_tokens=4)
    yield c
    c.close()


def test_counters_add_up_the_results() -> None:
    rig = Rig(n_seq_max=2)
    prompts = [PROMPT, "a b", "one two three four five six seven", "x"]
    for i, (p, n) in enumerate(zip(prompts, (1, 3, 8, 20)), start=1):
        rig.submit(i, p, max_tokens=n)
    rig.run()
    res = rig.results()
    assert len(res) == 4 and not rig.errors()
    c = rig.counters
    assert c.generated_tokens == sum(r.stats.generated_tokens for r in res) == 1 + 3 + 8 + 20
    assert c.prompt_tokens == sum(r.stats.prompt_tokens for r in res)
    assert c.prompt_tokens == sum(len(rig.be.tokenize(p)) for p in prompts)
    assert c.cached_tokens == 0 and dict(c.error_codes) == {}
    assert dict(c.finish_reasons) == {"length": 4}
    for name in ("e2e_seconds", "queue_seconds", "ttft_seconds", "prompt_tokens",
                 "generation_tokens"):
        assert rig.hist(name).count == 4, name
    assert rig.hist("generation_tokens").sum == c.generated_tokens
    assert rig.hist("prompt_tokens").sum == c.prompt_tokens
    assert rig.hist("generation_tokens").counts[:3] == [1, 0, 1]  # 1 | (1,2] | (2,5]: the 3
    assert rig.hist("e2e_seconds").sum == pytest.approx(
        sum(r.stats.total_ms for r in res) / 1e3)
    assert rig.hist("queue_seconds").sum == pytest.approx(
        sum(r.stats.queue_ms or 0.0 for r in res) / 1e3)
    # one gap between each two successive tokens of a sequence
    assert rig.hist("inter_token_seconds").count == sum(
        r.stats.generated_tokens - 1 for r in res)


def test_timings_are_measured() -> None:
    delay = 0.004  # the fake backend sleeps this long per evaluation
    rig = Rig(n_seq_max=1, token_delay=delay)
    rig.submit(1, max_tokens=4)
    rig.submit(2, max_tokens=4)  # waits for the first one's slot
    rig.run()
    gaps = rig.hist("inter_token_seconds")
    assert gaps.count == 6
    # every gap spans one evaluation: none in the buckets below the delay
    assert sum(n for b, n in zip(gaps.bounds, gaps.counts) if b < delay) == 0
    assert rig.hist("ttft_seconds").sum >= 2 * delay
    queued = rig.hist("queue_seconds")
    assert queued.count == 2 and queued.sum >= 4 * delay  # the second waited 4+ evaluations
    assert rig.hist("e2e_seconds").sum > rig.hist("ttft_seconds").sum


def test_finish_reasons_are_counted_apart() -> None:
    rig = Rig()
    rig.submit(1, max_tokens=6)
    rig.run()
    text = rig.results()[0].text
    stop = text[len(text) // 2:][:2]
    assert stop.strip()
    rig.submit(2, max_tokens=6, stop=[stop])
    rig.run()
    assert rig.results()[1].finish_reason == "stop"
    assert dict(rig.counters.finish_reasons) == {"length": 1, "stop": 1}
    assert rig.counters.generated_tokens == sum(r.stats.generated_tokens for r in rig.results())


def test_failures_are_counted_by_code_and_not_as_finished() -> None:
    rig = Rig(n_seq_max=1, max_queue=3)
    running = rig.submit(1, max_tokens=100)
    rig.submit(2)
    rig.submit(3, deadline=time.monotonic() - 1)  # past its deadline before admission
    with pytest.raises(Overloaded):
        rig.submit(4)  # refused by submit itself: the worker's server counts it
    for _ in range(3):
        rig.sched.tick()
    assert running.tokens
    assert rig.sched.cancel((b"client", 1))
    assert rig.sched.cancel((b"client", 2))
    rig.run()
    assert not rig.results() and len(rig.errors()) == 3
    c = rig.counters
    assert dict(c.error_codes) == {"cancelled": 2, "timeout": 1}
    assert dict(c.finish_reasons) == {} and c.generated_tokens == 0 and c.prompt_tokens == 0
    assert rig.hist("e2e_seconds").count == 0
    # the gaps of the cancelled generation were real: they stay counted
    assert rig.hist("inter_token_seconds").count == len(running.tokens) - 1


def test_prefix_cache_queries_and_hits(cache: PrefixCache) -> None:
    rig = Rig(cache=cache)
    base = rig.be.tokenize(PROMPT)
    rig.submit(1, base, max_tokens=4)
    rig.run()
    assert (rig.counters.prefix_cache_queries, rig.counters.prefix_cache_hits) == (1, 0)
    rig.submit(2, base + rig.be.tokenize(" over the lazy dog", add_special=False),
               max_tokens=4)
    rig.run()
    assert (rig.counters.prefix_cache_queries, rig.counters.prefix_cache_hits) == (2, 1)
    rig.submit(3, "nothing alike at all here", max_tokens=2)
    rig.run()
    assert (rig.counters.prefix_cache_queries, rig.counters.prefix_cache_hits) == (3, 1)
    res = rig.results()
    assert res[1].stats.cached_tokens >= len(base)
    assert rig.counters.cached_tokens == sum(r.stats.cached_tokens for r in res)


def test_no_cache_no_queries() -> None:
    rig = Rig()
    rig.submit(1, max_tokens=2)
    rig.run()
    assert (rig.counters.prefix_cache_queries, rig.counters.prefix_cache_hits) == (0, 0)
