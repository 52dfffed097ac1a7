"""The synchronous client: the asyncio client driven from a private thread.

Every method of :class:`client.AsyncClient` exists here with the same
arguments and returns the same value, blocking the caller; ``stream`` returns
an ordinary iterator. A Client is safe to share between threads.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import queue
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

from llamafleet.client.aio import DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT, AsyncClient, AsyncStream
from llamafleet.runtime.protocol import Completion

T = TypeVar("T")


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
                from llamafleet.runtime.errors import Cancelled
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
                from llamafleet.runtime.errors import Cancelled
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


def _blocking(name: str) -> Callable[..., Any]:
    target = getattr(AsyncClient, name)

    @functools.wraps(target)
    def method(self: Client, *args: Any, **kwargs: Any) -> Any:
        return self._run(getattr(self._async, name)(*args, **kwargs))

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
        self.address = self._async.address

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            from llamafleet.runtime.errors import Cancelled
            raise Cancelled("client closed")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result()
        except KeyboardInterrupt:
            fut.cancel()
            raise

    def close(self) -> None:
        """Close the sockets and stop the I/O thread."""
        if self._closed:
            return

        async def shutdown() -> None:
            await self._async.close()
            # end whatever is still waiting (abandoned streams, pumps) before the
            # loop goes away
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        self._run(shutdown())
        self._closed = True
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
    call = _blocking("call")
    ping = _blocking("ping")
    info = _blocking("info")
    metrics = _blocking("metrics")
    tokenize = _blocking("tokenize")
    detokenize = _blocking("detokenize")
    prefill = _blocking("prefill")
    decode = _blocking("decode")
    generate = _blocking("generate")
    kv_pack = _blocking("kv_pack")
    kv_unpack = _blocking("kv_unpack")
    seq_clear = _blocking("seq_clear")
    set_sampling = _blocking("set_sampling")
    set_grammar = _blocking("set_grammar")
    load_adapter = _blocking("load_adapter")
    unload_adapter = _blocking("unload_adapter")
    set_adapters = _blocking("set_adapters")
    embed = _blocking("embed")
    apply_chat_template = _blocking("apply_chat_template")
    chat = _blocking("chat")


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
