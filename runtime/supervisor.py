"""The supervisor: one worker process per model, watched and restarted.

It binds two sockets in the runtime directory: the control socket (clients ask
where a model's worker is, and for status) and the event socket (workers send
hello and heartbeats). A worker that exits, or misses heartbeats, is restarted
with exponential backoff; one that crashes more than ``max_restarts`` times in
``restart_window`` seconds (OTP's restart intensity) is marked ``failed`` with
its last exit reason, and the other models keep serving.

The parts, in the manner of OTP: :mod:`~llamafleet.runtime.process` runs the
children, :mod:`~llamafleet.runtime.policy` decides restarts (pure),
:mod:`~llamafleet.runtime.registry` names them (model -> endpoints, and the
lookups waiting for one). This module is the loop that ties them together.

Use it from Python as a context manager, or run ``llamafleet serve``::

    with Supervisor(Config.load("fleet.toml")) as sup:
        sup.wait_ready()
        with Client(sup.address) as client:
            print(client.generate("tiny", "Hello").text)
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

import zmq

from llamafleet.runtime import protocol
from llamafleet.runtime.config import Config, ModelConfig, SupervisorConfig
from llamafleet.runtime.errors import (
    AlreadyRunning,
    BadRequest,
    ConfigError,
    InternalError,
    LlamafleetError,
    NotFound,
    NotSupported,
    Overloaded,
    ProtocolError,
    ShuttingDown,
    Unavailable,
    WorkerFailed,
)
from llamafleet.runtime.lifecycle import (
    Resident,
    idle_expired,
    memory_estimate,
    plan_load,
    rss_mb,
    too_big,
)
from llamafleet.runtime.policy import GiveUp, RestartPolicy
from llamafleet.runtime.process import (
    LOG_DRAIN_TIMEOUT,
    LOG_TAIL_LINES,
    WorkerProcess,
    crash_detail,
    describe_exit,
    new_log_tail,
)
from llamafleet.runtime.registry import Answer, ClusterView, Registry, Waiter
from llamafleet.runtime.services import ServiceHandle, service_spec, services_of, spawn_service
from llamafleet.runtime.tcp import keepalive

__all__ = ["Supervisor", "WorkerHandle", "describe_exit", "LOG_TAIL_LINES",
           "LOG_DRAIN_TIMEOUT", "MAX_SLEEP", "EXIT_POLL"]

log = logging.getLogger("llamafleet.supervisor")

#: the loop's longest sleep when nothing is due (seconds)
MAX_SLEEP = 1.0
#: seconds a model counts as busy after its last lookup or reported activity
ROUTE_GRACE = 0.25
#: how often exits are polled for where pidfds are not available (seconds)
EXIT_POLL = 0.05


@dataclass
class WorkerHandle:
    """The supervisor's view of one worker: one replica of a model (the child and
    its state). ``state`` is ``unloaded`` (configured, no process), ``starting``,
    ``ready``, ``restarting``, ``stopping`` (drained on purpose), ``failed`` or
    ``stopped``."""

    model: ModelConfig
    replica: int = 0
    state: str = "starting"
    proc: WorkerProcess | None = None
    generation: int = 0
    endpoint: str | None = None
    restarts: int = 0
    last_exit: str | None = None
    started_at: float = 0.0
    ready_at: float | None = None
    last_heartbeat: float = 0.0
    next_start_at: float | None = None
    #: crash times within the restart window (kept for the restart policy)
    crash_times: tuple[float, ...] = ()
    #: the last output lines, across generations
    log_tail: deque[str] = field(default_factory=new_log_tail)
    load_progress: float = 0.0
    load_error: str | None = None
    inflight: int = 0
    progress: int = 0
    progress_at: float = 0.0
    #: requests the worker reported receiving (its heartbeat's count)
    requests: int = 0
    #: why it is being stopped on purpose (unload, reload): its exit is no crash
    stopping: str | None = None
    #: start again as soon as it has stopped (a rolling restart)
    respawn: bool = False
    rss_mb: float | None = None
    #: the keep_alive the worker's latest request asked for
    requested_keep_alive: float | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.running else None

    @property
    def kill_reason(self) -> str | None:
        return self.proc.kill_reason if self.proc is not None else None

    @property
    def resident(self) -> bool:
        """A process exists or is about to (it holds, or will hold, memory)."""
        return self.proc is not None or self.state in ("starting", "restarting")

    def published(self) -> protocol.WorkerEndpoint:
        """This ready worker as the registry and lookups list it."""
        assert self.endpoint is not None
        return protocol.WorkerEndpoint(
            model=self.model.name, endpoint=self.endpoint, generation=self.generation,
            pid=self.pid, backend=self.model.backend, replica=self.replica)

    def state_data(self) -> dict[str, Any]:
        """The structured details of errors about this worker."""
        return {"model": self.model.name, "replica": self.replica, "state": self.state,
                "restarts": self.restarts, "last_exit": self.last_exit,
                "load_progress": self.load_progress}

    def snapshot(self, keep_alive: float, idle_s: float | None) -> dict[str, Any]:
        """This worker as ``status`` shows it (a protocol.WorkerStatus map)."""
        now = time.monotonic()
        return protocol.WorkerStatus(
            model=self.model.name, backend=self.model.backend, pid=self.pid,
            state=self.state, restarts=self.restarts, last_exit=self.last_exit,
            generation=self.generation, endpoint=self.endpoint,
            load_progress=round(self.load_progress, 3), inflight=self.inflight,
            uptime_s=round(now - self.ready_at, 3) if self.ready_at and
            self.state == "ready" else None,
            load_s=round(self.ready_at - self.started_at, 3) if self.ready_at else None,
            replica=self.replica, rss_mb=self.rss_mb if self.pid else None,
            keep_alive=keep_alive, idle_s=idle_s).to_wire()


@dataclass
class ModelSlot:
    """One configured model: its replicas' handles and its lifecycle."""

    config: ModelConfig
    handles: list[WorkerHandle]
    #: monotonic time of its last request (a lookup answered, work seen in a heartbeat)
    last_used: float = 0.0
    #: whether it ever had a request (idle_s is shown only then)
    used: bool = False
    #: keep_alive asked for by the latest request (None: the configuration's)
    keep_alive_override: float | None = None
    #: what one worker measured last time it was loaded (MiB)
    measured_mb: float | None = None
    #: replicas still to restart with a changed configuration, in order
    rolling: list[int] = field(default_factory=list)
    #: loaded by hand (``load``): queued for room even with nobody waiting
    forced: bool = False
    #: monotonic time it was marked failed (an on-demand model is retried after
    #: ``failed_retry_s``)
    failed_at: float = 0.0

    @property
    def name(self) -> str:
        return self.config.name

    def touch(self, now: float) -> None:
        """It had a request at ``now``."""
        self.last_used, self.used = now, True

    @property
    def keep_alive(self) -> float:
        return self.config.keep_alive if self.keep_alive_override is None \
            else self.keep_alive_override

    @property
    def resident(self) -> bool:
        return any(h.resident for h in self.handles)

    @property
    def stopping(self) -> bool:
        return any(h.stopping is not None and h.proc is not None for h in self.handles)

    @property
    def up(self) -> bool:
        """Serving or about to: some replica is resident and not being stopped."""
        return any(h.resident and h.stopping is None for h in self.handles)


