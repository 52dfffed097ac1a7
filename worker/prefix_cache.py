"""Prefix cache of KV blobs keyed by (namespace, exact token prefix).

Two tiers: an LRU in RAM bounded by blob bytes, and (optionally) one file per
entry in a private directory, written atomically by a background thread (or
synchronously and fsync'ed for ``durable`` inserts). ``lookup`` returns the
entry sharing the longest common token prefix with a prompt; the caller
restores the blob into a sequence and prefills only the remaining tokens.

The blob is opaque bytes (``backend.kv_pack`` output); the namespace is a
string the caller builds from model identity + active adapter set, so blobs
are never shared across incompatible model states.

File format (``<sha256(namespace, tokens)>.kv``)::

    b"LFPC" | version u8 | header length u32 BE | msgpack header | blob | sha256(all before)

Header: ``{"namespace", "tokens", "session", "created", "blob_len"}``.

Threading: ``lookup``/``insert``/``session_entry`` are meant to be called from
one thread (the worker's); the writer thread is internal. All shared state is
guarded by one lock (disk reads done by ``lookup`` happen under it too).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import queue
import secrets
import struct
import sys
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

log = logging.getLogger("llamafleet.worker.prefix_cache")

MAGIC = b"LFPC"
VERSION = 1
_PREFIX = struct.Struct(">4sBI")  # magic, version, header length
_DIGEST = 32
_MAX_HEADER = 64 << 20
_SUFFIX = ".kv"
_TMP_PREFIX = ".tmp-"
_TMP_MAX_AGE = 60.0
_CHUNK = 4096  # bytes compared at once before bisecting (1024 tokens)
_WARN_INTERVAL = 10.0


class _CorruptFile(Exception):
    """A cache file failed format, size or checksum validation."""


@dataclass(frozen=True)
class CacheHit:
    """One cache entry returned by a lookup."""

    tokens: tuple[int, ...]   # the cached entry's full token sequence
    common: int               # length of the prefix shared with the looked-up tokens
    blob: bytes               # the KV blob of `tokens`
    tier: str                 # "ram" or "disk"


class _Entry:
    """Index record of one (namespace, tokens) pair, in RAM and/or on disk."""

    __slots__ = ("key", "namespace", "tb", "n", "session", "blob", "blob_gen", "path",
                 "disk_size", "disk_gen", "atime", "created")

    def __init__(self, key: str, namespace: str, tb: bytes, session: str | None,
                 created: float) -> None:
        self.key = key
        self.namespace = namespace
        self.tb = tb                       # tokens as little-endian int32 bytes
        self.n = len(tb) // 4
        self.session = session             # session whose latest entry this is/was
        self.blob: bytes | None = None     # RAM copy
        self.blob_gen = -2                 # insert generation of the RAM copy
        self.path: Path | None = None      # published file, when on disk
        self.disk_size = 0
        self.disk_gen = -1                 # insert generation of the published file
        self.atime = time.time()           # last access, for the disk LRU
        self.created = created

    def tokens(self) -> tuple[int, ...]:
        return _tokens_from_bytes(self.tb)


@dataclass
class _Job:
    key: str
    namespace: str
    tb: bytes
    session: str | None
    created: float
    blob: bytes
    gen: int


def _tok_bytes(tokens: Sequence[int]) -> bytes:
    a = array("i", tokens)
    if sys.byteorder == "big":
        a.byteswap()
    return a.tobytes()


def _tokens_from_bytes(tb: bytes) -> tuple[int, ...]:
    a = array("i")
    a.frombytes(tb)
    if sys.byteorder == "big":
        a.byteswap()
    return tuple(a)


def _key(namespace: str, tb: bytes) -> str:
    ns = namespace.encode("utf-8")
    h = hashlib.sha256(b"llamafleet-prefix-cache\0")
    h.update(len(ns).to_bytes(4, "big"))
    h.update(ns)
    h.update(tb)
    return h.hexdigest()


def common_prefix_tokens(a: bytes, b: bytes) -> int:
    """Number of leading int32 tokens shared by two token byte strings."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n // 4
    i = 0
    while i + _CHUNK <= n and a[i:i + _CHUNK] == b[i:i + _CHUNK]:
        i += _CHUNK
    lo, hi = i // 4, min(i + _CHUNK, n) // 4  # a[:4lo] == b[:4lo], a[:4hi] != b[:4hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[4 * lo:4 * mid] == b[4 * lo:4 * mid]:
            lo = mid
        else:
            hi = mid
    return lo


