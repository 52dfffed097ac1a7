"""The synchronous client: the asyncio client, with the caller's thread doing the I/O
of each model command.

Every method of :class:`client.AsyncClient` exists here with the same arguments and
returns the same value, blocking the caller; ``stream`` returns an ordinary iterator.
A Client is safe to share between threads.

A model command (``ping``, ``generate``, ``tokenize``, ...) runs the asyncio client's
own coroutine on the calling thread, with :class:`ThreadIO` as its RequestIO: the
request goes out on a plain DEALER socket that thread owns (one per worker it talks
to) and the thread blocks on that socket for the reply. So a small request costs one
round trip to the worker, not two thread hops more; timeouts, typed errors and
resending after a crash are the asyncio client's ``_request``, unchanged. What needs
the event loop runs on a private I/O thread, as before: supervisor commands, finding
a model's workers (``lookup``), each connection's monitor (a worker that dies wakes
the calls waiting on it) and streams.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import queue
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import zmq

from llamafleet.client.aio import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
    AsyncClient,
    AsyncStream,
    _now,
)
from llamafleet.client.pool import POLLIN, Call, Reply, WorkerConn, configure, readable
from llamafleet.runtime import protocol
from llamafleet.runtime.errors import Cancelled, LlamafleetError, ProtocolError, error_from_wire
from llamafleet.runtime.protocol import Completion

T = TypeVar("T")
log = logging.getLogger("llamafleet.client")


class Stream:
    """Iterator over the text deltas of a generation (see :class:`AsyncStream`).

    ``result`` is the final :class:`Completion` once exhausted; ``cancel()`` (or
    leaving a ``with`` block early) stops the generation on the worker."""

    _END = object()

    def __init__(self, client: Client, inner: AsyncStream) -> None:
        self._client = client
        self._inner = inner
        # One pump on the client's loop feeds a thread-safe queue: no cross-thread
        # round trip per token.
        self._items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pump: Any = None
        self._finished = False
        #: token ids of the deltas returned so far (in step with the caller)
        self.tokens: list[int] = []

    async def _run_pump(self) -> None:
        try:
            seen = 0
            async for delta in self._inner:
                new = self._inner.tokens[seen:]
                seen = len(self._inner.tokens)
                self._items.put((delta, new))
            self._final_tokens = list(self._inner.tokens)
            self._items.put(self._END)
        except BaseException as exc:  # handed to the iterating thread
            self._items.put(exc)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._finished:
            raise StopIteration
        if self._pump is None:
            if self._client._closed:
                raise Cancelled("client closed")
            self._pump = asyncio.run_coroutine_threadsafe(self._run_pump(), self._client._loop)
        try:
            item = self._items.get()
        except KeyboardInterrupt:
            self.cancel()
            raise
        if item is self._END:
            self._finished = True
            self.tokens = self._final_tokens  # tokens that came with no text delta
            raise StopIteration
        if isinstance(item, BaseException):
            self._finished = True
            if isinstance(item, asyncio.CancelledError):
                raise Cancelled("stream cancelled") from None
            raise item
        delta, new = item
        self.tokens.extend(new)
        return delta

    @property
    def result(self) -> Completion | None:
        return self._inner.result

    def cancel(self) -> None:
        self._finished = True
        if self._pump is not None:
            self._pump.cancel()
        if not self._client._closed:
            self._client._run(self._inner.cancel())

    close = cancel

    def collect(self) -> Completion:
        """Consume the rest and return the Completion."""
        for _ in self:
            pass
        assert self._inner.result is not None
        return self._inner.result

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cancel()

    def __del__(self) -> None:
        try:
            if not self._inner._done and not self._client._closed:
                self.cancel()
        except Exception:
            pass


class ThreadCall(Call):
    """A call made on a caller's thread. Its replies come on that thread's own socket;
    the I/O thread only hands it the error that ends it (its worker died, the client
    closed), waking the thread through an eventfd."""

    __slots__ = ("error", "state")

    def __init__(self, req_id: int, conn: WorkerConn, state: _ThreadState) -> None:
        self.id = req_id
        self.conn = conn
        self.state = state
        self.error: LlamafleetError | None = None

    def put(self, item: Reply) -> None:
        if isinstance(item, LlamafleetError) and self.error is None:
            self.error = item
            self.state.woken = True
            os.eventfd_write(self.state.wake, 1)


class _ThreadState:
    """One caller thread's sockets (one per worker connection) and its wake-up fd;
    ``lock`` is held while the thread has a call in flight."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.socks: dict[WorkerConn, zmq.Socket[Any]] = {}
        self.wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        #: the eventfd may have been written (by a call's put, on the I/O thread)
        self.woken = False
        self.closed = False

    def reset(self) -> None:
        """Clear the wake-up fd (a late wake-up of an earlier call included)."""
        self.woken = False
        try:
            os.eventfd_read(self.wake)
        except BlockingIOError:
            pass

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close(linger=0)
        self.socks.clear()
        os.close(self.wake)
        self.closed = True


