"""The wire protocol: every message between clients, supervisor and workers.

Messages are msgpack maps carried in single ZeroMQ frames (DEALER <-> ROUTER).

Request  ``{"v": 1, "id": int, "cmd": str, "args": {...}}``
Replies  ``{"v": 1, "id": int, "kind": "result", "result": {...}}``  final answer
         ``{"v": 1, "id": int, "kind": "chunk",  "data": {...}}``    one streamed piece
         ``{"v": 1, "id": int, "kind": "error",  "error": {code, message, retryable, data}}``

A streamed request gets zero or more chunks and then exactly one result or
error. Workers report to their supervisor with :data:`WORKER_EVENTS` messages
(``{"v": 1, "type": ..., ...}``) on a separate socket.

Every command's arguments are declared once in :data:`COMMANDS`; both sides
call :func:`validate_args`, so a malformed request is a ``bad_request`` before
it touches a backend. Nothing is ever unpickled: msgpack only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from runtime.errors import BadRequest, LlamafleetError, ProtocolError

PROTOCOL_VERSION = 1

# -- limits (ZeroMQ's maxmsgsize is set to MAX_MESSAGE_BYTES on every socket) --
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
MAX_TEXT_CHARS = 1 << 20          # prompt / text to tokenize
MAX_TOKENS_IN = 1 << 17           # token ids in one request
MAX_GENERATE_TOKENS = 1 << 16     # max_tokens of one generate
MAX_KV_BYTES = 200 * 1024 * 1024  # one KV blob
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_ADAPTERS = 32
MAX_EMBED_TEXTS = 256
MAX_MESSAGES = 1024
MAX_NAME_CHARS = 128
MAX_PATH_CHARS = 4096

SENTINEL = object()


@dataclass(frozen=True)
class Field:
    """One argument of a command: accepted types, default, extra check."""

    types: tuple[type, ...]
    required: bool = False
    default: Any = None
    check: Callable[[Any], str | None] | None = None
    nullable: bool = False


@dataclass(frozen=True)
class Command:
    """A protocol command: where it goes, its arguments, whether it streams."""

    name: str
    target: str  # "worker" or "supervisor"
    fields: dict[str, Field] = field(default_factory=dict)
    streaming: bool = False
    #: at least one of these argument names must be present
    one_of: tuple[str, ...] = ()


# -- argument checks ----------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _nonneg(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _positive(v: Any) -> str | None:
    return None if v >= 1 else "must be >= 1"


def _max_len(n: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if len(v) <= n else f"longer than {n}"
    return check


def _name(v: Any) -> str | None:
    if not v or len(v) > MAX_NAME_CHARS:
        return f"must be 1..{MAX_NAME_CHARS} characters"
    if any(c in v for c in "/\\\x00") or v in (".", ".."):
        return "must not contain path separators or NUL"
    return None


def _token_list(v: Any) -> str | None:
    if len(v) > MAX_TOKENS_IN:
        return f"more than {MAX_TOKENS_IN} tokens"
    for t in v:
        if not _is_int(t):
            return "must be a list of integer token ids"
    return None


def _str_list(max_items: int, max_chars: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if len(v) > max_items:
            return f"more than {max_items} items"
        for s in v:
            if not isinstance(s, str):
                return "must be a list of strings"
            if len(s) > max_chars:
                return f"item longer than {max_chars} characters"
        return None
    return check


def _messages(v: Any) -> str | None:
    if len(v) > MAX_MESSAGES:
        return f"more than {MAX_MESSAGES} messages"
    for m in v:
        if not isinstance(m, dict):
            return "each message must be a map with 'role' and 'content'"
        if not isinstance(m.get("role"), str):
            return "each message needs a string 'role'"
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            return "message 'content' must be a string"
        if content is not None and len(content) > MAX_TEXT_CHARS:
            return f"message content longer than {MAX_TEXT_CHARS} characters"
    return None


def _scales(v: Any) -> str | None:
    if len(v) > MAX_ADAPTERS:
        return f"more than {MAX_ADAPTERS} adapters"
    for k, s in v.items():
        if not isinstance(k, str) or _name(k):
            return "adapter names must be non-empty strings"
        if isinstance(s, bool) or not isinstance(s, (int, float)) or s != s:
            return f"scale of {k!r} must be a number"
        if abs(s) > 1000:
            return f"scale of {k!r} out of range"
    return None


INT = (int,)
STR = (str,)
BOOL = (bool,)
LIST = (list, tuple)
MAP = (dict,)
BYTES = (bytes, bytearray, memoryview)

_SEQ = Field(INT, required=True, check=_nonneg)
_TEXT = Field(STR, check=_max_len(MAX_TEXT_CHARS))
_TOKENS = Field(LIST, check=_token_list)
_SAMPLING = Field(MAP, default=None, nullable=True)

COMMANDS: dict[str, Command] = {c.name: c for c in [
    # worker commands
    Command("ping", "worker"),
    Command("info", "worker"),
    Command("tokenize", "worker", {
        "text": Field(STR, required=True, check=_max_len(MAX_TEXT_CHARS)),
        "add_special": Field(BOOL, default=True),
        "parse_special": Field(BOOL, default=False)}),
    Command("detokenize", "worker", {
        "tokens": Field(LIST, required=True, check=_token_list),
        "special": Field(BOOL, default=False)}),
    Command("prefill", "worker", {
        "seq": _SEQ,
        "tokens": Field(LIST, required=True, check=_token_list)}),
    Command("decode", "worker", {
        "seq": _SEQ,
        "sampling": _SAMPLING}),
    Command("generate", "worker", {
        "prompt": _TEXT,
        "tokens": _TOKENS,
        "seq": Field(INT, nullable=True, check=_nonneg),
        "max_tokens": Field(INT, default=256, check=lambda v: None if 0 <= v <= MAX_GENERATE_TOKENS
                            else f"must be in 0..{MAX_GENERATE_TOKENS}"),
        "stop": Field(LIST, default=(), check=_str_list(MAX_STOP_STRINGS, MAX_STOP_CHARS)),
        "sampling": _SAMPLING,
        "add_special": Field(BOOL, default=True),
        "parse_special": Field(BOOL, default=False),
        "ignore_eos": Field(BOOL, default=False),
        "stream": Field(BOOL, default=True),
        # keep this conversation's KV warm (and on disk) under a name
        "session": Field(STR, nullable=True, check=_name),
        # the worker gives up (error "timeout") this many ms after receiving it
        "deadline_ms": Field(INT, nullable=True, check=_nonneg)},
        streaming=True, one_of=("prompt", "tokens")),
    Command("kv_pack", "worker", {"seq": _SEQ}),
    Command("kv_unpack", "worker", {
        "seq": _SEQ,
        "data": Field(BYTES, required=True, check=_max_len(MAX_KV_BYTES))}),
    Command("seq_clear", "worker", {"seq": _SEQ}),
    Command("set_sampling", "worker", {
        "seq": _SEQ,
        "sampling": Field(MAP, required=True)}),
    Command("set_grammar", "worker", {
        "seq": _SEQ,
        "grammar": Field(STR, nullable=True),
        "json_schema": Field(MAP + STR + BOOL, nullable=True)},
        one_of=("grammar", "json_schema")),
    Command("load_adapter", "worker", {
        "name": Field(STR, required=True, check=_name),
        "path": Field(STR, required=True, check=_max_len(MAX_PATH_CHARS))}),
    Command("unload_adapter", "worker", {
        "name": Field(STR, required=True, check=_name)}),
    Command("set_adapters", "worker", {
        "scales": Field(MAP, required=True, check=_scales)}),
    Command("embed", "worker", {
        "texts": Field(LIST, required=True, check=_str_list(MAX_EMBED_TEXTS, MAX_TEXT_CHARS)),
        "normalize": Field(BOOL, default=True)}),
    Command("apply_chat_template", "worker", {
        "messages": Field(LIST, required=True, check=_messages),
        "system": Field(STR, nullable=True, check=_max_len(MAX_TEXT_CHARS)),
        "add_generation_prompt": Field(BOOL, default=True),
        "enable_thinking": Field(BOOL, nullable=True)}),
    Command("cancel", "worker", {"target": Field(INT, required=True)}),
    # supervisor commands
    Command("lookup", "supervisor", {
        "model": Field(STR, required=True, check=_name),
        "wait_ms": Field(INT, default=0, check=_nonneg),
        # the caller saw this generation die: answer with a newer one only
        "after_generation": Field(INT, default=0, check=_nonneg)}),
    Command("status", "supervisor"),
    Command("shutdown", "supervisor"),
]}

#: Worker -> supervisor event types.
WORKER_EVENTS = ("hello", "heartbeat")
WORKER_STATES = ("loading", "ready", "draining", "error")
#: Supervisor-side worker states (what `llamafleet status` shows).
SUPERVISOR_STATES = ("starting", "ready", "restarting", "failed", "stopped")


def validate_args(cmd: str, args: Any) -> dict[str, Any]:
    """Check ``args`` against the command's declaration; return them with defaults.

    Raises BadRequest naming the offending argument."""
    spec = COMMANDS.get(cmd) if isinstance(cmd, str) else None
    if spec is None:
        raise BadRequest(f"unknown command {cmd!r}")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise BadRequest(f"{cmd}: args must be a map")
    unknown = [k for k in args if k not in spec.fields]
    if unknown:
        raise BadRequest(f"{cmd}: unknown argument(s) {', '.join(map(repr, unknown))}")
    out: dict[str, Any] = {}
    for name, f in spec.fields.items():
        if name not in args:
            if f.required:
                raise BadRequest(f"{cmd}: missing argument {name!r}")
            out[name] = list(f.default) if isinstance(f.default, tuple) else f.default
            continue
        value = args[name]
        if value is None:
            if f.nullable or not f.required:
                out[name] = list(f.default) if isinstance(f.default, tuple) else f.default
                continue
            raise BadRequest(f"{cmd}: argument {name!r} must not be null")
        if isinstance(value, bool) and bool not in f.types:
            raise BadRequest(f"{cmd}: argument {name!r} has type bool, "
                             f"expected {_type_names(f.types)}")
        if not isinstance(value, f.types):
            raise BadRequest(f"{cmd}: argument {name!r} has type {type(value).__name__}, "
                             f"expected {_type_names(f.types)}")
        if f.check is not None:
            problem = f.check(value)
            if problem:
                raise BadRequest(f"{cmd}: argument {name!r} {problem}")
        out[name] = list(value) if isinstance(value, tuple) else value
    if spec.one_of and not any(args.get(k) is not None for k in spec.one_of):
        raise BadRequest(f"{cmd}: one of {', '.join(map(repr, spec.one_of))} is required")
    return out


def _type_names(types: tuple[type, ...]) -> str:
    return "/".join(sorted({t.__name__ for t in types}))


# -- encoding -------------------------------------------------------------------------
def pack(obj: dict[str, Any]) -> bytes:
    """Encode one message; BadRequest if it holds something msgpack cannot carry
    (a lone surrogate in a string, an unsupported type, an oversized integer)."""
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (UnicodeEncodeError, TypeError, ValueError, OverflowError) as exc:
        raise BadRequest(f"message cannot be encoded: {type(exc).__name__}: {exc}") from None


def unpack(data: bytes) -> dict[str, Any]:
    """Decode one message; ProtocolError if it is not a msgpack map of our version."""
    try:
        # msgpack bounds container/str/bin sizes by len(data); ZeroMQ's
        # MAXMSGSIZE bounds len(data) itself.
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable message: {exc.__class__.__name__}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("message is not a map")
    if obj.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {obj.get('v')!r} not supported "
                            f"(this side speaks {PROTOCOL_VERSION})")
    return obj


def request(req_id: int, cmd: str, args: dict[str, Any] | None = None) -> bytes:
    """Encode a request."""
    return pack({"v": PROTOCOL_VERSION, "id": req_id, "cmd": cmd, "args": args or {}})


def result(req_id: Any, value: Any) -> bytes:
    """Encode a final successful reply."""
    return pack({"v": PROTOCOL_VERSION, "id": req_id, "kind": "result", "result": value})


def chunk(req_id: Any, data: Any) -> bytes:
    """Encode one streamed piece of a reply."""
    return pack({"v": PROTOCOL_VERSION, "id": req_id, "kind": "chunk", "data": data})


def error(req_id: Any, err: LlamafleetError) -> bytes:
    """Encode a typed error reply."""
    return pack({"v": PROTOCOL_VERSION, "id": req_id, "kind": "error", "error": err.to_wire()})


def parse_request(data: bytes) -> tuple[Any, str, dict[str, Any]]:
    """Decode a request frame into (id, cmd, validated args).

    Raises ProtocolError/BadRequest; the id is attached as ``exc.data['id']``
    when it could be read, so the caller can still address the error reply."""
    msg = unpack(data)
    req_id = msg.get("id")
    try:
        if not _is_int(req_id):
            raise BadRequest("request id must be an integer")
        cmd = msg.get("cmd")
        if not isinstance(cmd, str):
            raise BadRequest("request has no command")
        args = validate_args(cmd, msg.get("args"))
    except LlamafleetError as exc:
        exc.data.setdefault("id", req_id if _is_int(req_id) else None)
        raise
    return req_id, cmd, args


def event(kind: str, **fields: Any) -> bytes:
    """Encode a worker -> supervisor event."""
    if kind not in WORKER_EVENTS:
        raise ValueError(f"unknown worker event {kind!r}")
    return pack({"v": PROTOCOL_VERSION, "type": kind, **fields})