class PrefixCache:
    """Longest-prefix cache of KV blobs with a RAM LRU tier and an optional disk tier."""

    def __init__(self, *, ram_bytes: int = 256 << 20, disk_dir: str | Path | None = None,
                 disk_bytes: int = 2 << 30, min_tokens: int = 16,
                 write_queue: int = 16) -> None:
        self.ram_budget = int(ram_bytes)
        self.disk_budget = int(disk_bytes)
        self.min_tokens = max(1, int(min_tokens))
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._entries: dict[str, _Entry] = {}
        self._buckets: dict[tuple[str, bytes], set[str]] = {}
        self._ram: OrderedDict[str, None] = OrderedDict()
        self._ram_total = 0
        self._disk_total = 0
        self._disk_count = 0
        self._sessions: dict[tuple[str, str], str] = {}
        self._pins: dict[str, int] = {}
        self._pin_order: OrderedDict[str, None] = OrderedDict()
        self._gen = 0
        self._pending = 0
        self._last_warn: dict[str, float] = {}
        self._stats = dict.fromkeys(("hits_ram", "hits_disk", "misses", "disk_errors",
                                     "dropped_writes", "corrupt_files"), 0)
        self._closed = False
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max(1, write_queue))
        self._writer: threading.Thread | None = None
        self.disk_dir: Path | None = Path(disk_dir) if disk_dir is not None else None
        self._disk_ok = False
        if self.disk_dir is not None:
            try:
                self.disk_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                if not self.disk_dir.is_dir():
                    raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(self.disk_dir))
                self._disk_ok = True
            except OSError as e:
                self._disk_error("mkdir", f"cannot create cache dir {self.disk_dir}: {e}")
            if self._disk_ok:
                self._scan()
                self._writer = threading.Thread(target=self._write_loop,
                                                name="prefix-cache-writer", daemon=True)
                self._writer.start()

    # ------------------------------------------------------------------ public API

    @property
    def persistent(self) -> bool:
        """Whether a disk tier is configured and its directory is usable."""
        return self._disk_ok

    def lookup(self, namespace: str, tokens: Sequence[int]) -> CacheHit | None:
        """The entry of ``namespace`` sharing the longest prefix (>= min_tokens) with ``tokens``."""
        tb = _tok_bytes(tokens)
        m = self.min_tokens
        with self._lock:
            bucket = self._buckets.get((namespace, tb[:4 * m])) if len(tb) >= 4 * m else None
            if not bucket:
                self._stats["misses"] += 1
                return None
            cands = []
            for key in bucket:
                e = self._entries[key]
                cands.append((-common_prefix_tokens(tb, e.tb), e.blob is None, e.n, key))
            cands.sort()
            for negc, _, _, key in cands:
                e = self._entries.get(key)
                if e is None:
                    continue
                if e.blob is not None:
                    self._ram.move_to_end(key)
                    e.atime = time.time()
                    self._stats["hits_ram"] += 1
                    return CacheHit(e.tokens(), -negc, e.blob, "ram")
                if e.path is None:
                    continue
                blob = self._read_disk(e)
                if blob is None:
                    continue
                self._stats["hits_disk"] += 1
                self._promote(e, blob)
                return CacheHit(e.tokens(), -negc, blob, "disk")
            self._stats["misses"] += 1
            return None

    def insert(self, namespace: str, tokens: Sequence[int], blob: bytes, *,
               session: str | None = None, durable: bool = False) -> None:
        """Cache ``blob`` as the KV state of ``tokens`` in ``namespace``.

        ``session`` pins this entry as the session's latest. ``durable`` writes
        the file synchronously (fsync'ed) and raises OSError if that fails; it
        is a no-op for persistence when no ``disk_dir`` was configured.
        """
        blob = bytes(blob)
        tb = _tok_bytes(tokens)
        key = _key(namespace, tb)
        created = time.time()
        with self._lock:
            self._gen += 1
            gen = self._gen
            e = self._entries.get(key)
            if e is None:
                e = _Entry(key, namespace, tb, session, created)
                self._add_entry(e)
            # Same bytes already published (and fsync'ed), same session state: skip the rewrite.
            unchanged = (e.path is not None and e.blob is not None and e.blob_gen == e.disk_gen
                         and (session is None or self._sessions.get((namespace, session)) == key)
                         and e.blob == blob)
            e.created = created
            e.atime = created
            if session is not None:
                self._set_session(namespace, session, key)
                e.session = session
            elif e.session is not None and self._sessions.get((namespace, e.session)) != key:
                e.session = None  # no longer that session's latest; don't re-pin on restart
            self._ram_put(e, blob, gen)
            self._enforce_ram()
            if not self._disk_ok:
                if self.disk_dir is not None and durable:
                    raise OSError(errno.EIO, f"prefix cache dir {self.disk_dir} is unusable")
                self._drop_if_empty(e)
                return
            if unchanged:
                return
            job = _Job(key, namespace, tb, e.session, created, blob, gen)
            if not durable:
                if self._closed:
                    self._stats["dropped_writes"] += 1
                    self._drop_if_empty(e)
                    return
                try:
                    self._queue.put_nowait(job)
                    self._pending += 1
                except queue.Full:
                    self._stats["dropped_writes"] += 1
                # Not in RAM (too big) and not yet on disk: forgotten until the writer publishes.
                self._drop_if_empty(e)
                return
        try:
            self._write(job)
        except OSError as err:
            self._disk_error("write", f"durable write to {self.disk_dir} failed: {err}")
            with self._lock:
                ent = self._entries.get(key)
                if ent is not None:
                    self._drop_if_empty(ent)
            raise

    def session_entry(self, namespace: str, session: str) -> CacheHit | None:
        """The latest entry of ``session`` in ``namespace`` (RAM, else disk), or None."""
        with self._lock:
            key = self._sessions.get((namespace, session))
            e = self._entries.get(key) if key is not None else None
            if e is None:
                return None
            e.atime = time.time()
            if e.blob is not None:
                self._ram.move_to_end(key)
                return CacheHit(e.tokens(), e.n, e.blob, "ram")
            if e.path is None:
                return None
            blob = self._read_disk(e)
            if blob is None:
                return None
            self._promote(e, blob)
            return CacheHit(e.tokens(), e.n, blob, "disk")

    def flush(self, timeout: float = 10.0) -> None:
        """Wait (up to ``timeout`` seconds) until queued disk writes are done."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._pending > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("prefix cache flush timed out with %d writes pending",
                                self._pending)
                    return
                self._idle.wait(left)

    def close(self) -> None:
        """Flush queued writes and stop the writer thread (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.flush()
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join(timeout=10.0)

    def stats(self) -> dict[str, int]:
        """Counters and tier sizes."""
        with self._lock:
            return {"ram_entries": len(self._ram), "ram_bytes": self._ram_total,
                    "disk_entries": self._disk_count, "disk_bytes": self._disk_total,
                    **self._stats}

    def __enter__(self) -> "PrefixCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ index helpers

    def _bucket_key(self, e: _Entry) -> tuple[str, bytes] | None:
        return (e.namespace, e.tb[:4 * self.min_tokens]) if e.n >= self.min_tokens else None

    def _add_entry(self, e: _Entry) -> None:
        self._entries[e.key] = e
        bk = self._bucket_key(e)
        if bk is not None:
            self._buckets.setdefault(bk, set()).add(e.key)

    def _drop_if_empty(self, e: _Entry) -> None:
        """Forget ``e`` once it is neither in RAM nor on disk."""
        if e.blob is not None or e.path is not None or self._entries.get(e.key) is not e:
            return
        del self._entries[e.key]
        bk = self._bucket_key(e)
        if bk is not None:
            b = self._buckets.get(bk)
            if b is not None:
                b.discard(e.key)
                if not b:
                    del self._buckets[bk]

    def _set_session(self, namespace: str, session: str, key: str) -> None:
        old = self._sessions.get((namespace, session))
        if old == key:
            self._pin_order.move_to_end(key)
            return
        if old is not None:
            self._unpin(old)
        self._sessions[(namespace, session)] = key
        self._pins[key] = self._pins.get(key, 0) + 1
        self._pin_order[key] = None
        self._pin_order.move_to_end(key)

    def _unpin(self, key: str) -> None:
        n = self._pins.get(key, 0) - 1
        if n > 0:
            self._pins[key] = n
            return
        self._pins.pop(key, None)
        self._pin_order.pop(key, None)

    # ------------------------------------------------------------------ RAM tier

    def _ram_put(self, e: _Entry, blob: bytes, gen: int) -> None:
        if e.blob is not None:
            self._ram_total -= len(e.blob)
            e.blob = None
            self._ram.pop(e.key, None)
        if len(blob) <= self.ram_budget:
            e.blob = blob
            e.blob_gen = gen
            self._ram_total += len(blob)
            self._ram[e.key] = None

    def _ram_drop(self, e: _Entry) -> None:
        if e.blob is not None:
            self._ram_total -= len(e.blob)
            e.blob = None
            self._ram.pop(e.key, None)
        self._drop_if_empty(e)

    def _promote(self, e: _Entry, blob: bytes) -> None:
        self._ram_put(e, blob, e.disk_gen)
        self._enforce_ram()

    def _enforce_ram(self) -> None:
        # Pinned entries escape LRU, but their total is capped at the budget (oldest dropped).
        pinned = sum(len(self._entries[k].blob or b"") for k in self._pin_order
                     if k in self._entries)
        if pinned > self.ram_budget:
            for k in list(self._pin_order):
                if pinned <= self.ram_budget:
                    break
                e = self._entries.get(k)
                if e is not None and e.blob is not None:
                    pinned -= len(e.blob)
                    self._ram_drop(e)
        if self._ram_total <= self.ram_budget:
            return
        for k in list(self._ram):
            if self._ram_total <= self.ram_budget:
                break
            if k not in self._pins:
                self._ram_drop(self._entries[k])

    # ------------------------------------------------------------------ disk tier

    def _disk_error(self, kind: str, msg: str) -> None:
        with self._lock:
            self._stats["disk_errors"] += 1
            now = time.monotonic()
            if now - self._last_warn.get(kind, -1e9) < _WARN_INTERVAL:
                log.debug("%s", msg)
                return
            self._last_warn[kind] = now
        log.warning("%s", msg)

    def _path(self, key: str) -> Path:
        assert self.disk_dir is not None
        return self.disk_dir / (key + _SUFFIX)

    def _scan(self) -> None:
        """Rebuild the disk index from file headers; clean stale temp files."""
        assert self.disk_dir is not None
        now = time.time()
        latest: dict[tuple[str, str], tuple[float, str]] = {}
        try:
            names = os.listdir(self.disk_dir)
        except OSError as e:
            self._disk_error("scan", f"cannot list cache dir {self.disk_dir}: {e}")
            return
        for name in names:
            path = self.disk_dir / name
            if name.startswith(_TMP_PREFIX):
                try:
                    if now - path.stat().st_mtime > _TMP_MAX_AGE:
                        path.unlink()
                except OSError:
                    pass
                continue
            if not name.endswith(_SUFFIX):
                continue
            try:
                hdr, size, mtime = self._read_header(path)
                tb = _tok_bytes(hdr["tokens"])
                key = _key(hdr["namespace"], tb)
                if key + _SUFFIX != name:
                    raise _CorruptFile("file name does not match its header")
            except _CorruptFile as e:
                self._corrupt(path, str(e))
                continue
            except OSError as e:
                self._disk_error("scan", f"cannot read cache file {path}: {e}")
                continue
            ent = _Entry(key, hdr["namespace"], tb, hdr["session"], float(hdr["created"]))
            ent.path, ent.disk_size, ent.atime, ent.disk_gen = path, size, mtime, 0
            self._add_entry(ent)
            self._disk_total += size
            self._disk_count += 1
            if ent.session is not None:
                sk = (ent.namespace, ent.session)
                if sk not in latest or latest[sk][0] < ent.created:
                    latest[sk] = (ent.created, key)
        for (ns, sess), (_, key) in sorted(latest.items(), key=lambda kv: kv[1][0]):
            self._set_session(ns, sess, key)
        self._enforce_disk()

    @staticmethod
    def _read_header(path: Path) -> tuple[dict[str, Any], int, float]:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            pre = f.read(_PREFIX.size)
            if len(pre) != _PREFIX.size:
                raise _CorruptFile("truncated prefix")
            magic, version, hlen = _PREFIX.unpack(pre)
            if magic != MAGIC or version != VERSION or hlen > _MAX_HEADER:
                raise _CorruptFile("bad magic/version/header length")
            raw = f.read(hlen)
        if len(raw) != hlen:
            raise _CorruptFile("truncated header")
        hdr = _parse_header(raw)
        if st.st_size != _PREFIX.size + hlen + hdr["blob_len"] + _DIGEST:
            raise _CorruptFile("file size does not match header")
        return hdr, st.st_size, st.st_mtime

    def _read_disk(self, e: _Entry) -> bytes | None:
        """Read and verify ``e``'s blob; on failure drop the disk copy and return None."""
        assert e.path is not None
        path = e.path
        try:
            with open(path, "rb") as f:
                data = f.read()
            blob = _decode_file(data, e.namespace, e.tb)
        except _CorruptFile as err:
            self._forget_disk(e)
            self._corrupt(path, str(err))
            return None
        except OSError as err:
            self._forget_disk(e)
            self._disk_error("read", f"cannot read cache file {path}: {err}")
            return None
        e.atime = time.time()
        return blob

    def _corrupt(self, path: Path, why: str) -> None:
        with self._lock:
            self._stats["corrupt_files"] += 1
        log.warning("prefix cache: corrupt file %s (%s); removed", path, why)
        try:
            path.unlink()
        except OSError:
            pass

    def _forget_disk(self, e: _Entry) -> None:
        if e.path is not None:
            self._disk_total -= e.disk_size
            self._disk_count -= 1
            e.path, e.disk_size, e.disk_gen = None, 0, -1
        self._drop_if_empty(e)

    def _enforce_disk(self) -> None:
        """Evict least-recently-used files beyond the disk budget (never a session's latest)."""
        if self._disk_total <= self.disk_budget:
            return
        victims = sorted((e.atime, e.key) for e in self._entries.values()
                         if e.path is not None and e.key not in self._pins)
        for _, key in victims:
            if self._disk_total <= self.disk_budget:
                break
            e = self._entries[key]
            path = e.path
            self._forget_disk(e)
            try:
                assert path is not None
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as err:
                self._disk_error("evict", f"cannot remove cache file {path}: {err}")

    def _write(self, job: _Job) -> None:
        """Write ``job`` to a temp file, fsync, publish atomically, index it; raise OSError."""
        assert self.disk_dir is not None
        header = msgpack.packb({"namespace": job.namespace,
                                "tokens": list(_tokens_from_bytes(job.tb)),
                                "session": job.session, "created": job.created,
                                "blob_len": len(job.blob)})
        pre = _PREFIX.pack(MAGIC, VERSION, len(header))
        h = hashlib.sha256(pre)
        h.update(header)
        h.update(job.blob)
        digest = h.digest()
        size = len(pre) + len(header) + len(job.blob) + len(digest)
        tmp = self.disk_dir / f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        final = self._path(job.key)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with open(fd, "wb", closefd=True) as f:
                f.write(pre)
                f.write(header)
                f.write(job.blob)
                f.write(digest)
                f.flush()
                os.fsync(f.fileno())
            with self._lock:
                e = self._entries.get(job.key)
                if e is not None and e.disk_gen > job.gen:  # a newer version is published
                    os.unlink(tmp)
                    return
                os.replace(tmp, final)
                if e is None:
                    e = _Entry(job.key, job.namespace, job.tb, job.session, job.created)
                    self._add_entry(e)
                if e.path is not None:
                    self._disk_total -= e.disk_size
                    self._disk_count -= 1
                e.path, e.disk_size, e.disk_gen = final, size, job.gen
                e.atime = max(e.atime, time.time())
                self._disk_total += size
                self._disk_count += 1
                if e.blob is not None and e.blob_gen < job.gen:  # stale copy promoted meanwhile
                    self._ram_put(e, job.blob, job.gen)
                    self._enforce_ram()
                self._enforce_disk()
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        dfd = os.open(self.disk_dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _write_loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._write(job)
            except OSError as err:
                self._disk_error("write", f"prefix cache write to {self.disk_dir} failed: {err}")
                with self._lock:
                    e = self._entries.get(job.key)
                    if e is not None:
                        self._drop_if_empty(e)
            except Exception:  # never let the writer die
                log.exception("prefix cache writer failed")
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        hdr = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as e:
        raise _CorruptFile(f"unreadable header: {e}") from None
    if not isinstance(hdr, dict):
        raise _CorruptFile("header is not a map")
    ok = (isinstance(hdr.get("namespace"), str) and isinstance(hdr.get("tokens"), list)
          and all(isinstance(t, int) and -(1 << 31) <= t < (1 << 31) for t in hdr["tokens"])
          and (hdr.get("session") is None or isinstance(hdr.get("session"), str))
          and isinstance(hdr.get("created"), (int, float))
          and isinstance(hdr.get("blob_len"), int) and hdr["blob_len"] >= 0)
    if not ok:
        raise _CorruptFile("header fields missing or malformed")
    return hdr


def _decode_file(data: bytes, namespace: str, tb: bytes) -> bytes:
    """Verify a whole cache file and return its blob; raise _CorruptFile."""
    if len(data) < _PREFIX.size + _DIGEST:
        raise _CorruptFile("truncated file")
    magic, version, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise _CorruptFile("bad magic/version")
    mv = memoryview(data)
    if hashlib.sha256(mv[:-_DIGEST]).digest() != data[-_DIGEST:]:
        raise _CorruptFile("checksum mismatch")
    start = _PREFIX.size + hlen
    hdr = _parse_header(data[_PREFIX.size:start])
    if hdr["namespace"] != namespace or _tok_bytes(hdr["tokens"]) != tb:
        raise _CorruptFile("header does not match the indexed entry")
    if start + hdr["blob_len"] != len(data) - _DIGEST:
        raise _CorruptFile("blob length mismatch")
    return data[start:start + hdr["blob_len"]]
