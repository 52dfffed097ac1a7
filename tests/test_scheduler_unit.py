"""Scheduler, in-process over the fake backend: admission, queueing, cancels,
deadlines, finish reasons, chunked prefill, caller-owned sequences, the prefix
cache and sessions. No processes, no sockets: each test takes milliseconds."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from llamafleet.backends import get_backend
from llamafleet.backends.base import Backend
from llamafleet.runtime.errors import (
    BadRequest,
    Cancelled,
    LlamafleetError,
    Overloaded,
    RequestTimeout,
)
from llamafleet.runtime.protocol import Completion, StreamChunk
from llamafleet.runtime.sampling import SamplingParams
from llamafleet.worker.generation import Generation
from llamafleet.worker.prefix_cache import CacheHit, PrefixCache
from llamafleet.worker.scheduler import KVCache, Outgoing, Scheduler

PROMPT = "the quick brown fox jumps"


class Rig:
    """A loaded fake backend, a Scheduler over it, and everything it sent."""

    def __init__(self, *, cache: KVCache | None = None, max_queue: int = 64,
                 **options: Any) -> None:
        self.be: Backend = get_backend("fake")({"n_seq_max": 2, **options})
        self.be.load()
        self.sent: list[tuple[bytes, int, Outgoing]] = []
        self.sched = Scheduler(self.be, send=self._send, max_queue=max_queue, cache=cache,
                               stream_interval=0.0)

    def _send(self, peer: bytes, req_id: int, out: Outgoing) -> None:
        self.sent.append((peer, req_id, out))

    def gen(self, req_id: int, prompt: str | Sequence[int] = PROMPT, *, max_tokens: int = 8,
            stop: list[str] | None = None, stream: bool = False, seq: int | None = None,
            deadline: float | None = None, session: str | None = None,
            ignore_eos: bool = True) -> Generation:
        tokens = self.be.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        return Generation(peer=b"client", req_id=req_id, stream=stream, prompt_tokens=tokens,
                          params=SamplingParams(temperature=0), max_tokens=max_tokens,
                          stop=stop or [], ignore_eos=ignore_eos, seq=seq, deadline=deadline,
                          session=session)

    def submit(self, req_id: int, prompt: str | Sequence[int] = PROMPT,
               **kw: Any) -> Generation:
        g = self.gen(req_id, prompt, **kw)
        self.sched.submit(g)
        return g

    def run(self, max_ticks: int = 10_000) -> None:
        """Tick until nothing is queued or running."""
        for _ in range(max_ticks):
            if not self.sched.busy:
                return
            if not self.sched.running and not self.sched.queue:
                time.sleep(0.001)  # results wait for the publisher thread
            self.sched.tick()
        raise AssertionError("scheduler did not go idle")

    def results(self) -> dict[int, Completion]:
        return {r: out for _, r, out in self.sent if isinstance(out, Completion)}

    def errors(self) -> dict[int, LlamafleetError]:
        return {r: out for _, r, out in self.sent if isinstance(out, LlamafleetError)}

    def chunks(self, req_id: int) -> list[StreamChunk]:
        return [out for _, r, out in self.sent if r == req_id and isinstance(out, StreamChunk)]

    def complete(self, req_id: int, prompt: str | Sequence[int] = PROMPT,
                 **kw: Any) -> Completion:
        """Submit one request, run to idle, return its Completion."""
        self.submit(req_id, prompt, **kw)
        self.run()
        return self.results()[req_id]


@pytest.fixture
def caches(tmp_path: Path) -> Iterator[Any]:
    made: list[PrefixCache] = []

    def make(name: str = "pc") -> PrefixCache:
        c = PrefixCache(ram_bytes=1 << 20, disk_dir=tmp_path / name, disk_bytes=1 << 24,
                        min_tokens=4)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


# -- admission and queueing --------------------------------------------------------------


def test_admits_up_to_n_seq_max_then_fifo() -> None:
    rig = Rig(n_seq_max=2)
    for i in range(1, 6):
        rig.submit(i, max_tokens=3 + i)  # different lengths: slots free at different ticks
    admitted: list[int] = []
    while rig.sched.busy:
        rig.sched.tick()
        assert len(rig.sched.running) <= 2
        admitted += [k[1] for k in rig.sched.running if k[1] not in admitted]
        assert [g.req_id for g in rig.sched.queue] == sorted(g.req_id for g in rig.sched.queue)
        if rig.sched.ticks == 1:
            assert set(k[1] for k in rig.sched.running) == {1, 2}
            assert [g.req_id for g in rig.sched.queue] == [3, 4, 5]
    assert admitted == [1, 2, 3, 4, 5]
    assert rig.sched.peak_running == 2
    res = rig.results()
    assert sorted(res) == [1, 2, 3, 4, 5] and not rig.errors()
    assert all(len(res[i].tokens) == 3 + i for i in res)
    assert res[5].stats.queue_ms is not None and res[5].stats.queue_ms > 0
    assert rig.sched.seq_owner == {}  # every slot released


def test_overloaded_past_max_queue() -> None:
    rig = Rig(n_seq_max=1, max_queue=2)
    rig.submit(1)
    rig.submit(2)
    with pytest.raises(Overloaded) as ei:
        rig.submit(3)
    assert ei.value.data == {"queue_length": 2, "max_queue": 2, "running": 0}
    rig.sched.tick()  # 1 is admitted: the queue has room again
    assert rig.sched.inflight() == 2
    rig.submit(3)
    with pytest.raises(Overloaded):
        rig.submit(4)
    rig.run()
    assert sorted(rig.results()) == [1, 2, 3] and not rig.errors()


def test_duplicate_request_id_is_refused() -> None:
    rig = Rig()
    rig.submit(1)
    with pytest.raises(BadRequest):
        rig.submit(1)
    rig.sched.tick()
    with pytest.raises(BadRequest):
        rig.submit(1)  # running, not queued
    rig.run()
    assert list(rig.results()) == [1]


# -- cancel and deadlines -----------------------------------------------------------------


def test_cancel_queued_request() -> None:
    rig = Rig(n_seq_max=1)
    rig.submit(1, max_tokens=20)
    rig.submit(2)
    rig.submit(3)
    rig.sched.tick()
    assert rig.sched.cancel((b"client", 2)) is True
    assert [g.req_id for g in rig.sched.queue] == [3]
    err = rig.errors()[2]
    assert isinstance(err, Cancelled)
    assert rig.sched.cancel((b"client", 3), notify=False) is True  # caller gone: no reply
    assert rig.sched.cancel((b"client", 99)) is False
    assert rig.sched.cancel((b"other-client", 1)) is False  # ids are per client
    rig.run()
    assert list(rig.results()) == [1] and set(rig.errors()) == {2}


def test_cancel_running_request_frees_its_slot() -> None:
    rig = Rig(n_seq_max=1)
    g = rig.submit(1, max_tokens=100)
    rig.submit(2, max_tokens=3)
    for _ in range(5):
        rig.sched.tick()
    seq = g.seq
    assert seq is not None and rig.be.seq_len(seq) > 0 and g.tokens
    assert rig.sched.cancel((b"client", 1)) is True
    err = rig.errors()[1]
    assert isinstance(err, Cancelled)
    assert err.data["tokens"] == g.tokens and err.data["text"] == g.text.text
    assert rig.sched.owner(seq) is None and rig.be.seq_len(seq) == 0
    assert g.finish_reason == "error"
    rig.run()  # the queued request takes the freed slot
    assert list(rig.results()) == [2]


def test_deadline_expires_while_queued() -> None:
    rig = Rig(n_seq_max=1)
    rig.submit(1, max_tokens=10)
    rig.submit(2, deadline=time.monotonic() - 1.0)  # already past: fails before admission
    rig.sched.tick()
    err = rig.errors()[2]
    assert isinstance(err, RequestTimeout) and err.data["tokens"] == []
    assert [g.req_id for g in rig.sched.queue] == []
    rig.run()
    assert list(rig.results()) == [1]


def test_deadline_expires_while_running() -> None:
    rig = Rig()
    g = rig.submit(1, max_tokens=1000, deadline=time.monotonic() + 3600)
    other = rig.submit(2, max_tokens=30)
    for _ in range(4):
        rig.sched.tick()
    assert g.tokens and not rig.sent
    seq = g.seq
    assert seq is not None
    g.deadline = time.monotonic() - 0.001  # its time is up
    rig.sched.tick()
    err = rig.errors()[1]
    assert isinstance(err, RequestTimeout)
    assert err.data["tokens"] == g.tokens and len(g.tokens) < 1000
    assert rig.sched.owner(seq) is None and rig.be.seq_len(seq) == 0
    rig.run()  # the other request is unaffected
    assert rig.results()[2].tokens == other.tokens and len(other.tokens) == 30


# -- finish reasons and streaming -----------------------------------------------------------


def test_max_tokens_finishes_with_length() -> None:
    res = Rig().complete(1, max_tokens=7)
    assert res.finish_reason == "length" and len(res.tokens) == 7
    assert res.stats.generated_tokens == 7 and res.stats.prompt_tokens == len(PROMPT) + 1
    assert res.stop is None and res.seq is None and res.cache is None


def test_stop_string_finishes_with_stop() -> None:
    free = Rig().complete(1, max_tokens=40).text
    stop = free[10:13]
    cut = free.index(stop)
    assert cut > 0
    res = Rig().complete(1, max_tokens=40, stop=["never-there", stop])
    assert res.finish_reason == "stop" and res.stop == stop
    assert res.text == free[:cut]
    assert len(res.tokens) == cut + len(stop)  # one byte per token; the stop's tokens count


def test_stream_chunks_add_up_to_the_result() -> None:
    rig = Rig()
    stop = Rig().complete(1, max_tokens=30).text[20:23]
    rig.submit(1, max_tokens=30, stream=True, stop=[stop])
    rig.run()
    res = rig.results()[1]
    chunks = rig.chunks(1)
    assert len(chunks) > 1
    assert "".join(c.text for c in chunks) == res.text
    assert [t for c in chunks for t in c.tokens] == res.tokens
    assert isinstance(rig.sent[-1][2], Completion)  # the result comes after every chunk


# -- chunked prefill -------------------------------------------------------------------------


def test_long_prompt_is_prefilled_in_chunks() -> None:
    rig = Rig(n_batch=8)
    batches: list[list[tuple[int, list[int]]]] = []
    real = rig.be.evaluate

    def spy(batch: Sequence[tuple[int, Sequence[int]]]) -> None:
        batches.append([(s, list(t)) for s, t in batch])
        real(batch)

    rig.be.evaluate = spy  # type: ignore[method-assign]
    short = rig.submit(1, "hi", max_tokens=40)
    for _ in range(3):
        rig.sched.tick()
    assert short.prompt_done
    long_prompt = rig.be.tokenize("a prompt much longer than one batch of eight tokens")
    assert len(long_prompt) > 3 * 8
    rig.submit(2, long_prompt, max_tokens=5)
    n_before = len(batches)
    rig.run()
    assert all(sum(len(t) for _, t in b) <= 8 for b in batches)
    assert short.seq is not None
    long_seq = next(s for s in range(2) if s != short.seq)
    fed = [t for b in batches[n_before:] for s, t in b if s == long_seq]
    assert sum(fed[:len(fed) - 4], []) == long_prompt  # prompt chunks, then 4 decode tokens
    assert max(len(t) for t in fed) == 7  # the running sequence's token takes one of the 8
    # the short request decoded one token every tick of the long prefill
    prefill_ticks = batches[n_before:n_before + len(long_prompt) // 7]
    assert all(any(s == short.seq and len(t) == 1 for s, t in b) for b in prefill_ticks)
    # and chunking changed nothing in the output
    res = rig.results()
    assert res[2].tokens == Rig().complete(2, long_prompt, max_tokens=5).tokens
    assert res[1].tokens == Rig().complete(1, "hi", max_tokens=40).tokens


# -- caller-owned sequences --------------------------------------------------------------------


def test_explicit_seq_keeps_its_kv() -> None:
    rig = Rig(n_seq_max=2)
    prompt = rig.be.tokenize(PROMPT)
    first = rig.complete(1, prompt, seq=0, max_tokens=5)
    assert first.seq == 0 and first.finish_reason == "length"
    # the caller's sequence keeps the prompt and every returned token
    assert rig.be.seq_tokens(0) == prompt + first.tokens
    # a request without a seq never takes it over while it holds state
    rig.complete(2, max_tokens=5)
    assert rig.be.seq_tokens(0) == prompt + first.tokens
    # continuing on the sequence appends to its KV
    more = rig.be.tokenize(" and more", add_special=False)
    second = rig.complete(3, more, seq=0, max_tokens=4)
    assert rig.be.seq_tokens(0) == prompt + first.tokens + more + second.tokens
    assert second.stats.prompt_tokens == len(more)
    # in use by a running request: refused at once
    rig.submit(4, "x", seq=0, max_tokens=50)
    with pytest.raises(BadRequest):
        rig.submit(5, "y", seq=0)
    rig.run()


def test_explicit_seq_skips_the_queue() -> None:
    rig = Rig(n_seq_max=2)
    rig.complete(1, seq=0, max_tokens=3)  # seq 0 now holds the caller's state
    rig.submit(2, max_tokens=20)
    rig.submit(3, max_tokens=2)
    rig.sched.tick()
    assert rig.sched.owner(1) == 2 and [g.req_id for g in rig.sched.queue] == [3]
    rig.submit(4, "more", seq=0, max_tokens=2)  # starts at once, ahead of the queue
    assert rig.sched.owner(0) == 4 and [g.req_id for g in rig.sched.queue] == [3]
    rig.run()
    assert sorted(rig.results()) == [1, 2, 3, 4]


def test_queue_fails_when_every_slot_holds_caller_state() -> None:
    rig = Rig(n_seq_max=1)
    rig.complete(1, seq=0, max_tokens=3)
    rig.submit(2)
    rig.sched.tick()  # nothing running will ever free a slot: waiting would be forever
    err = rig.errors()[2]
    assert isinstance(err, Overloaded) and err.data["n_seq_max"] == 1
    assert not rig.sched.busy


# -- prefix cache and sessions -------------------------------------------------------------------


def test_prefix_cache_restores_a_shared_prefix(caches: Any) -> None:
    cache = caches()
    rig = Rig(cache=cache)
    base = rig.be.tokenize(PROMPT)
    longer = rig.be.tokenize(PROMPT + " over the lazy dog")
    cold = rig.complete(1, base, max_tokens=5)
    assert cold.stats.cached_tokens == 0 and cold.cache is None
    assert cache.stats()["ram_entries"] == 1  # published when it finished

    warm = rig.complete(2, longer, max_tokens=6)
    assert len(base) <= warm.stats.cached_tokens < len(longer)
    assert warm.cache == "ram"
    # a restored prefix gives the output of a full prefill
    assert warm.tokens == Rig().complete(2, longer, max_tokens=6).tokens

    # the disk tier survives the cache (a worker restart)
    cache.close()
    rig2 = Rig(cache=caches())
    again = rig2.complete(3, longer, max_tokens=6)
    assert again.cache == "disk" and again.stats.cached_tokens >= len(base)
    assert again.tokens == warm.tokens


def test_prefix_cache_ignores_caller_sequences(caches: Any) -> None:
    cache = caches()
    rig = Rig(cache=cache)
    rig.complete(1, seq=0, max_tokens=5)
    assert cache.stats()["ram_entries"] == 0  # a caller's sequence is not published
    res = rig.complete(2, max_tokens=5)
    assert res.stats.cached_tokens == 0


def test_session_is_saved_and_resumed(caches: Any) -> None:
    cache = caches()
    rig = Rig(cache=cache)
    prompt = rig.be.tokenize(PROMPT)
    turn1 = rig.complete(1, prompt, session="chat", max_tokens=5)
    assert turn1.session == "chat" and turn1.session_saved is True
    assert turn1.session_error is None
    entry = cache.session_entry(rig.be.cache_namespace(), "chat")
    assert entry is not None and entry.tokens == tuple(prompt + turn1.tokens)
    assert cache.stats()["disk_entries"] >= 1  # durable: on disk when the result went out

    # the next turn restores the whole conversation so far
    turn2_prompt = prompt + turn1.tokens + rig.be.tokenize(" next", add_special=False)
    turn2 = rig.complete(2, turn2_prompt, session="chat", max_tokens=5)
    assert turn2.session_saved is True
    assert turn2.stats.cached_tokens == len(prompt + turn1.tokens)
    assert turn2.tokens == Rig().complete(2, turn2_prompt, max_tokens=5).tokens


def test_session_without_a_cache_is_not_saved() -> None:
    res = Rig().complete(1, session="chat", max_tokens=3)
    assert res.session_saved is False and "prefix_cache" in (res.session_error or "")


class SessionOnly:
    """A KVCache whose lookup always misses: only the session's entry can hit."""

    min_tokens = 4

    def __init__(self, hit: CacheHit) -> None:
        self.hit = hit
        self.inserts: list[tuple[str, list[int], str | None, bool]] = []

    def lookup(self, namespace: str, tokens: Sequence[int]) -> CacheHit | None:
        return None

    def session_entry(self, namespace: str, session: str) -> CacheHit | None:
        return self.hit if session == "chat" else None

    def insert(self, namespace: str, tokens: Sequence[int], blob: bytes, *,
               session: str | None = None, durable: bool = False) -> None:
        self.inserts.append((namespace, list(tokens), session, durable))

    def stats(self) -> dict[str, int]:
        return {}


