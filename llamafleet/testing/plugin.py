"""pytest plugin (entry point ``llamafleet``): fixtures for tests against a fake fleet.

Loaded automatically in every pytest session where llamafleet is installed
(``-p no:llamafleet`` turns it off). Every fixture is function-scoped: each test
gets its own supervisor and worker processes, stopped at teardown.

    def test_summary(llamafleet_client):          # a connected synchronous Client
        out = llamafleet_client.generate("fake", "Hello", max_tokens=8, temperature=0)
        assert out.text

Choose the models by overriding ``llamafleet_models`` (in a test module, a class
or a conftest.py; or parametrize it directly), and supervisor settings by
overriding ``llamafleet_settings``::

    @pytest.fixture
    def llamafleet_models():
        return {"chat": {"backend": "fake", "seed": 3},
                "slow": {"backend": "fake", "token_delay": 0.05}}

Async tests (pytest-asyncio, anyio, ...) make their own client on their own
event loop from ``llamafleet_address``::

    async def test_async(llamafleet_address):
        async with AsyncClient(llamafleet_address) as c:
            assert (await c.generate("fake", "Hi", max_tokens=4)).text

This module only imports pytest at import time; the runtime is loaded by the
first test that uses a fixture.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from llamafleet.client import Client
    from llamafleet.runtime.supervisor import Supervisor


@pytest.fixture
def llamafleet_models() -> dict[str, dict[str, Any]]:
    """The ``[models]`` table ``llamafleet_fleet`` serves: one fake model, ``"fake"``.

    Override it to serve other models (any backend, any options)."""
    from llamafleet.testing import default_models

    return default_models()


@pytest.fixture
def llamafleet_settings() -> dict[str, Any]:
    """Extra ``[supervisor]`` settings for ``llamafleet_fleet`` (default: none).

    They apply over llamafleet.testing.FAST_SETTINGS (quick heartbeats and
    restarts). Without ``runtime_dir``, a short private /tmp directory is used."""
    return {}


@pytest.fixture
def llamafleet_fleet(llamafleet_models: dict[str, dict[str, Any]],
                     llamafleet_settings: dict[str, Any]) -> Iterator[Supervisor]:
    """A running Supervisor over ``llamafleet_models``, every model ready.

    Its ``address`` is the control address; ``status()`` lists the workers (pids,
    states, restarts) for fault-injection tests. Stopped at teardown."""
    from llamafleet.testing import fake_fleet

    with fake_fleet(llamafleet_models, **llamafleet_settings) as sup:
        yield sup


@pytest.fixture
def llamafleet_address(llamafleet_fleet: Supervisor) -> str:
    """The running fleet's control address, for clients a test makes itself.

    Use it for an ``AsyncClient`` on the test's own event loop, or to hand the
    address to the service under test."""
    return str(llamafleet_fleet.address)


@pytest.fixture
def llamafleet_client(llamafleet_fleet: Supervisor) -> Iterator[Client]:
    """A synchronous Client connected to ``llamafleet_fleet``; closed at teardown."""
    from llamafleet.testing import fake_client

    client = fake_client(llamafleet_fleet)
    try:
        yield client
    finally:
        client.close()
