"""The prefix cache's on-disk file format: pure encode/decode, no I/O.

One file per entry, named ``<file_key(namespace, tokens)>.kv``::

    b"LFPC" | version u8 | header length u32 BE | msgpack header | blob | sha256(all before)

Header: ``{"namespace", "tokens", "session", "created", "blob_len"}``.

Tokens travel as little-endian int32 bytes (:func:`tok_bytes`), the form the
cache indexes and hashes them in.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

MAGIC = b"LFPC"
VERSION = 1
SUFFIX = ".kv"
_PREFIX = struct.Struct(">4sBI")  # magic, version, header length
#: bytes before the msgpack header
PREFIX_SIZE = _PREFIX.size
_DIGEST = 32
#: longest header a reader accepts
MAX_HEADER = 64 << 20


class CorruptFile(Exception):
    """A cache file failed format, size or checksum validation."""


@dataclass(frozen=True)
class FileHeader:
    """The metadata at the start of a cache file."""

    namespace: str
    tokens: tuple[int, ...]
    session: str | None
    created: float
    blob_len: int


def tok_bytes(tokens: Sequence[int]) -> bytes:
    """``tokens`` as little-endian int32 bytes."""
    a = array("i", tokens)
    if sys.byteorder == "big":
        a.byteswap()
    return a.tobytes()


def tokens_from_bytes(tb: bytes) -> tuple[int, ...]:
    """Inverse of :func:`tok_bytes`."""
    a = array("i")
    a.frombytes(tb)
    if sys.byteorder == "big":
        a.byteswap()
    return tuple(a)


def file_key(namespace: str, tb: bytes) -> str:
    """Hex sha256 naming the file of (namespace, token bytes)."""
    ns = namespace.encode("utf-8")
    h = hashlib.sha256(b"llamafleet-prefix-cache\0")
    h.update(len(ns).to_bytes(4, "big"))
    h.update(ns)
    h.update(tb)
    return h.hexdigest()


def file_name(key: str) -> str:
    """The file name of the entry with ``key``."""
    return key + SUFFIX


#: suffix of a session pointer: the key of the session's latest entry, as text
SESSION_SUFFIX = ".session"


def session_file_name(namespace: str, session: str) -> str:
    """The file naming the latest entry of ``session`` in ``namespace``."""
    h = hashlib.sha256(b"llamafleet-session\0")
    for part in (namespace, session):
        raw = part.encode("utf-8")
        h.update(len(raw).to_bytes(4, "big"))
        h.update(raw)
    return h.hexdigest() + SESSION_SUFFIX


def encode(namespace: str, tb: bytes, session: str | None, created: float,
           blob: bytes) -> list[bytes]:
    """A cache file as parts to write in order (the blob itself is not copied)."""
    header = msgpack.packb({"namespace": namespace, "tokens": list(tokens_from_bytes(tb)),
                            "session": session, "created": created, "blob_len": len(blob)})
    pre = _PREFIX.pack(MAGIC, VERSION, len(header))
    h = hashlib.sha256(pre)
    h.update(header)
    h.update(blob)
    return [pre, header, blob, h.digest()]


def header_length(pre: bytes) -> int:
    """Check the first :data:`PREFIX_SIZE` bytes of a file; return its header length."""
    if len(pre) != PREFIX_SIZE:
        raise CorruptFile("truncated prefix")
    magic, version, hlen = _PREFIX.unpack(pre)
    if magic != MAGIC or version != VERSION or hlen > MAX_HEADER:
        raise CorruptFile("bad magic/version/header length")
    return int(hlen)


def file_size(header_len: int, blob_len: int) -> int:
    """Total size of a file with this header and blob length."""
    return PREFIX_SIZE + header_len + blob_len + _DIGEST


def parse_header(raw: bytes) -> FileHeader:
    """Decode and validate the msgpack header; raise CorruptFile."""
    try:
        hdr: Any = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as e:
        raise CorruptFile(f"unreadable header: {e}") from None
    if not isinstance(hdr, dict):
        raise CorruptFile("header is not a map")
    ok = (isinstance(hdr.get("namespace"), str) and isinstance(hdr.get("tokens"), list)
          and all(isinstance(t, int) and -(1 << 31) <= t < (1 << 31) for t in hdr["tokens"])
          and (hdr.get("session") is None or isinstance(hdr.get("session"), str))
          and isinstance(hdr.get("created"), (int, float))
          and isinstance(hdr.get("blob_len"), int) and hdr["blob_len"] >= 0)
    if not ok:
        raise CorruptFile("header fields missing or malformed")
    return FileHeader(namespace=hdr["namespace"], tokens=tuple(hdr["tokens"]),
                      session=hdr.get("session"), created=float(hdr["created"]),
                      blob_len=hdr["blob_len"])


def decode(data: bytes, namespace: str, tb: bytes) -> bytes:
    """Verify a whole file of (namespace, token bytes) and return its blob; raise CorruptFile."""
    if len(data) < PREFIX_SIZE + _DIGEST:
        raise CorruptFile("truncated file")
    magic, version, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise CorruptFile("bad magic/version")
    mv = memoryview(data)
    if hashlib.sha256(mv[:-_DIGEST]).digest() != data[-_DIGEST:]:
        raise CorruptFile("checksum mismatch")
    start = PREFIX_SIZE + hlen
    hdr = parse_header(data[PREFIX_SIZE:start])
    if hdr.namespace != namespace or tok_bytes(hdr.tokens) != tb:
        raise CorruptFile("header does not match the indexed entry")
    if start + hdr.blob_len != len(data) - _DIGEST:
        raise CorruptFile("blob length mismatch")
    return data[start:start + hdr.blob_len]
