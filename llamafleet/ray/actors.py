"""The Ray actors: one controller that places models and merges what every node
serves, and one supervisor per node that runs the workers.

Ray does placement and lifecycle only; requests never cross Ray. Each
:class:`NodeSupervisor` is a detached, named actor pinned to its node (restarted
by Ray when its process dies: the workers of the dead one die with it, by their
parent-death signal) that runs a :class:`~llamafleet.runtime.supervisor.Supervisor`
on tcp:// with CURVE. Every half second it reports its ready workers and status
to the :class:`Controller` and receives the rest of the cluster as a
:class:`~llamafleet.runtime.registry.ClusterView`, so it answers ``lookup`` for
every model of the cluster. The controller watches the nodes; when one is lost
it places that node's replicas again on the nodes with room (bumping the
placement version, which every supervisor applies as a live reload).

The CURVE keys are read from the paths the configuration names, on each node
(the deploy puts them there); they are never sent through Ray.
"""

from __future__ import annotations

import copy
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from llamafleet.ray.placement import Demand, Node, Placement, place
from llamafleet.runtime import protocol
from llamafleet.runtime.config import Config
from llamafleet.runtime.registry import ClusterView
from llamafleet.runtime.supervisor import Supervisor

log = logging.getLogger("llamafleet.ray")

NAMESPACE = "llamafleet"
#: the resource only the head node has (the controller runs there)
HEAD = "node:__internal_head__"
CONTROLLER = "llamafleet-controller"
#: seconds between two reports of a node's supervisor (and node checks)
REPORT_S = 0.5
#: a supervisor silent this long (seconds) is left out of the others' views
STALE_S = 3.0
#: the internal KV key of the fleet's configuration (the controller survives restarts)
STATE_KEY = b"llamafleet/config"


def get(ref: Any, timeout: float | None = None) -> Any:
    """``ray.get``, typed loosely (its stubs say too much)."""
    return ray.get(ref, timeout=timeout)


def controller() -> Any:
    """The fleet's controller actor (ValueError when there is none)."""
    return ray.get_actor(CONTROLLER, namespace=NAMESPACE)


def supervisor_name(node_id: str) -> str:
    return f"llamafleet-sup-{node_id[:16]}"


def short(node_id: str) -> str:
    """A node as ``status`` shows it."""
    return node_id[:12]


def alive_nodes() -> list[Node]:
    """The cluster's live nodes and their resources (memory in MiB)."""
    out = []
    for n in ray.nodes():  # type: ignore[no-untyped-call]
        if not n.get("Alive"):
            continue
        res = {k: float(v) for k, v in n.get("Resources", {}).items()
               if not k.startswith("node:") and k != "object_store_memory"}
        res["memory_mb"] = res.pop("memory", 0.0) / (1 << 20)
        out.append(Node(n["NodeID"], res))
    return out


def check(raw: dict[str, Any]) -> Config:
    """A fleet file as Ray runs it (ConfigError otherwise): models are placed and
    kept loaded, so ``load = "on_demand"`` and an idle ``keep_alive`` are refused
    (another node's supervisor would not load or keep them for a lookup here)."""
    from llamafleet.runtime.errors import ConfigError
    cfg = Config.from_dict(raw)
    for m in cfg.models.values():
        if m.on_demand or m.keep_alive >= 0:
            raise ConfigError(f"[models.{m.name}] llamafleet ray keeps every model loaded "
                              "where it is placed: drop load = \"on_demand\" and keep_alive")
    return cfg


def node_config(raw: dict[str, Any], models: dict[str, int], node_id: str,
                ip: str) -> dict[str, Any]:
    """The configuration of one node's supervisor: the fleet's ``[supervisor]``
    table on tcp:// at the node's address, a runtime directory of its own, and the
    models placed there with their replica counts there."""
    out = copy.deepcopy(raw)
    sup = out.setdefault("supervisor", {})
    base = Path(sup.get("runtime_dir") or "/tmp/llamafleet-ray")
    sup["runtime_dir"] = str(base / short(node_id))
    sup["transport"] = "tcp"
    sup["tcp_host"] = ip
    port = str(sup.get("address", "")).rpartition(":")[2]
    sup["address"] = f"tcp://{ip}:{port if port.isdigit() else '*'}"
    out.pop("http", None)  # the gateway is not placed by Ray (see docs/scale-out.md)
    tables = raw.get("models", {})
    out["models"] = {m: {**tables[m], "replicas": n} for m, n in models.items() if n}
    return out


