"""The shape of the code, checked: dependency arrows, the command table, messages."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from llamafleet.runtime import protocol

ROOT = Path(__file__).resolve().parent.parent
#: repository folder -> the package it installs as
PACKAGES = {"runtime": "llamafleet.runtime", "worker": "llamafleet.worker",
            "client": "llamafleet.client", "backends": "llamafleet.backends",
            "llamafleet/bench": "llamafleet.bench", "llamafleet/testing": "llamafleet.testing",
            "llamafleet/gateway": "llamafleet.gateway", "llamafleet/ray": "llamafleet.ray"}


def imports_of(folder: str) -> dict[str, set[str]]:
    """file -> every module it imports (top level and inside functions)."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
        out[str(path.relative_to(ROOT))] = names
    return out


def offenders(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{f} imports {m}" for f, mods in imports_of(folder).items() for m in sorted(mods)
            if any(m == p or m.startswith(p + ".") for p in forbidden)]


#: the HTTP stack: only the gateway (on top) may use it
HTTP = ("starlette", "uvicorn", "pydantic", "prometheus_client")
#: Ray: only the Ray layer (on top, beside the gateway) may use it; the client never
RAY = ("ray", "llamafleet.ray")


@pytest.mark.parametrize("folder,forbidden", [
    ("runtime", ("llamafleet.client", "llamafleet.worker", "llamafleet.backends",
                 "llamafleet.cli", "llamafleet.bench", "llamafleet.testing",
                 "llamafleet.gateway", *HTTP, *RAY)),
    ("client", ("llamafleet.worker", "llamafleet.backends", "llamafleet.cli",
                "llamafleet.bench", "llamafleet.testing", "llamafleet.gateway", *HTTP, *RAY)),
    ("worker", ("llamafleet.client", "llamafleet.cli", "llamafleet.bench",
                "llamafleet.testing", "llamafleet.gateway", *HTTP, *RAY)),
    ("backends", ("llamafleet.client", "llamafleet.worker", "llamafleet.cli",
                  "llamafleet.bench", "llamafleet.testing", "llamafleet.gateway", "zmq", *HTTP,
                  *RAY)),
    ("llamafleet/gateway", ("llamafleet.worker", "llamafleet.backends", "llamafleet.cli",
                            "llamafleet.bench", "llamafleet.testing", *RAY)),
    ("llamafleet/ray", ("llamafleet.worker", "llamafleet.backends", "llamafleet.client",
                        "llamafleet.cli", "llamafleet.bench", "llamafleet.testing",
                        "llamafleet.gateway", *HTTP)),
    ("llamafleet/bench", ("llamafleet.cli", "llamafleet.gateway", *RAY)),
    ("llamafleet/testing", ("llamafleet.cli", "llamafleet.bench", "llamafleet.gateway",
                            *RAY)),
])
def test_dependencies_run_one_way(folder: str, forbidden: tuple[str, ...]) -> None:
    assert offenders(folder, forbidden) == []


def test_old_top_level_names_are_gone() -> None:
    """Nothing imports the generic names a service's own modules may carry."""
    bad = []
    for folder in [*PACKAGES, "tests"]:
        for f, mods in imports_of(folder).items():
            bad += [f"{f}: {m}" for m in mods
                    if m.split(".")[0] in ("runtime", "worker", "client", "backends", "bench")]
    assert bad == []


def test_worker_command_table_matches_the_protocol() -> None:
    from llamafleet.worker import handlers
    declared = {c.name for c in protocol.COMMANDS.values() if c.target == "worker"}
    assert set(handlers.HANDLERS) == declared
    handlers.check_table()  # passes now ...
    saved = handlers.HANDLERS.pop("ping")
    try:  # ... and fails for a command without a handler
        with pytest.raises(AssertionError, match="no handler for \\['ping'\\]"):
            handlers.check_table()
    finally:
        handlers.HANDLERS["ping"] = saved
    with pytest.raises(AssertionError, match="not a worker command"):
        handlers.handles("no_such_command")
    with pytest.raises(AssertionError, match="two handlers"):
        handlers.handles("ping")


def test_every_reply_round_trips_through_msgpack() -> None:
    c = protocol.Completion(text="hé", tokens=[1, 2], finish_reason="stop",
                            stats=protocol.CompletionStats(prompt_tokens=3, cached_tokens=2),
                            stop="\n", session="s", session_saved=False,
                            session_error="disk full", cache="ram", model="m")
    frame = protocol.result(7, c)
    msg = protocol.unpack(frame)
    back = protocol.Completion.from_wire(msg["result"])
    assert back == c and isinstance(back.stats, protocol.CompletionStats)
    # unknown keys from a newer peer are ignored; absent ones take their defaults
    newer = dict(msg["result"], some_future_field=1)
    del newer["cache"]
    assert protocol.Completion.from_wire(newer).cache is None
    with pytest.raises(protocol.ProtocolError):
        protocol.Tokens.from_wire({})  # a required field is missing
    with pytest.raises(protocol.ProtocolError):
        protocol.Tokens.from_wire([1, 2])


def test_every_command_declares_a_message_reply() -> None:
    for cmd in protocol.COMMANDS.values():
        assert issubclass(cmd.reply, protocol.Message), cmd.name


def test_events_are_declared_types() -> None:
    hb = protocol.Heartbeat(model="m", pid=1, generation=2, state="ready", endpoint="ipc://x")
    ev = protocol.decode_event(protocol.encode_event(hb))
    assert ev == hb
    with pytest.raises(TypeError):
        protocol.encode_event(protocol.Pong())
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_event(protocol.pack({"v": protocol.PROTOCOL_VERSION, "type": "nope"}))
