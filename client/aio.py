"""The asyncio client (the core; :class:`client.Client` wraps it).

One DEALER socket per worker (each replica of each model), found through the
supervisor's ``lookup`` (:mod:`client.pool`). When a worker dies, every call in
flight on it ends at once with :class:`~runtime.errors.WorkerCrashed`; with
``resume`` on (the default) a generation without an explicit ``seq`` is
resubmitted to a ready replica or the restarted worker, a stream continuing
from the tokens it already produced, and the caller sees one result.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any, Protocol, TypeVar

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from llamafleet.client.pool import Call, ModelPool, WorkerConn, auth_error
from llamafleet.runtime import protocol
from llamafleet.runtime.config import default_address
from llamafleet.runtime.errors import (
    BadRequest,
    Cancelled,
    LlamafleetError,
    NotSupported,
    ProtocolError,
    RequestTimeout,
    ShuttingDown,
    Unavailable,
    WorkerCrashed,
    error_from_wire,
)
from llamafleet.runtime.protocol import Completion, Decoded
from llamafleet.runtime.sampling import SamplingParams
from llamafleet.runtime.tcp import keepalive

log = logging.getLogger("llamafleet.client")
R = TypeVar("R", bound=protocol.Message)
#: a call's default limit (seconds); a generation may take long
DEFAULT_TIMEOUT = 600.0
#: how long a call waits for a (re)starting worker, and for the supervisor to answer
DEFAULT_CONNECT_TIMEOUT = 30.0

SAMPLING_KEYS = frozenset(f.name for f in fields(SamplingParams))
#: commands sent again after their worker died (no state on it; same answer anywhere)
_RESENDABLE = frozenset({"generate", "ping", "info", "metrics", "tokenize", "detokenize",
                         "embed", "apply_chat_template"})
#: commands that change one worker's state (refused on a replicated model)
_PER_WORKER = frozenset({"load_adapter", "unload_adapter", "set_adapters"})
#: the clock of every deadline (the asyncio loop's own clock on the standard loops; the
#: sync client's calls on its callers' threads share it)
_now = time.monotonic


def sampling_from(kwargs: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Split sampling keyword arguments out; TypeError for unknown ones."""
    unknown = set(kwargs) - SAMPLING_KEYS
    if unknown:
        raise TypeError(f"unknown argument(s): {', '.join(sorted(unknown))}")
    merged = {**(base or {}), **kwargs}
    SamplingParams.from_dict(dict(merged))  # fail early, client side
    return merged


class AsyncStream:
    """Async iterator over the text deltas of a streamed generation.

    ``tokens`` collects token ids as they arrive; ``result`` holds the final
    :class:`Completion` once the stream is exhausted; ``cancel()`` stops it. When
    its worker dies (and ``resume`` is on) it continues on another worker from the
    tokens it already has: the caller sees no seam, ``result.stats.resumed`` counts."""

    def __init__(self, client: AsyncClient, model: str, args: dict[str, Any],
                 timeout: float | None, resume: bool) -> None:
        self._client = client
        self._model = model
        self._args = args
        self._timeout = timeout
        self._resume = resume
        self._call: Call | None = None
        self._deadline: float | None = None
        self._done = False
        self._resumed = 0
        #: logprobs of the tokens produced before the latest resume
        self._earlier_logprobs: list[protocol.TokenLogprob] = []
        self.tokens: list[int] = []
        #: with ``logprobs``: one protocol.TokenLogprob map per token so far
        self.logprobs: list[protocol.TokenLogprob] = []
        self.result: Completion | None = None

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> str:
        if self._done:
            raise StopAsyncIteration
        client = self._client
        if self._call is None:
            self._deadline = _now() + client._timeout(self._timeout)
            await self._submit(self._args)
        assert self._call is not None and self._deadline is not None
        while True:
            try:
                msg = await client._next(self._call, self._deadline)
            except (WorkerCrashed, ShuttingDown) as exc:
                if not client._may_resume(self._call, "generate", self._args, exc,
                                          self._resume, self._resumed, self._deadline):
                    self._done = True
                    await self._abandon()
                    raise
                await self._continue(exc)
                continue
            except BaseException:
                self._done = True
                await self._abandon()
                raise
            if msg["kind"] == "chunk":
                data = msg["data"]
                self.tokens.extend(data.get("tokens", []))
                if data.get("logprobs"):
                    self.logprobs.extend(data["logprobs"])
                if data.get("text"):
                    return data["text"]
                continue
            self._done = True
            client._forget(self._call)
            result = Completion.from_wire(msg["result"])
            result.stats.resumed = self._resumed
            if self._resumed and result.logprobs is not None:
                result.logprobs = [*self._earlier_logprobs, *result.logprobs]
            self.result = result
            raise StopAsyncIteration

    async def _submit(self, args: dict[str, Any]) -> None:
        assert self._deadline is not None
        try:
            self._call = await self._client._send(self._model, "generate", args,
                                                  deadline=self._deadline)
        except BaseException:
            self._done = True
            raise

    async def _continue(self, exc: LlamafleetError) -> None:
        """Resubmit after the worker died: the prompt, then what it already produced."""
        assert self._call is not None and self._deadline is not None
        self._client._forget(self._call)
        self._resumed += 1
        log.info("resuming a stream of %s after %d token(s): %s", self._model,
                 len(self.tokens), exc.message)
        self._earlier_logprobs = list(self.logprobs)
        args = {**self._args, "continue_tokens": list(self.tokens),
                "deadline_ms": self._client._deadline_ms(self._deadline)}
        await self._submit(args)

    async def _abandon(self) -> None:
        if self._call is not None:
            self._client._forget(self._call)
            await self._client._cancel_remote(self._call)

    async def cancel(self) -> None:
        """Stop the generation on the worker and end this iterator."""
        if not self._done:
            self._done = True
            await self._abandon()

    async def aclose(self) -> None:
        await self.cancel()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.cancel()  # leaving the block early stops the generation

    async def collect(self) -> Completion:
        """Consume the rest of the stream and return the final Completion."""
        async for _ in self:
            pass
        assert self.result is not None
        return self.result


