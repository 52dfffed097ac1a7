"""llamafleet.testing and its pytest plugin, used the way a service's tests use them."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from llamafleet.client import AsyncClient, Client
from llamafleet.runtime.errors import NotFound, WorkerFailed
from llamafleet.runtime.supervisor import Supervisor
from llamafleet.testing import FAST_SETTINGS, fake_client, fake_fleet

pytest_plugins = ["pytester"]


# -- the fixtures, as a user's test takes them ------------------------------------------
def test_client_fixture_generates(llamafleet_client: Client) -> None:
    first = llamafleet_client.generate("fake", "Hello", max_tokens=8, temperature=0)
    again = llamafleet_client.generate("fake", "Hello", max_tokens=8, temperature=0)
    assert first.text and first.stats.generated_tokens == 8
    assert again.text == first.text  # the fake backend is deterministic


def test_fleet_fixture_is_ready_with_fast_settings(llamafleet_fleet: Supervisor) -> None:
    [worker] = llamafleet_fleet.status()
    assert worker["model"] == "fake" and worker["state"] == "ready"
    assert llamafleet_fleet.sup.heartbeat_interval == FAST_SETTINGS["heartbeat_interval"]
    # the runtime dir is short enough for ipc:// paths, and private to this test
    assert len(str(llamafleet_fleet.sup.runtime_dir)) < 40


def test_address_fixture_serves_an_async_client(llamafleet_address: str) -> None:
    async def main() -> str:
        async with AsyncClient(llamafleet_address) as c:
            return (await c.generate("fake", "Hi", max_tokens=4, temperature=0)).text

    assert asyncio.run(main())


class TestOverriddenModels:
    @pytest.fixture
    def llamafleet_models(self) -> dict[str, dict[str, Any]]:
        return {"alpha": {"backend": "fake", "seed": 1},
                "beta": {"backend": "fake", "seed": 2, "n_seq_max": 2}}

    @pytest.fixture
    def llamafleet_settings(self) -> dict[str, Any]:
        return {"heartbeat_timeout": 3.0}

    def test_serves_the_overridden_models(self, llamafleet_fleet: Supervisor,
                                          llamafleet_client: Client) -> None:
        assert sorted(w["model"] for w in llamafleet_fleet.status()) == ["alpha", "beta"]
        assert llamafleet_fleet.sup.heartbeat_timeout == 3.0
        for model in ("alpha", "beta"):
            assert llamafleet_client.generate(model, "Hello", max_tokens=4, ignore_eos=True).text
        with pytest.raises(NotFound):
            llamafleet_client.generate("fake", "Hello", max_tokens=4)


@pytest.mark.parametrize("llamafleet_models", [{"solo": {"backend": "fake"}}])
def test_models_parametrized_directly(llamafleet_client: Client) -> None:
    assert llamafleet_client.generate("solo", "x", max_tokens=2, ignore_eos=True).text


# -- the helpers ---------------------------------------------------------------------------
def test_fake_fleet_and_fake_client() -> None:
    with fake_fleet(startup_timeout=30.0) as sup:
        runtime_dir = Path(sup.sup.runtime_dir)
        assert runtime_dir.is_dir() and sup.sup.startup_timeout == 30.0
        with fake_client(sup) as c, fake_client(sup.address, timeout=30.0) as c2:
            assert (c.generate("fake", "Hello", max_tokens=6, temperature=0).text
                    == c2.generate("fake", "Hello", max_tokens=6, temperature=0).text)
    assert not runtime_dir.exists()  # its own runtime dir is removed afterwards


def test_fake_fleet_reports_a_model_that_fails_to_load() -> None:
    models = {"ok": {"backend": "fake"},
              "broken": {"backend": "fake", "path": "/nonexistent/model.gguf"}}
    with pytest.raises(WorkerFailed, match="broken"):
        with fake_fleet(models):
            pytest.fail("the block must not run")
    # waiting only for the good model lets a test look at the broken one
    with fake_fleet(models, wait=["ok"]) as sup, fake_client(sup) as c:
        assert c.generate("ok", "Hello", max_tokens=2, ignore_eos=True).text


def test_tiny_gguf_writer_is_exported_lazily(tmp_path: Path) -> None:
    code = ("import sys, llamafleet.testing, llamafleet.testing.plugin\n"
            "heavy = [m for m in ('zmq', 'numpy', 'gguf', 'msgpack', 'llamafleet.runtime',\n"
            "         'llamafleet.testing.tiny_gguf') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=60)
    pytest.importorskip("gguf")
    pytest.importorskip("numpy")
    from llamafleet.testing import TinyModelSpec, write_tiny_model
    path = write_tiny_model(tmp_path / "tiny.gguf", TinyModelSpec())
    assert Path(path).stat().st_size > 0


# -- a user's test suite, run as its own pytest session --------------------------------------
#: only the plugin's fixtures: no conftest.py, nothing from this repository's tests
USER_TESTS = '''
    import asyncio

    from llamafleet import AsyncClient


    def test_generate(llamafleet_client):
        out = llamafleet_client.generate("fake", "Hello", max_tokens=5, temperature=0)
        assert out.text and out.finish_reason == "length"


    def test_async(llamafleet_address):
        async def main():
            async with AsyncClient(llamafleet_address) as c:
                return await c.generate("fake", "Hi", max_tokens=3)
        assert asyncio.run(main()).text
'''

USER_TESTS_OWN_MODELS = '''
    import pytest


    @pytest.fixture
    def llamafleet_models():
        return {"chat": {"backend": "fake", "seed": 9, "token_delay": 0.001}}


    def test_chat_model(llamafleet_client, llamafleet_fleet):
        assert [w["model"] for w in llamafleet_fleet.status()] == ["chat"]
        assert llamafleet_client.generate("chat", "Hi", max_tokens=3, ignore_eos=True).text
'''


def test_plugin_fixtures_in_a_users_own_session(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_my_service=textwrap.dedent(USER_TESTS),
                        test_my_models=textwrap.dedent(USER_TESTS_OWN_MODELS))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    assert "llamafleet" in "\n".join(result.outlines[:6])  # "plugins: ..., llamafleet"
    result.assert_outcomes(passed=3)
