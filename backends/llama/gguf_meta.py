"""A minimal GGUF header reader (pure Python): magic check and scalar metadata.

Used to refuse non-GGUF files before llama.cpp sees them and to read an
adapter's ``general.architecture`` for a clear error message.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from typing import Any, BinaryIO

from llamafleet.runtime.errors import BadRequest

GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_MAX_STR = 64 * 1024 * 1024
#: GGUF value types (``enum gguf_type``)
INT_TYPES = frozenset({0, 1, 2, 3, 4, 5, 10, 11})
FLOAT32, BOOL, STRING, ARRAY, FLOAT64 = 6, 7, 8, 9, 12


def check_model_file(path: Any, what: str = "model") -> str:
    """Return the absolute path of a readable GGUF file, or raise BadRequest."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise BadRequest(f"{what} path must be a non-empty string")
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise BadRequest(f"{what} file not found: {path}")
    if os.path.isdir(path):
        raise BadRequest(f"{what} path is a directory: {path}")
    if not os.path.isfile(path):  # a FIFO or device would block or never end
        raise BadRequest(f"{what} path is not a regular file: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as exc:
        raise BadRequest(f"cannot read {what} file {path}: {exc.strerror}") from None
    if head[:4] != GGUF_MAGIC:
        raise BadRequest(f"{what} file is not GGUF (bad magic): {path}")
    if len(head) < 24:
        raise BadRequest(f"{what} file is truncated: {path}")
    version = struct.unpack_from("<I", head, 4)[0]
    if version not in (2, 3):
        raise BadRequest(f"unsupported GGUF version {version}: {path}")
    return path


def _read(f: BinaryIO, n: int) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise BadRequest("GGUF file is truncated")
    return b


def _read_str(f: BinaryIO) -> str:
    n = struct.unpack("<Q", _read(f, 8))[0]
    if n > _MAX_STR:
        raise BadRequest("GGUF string too long")
    return _read(f, n).decode("utf-8", "replace")


def _skip_or_read(f: BinaryIO, vtype: int, keep: bool) -> Any:
    if vtype in _SCALARS:
        fmt = _SCALARS[vtype]
        return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]
    if vtype == 8:
        return _read_str(f)
    if vtype == 9:
        itype, n = struct.unpack("<IQ", _read(f, 12))
        if itype in _SCALARS:
            f.seek(struct.calcsize(_SCALARS[itype]) * n, 1)
        else:
            for _ in range(n):
                _skip_or_read(f, itype, False)
        return None
    raise BadRequest(f"GGUF metadata has unknown value type {vtype}")


def _short_f32(x: float) -> float:
    """The shortest decimal that rounds to the same float32 as ``x``."""
    if x != x or x in (float("inf"), float("-inf")):
        return x
    want = struct.pack("<f", x)
    for digits in range(1, 10):
        y = float(f"{x:.{digits}g}")
        if struct.pack("<f", y) == want:
            return y
    return x


def _kv(f: BinaryIO) -> Iterator[tuple[str, int, Any]]:
    """``(key, value type, value)`` of each metadata pair (arrays: value None)."""
    if _read(f, 4) != GGUF_MAGIC:
        raise BadRequest("not a GGUF file")
    version, _n_tensors, n_kv = struct.unpack("<IQQ", _read(f, 20))
    if version not in (2, 3):
        raise BadRequest(f"unsupported GGUF version {version}")
    for _ in range(n_kv):
        key = _read_str(f)
        vtype = struct.unpack("<I", _read(f, 4))[0]
        yield key, vtype, _skip_or_read(f, vtype, True)


def read_metadata(path: str, keys: set[str] | None = None) -> dict[str, Any]:
    """Scalar and string metadata of a GGUF file (arrays are skipped).

    With ``keys``, stops as soon as all of them were seen."""
    out: dict[str, Any] = {}
    with open(path, "rb") as f:
        for key, _vtype, val in _kv(f):
            if val is not None:
                out[key] = val
            if keys is not None and keys <= out.keys():
                break
    return out


def read_typed_metadata(path: str, keys: set[str]) -> dict[str, tuple[int, Any]]:
    """``key -> (GGUF value type, value)`` for those of ``keys`` the file holds
    (an array's value is None); stops as soon as all of them were seen.

    Value types: ``INT_TYPES``, ``FLOAT32`` / ``FLOAT64``, ``BOOL``, ``STRING``,
    ``ARRAY``. A float32 comes back as the shortest decimal that reads back as
    the same float32 (0.8, not 0.800000011920929)."""
    out: dict[str, tuple[int, Any]] = {}
    with open(path, "rb") as f:
        for key, vtype, val in _kv(f):
            if key in keys:
                if vtype == FLOAT32:
                    val = _short_f32(val)
                out[key] = (vtype, val)
                if len(out) == len(keys):
                    break
    return out


def file_identity(path: str) -> bytes:
    """16 bytes identifying a model file: sha256 of its size, head and tail."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    h.update(struct.pack("<Q", size))
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > (1 << 20):
            f.seek(max(1 << 20, size - (1 << 16)))
            h.update(f.read(1 << 16))
    return h.digest()[:16]
