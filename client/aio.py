"""The asyncio client (the core; :class:`client.Client` wraps it).

One DEALER socket per model worker, found through the supervisor. A socket
monitor watches each worker connection: when the worker dies, every call in
flight on it ends at once with :class:`~runtime.errors.WorkerCrashed`
(retryable), and the next call looks the model up again and reaches the
restarted worker.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Sequence
from dataclasses import fields
from typing import Any, TypeVar

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from llamafleet.runtime import protocol
from llamafleet.runtime.config import default_address
from llamafleet.runtime.errors import (
    AuthenticationFailed,
    BadRequest,
    Cancelled,
    LlamafleetError,
    ProtocolError,
    RequestTimeout,
    Unavailable,
    WorkerCrashed,
    error_from_wire,
)
from llamafleet.runtime.protocol import Completion, Decoded
from llamafleet.runtime.sampling import SamplingParams

log = logging.getLogger("llamafleet.client")
R = TypeVar("R", bound=protocol.Message)
#: a call's default limit (seconds); a generation may take long
DEFAULT_TIMEOUT = 600.0
#: how long a call waits for a (re)starting worker, and for the supervisor to answer
DEFAULT_CONNECT_TIMEOUT = 30.0

SAMPLING_KEYS = frozenset(f.name for f in fields(SamplingParams))
_DEAD_EVENTS = {zmq.EVENT_DISCONNECTED, zmq.EVENT_CONNECT_RETRIED, zmq.EVENT_CLOSED,
                zmq.EVENT_MONITOR_STOPPED}
_AUTH_EVENTS = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                zmq.EVENT_HANDSHAKE_FAILED_AUTH}


def _auth_error(address: str) -> AuthenticationFailed:
    return AuthenticationFailed(
        f"CURVE handshake with {address} failed: wrong server key, a client key that is not "
        "authorized, or an endpoint that needs CURVE keys this client did not use")


def sampling_from(kwargs: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Split sampling keyword arguments out; TypeError for unknown ones."""
    unknown = set(kwargs) - SAMPLING_KEYS
    if unknown:
        raise TypeError(f"unknown argument(s): {', '.join(sorted(unknown))}")
    merged = {**(base or {}), **kwargs}
    SamplingParams.from_dict(dict(merged))  # fail early, client side
    return merged


class _Call:
    """A request in flight: replies are queued until the caller reads them."""

    __slots__ = ("id", "queue", "conn")

    def __init__(self, req_id: int, conn: _WorkerConn) -> None:
        self.id = req_id
        self.conn = conn
        self.queue: asyncio.Queue[dict[str, Any] | LlamafleetError] = asyncio.Queue()


