"""Faults injected into real processes: no hang, no orphan, nothing acknowledged lost."""

from __future__ import annotations

import signal
import stat
import threading
import time
from pathlib import Path

import pytest
import zmq

from llamafleet.client import Client
from llamafleet.runtime import protocol
from llamafleet.runtime.errors import RequestTimeout, ShuttingDown, WorkerCrashed
from tests.conftest import calls_in_flight, catch, kill, pid_alive, wait_for, worker_pid

SIGNALS = [signal.SIGKILL, signal.SIGSEGV]


def _ready(c, model: str, restarts: int) -> bool:
    w = next(w for w in c.status() if w["model"] == model)
    return w["state"] == "ready" and w["restarts"] == restarts


def _crash_during(sup, c, sig: int, start_call, in_phase) -> float:
    """Start a call, wait for the phase, signal the worker; return seconds to the error."""
    pid = worker_pid(sup, "m")
    errors: list[BaseException] = []
    t = threading.Thread(target=lambda: errors.append(catch(start_call)))
    t.start()
    wait_for(in_phase, timeout=10, interval=0.01)
    t0 = time.monotonic()
    kill(pid, sig)
    t.join(10)
    elapsed = time.monotonic() - t0
    assert len(errors) == 1 and isinstance(errors[0], WorkerCrashed), errors
    wait_for(lambda: not pid_alive(pid), timeout=5)
    return elapsed



@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_crash_during_prefill_decode_and_kv_pack(fleet, sig: int) -> None:
    sup = fleet({"m": {"backend": "fake", "n_batch": 4096, "n_ctx": 8192, "token_delay": 0.6,
                       "pack_delay": 0.6, "cache_min_tokens": 8}})
    with Client(sup.address, timeout=30, resume=False) as c:
        # an acknowledged session turn before any fault
        history = "user: remember the number forty two for me please\nassistant:"
        turn = c.generate("m", history, max_tokens=3, temperature=0, session="s1")
        assert turn.session if hasattr(turn, "session") else True
        base = c.info("m").cache["disk_entries"]
        assert base >= 1
        restarts = 0
        # prefill: one long evaluation of a big prompt
        took = _crash_during(sup, c, sig,
                             lambda: c.generate("m", "p" * 3000, max_tokens=2),
                             lambda: c.status()[0]["inflight"] == 1)
        assert took < 1.5
        restarts += 1
        wait_for(lambda: _ready(c, "m", restarts), timeout=20)
        # decode: a stream that already produced tokens
        stream = c.stream("m", "go", max_tokens=60_000, ignore_eos=True)
        next(stream)
        took = _crash_during(sup, c, sig, lambda: stream.collect(), lambda: True)
        assert took < 1.5
        restarts += 1
        wait_for(lambda: _ready(c, "m", restarts), timeout=20)
        # kv_pack: slow pack of an explicit sequence
        c.prefill("m", 1, c.tokenize("m", "abc"))
        took = _crash_during(sup, c, sig, lambda: c.kv_pack("m", 1),
                             lambda: calls_in_flight(c, "m") == 1)
        assert took < 2.5
        restarts += 1
        wait_for(lambda: _ready(c, "m", restarts), timeout=20)
        status = c.status()[0]
        assert status["last_exit"].startswith(f"killed by {sig.name}")
        # the acknowledged session is intact: resumed, same output as a cold run
        again = c.generate("m", history + turn.text + "\nuser: which number?\nassistant:",
                           max_tokens=3, temperature=0, session="s1")
        assert again.stats.cached_tokens >= len(c.tokenize("m", history)) + 2
        assert c.info("m").cache["corrupt_files"] == 0


def test_crash_during_model_load_is_restarted(fleet) -> None:
    sup = fleet({"m": {"backend": "fake", "load_delay": 1.5}})
    with Client(sup.address, timeout=30, connect_timeout=20) as c:
        kill(worker_pid(sup, "m"))
        wait_for(lambda: c.status()[0]["state"] == "restarting" and
                 c.status()[0]["pid"] is not None, timeout=10)
        wait_for(lambda: 0 < c.status()[0]["load_progress"] < 1, timeout=10, interval=0.01)
        pid = c.status()[0]["pid"]
        kill(pid, signal.SIGSEGV)
        assert c.ping("m").pong  # waits for the next generation
        assert c.status()[0]["restarts"] == 2 and not pid_alive(pid)


