"""The supervisor: one worker process per model, watched and restarted.

It binds two sockets in the runtime directory: the control socket (clients ask
where a model's worker is, and for status) and the event socket (workers send
hello and heartbeats). A worker that exits, or misses heartbeats, is restarted
with exponential backoff; one that crashes more than ``max_restarts`` times in
``restart_window`` seconds (OTP's restart intensity) is marked ``failed`` with
its last exit reason, and the other models keep serving.

Use it from Python as a context manager, or run ``llamafleet serve``::

    with Supervisor(Config.load("fleet.toml")) as sup:
        sup.wait_ready()
        with sup.client() as client:
            print(client.generate("tiny", "Hello").text)
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import zmq

from runtime import protocol
from runtime.config import Config, ModelConfig
from runtime.errors import (LlamafleetError, NotFound, ProtocolError, ShuttingDown, Unavailable,
                            WorkerFailed)

log = logging.getLogger("llamafleet.supervisor")

_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
LOG_TAIL_LINES = 40
#: how long an exit report may wait for the worker's last output lines (seconds)
LOG_DRAIN_TIMEOUT = 2.0
#: the loop's longest sleep when nothing is due (seconds)
MAX_SLEEP = 1.0
#: how often exits are polled for where pidfds are not available (seconds)
EXIT_POLL = 0.05


def describe_exit(returncode: int) -> str:
    """A human description of a process exit status."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exit code {returncode}"


@dataclass
class WorkerHandle:
    """The supervisor's view of one model's worker."""

    model: ModelConfig
    state: str = "starting"
    proc: subprocess.Popen[bytes] | None = None
    generation: int = 0
    endpoint: str | None = None
    restarts: int = 0
    last_exit: str | None = None
    started_at: float = 0.0
    ready_at: float | None = None
    last_heartbeat: float = 0.0
    next_start_at: float | None = None
    crash_times: deque[float] = field(default_factory=deque)
    log_tail: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_TAIL_LINES))
    load_progress: float = 0.0
    load_error: str | None = None
    inflight: int = 0
    progress: int = 0
    progress_at: float = 0.0
    kill_reason: str | None = None
    #: a pidfd of ``proc`` (Linux >= 5.3): readable when it exits, so exits wake the loop
    pidfd: int | None = None
    #: set when the thread copying the worker's output into ``log_tail`` reached EOF
    log_eof: threading.Event | None = None
    #: when the exit was first seen while the pump was still reading the last output
    exited_at: float | None = None
    waiters: list[tuple[bytes, Any, float, int]] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"model": self.model.name, "backend": self.model.backend, "pid": self.pid,
                "state": self.state, "restarts": self.restarts, "last_exit": self.last_exit,
                "generation": self.generation, "endpoint": self.endpoint,
                "load_progress": round(self.load_progress, 3), "inflight": self.inflight,
                "uptime_s": round(now - self.ready_at, 3) if self.ready_at and
                self.state == "ready" else None}