def test_session_entry_is_measured_against_the_prompt() -> None:
    donor = Rig()
    prompt = donor.be.tokenize(PROMPT)
    state = prompt[:10] + donor.be.tokenize("zzzz", add_special=False)  # diverges after 10
    donor.be.evaluate([(0, state)])
    blob = donor.be.kv_pack(0)
    cache = SessionOnly(CacheHit(tokens=tuple(state), common=len(state), blob=blob, tier="disk"))
    rig = Rig(cache=cache)
    res = rig.complete(1, prompt, session="chat", max_tokens=4)
    assert res.stats.cached_tokens == 10 and res.cache == "disk"
    assert res.tokens == Rig().complete(1, prompt, max_tokens=4).tokens
    ns, tokens, session, durable = cache.inserts[-1]
    assert (ns, session, durable) == (rig.be.cache_namespace(), "chat", True)
    assert tokens == prompt + res.tokens and res.session_saved is True
    # another session: no hit, full prefill
    assert rig.complete(2, prompt, session="other", max_tokens=4).stats.cached_tokens == 0


class BlockingCache:
    """A KVCache whose ``insert`` (on the publisher thread) waits for ``release``."""

    min_tokens = 4

    def __init__(self) -> None:
        import threading
        self.release = threading.Event()
        self.entered = threading.Event()
        self.inserted: list[tuple[list[int], bytes, str | None]] = []

    def lookup(self, namespace: str, tokens: Sequence[int]) -> CacheHit | None:
        return None

    def session_entry(self, namespace: str, session: str) -> CacheHit | None:
        return None

    def insert(self, namespace: str, tokens: Sequence[int], blob: bytes, *,
               session: str | None = None, durable: bool = False) -> None:
        self.entered.set()
        assert self.release.wait(10)
        self.inserted.append((list(tokens), blob, session))

    def stats(self) -> dict[str, int]:
        return {}


