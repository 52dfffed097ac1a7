"""The naming service, without sockets or processes: endpoints and waiting lookups."""

from __future__ import annotations

import pytest

from llamafleet.runtime.errors import NotFound, ShuttingDown, Unavailable, WorkerFailed
from llamafleet.runtime.protocol import WorkerEndpoint
from llamafleet.runtime.registry import Registry, Waiter


def ep(model: str = "a", generation: int = 1, endpoint: str = "ipc:///tmp/w-a.sock",
       pid: int | None = 10) -> WorkerEndpoint:
    return WorkerEndpoint(model=model, endpoint=endpoint, generation=generation, pid=pid,
                          backend="fake")


@pytest.fixture
def reg() -> Registry:
    states = {"a": "starting", "b": "restarting"}
    return Registry(["a", "b"], describe=lambda m: {"model": m, "state": states[m]})


def test_unknown_model_is_not_found(reg: Registry) -> None:
    with pytest.raises(NotFound, match=r"'zzz' \(known: a, b\)"):
        reg.lookup("zzz", "t", now=0.0)
    assert reg.models == ["a", "b"]


def test_not_ready_without_wait_is_unavailable_with_the_state(reg: Registry) -> None:
    with pytest.raises(Unavailable, match="model b is restarting") as info:
        reg.lookup("b", "t", now=0.0)
    assert info.value.retryable and info.value.data == {"model": "b", "state": "restarting"}


def test_register_then_lookup(reg: Registry) -> None:
    assert reg.register(ep()) == []
    assert reg.lookup("a", "t", now=0.0) == ep()
    assert reg.endpoints("a") == [ep()] and reg.endpoints("b") == []


def test_after_generation_answers_only_with_a_newer_one(reg: Registry) -> None:
    reg.register(ep(generation=3))
    assert reg.lookup("a", "t", now=0.0, after_generation=2).generation == 3
    with pytest.raises(Unavailable):
        reg.lookup("a", "t", now=0.0, after_generation=3)
    assert reg.lookup("a", "w", now=0.0, wait_ms=1000, after_generation=3) is None
    assert [w.token for w in reg.waiters("a")] == ["w"]
    # the next generation answers that waiter
    answered = reg.register(ep(generation=4))
    assert answered == [(Waiter("w", "a", 1.0, 3), ep(generation=4))]
    assert reg.endpoints("a") == [ep(generation=4)]  # same address: replaced


def test_waiters_get_the_endpoint_when_ready(reg: Registry) -> None:
    assert reg.lookup("a", "t1", now=0.0, wait_ms=500) is None
    assert reg.lookup("a", "t2", now=0.1, wait_ms=500, after_generation=1) is None
    assert reg.lookup("b", "t3", now=0.2, wait_ms=500) is None
    assert reg.next_deadline() == pytest.approx(0.5)
    answered = reg.register(ep(generation=1))
    assert [(w.token, a) for w, a in answered] == [("t1", ep(generation=1))]
    assert [w.token for w in reg.waiters()] == ["t2", "t3"]  # too old a generation, other model


def test_waiters_time_out_with_unavailable(reg: Registry) -> None:
    reg.lookup("a", "t1", now=0.0, wait_ms=100)
    reg.lookup("a", "t2", now=0.0, wait_ms=300)
    assert reg.expire(0.05) == []
    expired = reg.expire(0.1)
    assert [w.token for w, _ in expired] == ["t1"]
    err = expired[0][1]
    assert isinstance(err, Unavailable) and err.message == "model a is starting"
    assert reg.next_deadline() == pytest.approx(0.3)
    assert [w.token for w, _ in reg.expire(1.0)] == ["t2"]
    assert reg.next_deadline() is None


def test_failure_answers_waiters_and_later_lookups(reg: Registry) -> None:
    reg.lookup("a", "t1", now=0.0, wait_ms=1000)
    reg.lookup("b", "t2", now=0.0, wait_ms=1000)
    err = WorkerFailed("model a failed: killed by SIGSEGV", data={"state": "failed"})
    answered = reg.fail("a", err)
    assert [(w.token, a) for w, a in answered] == [("t1", err)]
    with pytest.raises(WorkerFailed, match="SIGSEGV") as info:
        reg.lookup("a", "t3", now=0.0, wait_ms=1000)
    assert info.value.data == {"state": "failed"} and not info.value.retryable
    assert [w.token for w in reg.waiters()] == ["t2"]


def test_unregister_withdraws_the_endpoint(reg: Registry) -> None:
    reg.register(ep(generation=1))
    reg.unregister("a", generation=2)  # another generation: untouched
    assert reg.endpoints("a") == [ep(generation=1)]
    reg.unregister("a", generation=1)
    assert reg.endpoints("a") == []
    with pytest.raises(Unavailable):
        reg.lookup("a", "t", now=0.0)


def test_a_model_holds_a_list_of_endpoints(reg: Registry) -> None:
    one, two = ep(endpoint="tcp://h1:5000"), ep(generation=2, endpoint="tcp://h2:5000")
    reg.register(one)
    reg.register(two)
    assert reg.endpoints("a") == [one, two]
    assert reg.lookup("a", "t", now=0.0, after_generation=1) == two
    reg.unregister("a")
    assert reg.endpoints("a") == []


def test_shutdown_answers_every_waiter_and_refuses_lookups(reg: Registry) -> None:
    reg.register(ep())
    reg.lookup("a", "t1", now=0.0, wait_ms=1000, after_generation=1)
    reg.lookup("b", "t2", now=0.0, wait_ms=1000)
    answered = reg.shutdown()
    assert [w.token for w, _ in answered] == ["t1", "t2"]
    assert all(isinstance(a, ShuttingDown) for _, a in answered)
    assert reg.waiters() == []
    with pytest.raises(ShuttingDown):
        reg.lookup("a", "t3", now=0.0)
    with pytest.raises(ShuttingDown):  # before the name is even checked
        reg.lookup("zzz", "t4", now=0.0)


def test_default_describe(reg: Registry) -> None:
    plain = Registry(["m"])
    with pytest.raises(Unavailable) as info:
        plain.lookup("m", None, now=0.0)
    assert info.value.data["model"] == "m"
