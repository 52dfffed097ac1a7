"""A host that stops answering over tcp:// (no FIN, no RST: here a worker frozen
with SIGSTOP, whose kernel still acknowledges TCP) is seen by the client through
ZeroMQ heartbeats within the bound, and treated as a crashed worker."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

from llamafleet.client import Client, WorkerCrashed
from llamafleet.runtime.security import generate_keys
from llamafleet.runtime.tcp import HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS
from tests.conftest import kill, wait_for
from tests.figures import merge_figures

#: the supervisor's own liveness check must not be what notices the freeze
SLOW_SUPERVISOR = {"heartbeat_timeout": 60.0}
BOUND_S = (HEARTBEAT_IVL_MS + HEARTBEAT_TIMEOUT_MS) / 1000 + 0.5  # detection + slack
MODEL = {"backend": "fake", "token_delay": 0.01, "n_ctx": 8192, "replicas": 2}


@pytest.fixture
def tcp_fleet(fleet, tmp_path: Path):
    keys = generate_keys(tmp_path / "keys")
    sup = fleet({"m": MODEL}, transport="tcp", address="tcp://127.0.0.1:*",
                curve_server_key=keys["server_secret"],
                curve_authorized_clients=keys["authorized"], **SLOW_SUPERVISOR)
    return sup, {"curve_server_key": keys["server_public"],
                 "curve_client_cert": keys["client_secret"]}


def test_a_frozen_worker_is_seen_within_the_heartbeat_bound(tcp_fleet) -> None:
    sup, creds = tcp_fleet
    with Client(sup.address, timeout=60, resume=False, **creds) as c:
        got: list[BaseException] = []
        started = threading.Event()

        def call() -> None:
            try:
                with c.stream("m", "x", max_tokens=2000, ignore_eos=True) as s:
                    for _ in s:
                        started.set()
            except BaseException as exc:  # noqa: BLE001 - asserted below
                got.append(exc)

        t = threading.Thread(target=call)
        t.start()
        assert started.wait(10)
        wait_for(lambda: any(w["inflight"] for w in sup.status()), timeout=5)
        pid = next(w["pid"] for w in sup.status() if w["inflight"])  # the one streaming
        kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            t.join(30)
            seen = time.monotonic() - t0
        finally:
            kill(pid, signal.SIGCONT)
    assert len(got) == 1 and isinstance(got[0], WorkerCrashed), got
    assert seen < BOUND_S, seen
    merge_figures({"scale_out": {"frozen_worker_detected_s": round(seen, 2),
                                 "bound_s": BOUND_S}})


def test_a_stream_on_a_frozen_worker_resumes_on_the_other_replica(tcp_fleet) -> None:
    sup, creds = tcp_fleet
    with Client(sup.address, timeout=60, **creds) as c:
        solo = c.generate("m", "tell me", max_tokens=400, ignore_eos=True, temperature=0)
        seen: list[str] = []
        at: list[float] = []
        with c.stream("m", "tell me", max_tokens=400, ignore_eos=True, temperature=0) as s:
            for delta in s:
                seen.append(delta)
                at.append(time.monotonic())
                if len(seen) == 50:
                    busy = next(w for w in sup.status() if w["inflight"])
                    kill(busy["pid"], signal.SIGSTOP)
                    frozen, t0 = busy["pid"], time.monotonic()
        took = time.monotonic() - t0
        kill(frozen, signal.SIGCONT)
        assert s.result.tokens == solo.tokens and "".join(seen) == solo.text
        assert s.result.stats.resumed == 1
    # the detection is the stream's longest silence after the freeze
    gap = max(b - a for a, b in zip(at[49:], at[50:]))
    assert gap < BOUND_S + 1.0, (gap, took)


def test_a_client_given_several_addresses_uses_the_next_when_one_is_not_there(
        tcp_fleet, tmp_path: Path) -> None:
    sup, creds = tcp_fleet
    nobody = f"ipc://{tmp_path}/nobody.sock"  # nothing listens there
    with Client(f"{nobody}, {sup.address}", timeout=30, connect_timeout=4, **creds) as c:
        t0 = time.monotonic()
        assert {w["model"] for w in c.status()} == {"m"}
        assert time.monotonic() - t0 < 4  # its share of connect_timeout, then the next
        assert c.address == sup.address and c.addresses == [nobody, sup.address]
        assert len(c.generate("m", "x", max_tokens=2, ignore_eos=True).tokens) == 2


def test_calls_at_once_all_move_to_the_next_address_together(tcp_fleet,
                                                            tmp_path: Path) -> None:
    sup, creds = tcp_fleet
    nobody = f"ipc://{tmp_path}/nobody.sock"
    with Client(f"{nobody},{sup.address}", timeout=30, connect_timeout=4, **creds) as c:
        got: list[object] = []

        def ask() -> None:
            try:
                got.append(len(c.status()))
            except BaseException as exc:  # noqa: BLE001 - asserted below
                got.append(exc)

        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
    assert got == [2] * 6, got  # every call answered (two replicas), none refused