def test_publish_runs_off_the_loop_and_the_reply_waits_for_it() -> None:
    cache = BlockingCache()
    rig = Rig(cache=cache)
    long = rig.submit(1, max_tokens=200)
    short = rig.submit(2, max_tokens=3, session="chat")
    queued = rig.submit(3, max_tokens=2)  # waits for a slot: the one `short` frees
    while not cache.entered.is_set():
        rig.sched.tick()
    short_seq = short.seq
    assert short.done and 2 not in rig.results()
    # the slot was freed once its KV had been read, and the queued request took it
    rig.sched.tick()
    assert queued.seq == short_seq
    # the loop goes on while the publish is stuck: the long stream keeps decoding
    before = len(long.tokens)
    for _ in range(20):
        rig.sched.tick()
    assert len(long.tokens) >= before + 20
    assert 2 not in rig.results() and rig.sched.busy and rig.sched.inflight() >= 2
    cache.release.set()
    rig.run()
    res = rig.results()
    assert res[2].session_saved is True and res[2].tokens == short.tokens
    # sent only after the insert returned, with the KV the sequence held
    (tokens, blob, session), *_ = cache.inserted
    assert session == "chat" and tokens == short.prompt_tokens + short.tokens
    other = Rig()
    assert other.be.kv_unpack(0, blob) == len(tokens) and other.be.seq_tokens(0) == tokens
    assert set(res) == {1, 2, 3}


def test_a_failed_publish_still_replies() -> None:
    class Broken(BlockingCache):
        def insert(self, namespace: str, tokens: Sequence[int], blob: bytes, *,
                   session: str | None = None, durable: bool = False) -> None:
            raise OSError(28, "No space left on device")

    rig = Rig(cache=Broken())
    res = rig.complete(1, max_tokens=3, session="chat")
    assert res.session_saved is False and "No space" in (res.session_error or "")
    rig.sched.close()