class Supervisor:
    """Starts, watches and restarts the workers of a :class:`Config`; loads and
    unloads models on demand; applies a changed configuration (:meth:`reload`)."""

    def __init__(self, config: Config, config_path: str | os.PathLike[str] | None = None, *,
                 node: str | None = None, generation_base: int = 0) -> None:
        """``node`` names the cluster node this supervisor runs on (shown in
        ``status``); ``generation_base`` offsets its worker generations, which must
        be unique across the supervisors of a cluster (clients key on them)."""
        self.config = config
        self.node = node
        #: the file ``reload`` re-reads (default: the one the config was loaded from)
        self.config_path = Path(config_path) if config_path is not None else config.source
        self.sup = config.supervisor
        self.address = self.sup.control_address()
        self.events_address = f"ipc://{self.sup.runtime_dir / 'events.sock'}"
        self.models: dict[str, ModelSlot] = {
            name: self._slot(m) for name, m in config.models.items()}
        #: workers leaving for good (their model or replica was removed by a reload)
        self._retiring: list[WorkerHandle] = []
        #: the live worker of each generation (generations are unique in a supervisor)
        self._by_generation: dict[int, WorkerHandle] = {}
        self._generations = itertools.count(generation_base + 1)
        #: models waiting for room to load, in the order they were asked for
        self._load_queue: deque[str] = deque()
        self.policy = RestartPolicy.from_config(self.sup)
        #: the HTTP gateway and metrics endpoint (bound in start)
        self.services: dict[str, ServiceHandle] = {}
        self.registry = Registry(self.models, describe=self._describe,
                                 replicas=lambda name: self.models[name].config.replicas)
        self._ctx = zmq.Context()
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None
        self._shutting_down = False
        self._changed = threading.Condition()
        #: reloads asked for from other threads (and SIGHUP), applied by the loop
        self._reloads: deque[_ReloadRequest] = deque()
        #: the latest view of the rest of the cluster, applied by the loop
        self._views: deque[ClusterView] = deque(maxlen=1)
        # stop() and signal handlers wake the loop through this pipe; the loop
        # otherwise sleeps until its next deadline (no periodic polling)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        weakref.finalize(self, _close_fds, self._wake_r, self._wake_w)

    @staticmethod
    def _slot(m: ModelConfig) -> ModelSlot:
        state = "unloaded" if m.on_demand else "starting"
        return ModelSlot(config=m, handles=[WorkerHandle(model=m, replica=r, state=state)
                                            for r in range(m.replicas)])

    @property
    def workers(self) -> dict[str, WorkerHandle]:
        """The first replica of every model, by name (see :meth:`handles` for all)."""
        return {name: slot.handles[0] for name, slot in self.models.items()}

    def handles(self) -> list[WorkerHandle]:
        """Every worker handle: each replica of each model, then the retiring ones."""
        return [h for slot in self.models.values() for h in slot.handles] + self._retiring

    # -- public API ---------------------------------------------------------------
    def start(self) -> Supervisor:
        """Bind the sockets, spawn every eager worker and run the loop in a thread."""
        self._prepare()
        self._thread = threading.Thread(target=self._loop, name="llamafleet-supervisor",
                                        daemon=True)
        self._thread.start()
        return self

    def serve_forever(self, on_started: Callable[[Supervisor], None] | None = None) -> None:
        """Run in the calling (main) thread until SIGTERM/SIGINT, then shut down; SIGHUP
        reloads the configuration file. ``on_started`` is called once the sockets are
        bound and the children started."""
        self._prepare()
        if on_started is not None:
            on_started(self)

        def on_signal(signum: int, frame: Any) -> None:
            log.info("received %s: shutting down", signal.Signals(signum).name)
            self._request_stop()

        def on_hup(signum: int, frame: Any) -> None:
            log.info("received SIGHUP: reloading %s", self.config_path)
            self._reloads.append(_ReloadRequest(None))
            self._wake()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, on_hup)
        self._loop()

    def stop(self, timeout: float | None = None) -> None:
        """Graceful shutdown: refuse new lookups, drain workers, stop them."""
        self._request_stop()
        if self._thread is not None:
            grace = self.sup.shutdown_grace + 5.0
            self._thread.join(timeout if timeout is not None else grace)

    def reload(self, config: Config | None = None, timeout: float = 30.0) -> protocol.Reloaded:
        """Apply ``config`` (default: re-read :attr:`config_path`): added models start
        (or wait, if on demand), removed ones drain and stop, changed ones restart
        replica by replica, unchanged ones are not touched. A configuration that does
        not load, or changes what cannot change while running, raises ConfigError and
        leaves the fleet as it was. Returns at once; the restarts go on in the loop."""
        req = _ReloadRequest(config)
        self._reloads.append(req)
        self._wake()
        if not req.done.wait(timeout):
            raise Unavailable(f"the supervisor did not apply the reload within {timeout}s")
        if isinstance(req.outcome, LlamafleetError | ConfigError):
            raise req.outcome
        assert isinstance(req.outcome, protocol.Reloaded)
        return req.outcome

    def set_cluster(self, view: ClusterView) -> None:
        """What the other nodes of a cluster serve (from any thread): lookups answer
        with their workers too, and ``status`` lists them."""
        self._views.append(view)
        self._wake()

    def local_endpoints(self) -> list[protocol.WorkerEndpoint]:
        """The ready workers of this supervisor (from any thread: a snapshot)."""
        return [h.published() for h in list(self.handles())
                if h.state == "ready" and h.endpoint and h not in self._retiring]

    def _request_stop(self) -> None:
        self._stop.set()
        self._wake()

    def _wake(self) -> None:
        """Wake the loop (from any thread)."""
        try:
            os.write(self._wake_w, b"w")
        except OSError:
            pass  # already woken (pipe full)

    def __enter__(self) -> Supervisor:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def status(self) -> list[dict[str, Any]]:
        """One dict per worker (each replica of each model): model, replica, pid,
        state, restarts, last_exit, rss_mb, keep_alive, node, ...; in a cluster, the
        other nodes' workers too, and replicas numbered across the cluster."""
        now = time.monotonic()
        ids = self.registry.cluster.replica_ids  # in a cluster: its replica numbers
        out = []
        for slot in list(self.models.values()):
            idle = round(now - slot.last_used, 3) if slot.used else None
            out += [{**h.snapshot(slot.keep_alive, idle), "node": self.node,
                     "replica": ids.get((slot.name, h.replica), h.replica)}
                    for h in slot.handles]
        return out + [dict(w) for w in self.registry.cluster.workers]

    def _children(self) -> list[WorkerHandle | ServiceHandle]:
        """Every supervised child: the workers, then the services."""
        return [*self.handles(), *self.services.values()]

    def service_status(self) -> list[dict[str, Any]]:
        """One dict per service (the HTTP gateway, the metrics endpoint)."""
        return [s.snapshot() for s in self.services.values()]

    @property
    def http_url(self) -> str | None:
        """The base URL of the HTTP gateway (``http://HOST:PORT``), if configured."""
        s = self.services.get("http")
        return s.url if s is not None else None

    @property
    def metrics_url(self) -> str | None:
        """The base URL of the metrics-only endpoint, if configured."""
        s = self.services.get("metrics")
        return s.url if s is not None else None

    def wait_ready(self, timeout: float = 60.0, models: list[str] | None = None) -> None:
        """Block until every replica of the named models is ready (default: of every
        eager model, and the services).

        Raises WorkerFailed if one fails, Unavailable on timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                names = models or [n for n, s in self.models.items()
                                   if not s.config.on_demand]
                states: dict[str, str] = {}
                for n in names:
                    slot = self.models.get(n)
                    if slot is None:
                        raise NotFound(f"no model named {n!r}")
                    for h in slot.handles:
                        states[n if h.replica == 0 else f"{n}#{h.replica}"] = h.state
                if models is None:
                    states.update({f"service {s.name}": s.state
                                   for s in self.services.values()})
                failed = [n for n, s in states.items() if s == "failed"]
                if failed:
                    name = failed[0]
                    if name.startswith("service "):
                        s = self.services[name.removeprefix("service ")]
                        raise WorkerFailed(f"service {s.name} failed: {s.last_exit}",
                                           data={"last_exit": s.last_exit})
                    model, _, rep = name.partition("#")
                    h = self.models[model].handles[int(rep or 0)]
                    raise WorkerFailed(f"model {h.model.name} failed: {h.last_exit}",
                                       data={"last_exit": h.last_exit})
                if all(s == "ready" for s in states.values()):
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Unavailable(f"workers not ready after {timeout}s: {states}")
                self._changed.wait(min(left, 0.1))

    def _describe(self, name: str) -> dict[str, Any]:
        """The error data of a model that is not ready: its first replica's state."""
        slot = self.models.get(name)
        if slot is None:
            remote = name in self.registry.cluster.remote
            return {"model": name, "state": "on another node" if remote else "removed"}
        h = next((h for h in slot.handles if h.state != "unloaded"), slot.handles[0])
        data = h.state_data()
        if name in self._load_queue:
            data["state"] = "waiting for room"
        return data

    # -- setup ---------------------------------------------------------------------
    def _prepare(self) -> None:
        rd = self.sup.runtime_dir
        rd.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(rd, 0o700)
        fd = os.open(rd / "supervisor.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(f"another supervisor is running in {rd}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        # Sockets left by a supervisor that died without cleaning up.
        for stale in rd.glob("*.sock"):
            stale.unlink(missing_ok=True)
        try:
            self.services = {s.name: s for s in services_of(self.config)}
        except BaseException:
            os.close(fd)
            self._lock_fd = None
            raise
        self._control = self._ctx.socket(zmq.ROUTER)
        self._events = self._ctx.socket(zmq.ROUTER)
        self._auth = None
        if self.address.startswith("tcp://"):
            if self.sup.curve:
                from llamafleet.runtime import security
                assert self.sup.curve_authorized_clients is not None
                self._auth = security.start_authenticator(self._ctx,
                                                          self.sup.curve_authorized_clients)
                security.make_server(self._control,
                                     security.load_keypair(str(self.sup.curve_server_key)))
            else:
                log.warning("INSECURE: control socket %s accepts anyone who can connect "
                            "(insecure_tcp = true); use CURVE keys instead", self.address)
        for s in (self._control, self._events):
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_CONTROL_MESSAGE_BYTES)
        keepalive(self._control, self.address)
        self._control.bind(self.address)
        self._events.bind(self.events_address)
        for addr in (self.address, self.events_address):
            if addr.startswith("ipc://"):
                os.chmod(addr[6:], 0o600)
        if self.address.endswith(":0") or self.address.endswith(":*"):
            self.address = self._control.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("supervisor listening on %s (runtime dir %s)", self.address, rd)
        for slot in self.models.values():
            if not slot.config.on_demand:
                self._load(slot)
        for svc in self.services.values():
            log.info("%s service on %s", svc.name, svc.url)
            self._spawn_service(svc)

    def _spawn_service(self, s: ServiceHandle) -> None:
        s.starting()
        spec = service_spec(s, self.config, self.address, self.events_address)
        try:
            s.proc = spawn_service(s, spec, self._wake)
        except OSError as exc:
            s.proc = None
            self._on_service_exit(s, f"could not start: {exc}")
            return
        log.info("started %s service (pid %d, generation %d)", s.name, s.proc.pid,
                 s.generation)

    # -- worker processes --------------------------------------------------------------
    def _load(self, slot: ModelSlot) -> None:
        """Start every replica of a model that is not running."""
        self.registry.clear_failure(slot.name)
        slot.forced = False
        if slot.name in self._load_queue:
            self._load_queue.remove(slot.name)
        slot.last_used = time.monotonic()
        for h in slot.handles:
            if h.proc is None and h.state != "restarting":  # restarting: backoff pending
                h.restarts = 0
                h.crash_times = ()
                self._spawn(h)
        self._notify()

    def _spawn(self, h: WorkerHandle) -> None:
        if h.generation:
            self._by_generation.pop(h.generation, None)
        h.generation = next(self._generations)
        self._by_generation[h.generation] = h
        h.state = "starting" if h.restarts == 0 else "restarting"
        h.endpoint = None
        h.load_progress = 0.0
        h.load_error = None
        h.next_start_at = None
        h.inflight = h.requests = 0
        h.stopping = None
        h.respawn = False
        h.requested_keep_alive = None
        now = time.monotonic()
        h.started_at = h.last_heartbeat = h.progress_at = now
        try:
            h.proc = WorkerProcess.spawn(self._worker_spec(h), h.log_tail, self._wake)
        except OSError as exc:
            h.proc = None
            self._on_exit(h, f"could not start: {exc}")
            return
        log.info("started worker %s (pid %d, generation %d)", self._label(h), h.proc.pid,
                 h.generation)

    @staticmethod
    def _label(h: WorkerHandle) -> str:
        return h.model.name if h.model.replicas == 1 else f"{h.model.name}#{h.replica}"

    def _worker_spec(self, h: WorkerHandle) -> protocol.WorkerSpec:
        return protocol.WorkerSpec(
            model=h.model.name, backend=h.model.backend, options=h.model.options,
            endpoint=self.config.worker_endpoint(h.model.name, h.replica),
            events_endpoint=self.events_address, generation=h.generation,
            heartbeat_interval=self.sup.heartbeat_interval, log_level=self.sup.log_level,
            shutdown_grace=self.sup.shutdown_grace, worker_options=h.model.worker,
            sampling=h.model.sampling, curve_server_key=self.sup.curve_server_key,
            curve_authorized_clients=self.sup.curve_authorized_clients, replica=h.replica)

    def _kill(self, h: WorkerHandle, reason: str) -> None:
        log.warning("killing worker %s (pid %s): %s", self._label(h), h.pid, reason)
        if h.proc is not None:
            h.proc.kill(reason)

    def _reap(self, h: WorkerHandle) -> str:
        """Wait for an exited worker process and forget it; returns its exit report."""
        assert h.proc is not None
        reason = h.proc.reap()
        h.proc = None
        return reason

    def _stop_worker(self, h: WorkerHandle, why: str, respawn: bool = False) -> None:
        """Drain and stop a worker on purpose (unload, reload): no restart follows
        (unless ``respawn``: a rolling restart starts it again at once)."""
        h.respawn = respawn
        if h.proc is None:
            h.state = "unloaded"
            h.next_start_at = None
            if respawn:
                self._spawn(h)
            return
        log.info("stopping worker %s (pid %s): %s", self._label(h), h.pid, why)
        h.stopping = why
        h.state = "stopping"
        h.endpoint = None
        self.registry.unregister(h.model.name, h.generation)
        h.proc.terminate()

    # -- the loop ------------------------------------------------------------------------
    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._control, zmq.POLLIN)
        poller.register(self._events, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        pidfds: set[int] = set()
        try:
            while not self._stop.is_set():
                pidfds = self._step(poller, pidfds, self._poll_ms())
            self._shutdown(poller, pidfds)
        except Exception:
            log.exception("supervisor loop crashed; stopping workers")
            self._kill_all()
            raise
        finally:
            self._cleanup()
            self._stopped.set()
            self._notify()

    def _step(self, poller: zmq.Poller, pidfds: set[int], timeout_ms: int) -> set[int]:
        """One turn of the loop: sleep until a message, an exit (pidfd), a wake-up or
        ``timeout_ms``; handle every queued message; then look at the workers.
        Returns the pidfds the poller now watches."""
        pidfds = self._watch_exits(poller, pidfds)
        for sock, _ in poller.poll(timeout_ms):
            if isinstance(sock, zmq.Socket):
                self._receive_all(sock)
            elif sock == self._wake_r:
                _drain(self._wake_r)
            # else a pidfd: _tick reaps the process
        self._tick()
        return pidfds

    def _receive_all(self, sock: zmq.Socket) -> None:
        """Handle every message queued on the control or event socket."""
        handle = self._on_control if sock is self._control else self._on_event
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            handle(frames)

    def _watch_exits(self, poller: zmq.Poller, polled: set[int]) -> set[int]:
        """Keep the poller's pidfds in step with the live workers."""
        live = {fd for h in self._children()
                if h.proc is not None and (fd := h.proc.watch_fd) is not None}
        for fd in polled - live:
            poller.unregister(fd)
        for fd in live - polled:
            poller.register(fd, zmq.POLLIN)
        return live

    def _poll_ms(self) -> int:
        """Milliseconds until the loop must look again without being woken."""
        now = time.monotonic()
        due = now + MAX_SLEEP
        for h in self.handles():
            if h.proc is not None and h.proc.drain_deadline is not None:
                due = min(due, h.proc.drain_deadline)
            elif h.proc is not None:
                if h.proc.pidfd is None:
                    due = min(due, now + EXIT_POLL)  # no pidfd: poll for the exit
                due = min(due, h.last_heartbeat + self.sup.heartbeat_timeout)
                if h.state == "ready" and h.inflight:
                    due = min(due, h.progress_at + self.sup.progress_timeout)
                elif h.state in ("starting", "restarting"):
                    due = min(due, h.started_at + self.sup.startup_timeout)
            elif h.state == "restarting" and h.next_start_at is not None:
                due = min(due, h.next_start_at)
        for slot in self.models.values():
            if slot.keep_alive >= 0 and slot.resident:
                due = min(due, slot.last_used + max(slot.keep_alive, self._grace()))
        if self._reloads or self._views:
            due = now
        for s in self.services.values():
            if s.proc is not None and s.proc.drain_deadline is not None:
                due = min(due, s.proc.drain_deadline)
            elif s.proc is not None:
                if s.proc.pidfd is None:
                    due = min(due, now + EXIT_POLL)
                due = min(due, s.last_heartbeat + self.sup.heartbeat_timeout)
            elif s.next_start_at is not None:
                due = min(due, s.next_start_at)
        waiter_due = self.registry.next_deadline()
        if waiter_due is not None:
            due = min(due, waiter_due)
        return max(0, int((due - now) * 1000) + 1)

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _tick(self) -> None:
        now = time.monotonic()
        while self._reloads:
            self._apply_reload(self._reloads.popleft())
        while self._views:
            self._answer_all(self.registry.set_cluster(self._views.popleft()))
        for h in self.handles():
            if h.proc is not None:
                rc = h.proc.poll()
                silent = now - h.last_heartbeat
                stuck = now - h.progress_at
                if rc is not None:
                    if not h.proc.output_pending(now):  # else the pump wakes us later
                        self._on_exit(h, self._reap(h))
                elif h.kill_reason is not None:
                    pass  # killed: its exit is due
                elif silent > self.sup.heartbeat_timeout:
                    self._kill(h, f"no heartbeat for {silent:.1f}s")
                elif h.state == "ready" and h.inflight and stuck > self.sup.progress_timeout:
                    # alive but wedged (llama.cpp can hang inside a decode)
                    self._kill(h, f"no progress for {stuck:.1f}s with {h.inflight} "
                                  "request(s) in flight")
                elif (h.state in ("starting", "restarting")
                      and now - h.started_at > self.sup.startup_timeout):
                    self._kill(h, f"not ready after {self.sup.startup_timeout:.0f}s")
            elif h.state == "restarting" and h.next_start_at is not None \
                    and now >= h.next_start_at:
                self._spawn(h)
        self._tick_lifecycle(now)
        for s in self.services.values():
            self._tick_service(s, now)
        self._answer_all(self.registry.expire(now))

    # -- the model lifecycle: on demand, keep_alive, eviction, rolling restarts ------------
    def _grace(self) -> float:
        """How long a model counts as busy after a lookup routed a request to it, or
        after its worker last reported activity: long enough for the request to
        reach the worker and the worker to say so (it beats within 50 ms of work
        starting, ending or arriving), short enough not to delay an eviction."""
        return ROUTE_GRACE

    def _busy(self, slot: ModelSlot, now: float) -> bool:
        return (any(h.inflight or h.state in ("starting", "restarting")
                    for h in slot.handles)
                or now - slot.last_used < self._grace()
                or bool(self.registry.waiters(slot.name)))

    def _tick_lifecycle(self, now: float) -> None:
        if self._shutting_down:
            return
        for slot in list(self.models.values()):
            if slot.resident and not slot.stopping and not slot.rolling and \
                    idle_expired(now, slot.last_used, slot.keep_alive, self._busy(slot, now)):
                self._unload(slot, f"idle for {now - slot.last_used:.1f}s "
                                   f"(keep_alive {slot.keep_alive:g}s)")
            self._roll(slot)
        self._serve_load_queue(now)

    def _need_mb(self, slot: ModelSlot) -> float:
        return memory_estimate(slot.config, slot.measured_mb) * slot.config.replicas

    def _residents(self, now: float, but: str) -> list[Resident]:
        return [Resident(name=s.name, memory_mb=self._need_mb(s), busy=self._busy(s, now),
                         pinned=s.keep_alive < 0, last_used=s.last_used, stopping=s.stopping)
                for s in self.models.values() if s.resident and s.name != but] + \
            [Resident(name=f"(retiring {h.model.name})", memory_mb=memory_estimate(
                h.model, h.rss_mb), busy=True, pinned=True, last_used=now, stopping=True)
             for h in self._retiring if h.proc is not None]

    def _request_load(self, slot: ModelSlot) -> None:
        """A request needs ``slot``'s model: load it now, or queue it for room.

        Raises WorkerFailed when it can never fit, Overloaded when too many requests
        already wait for room."""
        if slot.up or slot.name in self._load_queue:
            return
        need = self._need_mb(slot)
        if too_big(need, self.sup.memory_budget_mb):
            raise WorkerFailed(
                f"model {slot.name} needs {need:.0f} MiB, more than memory_budget_mb "
                f"({self.sup.memory_budget_mb})", data={"model": slot.name, "state": "unloaded",
                                                        "memory_mb": need})
        waiting = sum(len(self.registry.waiters(m)) for m in self._load_queue)
        if waiting >= self.sup.max_load_queue:
            raise Overloaded(f"{waiting} requests already wait for room to load a model "
                             f"(max_load_queue {self.sup.max_load_queue})",
                             data={"model": slot.name, "waiting": waiting})
        self._load_queue.append(slot.name)
        self._serve_load_queue(time.monotonic())

    def _serve_load_queue(self, now: float) -> None:
        """Load the queued models in order, each once there is room for it (and once
        its own workers, if an unload is stopping them, have exited)."""
        for name in list(self._load_queue):
            slot = self.models.get(name)
            if slot is None or slot.up or (not self.registry.waiters(name)
                                           and not slot.forced):
                self._load_queue.remove(name)  # loaded, removed, or nobody waits
                continue
            if slot.resident:
                continue  # still stopping (evicted just before it was asked for)
            plan = plan_load(self._residents(now, slot.name), self._need_mb(slot),
                             max_models=self.sup.max_loaded_models,
                             budget_mb=self.sup.memory_budget_mb)
            if plan is None:
                return  # every model in the way is busy or pinned: wait
            for victim in plan.evict:
                log.info("unloading %s to make room for %s", victim, slot.name)
                self._unload(self.models[victim], f"evicted for {slot.name} (least "
                                                  "recently used)")
            if not plan.ready:
                return  # room is being made: load when they have exited
            log.info("loading %s on demand", slot.name)
            self._load(slot)

    def _unload(self, slot: ModelSlot, why: str) -> None:
        """Stop every replica of a model (draining first); it becomes ``unloaded``."""
        if slot.name in self._load_queue:
            self._load_queue.remove(slot.name)
        slot.keep_alive_override = None
        slot.rolling = []
        for h in slot.handles:
            if h.stopping is None:
                self._stop_worker(h, why)
        self._notify()

    def _roll(self, slot: ModelSlot) -> None:
        """Restart the next replica of a changed model once the previous one is back."""
        if not slot.rolling:
            return
        if any(h.state in ("starting", "restarting", "stopping") for h in slot.handles):
            return  # one at a time: wait until the last one is ready again
        r = slot.rolling.pop(0)
        h = slot.handles[r]
        h.model = slot.config
        if h.proc is not None:
            self._stop_worker(h, "configuration changed (reload)", respawn=True)

    def _on_exit(self, h: WorkerHandle, reason: str) -> None:
        detail = crash_detail(h.log_tail)
        if h.load_error:
            reason = f"{reason}: load failed: {h.load_error}"
        elif detail:
            reason = f"{reason} ({detail})"
        h.last_exit = reason
        h.endpoint = None
        h.ready_at = None
        h.inflight = 0
        self.registry.unregister(h.model.name, h.generation)
        self._by_generation.pop(h.generation, None)
        if self._shutting_down:
            h.state = "stopped"
            log.info("worker %s stopped: %s", self._label(h), reason)
            self._notify()
            return
        if h in self._retiring:
            self._retiring.remove(h)
            h.state = "stopped"
            log.info("worker %s retired: %s", self._label(h), reason)
            self._notify()
            return
        if h.stopping is not None:
            log.info("worker %s stopped (%s): %s", self._label(h), h.stopping, reason)
            h.state = "unloaded"
            h.stopping = None
            if h.respawn:
                h.restarts = 0
                h.crash_times = ()
                self._spawn(h)
            self._notify()
            return
        now = time.monotonic()
        decision = self.policy.decide(h.crash_times, now, load_failed=bool(h.load_error))
        h.crash_times = decision.history
        if isinstance(decision, GiveUp):
            h.state = "failed"
            log.error("worker %s failed (%s); last exit: %s", self._label(h), decision.reason,
                      reason)
            slot = self.models.get(h.model.name)
            if slot is not None and all(x.state == "failed" for x in slot.handles):
                slot.failed_at = now
                self._answer_all(self.registry.fail(h.model.name, self._failed_error(h)))
        else:
            h.state = "restarting"
            h.next_start_at = now + decision.delay
            h.restarts += 1
            log.warning("worker %s exited (%s); restart %d in %.2fs", self._label(h), reason,
                        h.restarts, decision.delay)
        self._notify()

    def _failed_error(self, h: WorkerHandle) -> WorkerFailed:
        return WorkerFailed(f"model {h.model.name} failed: {h.last_exit}",
                            data=h.state_data())

    def _tick_service(self, s: ServiceHandle, now: float) -> None:
        if s.proc is None:
            if s.next_start_at is not None and now >= s.next_start_at \
                    and not self._shutting_down:
                self._spawn_service(s)
            return
        silent = now - s.last_heartbeat
        kill = None
        if s.proc.poll() is not None:
            if not s.proc.output_pending(now):
                reason = s.proc.reap()
                s.proc = None
                self._on_service_exit(s, reason)
        elif s.kill_reason is not None:
            pass  # killed: its exit is due
        elif silent > self.sup.heartbeat_timeout:
            kill = f"no heartbeat for {silent:.1f}s"
        elif s.state != "ready" and now - s.started_at > self.sup.startup_timeout:
            kill = f"not ready after {self.sup.startup_timeout:.0f}s"
        if kill is not None and s.proc is not None:
            log.warning("killing %s service (pid %s): %s", s.name, s.pid, kill)
            s.proc.kill(kill)

    def _on_service_exit(self, s: ServiceHandle, reason: str) -> None:
        detail = crash_detail(s.log_tail)
        s.last_exit = f"{reason} ({detail})" if detail else reason
        s.ready_at = None
        if self._shutting_down:
            s.state = "stopped"
            self._notify()
            return
        now = time.monotonic()
        decision = self.policy.decide(s.crash_times, now)
        s.crash_times = decision.history
        if isinstance(decision, GiveUp):
            s.state = "failed"
            log.error("%s service failed (%s); last exit: %s", s.name, decision.reason,
                      s.last_exit)
        else:
            s.state = "restarting"
            s.next_start_at = now + decision.delay
            s.restarts += 1
            log.warning("%s service exited (%s); restart %d in %.2fs", s.name, s.last_exit,
                        s.restarts, decision.delay)
        self._notify()

    # -- live reload -------------------------------------------------------------------------
    def _apply_reload(self, req: _ReloadRequest) -> None:
        try:
            new = req.config if req.config is not None else self._read_config()
            req.outcome = self._apply(new)
            log.info("reloaded: added %s, removed %s, changed %s", req.outcome.added or "-",
                     req.outcome.removed or "-", req.outcome.changed or "-")
        except (LlamafleetError, ConfigError) as exc:
            log.error("reload refused, the fleet is unchanged: %s", exc)
            req.outcome = exc
        except Exception as exc:  # a bug: refuse the reload, keep serving
            log.exception("reload failed")
            req.outcome = InternalError(f"reload failed: {type(exc).__name__}: {exc}")
        req.done.set()
        self._notify()

    def _read_config(self) -> Config:
        if self.config_path is None:
            raise NotSupported("this supervisor was not started from a configuration file: "
                               "pass the new Config to Supervisor.reload()")
        return Config.load(self.config_path)

    def _apply(self, new: Config) -> protocol.Reloaded:
        """Check ``new`` whole, then apply the difference (nothing applied on error)."""
        if new.supervisor != self.sup:
            diff = [f.name for f in dataclass_fields(SupervisorConfig)
                    if getattr(new.supervisor, f.name) != getattr(self.sup, f.name)]
            raise ConfigError(f"[supervisor] {', '.join(diff)} changed: restart the fleet "
                              "to change the supervisor's settings (reload applies [models])")
        if new.http != self.config.http:
            raise ConfigError("[http] changed: restart the fleet to change the gateway "
                              "(reload applies [models])")
        new.check()  # a Config built by hand has not been through Config.load
        out = protocol.Reloaded()
        for name in [n for n in self.models if n not in new.models]:
            out.removed.append(name)
            slot = self.models.pop(name)
            if name in self._load_queue:
                self._load_queue.remove(name)
            self._answer_all(self.registry.remove(name))
            for h in slot.handles:
                self._retire(h, "removed from the configuration (reload)")
        for name, m in new.models.items():
            existing = self.models.get(name)
            if existing is None:
                out.added.append(name)
                self.models[name] = added = self._slot(m)
                self.registry.add(name)
                if not m.on_demand:
                    self._load(added)
                continue
            if existing.config.to_dict() == m.to_dict():
                out.unchanged.append(name)
                continue
            out.changed.append(name)
            self._change(existing, m)
        self.config = Config(supervisor=self.sup, models=dict(new.models),
                             http=self.config.http, source=self.config.source)
        self._notify()
        return out

    def _change(self, slot: ModelSlot, m: ModelConfig) -> None:
        """Apply a model's new table: lifecycle keys at once, the rest replica by replica."""
        restart = slot.config.worker_identity() != m.worker_identity()
        slot.config = m
        keep = slot.handles[:m.replicas]
        for h in slot.handles[m.replicas:]:
            self._retire(h, "replica removed (reload)")
        for r in range(len(keep), m.replicas):
            state = "starting" if slot.resident else "unloaded"
            h = WorkerHandle(model=m, replica=r, state=state)
            keep.append(h)
            if state == "starting":
                self._spawn(h)
        slot.handles = keep
        for h in keep:
            if not h.resident:
                h.model = m  # not running: the next start uses the new table
        if restart:
            slot.rolling = [h.replica for h in keep if h.resident and h.model is not m]
        else:
            for h in keep:
                h.model = m
        if m.on_demand and self.registry.failed(slot.name):  # the next request tries it
            self._forgive(slot)
        if not m.on_demand and not slot.resident:
            self._load(slot)

    def _forgive(self, slot: ModelSlot) -> None:
        """Forget that a model failed: it is ``unloaded``, and the next load tries it."""
        self.registry.clear_failure(slot.name)
        for h in slot.handles:
            if h.state == "failed":
                h.state = "unloaded"

    def _retire(self, h: WorkerHandle, why: str) -> None:
        if h.proc is None:
            h.state = "stopped"
            return
        self._retiring.append(h)
        self._stop_worker(h, why)

    # -- messages ------------------------------------------------------------------------
    def _on_event(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return
        try:
            ev = protocol.decode_event(frames[1])
        except ProtocolError:
            return
        if isinstance(ev, protocol.ServiceBeat):
            self._on_service_beat(ev)
            return
        assert isinstance(ev, (protocol.Hello, protocol.Heartbeat))
        h = self._by_generation.get(ev.generation)
        if h is None or h.model.name != ev.model or h.proc is None:
            return  # a predecessor still shutting down, or a stranger
        h.last_heartbeat = now = time.monotonic()
        if not isinstance(ev, protocol.Heartbeat):
            return
        h.load_progress = float(ev.load_progress or 0.0)
        inflight, progress = int(ev.inflight or 0), int(ev.progress or 0)
        if progress != h.progress or inflight == 0 or h.inflight == 0:
            h.progress_at = h.last_heartbeat
        slot = self.models.get(h.model.name)
        if slot is not None and h not in self._retiring and (
                inflight or int(ev.requests or 0) != h.requests):
            slot.touch(now)
        if slot is not None and ev.keep_alive is not None and \
                ev.keep_alive != h.requested_keep_alive:
            h.requested_keep_alive = slot.keep_alive_override = float(ev.keep_alive)
        h.inflight, h.progress, h.requests = inflight, progress, int(ev.requests or 0)
        h.rss_mb = rss_mb(h.pid)
        if ev.state == "error" and h.load_error is None:
            h.load_error = str(ev.error or "unknown error")
        elif ev.state == "ready" and h.state in ("starting", "restarting") and ev.endpoint:
            h.state = "ready"
            h.ready_at = now
            h.endpoint = ev.endpoint
            if slot is not None and h.rss_mb:
                slot.measured_mb = max(slot.measured_mb or 0.0, h.rss_mb)
            log.info("worker %s ready (pid %s) on %s", self._label(h), h.pid, h.endpoint)
            if h not in self._retiring:
                self._answer_all(self.registry.register(h.published()))
            self._notify()

    def _on_service_beat(self, ev: protocol.ServiceBeat) -> None:
        s = self.services.get(ev.name)
        if s is None or ev.generation != s.generation or s.proc is None:
            return
        s.last_heartbeat = time.monotonic()
        if ev.state == "ready" and s.state in ("starting", "restarting"):
            s.state = "ready"
            s.ready_at = s.last_heartbeat
            log.info("%s service ready (pid %s) on %s", s.name, s.pid, s.url)
            self._notify()

    def _on_control(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return
        peer, payload = frames
        req_id: Any = None
        try:
            req_id, cmd, args = protocol.parse_request(payload)
            if protocol.COMMANDS[cmd].target != "supervisor":
                raise NotFound(f"{cmd} is a worker command; look the model up first")
            if cmd == "status":
                self._reply(peer, protocol.result(req_id, protocol.FleetStatus(
                    workers=self.status(), address=self.address, pid=os.getpid(),
                    services=self.service_status())))
            elif cmd == "shutdown":
                self._reply(peer, protocol.result(req_id, protocol.Stopping()))
                self._request_stop()
            elif cmd in ("lookup", "load"):
                self._lookup(peer, req_id, cmd, args)
            elif cmd == "unload":
                self.registry.check(args["model"])
                if not self.registry.local(args["model"]):
                    raise BadRequest(f"model {args['model']} runs on another node: unload "
                                     "it through that node's supervisor",
                                     data={"model": args["model"]})
                self._unload(self.models[args["model"]], "unloaded by request")
                self._reply(peer, protocol.result(req_id, protocol.Empty()))
            elif cmd == "reload":
                req = _ReloadRequest(None)
                self._apply_reload(req)
                if isinstance(req.outcome, ConfigError):
                    raise BadRequest(f"reload refused, the fleet is unchanged: {req.outcome}",
                                     data={"config": str(self.config_path)})
                if isinstance(req.outcome, LlamafleetError):
                    raise req.outcome
                assert isinstance(req.outcome, protocol.Reloaded)
                self._reply(peer, protocol.result(req_id, req.outcome))
        except LlamafleetError as exc:
            if req_id is None:
                req_id = exc.data.pop("id", None)
            self._reply_error(peer, req_id, exc)

    def _lookup(self, peer: bytes, req_id: Any, cmd: str, args: dict[str, Any]) -> None:
        """``lookup`` (loading an unloaded model when the caller waits) and ``load``."""
        name = args["model"]
        self.registry.check(name)
        now = time.monotonic()
        if not self.registry.local(name):  # another node serves it: nothing to load here
            found = self.registry.lookup(name, (peer, req_id), now, args["wait_ms"],
                                         args.get("exclude", ()))
            if found is not None:
                self._reply(peer, protocol.result(req_id, found))
            return
        slot = self.models[name]
        if self.registry.failed(name) and (cmd == "load" or (
                slot.config.on_demand and args["wait_ms"] > 0
                and now - slot.failed_at >= self.sup.failed_retry_s)):
            log.info("trying failed model %s again (%s)", name,
                     "load" if cmd == "load" else f"failed {now - slot.failed_at:.0f}s ago")
            self._forgive(slot)
        if cmd == "load" and args["wait_ms"] == 0:  # start it; answer with what is ready
            if not slot.up:
                slot.forced = True
                self._request_load(slot)
            self._reply(peer, protocol.result(req_id, protocol.ModelEndpoints(
                model=name, endpoints=self.registry.endpoints(name),
                replicas=self.registry.replicas(name))))
            return
        # the wait is registered first: the load queue serves models somebody waits for
        found = self.registry.lookup(name, (peer, req_id), now, args["wait_ms"],
                                     args.get("exclude", ()))
        if found is not None:
            slot.touch(now)
            self._reply(peer, protocol.result(req_id, found))
        elif not slot.up:
            slot.forced = slot.forced or cmd == "load"
            try:
                self._request_load(slot)
            except LlamafleetError as exc:
                self._answer_all(self.registry.refuse(name, exc))

    def _answer_all(self, answers: list[tuple[Waiter, Answer]]) -> None:
        """Deliver the answers of ended lookups (from the registry)."""
        now = time.monotonic()
        for waiter, answer in answers:
            peer, req_id = waiter.token  # what _on_control gave the registry
            if isinstance(answer, LlamafleetError):
                self._reply_error(peer, req_id, answer)
            else:
                slot = self.models.get(answer.model)
                if slot is not None:
                    slot.touch(now)
                self._reply(peer, protocol.result(req_id, answer))

    def _reply(self, peer: bytes, data: bytes) -> None:
        try:
            self._control.send_multipart([peer, data], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the client is gone

    def _reply_error(self, peer: bytes, req_id: Any, err: LlamafleetError) -> None:
        self._reply(peer, protocol.error(req_id, err))

    # -- shutdown -------------------------------------------------------------------------
    def _shutdown(self, poller: zmq.Poller, pidfds: set[int]) -> None:
        self._shutting_down = True
        log.info("stopping %d worker(s) (grace %.1fs)",
                 sum(1 for h in self.handles() if h.proc is not None), self.sup.shutdown_grace)
        self._answer_all(self.registry.shutdown())
        for req in self._reloads:
            req.outcome = ShuttingDown("the supervisor is shutting down")
            req.done.set()
        for s in self.services.values():
            if s.proc is not None:
                s.proc.terminate()
            elif s.state != "failed":
                s.state = "stopped"
        for h in self.handles():
            if h.proc is not None:
                h.proc.terminate()
            elif h.state != "failed":
                h.state = "stopped"
        deadline = time.monotonic() + self.sup.shutdown_grace
        while any(h.proc for h in self._children()):
            left_ms = int((deadline - time.monotonic()) * 1000) + 1
            if left_ms <= 0:
                break
            pidfds = self._step(poller, pidfds, min(self._poll_ms(), left_ms))
        for child in self._children():
            if child.proc is not None:
                child.proc.kill("did not stop within the shutdown grace period")
                child.proc.reap()
                child.proc = None
                child.state = "stopped"

    def _kill_all(self) -> None:
        for h in self._children():
            if h.proc is not None:
                h.proc.kill()
                h.proc.reap()
                h.proc = None

    def _cleanup(self) -> None:
        for s in (getattr(self, "_control", None), getattr(self, "_events", None)):
            if s is not None:
                s.close(linger=0)
        for addr in (self.address, self.events_address):
            if addr.startswith("ipc://"):
                Path(addr[6:]).unlink(missing_ok=True)
        for slot in self.models.values():
            for r in range(slot.config.replicas):
                ep = self.config.worker_endpoint(slot.name, r)
                if ep.startswith("ipc://"):
                    Path(ep[6:]).unlink(missing_ok=True)
        for s in self.services.values():
            s.close()
        auth = getattr(self, "_auth", None)
        if auth is not None:
            auth.stop()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._ctx.term()
        log.info("supervisor stopped")


@dataclass
class _ReloadRequest:
    """A reload asked for from another thread (or SIGHUP): ``config`` None re-reads
    the file; the loop sets ``outcome`` and then ``done``."""

    config: Config | None
    outcome: protocol.Reloaded | LlamafleetError | ConfigError | None = None
    done: threading.Event = field(default_factory=threading.Event)



def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, OSError):
        pass


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
