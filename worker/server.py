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
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import zmq

from backends import Backend, get_backend
from runtime import protocol
from runtime.errors import (BadRequest, Cancelled, InternalError, LlamafleetError, NotFound,
                            Overloaded, ShuttingDown)
from runtime.sampling import SamplingParams
from worker.generation import Generation

log = logging.getLogger("llamafleet.worker")

#: Messages read from the socket per loop turn while generations are running,
#: so a flood of requests cannot starve token production.
MAX_MESSAGES_PER_TURN = 64


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
        self.jobs: dict[int, tuple[bytes, Generation, bool]] = {}
        self.seq_owner: dict[int, int] = {}  # sequence -> request id of the generation using it
        self.n_seq_max = 1
        self._stop = threading.Event()
        self._draining = False
        self._parent = os.getppid()
        self._state_changed = threading.Event()

    # -- entry point -------------------------------------------------------
    def run(self) -> int:
        _set_parent_death_signal()
        signal.signal(signal.SIGTERM, self._on_sigterm)
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

    def _set_state(self, state: str, error: str | None = None) -> None:
        self.state = state
        if error is not None:
            self.error = error
        self._state_changed.set()

    # -- heartbeats ----------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 500)
        sock.setsockopt(zmq.IDENTITY, f"{self.spec.model}:{self.spec.generation}".encode())
        sock.connect(self.spec.events_endpoint)
        sock.send(protocol.event("hello", model=self.spec.model, pid=os.getpid(),
                                 generation=self.spec.generation))
        interval = self.spec.heartbeat_interval
        while True:
            if os.getppid() != self._parent:
                # the supervisor is gone: nobody can restart or route to us
                os._exit(3)
            sock.send(protocol.event(
                "heartbeat", model=self.spec.model, pid=os.getpid(),
                generation=self.spec.generation, state=self.state,
                load_progress=self.load_progress, endpoint=self.endpoint,
                error=self.error, progress=self.progress, inflight=len(self.jobs)))
            self._state_changed.wait(interval)
            self._state_changed.clear()

    # -- loading -------------------------------------------------------------
    def _load(self) -> None:
        cls = get_backend(self.spec.backend)
        backend = cls(self.spec.options)

        def progress(fraction: float) -> None:
            self.load_progress = max(0.0, min(1.0, float(fraction)))

        backend.load(progress)
        self.backend = backend
        self.n_seq_max = backend.info().n_seq_max
        self.load_progress = 1.0

    # -- serving -------------------------------------------------------------
    def _serve(self) -> None:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        endpoint = self.spec.endpoint
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
        order: deque[int] = deque()
        while True:
            if self._draining and not self.jobs:
                break
            timeout = 0 if self.jobs else 100
            if poller.poll(timeout):
                for _ in range(MAX_MESSAGES_PER_TURN):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_message(frames)
            # one token for each running generation, round robin
            order.extend(rid for rid in self.jobs if rid not in order)
            for _ in range(len(order)):
                rid = order.popleft()
                if rid in self.jobs:
                    self._step(rid)
                    if rid in self.jobs:
                        order.append(rid)
        sock.close(linger=200)

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
            value = self._dispatch(cmd, args)
            self.progress += 1
            self.sock.send_multipart([peer, protocol.result(req_id, value)])
        except LlamafleetError as exc:
            if req_id is None:
                req_id = exc.data.pop("id", None)
            self.sock.send_multipart([peer, protocol.error(req_id, exc)])
        except Exception as exc:  # a bug: report it, keep serving
            log.exception("internal error handling a request")
            err = InternalError(f"{type(exc).__name__}: {exc}")
            self.sock.send_multipart([peer, protocol.error(req_id, err)])

    # -- commands --------------------------------------------------------------
    def _check_seq(self, seq: int) -> None:
        if seq >= self.n_seq_max:
            raise BadRequest(f"sequence {seq} out of range (n_seq_max={self.n_seq_max})")
        owner = self.seq_owner.get(seq)
        if owner is not None:
            raise BadRequest(f"sequence {seq} is in use by running request {owner}")

    def _dispatch(self, cmd: str, a: dict[str, Any]) -> Any:
        b = self.backend
        assert b is not None
        if cmd == "ping":
            return {"pong": True, "model": self.spec.model, "pid": os.getpid(),
                    "generation": self.spec.generation}
        if cmd == "info":
            info = b.info().to_dict()
            info["model"] = self.spec.model
            info["adapters"] = b.adapters()
            return info
        if cmd == "tokenize":
            return {"tokens": b.tokenize(a["text"], a["add_special"], a["parse_special"])}
        if cmd == "detokenize":
            return {"text": b.detokenize(a["tokens"], special=a["special"])}
        if cmd == "cancel":
            job = self.jobs.get(a["target"])
            if job is None:
                return {"cancelled": False}
            self._finish(a["target"], cancelled=True)
            return {"cancelled": True}
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
            return b.load_adapter(a["name"], a["path"])
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

    # -- generations ------------------------------------------------------------
    def _free_seq(self) -> int:
        b = self.backend
        assert b is not None
        for seq in range(self.n_seq_max):
            if seq not in self.seq_owner and b.seq_len(seq) == 0:
                return seq
        raise Overloaded(f"all {self.n_seq_max} sequences are busy",
                         data={"n_seq_max": self.n_seq_max, "running": len(self.jobs)})

    def _start_generation(self, peer: bytes, req_id: int, a: dict[str, Any]) -> None:
        b = self.backend
        assert b is not None
        if req_id in self.jobs:
            raise BadRequest(f"request id {req_id} is already running")
        if a["prompt"] is not None and a["tokens"] is not None:
            raise BadRequest("generate: give either prompt or tokens, not both")
        if a["tokens"] is not None:
            prompt_tokens = list(a["tokens"])
            b.check_tokens(prompt_tokens)
        else:
            prompt_tokens = b.tokenize(a["prompt"], a["add_special"], a["parse_special"])
        params = SamplingParams.from_dict(a["sampling"])
        if a["seq"] is None:
            seq, owns = self._free_seq(), True
            if not prompt_tokens:
                raise BadRequest("generate: empty prompt")
        else:
            seq, owns = a["seq"], False
            self._check_seq(seq)
            if not prompt_tokens and b.seq_len(seq) == 0:
                raise BadRequest(f"generate: sequence {seq} is empty and no prompt was given")
        info = b.info()
        if b.seq_len(seq) + len(prompt_tokens) + 1 > info.n_ctx:
            raise BadRequest(f"prompt of {len(prompt_tokens)} tokens does not fit the context "
                             f"({info.n_ctx} tokens, {b.seq_len(seq)} in use)",
                             data={"n_ctx": info.n_ctx, "prompt_tokens": len(prompt_tokens)})
        max_tokens = min(a["max_tokens"], info.n_ctx - b.seq_len(seq) - len(prompt_tokens))
        gen = Generation(b, req_id=req_id, seq=seq, owns_seq=owns, prompt_tokens=prompt_tokens,
                         params=params, max_tokens=max_tokens, stop=a["stop"],
                         ignore_eos=a["ignore_eos"])
        gen.start()  # BadRequest for a bad grammar, before anything is queued
        self.jobs[req_id] = (peer, gen, a["stream"])
        self.seq_owner[seq] = req_id

    def _step(self, rid: int) -> None:
        peer, gen, stream = self.jobs[rid]
        try:
            delta, token = gen.step()
        except LlamafleetError as exc:
            self._finish(rid, error=exc)
            return
        except Exception as exc:
            log.exception("internal error in generation %s", rid)
            self._finish(rid, error=InternalError(f"{type(exc).__name__}: {exc}"))
            return
        self.progress += 1
        if stream and (token is not None or delta):
            self.sock.send_multipart([peer, protocol.chunk(
                rid, {"text": delta, "tokens": [] if token is None else [token]})])
        if gen.done:
            self._finish(rid)

    def _finish(self, rid: int, *, error: LlamafleetError | None = None,
                cancelled: bool = False) -> None:
        peer, gen, _ = self.jobs.pop(rid)
        self.seq_owner.pop(gen.seq, None)
        if gen.owns_seq and self.backend is not None:
            self.backend.seq_clear(gen.seq)
        if cancelled:
            error = Cancelled(f"request {rid} was cancelled",
                              data={"tokens": gen.tokens, "text": gen.text.text})
        if error is not None:
            self.sock.send_multipart([peer, protocol.error(rid, error)])
        else:
            self.sock.send_multipart([peer, protocol.result(rid, gen.result())])


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m worker``; the spec comes in $LLAMAFLEET_WORKER_SPEC."""
    faulthandler.enable()  # a native crash prints a traceback the supervisor keeps
    spec = WorkerSpec.from_json(os.environ["LLAMAFLEET_WORKER_SPEC"])
    logging.basicConfig(level=spec.log_level.upper(),
                        format=f"%(asctime)s worker[{spec.model}] %(levelname)s %(message)s",
                        stream=sys.stderr)
    return Worker(spec).run()