@dataclass
class _Report:
    address: str
    endpoints: list[dict[str, Any]]
    workers: list[dict[str, Any]]
    at: float


class ControllerActor:
    """Places the fleet's models on the nodes and merges their reports (the class
    behind the Ray actor :data:`Controller`)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.raw: dict[str, Any] | None = None
        self.config: Config | None = None
        self.placement = Placement()
        self.version = 0
        self.reports: dict[str, _Report] = {}
        self.ips: dict[str, str] = {}
        self.supervisors: dict[str, Any] = {}
        self._stop = threading.Event()
        from ray.experimental import internal_kv
        saved = internal_kv._internal_kv_get(STATE_KEY)
        if saved:  # restarted by Ray: carry on with the fleet it had
            import msgpack
            self._apply(msgpack.unpackb(saved))
        threading.Thread(target=self._watch, daemon=True, name="llamafleet-watch").start()

    # -- the fleet -------------------------------------------------------------------
    def up(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Take the fleet's configuration (a parsed TOML document), place it and
        start the supervisors. Raises ConfigError for a configuration that does
        not load."""
        check(raw)  # refused whole, before anything starts
        import msgpack
        from ray.experimental import internal_kv
        internal_kv._internal_kv_put(STATE_KEY, msgpack.packb(raw), overwrite=True)
        self._apply(raw)
        return self.state()

    def down(self) -> None:
        """Stop every supervisor (their workers drain and stop) and forget the fleet."""
        from ray.experimental import internal_kv
        self._stop.set()
        internal_kv._internal_kv_del(STATE_KEY)
        with self._lock:
            sups, self.supervisors = list(self.supervisors.values()), {}
        try:  # let them drain; a frozen or lost one does not hold the others up
            ray.wait([s.stop.remote() for s in sups], num_returns=len(sups), timeout=60)
        finally:
            for s in sups:
                ray.kill(s, no_restart=True)

    def state(self) -> dict[str, Any]:
        """The placement (model -> node -> replicas), what could not be placed, the
        supervisors' addresses by node and the placement version."""
        with self._lock:
            return {"placement": {m: dict(n) for m, n in self.placement.nodes.items()},
                    "missing": dict(self.placement.missing), "version": self.version,
                    "addresses": {n: r.address for n, r in self._fresh().items()}}

    def _apply(self, raw: dict[str, Any]) -> None:
        with self._lock:
            self.raw, self.config = raw, check(raw)
            self._replace(previous=None)

    def _replace(self, previous: dict[str, dict[str, int]] | None) -> None:
        """Place the models on the live nodes and start a supervisor on every node
        that got some (under the lock)."""
        assert self.config is not None
        nodes = alive_nodes()
        self.placement = place([Demand.of(m) for m in self.config.models.values()], nodes,
                               previous)
        # never the same twice, across restarts of this actor too: the supervisors
        # reload when the version they were given changes
        self.version = max(self.version + 1, time.time_ns())
        if self.placement.missing:
            log.warning("no room for: %s", self.placement.missing)
        for n in nodes:
            if self.placement.on(n.id) and n.id not in self.supervisors:
                self.supervisors[n.id] = NodeSupervisor.options(
                    name=supervisor_name(n.id), namespace=NAMESPACE, lifetime="detached",
                    get_if_exists=True,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(n.id, soft=False),
                ).remote(n.id)

    def _watch(self) -> None:
        """Place again what ran on nodes that are gone (and what found no room)."""
        known = {n.id for n in alive_nodes()}
        while not self._stop.wait(REPORT_S):
            try:
                alive = {n.id for n in alive_nodes()}
            except Exception:  # the GCS is busy: look again next time
                continue
            with self._lock:
                if self.config is None:
                    known = alive
                    continue
                lost = {n for m in self.placement.nodes.values() for n in m} - alive
                if lost or (self.placement.missing and alive - known):
                    log.warning("nodes lost: %s; placing their models again",
                                [short(n) for n in lost])
                    for n in lost:
                        self.reports.pop(n, None)
                        self.supervisors.pop(n, None)
                    kept = {m: {n: c for n, c in per.items() if n in alive}
                            for m, per in self.placement.nodes.items()}
                    self._replace(previous=kept)
                known = alive

    # -- the supervisors ask ----------------------------------------------------------
    def assignment(self, node_id: str, ip: str) -> tuple[int, dict[str, Any] | None]:
        """The placement version and the configuration of ``node_id``'s supervisor."""
        with self._lock:
            if self.raw is None:
                return self.version, None
            self.ips[node_id] = ip
            return self.version, node_config(self.raw, self.placement.on(node_id),
                                             node_id, ip)

    def report(self, node_id: str, address: str, endpoints: list[dict[str, Any]],
               workers: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
        """A node's ready workers and status; answers the placement version and the
        rest of the cluster as that node's supervisor sees it (a ClusterView)."""
        with self._lock:
            self.reports[node_id] = _Report(address, endpoints, workers, time.monotonic())
            return self.version, self._view(node_id)

    def _fresh(self) -> dict[str, _Report]:
        """The reports of supervisors that reported lately (a silent one's workers
        are not handed out)."""
        now = time.monotonic()
        return {n: r for n, r in self.reports.items() if now - r.at < STALE_S}

    def _view(self, me: str) -> dict[str, Any]:
        p = self.placement

        def cluster_replica(model: str, node: str, local: int) -> int | None:
            try:
                return p.replica_base(model, node) + local
            except KeyError:
                return None  # placed elsewhere since: not listed

        remote: dict[str, list[dict[str, Any]]] = {m: [] for m in p.nodes}
        workers: list[dict[str, Any]] = []
        for node, rep in self._fresh().items():
            if node == me:
                continue
            for e in rep.endpoints:
                r = cluster_replica(e["model"], node, e.get("replica", 0))
                if r is not None:
                    remote.setdefault(e["model"], []).append({**e, "replica": r})
            workers += rep.workers  # numbered by cluster replica already (its status)
        ids = [[m, local, p.replica_base(m, me) + local]
               for m, per in p.nodes.items() for local in range(per.get(me, 0))]
        return {"remote": remote, "replicas": {m: p.total(m) for m in p.nodes},
                "replica_ids": ids, "workers": workers}


def view_from_wire(data: dict[str, Any]) -> ClusterView:
    return ClusterView(
        remote={m: [protocol.WorkerEndpoint.from_wire(e) for e in eps]
                for m, eps in data["remote"].items()},
        replicas=dict(data["replicas"]),
        replica_ids={(m, local): r for m, local, r in data["replica_ids"]},
        workers=list(data["workers"]))


class NodeSupervisorActor:
    """One node's supervisor, kept in step with the controller's placement (the
    class behind the Ray actor :data:`NodeSupervisor`)."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.ip: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        self.controller = controller()
        given: tuple[int, dict[str, Any] | None] = get(
            self.controller.assignment.remote(node_id, self.ip))
        self.version, raw = given
        if raw is None:
            raise RuntimeError("the llamafleet controller holds no fleet")
        # generations must be unique across the cluster and across restarts of this
        # actor: clients remember the ones they saw die
        self.sup = Supervisor(Config.from_dict(raw), node=short(node_id),
                              generation_base=secrets.randbits(40) << 16).start()
        self._stop = threading.Event()
        threading.Thread(target=self._report_loop, daemon=True,
                         name="llamafleet-report").start()

    def address(self) -> str:
        return self.sup.address

    def pids(self) -> dict[str, Any]:
        """This actor's pid and its workers' (for tests and operators)."""
        import os
        return {"supervisor": os.getpid(),
                "workers": [h.pid for h in self.sup.handles() if h.pid is not None]}

    def stop(self) -> None:
        self._stop.set()
        self.sup.stop()

    def _report_loop(self) -> None:
        me = short(self.node_id)
        version: int
        view: dict[str, Any]
        raw: dict[str, Any] | None
        while not self._stop.wait(REPORT_S):
            try:
                local = [w for w in self.sup.status() if w.get("node") == me]
                version, view = get(self.controller.report.remote(
                    self.node_id, self.sup.address,
                    [e.to_wire() for e in self.sup.local_endpoints()], local), timeout=10)
                self.sup.set_cluster(view_from_wire(view))
                if version != self.version:
                    new_version, raw = get(self.controller.assignment.remote(
                        self.node_id, self.ip), timeout=10)
                    if raw is not None:
                        self.sup.reload(Config.from_dict(raw))
                    self.version = new_version  # only once applied: a failure retries
            except Exception as exc:  # the controller restarts: report again later
                log.warning("report to the llamafleet controller failed: %s", exc)


_remote: Any = ray.remote  # its overloads do not know every actor option
#: the Ray actors (detached and named by :mod:`llamafleet.ray`; restarted by Ray)
Controller: Any = _remote(num_cpus=0, max_restarts=-1, max_task_retries=-1,
                             max_concurrency=16)(ControllerActor)
NodeSupervisor: Any = _remote(num_cpus=0, max_restarts=-1, max_task_retries=-1,
                                 max_concurrency=4)(NodeSupervisorActor)
