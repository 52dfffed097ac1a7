"""Our typed errors as OpenAI-shaped HTTP errors: ``{"error": {message, type, code}}``.

The HTTP status comes from the error's code (one table); retryable ones (429, 503)
carry ``Retry-After``. A context overflow also says how many tokens the prompt had
and how many fit (``n_prompt_tokens``, ``n_ctx``), as llama-server does.
"""

from __future__ import annotations

from typing import Any

from llamafleet.runtime.errors import LlamafleetError

#: our error code -> (HTTP status, OpenAI error type)
STATUS: dict[str, tuple[int, str]] = {
    "bad_request": (400, "invalid_request_error"),
    "unauthenticated": (401, "authentication_error"),
    "not_found": (404, "not_found_error"),
    "overloaded": (429, "rate_limit_error"),
    "cancelled": (499, "cancelled_error"),
    "internal": (500, "server_error"),
    "protocol_error": (500, "server_error"),
    "not_supported": (501, "not_supported_error"),
    "worker_crashed": (503, "unavailable_error"),
    "unavailable": (503, "unavailable_error"),
    "shutting_down": (503, "unavailable_error"),
    "worker_failed": (503, "unavailable_error"),
    "timeout": (504, "timeout_error"),
}
#: seconds a caller is told to wait before retrying a retryable error
RETRY_AFTER_S = 1


class HTTPError(Exception):
    """An error response decided by the gateway itself (before any worker is asked)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})
        #: more keys of the error object (a context overflow's token counts)
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {"message", "type", "code", "param", ...}}``."""
        return {"error": {"message": self.message, "type": self.type, "code": self.code,
                          "param": self.param, **self.extra}}


def from_error(exc: LlamafleetError) -> HTTPError:
    """The HTTP error for one of our typed errors."""
    status, kind = STATUS.get(exc.code, (500, "server_error"))
    headers = {}
    if exc.retryable and status in (429, 503):
        headers["Retry-After"] = str(RETRY_AFTER_S)
    err = HTTPError(status, exc.message, type=kind, code=exc.code, headers=headers)
    if exc.code == "bad_request" and "n_ctx" in exc.data:
        err.code = "context_length_exceeded"
        err.type = "exceed_context_size_error"
        extra = {"n_prompt_tokens": exc.data.get("prompt_tokens"), "n_ctx": exc.data["n_ctx"]}
        err.message = (f"{exc.message}: the prompt has {extra['n_prompt_tokens']} tokens and "
                       f"the context holds {extra['n_ctx']}")
        err.extra = extra
    return err
