"""Backends: the model-owning half of a worker, behind one interface.

``get_backend(name)`` returns the class registered under ``name``. Built-in:
``fake`` (deterministic, for tests) and ``llama`` (libllama through cffi).
Third parties register theirs with :func:`register_backend`.
"""

from __future__ import annotations

import importlib

from backends.base import Backend, ModelInfo, ProgressCallback
from runtime.errors import BadRequest

_BUILTIN = {
    "fake": "backends.fake:FakeBackend",
    "llama": "backends.llama.backend:LlamaBackend",
}
_REGISTRY: dict[str, type[Backend]] = {}


def register_backend(name: str, cls: type[Backend]) -> None:
    """Make ``cls`` available under ``name`` (overrides a built-in)."""
    _REGISTRY[name] = cls


def backend_names() -> list[str]:
    return sorted(set(_BUILTIN) | set(_REGISTRY))


def get_backend(name: str) -> type[Backend]:
    """The backend class registered under ``name``; BadRequest if unknown.

    ``module:Class`` paths are accepted too, for out-of-tree backends."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    target = _BUILTIN.get(name, name if ":" in name else None)
    if target is None:
        raise BadRequest(f"unknown backend {name!r} (known: {', '.join(backend_names())})")
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    cls = getattr(module, attr)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise BadRequest(f"{target} is not a Backend subclass")
    return cls


__all__ = ["Backend", "ModelInfo", "ProgressCallback", "get_backend",
           "register_backend", "backend_names"]
