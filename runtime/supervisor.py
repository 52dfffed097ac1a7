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
import logging
import os
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from llamafleet.runtime import protocol
from llamafleet.runtime.config import Config, ModelConfig
from llamafleet.runtime.errors import (
    AlreadyRunning,
    LlamafleetError,
    NotFound,
    ProtocolError,
    Unavailable,
    WorkerFailed,
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
from llamafleet.runtime.registry import Answer, Registry, Waiter
from llamafleet.runtime.services import ServiceHandle, service_spec, services_of, spawn_service

__all__ = ["Supervisor", "WorkerHandle", "describe_exit", "LOG_TAIL_LINES",
           "LOG_DRAIN_TIMEOUT", "MAX_SLEEP", "EXIT_POLL"]

log = logging.getLogger("llamafleet.supervisor")

#: the loop's longest sleep when nothing is due (seconds)
MAX_SLEEP = 1.0
#: how often exits are polled for where pidfds are not available (seconds)
EXIT_POLL = 0.05


@dataclass
class WorkerHandle:
    """The supervisor's view of one model's worker (the child and its state)."""

    model: ModelConfig
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

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.running else None

    @property
    def kill_reason(self) -> str | None:
        return self.proc.kill_reason if self.proc is not None else None

    def state_data(self) -> dict[str, Any]:
        """The structured details of errors about this worker."""
        return {"model": self.model.name, "state": self.state, "restarts": self.restarts,
                "last_exit": self.last_exit, "load_progress": self.load_progress}

    def snapshot(self) -> dict[str, Any]:
        """This worker as ``status`` shows it (a protocol.WorkerStatus map)."""
        now = time.monotonic()
        return protocol.WorkerStatus(
            model=self.model.name, backend=self.model.backend, pid=self.pid,
            state=self.state, restarts=self.restarts, last_exit=self.last_exit,
            generation=self.generation, endpoint=self.endpoint,
            load_progress=round(self.load_progress, 3), inflight=self.inflight,
            uptime_s=round(now - self.ready_at, 3) if self.ready_at and
            self.state == "ready" else None,
            load_s=round(self.ready_at - self.started_at, 3) if self.ready_at else None
            ).to_wire()


class Supervisor:
    """Starts, watches and restarts the workers of a :class:`Config`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.sup = config.supervisor
        self.address = self.sup.control_address()
        self.events_address = f"ipc://{self.sup.runtime_dir / 'events.sock'}"
        self.workers: dict[str, WorkerHandle] = {
            name: WorkerHandle(model=m) for name, m in config.models.items()}
        self.policy = RestartPolicy.from_config(self.sup)
        #: the HTTP gateway and metrics endpoint (bound in start)
        self.services: dict[str, ServiceHandle] = {}
        self.registry = Registry(self.workers,
                                 describe=lambda name: self.workers[name].state_data())
        self._ctx = zmq.Context()
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None
        self._shutting_down = False
        self._changed = threading.Condition()
        # stop() and signal handlers wake the loop through this pipe; the loop
        # otherwise sleeps until its next deadline (no periodic polling)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        weakref.finalize(self, _close_fds, self._wake_r, self._wake_w)

    # -- public API ---------------------------------------------------------------
    def start(self) -> Supervisor:
        """Bind the sockets, spawn every worker and run the loop in a thread."""
        self._prepare()
        self._thread = threading.Thread(target=self._loop, name="llamafleet-supervisor",
                                        daemon=True)
        self._thread.start()
        return self

    def serve_forever(self, on_started: Callable[[Supervisor], None] | None = None) -> None:
        """Run in the calling (main) thread until SIGTERM/SIGINT, then shut down.
        ``on_started`` is called once the sockets are bound and the children started."""
        self._prepare()
        if on_started is not None:
            on_started(self)

        def on_signal(signum: int, frame: Any) -> None:
            log.info("received %s: shutting down", signal.Signals(signum).name)
            self._request_stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self._loop()

    def stop(self, timeout: float | None = None) -> None:
        """Graceful shutdown: refuse new lookups, drain workers, stop them."""
        self._request_stop()
        if self._thread is not None:
            grace = self.sup.shutdown_grace + 5.0
            self._thread.join(timeout if timeout is not None else grace)

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
        """One dict per worker: model, pid, state, restarts, last_exit, ..."""
        return [h.snapshot() for h in self.workers.values()]

    def _children(self) -> list[WorkerHandle | ServiceHandle]:
        """Every supervised child: the workers, then the services."""
        return [*self.workers.values(), *self.services.values()]

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
        """Block until the named (default: all) workers are ready.

        Raises WorkerFailed if one fails, Unavailable on timeout."""
        names = models or list(self.workers)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                states = {n: self.workers[n].state for n in names}
                if models is None:
                    states.update({f"service {s.name}": s.state
                                   for s in self.services.values()})
                failed = [n for n, s in states.items() if s == "failed"]
                if failed:
                    h = self.workers.get(failed[0])
                    if h is None:
                        s = self.services[failed[0].removeprefix("service ")]
                        raise WorkerFailed(f"service {s.name} failed: {s.last_exit}",
                                           data={"last_exit": s.last_exit})
                    raise WorkerFailed(f"model {h.model.name} failed: {h.last_exit}",
                                       data={"last_exit": h.last_exit})
                if all(s == "ready" for s in states.values()):
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Unavailable(f"workers not ready after {timeout}s: {states}")
                self._changed.wait(min(left, 0.1))

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
        self._control.bind(self.address)
        self._events.bind(self.events_address)
        for addr in (self.address, self.events_address):
            if addr.startswith("ipc://"):
                os.chmod(addr[6:], 0o600)
        if self.address.endswith(":0") or self.address.endswith(":*"):
            self.address = self._control.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("supervisor listening on %s (runtime dir %s)", self.address, rd)
        for h in self.workers.values():
            self._spawn(h)
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
    def _spawn(self, h: WorkerHandle) -> None:
        h.generation += 1
        h.state = "starting" if h.restarts == 0 else "restarting"
        h.endpoint = None
        h.load_progress = 0.0
        h.load_error = None
        h.next_start_at = None
        h.inflight = 0
        now = time.monotonic()
        h.started_at = h.last_heartbeat = h.progress_at = now
        try:
            h.proc = WorkerProcess.spawn(self._worker_spec(h), h.log_tail, self._wake)
        except OSError as exc:
            h.proc = None
            self._on_exit(h, f"could not start: {exc}")
            return
        log.info("started worker %s (pid %d, generation %d)", h.model.name, h.proc.pid,
                 h.generation)

    def _worker_spec(self, h: WorkerHandle) -> protocol.WorkerSpec:
        return protocol.WorkerSpec(
            model=h.model.name, backend=h.model.backend, options=h.model.options,
            endpoint=self.config.worker_endpoint(h.model.name),
            events_endpoint=self.events_address, generation=h.generation,
            heartbeat_interval=self.sup.heartbeat_interval, log_level=self.sup.log_level,
            shutdown_grace=self.sup.shutdown_grace, worker_options=h.model.worker,
            sampling=h.model.sampling, curve_server_key=self.sup.curve_server_key,
            curve_authorized_clients=self.sup.curve_authorized_clients)

    def _kill(self, h: WorkerHandle, reason: str) -> None:
        log.warning("killing worker %s (pid %s): %s", h.model.name, h.pid, reason)
        if h.proc is not None:
            h.proc.kill(reason)

    def _reap(self, h: WorkerHandle) -> str:
        """Wait for an exited worker process and forget it; returns its exit report."""
        assert h.proc is not None
        reason = h.proc.reap()
        h.proc = None
        return reason

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
        for h in self.workers.values():
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
        for h in self.workers.values():
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
        for s in self.services.values():
            self._tick_service(s, now)
        self._answer_all(self.registry.expire(now))

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

    def _on_exit(self, h: WorkerHandle, reason: str) -> None:
        detail = crash_detail(h.log_tail)
        if h.load_error:
            reason = f"{reason}: load failed: {h.load_error}"
        elif detail:
            reason = f"{reason} ({detail})"
        h.last_exit = reason
        h.endpoint = None
        h.ready_at = None
        self.registry.unregister(h.model.name, h.generation)
        if self._shutting_down:
            h.state = "stopped"
            log.info("worker %s stopped: %s", h.model.name, reason)
            self._notify()
            return
        now = time.monotonic()
        decision = self.policy.decide(h.crash_times, now, load_failed=bool(h.load_error))
        h.crash_times = decision.history
        if isinstance(decision, GiveUp):
            h.state = "failed"
            log.error("worker %s failed (%s); last exit: %s", h.model.name, decision.reason,
                      reason)
            self._answer_all(self.registry.fail(h.model.name, self._failed_error(h)))
        else:
            h.state = "restarting"
            h.next_start_at = now + decision.delay
            h.restarts += 1
            log.warning("worker %s exited (%s); restart %d in %.2fs", h.model.name, reason,
                        h.restarts, decision.delay)
        self._notify()

    def _failed_error(self, h: WorkerHandle) -> WorkerFailed:
        return WorkerFailed(f"model {h.model.name} failed: {h.last_exit}",
                            data=h.state_data())

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
        h = self.workers.get(ev.model)
        if h is None or ev.generation != h.generation or h.proc is None:
            return  # a predecessor still shutting down, or a stranger
        h.last_heartbeat = time.monotonic()
        if not isinstance(ev, protocol.Heartbeat):
            return
        h.load_progress = float(ev.load_progress or 0.0)
        inflight, progress = int(ev.inflight or 0), int(ev.progress or 0)
        if progress != h.progress or inflight == 0 or h.inflight == 0:
            h.progress_at = h.last_heartbeat
        h.inflight, h.progress = inflight, progress
        if ev.state == "error" and h.load_error is None:
            h.load_error = str(ev.error or "unknown error")
        elif ev.state == "ready" and h.state in ("starting", "restarting") and ev.endpoint:
            h.state = "ready"
            h.ready_at = time.monotonic()
            h.endpoint = ev.endpoint
            log.info("worker %s ready (pid %s) on %s", h.model.name, h.pid, h.endpoint)
            self._answer_all(self.registry.register(protocol.WorkerEndpoint(
                model=h.model.name, endpoint=ev.endpoint, generation=h.generation,
                pid=h.pid, backend=h.model.backend)))
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
            elif cmd == "lookup":
                found = self.registry.lookup(
                    args["model"], (peer, req_id), time.monotonic(), args["wait_ms"],
                    args["after_generation"])
                if found is not None:
                    self._reply(peer, protocol.result(req_id, found))
        except LlamafleetError as exc:
            if req_id is None:
                req_id = exc.data.pop("id", None)
            self._reply_error(peer, req_id, exc)

    def _answer_all(self, answers: list[tuple[Waiter, Answer]]) -> None:
        """Deliver the answers of ended lookups (from the registry)."""
        for waiter, answer in answers:
            peer, req_id = waiter.token  # what _on_control gave the registry
            if isinstance(answer, LlamafleetError):
                self._reply_error(peer, req_id, answer)
            else:
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
        log.info("stopping %d worker(s) (grace %.1fs)", len(self.workers),
                 self.sup.shutdown_grace)
        self._answer_all(self.registry.shutdown())
        for s in self.services.values():
            if s.proc is not None:
                s.proc.terminate()
            elif s.state != "failed":
                s.state = "stopped"
        for h in self.workers.values():
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
        for name in self.workers:
            ep = self.config.worker_endpoint(name)
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
