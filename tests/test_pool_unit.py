"""Which replica a request goes to (client/pool.py), without sockets."""

from __future__ import annotations

from collections import Counter
from typing import Any

from llamafleet.client.pool import ModelPool, least_loaded, rendezvous


class FakeConn:
    def __init__(self, replica: int, generation: int, calls: int = 0) -> None:
        self.replica = replica
        self.generation = generation
        self.calls: dict[int, Any] = dict.fromkeys(range(calls))
        self.dead = None
        self.retired = False


def test_least_loaded_breaks_ties_in_turn() -> None:
    assert least_loaded([3, 1, 2], turn=0) == 1
    assert [least_loaded([0, 0, 0], turn=t) for t in range(4)] == [0, 1, 2, 0]
    assert least_loaded([1, 0, 0], turn=0) == 1 and least_loaded([1, 0, 0], turn=2) == 2


def test_rendezvous_is_stable_and_moves_only_the_keys_of_a_lost_choice() -> None:
    keys = [f"session-{i}" for i in range(400)]
    before = {k: rendezvous(k, [0, 1, 2, 3]) for k in keys}
    assert before == {k: rendezvous(k, [3, 2, 1, 0]) for k in keys}  # order does not matter
    spread = Counter(before.values())
    assert set(spread) == {0, 1, 2, 3} and min(spread.values()) > 60
    after = {k: rendezvous(k, [0, 1, 3]) for k in keys}  # replica 2 died
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == 2 for k in moved)


def test_pick_routes_by_load_session_and_sequence() -> None:
    pool = ModelPool("m")
    pool.replicas = 2
    a, b = FakeConn(0, 10, calls=2), FakeConn(1, 11, calls=0)
    live: list[Any] = [a, b]
    assert pool.pick(live) is b  # fewest in flight
    assert pool.pick(live, session="s") is pool.pick(live, session="s")
    assert pool.pick(live, seq=4) is a and pool.pick(live, seq=5) is b
    assert pool.pick([a], seq=5) is None  # its replica is not there: the caller waits
    assert pool.pick([a], session="s") is a


def test_retired_and_dead_connections_are_not_picked_and_excluded() -> None:
    pool = ModelPool("m")
    a, b = FakeConn(0, 10), FakeConn(1, 11)
    pool.conns = {10: a, 11: b}  # type: ignore[dict-item]
    b.dead = "gone"  # type: ignore[assignment]
    assert pool.live() == [a] and list(pool.dead) == [11] and 11 not in pool.conns
    a.calls[1] = None
    pool.retire(a)  # type: ignore[arg-type]
    assert pool.live() == [] and 10 in pool.conns  # kept until its call ends
    assert list(pool.dead) == [11, 10]


def test_a_pool_in_use_is_due_for_a_background_lookup_every_rescan_period() -> None:
    import asyncio

    from llamafleet.client.pool import REFRESH_S, RESCAN_S
    pool = ModelPool("m")
    pool.conns = {10: FakeConn(0, 10)}  # type: ignore[dict-item]
    pool.refreshed = 100.0
    assert not pool.needs_lookup(100.0)  # a live worker: no request waits
    assert not pool.stale(100.0 + RESCAN_S - 0.01)
    assert pool.stale(100.0 + RESCAN_S)
    pool.replicas = 2  # one of two live: looked for sooner, still in the background
    assert pool.stale(100.0 + REFRESH_S) and not pool.needs_lookup(100.0 + REFRESH_S)
    loop = asyncio.new_event_loop()
    try:
        pool.rescan = loop.create_future()  # one running: no second one
        assert not pool.stale(100.0 + 2 * RESCAN_S)
        pool.rescan.set_result(None)
        assert pool.stale(100.0 + 2 * RESCAN_S)
    finally:
        loop.close()


def test_a_lookup_that_renumbers_replicas_renumbers_the_connections() -> None:
    """A cluster renumbers replicas when a lost node's move elsewhere: a connection
    kept by its generation takes the number the lookup gives it."""
    from llamafleet.runtime import protocol
    pool = ModelPool("m")
    b, c = FakeConn(1, 20), FakeConn(2, 30)
    pool.conns = {20: b, 30: c}  # type: ignore[dict-item]
    found = protocol.ModelEndpoints(model="m", replicas=3, endpoints=[
        protocol.WorkerEndpoint(model="m", endpoint="tcp://b:1", generation=20, replica=0),
        protocol.WorkerEndpoint(model="m", endpoint="tcp://c:1", generation=30, replica=1),
        protocol.WorkerEndpoint(model="m", endpoint="tcp://d:1", generation=40, replica=2)])
    pool.update(found, 0.0, lambda e: FakeConn(e.replica, e.generation))  # type: ignore[arg-type,return-value]
    assert {g: conn.replica for g, conn in pool.conns.items()} == {20: 0, 30: 1, 40: 2}
    assert pool.pick(pool.live(), seq=0) is b
