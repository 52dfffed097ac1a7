"""Find, load and initialise libllama through cffi (ABI mode).

Discovery order:

1. ``$LLAMAFLEET_LIBLLAMA``: path to a ``libllama.so`` (a user's CUDA/Metal build);
2. the ``lib/`` directory of the installed ``llama_cpp`` package (llama-cpp-python),
   located with :func:`importlib.util.find_spec` *without importing it* (importing
   would load llama-cpp-python's own ctypes binding into the process).

The ggml libraries next to libllama are loaded first with ``RTLD_GLOBAL``. The
library is opened once per process; :func:`lib` returns ``(ffi, lib)``.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import sys
import threading
from typing import Any

from cffi import FFI

from llamafleet.backends.llama._cdef import CDEF
from llamafleet.runtime.errors import BadRequest

ENV_LIB = "LLAMAFLEET_LIBLLAMA"
log = logging.getLogger("llamafleet.llama")

_lock = threading.Lock()
_state: dict[str, Any] = {}

_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}


def _lib_name() -> str:
    if sys.platform == "darwin":
        return "libllama.dylib"
    if sys.platform == "win32":
        return "llama.dll"
    return "libllama.so"


def package_dir() -> str | None:
    """The installed ``llama_cpp`` package directory, found without importing it."""
    try:
        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def find_library() -> str:
    """Path of the libllama to load; BadRequest when none can be found."""
    env = os.environ.get(ENV_LIB)
    if env:
        if not os.path.isfile(env):
            raise BadRequest(f"{ENV_LIB}={env!r} is not a file")
        return os.path.abspath(env)
    pkg = package_dir()
    if pkg:
        for sub in ("lib", ""):
            cand = os.path.join(pkg, sub, _lib_name())
            if os.path.isfile(cand):
                return cand
    raise BadRequest("libllama not found: install llama-cpp-python==0.3.36 "
                     f"(scripts/install.sh) or set {ENV_LIB} to a libllama.so")


def find_header() -> str | None:
    """Path of the ``llama.h`` matching the library, or None.

    Looks next to the library (``../include``), in site-packages/include (where
    llama-cpp-python 0.3.36 installs it) and in ``<prefix>/include``."""
    cands: list[str] = []
    env = os.environ.get("LLAMAFLEET_LLAMA_H")
    if env:
        cands.append(env)
    try:
        libdir = os.path.dirname(find_library())
        cands += [os.path.join(libdir, "..", "include", "llama.h"),
                  os.path.join(libdir, "..", "..", "include", "llama.h")]
    except BadRequest:
        pass
    pkg = package_dir()
    if pkg:
        site = os.path.dirname(pkg)
        cands.append(os.path.join(site, "include", "llama.h"))
        cands += glob.glob(os.path.join(pkg, "**", "llama.h"), recursive=True)
    for prefix in {sys.prefix, sys.base_prefix}:
        cands.append(os.path.join(prefix, "include", "llama.h"))
    for c in cands:
        if os.path.isfile(c):
            return os.path.abspath(c)
    return None


def _make_log_callback(ffi: FFI) -> Any:
    last = [logging.INFO]

    def on_log(level: int, text: Any, _ud: Any) -> None:
        try:
            if text == ffi.NULL:
                return
            msg = ffi.string(text).decode("utf-8", "replace").rstrip("\n")
            lvl = last[0] if level == 5 else _LEVELS.get(level, logging.DEBUG)
            last[0] = lvl
            if msg and log.isEnabledFor(lvl):
                log.log(lvl, "%s", msg)
        except Exception:  # never raise into C
            pass

    return ffi.callback("void(enum ggml_log_level, const char *, void *)", on_log)


def lib() -> tuple[FFI, Any]:
    """``(ffi, lib)`` with libllama loaded and ``llama_backend_init`` done (once)."""
    st = _state
    if "lib" in st:
        return st["ffi"], st["lib"]
    with _lock:
        if "lib" in st:
            return st["ffi"], st["lib"]
        path = find_library()
        libdir = os.path.dirname(path)
        ffi = FFI()
        ffi.cdef(CDEF)
        flags = ffi.RTLD_NOW | ffi.RTLD_GLOBAL
        pre = []
        # ggml libs first so libllama resolves against the same copies
        for name in ("libggml-base", "libggml-cpu", "libggml"):
            for ext in (".so", ".dylib"):
                p = os.path.join(libdir, name + ext)
                if os.path.isfile(p):
                    try:
                        pre.append(ffi.dlopen(p, flags))
                    except OSError as exc:
                        log.debug("could not preload %s: %s", p, exc)
                    break
        try:
            L = ffi.dlopen(path, flags)
        except OSError as exc:
            raise BadRequest(f"cannot load {path}: {exc}") from None
        cb = _make_log_callback(ffi)
        L.llama_log_set(cb, ffi.NULL)
        L.llama_backend_init()
        # builds with GGML_BACKEND_DL register no backend until asked to load them
        try:
            if L.ggml_backend_reg_count() == 0:
                L.ggml_backend_load_all()
        except AttributeError:
            pass
        st.update(ffi=ffi, lib=L, path=path, log_cb=cb, pre=pre)
        log.debug("loaded %s (%s)", path, ffi.string(L.llama_print_system_info()).decode())
        return ffi, L


def library_path() -> str | None:
    """Path of the loaded library (None before :func:`lib`)."""
    return _state.get("path")
