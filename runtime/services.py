"""Supervised services that are not model workers: the HTTP gateway, the metrics endpoint.

A service is ``python -m llamafleet.gateway`` with its :class:`~protocol.GatewaySpec`
in ``$LLAMAFLEET_GATEWAY_SPEC``. The supervisor binds the service's listening TCP
socket itself and hands it down (an inherited fd): the port outlives restarts, and
connections made while the service restarts wait in the socket's backlog instead of
being refused. The service reports :class:`~protocol.ServiceBeat` heartbeats on the
supervisor's event socket; one that exits or falls silent is restarted with the
workers' restart policy, and its crashes never touch the workers.

This module only describes and binds; the supervisor's loop runs the processes.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from llamafleet.runtime import protocol
from llamafleet.runtime.config import Config, parse_listen
from llamafleet.runtime.errors import SetupError
from llamafleet.runtime.process import WorkerProcess, new_log_tail

#: the listening sockets' backlog: connections that wait while a service restarts
LISTEN_BACKLOG = 1024
#: the module a service process runs
SERVICE_MODULE = "llamafleet.gateway"


@dataclass
class ServiceHandle:
    """The supervisor's view of one service (its process, state and socket)."""

    name: str
    #: ``http`` (OpenAI API, /metrics, /health) or ``metrics`` (/metrics, /health)
    mode: str
    options: dict[str, Any]
    sock: socket.socket
    url: str
    state: str = "starting"
    proc: WorkerProcess | None = None
    generation: int = 0
    restarts: int = 0
    last_exit: str | None = None
    started_at: float = 0.0
    ready_at: float | None = None
    last_heartbeat: float = 0.0
    next_start_at: float | None = None
    crash_times: tuple[float, ...] = ()
    log_tail: deque[str] = field(default_factory=new_log_tail)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.running else None

    @property
    def kill_reason(self) -> str | None:
        return self.proc.kill_reason if self.proc is not None else None

    def snapshot(self) -> dict[str, Any]:
        """This service as ``status`` shows it (a protocol.ServiceStatus map)."""
        return protocol.ServiceStatus(
            name=self.name, state=self.state, pid=self.pid, restarts=self.restarts,
            last_exit=self.last_exit, generation=self.generation, url=self.url).to_wire()

    def starting(self) -> None:
        """Reset the per-generation state before a (re)start."""
        self.generation += 1
        self.state = "starting" if self.restarts == 0 else "restarting"
        self.next_start_at = None
        self.ready_at = None
        self.started_at = self.last_heartbeat = time.monotonic()

    def close(self) -> None:
        self.sock.close()


def listen_socket(listen: str) -> tuple[socket.socket, str]:
    """A bound, listening, inheritable TCP socket for ``HOST:PORT`` and its URL
    (``http://HOST:PORT`` with the port actually bound). SetupError if it cannot be."""
    host, port = parse_listen(listen)
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise SetupError(f"cannot listen on {listen}: {exc}") from None
    family, _, _, _, addr = info
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise SetupError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return sock, f"http://{shown}:{bound}"


def services_of(config: Config) -> list[ServiceHandle]:
    """The services a configuration asks for, their sockets bound."""
    wanted: list[tuple[str, str, dict[str, Any], str]] = []
    if config.http is not None:
        wanted.append(("http", "http", dict(config.http), config.http["listen"]))
    if config.supervisor.metrics_listen is not None:
        wanted.append(("metrics", "metrics", {}, config.supervisor.metrics_listen))
    out: list[ServiceHandle] = []
    try:
        for name, mode, options, listen in wanted:
            sock, url = listen_socket(listen)
            out.append(ServiceHandle(name=name, mode=mode, options=options, sock=sock,
                                     url=url))
    except SetupError:
        for s in out:
            s.close()
        raise
    return out


def service_spec(s: ServiceHandle, config: Config, supervisor_address: str,
                 events_endpoint: str) -> protocol.GatewaySpec:
    """What the service process is told (see protocol.GatewaySpec)."""
    sup = config.supervisor
    # the server's secret file holds its public key too
    server_key = sup.curve_server_key if sup.curve else None
    return protocol.GatewaySpec(
        name=s.name, mode=s.mode, fd=s.sock.fileno(), url=s.url,
        supervisor_address=supervisor_address, events_endpoint=events_endpoint,
        generation=s.generation, heartbeat_interval=sup.heartbeat_interval,
        log_level=sup.log_level, options=s.options, models=list(config.models),
        curve_server_key=server_key,
        curve_client_cert=(config.http or {}).get("curve_client_cert"))


def spawn_service(s: ServiceHandle, spec: protocol.GatewaySpec,
                  on_output_end: Any) -> WorkerProcess:
    """Start the service's process (OSError if it cannot be started)."""
    return WorkerProcess.start(SERVICE_MODULE, s.name, protocol.GATEWAY_SPEC_ENV, spec,
                               s.log_tail, on_output_end, pass_fds=(s.sock.fileno(),))
