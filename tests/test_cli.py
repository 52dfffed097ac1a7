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
