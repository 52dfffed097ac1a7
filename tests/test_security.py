"""The channel: CURVE on tcp://, refused strangers, explicit insecure opt-out."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamafleet.client import AuthenticationFailed, Client, Unavailable
from llamafleet.runtime.config import Config, ConfigError
from llamafleet.runtime.security import generate_keys


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    return generate_keys(tmp_path / "keys")


def test_tcp_without_curve_is_refused_unless_explicitly_insecure(short_dir: Path) -> None:
    base = {"runtime_dir": str(short_dir), "transport": "tcp"}
    with pytest.raises(ConfigError, match="require CURVE"):
        Config.from_dict({"supervisor": base, "models": {"m": {"backend": "fake"}}})
    with pytest.raises(ConfigError, match="require CURVE"):
        Config.from_dict({"supervisor": {"runtime_dir": str(short_dir),
                                         "address": "tcp://127.0.0.1:5999"}, "models": {}})
    cfg = Config.from_dict({"supervisor": {**base, "insecure_tcp": True},
                            "models": {"m": {"backend": "fake"}}})
    assert cfg.supervisor.insecure_tcp


def test_curve_client_with_the_right_key_is_served(fleet, keys, caplog) -> None:
    sup = fleet({"m": {"backend": "fake"}}, transport="tcp", address="tcp://127.0.0.1:*",
                curve_server_key=keys["server_secret"],
                curve_authorized_clients=keys["authorized"])
    assert sup.status()[0]["endpoint"].startswith("tcp://")
    with Client(sup.address, timeout=10, curve_server_key=keys["server_public"],
                curve_client_cert=keys["client_secret"]) as c:
        r = c.generate("m", "hello", max_tokens=5, temperature=0)
        assert len(r.tokens) == 5
        assert "".join(c.stream("m", "hello", max_tokens=5, temperature=0)) == r.text
    assert "INSECURE" not in caplog.text


def test_clients_without_the_right_keys_are_refused(fleet, keys, tmp_path: Path) -> None:
    sup = fleet({"m": {"backend": "fake"}}, transport="tcp", address="tcp://127.0.0.1:*",
                curve_server_key=keys["server_secret"],
                curve_authorized_clients=keys["authorized"])
    stranger = generate_keys(tmp_path / "stranger")  # a key pair nobody authorized
    cases = [
        dict(curve_server_key=keys["server_public"], curve_client_cert=stranger["client_secret"]),
        dict(curve_server_key=stranger["server_public"], curve_client_cert=keys["client_secret"]),
        {},  # plain tcp, no CURVE at all
    ]
    for creds in cases:
        t0 = time.monotonic()
        with Client(sup.address, timeout=10, connect_timeout=3, **creds) as c:
            # without CURVE the handshake never completes: nobody answers (Unavailable)
            with pytest.raises((AuthenticationFailed, Unavailable)) as info:
                c.status(timeout=3)
        assert time.monotonic() - t0 < 5
        if creds:  # a CURVE client learns why at once
            assert isinstance(info.value, AuthenticationFailed), creds
    # worker endpoints are protected too, not only the supervisor
    endpoint = sup.status()[0]["endpoint"]
    import zmq

    from llamafleet.runtime import protocol
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(endpoint)
    s.send(protocol.request(1, "ping"))
    assert not s.poll(1000), "an unauthenticated client got a reply from the worker"
    s.close(0)
    ctx.term()


def test_insecure_tcp_is_logged_loudly(fleet, caplog) -> None:
    fleet({"m": {"backend": "fake"}}, transport="tcp", address="tcp://127.0.0.1:*",
          insecure_tcp=True)
    assert "INSECURE" in caplog.text


def test_keys_command_writes_usable_certificates(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "llamafleet", "keys", str(tmp_path / "k")],
                         capture_output=True, text=True, timeout=30,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    d = tmp_path / "k"
    assert (d / "server.key_secret").stat().st_mode & 0o077 == 0
    assert (d / "authorized" / "client.key").exists()
    assert "curve_server_key" in out.stdout
