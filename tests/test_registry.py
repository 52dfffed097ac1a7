"""The naming service, without sockets or processes: endpoints and waiting lookups."""

from __future__ import annotations

import pytest

from llamafleet.runtime.errors import NotFound, ShuttingDown, Unavailable, WorkerFailed
from llamafleet.runtime.protocol import ModelEndpoints, WorkerEndpoint
from llamafleet.runtime.registry import Registry, Waiter


def ep(model: str = "a", generation: int = 1, endpoint: str = "ipc:///tmp/w-a.sock",
       pid: int | None = 10, replica: int = 0) -> WorkerEndpoint:
    return WorkerEndpoint(model=model, endpoint=endpoint, generation=generation, pid=pid,
                          backend="fake", replica=replica)


def eps(*endpoints: WorkerEndpoint, replicas: int = 1) -> ModelEndpoints:
    return ModelEndpoints(model=endpoints[0].model, endpoints=list(endpoints),
                          replicas=replicas)


REPLICAS = {"a": 1, "b": 1}


@pytest.fixture
def reg() -> Registry:
    states = {"a": "starting", "b": "restarting"}
    REPLICAS.update(a=1, b=1)
    return Registry(["a", "b"], describe=lambda m: {"model": m, "state": states[m]},
                    replicas=REPLICAS.__getitem__)


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
    assert reg.lookup("a", "t", now=0.0) == eps(ep())
    assert reg.endpoints("a") == [ep()] and reg.endpoints("b") == []


def test_exclude_answers_only_with_another_generation(reg: Registry) -> None:
    reg.register(ep(generation=3))
    assert reg.lookup("a", "t", now=0.0, exclude=[2]) == eps(ep(generation=3))
    with pytest.raises(Unavailable):
        reg.lookup("a", "t", now=0.0, exclude=[3])
    assert reg.lookup("a", "w", now=0.0, wait_ms=1000, exclude=[3]) is None
    assert [w.token for w in reg.waiters("a")] == ["w"]
    # the restarted replica (a new generation) answers that waiter and replaces the old
    answered = reg.register(ep(generation=4))
    assert answered == [(Waiter("w", "a", 1.0, frozenset({3})), eps(ep(generation=4)))]
    assert reg.endpoints("a") == [ep(generation=4)]


def test_waiters_get_the_endpoints_when_ready(reg: Registry) -> None:
    assert reg.lookup("a", "t1", now=0.0, wait_ms=500) is None
    assert reg.lookup("a", "t2", now=0.1, wait_ms=500, exclude=[1]) is None
    assert reg.lookup("b", "t3", now=0.2, wait_ms=500) is None
    assert reg.next_deadline() == pytest.approx(0.5)
    answered = reg.register(ep(generation=1))
    assert [(w.token, a) for w, a in answered] == [("t1", eps(ep(generation=1)))]
    assert [w.token for w in reg.waiters()] == ["t2", "t3"]  # a dead generation, other model


def test_replicas_are_listed_in_order_and_replaced_one_by_one(reg: Registry) -> None:
    REPLICAS["a"] = 3
    r0 = ep(generation=5, endpoint="ipc:///tmp/w-a.0.sock", replica=0)
    r1 = ep(generation=2, endpoint="ipc:///tmp/w-a.1.sock", replica=1)
    r2 = ep(generation=3, endpoint="ipc:///tmp/w-a.2.sock", replica=2)
    reg.register(r2)
    reg.register(r0)
    reg.register(r1)
    assert reg.lookup("a", "t", now=0.0) == eps(r0, r1, r2, replicas=3)
    # a client that saw replica 1 die is still answered with the other two at once
    assert reg.lookup("a", "t", now=0.0, exclude=[2]) == eps(r0, r2, replicas=3)
    # replica 1 restarted: its new generation replaces it, nothing else moves
    new1 = ep(generation=9, endpoint="ipc:///tmp/w-a.1.sock", replica=1)
    reg.register(new1)
    assert reg.endpoints("a") == [r0, new1, r2]
    reg.unregister("a", generation=5)
    assert reg.endpoints("a") == [new1, r2]


