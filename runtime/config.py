"""Fleet configuration: a TOML file with a ``[supervisor]`` table and one
``[models.NAME]`` table per model. See the README for every key."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from runtime.errors import BadRequest

#: Longest path an ipc:// endpoint may have (sockaddr_un.sun_path minus NUL).
IPC_PATH_MAX = 107
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


#: Keys of a ``[models.NAME]`` table read by the worker itself, not the backend:
#: name -> (accepted types, default).
WORKER_OPTIONS: dict[str, tuple[tuple[type, ...], Any]] = {
    "max_queue": ((int,), 64),            # requests waiting for a slot before "overloaded"
    "prefix_cache": ((bool,), True),      # reuse KV of shared prompt prefixes
    "cache_ram_mb": ((int,), 256),        # RAM tier budget
    "cache_dir": ((str,), None),          # disk tier (default <runtime_dir>/cache/<model>)
    "cache_disk_mb": ((int,), 2048),      # disk tier budget
    "cache_min_tokens": ((int,), 32),     # shortest prefix worth caching/restoring
    "adapter_dirs": ((list,), None),      # where load_adapter may read (default: model's dir)
    "stream_interval_ms": ((int, float), 50),  # coalesce streamed deltas (0: every token)
}


class ConfigError(BadRequest):
    """The configuration is invalid (the message names the key)."""


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

    def control_address(self) -> str:
        return self.address or default_address(self.runtime_dir)

    def uses_tcp(self) -> bool:
        return self.transport == "tcp" or self.control_address().startswith("tcp://")

    @property
    def curve(self) -> bool:
        return self.curve_server_key is not None


@dataclass
class ModelConfig:
    """One ``[models.NAME]`` table: the backend and its options."""

    name: str
    backend: str = "fake"
    #: backend options: path, n_ctx, n_threads, ... (everything else)
    options: dict[str, Any] = field(default_factory=dict)
    #: worker options (see WORKER_OPTIONS), defaults filled in
    worker: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "backend": self.backend, "options": dict(self.options),
                "worker": dict(self.worker)}


@dataclass
class Config:
    """A whole fleet."""

    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    models: dict[str, ModelConfig] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], base_dir: Path | None = None) -> "Config":
        """Build from parsed TOML; relative model paths resolve against ``base_dir``."""
        if not isinstance(raw, dict):
            raise ConfigError("config must be a table")
        unknown = set(raw) - {"supervisor", "models"}
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
            opts = dict(table)
            backend = opts.pop("backend", "fake")
            if not isinstance(backend, str) or not backend:
                raise ConfigError(f"[models.{name}] backend must be a string")
            path = opts.get("path")
            if path is not None:
                if not isinstance(path, str):
                    raise ConfigError(f"[models.{name}] path must be a string")
                p = Path(path).expanduser()
                if not p.is_absolute() and base_dir is not None:
                    p = base_dir / p
                opts["path"] = str(p)
            worker: dict[str, Any] = {}
            for key, (types, default) in WORKER_OPTIONS.items():
                value = opts.pop(key, default)
                if value is not None and (not isinstance(value, types) or
                                          (isinstance(value, bool) and bool not in types)):
                    raise ConfigError(f"[models.{name}] {key} has the wrong type")
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                    raise ConfigError(f"[models.{name}] {key} must be >= 0")
                worker[key] = value
            dirs = worker["adapter_dirs"]
            if dirs is None:
                dirs = [str(Path(opts["path"]).parent)] if opts.get("path") else []
            if not all(isinstance(d, str) and d for d in dirs):
                raise ConfigError(f"[models.{name}] adapter_dirs must be a list of paths")
            worker["adapter_dirs"] = [str(_resolve(Path(d).expanduser(), base_dir)) for d in dirs]
            if worker["cache_dir"] is None:
                worker["cache_dir"] = str(sup.runtime_dir / "cache" / name)
            else:
                worker["cache_dir"] = str(Path(worker["cache_dir"]).expanduser())
            models[name] = ModelConfig(name=name, backend=backend, options=opts, worker=worker)
        cfg = cls(supervisor=sup, models=models)
        cfg.check_endpoints()
        return cfg

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Config":
        """Read a TOML file."""
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {p} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: {exc}") from None
        return cls.from_dict(raw, base_dir=p.resolve().parent)

    def worker_endpoint(self, model: str) -> str:
        """Where the worker of ``model`` binds (tcp: port chosen at bind time)."""
        if self.supervisor.transport == "tcp":
            return f"tcp://{self.supervisor.tcp_host}:*"
        return f"ipc://{self.supervisor.runtime_dir / f'w-{model}.sock'}"

    def check_endpoints(self) -> None:
        """Refuse ipc paths the kernel cannot bind (sun_path is ~107 bytes)."""
        addrs = [self.supervisor.control_address(),
                 f"ipc://{self.supervisor.runtime_dir / 'events.sock'}"]
        addrs += [self.worker_endpoint(m) for m in self.models]
        for a in addrs:
            if a.startswith("ipc://") and len(a[6:].encode()) > IPC_PATH_MAX:
                raise ConfigError(f"ipc path too long ({len(a) - 6} > {IPC_PATH_MAX} bytes): "
                                  f"{a}; choose a shorter runtime_dir")


def _resolve(p: Path, base_dir: Path | None) -> Path:
    return p if p.is_absolute() or base_dir is None else base_dir / p


def _supervisor_from(raw: Any, base_dir: Path | None = None) -> SupervisorConfig:
    if not isinstance(raw, dict):
        raise ConfigError("[supervisor] must be a table")
    known = {f.name: f for f in fields(SupervisorConfig)}
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