class ThreadIO:
    """The RequestIO of the sync client's model commands: the caller's thread sends
    on a socket of its own and blocks on it (no hop to the I/O thread), choosing the
    worker from the asyncio client's pool. Only what the pool lacks goes to the I/O
    thread: a lookup (the first call, a replica that is not ready yet)."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._async = client._async
        self._local = threading.local()
        self._states: list[_ThreadState] = []
        self._states_lock = threading.Lock()
        #: the pool's replica choice (round-robin turn) is made under this lock
        self._pick_lock = threading.Lock()

    def _state(self) -> _ThreadState:
        st: _ThreadState | None = getattr(self._local, "state", None)
        if st is None:
            st = self._local.state = _ThreadState()
            with self._states_lock:
                self._states.append(st)
        return st

    def _sock(self, st: _ThreadState, conn: WorkerConn) -> zmq.Socket[Any]:
        sock = st.socks.get(conn)
        if sock is None:
            for old in [c for c in st.socks if c.dead is not None or c.retired]:
                st.socks.pop(old).close(linger=0)
            sock = st.socks[conn] = self._async._plain_ctx.socket(zmq.DEALER)
            configure(sock, self._async, conn.endpoint)
            sock.connect(conn.endpoint)
        return sock

    def _conn(self, model: str, deadline: float, session: str | None,
              seq: int | None) -> WorkerConn:
        pool = self._async._pools.get(model)
        if pool is not None and not pool.needs_lookup(_now()):
            if pool.stale(_now()):  # the background lookup runs on the loop
                self._client._loop.call_soon_threadsafe(self._async._rescan_soon, pool)
            with self._pick_lock:
                conn = pool.pick(pool.live(), session, seq)
            if conn is not None:
                return conn
        return self._client._run(self._async._conn(model, deadline, session, seq))

    async def _send(self, model: str, cmd: str, args: dict[str, Any], *,
                    deadline: float, replica: int | None = None) -> Call:
        a = self._async
        a._check_send(cmd, args)
        conn = self._conn(model, deadline, *a._route(args, replica))
        a._check_replica(conn, replica)
        st = self._state()
        st.lock.acquire()  # released by _forget
        try:
            if a._closed or st.closed:
                raise Cancelled("client closed")
            if st.woken:
                st.reset()
            call = ThreadCall(next(a._ids), conn, st)
            frame = a._frame(call, cmd, args)
        except BaseException:
            st.lock.release()
            raise
        if conn.dead is not None:  # it died before the call was registered: the call
            call.error = conn.dead  # ends as if it died after (resume decides)
            return call
        try:
            self._sock(st, conn).send(frame)
        except BaseException:
            conn.calls.pop(call.id, None)
            st.lock.release()
            raise
        return call

    async def _next(self, call: Call, deadline: float | None) -> dict[str, Any]:
        assert isinstance(call, ThreadCall)
        st = call.state
        if call.error is not None:
            raise error_from_wire(call.error.to_wire())
        sock = st.socks[call.conn]
        items: list[tuple[Any, int]] = [(sock, POLLIN), (st.wake, POLLIN)]
        while True:
            if call.error is not None:
                raise error_from_wire(call.error.to_wire())  # a copy per thread
            left = None if deadline is None else deadline - _now()
            if left is not None and left <= 0:
                raise self._async._timed_out(call)
            ready = zmq.zmq_poll(items, -1 if left is None else int(left * 1000) + 1)
            if st.woken:
                st.reset()
            if ready and ready[0][0] is sock:
                while readable(sock):
                    try:
                        msg = protocol.unpack(sock.recv(zmq.NOBLOCK))
                    except ProtocolError:
                        continue
                    if msg.get("id") == call.id:
                        return self._async._reply(call, msg, self._retire)
                    # else a late reply to an earlier call of this thread

    async def _cancel_remote(self, call: Call) -> None:
        assert isinstance(call, ThreadCall)
        sock = call.state.socks.get(call.conn)
        if sock is not None:
            self._async._cancel_on(sock, call)

    def _forget(self, call: Call) -> None:
        conn = call.conn
        conn.calls.pop(call.id, None)
        if conn.retired:  # the pool closes a retired connection on its own thread
            self._client._loop.call_soon_threadsafe(self._async._forget, call)
        assert isinstance(call, ThreadCall)
        st = call.state
        if self._async._closed and not st.closed:
            st.close()
        st.lock.release()

    def _retire(self, conn: WorkerConn) -> None:
        """The worker is leaving: no request of any thread goes to it from now on (the
        flag); the pool's own bookkeeping follows on the I/O thread."""
        conn.retired = True
        self._client._loop.call_soon_threadsafe(self._async._pool(conn.model).retire, conn)

    def close(self) -> None:
        """Close every thread's sockets (waiting for the calls in flight to end: the
        client's close has already failed them)."""
        with self._states_lock:
            states, self._states = self._states, []
        for st in states:
            if st.lock.acquire(timeout=5):
                try:
                    if not st.closed:
                        st.close()
                finally:
                    st.lock.release()


def _blocking(name: str) -> Callable[..., Any]:
    """A method that runs the asyncio client's coroutine on the I/O thread."""
    target = getattr(AsyncClient, name)

    @functools.wraps(target)
    def method(self: Client, *args: Any, **kwargs: Any) -> Any:
        return self._run(getattr(self._async, name)(*args, **kwargs))

    return method


