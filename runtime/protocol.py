"""The wire protocol: every message between clients, supervisor and workers.

Messages are msgpack maps carried in single ZeroMQ frames (DEALER <-> ROUTER).

Request  ``{"v": 1, "id": int, "cmd": str, "args": {...}}``
Replies  ``{"v": 1, "id": int, "kind": "result", "result": {...}}``  final answer
         ``{"v": 1, "id": int, "kind": "chunk",  "data": {...}}``    one streamed piece
         ``{"v": 1, "id": int, "kind": "error",  "error": {code, message, retryable, data}}``

A streamed request gets zero or more :class:`StreamChunk` and then exactly one
result or error. Workers report to their supervisor with :data:`EVENTS`
(:class:`Hello`, :class:`Heartbeat`; ``{"v": 1, "type": ..., ...}``) on a
separate socket.

Every command is declared once in :data:`COMMANDS`: its arguments (both sides
call :func:`validate_args`, so a malformed request is a ``bad_request`` before
it touches a backend) and the :class:`Message` type of its result. Replies,
chunks, events and the worker's start spec are dataclasses built with
``to_wire`` / ``from_wire``; the client's result types are these same classes.
Nothing is ever unpickled: msgpack only.
"""

from __future__ import annotations

import builtins
import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack

from llamafleet.runtime.errors import BadRequest, LlamafleetError, ProtocolError
from llamafleet.runtime.fields import Field

PROTOCOL_VERSION = 1

# -- limits (ZeroMQ's maxmsgsize is set to MAX_MESSAGE_BYTES on every socket) --
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
#: the supervisor's control and event sockets carry small messages only
MAX_CONTROL_MESSAGE_BYTES = 1 << 20
MAX_TEXT_CHARS = 1 << 20          # prompt / text to tokenize
MAX_TOKENS_IN = 1 << 17           # token ids in one request
MAX_GENERATE_TOKENS = 1 << 16     # max_tokens of one generate
DEFAULT_MAX_TOKENS = 256          # max_tokens when a request names none
MAX_KV_BYTES = 200 * 1024 * 1024  # one KV blob
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_ADAPTERS = 32
MAX_EMBED_TEXTS = 256
MAX_MESSAGES = 1024
MAX_TOOLS = 128
MAX_NAME_CHARS = 128
MAX_PATH_CHARS = 4096

# -- messages: every reply, stream chunk and worker event, declared once ----------------
M = TypeVar("M", bound="Message")


class Message:
    """Base of the declared messages (dataclasses). ``to_wire`` gives the msgpack map;
    ``from_wire`` rebuilds the type, ignoring keys it does not know (a newer peer)
    and filling absent ones with their defaults."""

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in _wire_fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_wire() if isinstance(v, Message) else v
        return out

    @classmethod
    def from_wire(cls: type[M], obj: Any) -> M:
        if not isinstance(obj, dict):
            raise ProtocolError(f"malformed {cls.__name__}: {type(obj).__name__}")
        kwargs: dict[str, Any] = {}
        for f in _wire_fields(cls):
            if f.name not in obj:
                continue
            v = obj[f.name]
            sub = _NESTED.get((cls, f.name))
            kwargs[f.name] = sub.from_wire(v) if sub is not None and v is not None else v
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a required field is missing
            raise ProtocolError(f"malformed {cls.__name__}: {exc}") from None


_NESTED: dict[tuple[type, str], type[Message]] = {}


def _wire_fields(cls: Any) -> tuple[dataclasses.Field[Any], ...]:
    """The fields of a Message dataclass (or instance), computed once per class (every
    reply is encoded and decoded through them)."""
    t = cls if isinstance(cls, type) else type(cls)
    found = _FIELDS.get(t)
    if found is None:
        found = _FIELDS[t] = dataclasses.fields(t)
    return found


_FIELDS: dict[type, tuple[dataclasses.Field[Any], ...]] = {}


