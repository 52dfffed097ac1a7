"""Backends by name: the in-process registry, installed entry points and
``module:Class`` paths, resolved in that order.

The runtime never imports a backend module by itself: the configuration loader
asks this resolver for the class a model's ``backend`` names, to check the
model's options against the class's declared ``OPTIONS`` before any process
starts. Installed distributions add backends through the ``llamafleet.backends``
entry-point group (llamafleet's own ``fake`` and ``llama`` are declared there).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from llamafleet.runtime.fields import Field

ENTRY_POINT_GROUP = "llamafleet.backends"
#: built in: found even where the distribution's entry points are not installed
_BUILTIN = {"fake": "llamafleet.backends.fake:FakeBackend",
            "llama": "llamafleet.backends.llama:LlamaBackend"}
_REGISTRY: dict[str, type] = {}


class UnknownBackend(LookupError):
    """No backend by that name, or its module failed to import (the message says)."""


def register_backend(name: str, cls: type) -> None:
    """Make ``cls`` available under ``name`` in this process (overrides a built-in)."""
    _REGISTRY[name] = cls


def backend_names() -> list[str]:
    """Every name a ``backend`` key may use (``module:Class`` paths aside)."""
    installed = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(set(_BUILTIN) | installed | set(_REGISTRY))


def _target(name: str) -> str | None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return str(ep.value)
    return _BUILTIN.get(name, name if ":" in name else None)


def backend_class(name: str) -> type:
    """The class a backend name stands for; UnknownBackend when there is none."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    target = _target(name)
    if target is None:
        raise UnknownBackend(f"unknown backend {name!r} (known: {', '.join(backend_names())})")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raised on import
        raise UnknownBackend(f"backend {name!r}: cannot import {module_name}: "
                             f"{type(exc).__name__}: {exc}") from None
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        raise UnknownBackend(f"backend {name!r}: {target} is not a class")
    return cls


def backend_options(name: str) -> Mapping[str, Field]:
    """The options the named backend declares (its class's ``OPTIONS``)."""
    spec: Any = getattr(backend_class(name), "OPTIONS", None)
    if not isinstance(spec, Mapping) or not all(isinstance(f, Field) for f in spec.values()):
        raise UnknownBackend(f"backend {name!r} declares no OPTIONS mapping of Field")
    return spec