def test_client_that_disappears_mid_stream_frees_its_sequence(fleet) -> None:
    sup = fleet({"m": {"backend": "fake", "n_seq_max": 1, "token_delay": 0.01}})
    endpoint = sup.status()[0]["endpoint"]
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(endpoint)
    s.send(protocol.request(1, "generate", {"prompt": "x", "max_tokens": 60_000,
                                            "ignore_eos": True}))
    assert s.poll(5000)
    assert protocol.unpack(s.recv())["kind"] == "chunk"
    s.close(linger=0)
    ctx.term()
    with Client(sup.address, timeout=30) as c:
        wait_for(lambda: c.info("m").scheduler.running == 0, timeout=5)
        assert c.generate("m", "y", max_tokens=2, ignore_eos=True).tokens  # the only slot is free


def test_watchdog_restarts_a_wedged_worker_but_not_a_long_generation(fleet) -> None:
    sup = fleet({"wedged": {"backend": "fake", "wedge_after": 3},
                 "long": {"backend": "fake", "token_delay": 0.01}}, progress_timeout=1.0)
    with Client(sup.address, timeout=30, resume=False) as c:
        long = c.stream("long", "x", max_tokens=250, ignore_eos=True)  # ~3 s of decoding
        t0 = time.monotonic()
        with pytest.raises(WorkerCrashed):
            c.generate("wedged", "abc", max_tokens=20, ignore_eos=True)
        assert time.monotonic() - t0 < 5
        wait_for(lambda: "no progress" in (next(w for w in c.status()
                                                if w["model"] == "wedged")["last_exit"] or ""))
        result = long.collect()
        assert len(result.tokens) == 250
        assert next(w for w in c.status() if w["model"] == "long")["restarts"] == 0


def test_abort_callback_stops_a_long_evaluation_at_the_deadline(fleet) -> None:
    # Slow heartbeats: the watcher thread sleeps until the next one unless the
    # scheduler wakes it when it arms the abort time, so this also checks that wake-up.
    sup = fleet({"m": {"backend": "fake", "n_seq_max": 1, "n_batch": 8192, "n_ctx": 8192,
                       "token_delay": 4.0}}, heartbeat_interval=3.0, heartbeat_timeout=8.0)
    with Client(sup.address, timeout=30) as c:
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout):
            c.generate("m", "p" * 2000, max_tokens=1, timeout=0.5)
        # the worker gave up mid-evaluation: the slot is free long before 4 s
        wait_for(lambda: c.info("m", timeout=5).scheduler.running == 0, timeout=3)
        assert time.monotonic() - t0 < 2.0
        assert c.status()[0]["restarts"] == 0


def test_shutdown_aborts_work_that_cannot_finish_in_the_grace_period(fleet) -> None:
    sup = fleet({"m": {"backend": "fake", "n_batch": 8192, "n_ctx": 8192, "token_delay": 30}},
                shutdown_grace=1.5)
    errors: list[BaseException | None] = []
    with Client(sup.address, timeout=30) as c:
        c.ping("m")
        t = threading.Thread(target=lambda: errors.append(
            catch(lambda: c.generate("m", "p" * 1000, max_tokens=1))))
        t.start()
        wait_for(lambda: c.status()[0]["inflight"] == 1, timeout=5)
        t0 = time.monotonic()
        sup.stop()
        t.join(10)
        assert time.monotonic() - t0 < 3.0
    assert isinstance(errors[0], ShuttingDown)
    w = sup.status()[0]
    assert w["state"] == "stopped" and w["last_exit"] == "exit code 0"


def test_unwritable_cache_dir_keeps_serving_and_reports(fleet, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    sup = fleet({"m": {"backend": "fake", "cache_min_tokens": 4,
                       "cache_dir": str(blocker / "cache")}})
    with Client(sup.address, timeout=30) as c:
        r = c.generate("m", "a conversation that should be saved", max_tokens=4,
                       temperature=0, session="s")
        assert r.tokens
        info = c.info("m")
        assert info.cache["disk_errors"] >= 1
        raw = c.call("m", "generate", {"prompt": "again please, a longer prompt here",
                                       "max_tokens": 2, "session": "t", "stream": False})
        assert raw["session_saved"] is False and raw["session_error"]
        assert c.ping("m").pong and c.status()[0]["restarts"] == 0


def test_runtime_directory_and_sockets_are_private(fleet, short_dir: Path) -> None:
    sup = fleet({"m": {"backend": "fake"}})
    assert stat.S_IMODE(short_dir.stat().st_mode) == 0o700
    socks = list(short_dir.glob("*.sock"))
    assert {p.name for p in socks} >= {"supervisor.sock", "events.sock", "w-m.sock"}
    for p in socks:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert sup.status()[0]["state"] == "ready"