def _nested(cls: type[M]) -> type[M]:
    """Register the Message-typed fields of ``cls`` so from_wire rebuilds them."""
    hints = typing.get_type_hints(cls)
    for f in _wire_fields(cls):
        for t in (hints[f.name], *typing.get_args(hints[f.name])):
            if isinstance(t, type) and issubclass(t, Message):
                _NESTED[(cls, f.name)] = t
    return cls


@dataclass
class Empty(Message):
    """The reply of a command that returns nothing but success."""


@dataclass
class Pong(Message):
    pong: bool = True
    model: str = ""
    pid: int = 0
    generation: int = 0


@dataclass
class ModelInfo(Message):
    """What a backend reports about its loaded model and context."""

    name: str
    backend: str
    architecture: str
    n_params: int
    n_vocab: int
    n_ctx: int
    n_ctx_train: int
    n_batch: int
    n_seq_max: int
    n_embd: int
    bos_token: int | None
    eos_token: int | None
    chat_template: str | None
    features: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self.to_wire()


@dataclass
class SchedulerStats(Message):
    running: int = 0
    queued: int = 0
    max_queue: int = 0
    ticks: int = 0
    peak_running: int = 0


@_nested
@dataclass
class Info(ModelInfo):
    """``info``: the model's metadata plus the worker's live state."""

    model: str = ""
    adapters: dict[str, Any] = field(default_factory=dict)
    #: the model's default sampling (config over GGUF metadata); requests override it
    sampling: dict[str, Any] = field(default_factory=dict)
    scheduler: SchedulerStats | None = None
    cache: dict[str, int] | None = None


@dataclass
class Tokens(Message):
    tokens: list[int]


@dataclass
class Text(Message):
    text: str


@dataclass
class SeqLength(Message):
    """How many tokens a sequence holds after the command."""

    n_tokens: int


@dataclass
class Decoded(Message):
    """One ``decode`` step: the sampled token (None when a grammar ended it)."""

    token: int | None
    piece: str
    eog: bool
    n_tokens: int
    reason: str | None = None
    #: the token's raw bytes (``piece`` is their UTF-8 decoding, errors replaced)
    bytes: builtins.bytes = b""


@dataclass
class KvBlob(Message):
    data: bytes
    n_tokens: int


@dataclass
class AdapterLoaded(Message):
    name: str
    path: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Adapters(Message):
    adapters: dict[str, Any]


@dataclass
class Embeddings(Message):
    embeddings: list[list[float]]


@dataclass
class Prompt(Message):
    prompt: str


@dataclass
class CancelResult(Message):
    cancelled: bool


@dataclass
class CompletionStats(Message):
    """Timings and counts of one generation (milliseconds)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    queue_ms: float | None = None
    ttft_ms: float | None = None
    total_ms: float = 0.0
    tokens_per_s: float | None = None
    #: times the client resubmitted this generation after its worker died
    resumed: int = 0
    #: speculative decoding: draft tokens verified, and those the target kept
    drafted_tokens: int = 0
    accepted_tokens: int = 0


@dataclass
class HistogramData(Message):
    """A histogram's state: ``counts[i]`` observations fell in ``(bounds[i-1],
    bounds[i]]``; the last count is the overflow bucket (``+Inf``)."""

    bounds: list[float]
    counts: list[int]
    sum: float = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass
class WorkerMetrics(Message):
    """``metrics``: a worker's counters since it started (Prometheus counters reset
    with a restart) and its gauges now.

    ``histograms`` holds :class:`HistogramData` maps under ``ttft_seconds``,
    ``inter_token_seconds``, ``e2e_seconds``, ``queue_seconds``,
    ``prompt_tokens`` and ``generation_tokens``. ``finished`` counts finished
    generations by finish reason, ``failed`` failed ones by error code."""

    model: str = ""
    pid: int = 0
    generation: int = 0
    requests_running: int = 0
    requests_waiting: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    kv_used_tokens: int = 0
    kv_capacity_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    histograms: dict[str, dict[str, Any]] = field(default_factory=dict)


@_nested
@dataclass
class Completion(Message):
    """A finished generation (the ``generate`` result).

    ``finish_reason``: ``eog`` (end-of-generation token), ``length`` (max_tokens or
    the context), ``stop`` (a stop string, in ``stop``) or ``grammar`` (the grammar
    admits nothing more). ``cache`` is the prefix-cache tier the prompt was restored
    from (``ram`` or ``disk``; None when prefilled). For a named ``session``,
    ``session_saved`` tells whether its KV was persisted, ``session_error`` why not."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""
    stats: CompletionStats = field(default_factory=CompletionStats)
    stop: str | None = None
    seq: int | None = None
    model: str = ""
    session: str | None = None
    session_saved: bool | None = None
    session_error: str | None = None
    cache: str | None = None
    #: with ``logprobs``: one :data:`TokenLogprob` map per generated token
    logprobs: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return self.to_wire()


