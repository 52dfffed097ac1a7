"""Connections to a model's workers, and which replica a request goes to.

A :class:`WorkerConn` is one DEALER socket to one worker generation, with a socket
monitor: when the worker dies, every call in flight on it ends at once with
:class:`~runtime.errors.WorkerCrashed`. A :class:`ModelPool` holds the connections
to every ready replica of one model and picks one per request: the replica with
the fewest of this client's requests in flight (ties in turn), a named session's
replica by rendezvous hashing (it stays put while that replica lives), an explicit
sequence's by its number (its KV lives there).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import zmq
from zmq.utils.monitor import parse_monitor_message

from llamafleet.runtime import protocol
from llamafleet.runtime.errors import (
    AuthenticationFailed,
    LlamafleetError,
    ProtocolError,
    WorkerCrashed,
)

if TYPE_CHECKING:
    from llamafleet.client.aio import AsyncClient

log = logging.getLogger("llamafleet.client")

_DEAD_EVENTS = {zmq.EVENT_DISCONNECTED, zmq.EVENT_CONNECT_RETRIED, zmq.EVENT_CLOSED,
                zmq.EVENT_MONITOR_STOPPED}
_AUTH_EVENTS = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                zmq.EVENT_HANDSHAKE_FAILED_AUTH}
#: how often (seconds) a pool with fewer live replicas than configured asks again
REFRESH_S = 0.5
#: how often (seconds) a pool in use looks the model up again in the background
#: (a reload may have changed its replicas)
RESCAN_S = 5.0
#: dead generations remembered per model (sent as ``lookup``'s ``exclude``)
MAX_DEAD = 64


def auth_error(address: str) -> AuthenticationFailed:
    return AuthenticationFailed(
        f"CURVE handshake with {address} failed: wrong server key, a client key that is not "
        "authorized, or an endpoint that needs CURVE keys this client did not use")


#: ``EVENTS`` and ``POLLIN`` as plain ints (pyzmq's enums cost a microsecond an operation)
EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)
Reply = dict[str, Any] | LlamafleetError


def readable(sock: zmq.Socket[Any]) -> bool:
    """A message is waiting on ``sock`` (this also re-arms its descriptor)."""
    return bool(cast(int, sock.get(EVENTS)) & POLLIN)


class Call:
    """A request in flight: replies are queued until the caller reads them (one
    future at a time, and one timer per wait: no queue, no extra task)."""

    __slots__ = ("id", "conn", "inbox", "waiter")

    def __init__(self, req_id: int, conn: WorkerConn) -> None:
        self.id = req_id
        self.conn = conn
        self.inbox: deque[Reply] = deque()
        self.waiter: asyncio.Future[None] | None = None

    def put(self, item: Reply) -> None:
        """Hand the caller a reply, or the error that ends the call (on the loop)."""
        self.inbox.append(item)
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def get(self, deadline: float | None) -> Reply | None:
        """The next reply; None once ``deadline`` (``time.monotonic()``) has passed."""
        if self.inbox:
            return self.inbox.popleft()
        loop = asyncio.get_running_loop()
        w = self.waiter = loop.create_future()
        timer = None if deadline is None else loop.call_later(
            deadline - time.monotonic(), _expire, w)
        try:
            await w
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()
        return self.inbox.popleft() if self.inbox else None


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def configure(sock: zmq.Socket[Any], client: AsyncClient, endpoint: str) -> None:
    """The options of every client socket to a worker (CURVE where the client has keys)."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    client._secure(sock, endpoint)


