"""The prefix cache's disk tier: one file per entry in a private directory.

Files (see :mod:`llamafleet.worker.cache_file`) are written to a temp file,
fsync'ed and renamed into place, by a background writer thread (``enqueue``)
or synchronously (``write``, for durable inserts). A startup ``scan`` reads
only the headers; a file failing validation is counted, logged and removed.
Least-recently-used files beyond the byte budget are evicted, except those the
owner pins.

Several workers may share a directory (the replicas of one model): each file a
session's turn writes is followed by a small *session pointer* naming it, so a
replica the session moves to finds the latest turn another one saved
(:meth:`DiskStore.session_key`, :meth:`DiskStore.adopt`).

The store shares its owner's lock: the owner's index and the store change
together (a publish by the writer thread updates both under it), and the
owner's callbacks (``is_pinned``, ``on_published``, ``on_lost``) run with it
held.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llamafleet.worker import cache_file
from llamafleet.worker.cache_file import CorruptFile

log = logging.getLogger("llamafleet.worker.disk_store")

_TMP_PREFIX = ".tmp-"
_TMP_MAX_AGE = 60.0  # seconds before a temp file is taken for a crashed writer's
_WARN_INTERVAL = 10.0  # seconds between warnings of one kind (the rest go to debug)


@dataclass
class DiskRecord:
    """One published file."""

    key: str
    namespace: str
    tb: bytes                # tokens as little-endian int32 bytes
    session: str | None
    created: float
    path: Path
    size: int
    gen: int                 # the owner's insert generation of this version
    atime: float             # last access, for the LRU


@dataclass(frozen=True)
class WriteJob:
    """One version of an entry to write."""

    key: str
    namespace: str
    tb: bytes
    session: str | None
    created: float
    blob: bytes
    gen: int


class DiskStore:
    """Cache files in ``directory``, bounded by ``budget`` bytes.

    The owner's callbacks: ``is_pinned(key)``, whether the budget must keep a
    file; ``on_published(job)``, the file of ``job`` is in place;
    ``on_lost(key)``, the store holds no file of ``key`` (any more, or a write
    failed). A directory that cannot be created leaves ``ok`` False and the
    store empty.
    """

    def __init__(self, directory: str | Path, *, budget: int, lock: threading.RLock,
                 write_queue: int, is_pinned: Callable[[str], bool],
                 on_published: Callable[[WriteJob], None],
                 on_lost: Callable[[str], None]) -> None:
        self.directory = Path(directory)
        self.budget = int(budget)
        self._lock = lock
        self._idle = threading.Condition(lock)
        self._is_pinned = is_pinned
        self._on_published = on_published
        self._on_lost = on_lost
        self._records: dict[str, DiskRecord] = {}
        self._total = 0
        self._pending = 0
        self._closed = False
        self._last_warn: dict[str, float] = {}
        self._stats = dict.fromkeys(("disk_errors", "dropped_writes", "corrupt_files"), 0)
        self._queue: queue.Queue[WriteJob | None] = queue.Queue(maxsize=max(1, write_queue))
        self._writer: threading.Thread | None = None
        self.ok = False
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self.directory.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(self.directory))
            self.ok = True
        except OSError as e:
            self._error("mkdir", f"cannot create cache dir {self.directory}: {e}")

    # ------------------------------------------------------------------ queries

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def gen(self, key: str) -> int | None:
        """Insert generation of ``key``'s published file (None when not on disk)."""
        rec = self._records.get(key)
        return None if rec is None else rec.gen

    def touch(self, key: str) -> None:
        """Mark ``key`` recently used."""
        rec = self._records.get(key)
        if rec is not None:
            rec.atime = time.time()

    def stats(self) -> dict[str, int]:
        """Entry count, bytes and error counters."""
        with self._lock:
            return {"disk_entries": len(self._records), "disk_bytes": self._total,
                    **self._stats}

    # ------------------------------------------------------------------ startup

    def scan(self) -> list[DiskRecord]:
        """Index the files already in the directory from their headers; clean
        stale temp files. Call once, before :meth:`start`."""
        now = time.time()
        found: list[DiskRecord] = []
        try:
            names = os.listdir(self.directory)
        except OSError as e:
            self._error("scan", f"cannot list cache dir {self.directory}: {e}")
            return found
        for name in names:
            path = self.directory / name
            if name.startswith(_TMP_PREFIX):
                try:
                    if now - path.stat().st_mtime > _TMP_MAX_AGE:
                        path.unlink()
                except OSError:
                    pass
                continue
            if not name.endswith(cache_file.SUFFIX):
                continue
            try:
                hdr, size, mtime = self._read_header(path)
                tb = cache_file.tok_bytes(hdr.tokens)
                key = cache_file.file_key(hdr.namespace, tb)
                if cache_file.file_name(key) != name:
                    raise CorruptFile("file name does not match its header")
            except CorruptFile as e:
                self._corrupt(path, str(e))
                continue
            except OSError as e:
                self._error("scan", f"cannot read cache file {path}: {e}")
                continue
            rec = DiskRecord(key=key, namespace=hdr.namespace, tb=tb, session=hdr.session,
                             created=hdr.created, path=path, size=size, gen=0, atime=mtime)
            with self._lock:
                self._records[key] = rec
                self._total += size
            found.append(rec)
        return found

    def start(self) -> None:
        """Start the writer thread."""
        if self.ok and self._writer is None:
            self._writer = threading.Thread(target=self._write_loop,
                                            name="prefix-cache-writer", daemon=True)
            self._writer.start()

    @staticmethod
    def _read_header(path: Path) -> tuple[cache_file.FileHeader, int, float]:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            hlen = cache_file.header_length(f.read(cache_file.PREFIX_SIZE))
            raw = f.read(hlen)
        if len(raw) != hlen:
            raise CorruptFile("truncated header")
        hdr = cache_file.parse_header(raw)
        if st.st_size != cache_file.file_size(hlen, hdr.blob_len):
            raise CorruptFile("file size does not match header")
        return hdr, st.st_size, st.st_mtime

    # ------------------------------------------------------------------ sessions

    def session_key(self, namespace: str, session: str) -> str | None:
        """The key the session pointer names (whoever wrote it), or None."""
        path = self.directory / cache_file.session_file_name(namespace, session)
        try:
            key = path.read_text("ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return key if len(key) == 64 and all(c in "0123456789abcdef" for c in key) else None

    def adopt(self, key: str) -> DiskRecord | None:
        """Index the file of ``key`` that another process published (None: absent or
        not valid)."""
        with self._lock:
            rec = self._records.get(key)
            if rec is not None:
                return rec
            path = self.directory / cache_file.file_name(key)
            try:
                hdr, size, mtime = self._read_header(path)
                tb = cache_file.tok_bytes(hdr.tokens)
                if cache_file.file_key(hdr.namespace, tb) != key:
                    raise CorruptFile("file name does not match its header")
            except CorruptFile as e:
                self._corrupt(path, str(e))
                return None
            except OSError:
                return None  # not there (any more)
            rec = DiskRecord(key=key, namespace=hdr.namespace, tb=tb, session=hdr.session,
                             created=hdr.created, path=path, size=size, gen=0, atime=mtime)
            self._records[key] = rec
            self._total += size
            return rec

    def _point(self, job: WriteJob) -> None:
        """Make the session pointer of ``job`` name its (just published) file."""
        assert job.session is not None
        tmp = self.directory / f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        try:
            tmp.write_text(job.key, "ascii")
            os.replace(tmp, self.directory / cache_file.session_file_name(job.namespace,
                                                                           job.session))
        except OSError as err:  # the session still moves, from an older turn
            self._error("session", f"cannot write a session pointer in {self.directory}: "
                                   f"{err}")
            try:
                tmp.unlink()
            except OSError:
                pass

    # ------------------------------------------------------------------ reads

    def read(self, key: str) -> tuple[bytes, int] | None:
        """Read and verify ``key``'s blob, with its generation; on failure drop
        the file and return None."""
        with self._lock:
            rec = self._records.get(key)
            if rec is None:
                return None
            try:
                with open(rec.path, "rb") as f:
                    data = f.read()
                blob = cache_file.decode(data, rec.namespace, rec.tb)
            except CorruptFile as err:
                self._forget(rec)
                self._corrupt(rec.path, str(err))
                return None
            except OSError as err:
                self._forget(rec)
                self._error("read", f"cannot read cache file {rec.path}: {err}")
                return None
            rec.atime = time.time()
            return blob, rec.gen

    # ------------------------------------------------------------------ writes

    def enqueue(self, job: WriteJob) -> bool:
        """Hand ``job`` to the writer thread; False (counted as dropped) when
        the queue is full or the store is closed."""
        with self._lock:
            if self._closed:
                self._stats["dropped_writes"] += 1
                return False
            try:
                self._queue.put_nowait(job)
                self._pending += 1
                return True
            except queue.Full:
                self._stats["dropped_writes"] += 1
                return False

    def write(self, job: WriteJob) -> None:
        """Write ``job`` now (fsync'ed, directory included); raise OSError."""
        try:
            self._write(job)
        except OSError as err:
            self._error("write", f"durable write to {self.directory} failed: {err}")
            with self._lock:
                self._on_lost(job.key)
            raise

    def enforce_budget(self) -> None:
        """Evict least-recently-used files beyond the budget (never a pinned one)."""
        with self._lock:
            if self._total <= self.budget:
                return
            victims = sorted((r.atime, r.key) for r in self._records.values()
                             if not self._is_pinned(r.key))
            for _, key in victims:
                if self._total <= self.budget:
                    break
                rec = self._records[key]
                self._forget(rec)
                try:
                    rec.path.unlink()
                except FileNotFoundError:
                    pass
                except OSError as err:
                    self._error("evict", f"cannot remove cache file {rec.path}: {err}")

    def flush(self, timeout: float = 10.0) -> None:
        """Wait (up to ``timeout`` seconds) until queued writes are done."""
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

    def _write(self, job: WriteJob) -> None:
        """Write ``job`` to a temp file, fsync, publish atomically, index it; raise OSError."""
        parts = cache_file.encode(job.namespace, job.tb, job.session, job.created, job.blob)
        size = sum(len(p) for p in parts)
        tmp = self.directory / f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        final = self.directory / cache_file.file_name(job.key)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with open(fd, "wb", closefd=True) as f:
                for p in parts:
                    f.write(p)
                f.flush()
                os.fsync(f.fileno())
            with self._lock:
                old = self._records.get(job.key)
                if old is not None and old.gen > job.gen:  # a newer version is published
                    os.unlink(tmp)
                    return
                os.replace(tmp, final)
                atime = time.time()
                if old is not None:
                    self._total -= old.size
                    atime = max(atime, old.atime)
                self._records[job.key] = DiskRecord(
                    key=job.key, namespace=job.namespace, tb=job.tb, session=job.session,
                    created=job.created, path=final, size=size, gen=job.gen, atime=atime)
                self._total += size
                if job.session is not None:
                    self._point(job)
                self._on_published(job)
                self.enforce_budget()
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        dfd = os.open(self.directory, os.O_RDONLY)
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
                self._error("write", f"prefix cache write to {self.directory} failed: {err}")
                with self._lock:
                    self._on_lost(job.key)
            except Exception:  # never let the writer die
                log.exception("prefix cache writer failed")
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    # ------------------------------------------------------------------ failures

    def _forget(self, rec: DiskRecord) -> None:
        if self._records.get(rec.key) is rec:
            del self._records[rec.key]
            self._total -= rec.size
        self._on_lost(rec.key)

    def _corrupt(self, path: Path, why: str) -> None:
        with self._lock:
            self._stats["corrupt_files"] += 1
        log.warning("prefix cache: corrupt file %s (%s); removed", path, why)
        try:
            path.unlink()
        except OSError:
            pass

    def _error(self, kind: str, msg: str) -> None:
        with self._lock:
            self._stats["disk_errors"] += 1
            now = time.monotonic()
            if now - self._last_warn.get(kind, -1e9) < _WARN_INTERVAL:
                log.debug("%s", msg)
                return
            self._last_warn[kind] = now
        log.warning("%s", msg)
