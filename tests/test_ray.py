"""One fleet on a multi-node Ray cluster on this machine (ray.cluster_utils.Cluster:
a head without CPUs and two nodes; node a has room for everything, so what node b
ran can come back there), CURVE on every tcp:// socket, the client
without Ray. The last test removes a node, so the tests run in file order."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

import llamafleet.ray as lfray  # noqa: E402
from llamafleet.client import AuthenticationFailed, Client, Unavailable  # noqa: E402
from llamafleet.runtime.security import generate_keys  # noqa: E402
from llamafleet.runtime.tcp import HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS  # noqa: E402
from tests.conftest import pid_alive, wait_for  # noqa: E402
from tests.figures import merge_figures  # noqa: E402

GREEDY = {"temperature": 0, "ignore_eos": True}
BOUND_S = (HEARTBEAT_IVL_MS + HEARTBEAT_TIMEOUT_MS) / 1000 + 0.5


class Fleet:
    def __init__(self, cluster: Cluster, nodes: dict[str, Any], keys: dict[str, str],
                 addresses: list[str]) -> None:
        self.cluster, self.nodes, self.keys, self.addresses = cluster, nodes, keys, addresses

    def client(self, address: str | None = None, **kw: Any) -> Client:
        return Client(address or self.addresses[0], timeout=60,
                      curve_server_key=self.keys["server_public"],
                      curve_client_cert=self.keys["client_secret"], **kw)

    def node_of(self, name: str) -> str:
        return self.nodes[name].node_id[:12]

    def supervisor(self, name: str) -> Any:
        from llamafleet.ray.actors import NAMESPACE, supervisor_name
        return ray.get_actor(supervisor_name(self.nodes[name].node_id), namespace=NAMESPACE)


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    tmp = Path(tempfile.mkdtemp(prefix="lfr-", dir="/tmp"))
    keys = generate_keys(tmp / "keys")
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = {"a": cluster.add_node(num_cpus=5, resources={"big": 1}),
             "b": cluster.add_node(num_cpus=2)}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="llamafleet", log_to_driver=False,
             include_dashboard=False)
    # the fleet's file, as an operator writes it (relative paths: next to the file)
    conf = tmp / "fleet.toml"
    conf.write_text(f"""
[supervisor]
runtime_dir = "rt"
curve_server_key = "{keys['server_secret']}"
curve_authorized_clients = "{keys['authorized']}"
heartbeat_interval = 0.1
heartbeat_timeout = 60.0
restart_backoff_initial = 0.05

[models.big]
backend = "fake"
token_delay = 0.01
n_ctx = 8192
resources = {{ big = 1 }}

[models.r]
backend = "fake"
token_delay = 0.01
n_ctx = 8192
replicas = 2

