"""One fleet across a Ray cluster (``pip install "llamafleet[ray]"``).

Ray places and restarts the supervisors (one per node that runs models, see
:mod:`llamafleet.ray.actors`); requests go from the client straight to the
workers over CURVE-secured ZeroMQ, as on one host. Any supervisor's address
reaches every model of the cluster, and the client needs no Ray::

    addresses = llamafleet.ray.up("fleet.toml")   # or llamafleet ray up --config ...
    with Client(addresses[0], curve_server_key=..., curve_client_cert=...) as c:
        c.generate("any-model", "hello")
    llamafleet.ray.down()

The design, the figures and a Kubernetes alternative: docs/scale-out.md.
"""

from __future__ import annotations

import os
import time
import tomllib
from pathlib import Path
from typing import Any

from llamafleet.runtime.config import Config
from llamafleet.runtime.errors import ConfigError, Unavailable

__all__ = ["up", "down", "state", "addresses", "read_config"]

#: keys holding paths, resolved against the configuration file's directory
_SUPERVISOR_PATHS = ("runtime_dir", "curve_server_key", "curve_authorized_clients")
_MODEL_PATHS = ("path", "cache_dir")


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A fleet's TOML file as a document every node can use: relative paths are made
    absolute (each node reads them at the same place: the deploy puts the model
    files and the CURVE keys there). Raises ConfigError when it does not load."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {p}: {exc}") from None
    base = p.resolve().parent

    def absolute(table: dict[str, Any], keys: tuple[str, ...]) -> None:
        for k in keys:
            v = table.get(k)
            if isinstance(v, str) and v and not Path(v).expanduser().is_absolute():
                table[k] = str(base / v)

    absolute(raw.setdefault("supervisor", {}), _SUPERVISOR_PATHS)
    for table in raw.get("models", {}).values():
        if isinstance(table, dict):
            absolute(table, _MODEL_PATHS)
    Config.from_dict(raw)
    return raw


def _controller(address: str | None, create: bool) -> Any:
    import ray

    from llamafleet.ray.actors import CONTROLLER, HEAD, NAMESPACE, Controller, controller
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto",
                 namespace=NAMESPACE, log_to_driver=False, include_dashboard=False)
    if create:
        # on the head node, which lives as long as the cluster (a worker node may go)
        return Controller.options(
            name=CONTROLLER, namespace=NAMESPACE, lifetime="detached",
            get_if_exists=True, resources={HEAD: 0.001}).remote()
    try:
        return controller()
    except ValueError:
        return None


def up(config: str | os.PathLike[str] | dict[str, Any], *, address: str | None = None,
       timeout: float = 120.0) -> list[str]:
    """Start (or update) the fleet on the Ray cluster at ``address`` (default:
    ``$RAY_ADDRESS``, else the local one); returns the supervisors' control
    addresses once every node that got models has reported."""
    from llamafleet.ray.actors import check, get
    raw = config if isinstance(config, dict) else read_config(config)
    check(raw)
    ctl = _controller(address, create=True)
    st = get(ctl.up.remote(raw))
    deadline = time.monotonic() + timeout
    while True:
        st = get(ctl.state.remote())
        placed = {n for per in st["placement"].values() for n in per}
        if placed <= set(st["addresses"]):
            return sorted(st["addresses"][n] for n in placed)
        if time.monotonic() > deadline:
            raise Unavailable(f"the supervisors did not start within {timeout:.0f}s",
                              data={"state": st})
        time.sleep(0.2)


def state(*, address: str | None = None) -> dict[str, Any] | None:
    """The fleet's placement and addresses (None when no fleet is up)."""
    from llamafleet.ray.actors import get
    ctl = _controller(address, create=False)
    return None if ctl is None else dict(get(ctl.state.remote()))


def addresses(*, address: str | None = None) -> list[str]:
    """The control addresses of the fleet's supervisors."""
    st = state(address=address)
    return sorted(st["addresses"].values()) if st else []


def down(*, address: str | None = None) -> bool:
    """Stop the fleet's supervisors and the controller; False when none was up."""
    import ray

    from llamafleet.ray.actors import get
    ctl = _controller(address, create=False)
    if ctl is None:
        return False
    get(ctl.down.remote(), timeout=120)
    ray.kill(ctl, no_restart=True)
    return True
