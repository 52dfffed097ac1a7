"""Backends: the model-owning half of a worker, behind one interface.

``get_backend(name)`` returns the class registered under ``name``. Built-in:
``fake`` (deterministic, for tests) and ``llama`` (libllama through cffi).
Third parties add theirs with :func:`register_backend` (in-process), an entry
point in the ``llamafleet.backends`` group (installed), or a ``module:Class``
path in the configuration.
"""

from __future__ import annotations

from llamafleet.backends.base import Backend, ModelInfo, ProgressCallback
from llamafleet.runtime import plugins
from llamafleet.runtime.errors import BadRequest

backend_names = plugins.backend_names


def register_backend(name: str, cls: type[Backend]) -> None:
    """Make ``cls`` available under ``name`` (overrides a built-in)."""
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"{cls!r} is not a Backend subclass")
    plugins.register_backend(name, cls)


def get_backend(name: str) -> type[Backend]:
    """The backend class registered under ``name``; BadRequest if unknown."""
    try:
        cls = plugins.backend_class(name)
    except plugins.UnknownBackend as exc:
        raise BadRequest(str(exc)) from None
    if not issubclass(cls, Backend):
        raise BadRequest(f"backend {name!r} ({cls.__module__}.{cls.__name__}) is not a "
                         "Backend subclass")
    return cls


__all__ = ["Backend", "ModelInfo", "ProgressCallback", "get_backend",
           "register_backend", "backend_names"]