#: The shape of one entry of ``logprobs`` (msgpack maps, not a Message, for speed):
#: ``{"token": int, "bytes": bytes, "logprob": float, "top": [{"token", "bytes",
#: "logprob"}, ...]}``: the chosen token and the ``logprobs`` most likely ones, by
#: the model's distribution (log-softmax of the raw logits, before sampling).
TokenLogprob = dict[str, Any]
#: the most alternatives ``logprobs`` may ask for (OpenAI's top_logprobs limit)
MAX_LOGPROBS = 20


@dataclass
class StreamChunk(Message):
    """One streamed piece of a generation: whole UTF-8 text and its token ids
    (and, with ``logprobs``, one :data:`TokenLogprob` per token)."""

    text: str
    tokens: list[int]
    logprobs: list[TokenLogprob] | None = None


@dataclass
class WorkerEndpoint(Message):
    """Where one worker (one replica of a model) listens. ``generation`` is unique
    within a supervisor: a restarted replica has a new one."""

    model: str
    endpoint: str
    generation: int
    pid: int | None = None
    backend: str = ""
    replica: int = 0


@dataclass
class ModelEndpoints(Message):
    """``lookup`` and ``load``: the ready workers of a model (``replicas`` of them are
    configured; fewer are listed while some start or restart)."""

    model: str
    endpoints: list[WorkerEndpoint]
    replicas: int = 1

    def __post_init__(self) -> None:
        self.endpoints = [WorkerEndpoint.from_wire(e) if isinstance(e, dict) else e
                          for e in self.endpoints]

    def to_wire(self) -> dict[str, Any]:
        return {"model": self.model, "endpoints": [e.to_wire() for e in self.endpoints],
                "replicas": self.replicas}


@dataclass
class WorkerStatus(Message):
    """One worker as ``status`` shows it."""

    model: str
    backend: str
    state: str
    pid: int | None = None
    restarts: int = 0
    last_exit: str | None = None
    generation: int = 0
    endpoint: str | None = None
    load_progress: float = 0.0
    inflight: int = 0
    uptime_s: float | None = None
    #: seconds from this generation's start until it was ready
    load_s: float | None = None
    replica: int = 0
    #: the worker process's resident memory (MiB), read by the supervisor
    rss_mb: float | None = None
    #: seconds an idle worker stays loaded (-1: never unloaded)
    keep_alive: float = -1.0
    #: seconds since the model last had a request (None: it never had one)
    idle_s: float | None = None
    #: the cluster node it runs on (``llamafleet ray``; None on a single host)
    node: str | None = None


@dataclass
class ServiceStatus(Message):
    """A supervised service that is not a model worker (the HTTP gateway)."""

    name: str
    state: str
    pid: int | None = None
    restarts: int = 0
    last_exit: str | None = None
    generation: int = 0
    url: str | None = None


@dataclass
class FleetStatus(Message):
    workers: list[dict[str, Any]]
    address: str
    pid: int
    #: :class:`ServiceStatus` maps
    services: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Stopping(Message):
    stopping: bool = True


@dataclass
class Reloaded(Message):
    """``reload``: which models the new configuration added, removed, changed."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


# -- worker -> supervisor events -----------------------------------------------------------
@dataclass
class Hello(Message):
    """A worker's first event, sent before loading."""

    model: str
    pid: int
    generation: int
    replica: int = 0


