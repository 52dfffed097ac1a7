"""Placement of replicas on cluster nodes (llamafleet/ray/placement.py), pure."""

from __future__ import annotations

from llamafleet.ray.placement import Demand, Node, place

A = Node("a", {"CPU": 4, "memory_mb": 8000, "big": 1})
B = Node("b", {"CPU": 2, "memory_mb": 8000})


def D(model: str, replicas: int = 1, **take: float) -> Demand:
    return Demand(model, replicas, {"CPU": 1, **take})


def test_declared_resources_decide_and_replicas_spread() -> None:
    p = place([D("big", big=1), D("r", 2), D("s")], [A, B])
    assert p.nodes["big"] == {"a": 1}  # only a has the custom resource
    assert p.nodes["r"] == {"a": 1, "b": 1}  # spread over both nodes
    assert p.total("s") == 1 and not p.missing
    assert p.on("a")["big"] == 1
    assert [p.replica_base("r", n) for n in ("a", "b")] == [0, 1]


def test_what_fits_nowhere_is_missing_not_forced() -> None:
    p = place([D("huge", memory_mb=9000), D("r", 3, CPU=2)], [A, B])
    assert p.missing == {"huge": 1}
    assert p.total("r") == 3 and p.nodes["r"] == {"a": 2, "b": 1}  # 4 + 2 CPUs
    assert "huge" not in p.nodes


def test_a_lost_node_moves_only_its_replicas() -> None:
    first = place([D("big", big=1), D("r", 2), D("s")], [A, B])
    assert first.nodes["r"] == {"a": 1, "b": 1}
    again = place([D("big", big=1), D("r", 2), D("s")], [A], previous=first.nodes)
    assert again.nodes == {"big": {"a": 1}, "r": {"a": 2}, "s": {"a": 1}}
    assert not again.missing
    # with both nodes back nothing moves that was already placed
    third = place([D("big", big=1), D("r", 2), D("s")], [A, B], previous=again.nodes)
    assert third.nodes == again.nodes


def test_a_model_without_declarations_takes_one_cpu() -> None:
    from llamafleet.runtime.config import Config
    cfg = Config.from_dict({"supervisor": {"runtime_dir": "/tmp/lf-unit"},
                            "models": {"m": {"backend": "fake", "replicas": 2},
                                       "g": {"backend": "fake", "num_cpus": 0.5,
                                             "resources": {"gpu_slot": 1}}}})
    assert Demand.of(cfg.models["m"]).take == {"CPU": 1.0}
    assert Demand.of(cfg.models["g"]) == Demand("g", 1, {"CPU": 0.5, "gpu_slot": 1.0})


def test_ray_refuses_models_it_would_not_keep_loaded() -> None:
    pytest = __import__("pytest")
    pytest.importorskip("ray")
    from llamafleet.ray.actors import check
    from llamafleet.runtime.errors import ConfigError
    base = {"supervisor": {"runtime_dir": "/tmp/lf-unit", "insecure_tcp": True}}
    assert check({**base, "models": {"m": {"backend": "fake"}}}).models["m"].keep_alive == -1
    for table in ({"load": "on_demand"}, {"keep_alive": 60}):
        with pytest.raises(ConfigError, match="keeps every model loaded"):
            check({**base, "models": {"m": {"backend": "fake", **table}}})
