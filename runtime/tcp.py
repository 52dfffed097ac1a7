"""What every tcp:// socket of the fleet sets: ZeroMQ heartbeats.

Over ipc:// a dead peer is seen at once (the kernel closes its end). Over tcp:// a
host that freezes or drops off the network sends no FIN and no RST, and TCP itself
would notice only after minutes. ZMTP heartbeats (ZeroMQ >= 4.2) make each side
PING its peer every :data:`HEARTBEAT_IVL_MS` and drop the connection when nothing
arrives for :data:`HEARTBEAT_TIMEOUT_MS`: the socket's monitor then reports a
disconnect, which the client treats as a crashed worker (and resumes elsewhere).
"""

from __future__ import annotations

from typing import Any

import zmq

#: how often an idle tcp connection is probed (milliseconds)
HEARTBEAT_IVL_MS = 500
#: silence after which a tcp connection is dropped (milliseconds); with the
#: interval, a peer that stopped answering is seen within about 2.5 s
HEARTBEAT_TIMEOUT_MS = 2000


def keepalive(sock: zmq.Socket[Any], endpoint: str) -> None:
    """Turn on heartbeats when ``endpoint`` is tcp:// (before connect or bind)."""
    if not endpoint.startswith("tcp://"):
        return
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    # the peer drops us too when our pings stop (it learns the bound from ours)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