class WorkerConn:
    """The connection to one generation of one replica of a model's worker.

    Its socket and its monitor are plain (blocking-API) sockets read from loop
    callbacks (``add_reader`` on their file descriptors): a reply costs one wake-up
    of the loop and no future of pyzmq's own. A ZeroMQ descriptor only signals that
    the socket's state changed, so every read drains until ``EVENTS`` shows nothing,
    and every send checks for input the send itself may have absorbed."""

    def __init__(self, client: AsyncClient, found: protocol.WorkerEndpoint) -> None:
        self.model = found.model
        self.endpoint = found.endpoint
        self.generation = found.generation
        self.replica = found.replica
        self.calls: dict[int, Call] = {}
        self.dead: LlamafleetError | None = None
        #: no new requests (the worker is leaving); closed once its calls end
        self.retired = False
        self.sock: zmq.Socket[Any] = client._plain_ctx.socket(zmq.DEALER)
        configure(self.sock, client, self.endpoint)
        self.monitor: zmq.Socket[Any] = self.sock.get_monitor_socket()
        self.sock.connect(self.endpoint)
        self.connected = False
        # a failed handshake means "refused" only where CURVE is in play; on ipc:// it
        # is a peer that died (or froze) mid-handshake
        self.secured = client._curve is not None and self.endpoint.startswith("tcp://")
        self._loop = asyncio.get_running_loop()
        self._fds = (self.sock.getsockopt(zmq.FD), self.monitor.getsockopt(zmq.FD))
        self._closed = False
        self._loop.add_reader(self._fds[0], self._drain)
        self._loop.add_reader(self._fds[1], self._watch)
        # the descriptor is signalled only once the mailbox has been read: read it now
        self._watch()
        self._drain()

    async def send(self, frame: bytes) -> None:
        """Queue one request frame (waiting only while the socket is at its
        high-water mark)."""
        while True:
            try:
                self.sock.send(frame, zmq.NOBLOCK)
                break
            except zmq.Again:
                await asyncio.sleep(0.001)
        self._drain()  # a reply the send took the descriptor's signal for

    def _drain(self) -> None:
        try:
            while not self._closed and readable(self.sock):
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
                try:
                    msg = protocol.unpack(frames[-1])
                except ProtocolError as exc:
                    log.warning("dropping bad reply from %s: %s", self.model, exc)
                    continue
                call = self.calls.get(msg.get("id"))  # type: ignore[arg-type]
                if call is not None:
                    call.put(msg)
        except zmq.ZMQError:
            pass

    def _watch(self) -> None:
        try:
            while not self._closed and readable(self.monitor):
                evt = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
                if evt["event"] == zmq.EVENT_CONNECTED:
                    self.connected = True
                elif evt["event"] in _AUTH_EVENTS and (
                        self.secured or evt["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH):
                    self.fail(auth_error(self.endpoint))
                elif evt["event"] in _DEAD_EVENTS | _AUTH_EVENTS:
                    self.fail(WorkerCrashed(
                        f"worker of model {self.model} went away (generation {self.generation})",
                        data={"model": self.model, "generation": self.generation,
                              "replica": self.replica}))
        except zmq.ZMQError:
            pass

    def fail(self, err: LlamafleetError) -> None:
        """Mark dead and end every call in flight with ``err``."""
        if self.dead is None:
            self.dead = err
        for call in list(self.calls.values()):
            call.put(err)
        self.close()

    def close(self) -> None:
        """Close both sockets (on the loop's thread)."""
        if self._closed:
            return
        self._closed = True
        for fd in self._fds:
            self._loop.remove_reader(fd)
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


def rendezvous(key: str, choices: Sequence[int]) -> int:
    """The choice with the highest hash of (key, choice): stable while it exists, and
    only the keys of a choice that goes away move."""
    def weight(choice: int) -> bytes:
        return hashlib.blake2b(f"{key}\0{choice}".encode(), digest_size=8).digest()
    return max(choices, key=weight)


def least_loaded(load: Sequence[int], turn: int) -> int:
    """The index of the smallest load; ties go round-robin from ``turn``."""
    n = len(load)
    return min(range(n), key=lambda i: (load[i], (i - turn) % n))


class ModelPool:
    """This client's connections to the workers of one model."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.conns: dict[int, WorkerConn] = {}  # by generation
        #: generations seen dead or leaving (a lookup does not answer them again)
        self.dead: deque[int] = deque(maxlen=MAX_DEAD)
        self.replicas = 1
        self.refreshed = float("-inf")
        self.lock = asyncio.Lock()
        #: the background lookup of :meth:`stale` pools, while it runs
        self.rescan: asyncio.Future[None] | None = None
        # where the round-robin starts: random, so that many clients spread out
        self._turn = random.randrange(1 << 16)

    def live(self) -> list[WorkerConn]:
        """The connections new requests may use (forgetting the dead ones)."""
        out = []
        for conn in list(self.conns.values()):
            if conn.dead is not None:
                self._bury(conn)
            elif not conn.retired:
                out.append(conn)
        return out

    def _bury(self, conn: WorkerConn) -> None:
        if conn.generation not in self.dead:
            self.dead.append(conn.generation)
        self.conns.pop(conn.generation, None)

    def retire(self, conn: WorkerConn) -> None:
        """Send ``conn`` nothing new; close it once its calls end."""
        conn.retired = True
        if conn.generation not in self.dead:
            self.dead.append(conn.generation)
        self.release(conn)

    def release(self, conn: WorkerConn) -> None:
        """A call on ``conn`` ended: a retired connection with none left closes."""
        if conn.retired and not conn.calls:
            if conn.dead is None:
                conn.close()
            self.conns.pop(conn.generation, None)

    def needs_lookup(self, now: float) -> bool:
        """No live worker: a request must wait for a lookup."""
        return not self.live()

    def stale(self, now: float) -> bool:
        """Due for a lookup in the background, which no request waits for (a
        supervisor that is slow or gone delays nothing): every ``REFRESH_S`` while
        fewer replicas are live than the model has, else every ``RESCAN_S``."""
        if self.rescan is not None and not self.rescan.done():
            return False
        period = REFRESH_S if len(self.live()) < self.replicas else RESCAN_S
        return now - self.refreshed >= period

    def update(self, found: protocol.ModelEndpoints, now: float,
               connect: Callable[[protocol.WorkerEndpoint], WorkerConn]) -> None:
        """Take a ``lookup`` answer: connect to new workers, retire unlisted ones."""
        self.replicas = found.replicas
        self.refreshed = now
        listed = {e.generation for e in found.endpoints}
        replica_of = {e.generation: e.replica for e in found.endpoints}
        for conn in self.live():
            if conn.generation not in listed:
                self.retire(conn)
            else:  # a cluster renumbers its replicas when a node's move elsewhere
                conn.replica = replica_of[conn.generation]
        for e in found.endpoints:
            if e.generation not in self.conns and e.generation not in self.dead:
                self.conns[e.generation] = connect(e)

    def pick(self, live: list[WorkerConn], session: str | None = None,
             seq: int | None = None) -> WorkerConn | None:
        """The connection for one request (None: an explicit sequence's replica is not
        among ``live``)."""
        if seq is not None:
            want = seq % max(1, self.replicas)
            return next((c for c in live if c.replica == want), None)
        if session is not None and len(live) > 1:
            replica = rendezvous(session, [c.replica for c in live])
            return next(c for c in live if c.replica == replica)
        if len(live) == 1:
            return live[0]
        live = sorted(live, key=lambda c: c.replica)
        i = least_loaded([len(c.calls) for c in live], self._turn)
        self._turn = (i + 1) % len(live)
        return live[i]

    def close(self, err: LlamafleetError) -> None:
        if self.rescan is not None:
            self.rescan.cancel()
        for conn in list(self.conns.values()):
            conn.fail(err)
        self.conns.clear()