@dataclass
class Heartbeat(Message):
    """A worker's periodic state (and at once on a state change).

    ``state``: ``loading`` (with ``load_progress``), ``ready`` (with ``endpoint``),
    ``draining`` or ``error`` (with ``error``). ``progress`` counts completed units
    of work, for the supervisor's progress watchdog."""

    model: str
    pid: int
    generation: int
    state: str
    load_progress: float = 0.0
    endpoint: str | None = None
    error: str | None = None
    progress: int = 0
    inflight: int = 0
    replica: int = 0
    #: requests received so far (the supervisor sees activity between heartbeats)
    requests: int = 0
    #: the ``keep_alive`` the latest request asked for (seconds; None: none asked)
    keep_alive: float | None = None


@dataclass
class ServiceBeat(Message):
    """A supervised service's periodic heartbeat (``state``: ``starting``/``ready``)."""

    name: str
    pid: int
    generation: int
    state: str
    url: str | None = None


#: the environment variable that carries a worker's WorkerSpec (JSON)
WORKER_SPEC_ENV = "LLAMAFLEET_WORKER_SPEC"
#: the environment variable that carries the gateway's GatewaySpec (JSON)
GATEWAY_SPEC_ENV = "LLAMAFLEET_GATEWAY_SPEC"


@dataclass
class WorkerSpec(Message):
    """What the supervisor tells a worker it starts (JSON in $LLAMAFLEET_WORKER_SPEC)."""

    model: str
    backend: str
    #: backend options, checked against the backend's OPTIONS when the config loaded
    options: dict[str, Any]
    endpoint: str
    events_endpoint: str
    generation: int
    heartbeat_interval: float
    log_level: str
    #: seconds the supervisor waits after SIGTERM before SIGKILL
    shutdown_grace: float
    #: worker options, every key of config.WORKER_OPTIONS filled in
    worker_options: dict[str, Any]
    #: the model's default sampling (``[models.NAME.sampling]``)
    sampling: dict[str, Any] = field(default_factory=dict)
    #: CURVE server certificate and authorized client keys (tcp:// endpoints)
    curve_server_key: str | None = None
    curve_authorized_clients: str | None = None
    #: which of the model's ``replicas`` this worker is
    replica: int = 0


@dataclass
class GatewaySpec(Message):
    """What the supervisor tells the HTTP gateway it starts (JSON in
    $LLAMAFLEET_GATEWAY_SPEC). The listening socket is inherited as ``fd``, so the
    port stays the same across restarts and connections wait in its backlog."""

    name: str
    #: ``http`` (the OpenAI API and /metrics) or ``metrics`` (only /metrics, /health)
    mode: str
    fd: int
    url: str
    supervisor_address: str
    events_endpoint: str
    generation: int
    heartbeat_interval: float
    log_level: str
    #: the ``[http]`` table, checked (see config.HTTP_OPTIONS), keys resolved
    options: dict[str, Any] = field(default_factory=dict)
    #: the configured models, in order
    models: list[str] = field(default_factory=list)
    #: for a tcp:// fleet with CURVE: the server's public key file, a client cert
    curve_server_key: str | None = None
    curve_client_cert: str | None = None


#: Worker -> supervisor event types, by their wire name.
EVENTS: dict[str, type[Message]] = {"hello": Hello, "heartbeat": Heartbeat,
                                    "service": ServiceBeat}


@dataclass(frozen=True)
class Command:
    """A protocol command: where it goes, its arguments, its reply, whether it streams."""

    name: str
    target: str  # "worker" or "supervisor"
    fields: dict[str, Field] = field(default_factory=dict)
    streaming: bool = False
    #: at least one of these argument names must be present
    one_of: tuple[str, ...] = ()
    #: the type of the final result
    reply: type[Message] = Empty


# -- argument checks ----------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _nonneg(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


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


