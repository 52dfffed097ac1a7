"""Continuous batching, admission control, prefix cache and sessions (fake backend)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamafleet.client import Client, Stream
from llamafleet.runtime.errors import Overloaded, RequestTimeout
from tests.conftest import kill, run_together, wait_for, worker_pid

PROMPTS = [f"request number {i}: tell me something" for i in range(8)]


def test_eight_concurrent_streams_match_their_solo_runs(fleet) -> None:
    sup = fleet({"tiny": {"backend": "fake", "n_seq_max": 8, "token_delay": 0.002}})
    with Client(sup.address, timeout=60) as c:
        solo = [c.generate("tiny", p, max_tokens=30, temperature=0, ignore_eos=True)
                for p in PROMPTS]
        out: dict[int, tuple[str, list[int]]] = {}

        def run(i: int) -> None:
            s = c.stream("tiny", PROMPTS[i], max_tokens=30, temperature=0, ignore_eos=True)
            text = "".join(s)
            out[i] = (text, s.result.tokens if s.result else [])

        ticks_before = c.info("tiny").scheduler.ticks
        run_together(c, sup, "tiny", [lambda i=i: run(i) for i in range(8)])
        ticks = c.info("tiny").scheduler.ticks - ticks_before
        for i in range(8):
            assert out[i] == (solo[i].text, solo[i].tokens)
        # batched: far fewer ticks than 8 requests x 31 evaluations one by one
        assert ticks < 8 * 31 / 2


def test_queue_limit_answers_overloaded_at_once(fleet) -> None:
    sup = fleet({"one": {"backend": "fake", "n_seq_max": 1, "max_queue": 1,
                         "token_delay": 0.02}})
    with Client(sup.address, timeout=30) as c:
        running = c.stream("one", "a", max_tokens=500, ignore_eos=True)
        next(running)
        queued = c.stream("one", "b", max_tokens=3, temperature=0)
        queued_thread = threading.Thread(target=lambda: queued.collect())
        queued_thread.start()
        wait_for(lambda: c.info("one").scheduler.queued == 1, timeout=5)
        t0 = time.monotonic()
        with pytest.raises(Overloaded) as info:
            c.generate("one", "c", max_tokens=3)
        assert time.monotonic() - t0 < 1.0
        assert info.value.retryable and info.value.data["queue_length"] == 1
        running.cancel()  # frees the slot: the queued request runs
        queued_thread.join(10)
        assert queued.result is not None and len(queued.result.tokens) == 3
        assert queued.result.stats.queue_ms > 0


@contextlib.contextmanager
def watched(stream: Stream) -> Iterator[list[float]]:
    """Consume a running stream on a thread; yields the arrival times of its deltas
    (cancelled on exit)."""
    next(stream)
    seen: list[float] = []
    done = threading.Event()

    def consume() -> None:
        for _ in stream:
            seen.append(time.monotonic())
            if done.is_set():
                break

    t = threading.Thread(target=consume)
    t.start()
    try:
        yield seen
    finally:
        done.set()
        t.join(10)
        stream.cancel()


def test_a_long_prompt_does_not_stall_running_streams(fleet) -> None:
    sup = fleet({"tiny": {"backend": "fake", "n_seq_max": 2, "n_batch": 16,
                          "token_delay": 0.01, "n_ctx": 4096, "stream_interval_ms": 0}})
    with Client(sup.address, timeout=60) as c:
        with watched(c.stream("tiny", "go", max_tokens=400, ignore_eos=True,
                              temperature=0)) as seen:
            t0 = time.monotonic()
            long = c.generate("tiny", "x" * 1500, max_tokens=1, temperature=0)  # ~95 chunks
            t1 = time.monotonic()
        during = [s for s in seen if t0 <= s <= t1]
        assert long.stats.prompt_tokens == 1501
        # the running stream kept producing tokens during the whole chunked prefill
        assert len(during) > 40


def test_publishing_a_finished_request_does_not_stall_running_streams(fleet) -> None:
    # pack_delay makes building each finished sequence's cache blob take 0.8 s: off the
    # loop, the running stream goes on meanwhile, and the session's reply waits for it
    sup = fleet({"tiny": {"backend": "fake", "n_seq_max": 2, "token_delay": 0.01,
                          "pack_delay": 0.8, "cache_min_tokens": 8, "stream_interval_ms": 0}})
    with Client(sup.address, timeout=60) as c:
        history = "user: keep this conversation for later, please\nassistant:"
        with watched(c.stream("tiny", "go", max_tokens=2000, ignore_eos=True,
                              temperature=0)) as seen:
            t0 = time.monotonic()
            turn = c.generate("tiny", history, max_tokens=3, temperature=0, session="s")
            t1 = time.monotonic()
        assert turn.session_saved is True
        assert t1 - t0 >= 0.8  # the reply came after its KV was persisted
        during = [s for s in seen if t0 + 0.1 <= s <= t1]
        # ~70 tokens at 10 ms in the 0.7 s of the publish; on the loop it would be none
        assert len(during) > 20
        # persisted: the next turn restores it
        again = c.generate("tiny", history + turn.text + "\nuser: more\nassistant:",
                           max_tokens=2, temperature=0, session="s")
        assert again.stats.cached_tokens >= len(c.tokenize("tiny", history)) + 2


def test_deadline_ends_a_request_on_the_worker(fleet) -> None:
    sup = fleet({"one": {"backend": "fake", "n_seq_max": 1, "token_delay": 0.02}})
    with Client(sup.address, timeout=30) as c:
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout):
            c.generate("one", "a", max_tokens=60_000, ignore_eos=True, timeout=0.5)
        assert time.monotonic() - t0 < 2.0
        wait_for(lambda: c.info("one").scheduler.running == 0, timeout=3)


def test_cached_prefix_is_hit_and_gives_the_cold_output(fleet) -> None:
    sup = fleet({"tiny": {"backend": "fake", "cache_min_tokens": 8},
                 "cold": {"backend": "fake", "prefix_cache": False}})
    system = "You are a careful assistant. Answer in one line. " * 3
    with Client(sup.address, timeout=30) as c:
        first = c.generate("tiny", system + "Q1?", max_tokens=10, temperature=0)
        assert first.stats.cached_tokens == 0
        second = c.generate("tiny", system + "Q2, a different question?", max_tokens=10,
                            temperature=0)
        shared = len(c.tokenize("tiny", system + "Q"))
        assert second.stats.cached_tokens == shared
        cold = c.generate("cold", system + "Q2, a different question?", max_tokens=10,
                          temperature=0)
        unsaved = c.call("cold", "generate", {"prompt": "hi", "max_tokens": 2,
                                              "session": "s", "stream": False})
        assert unsaved["session_saved"] is False and "prefix_cache" in unsaved["session_error"]
        assert cold.stats.cached_tokens == 0 and second.tokens == cold.tokens
        stats = c.info("tiny").cache
        assert stats["hits_ram"] >= 1 and stats["ram_entries"] >= 1


def test_session_survives_sigkill_of_its_worker(fleet, short_dir: Path) -> None:
    sup = fleet({"tiny": {"backend": "fake", "cache_min_tokens": 8}})
    history = "user: plan a trip to the mountains for three days please\nassistant:"
    with Client(sup.address, timeout=30) as c:
        t1 = c.generate("tiny", history, max_tokens=12, temperature=0, session="trip")
        assert t1.tokens
        persisted = len(c.tokenize("tiny", history)) + len(t1.tokens)
        kill(worker_pid(sup, "tiny"))
        wait_for(lambda: c.status()[0]["restarts"] == 1 and c.status()[0]["state"] == "ready")
        turn2 = history + t1.text + "\nuser: and the budget?\nassistant:"
        t2 = c.generate("tiny", turn2, max_tokens=12, temperature=0, session="trip")
        # resumed from the persisted state instead of re-prefilling everything
        assert t2.stats.cached_tokens >= persisted - 1
        assert c.info("tiny").cache["hits_disk"] >= 1


def test_corrupted_cache_file_is_detected_and_ignored(fleet, tmp_path: Path) -> None:
    cache_dir = tmp_path / "kv"
    sup = fleet({"tiny": {"backend": "fake", "cache_min_tokens": 8,
                          "cache_dir": str(cache_dir)}})
    prompt = "the quick brown fox jumps over the lazy dog " * 2
    with Client(sup.address, timeout=30) as c:
        cold = c.generate("tiny", prompt, max_tokens=10, temperature=0, session="s")
        wait_for(lambda: list(cache_dir.glob("*.kv")), timeout=5)
        for f in cache_dir.glob("*.kv"):
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 0xFF
            f.write_bytes(bytes(data))
        kill(worker_pid(sup, "tiny"))
        wait_for(lambda: c.status()[0]["restarts"] == 1 and c.status()[0]["state"] == "ready")
        again = c.generate("tiny", prompt, max_tokens=10, temperature=0, session="s")
        assert again.tokens == cold.tokens
        assert again.stats.cached_tokens == 0
        assert c.info("tiny").cache["corrupt_files"] >= 1


def test_request_ids_are_per_client(fleet) -> None:
    """Two clients number their requests alike: neither may disturb the other."""
    sup = fleet({"f": {"backend": "fake", "token_delay": 0.01}})
    with Client(sup.address, timeout=30) as a, Client(sup.address, timeout=30) as b:
        a.ping("f")
        b.ping("f")  # both clients have now used the same ids
        results: dict[str, object] = {}

        def run(name: str, c: Client) -> None:
            try:
                results[name] = c.generate("f", "hello", max_tokens=30, ignore_eos=True)
            except Exception as exc:  # noqa: BLE001 - recorded for the assertion
                results[name] = exc

        threads = [threading.Thread(target=run, args=(n, c)) for n, c in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert all(len(r.tokens) == 30 for r in results.values()), results  # type: ignore
        stream = b.stream("f", "hello", max_tokens=100, ignore_eos=True)
        next(stream)
        rid = stream._inner._call.id  # b's request id; a cancels "the same" id
        assert a.call("f", "cancel", {"target": rid}) == {"cancelled": False}
        assert len(stream.collect().tokens) == 100


def test_generate_when_every_slot_holds_caller_state_is_overloaded(fleet) -> None:
    """Nothing running could free a slot: refuse at once instead of waiting forever."""
    sup = fleet({"two": {"backend": "fake", "n_seq_max": 2}})
    with Client(sup.address, timeout=30) as c:
        toks = c.tokenize("two", "kept")
        c.prefill("two", 0, toks)
        c.prefill("two", 1, toks)
        t0 = time.monotonic()
        with pytest.raises(Overloaded, match="seq_clear"):
            c.generate("two", "x", max_tokens=2, timeout=10)
        assert time.monotonic() - t0 < 2
        c.seq_clear("two", 1)
        assert c.generate("two", "x", max_tokens=2, ignore_eos=True).tokens
        assert c.decode("two", 0, temperature=0).token is not None  # caller's state intact


def test_stream_deltas_are_coalesced_but_the_first_goes_out_at_once(fleet) -> None:
    sup = fleet({"every": {"backend": "fake", "token_delay": 0.002, "stream_interval_ms": 0},
                 "coalesced": {"backend": "fake", "token_delay": 0.002,
                               "stream_interval_ms": 50}})
    with Client(sup.address, timeout=30) as c:
        runs = {}
        for model in ("every", "coalesced"):
            s = c.stream(model, "abc", max_tokens=120, temperature=0, ignore_eos=True)
            deltas = list(s)
            runs[model] = (deltas, s.result)
        every, coalesced = runs["every"], runs["coalesced"]
        assert "".join(every[0]) == "".join(coalesced[0]) == coalesced[1].text
        assert every[1].tokens == coalesced[1].tokens
        assert len(every[0]) == 120
        assert 2 <= len(coalesced[0]) < 40  # ~0.3 s of decoding in 50 ms windows
        assert len(coalesced[0][0]) == 1  # the first token was not held back


def test_streams_share_one_flush_clock() -> None:
    """Coalesced chunks of concurrent streams leave in the same ticks, so a client
    reading several streams wakes once per interval rather than once per stream."""
    from llamafleet.backends import get_backend
    from llamafleet.runtime.sampling import SamplingParams
    from llamafleet.worker.generation import Generation
    from llamafleet.worker.scheduler import Scheduler

    be = get_backend("fake")({"token_delay": 0.002, "n_seq_max": 4})
    be.load()
    sched: Scheduler
    from llamafleet.runtime.protocol import StreamChunk
    sends: list[tuple[int, int, str]] = []  # (tick, request, kind)
    sched = Scheduler(be, send=lambda peer, req_id, out: sends.append(
        (sched.ticks, req_id, "chunk" if isinstance(out, StreamChunk) else "other")),
        stream_interval=0.02, max_queue=64)

    def gen(req_id: int, n: int) -> Generation:
        return Generation(peer=b"p", req_id=req_id, stream=True, prompt_tokens=[1, 2, 3],
                          params=SamplingParams(temperature=0), max_tokens=n, stop=[],
                          ignore_eos=True, seq=None, deadline=None, session=None)

    sched.submit(gen(1, 150))
    for _ in range(7):  # the second stream starts out of phase with the first
        sched.tick()
    sched.submit(gen(2, 100))
    while sched.busy:
        sched.tick()
    chunks = {r: [t for t, req, kind in sends if req == r and kind == "chunk"] for r in (1, 2)}
    assert len(chunks[1]) >= 5 and len(chunks[2]) >= 4  # coalesced, yet several chunks
    # after its first (sent at once) and before its last, every chunk of stream 2
    # left in a tick where stream 1 sent one too
    assert set(chunks[2][1:-1]) <= set(chunks[1])
    # and neither stream sent a chunk per token
    assert len(chunks[1]) < 150 / 3