def test_added_and_removed_models(reg: Registry) -> None:
    reg.add("c")
    assert "c" in reg.models
    assert reg.lookup("c", "w1", now=0.0, wait_ms=1000) is None
    answered = reg.remove("c")
    assert [w.token for w, _ in answered] == ["w1"]
    assert isinstance(answered[0][1], NotFound) and "removed" in answered[0][1].message
    with pytest.raises(NotFound):
        reg.lookup("c", "t", now=0.0)
    reg.check("a")  # the others are untouched


def test_refuse_ends_the_waits_of_one_model(reg: Registry) -> None:
    from llamafleet.runtime.errors import Overloaded
    reg.lookup("a", "w1", now=0.0, wait_ms=1000)
    reg.lookup("b", "w2", now=0.0, wait_ms=1000)
    answered = reg.refuse("a", Overloaded("no room"))
    assert [w.token for w, _ in answered] == ["w1"]
    assert [w.token for w in reg.waiters()] == ["w2"]
    assert not reg.failed("a")


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


def test_a_model_holds_one_endpoint_per_replica(reg: Registry) -> None:
    one, two = ep(endpoint="tcp://h1:5000"), ep(generation=2, endpoint="tcp://h2:5000")
    reg.register(one)
    reg.register(two)
    assert reg.endpoints("a") == [two]  # the same replica (0): the newer one replaces it
    assert reg.lookup("a", "t", now=0.0, exclude=[1]) == eps(two)
    reg.unregister("a")
    assert reg.endpoints("a") == []


def test_shutdown_answers_every_waiter_and_refuses_lookups(reg: Registry) -> None:
    reg.register(ep())
    reg.lookup("a", "t1", now=0.0, wait_ms=1000, exclude=[1])
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


def test_a_cluster_view_answers_for_every_node_with_cluster_replica_numbers() -> None:
    from llamafleet.runtime.registry import ClusterView
    r = Registry(["a"], replicas=lambda m: 1)
    r.register(ep("a", generation=1, endpoint="tcp://h1:1"))  # this node's replica 0
    remote_a = WorkerEndpoint(model="a", endpoint="tcp://h2:5", generation=7001, replica=0)
    # a waiter for a model only another node serves (known once the view has it)
    with pytest.raises(NotFound):
        r.lookup("b", "t0", now=0.0, wait_ms=1000)
    answered = r.set_cluster(ClusterView(
        remote={"a": [remote_a], "b": []}, replicas={"a": 2, "b": 1},
        replica_ids={("a", 0): 1}, workers=[{"model": "b", "node": "n2"}]))
    assert answered == []
    assert r.lookup("b", "t1", now=0.0, wait_ms=1000) is None  # waits for b
    found = r.lookup("a", "t2", now=0.0)
    assert found is not None and found.replicas == 2
    assert sorted((e.endpoint, e.replica) for e in found.endpoints) == \
        [("tcp://h1:1", 1), ("tcp://h2:5", 0)]
    # excluded generations are left out across nodes too
    found = r.lookup("a", "t3", now=0.0, exclude=[7001])
    assert found is not None and [e.endpoint for e in found.endpoints] == ["tcp://h1:1"]
    b = WorkerEndpoint(model="b", endpoint="tcp://h2:6", generation=7002)
    answered = r.set_cluster(ClusterView(remote={"a": [remote_a], "b": [b]},
                                         replicas={"a": 2, "b": 1}))
    assert [(w.token, getattr(a, "model", None)) for w, a in answered] == [("t1", "b")]
    assert r.models == ["a", "b"] and r.local("a") and not r.local("b")
    # b leaves the cluster: its waiters learn it is gone
    assert r.lookup("b", "t4", now=0.0, exclude=[7002], wait_ms=1000) is None
    answered = r.set_cluster(ClusterView(remote={"a": [remote_a]}, replicas={"a": 2}))
    assert len(answered) == 1 and isinstance(answered[0][1], NotFound)
