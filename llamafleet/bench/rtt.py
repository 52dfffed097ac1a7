"""The round-trip figures of ``llamafleet bench``: ``ping`` through both clients beside a
bare pyzmq DEALER/ROUTER ping-pong between two processes over the same transport, in
interleaved rounds (bare, async, sync, bare, ...), so the ratios hold on a noisy machine.

:func:`serve` is the bare peer (run in a child process): a ROUTER that binds an
endpoint, prints the endpoint it bound and echoes every message until ``quit``.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import zmq

from llamafleet.client import AsyncClient, Client
from llamafleet.runtime import protocol

#: warm-up calls before each side's first round
WARMUP = 50


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


class BarePeer:
    """The bare echo ROUTER in a child process, and a blocking DEALER to it."""

    def __init__(self, endpoint: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"from llamafleet.bench.rtt import serve; serve({endpoint!r})"],
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.endpoint = self.proc.stdout.readline().strip()
        if not self.endpoint:
            raise RuntimeError(f"bare ping peer exited ({self.proc.wait()})")
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.endpoint)
        # the same bytes a ping request is
        self.payload = protocol.request(1, "ping", {})

    def pings(self, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            self.sock.send(self.payload)
            self.sock.recv()
            out.append((time.perf_counter() - t) * 1e6)
        return out

    def close(self) -> None:
        self.sock.send(b"quit")
        self.sock.close()
        self.ctx.term()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _timed(call: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        out.append((time.perf_counter() - t) * 1e6)
    return out


def async_pings(address: str, model: str, n: int) -> list[float]:
    """``AsyncClient.ping``, one at a time on one loop (one client, a fresh loop)."""

    async def go() -> list[float]:
        async with AsyncClient(address) as c:
            for _ in range(WARMUP):
                await c.ping(model)
            out = []
            for _ in range(n):
                t = time.perf_counter()
                await c.ping(model)
                out.append((time.perf_counter() - t) * 1e6)
            return out

    return asyncio.run(go())


def compare(address: str, model: str, bare_endpoint: str, n: int, rounds: int,
            progress: Callable[[str], None], label: str) -> dict[str, Any]:
    """Bare, AsyncClient.ping and Client.ping in ``rounds`` interleaved rounds of
    ``n // rounds`` calls: percentiles over all calls, and each client's p50 over the
    bare p50 of the same round (median and spread of those ratios)."""
    per = max(1, n // rounds)
    bare = BarePeer(bare_endpoint)
    samples: dict[str, list[float]] = {"bare": [], "async": [], "sync": []}
    ratios: dict[str, list[float]] = {"async": [], "sync": []}
    try:
        bare.pings(WARMUP)
        with Client(address) as c:
            _timed(lambda: c.ping(model), WARMUP)
            for r in range(rounds):
                progress(f"rtt {label}: round {r + 1}/{rounds}: bare, async, sync "
                         f"({per} pings each)")
                b = bare.pings(per)
                a = async_pings(address, model, per)
                s = _timed(lambda: c.ping(model), per)
                for key, xs in (("bare", b), ("async", a), ("sync", s)):
                    samples[key].extend(xs)
                ratios["async"].append(statistics.median(a) / statistics.median(b))
                ratios["sync"].append(statistics.median(s) / statistics.median(b))
    finally:
        bare.close()
    out: dict[str, Any] = {"bare_endpoint": bare.endpoint, "rounds": rounds}
    for key, xs in samples.items():
        out[f"{key}_p50"] = pct(xs, 50)
        out[f"{key}_p99"] = pct(xs, 99)
    for key, rs in ratios.items():
        out[f"{key}_vs_bare"] = statistics.median(rs)
        out[f"{key}_vs_bare_spread"] = [min(rs), max(rs)]
    return out


def serve(endpoint: str) -> None:
    """The bare peer: echo every message on a ROUTER until ``quit``."""
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    print(sock.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
    while True:
        frames = sock.recv_multipart()
        if frames[-1] == b"quit":
            break
        sock.send_multipart(frames)
    sock.close()
    ctx.term()
