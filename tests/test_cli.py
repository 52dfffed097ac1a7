"""The command line against no fleet, and the clients' bounded connect."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamafleet import AsyncClient, Client, Unavailable


@pytest.mark.parametrize("argv", [["status"], ["generate", "--model", "m", "hi"], ["stop"],
                                  ["chat", "hi"]])
def test_commands_without_a_fleet_fail_fast(argv: list[str], tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/nothing.sock"
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "llamafleet", *argv, "--address", address],
                          capture_output=True, text=True, timeout=30)
    took = time.monotonic() - t
    assert proc.returncode == 2, proc.stderr
    assert address in proc.stderr and "llamafleet serve" in proc.stderr
    assert took < 6.0  # about 1.5 s of waiting plus the interpreter's start


def test_clients_raise_unavailable_within_their_connect_timeout(tmp_path: Path) -> None:
    address = "tcp://127.0.0.1:1"  # nothing listens on port 1
    with Client(address, connect_timeout=0.5, timeout=60) as c:
        t = time.monotonic()
        with pytest.raises(Unavailable, match="no supervisor is answering") as exc:
            c.status(timeout=None)
        assert time.monotonic() - t < 3.0 and exc.value.retryable
        with pytest.raises(Unavailable):
            c.generate("m", "hi")

    async def main() -> float:
        async with AsyncClient(f"ipc://{tmp_path}/none.sock", connect_timeout=0.5) as ac:
            t = time.monotonic()
            with pytest.raises(Unavailable):
                await ac.ping("m")
            return time.monotonic() - t

    assert asyncio.run(main()) < 3.0


def test_a_supervisor_that_goes_away_mid_call_ends_it_at_once(tmp_path: Path) -> None:
    """A call in flight when the control connection drops gets Unavailable (retryable)
    at once, not after its whole timeout; a bad address is a BadRequest."""
    import threading

    import zmq

    from llamafleet import BadRequest
    address = f"ipc://{tmp_path}/mute.sock"
    ctx = zmq.Context()
    mute = ctx.socket(zmq.ROUTER)  # accepts the connection, never answers
    mute.bind(address)
    errors: list[BaseException] = []
    with Client(address, connect_timeout=5) as c:
        def call() -> None:
            try:
                c.status(timeout=30)
            except BaseException as exc:  # noqa: BLE001 - handed to the assertion
                errors.append(exc)
        t = threading.Thread(target=call)
        t.start()
        assert mute.poll(5000)  # the request arrived
        t0 = time.monotonic()
        mute.close(linger=0)
        t.join(10)
        assert not t.is_alive() and time.monotonic() - t0 < 3.0
        assert isinstance(errors[0], Unavailable) and "went away" in str(errors[0])
    ctx.term()
    with Client("nonsense://x") as c:
        with pytest.raises(BadRequest, match="bad supervisor address"):
            c.status()


def test_close_ends_a_call_waiting_for_the_supervisor(tmp_path: Path) -> None:
    from llamafleet import Cancelled

    async def main() -> tuple[BaseException | None, float]:
        ac = AsyncClient(f"ipc://{tmp_path}/none.sock", connect_timeout=20)
        task = asyncio.ensure_future(ac.status(timeout=20))
        await asyncio.sleep(0.3)
        t = time.monotonic()
        await ac.close()
        try:
            await task
        except BaseException as exc:  # noqa: BLE001 - handed to the assertion
            return exc, time.monotonic() - t
        return None, time.monotonic() - t

    err, took = asyncio.run(main())
    assert isinstance(err, Cancelled) and took < 1.0
