"""The sync client's model commands run on the calling thread (client/sync.py ThreadIO):
each thread sends on a socket of its own and blocks on it. Real fleets (fake backend)."""

from __future__ import annotations

import threading
import time
from collections.abc import Generator

import pytest

from llamafleet.client import Client
from llamafleet.runtime.errors import (
    BadRequest,
    Cancelled,
    NotFound,
    RequestTimeout,
    WorkerCrashed,
)
from tests.conftest import catch, kill, wait_for, worker_pid

SLOW = {"backend": "fake", "n_seq_max": 4, "token_delay": 0.2}


def test_each_thread_talks_to_the_worker_on_its_own_socket(fleet) -> None:
    sup = fleet({"m": {"backend": "fake", "n_seq_max": 4}})
    with Client(sup.address, timeout=30) as c:
        expected = {i: c.tokenize("m", f"thread {i} says hello") for i in range(8)}
        errors: list[BaseException] = []
        seen: dict[int, set[int]] = {}

        def work(i: int) -> None:
            try:
                for r in range(40):
                    assert c.tokenize("m", f"thread {i} says hello") == expected[i]
                    if r % 10 == 0:
                        out = c.generate("m", f"thread {i}", max_tokens=4, temperature=0)
                        assert len(out.tokens) == 4
                    seen.setdefault(i, set()).add(c.ping("m").pid)
            except BaseException as exc:  # noqa: BLE001 - asserted below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert all(pids == {worker_pid(sup, "m")} for pids in seen.values())
        # the main thread and the eight workers each own a socket to the worker
        states = c._thread_io._states
        assert len(states) == 9
        assert all(len(st.socks) == 1 for st in states)
        assert not any(conn.calls for conn in c._async._connections())  # nothing left behind


def test_timeout_cancels_on_the_worker_and_the_thread_goes_on(fleet) -> None:
    sup = fleet({"m": SLOW})
    with Client(sup.address, timeout=30) as c:
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout):
            c.generate("m", "hello", max_tokens=50, ignore_eos=True, timeout=0.5)
        assert time.monotonic() - t0 < 2.0
        # the cancel reached the worker: nothing runs there any more
        wait_for(lambda: c.status()[0]["inflight"] == 0, timeout=5)
        # the same thread's socket still works (a late reply of the old call is dropped)
        assert c.ping("m").pong
        assert len(c.generate("m", "x", max_tokens=2, temperature=0).tokens) == 2


def test_typed_errors_from_the_worker_and_the_supervisor(fleet) -> None:
    sup = fleet({"m": {"backend": "fake", "n_seq_max": 4}})
    with Client(sup.address, timeout=30) as c:
        with pytest.raises(BadRequest, match="out of range"):
            c.seq_clear("m", 99)
        with pytest.raises(BadRequest, match="does not fit the context"):
            c.generate("m", "x" * 5000)
        with pytest.raises(NotFound, match="no model named"):
            c.ping("nope")
        assert c.ping("m").pong  # the connection survives its errors


def test_a_crash_wakes_a_waiting_thread_and_resume_sends_again(fleet) -> None:
    sup = fleet({"m": SLOW})
    with Client(sup.address, timeout=30, resume=False) as c:
        c.ping("m")
        pid = worker_pid(sup, "m")
        errors: list[BaseException | None] = []
        t = threading.Thread(target=lambda: errors.append(catch(
            lambda: c.generate("m", "hello", max_tokens=50, ignore_eos=True))))
        t.start()
        wait_for(lambda: c.status()[0]["inflight"] == 1, timeout=10, interval=0.01)
        t0 = time.monotonic()
        kill(pid)
        t.join(10)
        assert isinstance(errors[0], WorkerCrashed) and time.monotonic() - t0 < 1.5
    with Client(sup.address, timeout=30) as c:  # resume on: the generation is sent again
        c.ping("m")
        pid = wait_for(lambda: worker_pid(sup, "m") != pid and worker_pid(sup, "m"))
        out: list[object] = []
        t = threading.Thread(target=lambda: out.append(
            c.generate("m", "hello", max_tokens=6, ignore_eos=True, temperature=0)))
        t.start()
        wait_for(lambda: c.status()[0]["inflight"] == 1, timeout=10, interval=0.01)
        kill(pid)
        t.join(30)
        assert out and out[0].stats.resumed >= 1 and len(out[0].tokens) == 6


def test_close_ends_a_call_waiting_on_another_thread(fleet) -> None:
    sup = fleet({"m": SLOW})
    c = Client(sup.address, timeout=30)
    c.ping("m")
    errors: list[BaseException | None] = []
    t = threading.Thread(target=lambda: errors.append(catch(
        lambda: c.generate("m", "hello", max_tokens=50, ignore_eos=True))))
    t.start()
    wait_for(lambda: sup.status()[0]["inflight"] == 1, timeout=10, interval=0.01)
    c.close()
    t.join(10)
    assert isinstance(errors[0], Cancelled)
    with pytest.raises(Cancelled):
        c.ping("m")


class _Suspend:
    def __await__(self) -> Generator[None, None, None]:
        yield None  # what awaiting an unfinished future does


def test_a_coroutine_that_would_wait_on_the_loop_is_refused(fleet) -> None:
    sup = fleet({"m": {"backend": "fake"}})

    async def waits() -> None:
        await _Suspend()

    with Client(sup.address) as c:
        with pytest.raises(RuntimeError, match="waited on the event loop"):
            c._inline(waits())
        assert c.ping("m").pong