class Supervisor:
    """Starts, watches and restarts the workers of a :class:`Config`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.sup = config.supervisor
        self.address = self.sup.control_address()
        self.events_address = f"ipc://{self.sup.runtime_dir / 'events.sock'}"
        self.workers: dict[str, WorkerHandle] = {
            name: WorkerHandle(model=m) for name, m in config.models.items()}
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
    def start(self) -> "Supervisor":
        """Bind the sockets, spawn every worker and run the loop in a thread."""
        self._prepare()
        self._thread = threading.Thread(target=self._loop, name="llamafleet-supervisor",
                                        daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Run in the calling (main) thread until SIGTERM/SIGINT, then shut down."""
        self._prepare()

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

    def __enter__(self) -> "Supervisor":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def status(self) -> list[dict[str, Any]]:
        """One dict per worker: model, pid, state, restarts, last_exit, ..."""
        return [h.snapshot() for h in self.workers.values()]

    def wait_ready(self, timeout: float = 60.0, models: list[str] | None = None) -> None:
        """Block until the named (default: all) workers are ready.

        Raises WorkerFailed if one fails, Unavailable on timeout."""
        names = models or list(self.workers)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                states = {n: self.workers[n].state for n in names}
                failed = [n for n, s in states.items() if s == "failed"]
                if failed:
                    h = self.workers[failed[0]]
                    raise WorkerFailed(f"model {h.model.name} failed: {h.last_exit}",
                                       data={"last_exit": h.last_exit})
                if all(s == "ready" for s in states.values()):
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Unavailable(f"workers not ready after {timeout}s: {states}")
                self._changed.wait(min(left, 0.1))

    def client(self, **kwargs: Any) -> Any:
        """A synchronous :class:`client.Client` connected to this supervisor."""
        from client import Client  # lazy: runtime does not depend on client
        return Client(self.address, **kwargs)

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
            raise RuntimeError(f"another supervisor is running in {rd}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        # Sockets left by a supervisor that died without cleaning up.
        for stale in rd.glob("*.sock"):
            stale.unlink(missing_ok=True)
        self._control = self._ctx.socket(zmq.ROUTER)
        self._events = self._ctx.socket(zmq.ROUTER)
        self._auth = None
        if self.address.startswith("tcp://"):
            if self.sup.curve:
                from runtime import security
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
            s.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
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

    # -- worker processes --------------------------------------------------------------
    def _spawn(self, h: WorkerHandle) -> None:
        h.generation += 1
        h.state = "starting" if h.restarts == 0 else "restarting"
        h.endpoint = None
        h.load_progress = 0.0
        h.load_error = None
        h.kill_reason = None
        h.next_start_at = None
        h.inflight = 0
        now = time.monotonic()
        h.started_at = h.last_heartbeat = h.progress_at = now
        try:
            h.proc = subprocess.Popen(
                [sys.executable, "-m", "worker"], env=self._worker_env(h),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                close_fds=True)
        except OSError as exc:
            h.proc = None
            self._on_exit(h, f"could not start: {exc}")
            return
        h.pidfd = _pidfd_open(h.proc.pid)
        log.info("started worker %s (pid %d, generation %d)", h.model.name, h.proc.pid,
                 h.generation)
        assert h.proc.stdout is not None
        h.log_eof = threading.Event()
        threading.Thread(target=self._pump_log, args=(h, h.proc.stdout, h.log_eof),
                         daemon=True, name=f"log-{h.model.name}").start()

    def _pump_log(self, h: WorkerHandle, stream: IO[bytes], eof: threading.Event) -> None:
        """Forward a worker's output to our log and keep its tail for exit reports."""
        wlog = logging.getLogger(f"llamafleet.worker.{h.model.name}")
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip()
            if line:
                h.log_tail.append(line)
                wlog.info("%s", line)
        stream.close()
        eof.set()
        self._wake()  # an exit report may be waiting for this

    def _worker_env(self, h: WorkerHandle) -> dict[str, str]:
        import json
        spec = {
            "model": h.model.name, "backend": h.model.backend,
            "options": h.model.options,
            "endpoint": self.config.worker_endpoint(h.model.name),
            "events_endpoint": self.events_address, "generation": h.generation,
            "heartbeat_interval": self.sup.heartbeat_interval,
            "log_level": self.sup.log_level,
            "shutdown_grace": self.sup.shutdown_grace,
            "curve_server_key": self.sup.curve_server_key,
            "curve_authorized_clients": self.sup.curve_authorized_clients,
            "worker_options": h.model.worker,
        }
        env = dict(os.environ)
        env["LLAMAFLEET_WORKER_SPEC"] = json.dumps(spec)
        env["PYTHONPATH"] = os.pathsep.join(
            [_PROJECT_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        return env

    # -- the loop ------------------------------------------------------------------------
    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._control, zmq.POLLIN)
        poller.register(self._events, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        pidfds: set[int] = set()
        try:
            while not self._stop.is_set():
                # exits (pidfds), messages and stop() wake the loop; otherwise it
                # sleeps until the next deadline it watches
                pidfds = self._watch_exits(poller, pidfds)
                for sock, _ in poller.poll(self._poll_ms()):
                    if not isinstance(sock, zmq.Socket):
                        if sock == self._wake_r:
                            _drain(self._wake_r)
                        continue  # a pidfd: _tick reaps the process
                    while True:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if sock is self._control:
                            self._on_control(frames)
                        else:
                            self._on_event(frames)
                self._tick()
            self._shutdown(poller, pidfds)
        except Exception:
            log.exception("supervisor loop crashed; stopping workers")
            self._kill_all()
            raise
        finally:
            self._cleanup()
            self._stopped.set()
            self._notify()

    def _watch_exits(self, poller: zmq.Poller, polled: set[int]) -> set[int]:
        """Keep the poller's pidfds in step with the live workers."""
        live = {h.pidfd for h in self.workers.values()
                if h.pidfd is not None and h.exited_at is None}
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
            if h.exited_at is not None:
                due = min(due, h.exited_at + LOG_DRAIN_TIMEOUT)
            elif h.proc is not None:
                if h.pidfd is None:
                    due = min(due, now + EXIT_POLL)  # no pidfd: poll for the exit
                due = min(due, h.last_heartbeat + self.sup.heartbeat_timeout)
                if h.state == "ready" and h.inflight:
                    due = min(due, h.progress_at + self.sup.progress_timeout)
                elif h.state in ("starting", "restarting"):
                    due = min(due, h.started_at + self.sup.startup_timeout)
            elif h.state == "restarting" and h.next_start_at is not None:
                due = min(due, h.next_start_at)
            for _, _, deadline, _ in h.waiters:
                due = min(due, deadline)
        return max(0, int((due - now) * 1000) + 1)

    def _reap(self, h: WorkerHandle) -> None:
        """Forget an exited (and waited-for) worker process."""
        h.proc = None
        if h.pidfd is not None:
            os.close(h.pidfd)
            h.pidfd = None

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
                    if not self._output_pending(h, now):  # else the pump wakes us later
                        h.proc.wait()
                        reason = h.kill_reason or describe_exit(rc)
                        self._reap(h)
                        self._on_exit(h, reason)
                        continue
                elif silent > self.sup.heartbeat_timeout and h.kill_reason is None:
                    self._kill(h, f"no heartbeat for {silent:.1f}s")
                elif (h.state == "ready" and h.inflight and h.kill_reason is None
                      and stuck > self.sup.progress_timeout):
                    # alive but wedged (llama.cpp can hang inside a decode)
                    self._kill(h, f"no progress for {stuck:.1f}s with {h.inflight} "
                                  "request(s) in flight")
                elif (h.state in ("starting", "restarting") and h.kill_reason is None
                      and now - h.started_at > self.sup.startup_timeout):
                    self._kill(h, f"not ready after {self.sup.startup_timeout:.0f}s")
            elif h.state == "restarting" and h.next_start_at is not None \
                    and now >= h.next_start_at:
                self._spawn(h)
            if h.waiters:
                keep = []
                for peer, req_id, deadline, after in h.waiters:
                    if now >= deadline:
                        self._reply_error(peer, req_id, Unavailable(
                            f"model {h.model.name} is {h.state}", data=self._state_data(h)))
                    else:
                        keep.append((peer, req_id, deadline, after))
                h.waiters = keep

    def _output_pending(self, h: WorkerHandle, now: float) -> bool:
        """Whether an exited worker's last output lines (a fatal error's traceback) are
        still being read: its pidfd reports the exit at once, before the pump is done."""
        if h.log_eof is None or h.log_eof.is_set():
            h.exited_at = None
            return False
        if h.exited_at is None:
            h.exited_at = now
        if now - h.exited_at < LOG_DRAIN_TIMEOUT:
            return True
        h.exited_at = None  # a stuck pipe: report without the rest
        return False

    def _kill(self, h: WorkerHandle, reason: str) -> None:
        log.warning("killing worker %s (pid %s): %s", h.model.name, h.pid, reason)
        h.kill_reason = reason
        if h.proc is not None:
            try:
                h.proc.kill()
            except ProcessLookupError:
                pass

    def _on_exit(self, h: WorkerHandle, reason: str) -> None:
        detail = _crash_detail(h.log_tail)
        if h.load_error:
            reason = f"{reason}: load failed: {h.load_error}"
        elif detail:
            reason = f"{reason} ({detail})"
        h.last_exit = reason
        h.endpoint = None
        h.ready_at = None
        if self._shutting_down:
            h.state = "stopped"
            log.info("worker %s stopped: %s", h.model.name, reason)
            self._notify()
            return
        now = time.monotonic()
        h.crash_times.append(now)
        while h.crash_times and now - h.crash_times[0] > self.sup.restart_window:
            h.crash_times.popleft()
        if h.load_error or len(h.crash_times) > self.sup.max_restarts:
            h.state = "failed"
            why = "its model cannot be loaded" if h.load_error else (
                f"{len(h.crash_times)} crashes within {self.sup.restart_window:.0f}s")
            log.error("worker %s failed (%s); last exit: %s", h.model.name, why, reason)
            for peer, req_id, _, _ in h.waiters:
                self._reply_error(peer, req_id, self._failed_error(h))
            h.waiters = []
        else:
            backoff = min(self.sup.restart_backoff_max,
                          self.sup.restart_backoff_initial * 2 ** (len(h.crash_times) - 1))
            h.state = "restarting"
            h.next_start_at = now + backoff
            h.restarts += 1
            log.warning("worker %s exited (%s); restart %d in %.2fs", h.model.name, reason,
                        h.restarts, backoff)
        self._notify()

    def _failed_error(self, h: WorkerHandle) -> WorkerFailed:
        return WorkerFailed(f"model {h.model.name} failed: {h.last_exit}",
                            data=self._state_data(h))

    @staticmethod
    def _state_data(h: WorkerHandle) -> dict[str, Any]:
        return {"model": h.model.name, "state": h.state, "restarts": h.restarts,
                "last_exit": h.last_exit, "load_progress": h.load_progress}

    # -- messages ------------------------------------------------------------------------
    def _on_event(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return
        ident, payload = frames
        try:
            msg = protocol.unpack(payload)
        except ProtocolError:
            return
        h = self.workers.get(msg.get("model"))  # type: ignore[arg-type]
        if h is None or msg.get("generation") != h.generation or h.proc is None:
            return  # a predecessor still shutting down, or a stranger
        h.last_heartbeat = time.monotonic()
        if msg.get("type") != "heartbeat":
            return
        h.load_progress = float(msg.get("load_progress") or 0.0)
        inflight = int(msg.get("inflight") or 0)
        progress = int(msg.get("progress") or 0)
        if progress != h.progress or inflight == 0 or h.inflight == 0:
            h.progress_at = h.last_heartbeat
        h.inflight, h.progress = inflight, progress
        wstate = msg.get("state")
        if wstate == "error" and h.load_error is None:
            h.load_error = str(msg.get("error") or "unknown error")
        elif wstate == "ready" and h.state in ("starting", "restarting"):
            h.state = "ready"
            h.ready_at = time.monotonic()
            h.endpoint = msg.get("endpoint")
            log.info("worker %s ready (pid %s) on %s", h.model.name, h.pid, h.endpoint)
            waiting = h.waiters
            h.waiters = [w for w in waiting if w[3] >= h.generation]
            for peer, req_id, _, after in waiting:
                if after < h.generation:
                    self._reply(peer, protocol.result(req_id, self._lookup_result(h)))
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
                self._reply(peer, protocol.result(req_id, {
                    "workers": self.status(), "address": self.address, "pid": os.getpid()}))
            elif cmd == "shutdown":
                self._reply(peer, protocol.result(req_id, {"stopping": True}))
                self._request_stop()
            elif cmd == "lookup":
                self._lookup(peer, req_id, args["model"], args["wait_ms"],
                             args["after_generation"])
        except LlamafleetError as exc:
            if req_id is None:
                req_id = exc.data.pop("id", None)
            self._reply_error(peer, req_id, exc)

    def _lookup(self, peer: bytes, req_id: Any, model: str, wait_ms: int,
                after_generation: int = 0) -> None:
        if self._shutting_down:
            raise ShuttingDown("the supervisor is shutting down")
        h = self.workers.get(model)
        if h is None:
            raise NotFound(f"no model named {model!r} (known: {', '.join(self.workers)})")
        if h.state == "ready" and h.generation > after_generation:
            self._reply(peer, protocol.result(req_id, self._lookup_result(h)))
        elif h.state == "failed":
            raise self._failed_error(h)
        elif wait_ms > 0:
            h.waiters.append((peer, req_id, time.monotonic() + wait_ms / 1000,
                              after_generation))
        else:
            raise Unavailable(f"model {model} is {h.state}", data=self._state_data(h))

    def _lookup_result(self, h: WorkerHandle) -> dict[str, Any]:
        return {"model": h.model.name, "endpoint": h.endpoint, "generation": h.generation,
                "pid": h.pid, "backend": h.model.backend}

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
        for h in self.workers.values():
            for peer, req_id, _, _ in h.waiters:
                self._reply_error(peer, req_id, ShuttingDown("the supervisor is shutting down"))
            h.waiters = []
            if h.proc is not None:
                try:
                    h.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
            elif h.state != "failed":
                h.state = "stopped"
        deadline = time.monotonic() + self.sup.shutdown_grace
        while time.monotonic() < deadline and any(h.proc for h in self.workers.values()):
            pidfds = self._watch_exits(poller, pidfds)
            for sock, _ in poller.poll(50):
                if not isinstance(sock, zmq.Socket):
                    if sock == self._wake_r:
                        _drain(self._wake_r)
                    continue
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                if sock is self._control:
                    self._on_control(frames)
                else:
                    self._on_event(frames)
            self._tick()
        for h in self.workers.values():
            if h.proc is not None:
                self._kill(h, "did not stop within the shutdown grace period")
                h.proc.wait()
                self._reap(h)
                h.state = "stopped"

    def _kill_all(self) -> None:
        for h in self.workers.values():
            if h.proc is not None:
                h.proc.kill()
                h.proc.wait()
                self._reap(h)

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
        if getattr(self, "_auth", None) is not None:
            self._auth.stop()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._ctx.term()
        log.info("supervisor stopped")


def _pidfd_open(pid: int) -> int | None:
    """A pidfd for ``pid`` (readable once it exits), or None where unsupported."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


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


def _crash_detail(tail: deque[str]) -> str | None:
    """The most telling line of a dead worker's output (native crash, traceback)."""
    lines = list(tail)
    for marker in ("Fatal Python error", "GGML_ASSERT", "terminate called", "error:"):
        for line in reversed(lines):
            if marker in line:
                return line.strip()[:300]
    for line in reversed(lines):
        if "Error" in line or "Exception" in line:
            return line.strip()[:300]
    return None
