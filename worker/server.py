"""The worker process: one model, one backend, one ZeroMQ ROUTER socket.

Life cycle: connect to the supervisor's event socket and start heartbeating
(state ``loading`` with progress), load the backend, bind the client endpoint,
report ``ready`` with the endpoint, then serve until SIGTERM (drain) or until
the supervisor disappears (exit at once).
"""

from __future__ import annotations

import ctypes
import faulthandler
import json
import logging
import os
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from backends import Backend, get_backend
from runtime import protocol
from runtime.errors import BadRequest, InternalError, LlamafleetError, NotFound, ShuttingDown
from runtime.sampling import SamplingParams
from worker.generation import Generation
from worker.scheduler import Scheduler

log = logging.getLogger("llamafleet.worker")

#: Messages read from the socket per loop turn while generations are running,
#: so a flood of requests cannot starve token production.
MAX_MESSAGES_PER_TURN = 64
#: How often the watcher thread looks while an abort time or a shutdown is pending (s);
#: otherwise it sleeps until the next heartbeat, a signal or a kick.
WATCH_INTERVAL = 0.05
#: the main loop's longest wait when no work is queued (milliseconds)
IDLE_WAIT_MS = 1000


@dataclass
class WorkerSpec:
    """What the supervisor tells a worker (passed as JSON in the environment)."""

    model: str
    backend: str
    options: dict[str, Any]
    endpoint: str
    events_endpoint: str
    generation: int = 0
    heartbeat_interval: float = 0.5
    log_level: str = "info"
    #: seconds the supervisor waits after SIGTERM before SIGKILL
    shutdown_grace: float = 10.0
    #: CURVE server certificate and authorized client keys (tcp:// endpoints)
    curve_server_key: str | None = None
    curve_authorized_clients: str | None = None
    #: worker-level settings (queue, prefix cache), see runtime.config.WORKER_OPTIONS
    worker_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, text: str) -> "WorkerSpec":
        return cls(**json.loads(text))

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