class RequestIO(Protocol):
    """How one request's frames travel: :meth:`AsyncClient._request` (timeouts, typed
    errors, resending after a crash) is written once against this. The asyncio client
    is its own IO (its sockets, on its loop); the sync client has one that sends and
    waits on the calling thread (:class:`client.sync.ThreadIO`)."""

    async def _send(self, model: str, cmd: str, args: dict[str, Any], *,
                    deadline: float, replica: int | None = None) -> Call: ...

    async def _next(self, call: Call, deadline: float | None) -> dict[str, Any]: ...

    async def _cancel_remote(self, call: Call) -> None: ...

    def _forget(self, call: Call) -> None: ...


class AsyncClient:
    """Talks to a fleet through its supervisor (asyncio).

    ``address`` is the supervisor's control address (default: the local runtime
    directory's). ``timeout`` is the default per-call limit in seconds;
    ``connect_timeout`` bounds how long a call waits for a (re)starting worker, and
    (unless ``control_timeout`` says otherwise) for the supervisor to answer at all:
    past it, a call raises the retryable :class:`Unavailable`. ``resume`` (default
    on; each call may override it) resubmits work whose worker died or left: a
    ``generate``/``stream`` without ``seq`` continues on another worker, a read-only
    command is sent again; at most :attr:`max_resumes` times, within the deadline.
    """

    #: resubmissions of one call at most (each after its worker died or left)
    max_resumes = 3

    def __init__(self, address: str | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 control_timeout: float | None = None,
                 curve_server_key: str | bytes | None = None,
                 curve_client_cert: str | None = None, resume: bool = True) -> None:
        #: the supervisors' control addresses (``address`` may list several, comma
        #: separated: a call goes to the next when the current one does not answer)
        self.addresses = [a.strip() for a in (address or default_address()).split(",")
                          if a.strip()]
        if not self.addresses:
            raise BadRequest(f"no supervisor address in {address!r}")
        #: the supervisor this client talks to now
        self.address = self.addresses[0]
        self.resume = resume
        # CURVE for tcp:// (arguments, else $LLAMAFLEET_CURVE_SERVER_KEY / _CLIENT_CERT)
        server_key = curve_server_key or os.environ.get("LLAMAFLEET_CURVE_SERVER_KEY")
        client_cert = curve_client_cert or os.environ.get("LLAMAFLEET_CURVE_CLIENT_CERT")
        self._curve: tuple[bytes, tuple[bytes, bytes]] | None = None
        if server_key or client_cert:
            if not (server_key and client_cert):
                raise BadRequest("CURVE needs both the server's public key and a client "
                                 "certificate")
            from llamafleet.runtime import security
            self._curve = (security.load_public_key(server_key),
                           security.load_keypair(client_cert))
        self.default_timeout = timeout
        self.connect_timeout = connect_timeout
        self.control_timeout = connect_timeout if control_timeout is None else control_timeout
        self._ctx = zmq.asyncio.Context()
        #: the same context for plain sockets (the worker connections, read from loop
        #: callbacks, and the sync client's per-thread sockets)
        self._plain_ctx: zmq.Context[Any] = zmq.Context.shadow(self._ctx.underlying)
        #: ``io``: the RequestIO of a call the sync client drives on this thread
        self._inline = threading.local()
        self._ids = itertools.count(1)
        self._pools: dict[str, ModelPool] = {}
        self._control: zmq.asyncio.Socket | None = None
        self._control_calls: dict[int, asyncio.Queue[dict[str, Any]]] = {}
        self._control_reader: asyncio.Future[None] | None = None
        self._control_monitor: zmq.asyncio.Socket | None = None
        #: set while the control connection's handshake has succeeded
        self._control_up = asyncio.Event()
        self._control_error: LlamafleetError | None = None
        self._closed = False

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self, *, term: bool = True) -> None:
        """Close every socket. Calls in flight end with Cancelled. (``term=False``:
        leave the context to the caller, whose own sockets in it are still open.)"""
        if self._closed:
            return
        self._closed = True
        for pool in self._pools.values():
            pool.close(Cancelled("client closed"))
        self._end_control_calls(Cancelled("client closed"))
        self._close_control()
        if term:
            self._ctx.term()

    # -- plumbing -------------------------------------------------------------------
    def _secure(self, sock: zmq.Socket[Any], endpoint: str) -> None:
        """CURVE (where this client has keys) and heartbeats on a tcp:// socket."""
        keepalive(sock, endpoint)
        if self._curve is not None and endpoint.startswith("tcp://"):
            from llamafleet.runtime import security
            security.make_client(sock, *self._curve)

    def _timeout(self, timeout: float | None) -> float:
        return self.default_timeout if timeout is None else float(timeout)

    def _open_control(self) -> zmq.asyncio.Socket:
        """The DEALER to the supervisor, with a monitor that tells when it is up."""
        if self._closed:  # a socket opened now would keep the context from ending
            raise Cancelled("client closed")
        if self._control is None:
            self._control = self._ctx.socket(zmq.DEALER)
            self._control.setsockopt(zmq.LINGER, 0)
            self._secure(self._control, self.address)
            auth_events = zmq.EVENT_HANDSHAKE_FAILED_AUTH
            if self._curve is not None and self.address.startswith("tcp://"):
                auth_events |= (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL |
                                zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
            monitor = self._control_monitor = self._control.get_monitor_socket(
                auth_events | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
            try:
                self._control.connect(self.address)
            except zmq.ZMQError as exc:
                self._close_control()
                raise BadRequest(f"bad supervisor address {self.address!r}: {exc}") from None
            self._control_reader = asyncio.ensure_future(
                self._read_control(monitor, auth_events))
        return self._control

    def _close_control(self) -> None:
        if self._control_reader is not None:
            self._control_reader.cancel()
            self._control_reader = None
        if self._control is not None:
            try:
                self._control.disable_monitor()
            except zmq.ZMQError:
                pass
            self._control.close(linger=0)
            self._control = None
        if self._control_monitor is not None:
            self._control_monitor.close(linger=0)
            self._control_monitor = None

    def _end_control_calls(self, err: LlamafleetError) -> None:
        """End every supervisor call in flight (and any wait for the connection)."""
        for q in self._control_calls.values():
            q.put_nowait({"kind": "error", "error": err.to_wire()})
        self._control_error = err
        self._control_up.set()  # wakes a caller waiting for the handshake

    async def _supervisor(self, cmd: str, args: dict[str, Any], timeout: float | None) -> Any:
        """One supervisor command; with several addresses, sent to the next one when
        the current one is not there or went away (every command is safe to repeat)."""
        if self._closed:
            raise Cancelled("client closed")
        protocol.validate_args(cmd, args)
        limit = self.default_timeout if timeout is None else timeout
        deadline = _now() + limit
        # each address gets its share of the wait for a connection
        patience = self.control_timeout / len(self.addresses) if len(self.addresses) > 1 \
            else self.control_timeout
        for attempt in range(len(self.addresses)):
            try:
                return await self._supervisor_at(cmd, args, max(0.001, deadline - _now()),
                                                 max(1.0, patience))
            except Unavailable as exc:
                failed = exc.data.get("address")
                if failed not in self.addresses or self._closed or \
                        attempt == len(self.addresses) - 1:
                    raise  # the supervisor's own answer, or nobody left to ask
                if failed == self.address:  # else another call has moved on already
                    self._fail_over(exc)
        raise AssertionError("unreachable")

    def _fail_over(self, why: Unavailable) -> None:
        """Talk to the next supervisor address from now on."""
        old = self.address
        self._close_control()
        self._control_up.clear()
        self._control_error = None
        self.address = self.addresses[(self.addresses.index(old) + 1) % len(self.addresses)]
        log.warning("supervisor at %s: %s; trying %s", old, why.message, self.address)

    async def _supervisor_at(self, cmd: str, args: dict[str, Any], limit: float,
                             patience: float) -> Any:
        address, control = self.address, self._open_control()
        if not self._control_up.is_set() or self._control_error is not None:
            # a DEALER queues messages for a peer that is not there: without this wait a
            # call to an address where nothing listens would wait for its whole timeout
            try:
                await asyncio.wait_for(self._control_up.wait(), min(limit, patience))
            except TimeoutError:
                raise Unavailable(
                    f"no supervisor is answering at {address}: start a fleet with "
                    "`llamafleet serve --config FILE` (or pass the right --address)",
                    data={"address": address}) from None
            if self._control_error is not None:  # a fresh copy: no growing traceback
                raise error_from_wire(self._control_error.to_wire())
        if self._control is not control:  # another call moved to the next address
            raise Unavailable(f"left the supervisor at {address}", data={"address": address})
        req_id = next(self._ids)
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._control_calls[req_id] = q
        try:
            await control.send(protocol.request(req_id, cmd, args))
            try:
                msg = await asyncio.wait_for(q.get(), limit)
            except TimeoutError:
                raise RequestTimeout(f"supervisor at {address} did not answer {cmd} "
                                     f"within {limit:.1f}s") from None
        finally:
            self._control_calls.pop(req_id, None)
        if msg["kind"] == "error":
            raise error_from_wire(msg["error"])
        return msg["result"]

    async def _read_control(self, monitor: zmq.asyncio.Socket, auth_events: int) -> None:
        assert self._control is not None
        poller = zmq.asyncio.Poller()
        poller.register(self._control, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        try:
            while True:
                for sock, _ in await poller.poll():
                    if sock is monitor:
                        event = parse_monitor_message(await monitor.recv_multipart())["event"]
                        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                            self._control_error = None
                            self._control_up.set()
                        elif event == zmq.EVENT_DISCONNECTED:
                            # nothing sent before the drop will be answered; the next
                            # call waits for the reconnection (or says nobody answers)
                            for q in self._control_calls.values():
                                q.put_nowait({"kind": "error", "error": Unavailable(
                                    f"the supervisor at {self.address} went away",
                                    data={"address": self.address}).to_wire()})
                            self._control_up.clear()
                        elif event & auth_events:
                            self._end_control_calls(auth_error(self.address))
                        continue
                    frames = await self._control.recv_multipart()
                    try:
                        msg = protocol.unpack(frames[-1])
                    except ProtocolError:
                        continue
                    waiting = self._control_calls.get(msg.get("id"))  # type: ignore[arg-type]
                    if waiting is not None:
                        waiting.put_nowait(msg)
        except (asyncio.CancelledError, zmq.ZMQError):
            pass
        finally:
            monitor.close(linger=0)

    def _pool(self, model: str) -> ModelPool:
        pool = self._pools.get(model)
        if pool is None:
            pool = self._pools[model] = ModelPool(model)
        return pool

    def _connections(self) -> list[WorkerConn]:
        """Every open worker connection (for tests and diagnostics)."""
        return [c for pool in self._pools.values() for c in pool.conns.values()]

    async def _conn(self, model: str, deadline: float, session: str | None = None,
                    seq: int | None = None) -> WorkerConn:
        """The connection a request goes to (looking the model up when this client
        knows no live worker of it, or fewer than it has replicas)."""
        pool = self._pool(model)
        while True:
            if pool.needs_lookup(_now()):
                async with pool.lock:
                    if pool.needs_lookup(_now()):
                        await self._refresh(pool, deadline)
            else:
                self._rescan_soon(pool)
            conn = pool.pick(pool.live(), session, seq)
            if conn is not None:
                return conn
            # an explicit sequence's replica is (re)starting: wait for it
            if _now() >= deadline:
                raise Unavailable(f"replica {(seq or 0) % pool.replicas} of model "
                                  f"{model} is not ready", data={"model": model})
            pool.refreshed = float("-inf")
            await asyncio.sleep(0.05)

    async def _refresh(self, pool: ModelPool, deadline: float) -> None:
        """Ask the supervisor for the model's ready workers (waiting for one only when
        this client has none)."""
        have = bool(pool.live())
        left = deadline - _now()
        wait = 0.0 if have else max(0.0, min(left, self.connect_timeout))
        try:
            found = protocol.ModelEndpoints.from_wire(await self._supervisor("lookup", {
                "model": pool.model, "wait_ms": int(wait * 1000),
                "exclude": list(pool.dead)}, timeout=wait + 5.0))
        except (Unavailable, RequestTimeout):
            if not have:
                raise
            pool.refreshed = _now()  # serve on what is live; ask again later
            return
        if self._closed:  # closed while the lookup was out: open no sockets now
            raise Cancelled("client closed")
        pool.update(found, _now(), lambda e: WorkerConn(self, e))

    def _rescan_soon(self, pool: ModelPool) -> None:
        """Start the background lookup of a pool that is due for one (on the loop)."""
        if pool.stale(_now()) and not self._closed:
            pool.rescan = asyncio.ensure_future(self._rescan(pool))

    async def _rescan(self, pool: ModelPool) -> None:
        """Look a model in use up again, in the background: replicas a reload added are
        used, and a supervisor that is slow to answer delays no request."""
        pool.refreshed = _now()
        try:
            async with pool.lock:
                await self._refresh(pool, _now() + self.connect_timeout)
        except LlamafleetError as exc:  # the next request's own lookup reports it
            log.debug("background lookup of %s: %s", pool.model, exc)

    def _check_send(self, cmd: str, args: dict[str, Any]) -> None:
        """What every request passes before a connection is chosen."""
        protocol.validate_args(cmd, args)
        if self._closed:
            raise Cancelled("client closed")

    @staticmethod
    def _route(args: dict[str, Any], replica: int | None) -> tuple[str | None, int | None]:
        """The session and explicit sequence that choose a request's replica (an
        explicit sequence lives on replica ``seq % replicas``; so does ``replica``)."""
        seq = args.get("seq")
        return args.get("session"), seq if isinstance(seq, int) else replica

    def _check_replica(self, conn: WorkerConn, replica: int | None) -> None:
        """Refuse a ``replica`` the model does not have (routing took it modulo)."""
        if replica is not None and conn.replica != replica:
            raise BadRequest(f"model {conn.model} has no replica {replica} (it has "
                             f"{self._pool(conn.model).replicas})", data={"model": conn.model})

    def _frame(self, call: Call, cmd: str, args: dict[str, Any]) -> bytes:
        """Encode a request and register its call on the connection (refused first:
        a per-worker command on a replicated model; BadRequest from the encoder)."""
        model = call.conn.model
        if cmd in _PER_WORKER and self._pool(model).replicas > 1:
            raise NotSupported(f"{cmd} changes one worker's state, and model {model} has "
                               f"{self._pool(model).replicas} replicas: configure adapters "
                               "in the model's table instead")
        frame = protocol.request(call.id, cmd, args)
        call.conn.calls[call.id] = call
        return frame

    async def _send(self, model: str, cmd: str, args: dict[str, Any], *,
                    deadline: float, replica: int | None = None) -> Call:
        self._check_send(cmd, args)
        conn = await self._conn(model, deadline, *self._route(args, replica))
        self._check_replica(conn, replica)
        call = Call(next(self._ids), conn)
        await conn.send(self._frame(call, cmd, args))
        return call

    async def _next(self, call: Call, deadline: float | None) -> dict[str, Any]:
        """The next reply of a call; raises its error."""
        msg = await call.get(deadline)
        if msg is None:
            raise self._timed_out(call)
        if isinstance(msg, LlamafleetError):
            raise msg
        return self._reply(call, msg, self._pool(call.conn.model).retire)

    @staticmethod
    def _timed_out(call: Call) -> RequestTimeout:
        return RequestTimeout(f"no reply from model {call.conn.model} in time")

    @staticmethod
    def _reply(call: Call, msg: dict[str, Any],
               retire: Callable[[WorkerConn], None]) -> dict[str, Any]:
        """A reply as the caller gets it: an error reply raised as its typed error
        (a worker that answers ShuttingDown is leaving: ``retire`` its connection)."""
        if msg["kind"] == "error":
            err = error_from_wire(msg["error"])
            if isinstance(err, ShuttingDown):
                retire(call.conn)
            raise err
        return msg

    def _forget(self, call: Call) -> None:
        call.conn.calls.pop(call.id, None)
        self._pool(call.conn.model).release(call.conn)

    def _may_resume(self, call: Call, cmd: str, args: dict[str, Any], exc: LlamafleetError,
                    resume: bool | None, resumed: int, deadline: float) -> bool:
        """Whether a call that ``exc`` ended is sent again: resume is on, the retries
        and the deadline allow, the command holds no state on that worker (no explicit
        ``seq``), and either the worker refused it while leaving (ShuttingDown: it was
        not run) or it died under a command that gives the same answer anywhere."""
        if not (self.resume if resume is None else resume) or self._closed:
            return False
        if resumed >= self.max_resumes or _now() >= deadline:
            return False
        if args.get("seq") is not None:
            return False
        if isinstance(exc, ShuttingDown):
            return True
        return isinstance(exc, WorkerCrashed) and call.conn.dead is not None \
            and cmd in _RESENDABLE

    @staticmethod
    def _deadline_ms(deadline: float) -> int:
        """The ``deadline_ms`` of a request sent now: the worker drops it past then."""
        return max(1, int((deadline - _now()) * 1000) + 50)

    async def _cancel_remote(self, call: Call) -> None:
        self._cancel_on(call.conn.sock, call)

    def _cancel_on(self, sock: zmq.Socket[Any], call: Call) -> None:
        """Ask the worker to stop ``call`` (best effort: never blocks)."""
        if call.conn.dead is None:
            try:
                sock.send(protocol.request(next(self._ids), "cancel", {"target": call.id}),
                          zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    async def call(self, model: str, cmd: str, args: dict[str, Any] | None = None, *,
                   timeout: float | None = None, resume: bool | None = None) -> Any:
        """Send one worker command and return its result (the raw protocol)."""
        return (await self._request(model, cmd, dict(args or {}), timeout, resume))[0]

    async def _request(self, model: str, cmd: str, args: dict[str, Any],
                       timeout: float | None, resume: bool | None,
                       replica: int | None = None) -> tuple[Any, int]:
        """One worker command (to ``replica`` when given), sent again (see
        :meth:`_may_resume`) when its worker dies or leaves first; returns the result
        and how often it was resent. The frames go through this client's sockets, or
        through the RequestIO the sync client set for the calling thread."""
        io: RequestIO = getattr(self._inline, "io", None) or self
        deadline = _now() + self._timeout(timeout)
        resumed = 0
        while True:
            call = await io._send(model, cmd, args, deadline=deadline, replica=replica)
            try:
                while True:
                    msg = await io._next(call, deadline)
                    if msg["kind"] == "result":
                        return msg["result"], resumed
            except (WorkerCrashed, ShuttingDown) as exc:
                if not self._may_resume(call, cmd, args, exc, resume, resumed, deadline):
                    raise
                resumed += 1
                log.info("sending %s to model %s again: %s", cmd, model, exc.message)
                if "deadline_ms" in args:
                    args = {**args, "deadline_ms": self._deadline_ms(deadline)}
            except (RequestTimeout, asyncio.CancelledError, KeyboardInterrupt):
                await io._cancel_remote(call)
                raise
            finally:
                io._forget(call)

    async def _command(self, model: str, cmd: str, reply: type[R], args: dict[str, Any] | None,
                       timeout: float | None, resume: bool | None = None,
                       replica: int | None = None) -> R:
        """One worker command, its result decoded as the protocol declares it."""
        assert protocol.COMMANDS[cmd].reply is reply
        result, _ = await self._request(model, cmd, dict(args or {}), timeout, resume, replica)
        return reply.from_wire(result)

    # -- supervisor ---------------------------------------------------------------------
    async def status(self, *, timeout: float | None = 10.0) -> list[dict[str, Any]]:
        """One dict per worker: model, pid, state, restarts, last_exit, ..."""
        return (await self._supervisor("status", {}, timeout))["workers"]

    async def fleet_status(self, *, timeout: float | None = 10.0) -> dict[str, Any]:
        """The whole ``status`` reply: ``workers``, ``services`` (the HTTP gateway),
        the supervisor's ``address`` and ``pid``."""
        return dict(await self._supervisor("status", {}, timeout))

    async def lookup(self, model: str, *, wait: float = 0.0) -> protocol.ModelEndpoints:
        """Where the model's ready workers are (an unloaded model is loaded first; waits
        up to ``wait`` s for one to be ready)."""
        return protocol.ModelEndpoints.from_wire(await self._supervisor(
            "lookup", {"model": model, "wait_ms": int(wait * 1000)}, timeout=wait + 5.0))

    async def load(self, model: str, *, wait: float = 0.0) -> protocol.ModelEndpoints:
        """Load a model now (making room if limits say so); ``wait`` s for it to be
        ready (0: return at once; the answer then lists what is ready already)."""
        return protocol.ModelEndpoints.from_wire(await self._supervisor(
            "load", {"model": model, "wait_ms": int(wait * 1000)}, timeout=wait + 5.0))

    async def unload(self, model: str) -> None:
        """Stop a model's workers (they finish their requests first)."""
        await self._supervisor("unload", {"model": model}, timeout=10.0)

    async def reload(self) -> protocol.Reloaded:
        """Make the supervisor re-read its configuration file and apply the change
        (BadRequest, and nothing changed, if it does not load)."""
        return protocol.Reloaded.from_wire(await self._supervisor("reload", {},
                                                                  timeout=30.0))

    async def shutdown_fleet(self) -> None:
        """Ask the supervisor to shut the whole fleet down gracefully."""
        await self._supervisor("shutdown", {}, timeout=10.0)

    # -- model commands -------------------------------------------------------------------
    async def ping(self, model: str, *, timeout: float | None = None,
                   replica: int | None = None) -> protocol.Pong:
        """A round trip to the model's worker (``replica``: that one; it is waited for
        while it restarts)."""
        return await self._command(model, "ping", protocol.Pong, None, timeout,
                                   replica=replica)

    async def info(self, model: str, *, timeout: float | None = None,
                   replica: int | None = None) -> protocol.Info:
        """Model metadata, backend, limits, default sampling, adapters, scheduler and cache."""
        return await self._command(model, "info", protocol.Info, None, timeout, replica=replica)

    async def metrics(self, model: str, *, timeout: float | None = None,
                      replica: int | None = None) -> protocol.WorkerMetrics:
        """One worker's counters, gauges and histograms (what /metrics exports, one
        series per replica)."""
        return await self._command(model, "metrics", protocol.WorkerMetrics, None, timeout,
                                   replica=replica)

    async def tokenize(self, model: str, text: str, *, add_special: bool = True,
                       parse_special: bool = False, timeout: float | None = None) -> list[int]:
        r = await self._command(model, "tokenize", protocol.Tokens, {
            "text": text, "add_special": add_special, "parse_special": parse_special}, timeout)
        return list(r.tokens)

    async def detokenize(self, model: str, tokens: Sequence[int], *, special: bool = False,
                         timeout: float | None = None) -> str:
        r = await self._command(model, "detokenize", protocol.Text,
                                {"tokens": list(tokens), "special": special}, timeout)
        return r.text

    async def prefill(self, model: str, seq: int, tokens: Sequence[int], *,
                      timeout: float | None = None) -> int:
        """Append tokens to a sequence; returns its new length."""
        r = await self._command(model, "prefill", protocol.SeqLength,
                                {"seq": seq, "tokens": list(tokens)}, timeout)
        return r.n_tokens

    async def decode(self, model: str, seq: int, *, timeout: float | None = None,
                     **sampling: Any) -> Decoded:
        """Sample one token for a sequence and append it (``sampling`` replaces its sampler)."""
        args: dict[str, Any] = {"seq": seq}
        if sampling:
            args["sampling"] = sampling_from(sampling)
        return await self._command(model, "decode", Decoded, args, timeout)

    def _generate_args(self, prompt: str | None, tokens: Sequence[int] | None, seq: int | None,
                       max_tokens: int, stop: Sequence[str] | str | None, add_special: bool,
                       parse_special: bool, ignore_eos: bool, stream: bool,
                       session: str | None, timeout: float | None, logprobs: int | None,
                       keep_alive: float | None, sampling: dict[str, Any],
                       speculative: str | None = "model") -> dict[str, Any]:
        if (prompt is None) == (tokens is None):
            raise BadRequest("give exactly one of prompt or tokens")
        if isinstance(stop, str):
            stop = [stop]
        # the worker drops the request itself when the caller's timeout has passed
        deadline_ms = int(self._timeout(timeout) * 1000) + 50
        args: dict[str, Any] = {"prompt": prompt, "tokens": None if tokens is None else list(tokens),
                "seq": seq, "max_tokens": max_tokens, "stop": list(stop or []),
                "sampling": sampling_from(sampling), "add_special": add_special,
                "parse_special": parse_special, "ignore_eos": ignore_eos, "stream": stream,
                "session": session, "deadline_ms": deadline_ms, "logprobs": logprobs}
        if keep_alive is not None:
            args["keep_alive"] = keep_alive
        if speculative != "model":  # None: off
            args["speculative"] = "off" if speculative is None else speculative
        return args

    async def generate(self, model: str, prompt: str | None = None, *,
                       tokens: Sequence[int] | None = None, seq: int | None = None,
                       max_tokens: int = protocol.DEFAULT_MAX_TOKENS, stop: Sequence[str] | str | None = None,
                       add_special: bool = True, parse_special: bool = False,
                       ignore_eos: bool = False, session: str | None = None,
                       logprobs: int | None = None, keep_alive: float | None = None,
                       resume: bool | None = None, speculative: str | None = "model",
                       timeout: float | None = None, **sampling: Any) -> Completion:
        """Generate a completion. ``sampling`` takes SamplingParams fields
        (temperature=0 is greedy; grammar=GBNF; json_schema=...). ``session``
        names a conversation whose KV the worker keeps warm and on disk.
        ``logprobs=N`` reports each token's logprob and its N likeliest
        alternatives in ``Completion.logprobs``. ``keep_alive`` (seconds, -1:
        forever) is how long the model stays loaded once idle. ``resume``
        overrides the client's: resubmit if the worker dies (``stats.resumed``).
        ``speculative="lookup"`` drafts tokens by prompt lookup (``"draft"``: with the
        model's draft_model) and verifies them in the batch (same output;
        ``stats.drafted_tokens``/``accepted_tokens``), None turns it off, the default
        "model" follows the model's configuration."""
        args = self._generate_args(prompt, tokens, seq, max_tokens, stop, add_special,
                                   parse_special, ignore_eos, False, session, timeout,
                                   logprobs, keep_alive, sampling, speculative)
        raw, resumed = await self._request(model, "generate", args, timeout, resume)
        result = Completion.from_wire(raw)
        result.stats.resumed = resumed
        return result

    def stream(self, model: str, prompt: str | None = None, *,
               tokens: Sequence[int] | None = None, seq: int | None = None,
               max_tokens: int = protocol.DEFAULT_MAX_TOKENS, stop: Sequence[str] | str | None = None,
               add_special: bool = True, parse_special: bool = False,
               ignore_eos: bool = False, session: str | None = None,
               logprobs: int | None = None, keep_alive: float | None = None,
               resume: bool | None = None, speculative: str | None = "model",
               timeout: float | None = None, **sampling: Any) -> AsyncStream:
        """Like :meth:`generate`, but an async iterator of text deltas (with
        ``logprobs``, each chunk's entries are appended to ``AsyncStream.logprobs``).
        With ``resume``, a stream whose worker dies continues on another from the
        tokens it already produced (no text is repeated)."""
        args = self._generate_args(prompt, tokens, seq, max_tokens, stop, add_special,
                                   parse_special, ignore_eos, True, session, timeout,
                                   logprobs, keep_alive, sampling, speculative)
        return AsyncStream(self, model, args, timeout,
                           self.resume if resume is None else resume)

    async def kv_pack(self, model: str, seq: int, *, timeout: float | None = None) -> bytes:
        """The sequence's KV state as portable bytes."""
        r = await self._command(model, "kv_pack", protocol.KvBlob, {"seq": seq}, timeout)
        return bytes(r.data)

    async def kv_unpack(self, model: str, seq: int, data: bytes, *,
                        timeout: float | None = None) -> int:
        """Restore a sequence from ``kv_pack`` bytes; returns its token count."""
        r = await self._command(model, "kv_unpack", protocol.SeqLength,
                                {"seq": seq, "data": bytes(data)}, timeout)
        return r.n_tokens

    async def seq_clear(self, model: str, seq: int, *, timeout: float | None = None) -> None:
        await self.call(model, "seq_clear", {"seq": seq}, timeout=timeout)

    async def set_sampling(self, model: str, seq: int, *, timeout: float | None = None,
                           **sampling: Any) -> None:
        """Replace a sequence's sampler (used by :meth:`decode`)."""
        await self.call(model, "set_sampling", {"seq": seq, "sampling": sampling_from(sampling)},
                        timeout=timeout)

    async def set_grammar(self, model: str, seq: int, grammar: str | None = None, *,
                          json_schema: Any = None, timeout: float | None = None) -> None:
        """Constrain a sequence with GBNF or a JSON schema (greedy sampler)."""
        await self.call(model, "set_grammar", {"seq": seq, "grammar": grammar,
                                               "json_schema": json_schema}, timeout=timeout)

    async def load_adapter(self, model: str, name: str, path: str, *,
                           timeout: float | None = None) -> protocol.AdapterLoaded:
        """Load a LoRA adapter file (from the model's adapter_dirs) under ``name``."""
        return await self._command(model, "load_adapter", protocol.AdapterLoaded,
                                   {"name": name, "path": path}, timeout)

    async def unload_adapter(self, model: str, name: str, *,
                             timeout: float | None = None) -> None:
        await self.call(model, "unload_adapter", {"name": name}, timeout=timeout)

    async def set_adapters(self, model: str, scales: dict[str, float], *,
                           timeout: float | None = None) -> dict[str, Any]:
        """Apply this set of adapters (name -> scale); an empty map clears it."""
        r = await self._command(model, "set_adapters", protocol.Adapters,
                                {"scales": dict(scales)}, timeout)
        return dict(r.adapters)

    async def embed(self, model: str, texts: str | Sequence[str], *, normalize: bool = True,
                    timeout: float | None = None) -> list[list[float]]:
        """One pooled embedding per text."""
        items = [texts] if isinstance(texts, str) else list(texts)
        r = await self._command(model, "embed", protocol.Embeddings,
                                {"texts": items, "normalize": normalize}, timeout)
        return [list(v) for v in r.embeddings]

    async def apply_chat_template(self, model: str, messages: Sequence[dict[str, Any]], *,
                                  system: str | None = None, add_generation_prompt: bool = True,
                                  enable_thinking: bool | None = None,
                                  tools: Sequence[dict[str, Any]] | None = None,
                                  timeout: float | None = None) -> str:
        """Render messages with the model's chat template (``tools``: OpenAI-style
        function declarations, for templates that take them)."""
        r = await self._command(model, "apply_chat_template", protocol.Prompt, {
            "messages": [dict(m) for m in messages], "system": system,
            "add_generation_prompt": add_generation_prompt,
            "enable_thinking": enable_thinking,
            "tools": None if tools is None else [dict(t) for t in tools]}, timeout)
        return r.prompt

    async def chat(self, model: str, messages: Sequence[dict[str, Any]], *,
                   system: str | None = None, enable_thinking: bool | None = None,
                   tools: Sequence[dict[str, Any]] | None = None,
                   **kwargs: Any) -> Completion:
        """Render the chat template, then :meth:`generate` from it."""
        prompt = await self.apply_chat_template(model, messages, system=system,
                                                enable_thinking=enable_thinking, tools=tools)
        kwargs.setdefault("add_special", False)
        kwargs.setdefault("parse_special", True)
        return await self.generate(model, prompt, **kwargs)

    async def chat_stream(self, model: str, messages: Sequence[dict[str, Any]], *,
                          system: str | None = None, enable_thinking: bool | None = None,
                          tools: Sequence[dict[str, Any]] | None = None,
                          **kwargs: Any) -> AsyncStream:
        """Render the chat template, then :meth:`stream` from it."""
        prompt = await self.apply_chat_template(model, messages, system=system,
                                                enable_thinking=enable_thinking, tools=tools)
        kwargs.setdefault("add_special", False)
        kwargs.setdefault("parse_special", True)
        return self.stream(model, prompt, **kwargs)

