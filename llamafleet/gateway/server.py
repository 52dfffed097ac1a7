"""The gateway process: uvicorn on the socket the supervisor bound, plus heartbeats.

The supervisor passes the listening socket as an inherited fd (see
:mod:`llamafleet.runtime.services`), so this process never binds: a restart keeps the
port, and connections made meanwhile wait in the backlog. A
:class:`~llamafleet.runtime.protocol.ServiceBeat` goes to the supervisor every
heartbeat interval from the event loop itself, so a wedged loop is noticed and the
process restarted. SIGTERM (from the supervisor) stops accepting and lets requests in
flight finish.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
from typing import Any

import uvicorn
import zmq
import zmq.asyncio

from llamafleet.client import AsyncClient
from llamafleet.gateway.app import Settings, create_app
from llamafleet.runtime import protocol
from llamafleet.runtime.process import set_parent_death_signal
from llamafleet.runtime.protocol import GatewaySpec, ServiceBeat

log = logging.getLogger("llamafleet.gateway")
#: seconds an idle keep-alive connection stays open
KEEP_ALIVE_S = 30


async def heartbeat(spec: GatewaySpec, server: uvicorn.Server) -> None:
    """Tell the supervisor we are alive (and ready once uvicorn is serving)."""
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(spec.events_endpoint)
    try:
        while True:
            beat = ServiceBeat(name=spec.name, pid=os.getpid(), generation=spec.generation,
                               state="ready" if server.started else "starting", url=spec.url)
            try:
                await sock.send(protocol.encode_event(beat), zmq.NOBLOCK)
            except zmq.Again:
                pass
            await asyncio.sleep(spec.heartbeat_interval)
    finally:
        sock.close(linger=0)
        ctx.term()


async def serve(spec: GatewaySpec) -> None:
    """Serve until SIGTERM."""
    opts: dict[str, Any] = spec.options
    client = AsyncClient(spec.supervisor_address,
                         timeout=float(opts.get("request_timeout") or 600.0),
                         curve_server_key=spec.curve_server_key,
                         curve_client_cert=spec.curve_client_cert,
                         resume=bool(opts.get("resume", True)))
    settings = Settings.from_options(spec.models, opts, metrics_only=spec.mode == "metrics")
    app, _ = create_app(client, settings)
    config = uvicorn.Config(
        app, lifespan="off", access_log=False, log_level=spec.log_level.lower(),
        limit_concurrency=opts.get("max_connections"), timeout_keep_alive=KEEP_ALIVE_S,
        timeout_graceful_shutdown=10, server_header=False)
    server = uvicorn.Server(config)
    sock = socket.socket(fileno=spec.fd)
    beat = asyncio.ensure_future(heartbeat(spec, server))
    try:
        log.info("%s gateway serving on %s", spec.mode, spec.url)
        await server.serve(sockets=[sock])
    finally:
        beat.cancel()
        await client.close()


def main() -> int:
    """Entry point of ``python -m llamafleet.gateway`` (spec in $LLAMAFLEET_GATEWAY_SPEC)."""
    set_parent_death_signal()
    spec = GatewaySpec.from_wire(json.loads(os.environ[protocol.GATEWAY_SPEC_ENV]))
    logging.basicConfig(level=spec.log_level.upper(),
                        format=f"%(asctime)s gateway[{spec.name}] %(levelname)s %(message)s",
                        stream=sys.stderr)
    asyncio.run(serve(spec))
    return 0