def _set_parent_death_signal() -> None:
    """Ask Linux to SIGKILL us when the supervisor dies (best effort)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Worker:
    """Serves one model. ``run()`` blocks until the worker stops."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.ctx = zmq.Context.instance()
        self.backend: Backend | None = None
        self.state = "loading"
        self.load_progress = 0.0
        self.endpoint: str | None = None
        self.error: str | None = None
        self.progress = 0          # completed units of work (for the progress watchdog)
        self.scheduler: Scheduler | None = None
        self.cache: Any = None
        self._gone: set[tuple[bytes, int]] = set()  # requests whose client disconnected
        self.n_seq_max = 1
        self._draining = False
        self._sigterm_at: float | None = None
        self._parent = os.getppid()
        self._state_changed = threading.Event()
        # wakes the watcher thread at once (state change, abort deadline armed)
        self._kick_r, self._kick_w = os.pipe()
        # wakes the main loop out of its idle wait (SIGTERM)
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._kick_r, self._kick_w, self._wake_r, self._wake_w):
            os.set_blocking(fd, False)

    # -- entry point -------------------------------------------------------
    def run(self) -> int:
        _set_parent_death_signal()
        signal.signal(signal.SIGTERM, self._on_sigterm)
        # The Python handler only runs between bytecodes: during a long native
        # decode it is deferred. The wakeup fd is written at once, so the watcher
        # thread sees SIGTERM and can abort the decode.
        self._sig_r, sig_w = os.pipe()
        os.set_blocking(self._sig_r, False)
        os.set_blocking(sig_w, False)
        signal.set_wakeup_fd(sig_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides
        hb = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
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

    def _kick(self) -> None:
        try:
            os.write(self._kick_w, b"k")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending

    # -- heartbeats ----------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 500)
        sock.setsockopt(zmq.IDENTITY, f"{self.spec.model}:{self.spec.generation}".encode())
        sock.connect(self.spec.events_endpoint)
        sock.send(protocol.event("hello", model=self.spec.model, pid=os.getpid(),
                                 generation=self.spec.generation))
        interval = self.spec.heartbeat_interval
        next_beat = 0.0
        while True:
            if os.getppid() != self._parent:
                # the supervisor is gone: nobody can restart or route to us
                os._exit(3)
            self._watch_signals()
            self._watch_abort()
            now = time.monotonic()
            if now >= next_beat or self._state_changed.is_set():
                self._state_changed.clear()
                next_beat = now + interval
                sock.send(protocol.event(
                    "heartbeat", model=self.spec.model, pid=os.getpid(),
                    generation=self.spec.generation, state=self.state,
                    load_progress=self.load_progress, endpoint=self.endpoint,
                    error=self.error, progress=self.progress,
                    inflight=self.scheduler.inflight() if self.scheduler else 0))
            # Sleep until the next heartbeat unless something must be watched closely:
            # every wake-up takes a core from the decode threads. A signal (wakeup fd)
            # or a kick (state change, abort deadline armed) ends the sleep early.
            timeout = max(0.0, next_beat - time.monotonic())
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
        self.cache = self._make_cache()
        self.scheduler = Scheduler(backend, send=self._send, cache=self.cache,
                                   max_queue=int(self.spec.worker_options.get("max_queue", 64)),
                                   stream_interval=float(self.spec.worker_options.get(
                                       "stream_interval_ms", 50)) / 1000,
                                   wake_watcher=self._kick)
        self.load_progress = 1.0

    def _make_cache(self) -> Any:
        opts = self.spec.worker_options
        if not opts.get("prefix_cache", True):
            return None
        from worker.prefix_cache import PrefixCache
        return PrefixCache(ram_bytes=int(opts.get("cache_ram_mb", 256)) << 20,
                           disk_dir=opts.get("cache_dir"),
                           disk_bytes=int(opts.get("cache_disk_mb", 2048)) << 20,
                           min_tokens=int(opts.get("cache_min_tokens", 32)))

    def _send(self, peer: bytes, req_id: int, kind: str, payload: Any) -> None:
        if kind == "chunk":
            data = protocol.chunk(req_id, payload)
        elif kind == "result":
            data = protocol.result(req_id, payload)
        else:
            data = protocol.error(req_id, payload)
        self.progress += 1
        if not self._deliver(peer, data) and kind == "chunk":
            self._gone.add((peer, req_id))  # nobody is listening: stop generating for it

    def _deliver(self, peer: bytes, data: bytes) -> bool:
        """Send one reply; False when the client has disconnected (or cannot keep up)."""
        try:
            self.sock.send_multipart([peer, data], zmq.NOBLOCK)
            return True
        except zmq.Again:
            log.warning("client too slow: a reply was dropped")
            return False
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return False
            raise

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
        if endpoint.startswith("tcp://"):
            if self.spec.curve_server_key and self.spec.curve_authorized_clients:
                from runtime import security
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
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        sched = self.scheduler
        assert sched is not None
        while True:
            if self._draining and not sched.busy:
                break
            stop_at = self._hard_stop()
            if stop_at is not None and time.monotonic() > stop_at and sched.busy:
                sched.fail_all(ShuttingDown(f"worker {self.spec.model} stopped before the "
                                            "request finished"))
                break
            # idle, the loop sleeps until a message or SIGTERM arrives
            events = dict(poller.poll(0 if sched.active else 50 if sched.busy else IDLE_WAIT_MS))
            if self._wake_r in events:
                try:
                    os.read(self._wake_r, 4096)
                except OSError:
                    pass
            if sock in events:
                for _ in range(MAX_MESSAGES_PER_TURN):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_message(frames)
            if sched.busy:
                try:
                    sched.tick()
                except Exception as exc:  # a bug: fail what runs, keep serving
                    log.exception("scheduler tick failed")
                    sched.fail_all(InternalError(f"{type(exc).__name__}: {exc}"))
                self.progress += 1
            while self._gone:
                key = self._gone.pop()
                if sched.cancel(key, notify=False):
                    log.info("client of request %s disconnected; generation stopped", key[1])
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
        try:
            req_id, cmd, args = protocol.parse_request(payload)
            if protocol.COMMANDS[cmd].target != "worker":
                raise BadRequest(f"{cmd} is a supervisor command")
            if self._draining and cmd != "cancel":
                raise ShuttingDown(f"worker {self.spec.model} is shutting down")
            if cmd == "generate":
                self._start_generation(peer, req_id, args)
                return
            value = self._dispatch(cmd, args, peer)
            self.progress += 1
            self._deliver(peer, protocol.result(req_id, value))
        except LlamafleetError as exc:
            if req_id is None:
                req_id = exc.data.pop("id", None)
            self._deliver(peer, protocol.error(req_id, exc))
        except Exception as exc:  # a bug: report it, keep serving
            log.exception("internal error handling a request")
            err = InternalError(f"{type(exc).__name__}: {exc}")
            self._deliver(peer, protocol.error(req_id, err))

    # -- commands --------------------------------------------------------------
    def _check_seq(self, seq: int) -> None:
        if seq >= self.n_seq_max:
            raise BadRequest(f"sequence {seq} out of range (n_seq_max={self.n_seq_max})")
        owner = self.scheduler.owner(seq) if self.scheduler else None
        if owner is not None:
            raise BadRequest(f"sequence {seq} is in use by running request {owner}")

    def _dispatch(self, cmd: str, a: dict[str, Any], peer: bytes = b"") -> Any:
        b = self.backend
        assert b is not None
        if cmd == "ping":
            return {"pong": True, "model": self.spec.model, "pid": os.getpid(),
                    "generation": self.spec.generation}
        if cmd == "info":
            info = b.info().to_dict()
            info["model"] = self.spec.model
            info["adapters"] = b.adapters()
            if self.scheduler is not None:
                info["scheduler"] = {"running": len(self.scheduler.running),
                                     "queued": len(self.scheduler.queue),
                                     "max_queue": self.scheduler.max_queue,
                                     "ticks": self.scheduler.ticks,
                                     "peak_running": self.scheduler.peak_running}
            info["cache"] = self.cache.stats() if self.cache is not None else None
            return info
        if cmd == "tokenize":
            return {"tokens": b.tokenize(a["text"], a["add_special"], a["parse_special"])}
        if cmd == "detokenize":
            return {"text": b.detokenize(a["tokens"], special=a["special"])}
        if cmd == "cancel":
            assert self.scheduler is not None
            # a client can only cancel its own requests
            return {"cancelled": self.scheduler.cancel((peer, a["target"]))}
        if cmd in ("prefill", "decode", "kv_pack", "kv_unpack", "seq_clear",
                   "set_sampling", "set_grammar"):
            self._check_seq(a["seq"])
        if cmd == "prefill":
            if not a["tokens"]:
                raise BadRequest("prefill: tokens must not be empty")
            b.prefill(a["seq"], a["tokens"])
            return {"n_tokens": b.seq_len(a["seq"])}
        if cmd == "decode":
            seq = a["seq"]
            if a["sampling"] is not None:
                b.set_sampling(seq, SamplingParams.from_dict(a["sampling"]))
            token = b.sample(seq)
            if token is None:
                return {"token": None, "piece": "", "eog": True, "reason": "grammar",
                        "n_tokens": b.seq_len(seq)}
            eog = b.is_eog(token)
            if not eog:
                b.evaluate([(seq, [token])])
            piece = b.token_to_piece(token, special=False)
            return {"token": token, "piece": piece.decode("utf-8", errors="replace"),
                    "bytes": piece, "eog": eog, "reason": "eog" if eog else None,
                    "n_tokens": b.seq_len(seq)}
        if cmd == "kv_pack":
            data = b.kv_pack(a["seq"])
            return {"data": data, "n_tokens": b.seq_len(a["seq"])}
        if cmd == "kv_unpack":
            return {"n_tokens": b.kv_unpack(a["seq"], bytes(a["data"]))}
        if cmd == "seq_clear":
            b.seq_clear(a["seq"])
            return {}
        if cmd == "set_sampling":
            b.set_sampling(a["seq"], SamplingParams.from_dict(a["sampling"]))
            return {}
        if cmd == "set_grammar":
            params = SamplingParams(temperature=0.0, grammar=a["grammar"],
                                    json_schema=a["json_schema"])
            params.validate()
            b.set_sampling(a["seq"], params)
            return {}
        if cmd == "load_adapter":
            if type(b).load_adapter is Backend.load_adapter:
                b.load_adapter(a["name"], a["path"])  # raises NotSupported
            if len(b.adapters()) >= protocol.MAX_ADAPTERS:
                raise BadRequest(f"at most {protocol.MAX_ADAPTERS} adapters may be loaded")
            return b.load_adapter(a["name"], self._confine(a["path"], "adapter_dirs"))
        if cmd == "unload_adapter":
            b.unload_adapter(a["name"])
            return {}
        if cmd == "set_adapters":
            b.set_adapters({k: float(v) for k, v in a["scales"].items()})
            return {"adapters": b.adapters()}
        if cmd == "embed":
            return {"embeddings": b.embed(a["texts"], normalize=a["normalize"])}
        if cmd == "apply_chat_template":
            messages = list(a["messages"])
            if a["system"] is not None:
                messages = [{"role": "system", "content": a["system"]}] + messages
            prompt = b.apply_chat_template(messages,
                                           add_generation_prompt=a["add_generation_prompt"],
                                           enable_thinking=a["enable_thinking"])
            return {"prompt": prompt}
        raise NotFound(f"command {cmd!r} is not handled by workers")

    def _confine(self, path: str, option: str) -> str:
        """Resolve a client-supplied path; refuse it outside the configured directories."""
        dirs = [os.path.realpath(d) for d in self.spec.worker_options.get(option) or []]
        if not dirs:
            raise BadRequest(f"no {option} configured for model {self.spec.model}: "
                             "file paths from requests are refused")
        real = os.path.realpath(path)
        for d in dirs:
            if os.path.commonpath([real, d]) == d:
                if os.path.exists(real) and not os.path.isfile(real) and \
                        not os.path.isdir(real):
                    raise BadRequest(f"{path!r} is not a regular file")
                return real
        raise BadRequest(f"path {path!r} is outside the allowed directories ({option})")

    # -- generations ------------------------------------------------------------
    def _start_generation(self, peer: bytes, req_id: int, a: dict[str, Any]) -> None:
        b, sched = self.backend, self.scheduler
        assert b is not None and sched is not None
        if a["prompt"] is not None and a["tokens"] is not None:
            raise BadRequest("generate: give either prompt or tokens, not both")
        if a["seq"] is not None and a["session"] is not None:
            raise BadRequest("generate: a session uses its own sequence; do not give seq")
        if a["tokens"] is not None:
            prompt_tokens = list(a["tokens"])
            b.check_tokens(prompt_tokens)
        else:
            prompt_tokens = b.tokenize(a["prompt"], a["add_special"], a["parse_special"])
        params = SamplingParams.from_dict(a["sampling"])
        info = b.info()
        in_use = 0
        if a["seq"] is not None:
            self._check_seq(a["seq"])
            in_use = b.seq_len(a["seq"])
            if not prompt_tokens and in_use == 0:
                raise BadRequest(f"generate: sequence {a['seq']} is empty and no prompt was given")
        elif not prompt_tokens:
            raise BadRequest("generate: empty prompt")
        if in_use + len(prompt_tokens) + 1 > info.n_ctx:
            raise BadRequest(f"prompt of {len(prompt_tokens)} tokens does not fit the context "
                             f"({info.n_ctx} tokens, {in_use} in use)",
                             data={"n_ctx": info.n_ctx, "prompt_tokens": len(prompt_tokens)})
        deadline = None
        if a["deadline_ms"] is not None:
            deadline = time.monotonic() + a["deadline_ms"] / 1000
        g = Generation(peer=peer, req_id=req_id, stream=a["stream"], prompt_tokens=prompt_tokens,
                       params=params,
                       max_tokens=min(a["max_tokens"], info.n_ctx - in_use - len(prompt_tokens)),
                       stop=a["stop"], ignore_eos=a["ignore_eos"], seq=a["seq"],
                       deadline=deadline, session=a["session"])
        sched.submit(g)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m worker``; the spec comes in $LLAMAFLEET_WORKER_SPEC."""
    faulthandler.enable()  # a native crash prints a traceback the supervisor keeps
    spec = WorkerSpec.from_json(os.environ["LLAMAFLEET_WORKER_SPEC"])
    logging.basicConfig(level=spec.log_level.upper(),
                        format=f"%(asctime)s worker[{spec.model}] %(levelname)s %(message)s",
                        stream=sys.stderr)
    return Worker(spec).run()
