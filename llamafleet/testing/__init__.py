"""Test a service against a fake fleet (see the README's "Testing your service").

A real supervisor with real worker processes and sockets, over the deterministic
``fake`` backend (:mod:`llamafleet.backends.fake`), started in a few lines::

    from llamafleet.testing import fake_client, fake_fleet

    def test_my_service() -> None:
        with fake_fleet() as sup, fake_client(sup) as client:   # one model, "fake"
            text = client.generate("fake", "Hello", max_tokens=8, temperature=0).text
            assert text == client.generate("fake", "Hello", max_tokens=8,
                                           temperature=0).text  # deterministic

Models are given as in a configuration file's ``[models]`` table, and any
``[supervisor]`` setting may be passed as a keyword (it overrides
:data:`FAST_SETTINGS`)::

    models = {"chat": {"backend": "fake", "seed": 7, "token_delay": 0.01},
              "broken": {"backend": "fake", "crash_on_load": "exit"}}
    with fake_fleet(models, heartbeat_timeout=3.0, wait=["chat"]) as sup:
        ...

With pytest, the fixtures of :mod:`llamafleet.testing.plugin` (loaded
automatically wherever llamafleet is installed) do the same per test:
``llamafleet_fleet``, ``llamafleet_client``, ``llamafleet_address``, overridable
``llamafleet_models`` and ``llamafleet_settings``.

The tiny GGUF writer for tests against the real ``llama`` backend is exported
here too (``write_tiny_model``, ``TinyModelSpec``, ``write_lora_adapter``); it
needs the test extras (``pip install llamafleet[test]``: numpy and gguf) and
is imported only when first used.

Importing this module is cheap: it loads neither zmq nor the runtime until a
function is called.
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llamafleet.client import Client
    from llamafleet.runtime.config import Config
    from llamafleet.runtime.supervisor import Supervisor
    from llamafleet.testing.minimal_backend import MinimalBackend
    from llamafleet.testing.tiny_gguf import TinyModelSpec, write_lora_adapter, write_tiny_model

__all__ = ["DEFAULT_MODEL", "FAST_SETTINGS", "default_models", "fake_config", "fake_fleet",
           "fake_client", "short_runtime_dir", "MinimalBackend", "TinyModelSpec",
           "write_tiny_model", "write_lora_adapter"]

#: The model name :func:`fake_fleet` and the ``llamafleet_fleet`` fixture serve by default.
DEFAULT_MODEL = "fake"

#: Fast supervision settings: a crashed or wedged fake worker is noticed and
#: restarted within a second or two, so fault tests run in seconds.
FAST_SETTINGS: dict[str, float] = {
    "heartbeat_interval": 0.1,
    "heartbeat_timeout": 1.5,
    "restart_backoff_initial": 0.05,
    "restart_backoff_max": 0.5,
    "shutdown_grace": 5.0,
    "startup_timeout": 60.0,
}

#: Names resolved on first use (they need heavier imports, or the test extras).
_LAZY = {
    "TinyModelSpec": "llamafleet.testing.tiny_gguf",
    "write_tiny_model": "llamafleet.testing.tiny_gguf",
    "write_lora_adapter": "llamafleet.testing.tiny_gguf",
    "MinimalBackend": "llamafleet.testing.minimal_backend",
}


def default_models() -> dict[str, dict[str, Any]]:
    """One fake model named :data:`DEFAULT_MODEL` (a fresh dict each call)."""
    return {DEFAULT_MODEL: {"backend": "fake"}}


def short_runtime_dir() -> Path:
    """A new private directory under /tmp with a short path.

    ``ipc://`` socket paths are limited to about 107 bytes, so pytest's own
    ``tmp_path`` is often too long for a runtime directory."""
    return Path(tempfile.mkdtemp(prefix="lf-", dir="/tmp"))


def fake_config(models: Mapping[str, Mapping[str, Any]] | None = None, *,
                runtime_dir: str | Path, **supervisor_settings: Any) -> Config:
    """The :class:`~llamafleet.runtime.config.Config` :func:`fake_fleet` starts.

    ``models`` is the ``[models]`` table (default: :func:`default_models`);
    ``supervisor_settings`` are ``[supervisor]`` keys, over :data:`FAST_SETTINGS`."""
    from llamafleet.runtime.config import Config

    table = default_models() if models is None else {
        name: dict(spec) for name, spec in models.items()}
    supervisor = {**FAST_SETTINGS, **supervisor_settings, "runtime_dir": str(runtime_dir)}
    return Config.from_dict({"supervisor": supervisor, "models": table})


@contextmanager
def fake_fleet(models: Mapping[str, Mapping[str, Any]] | None = None, *,
               wait: bool | list[str] = True, ready_timeout: float = 60.0,
               **supervisor_settings: Any) -> Iterator[Supervisor]:
    """Run a fleet for the duration of a ``with`` block; yields its Supervisor.

    ``models`` is the ``[models]`` table (default: one fake model named
    ``"fake"``); any other keyword is a ``[supervisor]`` setting, over
    :data:`FAST_SETTINGS`. Without ``runtime_dir``, a short private directory
    is created under /tmp and removed afterwards.

    ``wait`` says which models must be ready before the block starts: ``True``
    (all of them, the default), a list of names, or ``False`` (none: for tests of
    loading and failures). A model that fails to start raises
    :class:`~llamafleet.runtime.errors.WorkerFailed` here, and a fleet not ready
    within ``ready_timeout`` seconds raises
    :class:`~llamafleet.runtime.errors.Unavailable`; the fleet is stopped either way.

        with fake_fleet({"a": {"backend": "fake"}, "b": {"backend": "fake"}}) as sup:
            with Client(sup.address) as c:
                ...
    """
    from llamafleet.runtime.supervisor import Supervisor

    own_dir: Path | None = None
    runtime_dir = supervisor_settings.pop("runtime_dir", None)
    if runtime_dir is None:
        runtime_dir = own_dir = short_runtime_dir()
    try:
        sup = Supervisor(fake_config(models, runtime_dir=runtime_dir, **supervisor_settings))
        sup.start()
        try:
            if wait:
                sup.wait_ready(timeout=ready_timeout,
                               models=None if wait is True else list(wait))
            yield sup
        finally:
            sup.stop()
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)


def fake_client(fleet: Supervisor | str, **client_options: Any) -> Client:
    """A synchronous :class:`~llamafleet.client.Client` connected to ``fleet``.

    ``fleet`` is a running Supervisor (e.g. from :func:`fake_fleet`) or a control
    address; ``client_options`` go to ``Client`` (``timeout``,
    ``connect_timeout``, ...). Close it when done, or use it as a context manager::

        with fake_fleet() as sup, fake_client(sup) as c:
            c.generate("fake", "Hi", max_tokens=4)
    """
    from llamafleet.client import Client

    address = fleet if isinstance(fleet, str) else fleet.address
    return Client(address, **client_options)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'llamafleet.testing' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        if module.endswith("tiny_gguf"):
            raise ImportError(f"llamafleet.testing.{name} needs numpy and gguf "
                              f"(pip install 'llamafleet[test]'): {exc}") from exc
        raise
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
