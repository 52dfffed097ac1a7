"""The worker process: one model, one backend, one ZeroMQ ROUTER socket.

Life cycle: connect to the supervisor's event socket and start heartbeating
(state ``loading`` with progress), load the backend, bind the client endpoint,
report ``ready`` with the endpoint, then serve until SIGTERM (drain) or until
the supervisor disappears (exit at once).
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import select
import signal
import sys
import threading
import time
from collections import deque
from typing import Any

import zmq

from llamafleet.backends import Backend, get_backend
from llamafleet.runtime import protocol
from llamafleet.runtime.errors import (
    BadRequest,
    InternalError,
    LlamafleetError,
    NotSupported,
    RequestTimeout,
    ShuttingDown,
)
from llamafleet.runtime.process import set_parent_death_signal
from llamafleet.runtime.protocol import WorkerSpec
from llamafleet.runtime.sampling import SamplingParams
from llamafleet.runtime.tcp import keepalive
from llamafleet.worker.draft_model import DraftModel, check_vocabularies, draft_options
from llamafleet.worker.generation import Generation
from llamafleet.worker.handlers import HANDLERS, SEQ_COMMANDS
from llamafleet.worker.prefix_cache import PrefixCache
from llamafleet.worker.scheduler import Outgoing, Scheduler
from llamafleet.worker.speculative import SpecConfig

log = logging.getLogger("llamafleet.worker")

#: Messages read from the socket per loop turn while generations are running,
#: so a flood of requests cannot starve token production.
MAX_MESSAGES_PER_TURN = 64
#: How often the watcher thread looks while an abort time or a shutdown is pending (s);
#: otherwise it sleeps until the next heartbeat, a signal or a kick.
WATCH_INTERVAL = 0.05
#: Soonest a heartbeat follows the last one when only activity changed (s): work
#: started or ended, or requests arrived. The supervisor's eviction and keep_alive
#: act on the news at once instead of a heartbeat interval later.
ACTIVITY_BEAT = 0.05
#: the main loop's longest wait when no work is queued (milliseconds)
IDLE_WAIT_MS = 1000
#: ``EVENTS`` and ``POLLIN`` as plain ints (pyzmq's enums cost a microsecond an operation)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
#: how often replies queued for a client that is not reading are offered again (ms)
OUTBOX_RETRY_MS = 20
#: replies one client may leave unread before it counts as stalled at once (bytes);
#: its generations are paused, so only replies to other commands can grow this far
OUTBOX_MAX_BYTES = 64 << 20
#: how long the final errors of a stalled client wait for it to read again before its
#: outbox is dropped (s; at least stall_timeout_s). A client that disconnects is seen
#: at once (EHOSTUNREACH); this frees one whose connection stays up but never reads
STALLED_KEEP_S = 60.0


class Outbox:
    """Replies to one client that its socket would not take (``zmq.Again``: the
    client is not reading). They go out in order, before any later reply."""

    __slots__ = ("frames", "size", "since", "stalled")

    def __init__(self, now: float) -> None:
        self.frames: deque[bytes] = deque()
        self.size = 0
        #: when the client last took a reply (or the first one was queued)
        self.since = now
        #: its generations were cancelled for not reading (stall_timeout_s)
        self.stalled = False

    def push(self, data: bytes) -> None:
        self.frames.append(data)
        self.size += len(data)


class Worker:
    """Serves one model. ``run()`` blocks until the worker stops."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.ctx: zmq.Context[Any] = zmq.Context.instance()
        self.backend: Backend | None = None
        self.state = "loading"
        self.load_progress = 0.0
        self.endpoint: str | None = None
        self.error: str | None = None
        self.progress = 0          # completed units of work (for the progress watchdog)
        self.requests = 0          # requests received (the supervisor sees activity)
        #: the keep_alive the latest request asked for (reported in heartbeats)
        self.requested_keep_alive: float | None = None
        self.scheduler: Scheduler | None = None
        self.cache: PrefixCache | None = None
        #: the draft_model's backend (speculative = "draft"), loaded with the model
        self.draft_model: DraftModel | None = None
        self.default_sampling: dict[str, Any] = {}
        self._gone: set[tuple[bytes, int]] = set()  # requests whose client disconnected
        #: replies waiting for clients that are not reading (see Outbox)
        self._outbox: dict[bytes, Outbox] = {}
        self.stall_timeout = 30.0  # set at load (worker option stall_timeout_s)
        self.n_seq_max = 0  # set at load
        self._draining = False
        self._sigterm_at: float | None = None
        self._parent = os.getppid()
        self._state_changed = threading.Event()
        #: the activity the last heartbeat reported: (work in flight, requests)
        self._reported = (False, 0)
        #: the activity changed since: beat within ACTIVITY_BEAT
        self._activity = threading.Event()
        # wakes the watcher thread at once (state change, abort deadline armed)
        self._kick_r, self._kick_w = os.pipe()
        # wakes the main loop out of its idle wait (SIGTERM, a published result)
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._kick_r, self._kick_w, self._wake_r, self._wake_w):
            os.set_blocking(fd, False)

    # -- entry point -------------------------------------------------------
    def run(self) -> int:
        set_parent_death_signal()
        signal.signal(signal.SIGTERM, self._on_sigterm)
        # The Python handler only runs between bytecodes: during a long native
        # decode it is deferred. The wakeup fd is written at once, so the watcher
        # thread sees SIGTERM and can abort the decode.
        self._sig_r, sig_w = os.pipe()
        os.set_blocking(self._sig_r, False)
        os.set_blocking(sig_w, False)
        signal.set_wakeup_fd(sig_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides
        hb = threading.Thread(target=self._watch_loop, name="watcher", daemon=True)
        hb.start()
        try:
            self._load()
        except LlamafleetError as exc:
            log.error("model %s failed to load: %s", self.spec.model, exc.message)
            self._set_state("error", error=exc.message)
            time.sleep(self.spec.heartbeat_interval * 2)  # let the supervisor hear it
            return 2
        try:
            self._serve()
        finally:
            self._set_state("draining")
            if self.draft_model is not None:
                self.draft_model.backend.close()
            if self.backend is not None:
                self.backend.close()
        return 0

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._draining = True
        if self._sigterm_at is None:
            self._sigterm_at = time.monotonic()
        try:
            os.write(self._wake_w, b"t")
        except OSError:
            pass

    def _hard_stop(self) -> float | None:
        """When in-flight work must be abandoned: shortly before the supervisor's SIGKILL."""
        if self._sigterm_at is None:
            return None
        return self._sigterm_at + max(0.0, self.spec.shutdown_grace * 0.8 - 0.2)

    def _set_state(self, state: str, error: str | None = None) -> None:
        self.state = state
        if error is not None:
            self.error = error
        self._state_changed.set()
        self._kick()

    def _wake(self) -> None:
        """Get the main loop out of its wait (from any thread)."""
        try:
            os.write(self._wake_w, b"w")
        except OSError:
            pass  # a wake-up is already pending

    def _kick(self) -> None:
        try:
            os.write(self._kick_w, b"k")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending

    # -- the watcher thread: heartbeats, parent death, signals, aborts ---------
    def _watch_loop(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 500)
        sock.setsockopt(zmq.IDENTITY, f"{self.spec.model}:{self.spec.generation}".encode())
        sock.connect(self.spec.events_endpoint)
        sock.send(protocol.encode_event(protocol.Hello(
            model=self.spec.model, pid=os.getpid(), generation=self.spec.generation,
            replica=self.spec.replica)))
        interval = self.spec.heartbeat_interval
        next_beat = last_beat = 0.0
        while True:
            if os.getppid() != self._parent:
                # the supervisor is gone: nobody can restart or route to us
                os._exit(3)
            self._watch_signals()
            self._watch_abort()
            now = time.monotonic()
            active = self._activity.is_set() and now - last_beat >= ACTIVITY_BEAT
            if now >= next_beat or active or self._state_changed.is_set():
                self._state_changed.clear()
                self._activity.clear()
                next_beat, last_beat = now + interval, now
                inflight = self.scheduler.inflight() if self.scheduler else 0
                self._reported = (inflight > 0, self.requests)
                sock.send(protocol.encode_event(protocol.Heartbeat(
                    model=self.spec.model, pid=os.getpid(),
                    generation=self.spec.generation, state=self.state,
                    load_progress=self.load_progress, endpoint=self.endpoint,
                    error=self.error, progress=self.progress, inflight=inflight,
                    replica=self.spec.replica, requests=self.requests,
                    keep_alive=self.requested_keep_alive)))
            # Sleep until the next heartbeat unless something must be watched closely:
            # every wake-up takes a core from the decode threads. A signal (wakeup fd)
            # or a kick (state change, abort deadline armed) ends the sleep early.
            due = min(next_beat, last_beat + ACTIVITY_BEAT) if self._activity.is_set() \
                else next_beat
            timeout = max(0.0, due - time.monotonic())
            sched = self.scheduler
            if self._sigterm_at is not None or (sched is not None and sched.abort_at is not None):
                timeout = min(timeout, WATCH_INTERVAL)
            try:
                ready, _, _ = select.select([self._sig_r, self._kick_r], [], [], timeout)
            except InterruptedError:
                continue
            if self._kick_r in ready:
                try:
                    os.read(self._kick_r, 4096)
                except (BlockingIOError, OSError):
                    pass

    def _watch_signals(self) -> None:
        try:
            data = os.read(self._sig_r, 64)
        except (BlockingIOError, OSError):
            return
        if signal.SIGTERM in data:
            self._on_sigterm(signal.SIGTERM, None)

    def _watch_abort(self) -> None:
        """Raise the backend's abort flag when the running batch must stop."""
        b, sched = self.backend, self.scheduler
        if b is None or sched is None:
            return
        now = time.monotonic()
        stop = self._hard_stop()
        at = sched.abort_at
        if (stop is not None and now > stop) or (at is not None and now > at):
            b.abort(True)

    # -- loading -------------------------------------------------------------
    def _load(self) -> None:
        cls = get_backend(self.spec.backend)
        backend = cls(self.spec.options)

        def progress(fraction: float) -> None:
            self.load_progress = max(0.0, min(1.0, float(fraction)))

        backend.load(progress)
        self.backend = backend
        self.n_seq_max = backend.info().n_seq_max
        # the model file's recommendation, then the configuration's; requests override
        self.default_sampling = {**_usable(backend.default_sampling()), **self.spec.sampling}
        backend.set_default_sampling(self.sampling(None))
        opts = self.spec.worker_options
        if opts.get("speculative", "off") != "off" and \
                "speculative" not in backend.info().features:
            raise BadRequest(f"speculative = {opts['speculative']!r}: the "
                             f"{backend.name or type(backend).__name__} backend cannot "
                             "verify drafts")
        if opts.get("draft_model"):
            self.draft_model = self._load_draft(cls, backend, str(opts["draft_model"]))
        self.cache = self._make_cache(opts)
        self.stall_timeout = float(opts["stall_timeout_s"])
        self.scheduler = Scheduler(backend, send=self._send, cache=self.cache,
                                   max_queue=int(opts["max_queue"]),
                                   stream_interval=float(opts["stream_interval_ms"]) / 1000,
                                   wake_watcher=self._kick,
                                   paused=self._outbox.__contains__, wake=self._wake)
        self.load_progress = 1.0

    @staticmethod
    def _load_draft(cls: type[Backend], target: Backend, path: str) -> DraftModel:
        """Load the draft model on a backend like the target's (IncompatibleModels when
        its vocabulary differs)."""
        draft = cls(draft_options(target.options, path))
        draft.load()
        try:
            check_vocabularies(target, draft)
        except BaseException:
            draft.close()
            raise
        return DraftModel(draft)

    @staticmethod
    def _make_cache(opts: dict[str, Any]) -> PrefixCache | None:
        if not opts["prefix_cache"]:
            return None
        return PrefixCache(ram_bytes=int(opts["cache_ram_mb"]) << 20,
                           disk_dir=opts["cache_dir"],
                           disk_bytes=int(opts["cache_disk_mb"]) << 20,
                           min_tokens=int(opts["cache_min_tokens"]))

    def _send(self, peer: bytes, req_id: int, out: Outgoing) -> None:
        """The scheduler's outbox: a stream chunk, the final result or an error."""
        if isinstance(out, protocol.StreamChunk):
            data = protocol.chunk(req_id, out)
        elif isinstance(out, LlamafleetError):
            data = protocol.error(req_id, out)
        else:
            data = protocol.result(req_id, out)
        self.progress += 1
        if not self._deliver(peer, data) and isinstance(out, protocol.StreamChunk):
            self._gone.add((peer, req_id))  # nobody is listening: stop generating for it

    def _deliver(self, peer: bytes, data: bytes) -> bool:
        """Send one reply; False when the client has disconnected. A client that is
        not reading gets it later, in order (its outbox; its generations pause)."""
        box = self._outbox.get(peer)
        if box is None:
            try:
                self.sock.send_multipart([peer, data], zmq.NOBLOCK)
                return True
            except zmq.Again:
                log.info("a client is not reading its replies: queued, its generations "
                         "paused")
                box = self._outbox[peer] = Outbox(time.monotonic())
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EHOSTUNREACH:
                    return False
                raise
        box.push(data)  # its bound is checked by _flush_outboxes, outside the tick
        return True

    def _flush_outboxes(self) -> None:
        """Offer queued replies again; cancel the generations of a client that has
        read nothing for stall_timeout_s, and forget it after STALLED_KEEP_S more."""
        now = time.monotonic()
        for peer, box in list(self._outbox.items()):
            sent = False
            while box.frames:
                try:
                    self.sock.send_multipart([peer, box.frames[0]], zmq.NOBLOCK)
                except zmq.Again:
                    break
                except zmq.ZMQError as exc:
                    if exc.errno != zmq.EHOSTUNREACH:
                        raise
                    self._discard(peer, "disconnected")
                    break
                box.size -= len(box.frames.popleft())
                sent = True
            if self._outbox.get(peer) is not box:
                continue  # discarded
            if not box.frames:
                del self._outbox[peer]  # caught up: its generations resume
            elif box.size > OUTBOX_MAX_BYTES:
                why = f"left {box.size >> 20} MiB of replies unread"
                if box.stalled:
                    self._discard(peer, why)
                else:
                    self._stall(peer, box, why)
            elif sent:
                box.since = now
            elif not box.stalled and now - box.since > self.stall_timeout:
                self._stall(peer, box, f"did not read its replies for {self.stall_timeout:g} s")
            elif box.stalled and now - box.since > max(self.stall_timeout, STALLED_KEEP_S):
                self._discard(peer, "read nothing since its generations were cancelled")

    def _stall(self, peer: bytes, box: Outbox, why: str) -> None:
        """Cancel a client's generations; each error goes behind its queued replies."""
        box.stalled = True
        box.since = time.monotonic()  # the errors wait STALLED_KEEP_S for it
        sched = self.scheduler
        assert sched is not None

        def error(g: Generation) -> RequestTimeout:
            return RequestTimeout(f"client {why}: request {g.req_id} was cancelled",
                                  data={"tokens": g.tokens, "text": g.text.text,
                                        "stall_timeout_s": self.stall_timeout})

        ids = sched.fail_peer(peer, error)
        log.warning("a client %s: %d generation(s) cancelled", why, len(ids))

    def _discard(self, peer: bytes, why: str) -> None:
        """Forget a client's queued replies (it is gone, or never reads again)."""
        box = self._outbox.pop(peer, None)
        if self.scheduler is not None:
            self.scheduler.fail_peer(peer)  # nobody is listening
        if box is not None:
            log.warning("a client %s: %d queued repl(ies) discarded", why, len(box.frames))

    # -- serving -------------------------------------------------------------
    def _serve(self) -> None:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # replies to a vanished client fail (EHOSTUNREACH) instead of vanishing,
        # so the worker stops generating for it and frees its sequence
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        endpoint = self.spec.endpoint
        self._auth = None
        keepalive(sock, endpoint)
        if endpoint.startswith("tcp://"):
            if self.spec.curve_server_key and self.spec.curve_authorized_clients:
                from llamafleet.runtime import security
                self._auth = security.start_authenticator(self.ctx,
                                                          self.spec.curve_authorized_clients)
                security.make_server(sock, security.load_keypair(self.spec.curve_server_key))
            else:
                log.warning("INSECURE: %s accepts anyone who can connect (insecure_tcp)",
                            endpoint)
        if endpoint.startswith("ipc://"):
            path = endpoint[6:]
            if os.path.exists(path):
                os.unlink(path)  # stale socket of a crashed predecessor
        sock.bind(endpoint)
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.endpoint.startswith("ipc://"):
            os.chmod(self.endpoint[6:], 0o600)
        self.sock = sock
        self._set_state("ready")
        log.info("worker %s ready on %s", self.spec.model, self.endpoint)
        items = [(sock, _POLLIN), (self._wake_r, _POLLIN)]
        sched = self.scheduler
        assert sched is not None
        while True:
            stop_at = self._hard_stop()
            late = stop_at is not None and time.monotonic() > stop_at
            if self._draining and not sched.busy and (not self._outbox or late):
                break
            if late and sched.busy:
                sched.fail_all(ShuttingDown(f"worker {self.spec.model} stopped before the "
                                            "request finished"))
                break
            # idle, the loop sleeps until a message or SIGTERM arrives (or, while a
            # client is not reading, until its replies are due to be offered again)
            wait = 0 if sched.active else 50 if sched.busy else IDLE_WAIT_MS
            if self._outbox:
                wait = min(wait, OUTBOX_RETRY_MS)
            for ready, _ in zmq.zmq_poll(items, wait):
                if ready is sock:
                    # EVENTS, not recv until zmq.Again: no exception per wake-up
                    for _ in range(MAX_MESSAGES_PER_TURN):
                        if not sock.get(_EVENTS) & _POLLIN:
                            break
                        self._on_message(sock.recv_multipart(zmq.NOBLOCK))
                else:
                    try:
                        os.read(self._wake_r, 4096)
                    except OSError:
                        pass
            if self._outbox:
                self._flush_outboxes()  # before the tick: a client caught up resumes
            if sched.busy:
                try:
                    sched.tick()
                except Exception as exc:  # a bug: fail what runs, keep serving
                    log.exception("scheduler tick failed")
                    sched.fail_all(InternalError(f"{type(exc).__name__}: {exc}"))
                self.progress += 1
            if (sched.inflight() > 0, self.requests) != self._reported and \
                    not self._activity.is_set():
                self._activity.set()
                self._kick()
            while self._gone:
                key = self._gone.pop()
                if sched.cancel(key, notify=False):
                    log.info("client of request %s disconnected; generation stopped", key[1])
        sched.close()  # the publisher thread's last results, before the cache closes
        if self.cache is not None:
            self.cache.close()
        sock.close(linger=200)
        if self._auth is not None:
            self._auth.stop()

    def _on_message(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return  # not a DEALER request; nothing to answer to
        peer, payload = frames
        req_id: Any = None
        cmd: str | None = None
        self.requests += 1
        try:
            req_id, cmd, args = protocol.parse_request(payload)
            if protocol.COMMANDS[cmd].target != "worker":
                raise BadRequest(f"{cmd} is a supervisor command")
            if self._draining and cmd != "cancel":
                raise ShuttingDown(f"worker {self.spec.model} is shutting down")
            if cmd in SEQ_COMMANDS:
                self.check_seq(args["seq"])
            reply = HANDLERS[cmd](self, args, (peer, req_id))
            if reply is not None:  # None: the scheduler answers (generate)
                self.progress += 1
                self._deliver(peer, protocol.result(req_id, reply))
        except LlamafleetError as exc:
            if req_id is None:
                req_id = exc.data.pop("id", None)
            self._count_refused(cmd, exc)
            self._deliver(peer, protocol.error(req_id, exc))
        except Exception as exc:  # a bug: report it, keep serving
            log.exception("internal error handling a request")
            err = InternalError(f"{type(exc).__name__}: {exc}")
            self._count_refused(cmd, err)
            self._deliver(peer, protocol.error(req_id, err))

    def _count_refused(self, cmd: str | None, err: LlamafleetError) -> None:
        """A ``generate`` refused before the scheduler took it counts as failed
        (what the scheduler takes, it counts itself)."""
        if cmd == "generate" and self.scheduler is not None:
            self.scheduler.counters.failed(err.code)

    # -- commands --------------------------------------------------------------
    def loaded(self) -> tuple[Backend, Scheduler]:
        """The backend and scheduler (the worker serves only once both exist)."""
        assert self.backend is not None and self.scheduler is not None
        return self.backend, self.scheduler

    def sampling(self, raw: dict[str, Any] | None) -> SamplingParams:
        """A request's sampling over the model's defaults (the request wins; a request
        that constrains with grammar or json_schema replaces a default constraint)."""
        base = self.default_sampling
        if raw and (raw.get("grammar") is not None or raw.get("json_schema") is not None):
            base = {k: v for k, v in base.items() if k not in ("grammar", "json_schema")}
        return SamplingParams.from_dict({**base, **(raw or {})})

    def speculative(self, mode: str) -> SpecConfig | None:
        """How a generation asking for ``mode`` (protocol.SPECULATIVE_MODES) speculates:
        "model" follows the model's ``speculative`` option; None is off."""
        opts = self.spec.worker_options
        mode = mode.lower()
        if mode == "model":
            mode = str(opts.get("speculative") or "off")
        if mode == "off":
            return None
        b, _ = self.loaded()
        if "speculative" not in b.info().features:
            raise NotSupported(f"the {b.name or type(b).__name__} backend cannot verify "
                               "drafts (speculative decoding)")
        if mode == "draft" and self.draft_model is None:
            raise NotSupported(f"model {self.spec.model} has no draft_model")
        return SpecConfig(method=mode, draft_min=int(opts.get("draft_min") or 2),
                          draft_max=int(opts.get("draft_max") or 16), model=self.draft_model)

    def check_seq(self, seq: int) -> None:
        """Refuse a caller-managed sequence that is out of range or in use."""
        if seq >= self.n_seq_max:
            raise BadRequest(f"sequence {seq} out of range (n_seq_max={self.n_seq_max})")
        owner = self.scheduler.owner(seq) if self.scheduler else None
        if owner is not None:
            raise BadRequest(f"sequence {seq} is in use by running request {owner}")

    def confine(self, path: str, option: str) -> str:
        """Resolve a client-supplied path; refuse it outside the configured directories."""
        dirs = [os.path.realpath(d) for d in self.spec.worker_options.get(option) or []]
        if not dirs:
            raise BadRequest(f"no {option} configured for model {self.spec.model}: "
                             "file paths from requests are refused")
        if "\x00" in path:
            raise BadRequest("a path must not contain a NUL character")
        real = os.path.realpath(path)
        for d in dirs:
            if os.path.commonpath([real, d]) == d:
                if os.path.exists(real) and not os.path.isfile(real) and \
                        not os.path.isdir(real):
                    raise BadRequest(f"{path!r} is not a regular file")
                return real
        raise BadRequest(f"path {path!r} is outside the allowed directories ({option})")


def _usable(recommended: dict[str, Any]) -> dict[str, Any]:
    """The model file's sampling values that are valid; the rest skipped with a warning
    (advisory metadata never fails a load)."""
    out: dict[str, Any] = {}
    for key, value in recommended.items():
        try:
            SamplingParams.from_dict({key: value})
        except BadRequest as exc:
            log.warning("ignoring the model file's sampling %s=%r: %s", key, value, exc.message)
            continue
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m llamafleet.worker``; the spec comes in $LLAMAFLEET_WORKER_SPEC."""
    faulthandler.enable()  # a native crash prints a traceback the supervisor keeps
    spec = WorkerSpec.from_wire(json.loads(os.environ[protocol.WORKER_SPEC_ENV]))
    logging.basicConfig(level=spec.log_level.upper(),
                        format=f"%(asctime)s worker[{spec.model}] %(levelname)s %(message)s",
                        stream=sys.stderr)
    return Worker(spec).run()
