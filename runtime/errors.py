"""Typed errors that cross the wire.

Every failure a client can see is one of these classes. Each carries a stable
``code`` (sent over the wire), a human ``message``, a ``retryable`` flag and an
optional ``data`` dict with structured details (queue length, exit reason...).
A client tells "bad request" from "worker crashed, retry" by type or by code.
"""

from __future__ import annotations

from typing import Any


class LlamafleetError(Exception):
    """Base class of every llamafleet error."""

    code: str = "internal"
    retryable: bool = False

    def __init__(self, message: str = "", *, data: dict[str, Any] | None = None,
                 retryable: bool | None = None) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.data: dict[str, Any] = dict(data or {})
        if retryable is not None:
            self.retryable = retryable

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"

    def to_wire(self) -> dict[str, Any]:
        """The msgpack-ready form of this error."""
        return {"code": self.code, "message": self.message,
                "retryable": self.retryable, "data": self.data}


class BadRequest(LlamafleetError):
    """The request is malformed or its values are out of range. Do not retry as is."""
    code = "bad_request"


class IncompatibleModels(BadRequest):
    """Two models that must work together do not (a draft model whose vocabulary is
    not the target's); a ``bad_request`` on the wire."""


class NotFound(LlamafleetError):
    """The named model, sequence, adapter or request does not exist."""
    code = "not_found"


class NotSupported(LlamafleetError):
    """The backend serving this model does not implement the feature."""
    code = "not_supported"


class Overloaded(LlamafleetError):
    """The worker has no free capacity (queue or sequence slots); retry later."""
    code = "overloaded"
    retryable = True


class WorkerCrashed(LlamafleetError):
    """The worker died while the request was in flight; it is being restarted."""
    code = "worker_crashed"
    retryable = True


class WorkerFailed(LlamafleetError):
    """The worker crashed too often and the supervisor gave up on it."""
    code = "worker_failed"


class Unavailable(LlamafleetError):
    """The worker is starting or restarting and not ready yet; retry later."""
    code = "unavailable"
    retryable = True


class RequestTimeout(LlamafleetError, TimeoutError):
    """The call did not finish within its timeout (the request was cancelled)."""
    code = "timeout"
    retryable = True


class Cancelled(LlamafleetError):
    """The request was cancelled by the caller."""
    code = "cancelled"


class ShuttingDown(LlamafleetError):
    """The supervisor or worker is shutting down and accepts no new work."""
    code = "shutting_down"
    retryable = True


class AuthenticationFailed(LlamafleetError):
    """The CURVE handshake failed: wrong server key, or this client's key is not
    authorized (or the endpoint needs CURVE and the client did not use it)."""
    code = "unauthenticated"


class ProtocolError(LlamafleetError):
    """A peer spoke a different protocol version or sent an undecodable message."""
    code = "protocol_error"


class InternalError(LlamafleetError):
    """An unexpected failure inside the runtime (a bug); the worker keeps serving."""
    code = "internal"


class SetupError(Exception):
    """A local problem configuring or starting llamafleet. Never sent over the wire:
    it is raised in the process that made the mistake, before any request exists."""


class ConfigError(SetupError, ValueError):
    """The configuration is invalid (the message names the table and key)."""


class AlreadyRunning(SetupError):
    """Another supervisor already holds this runtime directory."""


ERROR_TYPES: dict[str, type[LlamafleetError]] = {
    cls.code: cls
    for cls in (BadRequest, NotFound, NotSupported, Overloaded, WorkerCrashed,
                WorkerFailed, Unavailable, RequestTimeout, Cancelled, ShuttingDown,
                AuthenticationFailed, ProtocolError, InternalError)
}


def error_from_wire(obj: Any) -> LlamafleetError:
    """Rebuild the typed error from its wire form (unknown codes become InternalError)."""
    if not isinstance(obj, dict):
        return ProtocolError(f"malformed error reply: {obj!r}")
    code = obj.get("code")
    cls = ERROR_TYPES.get(code) if isinstance(code, str) else None
    message = str(obj.get("message", ""))
    data = obj.get("data") if isinstance(obj.get("data"), dict) else None
    if cls is None:
        err: LlamafleetError = InternalError(f"{code}: {message}", data=data)
    else:
        err = cls(message, data=data)
    if isinstance(obj.get("retryable"), bool):
        err.retryable = obj["retryable"]
    return err


__all__ = ["LlamafleetError", "ERROR_TYPES", "error_from_wire", "SetupError", "ConfigError",
           "AlreadyRunning", "IncompatibleModels"] + [
    c.__name__ for c in ERROR_TYPES.values()]
