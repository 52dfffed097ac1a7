"""Metrics end to end on a real fake fleet: the workers' ``metrics`` command, and the
Prometheus exporter (llamafleet/gateway/metrics.py) over an AsyncClient, its text
parsed back with prometheus_client. Expected values come from what the generations
themselves report (their Completion stats), never from timing guesses."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from llamafleet.client import AsyncClient, Client
from llamafleet.gateway.metrics import WORKER_STATES, FleetMetrics
from llamafleet.runtime.errors import BadRequest, RequestTimeout
from llamafleet.runtime.protocol import Completion, HistogramData, WorkerMetrics
from llamafleet.runtime.supervisor import Supervisor
from llamafleet.testing import fake_fleet
from tests.conftest import catch, kill, wait_for, worker_pid

T = TypeVar("T")
MODELS: dict[str, dict[str, Any]] = {
    "fast": {"backend": "fake", "n_ctx": 512, "n_seq_max": 2, "cache_min_tokens": 4},
    "slow": {"backend": "fake", "token_delay": 0.02},
    "crashy": {"backend": "fake"},
}
GREEDY: dict[str, Any] = {"temperature": 0.0, "ignore_eos": True}
#: worker histogram -> exported name
HISTOGRAMS = {"ttft_seconds": "llamafleet_time_to_first_token_seconds",
              "inter_token_seconds": "llamafleet_inter_token_latency_seconds",
              "e2e_seconds": "llamafleet_e2e_request_latency_seconds",
              "queue_seconds": "llamafleet_request_queue_time_seconds",
              "prompt_tokens": "llamafleet_request_prompt_tokens",
              "generation_tokens": "llamafleet_request_generation_tokens"}
COUNTERS = ["prompt_tokens", "cached_prompt_tokens", "generation_tokens",
            "speculative_drafted_tokens", "speculative_accepted_tokens", "requests_finished",
            "requests_failed", "prefix_cache_queries", "prefix_cache_hits", "worker_restarts",
            "http_requests"]
GAUGES = ["requests_running", "requests_waiting", "worker_state", "worker_load_seconds",
          "kv_cache_used_tokens", "kv_cache_capacity_tokens", "kv_cache_usage_ratio"]


@pytest.fixture(scope="module")
def sup() -> Iterator[Supervisor]:
    with fake_fleet(MODELS) as s:
        yield s


@pytest.fixture(scope="module")
def c(sup: Supervisor) -> Iterator[Client]:
    with Client(sup.address, timeout=30) as client:
        yield client


class Exporter:
    """A FleetMetrics over an AsyncClient of its own, on an event loop in a thread
    (as the gateway runs it), scraped from the test's thread."""

    def __init__(self, address: str, models: list[str]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def make() -> FleetMetrics:
            return FleetMetrics(AsyncClient(address, timeout=30), models)

        self.fm = self.run(make())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def text(self, timeout: float = 2.0) -> str:
        self.run(self.fm.refresh(timeout))
        return self.fm.render().decode()

    def scrape(self, timeout: float = 2.0) -> dict[str, float]:
        """Every sample as ``name{label=value,...}`` (labels sorted) -> value."""
        return samples(self.text(timeout))

    def close(self) -> None:
        async def shutdown() -> None:
            await self.fm.client.close()
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        self.run(shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def samples(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            key = f"{s.name}{{{labels}}}"
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


@pytest.fixture
def exporter(sup: Supervisor) -> Iterator[Exporter]:
    e = Exporter(sup.address, list(MODELS))
    yield e
    e.close()


def delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after[key] - before.get(key, 0.0)


def hist(m: WorkerMetrics, name: str) -> HistogramData:
    return HistogramData.from_wire(m.histograms[name])


def serve(c: Client, model: str, prompts: list[tuple[str, int]]) -> list[Completion]:
    return [c.generate(model, p, max_tokens=n, **GREEDY) for p, n in prompts]


# -- the worker's metrics command ----------------------------------------------------------------
def test_worker_reports_who_it_is_and_its_kv(sup: Supervisor, c: Client) -> None:
    status = next(w for w in c.status() if w["model"] == "fast")
    m = c.metrics("fast")
    assert (m.model, m.pid, m.generation) == ("fast", worker_pid(sup, "fast"),
                                              status["generation"])
    assert m.kv_capacity_tokens == 512 and m.kv_used_tokens == 0
    assert (m.requests_running, m.requests_waiting) == (0, 0)
    assert set(m.histograms) == set(HISTOGRAMS)
    tokens = c.tokenize("fast", "a caller keeps these tokens in its own sequence")
    assert c.prefill("fast", 0, tokens) == len(tokens)
    assert c.metrics("fast").kv_used_tokens == len(tokens)
    c.seq_clear("fast", 0)
    assert c.metrics("fast").kv_used_tokens == 0


def test_counters_move_by_what_the_generations_report(c: Client) -> None:
    before = c.metrics("fast")
    shared = "a shared system prompt that the prefix cache should keep"
    res = serve(c, "fast", [(shared, 3), (shared + " and more", 5), ("unrelated words", 1)])
    after = c.metrics("fast")
    assert after.generated_tokens - before.generated_tokens == \
        sum(r.stats.generated_tokens for r in res) == 9
    assert after.prompt_tokens - before.prompt_tokens == sum(r.stats.prompt_tokens for r in res)
    assert after.cached_tokens - before.cached_tokens == sum(r.stats.cached_tokens for r in res)
    assert res[1].stats.cached_tokens > 0  # the second prompt restored the first's prefix
    assert after.prefix_cache_queries - before.prefix_cache_queries == 3
    assert after.prefix_cache_hits - before.prefix_cache_hits == \
        sum(1 for r in res if r.stats.cached_tokens)
    assert after.finished.get("length", 0) - before.finished.get("length", 0) == 3
    assert after.failed == before.failed
    for name in ("ttft_seconds", "e2e_seconds", "queue_seconds", "prompt_tokens",
                 "generation_tokens"):
        assert hist(after, name).count - hist(before, name).count == 3, name
    assert hist(after, "generation_tokens").sum - hist(before, "generation_tokens").sum == 9
    assert hist(after, "inter_token_seconds").count - hist(before, "inter_token_seconds").count \
        == sum(r.stats.generated_tokens - 1 for r in res)
    assert hist(after, "e2e_seconds").sum - hist(before, "e2e_seconds").sum == pytest.approx(
        sum(r.stats.total_ms for r in res) / 1e3)


def test_running_requests_and_a_cancel(c: Client) -> None:
    before = c.metrics("slow")
    with c.stream("slow", "go on", max_tokens=5000, **GREEDY) as s:
        assert next(iter(s))
        m = c.metrics("slow")
        assert m.requests_running == 1 and m.requests_waiting == 0
        assert m.kv_used_tokens > 0
        s.cancel()
    wait_for(lambda: c.metrics("slow").failed.get("cancelled", 0) ==
             before.failed.get("cancelled", 0) + 1)
    after = c.metrics("slow")
    assert after.requests_running == 0 and after.kv_used_tokens == 0
    assert after.finished == before.finished  # a cancel is not a finish
    assert hist(after, "e2e_seconds").count == hist(before, "e2e_seconds").count


def test_a_refused_request_counts_as_failed(c: Client) -> None:
    before = c.metrics("fast").failed.get("bad_request", 0)
    assert isinstance(catch(lambda: c.generate("fast", "word " * 600, max_tokens=2)),
                      BadRequest)  # longer than the 512-token context
    assert c.metrics("fast").failed.get("bad_request", 0) == before + 1


# -- the exporter -------------------------------------------------------------------------------
def test_every_metric_family_is_exported_with_its_type(c: Client, exporter: Exporter) -> None:
    serve(c, "fast", [("make every family have a sample", 2)])
    exporter.fm.observe_http("fast", "/v1/completions", 200, 0.01)
    text = exporter.text()
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    expected = {**{"llamafleet_" + n: "counter" for n in COUNTERS},
                **{"llamafleet_" + n: "gauge" for n in GAUGES},
                **{n: "histogram" for n in HISTOGRAMS.values()},
                "llamafleet_http_request_duration_seconds": "histogram"}
    assert {n: types.get(n) for n in expected} == expected
    # nothing undocumented (prometheus_client adds the creation time of its own metrics)
    assert set(types) == {*expected, "llamafleet_http_requests_created",
                          "llamafleet_http_request_duration_seconds_created"}
    for f in text_string_to_metric_families(text):
        for s in f.samples:
            assert s.labels.get("model") in MODELS, (s.name, s.labels)


def test_worker_state_load_time_and_kv(c: Client, exporter: Exporter) -> None:
    tokens = c.tokenize("fast", "some tokens held in a caller's sequence")
    c.prefill("fast", 0, tokens)
    try:
        m = exporter.scrape()
    finally:
        c.seq_clear("fast", 0)
    for model in MODELS:
        for state in WORKER_STATES:
            assert m[f"llamafleet_worker_state{{model={model},replica=0,state={state}}}"] == \
                (1.0 if state == "ready" else 0.0)
        assert m[f"llamafleet_worker_load_seconds{{model={model},replica=0}}"] >= 0
        assert m[f"llamafleet_requests_running{{model={model},replica=0}}"] == 0
    assert m["llamafleet_kv_cache_capacity_tokens{model=fast,replica=0}"] == 512
    assert m["llamafleet_kv_cache_used_tokens{model=fast,replica=0}"] == len(tokens)
    assert m["llamafleet_kv_cache_usage_ratio{model=fast,replica=0}"] == pytest.approx(len(tokens) / 512)


def test_exported_values_move_as_requests_are_served(c: Client, exporter: Exporter) -> None:
    before = exporter.scrape()
    res = serve(c, "fast", [("count these tokens", 4), ("and these ones", 7)])
    after = exporter.scrape()
    direct = c.metrics("fast")  # nothing ran in between: the same numbers
    assert delta(after, before, "llamafleet_generation_tokens_total{model=fast,replica=0}") == \
        sum(r.stats.generated_tokens for r in res) == 11
    assert after["llamafleet_generation_tokens_total{model=fast,replica=0}"] == direct.generated_tokens
    assert delta(after, before, "llamafleet_prompt_tokens_total{model=fast,replica=0}") == \
        sum(r.stats.prompt_tokens for r in res)
    assert after["llamafleet_cached_prompt_tokens_total{model=fast,replica=0}"] == direct.cached_tokens
    assert after["llamafleet_prefix_cache_queries_total{model=fast,replica=0}"] == \
        direct.prefix_cache_queries
    key = "llamafleet_requests_finished_total{finish_reason=length,model=fast,replica=0}"
    assert delta(after, before, key) == 2
    for name, exported in HISTOGRAMS.items():
        count = f"{exported}_count{{model=fast,replica=0}}"
        if name != "inter_token_seconds":
            assert delta(after, before, count) == 2, name
        h = hist(direct, name)
        assert after[count] == h.count
        assert after[f"{exported}_sum{{model=fast,replica=0}}"] == pytest.approx(h.sum)
        # cumulative buckets: le=b counts every observation <= b; +Inf is the count
        buckets = [after[f"{exported}_bucket{{le={le},model=fast,replica=0}}"]
                   for le in [*(repr(float(b)) for b in h.bounds), "+Inf"]]
        assert buckets == [float(sum(h.counts[:i + 1])) for i in range(len(h.counts))]
        assert buckets[-1] == after[count]
    assert delta(after, before, "llamafleet_inter_token_latency_seconds_count{model=fast,replica=0}") == \
        sum(r.stats.generated_tokens - 1 for r in res)
    key = "llamafleet_request_generation_tokens_bucket{le=5.0,model=fast,replica=0}"
    assert delta(after, before, key) == 1  # 4 tokens is <= 5, 7 is not


def test_failures_are_exported_by_code(c: Client, exporter: Exporter) -> None:
    key = "llamafleet_requests_failed_total{code=bad_request,model=fast,replica=0}"
    before = exporter.scrape().get(key, 0.0)
    catch(lambda: c.generate("fast", "word " * 600, max_tokens=2))
    assert exporter.scrape()[key] == before + 1


def test_http_metrics(exporter: Exporter) -> None:
    fm = exporter.fm
    for status, seconds in ((200, 0.3), (200, 0.7), (503, 90.0)):
        fm.observe_http("fast", "/v1/chat/completions", status, seconds)
    fm.observe_http("", "other", 404, 0.001)
    m = samples(fm.render().decode())  # no refresh needed: these live in the gateway
    base = "llamafleet_http_requests_total{code=%s,endpoint=/v1/chat/completions,model=fast}"
    assert m[base % 200] == 2 and m[base % 503] == 1
    assert m["llamafleet_http_requests_total{code=404,endpoint=other,model=}"] == 1
    dur = "llamafleet_http_request_duration_seconds"
    labels = "endpoint=/v1/chat/completions"
    assert m[f"{dur}_count{{{labels},model=fast}}"] == 3
    assert m[f"{dur}_sum{{{labels},model=fast}}"] == pytest.approx(91.0)
    assert m[f"{dur}_bucket{{{labels},le=0.5,model=fast}}"] == 1
    assert m[f"{dur}_bucket{{{labels},le=1.0,model=fast}}"] == 2
    assert m[f"{dur}_bucket{{{labels},le=60.0,model=fast}}"] == 2  # a 90 s stream is above
    assert m[f"{dur}_bucket{{{labels},le=120.0,model=fast}}"] == 3


def test_only_the_given_models_are_exported(sup: Supervisor) -> None:
    e = Exporter(sup.address, ["slow"])
    try:
        text = e.text()
    finally:
        e.close()
    models = {s.labels.get("model") for f in text_string_to_metric_families(text)
              for s in f.samples}
    assert models == {"slow"}


def test_a_killed_worker_counts_a_restart_and_starts_from_zero(
        sup: Supervisor, c: Client, exporter: Exporter) -> None:
    serve(c, "crashy", [("before the crash", 3)])
    before = exporter.scrape()
    assert before["llamafleet_generation_tokens_total{model=crashy,replica=0}"] == 3
    old = worker_pid(sup, "crashy")
    kill(old)

    def back() -> bool:
        w = next(w for w in sup.status() if w["model"] == "crashy")
        return w["state"] == "ready" and w["pid"] not in (None, old)

    wait_for(back, timeout=30)
    after = exporter.scrape()
    assert delta(after, before, "llamafleet_worker_restarts_total{model=crashy,replica=0}") == 1
    assert after["llamafleet_worker_restarts_total{model=fast,replica=0}"] == \
        before["llamafleet_worker_restarts_total{model=fast,replica=0}"]
    assert after["llamafleet_worker_state{model=crashy,replica=0,state=ready}"] == 1
    assert after["llamafleet_worker_state{model=crashy,replica=0,state=restarting}"] == 0
    # the new worker's counters start over (a counter reset, as Prometheus expects)
    assert after["llamafleet_generation_tokens_total{model=crashy,replica=0}"] == 0
    assert after["llamafleet_e2e_request_latency_seconds_count{model=crashy,replica=0}"] == 0


def test_a_worker_that_does_not_answer_is_left_out() -> None:
    with fake_fleet({"ok": {"backend": "fake"},
                     "wedged": {"backend": "fake", "wedge_after": 1}},
                    shutdown_grace=1.0) as s, Client(s.address, timeout=30) as c:
        e = Exporter(s.address, ["ok", "wedged"])
        try:
            e.run(_start(e.fm.client))  # its second evaluation never returns
            wait_for(lambda: isinstance(catch(lambda: c.ping("wedged", timeout=0.2)),
                                        RequestTimeout), timeout=10)
            t0 = time.monotonic()
            m = e.scrape(timeout=0.5)
            assert time.monotonic() - t0 < 3
        finally:
            e.close()
    assert "llamafleet_requests_running{model=ok,replica=0}" in m
    assert "llamafleet_requests_running{model=wedged,replica=0}" not in m
    # what the supervisor knows is still there
    assert m["llamafleet_worker_state{model=wedged,replica=0,state=ready}"] == 1


async def _start(client: AsyncClient) -> None:
    """Start a generation on the wedged model and leave it running."""
    asyncio.ensure_future(client.generate("wedged", "stuck", max_tokens=5, **GREEDY))


def test_the_exporter_imports_no_http_framework() -> None:
    code = ("import sys, llamafleet.gateway.metrics; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'starlette', 'uvicorn', 'pydantic', 'httpx'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_every_replica_is_its_own_series_and_they_sum_to_the_model() -> None:
    """Two replicas: each worker's numbers under its ``replica`` label (none read
    twice, none missing); their sum is every token the model's requests generated."""
    with fake_fleet({"r": {"backend": "fake", "replicas": 2, "token_delay": 0.005}}) as s, \
            Client(s.address, timeout=30) as c:
        e = Exporter(s.address, ["r"])
        try:
            results: list[Completion] = []
            threads = [threading.Thread(target=lambda i=i: results.append(c.generate(
                "r", f"prompt {i}", max_tokens=10 + i, **GREEDY))) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert len(results) == 8
            m = e.scrape()
            direct = [c.metrics("r", replica=r) for r in (0, 1)]
            with pytest.raises(BadRequest, match="no replica 2"):
                c.metrics("r", replica=2)
        finally:
            e.close()
    per = [m[f"llamafleet_generation_tokens_total{{model=r,replica={r}}}"] for r in (0, 1)]
    assert per == [d.generated_tokens for d in direct]
    assert all(per)  # the least-busy routing used both
    assert sum(per) == sum(r.stats.generated_tokens for r in results)
    for r in (0, 1):
        assert m[f"llamafleet_worker_state{{model=r,replica={r},state=ready}}"] == 1