def _tools(v: Any) -> str | None:
    if len(v) > MAX_TOOLS:
        return f"more than {MAX_TOOLS} tools"
    if not all(isinstance(t, dict) for t in v):
        return "must be a list of maps"
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
#: seconds a model stays loaded once idle; -1 keeps it loaded
_KEEP_ALIVE = Field((int, float), nullable=True,
                    check=lambda v: None if v == -1 or 0 <= v <= 10 ** 7
                    else "must be -1 (never unload) or 0..10000000 seconds")


def _generations(v: Any) -> str | None:
    if len(v) > 256:
        return "lists at most 256 generations"
    return None if all(_is_int(g) and g >= 0 for g in v) else "must be generation numbers"

#: a generate's ``speculative`` values ("model": what the model's configuration says)
SPECULATIVE_MODES = ("model", "lookup", "draft", "off")

_TEXT = Field(STR, check=_max_len(MAX_TEXT_CHARS))
_TOKENS = Field(LIST, check=_token_list)
_SAMPLING = Field(MAP, default=None, nullable=True)

COMMANDS: dict[str, Command] = {c.name: c for c in [
    # worker commands
    Command("ping", "worker", reply=Pong),
    Command("info", "worker", reply=Info),
    Command("tokenize", "worker", {
        "text": Field(STR, required=True, check=_max_len(MAX_TEXT_CHARS)),
        "add_special": Field(BOOL, default=True),
        "parse_special": Field(BOOL, default=False)}, reply=Tokens),
    Command("detokenize", "worker", {
        "tokens": Field(LIST, required=True, check=_token_list),
        "special": Field(BOOL, default=False)}, reply=Text),
    Command("prefill", "worker", {
        "seq": _SEQ,
        "tokens": Field(LIST, required=True, check=_token_list)}, reply=SeqLength),
    Command("decode", "worker", {
        "seq": _SEQ,
        "sampling": _SAMPLING}, reply=Decoded),
    Command("generate", "worker", {
        "prompt": _TEXT,
        "tokens": _TOKENS,
        "seq": Field(INT, nullable=True, check=_nonneg),
        "max_tokens": Field(INT, default=DEFAULT_MAX_TOKENS,
                            check=lambda v: None if 0 <= v <= MAX_GENERATE_TOKENS
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
        "deadline_ms": Field(INT, nullable=True, check=_nonneg),
        # report each token's logprob and this many alternatives (None: none)
        "logprobs": Field(INT, nullable=True, check=lambda v: None if 0 <= v <= MAX_LOGPROBS
                          else f"must be in 0..{MAX_LOGPROBS}"),
        # tokens a dead worker already produced for this request: they follow the
        # prompt in the KV and count as output (the client resumes a stream with them)
        "continue_tokens": Field(LIST, default=(), check=_token_list),
        # how long the model stays loaded once idle (seconds; -1: never unloaded)
        "keep_alive": _KEEP_ALIVE,
        # speculative decoding: "model" (the model's speculative option), "lookup"
        # (prompt lookup), "draft" (the model's draft_model) or "off"; the output is
        # the same either way
        "speculative": Field(STR, default="model", choices=SPECULATIVE_MODES)},
        streaming=True, one_of=("prompt", "tokens"), reply=Completion),
    Command("kv_pack", "worker", {"seq": _SEQ}, reply=KvBlob),
    Command("kv_unpack", "worker", {
        "seq": _SEQ,
        "data": Field(BYTES, required=True, check=_max_len(MAX_KV_BYTES))}, reply=SeqLength),
    Command("seq_clear", "worker", {"seq": _SEQ}, reply=Empty),
    Command("set_sampling", "worker", {
        "seq": _SEQ,
        "sampling": Field(MAP, required=True)}, reply=Empty),
    Command("set_grammar", "worker", {
        "seq": _SEQ,
        "grammar": Field(STR, nullable=True),
        "json_schema": Field(MAP + STR + BOOL, nullable=True)},
        one_of=("grammar", "json_schema"), reply=Empty),
    Command("load_adapter", "worker", {
        "name": Field(STR, required=True, check=_name),
        "path": Field(STR, required=True, check=_max_len(MAX_PATH_CHARS))}, reply=AdapterLoaded),
    Command("unload_adapter", "worker", {
        "name": Field(STR, required=True, check=_name)}, reply=Empty),
    Command("set_adapters", "worker", {
        "scales": Field(MAP, required=True, check=_scales)}, reply=Adapters),
    Command("embed", "worker", {
        "texts": Field(LIST, required=True, check=_str_list(MAX_EMBED_TEXTS, MAX_TEXT_CHARS)),
        "normalize": Field(BOOL, default=True)}, reply=Embeddings),
    Command("apply_chat_template", "worker", {
        "messages": Field(LIST, required=True, check=_messages),
        "system": Field(STR, nullable=True, check=_max_len(MAX_TEXT_CHARS)),
        "add_generation_prompt": Field(BOOL, default=True),
        "enable_thinking": Field(BOOL, nullable=True),
        # OpenAI-style tool declarations, given to the template as ``tools``
        "tools": Field(LIST, nullable=True, check=_tools)}, reply=Prompt),
    Command("cancel", "worker", {"target": Field(INT, required=True)}, reply=CancelResult),
    Command("metrics", "worker", reply=WorkerMetrics),
    # supervisor commands
    # where a model's ready workers are; an unloaded model is loaded first (waiting
    # up to wait_ms); ``exclude``: generations the caller saw die
    Command("lookup", "supervisor", {
        "model": Field(STR, required=True, check=_name),
        "wait_ms": Field(INT, default=0, check=_nonneg),
        "exclude": Field(LIST, default=(), check=_generations)}, reply=ModelEndpoints),
    # load a model now (waiting up to wait_ms for it), or unload it (draining first)
    Command("load", "supervisor", {
        "model": Field(STR, required=True, check=_name),
        "wait_ms": Field(INT, default=0, check=_nonneg)}, reply=ModelEndpoints),
    Command("unload", "supervisor", {
        "model": Field(STR, required=True, check=_name)}, reply=Empty),
    # re-read the configuration file and apply the difference
    Command("reload", "supervisor", reply=Reloaded),
    Command("status", "supervisor", reply=FleetStatus),
    Command("shutdown", "supervisor", reply=Stopping),
]}



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
        problem = f.problem(value)
        if problem:
            raise BadRequest(f"{cmd}: argument {name!r} {problem}")
        out[name] = list(value) if isinstance(value, tuple) else value
    if spec.one_of and not any(args.get(k) is not None for k in spec.one_of):
        raise BadRequest(f"{cmd}: one of {', '.join(map(repr, spec.one_of))} is required")
    return out


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


def result(req_id: Any, value: Message) -> bytes:
    """Encode a final successful reply."""
    return pack({"v": PROTOCOL_VERSION, "id": req_id, "kind": "result",
                 "result": value.to_wire()})


def chunk(req_id: Any, data: StreamChunk) -> bytes:
    """Encode one streamed piece of a reply."""
    body: dict[str, Any] = {"text": data.text, "tokens": data.tokens}
    if data.logprobs is not None:
        body["logprobs"] = data.logprobs
    return pack({"v": PROTOCOL_VERSION, "id": req_id, "kind": "chunk", "data": body})


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


def encode_event(ev: Message) -> bytes:
    """Encode a worker -> supervisor event (a Hello or a Heartbeat)."""
    kind = next((k for k, t in EVENTS.items() if type(ev) is t), None)
    if kind is None:
        raise TypeError(f"{type(ev).__name__} is not a worker event")
    return pack({"v": PROTOCOL_VERSION, "type": kind, **ev.to_wire()})


def decode_event(data: bytes) -> Message:
    """Decode a worker event; ProtocolError if it is not one."""
    msg = unpack(data)
    cls = EVENTS.get(str(msg.pop("type", "")))
    if cls is None:
        raise ProtocolError("not a worker event")
    msg.pop("v", None)
    return cls.from_wire(msg)