class _WorkerConn:
    """The connection to one generation of one model's worker."""

    def __init__(self, client: AsyncClient, model: str, endpoint: str, generation: int) -> None:
        self.model = model
        self.endpoint = endpoint
        self.generation = generation
        self.calls: dict[int, _Call] = {}
        self.dead: LlamafleetError | None = None
        self.sock = client._ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        client._secure(self.sock, endpoint)
        self.monitor = self.sock.get_monitor_socket()
        self.sock.connect(endpoint)
        self.connected = False
        # a failed handshake means "refused" only where CURVE is in play; on ipc:// it
        # is a peer that died (or froze) mid-handshake
        self.secured = client._curve is not None and endpoint.startswith("tcp://")
        self.tasks = [asyncio.ensure_future(self._read()), asyncio.ensure_future(self._watch())]

    async def _read(self) -> None:
        try:
            while True:
                frames = await self.sock.recv_multipart()
                try:
                    msg = protocol.unpack(frames[-1])
                except ProtocolError as exc:
                    log.warning("dropping bad reply from %s: %s", self.model, exc)
                    continue
                call = self.calls.get(msg.get("id"))  # type: ignore[arg-type]
                if call is not None:
                    call.queue.put_nowait(msg)
        except (asyncio.CancelledError, zmq.ZMQError):
            pass

    async def _watch(self) -> None:
        try:
            while True:
                evt = parse_monitor_message(await self.monitor.recv_multipart())
                if evt["event"] == zmq.EVENT_CONNECTED:
                    self.connected = True
                elif evt["event"] in _AUTH_EVENTS and (
                        self.secured or evt["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH):
                    self.fail(_auth_error(self.endpoint))
                    return
                elif evt["event"] in _DEAD_EVENTS | _AUTH_EVENTS:
                    self.fail(WorkerCrashed(
                        f"worker of model {self.model} went away (generation {self.generation})",
                        data={"model": self.model, "generation": self.generation}))
                    return
        except (asyncio.CancelledError, zmq.ZMQError):
            pass

    def fail(self, err: LlamafleetError) -> None:
        """Mark dead and end every call in flight with ``err``."""
        if self.dead is None:
            self.dead = err
        for call in list(self.calls.values()):
            call.queue.put_nowait(err)
        self.close()

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


class AsyncStream:
    """Async iterator over the text deltas of a streamed generation.

    ``tokens`` collects token ids as they arrive; ``result`` holds the final
    :class:`Completion` once the stream is exhausted; ``cancel()`` stops it."""

    def __init__(self, client: AsyncClient, model: str, args: dict[str, Any],
                 timeout: float | None) -> None:
        self._client = client
        self._model = model
        self._args = args
        self._timeout = timeout
        self._call: _Call | None = None
        self._deadline: float | None = None
        self._done = False
        self.tokens: list[int] = []
        #: with ``logprobs``: one protocol.TokenLogprob map per token so far
        self.logprobs: list[protocol.TokenLogprob] = []
        self.result: Completion | None = None

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> str:
        if self._done:
            raise StopAsyncIteration
        loop = asyncio.get_running_loop()
        if self._call is None:
            t = self._client._timeout(self._timeout)
            self._deadline = loop.time() + t
            self._call = await self._client._send(self._model, "generate", self._args,
                                                  deadline=self._deadline)
        while True:
            try:
                msg = await self._client._next(self._call, self._deadline)
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
            self._client._forget(self._call)
            self.result = Completion.from_wire(msg["result"])
            raise StopAsyncIteration

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


class AsyncClient:
    """Talks to a fleet through its supervisor (asyncio).

    ``address`` is the supervisor's control address (default: the local runtime
    directory's). ``timeout`` is the default per-call limit in seconds;
    ``connect_timeout`` bounds how long a call waits for a (re)starting worker, and
    (unless ``control_timeout`` says otherwise) for the supervisor to answer at all:
    past it, a call raises the retryable :class:`Unavailable`.
    """

    def __init__(self, address: str | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 control_timeout: float | None = None,
                 curve_server_key: str | bytes | None = None,
                 curve_client_cert: str | None = None) -> None:
        self.address = address or default_address()
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
        self._ids = itertools.count(1)
        self._conns: dict[str, _WorkerConn] = {}
        self._control: zmq.asyncio.Socket | None = None
        self._control_calls: dict[int, asyncio.Queue[dict[str, Any]]] = {}
        self._control_reader: asyncio.Future[None] | None = None
        self._control_monitor: zmq.asyncio.Socket | None = None
        #: set while the control connection's handshake has succeeded
        self._control_up = asyncio.Event()
        self._control_error: LlamafleetError | None = None
        self._lookups: dict[str, asyncio.Lock] = {}
        self._dead_generation: dict[str, int] = {}
        self._closed = False

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every socket. Calls in flight end with Cancelled."""
        if self._closed:
            return
        self._closed = True
        for conn in list(self._conns.values()):
            conn.fail(Cancelled("client closed"))
        self._conns.clear()
        self._end_control_calls(Cancelled("client closed"))
        self._close_control()
        self._ctx.term()

    # -- plumbing -------------------------------------------------------------------
    def _secure(self, sock: zmq.asyncio.Socket, endpoint: str) -> None:
        if self._curve is not None and endpoint.startswith("tcp://"):
            from llamafleet.runtime import security
            security.make_client(sock, *self._curve)

    def _timeout(self, timeout: float | None) -> float:
        return self.default_timeout if timeout is None else float(timeout)

    def _open_control(self) -> zmq.asyncio.Socket:
        """The DEALER to the supervisor, with a monitor that tells when it is up."""
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
        if self._closed:
            raise Cancelled("client closed")
        protocol.validate_args(cmd, args)
        control = self._open_control()
        limit = self.default_timeout if timeout is None else timeout
        if not self._control_up.is_set() or self._control_error is not None:
            # a DEALER queues messages for a peer that is not there: without this wait a
            # call to an address where nothing listens would wait for its whole timeout
            try:
                await asyncio.wait_for(self._control_up.wait(),
                                       min(limit, self.control_timeout))
            except TimeoutError:
                raise Unavailable(
                    f"no supervisor is answering at {self.address}: start a fleet with "
                    "`llamafleet serve --config FILE` (or pass the right --address)",
                    data={"address": self.address}) from None
            if self._control_error is not None:  # a fresh copy: no growing traceback
                raise error_from_wire(self._control_error.to_wire())
        req_id = next(self._ids)
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._control_calls[req_id] = q
        try:
            await control.send(protocol.request(req_id, cmd, args))
            try:
                msg = await asyncio.wait_for(q.get(), limit)
            except TimeoutError:
                raise RequestTimeout(f"supervisor at {self.address} did not answer {cmd} "
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
                            self._end_control_calls(_auth_error(self.address))
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

    async def _conn(self, model: str, deadline: float) -> _WorkerConn:
        conn = self._conns.get(model)
        if conn is not None and conn.dead is None:
            return conn
        lock = self._lookups.setdefault(model, asyncio.Lock())
        async with lock:
            conn = self._conns.get(model)
            if conn is not None and conn.dead is None:
                return conn
            if conn is not None:
                self._dead_generation[model] = max(self._dead_generation.get(model, 0),
                                                   conn.generation)
            left = deadline - asyncio.get_running_loop().time()
            wait = max(0.0, min(left, self.connect_timeout))
            found = await self._supervisor("lookup", {
                "model": model, "wait_ms": int(wait * 1000),
                "after_generation": self._dead_generation.get(model, 0)}, timeout=wait + 5.0)
            conn = _WorkerConn(self, model, found["endpoint"], found["generation"])
            self._conns[model] = conn
            return conn

    async def _send(self, model: str, cmd: str, args: dict[str, Any], *,
                    deadline: float) -> _Call:
        protocol.validate_args(cmd, args)
        if self._closed:
            raise Cancelled("client closed")
        conn = await self._conn(model, deadline)
        call = _Call(next(self._ids), conn)
        frame = protocol.request(call.id, cmd, args)  # BadRequest before it is registered
        conn.calls[call.id] = call
        await conn.sock.send(frame)
        return call

    async def _next(self, call: _Call, deadline: float | None) -> dict[str, Any]:
        """The next reply of a call; raises its error."""
        if not call.queue.empty():  # streaming fast path: no timer, no extra task
            msg = call.queue.get_nowait()
        else:
            try:
                # a timer on this task, not wait_for's extra task per reply
                async with asyncio.timeout_at(deadline):
                    msg = await call.queue.get()
            except TimeoutError:
                raise RequestTimeout(f"no reply from model {call.conn.model} in time") from None
        if isinstance(msg, LlamafleetError):
            raise msg
        if msg["kind"] == "error":
            raise error_from_wire(msg["error"])
        return msg

    def _forget(self, call: _Call) -> None:
        call.conn.calls.pop(call.id, None)

    async def _cancel_remote(self, call: _Call) -> None:
        if call.conn.dead is None:
            try:
                await call.conn.sock.send(protocol.request(
                    next(self._ids), "cancel", {"target": call.id}), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    async def call(self, model: str, cmd: str, args: dict[str, Any] | None = None, *,
                   timeout: float | None = None) -> Any:
        """Send one worker command and return its result (the raw protocol)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout(timeout)
        call = await self._send(model, cmd, dict(args or {}), deadline=deadline)
        try:
            while True:
                msg = await self._next(call, deadline)
                if msg["kind"] == "result":
                    return msg["result"]
        except (RequestTimeout, asyncio.CancelledError):
            await self._cancel_remote(call)
            raise
        finally:
            self._forget(call)

    async def _command(self, model: str, cmd: str, reply: type[R], args: dict[str, Any] | None,
                       timeout: float | None) -> R:
        """One worker command, its result decoded as the protocol declares it."""
        assert protocol.COMMANDS[cmd].reply is reply
        return reply.from_wire(await self.call(model, cmd, args, timeout=timeout))

    # -- supervisor ---------------------------------------------------------------------
    async def status(self, *, timeout: float | None = 10.0) -> list[dict[str, Any]]:
        """One dict per worker: model, pid, state, restarts, last_exit, ..."""
        return (await self._supervisor("status", {}, timeout))["workers"]

    async def fleet_status(self, *, timeout: float | None = 10.0) -> dict[str, Any]:
        """The whole ``status`` reply: ``workers``, ``services`` (the HTTP gateway),
        the supervisor's ``address`` and ``pid``."""
        return dict(await self._supervisor("status", {}, timeout))

    async def lookup(self, model: str, *, wait: float = 0.0) -> protocol.WorkerEndpoint:
        """Where the model's worker is (waits up to ``wait`` s for readiness)."""
        return protocol.WorkerEndpoint.from_wire(await self._supervisor(
            "lookup", {"model": model, "wait_ms": int(wait * 1000)}, timeout=wait + 5.0))

    async def shutdown_fleet(self) -> None:
        """Ask the supervisor to shut the whole fleet down gracefully."""
        await self._supervisor("shutdown", {}, timeout=10.0)

    # -- model commands -------------------------------------------------------------------
    async def ping(self, model: str, *, timeout: float | None = None) -> protocol.Pong:
        """A round trip to the model's worker."""
        return await self._command(model, "ping", protocol.Pong, None, timeout)

    async def info(self, model: str, *, timeout: float | None = None) -> protocol.Info:
        """Model metadata, backend, limits, default sampling, adapters, scheduler and cache."""
        return await self._command(model, "info", protocol.Info, None, timeout)

    async def metrics(self, model: str, *, timeout: float | None = None) -> protocol.WorkerMetrics:
        """The worker's counters, gauges and histograms (what /metrics exports)."""
        return await self._command(model, "metrics", protocol.WorkerMetrics, None, timeout)

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
                       sampling: dict[str, Any]) -> dict[str, Any]:
        if (prompt is None) == (tokens is None):
            raise BadRequest("give exactly one of prompt or tokens")
        if isinstance(stop, str):
            stop = [stop]
        # the worker drops the request itself when the caller's timeout has passed
        deadline_ms = int(self._timeout(timeout) * 1000) + 50
        return {"prompt": prompt, "tokens": None if tokens is None else list(tokens),
                "seq": seq, "max_tokens": max_tokens, "stop": list(stop or []),
                "sampling": sampling_from(sampling), "add_special": add_special,
                "parse_special": parse_special, "ignore_eos": ignore_eos, "stream": stream,
                "session": session, "deadline_ms": deadline_ms, "logprobs": logprobs}

    async def generate(self, model: str, prompt: str | None = None, *,
                       tokens: Sequence[int] | None = None, seq: int | None = None,
                       max_tokens: int = protocol.DEFAULT_MAX_TOKENS, stop: Sequence[str] | str | None = None,
                       add_special: bool = True, parse_special: bool = False,
                       ignore_eos: bool = False, session: str | None = None,
                       logprobs: int | None = None,
                       timeout: float | None = None, **sampling: Any) -> Completion:
        """Generate a completion. ``sampling`` takes SamplingParams fields
        (temperature=0 is greedy; grammar=GBNF; json_schema=...). ``session``
        names a conversation whose KV the worker keeps warm and on disk.
        ``logprobs=N`` reports each token's logprob and its N likeliest
        alternatives in ``Completion.logprobs``."""
        args = self._generate_args(prompt, tokens, seq, max_tokens, stop, add_special,
                                   parse_special, ignore_eos, False, session, timeout,
                                   logprobs, sampling)
        return await self._command(model, "generate", Completion, args, timeout)

    def stream(self, model: str, prompt: str | None = None, *,
               tokens: Sequence[int] | None = None, seq: int | None = None,
               max_tokens: int = protocol.DEFAULT_MAX_TOKENS, stop: Sequence[str] | str | None = None,
               add_special: bool = True, parse_special: bool = False,
               ignore_eos: bool = False, session: str | None = None,
               logprobs: int | None = None,
               timeout: float | None = None, **sampling: Any) -> AsyncStream:
        """Like :meth:`generate`, but an async iterator of text deltas (with
        ``logprobs``, each chunk's entries are appended to ``AsyncStream.logprobs``)."""
        args = self._generate_args(prompt, tokens, seq, max_tokens, stop, add_special,
                                   parse_special, ignore_eos, True, session, timeout,
                                   logprobs, sampling)
        return AsyncStream(self, model, args, timeout)

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

