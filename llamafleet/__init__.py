"""llamafleet: serve llama.cpp models from supervised worker processes.

    from llamafleet import Client
    with Client() as c:                      # the local fleet's supervisor
        print(c.generate("smol", "Hello", max_tokens=20, temperature=0).text)

The installed namespace maps the repository's folders: ``llamafleet.runtime``
(protocol, errors, config, supervision), ``llamafleet.worker``,
``llamafleet.client``, ``llamafleet.backends``; ``llamafleet.testing`` holds
what a service needs to test against a fake fleet. Names are imported lazily,
so ``python -m llamafleet.worker`` does not load the client.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("llamafleet")
except PackageNotFoundError:  # not installed: imported from a checkout
    __version__ = "0+unknown"

_EXPORTS = {
    "Client": "llamafleet.client", "AsyncClient": "llamafleet.client",
    "Stream": "llamafleet.client", "AsyncStream": "llamafleet.client",
    "Completion": "llamafleet.client", "Decoded": "llamafleet.client",
    "Config": "llamafleet.runtime.config", "ConfigError": "llamafleet.runtime.errors",
    "Supervisor": "llamafleet.runtime.supervisor",
    "SamplingParams": "llamafleet.runtime.sampling",
    "LlamafleetError": "llamafleet.runtime.errors", "BadRequest": "llamafleet.runtime.errors",
    "NotFound": "llamafleet.runtime.errors", "NotSupported": "llamafleet.runtime.errors",
    "Overloaded": "llamafleet.runtime.errors", "WorkerCrashed": "llamafleet.runtime.errors",
    "WorkerFailed": "llamafleet.runtime.errors", "Unavailable": "llamafleet.runtime.errors",
    "RequestTimeout": "llamafleet.runtime.errors", "Cancelled": "llamafleet.runtime.errors",
    "ShuttingDown": "llamafleet.runtime.errors", "SetupError": "llamafleet.runtime.errors",
    "AlreadyRunning": "llamafleet.runtime.errors",
    "AuthenticationFailed": "llamafleet.runtime.errors",
}

if TYPE_CHECKING:
    from llamafleet.client import AsyncClient, AsyncStream, Client, Completion, Decoded, Stream
    from llamafleet.runtime.config import Config
    from llamafleet.runtime.errors import (
        AlreadyRunning,
        AuthenticationFailed,
        BadRequest,
        Cancelled,
        ConfigError,
        LlamafleetError,
        NotFound,
        NotSupported,
        Overloaded,
        RequestTimeout,
        SetupError,
        ShuttingDown,
        Unavailable,
        WorkerCrashed,
        WorkerFailed,
    )
    from llamafleet.runtime.sampling import SamplingParams
    from llamafleet.runtime.supervisor import Supervisor


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llamafleet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "AlreadyRunning", "AsyncClient", "AsyncStream", "AuthenticationFailed", "BadRequest",
    "Cancelled", "Client", "Completion", "Config", "ConfigError", "Decoded",
    "LlamafleetError", "NotFound", "NotSupported", "Overloaded", "RequestTimeout",
    "SamplingParams", "SetupError", "ShuttingDown", "Stream", "Supervisor", "Unavailable",
    "WorkerCrashed", "WorkerFailed",
]
assert sorted(__all__) == sorted(_EXPORTS)