[models.s]
backend = "fake"
token_delay = 0.01
n_ctx = 8192
num_cpus = 2
""")
    try:
        t0 = time.monotonic()
        up = subprocess.run([sys.executable, "-m", "llamafleet", "ray", "up", "--config",
                             str(conf), "--address", cluster.address],
                            capture_output=True, text=True, timeout=180)
        assert up.returncode == 0, up.stderr
        addresses = up.stdout.split()
        merge_figures({"scale_out": {"up_s": round(time.monotonic() - t0, 1)}})
        yield Fleet(cluster, nodes, keys, addresses)
    finally:
        try:
            lfray.down()
        finally:
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


def _ready(c: Client) -> list[dict[str, Any]]:
    return [w for w in c.status() if w["state"] == "ready"]


def test_models_are_placed_by_their_declarations_and_replicas_spread(fleet: Fleet) -> None:
    st = lfray.state()
    assert st is not None
    place = st["placement"]
    a, b = fleet.nodes["a"].node_id, fleet.nodes["b"].node_id
    assert place["big"] == {a: 1}  # the only node with the custom resource
    assert place["r"] == {a: 1, b: 1}  # spread
    assert sum(place["s"].values()) == 1 and not st["missing"]
    assert len(fleet.addresses) == 2 and all(x.startswith("tcp://") for x in fleet.addresses)
    with fleet.client() as c:
        wait_for(lambda: len(_ready(c)) == 4, timeout=30)
        where = {(w["model"], w["replica"]): w["node"] for w in c.status()}
    assert where[("big", 0)] == fleet.node_of("a")
    assert {where[("r", 0)], where[("r", 1)]} == {fleet.node_of("a"), fleet.node_of("b")}


def test_one_supervisors_address_reaches_every_model_of_every_node(fleet: Fleet) -> None:
    for address in fleet.addresses:
        with fleet.client(address) as c:
            wait_for(lambda: len(_ready(c)) == 4, timeout=30)
            for model in ("big", "r", "s"):
                r = c.generate(model, "hello", max_tokens=5, **GREEDY)
                assert len(r.tokens) == 5, model
            # both replicas of r, on their two nodes, answer through this one address
            assert {c.ping("r", replica=n).pid for n in (0, 1)} == \
                {w["pid"] for w in c.status() if w["model"] == "r"}


def test_a_client_without_the_curve_keys_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    stranger = generate_keys(tmp_path / "stranger")
    for creds in ({"curve_server_key": fleet.keys["server_public"],
                   "curve_client_cert": stranger["client_secret"]}, {}):
        with Client(fleet.addresses[0], timeout=5, connect_timeout=3, **creds) as c:
            with pytest.raises((AuthenticationFailed, Unavailable)) as info:
                c.status(timeout=3)
        if creds:
            assert isinstance(info.value, AuthenticationFailed)


def _pinned_session(c: Client, node: str) -> str:
    """A session name that routes r to the replica on ``node``."""
    from llamafleet.client.pool import rendezvous
    replica = next(w["replica"] for w in c.status() if w["model"] == "r" and w["node"] == node)
    return next(s for s in (f"s{i}" for i in range(100)) if rendezvous(s, [0, 1]) == replica)


def test_a_frozen_host_is_seen_within_the_bound_and_its_stream_moves(fleet: Fleet) -> None:
    with fleet.client() as c:
        wait_for(lambda: len(_ready(c)) == 4, timeout=30)
        session = _pinned_session(c, fleet.node_of("b"))
        solo = c.generate("r", "go on", max_tokens=300, session=session + "-solo", **GREEDY)
        pids = ray.get(fleet.supervisor("b").pids.remote())
        frozen = [pids["supervisor"], *pids["workers"]]
        seen: list[str] = []
        at: list[float] = []
        t_freeze = 0.0
        with c.stream("r", "go on", max_tokens=300, session=session, **GREEDY) as s:
            for delta in s:
                seen.append(delta)
                at.append(time.monotonic())
                if len(seen) == 20:
                    for pid in frozen:
                        os.kill(pid, signal.SIGSTOP)
                    t_freeze = time.monotonic()
        took = time.monotonic() - t_freeze
        try:
            assert s.result.tokens == solo.tokens and "".join(seen) == solo.text
            assert s.result.stats.resumed >= 1
            # the detection is the stream's longest silence after the freeze (the
            # resumed replica's own decode time is not counted against it)
            detect = max(b - a for a, b in zip(at[19:], at[20:]))
            assert detect < BOUND_S + 1.5, (detect, took)
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
    merge_figures({"scale_out": {"frozen_host_stream_s": round(took, 2),
                                 "frozen_host_detect_s": round(max(detect, 0.0), 2),
                                 "failed": 0}})


def test_status_shows_every_worker_of_the_cluster_with_its_node(fleet: Fleet) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "llamafleet", "status", "--address", fleet.addresses[0],
         "--curve-server-key", fleet.keys["server_public"],
         "--curve-client-cert", fleet.keys["client_secret"]],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = out.stdout.splitlines()
    assert rows[0].split()[:3] == ["MODEL", "NODE", "STATE"]
    nodes = {line.split()[0]: line.split()[1] for line in rows[1:]}
    assert set(nodes) == {"big", "r", "r#1", "s"}
    assert set(nodes.values()) == {fleet.node_of("a"), fleet.node_of("b")}
    st = subprocess.run([sys.executable, "-m", "llamafleet", "ray", "status", "--address",
                         fleet.cluster.address], capture_output=True, text=True, timeout=60)
    assert st.returncode == 0, st.stderr
    assert sorted(json.loads(st.stdout)["addresses"].values()) == sorted(fleet.addresses)


def test_a_client_with_every_address_goes_on_when_one_supervisor_freezes(
        fleet: Fleet) -> None:
    from llamafleet.ray.actors import get
    b_sup = get(fleet.supervisor("b").pids.remote())["supervisor"]
    address_b = get(fleet.supervisor("b").address.remote())
    others = [x for x in fleet.addresses if x != address_b]
    with fleet.client(",".join([address_b, *others])) as c:
        assert len(_ready(c)) == 4  # through b's supervisor
        os.kill(b_sup, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            assert len(_ready(c)) == 4  # b's heartbeats stop: the next address answers
            took = time.monotonic() - t0
            assert c.address != address_b
        finally:
            os.kill(b_sup, signal.SIGCONT)
    assert took < BOUND_S + 1.0, took
    merge_figures({"scale_out": {"supervisor_failover_s": round(took, 2)}})

def test_a_killed_supervisor_is_restarted_by_ray_and_its_workers_die_with_it(
        fleet: Fleet) -> None:
    from llamafleet.ray.actors import get
    before = get(fleet.supervisor("a").pids.remote())
    address_b = get(fleet.supervisor("b").address.remote())
    a = fleet.node_of("a")
    os.kill(before["supervisor"], signal.SIGKILL)
    t0 = time.monotonic()
    wait_for(lambda: not any(pid_alive(p) for p in before["workers"]), timeout=15)
    with fleet.client(address_b) as c:
        def back() -> bool:
            rows = [w for w in _ready(c) if w["node"] == a]
            return len(rows) == len(before["workers"]) and \
                not {w["pid"] for w in rows} & set(before["workers"])
        wait_for(back, timeout=60)
        restart_s = time.monotonic() - t0
        assert len(c.generate("big", "again", max_tokens=3, **GREEDY).tokens) == 3
    after = get(fleet.supervisor("a").pids.remote())
    assert after["supervisor"] != before["supervisor"]
    wait_for(lambda: len(lfray.addresses()) == 2
             and get(fleet.supervisor("a").address.remote()) in lfray.addresses(), timeout=10)
    fleet.addresses = lfray.addresses()  # the restarted one bound a new port
    merge_figures({"scale_out": {"supervisor_restart_s": round(restart_s, 2)}})

def test_removing_a_node_mid_stream_completes_on_another_and_its_models_come_back(
        fleet: Fleet) -> None:
    address_a = next(x for x in fleet.addresses
                     if x == ray.get(fleet.supervisor("a").address.remote()))
    with fleet.client(address_a) as c:
        wait_for(lambda: len(_ready(c)) == 4, timeout=30)
        b = fleet.node_of("b")
        on_b = [w["model"] for w in c.status() if w["node"] == b]
        session = _pinned_session(c, b)
        solo = c.generate("r", "tell me", max_tokens=300, session=session + "-solo", **GREEDY)
        b_workers = ray.get(fleet.supervisor("b").pids.remote())["workers"]
        seen: list[str] = []
        failed: list[BaseException] = []
        t_remove = 0.0

        def other_traffic() -> None:  # plain requests on every model meanwhile
            with fleet.client(address_a) as other:
                for i in range(30):
                    try:
                        other.generate(("big", "r", "s")[i % 3], f"x{i}", max_tokens=3,
                                       **GREEDY)
                    except BaseException as exc:  # noqa: BLE001 - asserted below
                        failed.append(exc)

        with c.stream("r", "tell me", max_tokens=300, session=session, **GREEDY) as s:
            for delta in s:
                seen.append(delta)
                if len(seen) == 20:
                    t_remove = time.monotonic()
                    fleet.cluster.remove_node(fleet.nodes["b"])
                    traffic = threading.Thread(target=other_traffic)
                    traffic.start()
        stream_s = time.monotonic() - t_remove
        assert s.result.tokens == solo.tokens and "".join(seen) == solo.text
        traffic.join(120)
        assert failed == []
        # the workers of the lost node do not outlive it
        wait_for(lambda: not any(pid_alive(p) for p in b_workers), timeout=15)
        # and its models are placed again on the node that is left
        a = fleet.node_of("a")

        def back() -> bool:  # every model ready again, and on a (b's rows are gone)
            rows = c.status()
            return {w["node"] for w in rows} == {a} and sorted(
                (w["model"], w["replica"]) for w in rows if w["state"] == "ready") == \
                [("big", 0), ("r", 0), ("r", 1), ("s", 0)]
        wait_for(back, timeout=60)
        back_s = time.monotonic() - t_remove
        for model in on_b:
            assert len(c.generate(model, "again", max_tokens=3, **GREEDY).tokens) == 3
    merge_figures({"scale_out": {"node_removed_stream_s": round(stream_s, 2),
                                 "models_back_s": round(back_s, 2),
                                 "requests_during_removal": 30, "failed": 0}})



def test_ray_down_stops_every_supervisor_and_worker(fleet: Fleet) -> None:
    """(Last: it takes the fleet down.)"""
    from llamafleet.ray.actors import get
    pids = get(fleet.supervisor("a").pids.remote())
    down = subprocess.run([sys.executable, "-m", "llamafleet", "ray", "down", "--address",
                           fleet.cluster.address], capture_output=True, text=True, timeout=180)
    assert down.returncode == 0, down.stderr
    wait_for(lambda: not any(pid_alive(p) for p in pids["workers"]), timeout=30)
    wait_for(lambda: lfray.state() is None, timeout=15)  # the controller is gone too
    assert lfray.addresses() == []
    with Client(fleet.addresses[0], timeout=5, connect_timeout=2,
                curve_server_key=fleet.keys["server_public"],
                curve_client_cert=fleet.keys["client_secret"]) as c:
        with pytest.raises(Unavailable):
            c.status(timeout=3)
