"""The llamafleet client, embeddable in other services.

    from llamafleet.client import Client
    with Client() as c:                      # the local fleet's supervisor
        print(c.generate("smol", "Hello", max_tokens=20, temperature=0).text)
        for delta in c.stream("smol", "Once upon a time"):
            print(delta, end="", flush=True)

:class:`AsyncClient` has the same methods as coroutines (``stream`` is an async
iterator). Errors are the typed classes of :mod:`runtime.errors`.
"""

from llamafleet.client.aio import AsyncClient, AsyncStream
from llamafleet.client.results import Completion, Decoded
from llamafleet.client.sync import Client, Stream
from llamafleet.runtime.errors import (
                            AuthenticationFailed,
                            BadRequest,
                            Cancelled,
                            LlamafleetError,
                            NotFound,
                            NotSupported,
                            Overloaded,
                            RequestTimeout,
                            ShuttingDown,
                            Unavailable,
                            WorkerCrashed,
                            WorkerFailed,
)

__all__ = ["Client", "AsyncClient", "Stream", "AsyncStream", "Completion", "Decoded",
           "LlamafleetError", "BadRequest", "NotFound", "NotSupported", "Overloaded",
           "RequestTimeout", "ShuttingDown", "Unavailable", "WorkerCrashed", "WorkerFailed",
           "Cancelled", "AuthenticationFailed"]