def _direct(name: str) -> Callable[..., Any]:
    """A model command: the asyncio client's coroutine, run on the calling thread with
    ThreadIO (it never suspends: each of its awaits blocks this thread instead)."""
    target = getattr(AsyncClient, name)

    @functools.wraps(target)
    def method(self: Client, *args: Any, **kwargs: Any) -> Any:
        return self._inline(getattr(self._async, name)(*args, **kwargs))

    return method


class Client:
    """Synchronous client of a fleet (same methods as :class:`AsyncClient`)."""

    def __init__(self, address: str | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 control_timeout: float | None = None,
                 curve_server_key: str | bytes | None = None,
                 curve_client_cert: str | None = None, resume: bool = True) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="llamafleet-client", daemon=True)
        self._thread.start()
        self._closed = False

        async def make() -> AsyncClient:
            return AsyncClient(address, timeout=timeout, connect_timeout=connect_timeout,
                               control_timeout=control_timeout,
                               curve_server_key=curve_server_key,
                               curve_client_cert=curve_client_cert, resume=resume)

        self._async: AsyncClient = self._run(make())
        self._thread_io = ThreadIO(self)

    @property
    def address(self) -> str:
        """The supervisor this client talks to now (see :attr:`addresses`)."""
        return self._async.address

    @property
    def addresses(self) -> list[str]:
        """Every supervisor address this client was given, in order."""
        return list(self._async.addresses)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise Cancelled("client closed")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result()
        except KeyboardInterrupt:
            fut.cancel()
            raise

    def _inline(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a model command's coroutine on this thread, its I/O through ThreadIO."""
        if self._closed:
            coro.close()
            raise Cancelled("client closed")
        local = self._async._inline
        local.io = self._thread_io
        try:
            coro.send(None)
        except StopIteration as done:
            return done.value
        finally:
            local.io = None
        coro.close()
        raise RuntimeError(f"{getattr(coro, '__qualname__', coro)} waited on the event loop from the calling "
                           "thread (only ThreadIO's blocking awaits may run there)")

    def close(self) -> None:
        """Close the sockets and stop the I/O thread."""
        if self._closed:
            return

        async def shutdown() -> None:
            await self._async.close(term=False)
            # end whatever is still waiting (abandoned streams, pumps) before the
            # loop goes away
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        self._run(shutdown())
        self._closed = True
        self._thread_io.close()  # the calls in flight on callers' threads have ended
        # a socket still open would make term() wait forever (a CI teardown once did):
        # close what a cancelled task or an abandoned call left behind, then end
        for ctx in (self._async._plain_ctx, self._async._ctx):
            for sock in list(getattr(ctx, "_sockets", None) or ()):
                if not sock.closed:
                    log.warning("closing a socket left open at client close: %s", sock)
                    sock.close(linger=0)
        self._async._ctx.term()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def stream(self, model: str, prompt: str | None = None, **kwargs: Any) -> Stream:
        """Iterator of text deltas (see :meth:`AsyncClient.stream`)."""
        return Stream(self, self._async.stream(model, prompt, **kwargs))

    def chat_stream(self, model: str, messages: Any, **kwargs: Any) -> Stream:
        """Render the chat template, then stream (see :meth:`AsyncClient.chat_stream`)."""
        return Stream(self, self._run(self._async.chat_stream(model, messages, **kwargs)))

    status = _blocking("status")
    fleet_status = _blocking("fleet_status")
    lookup = _blocking("lookup")
    load = _blocking("load")
    unload = _blocking("unload")
    reload = _blocking("reload")
    shutdown_fleet = _blocking("shutdown_fleet")
    call = _direct("call")
    ping = _direct("ping")
    info = _direct("info")
    metrics = _direct("metrics")
    tokenize = _direct("tokenize")
    detokenize = _direct("detokenize")
    prefill = _direct("prefill")
    decode = _direct("decode")
    generate = _direct("generate")
    kv_pack = _direct("kv_pack")
    kv_unpack = _direct("kv_unpack")
    seq_clear = _direct("seq_clear")
    set_sampling = _direct("set_sampling")
    set_grammar = _direct("set_grammar")
    load_adapter = _direct("load_adapter")
    unload_adapter = _direct("unload_adapter")
    set_adapters = _direct("set_adapters")
    embed = _direct("embed")
    apply_chat_template = _direct("apply_chat_template")
    chat = _direct("chat")


def _check_mirror() -> None:
    """Every public coroutine of AsyncClient has its blocking twin (checked on import)."""
    wrapped = {name for name, v in vars(Client).items() if hasattr(v, "__wrapped__")}
    special = {"close", "chat_stream"}  # stream/chat_stream return a Stream; close is own
    coros = {name for name, v in vars(AsyncClient).items()
             if not name.startswith("_") and inspect.iscoroutinefunction(v)}
    missing = coros - wrapped - special
    if missing:
        raise AssertionError(f"Client lacks blocking versions of {sorted(missing)}")


_check_mirror()
