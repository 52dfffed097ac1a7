"""Shared fixtures: real supervisors with real worker processes and sockets."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from llamafleet.runtime.config import Config  # noqa: E402
from llamafleet.runtime.supervisor import Supervisor  # noqa: E402
from llamafleet.testing import FAST_SETTINGS as FAST  # noqa: E402  fast supervision settings


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short private directory (ipc:// paths must stay under ~107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="lf-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def make_config(runtime_dir: Path, models: dict[str, dict[str, Any]],
                **supervisor: Any) -> Config:
    sup = {"runtime_dir": str(runtime_dir), **FAST, **supervisor}
    return Config.from_dict({"supervisor": sup, "models": models})


@pytest.fixture
def fleet(short_dir: Path) -> Iterator[Callable[..., Supervisor]]:
    """Start a supervisor over the given models; stopped at teardown."""
    started: list[Supervisor] = []

    def start(models: dict[str, dict[str, Any]], wait: bool = True,
              **supervisor: Any) -> Supervisor:
        sup = Supervisor(make_config(short_dir, models, **supervisor)).start()
        started.append(sup)
        if wait:
            sup.wait_ready(timeout=60)
        return sup

    yield start
    for sup in started:
        sup.stop()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def worker_pid(sup: Supervisor, model: str) -> int:
    pid = next(w["pid"] for w in sup.status() if w["model"] == model)
    assert pid, f"worker {model} has no pid"
    return int(pid)


def calls_in_flight(client: Any, model: str) -> int:
    """How many of a sync ``client``'s requests to ``model`` are sent and unanswered."""
    pool = client._async._pools.get(model)
    return 0 if pool is None else sum(len(c.calls) for c in pool.conns.values())


def run_together(client: Any, sup: Supervisor, model: str,
                 jobs: list[Callable[[], None]], timeout: float = 60) -> None:
    """Run ``jobs`` (each makes one request of ``model``) on threads of their own so
    that the worker is handed all the requests at once: on a fast machine a short
    generation ends before the next thread has even sent its request.

    Each thread first pings the worker, which connects that thread's socket (a socket
    that connects to a paused worker would hold its request until the handshake, after
    the pause); then the worker is paused (SIGSTOP) until every request is on the wire,
    and resumed. Raises what a job raised."""
    n = len(jobs)
    connected = threading.Barrier(n + 1, timeout=timeout)
    go = threading.Event()
    errors: list[BaseException | None] = [None] * n

    def body(i: int) -> None:
        def job() -> None:
            client.ping(model)
            connected.wait()
            if not go.wait(timeout):
                raise AssertionError("never released")
            jobs[i]()
        errors[i] = catch(job)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    connected.wait()
    pid = worker_pid(sup, model)
    kill(pid, signal.SIGSTOP)
    try:
        go.set()
        wait_for(lambda: calls_in_flight(client, model) >= n, timeout=10, interval=0.01)
        time.sleep(0.2)  # the client's I/O thread puts the last frame on the wire
    finally:
        kill(pid, signal.SIGCONT)
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a job did not end"
    for err in errors:
        if err is not None:
            raise err


def catch(fn: Callable[[], Any]) -> BaseException | None:
    """What ``fn()`` raised (None if nothing): for calls made in other threads."""
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - handed to the assertion
        return exc
    return None


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    os.kill(pid, sig)
