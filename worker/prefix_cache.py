"""Prefix cache of KV blobs keyed by (namespace, exact token prefix).

Two tiers: an LRU in RAM bounded by blob bytes, and (optionally) a
:class:`~llamafleet.worker.disk_store.DiskStore` keeping one file per entry,
written by a background thread (or synchronously and fsync'ed for ``durable``
inserts). ``lookup`` returns the entry sharing the longest common token prefix
with a prompt; the caller restores the blob into a sequence and prefills only
the remaining tokens. A session's latest entry is pinned: it escapes both
LRUs (RAM pins are capped at the RAM budget, oldest dropped first).

The blob is opaque bytes (``backend.kv_pack`` output); the namespace is a
string the caller builds from model identity + active adapter set, so blobs
are never shared across incompatible model states.

Threading: ``lookup``/``insert``/``session_entry`` are meant to be called from
one thread (the worker's); the store's writer thread is internal. All shared
state, the store's included, is guarded by one lock (disk reads done by
``lookup`` happen under it too).
"""

from __future__ import annotations

import errno
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamafleet.worker.cache_file import file_key, tok_bytes, tokens_from_bytes
from llamafleet.worker.disk_store import DiskStore, WriteJob

__all__ = ["CacheHit", "PrefixCache", "common_prefix_tokens", "tok_bytes"]

_CHUNK = 4096  # bytes compared at once before bisecting (1024 tokens)


@dataclass(frozen=True)
class CacheHit:
    """One cache entry returned by a lookup."""

    tokens: tuple[int, ...]   # the cached entry's full token sequence
    common: int               # length of the prefix shared with the looked-up tokens
    blob: bytes               # the KV blob of `tokens`
    tier: str                 # "ram" or "disk"


class _Entry:
    """Index record of one (namespace, tokens) pair, in RAM and/or on disk."""

    __slots__ = ("key", "namespace", "tb", "n", "session", "blob", "blob_gen")

    def __init__(self, key: str, namespace: str, tb: bytes, session: str | None) -> None:
        self.key = key
        self.namespace = namespace
        self.tb = tb                       # tokens as little-endian int32 bytes
        self.n = len(tb) // 4
        self.session = session             # session whose latest entry this is/was
        self.blob: bytes | None = None     # RAM copy
        self.blob_gen = -2                 # insert generation of the RAM copy

    def tokens(self) -> tuple[int, ...]:
        return tokens_from_bytes(self.tb)


def common_prefix_tokens(a: bytes, b: bytes) -> int:
    """Number of leading int32 tokens shared by two token byte strings (see ``tok_bytes``)."""
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
    """Longest-prefix cache of KV blobs with a RAM LRU tier and an optional disk tier.

    ``ram_bytes`` and ``disk_bytes`` bound the tiers' blob/file bytes;
    ``disk_dir`` None keeps RAM only; prefixes shorter than ``min_tokens`` are
    never matched. The worker passes these from its configuration
    (``WORKER_OPTIONS``), so they have no defaults here.
    """

    def __init__(self, *, ram_bytes: int, disk_dir: str | Path | None, disk_bytes: int,
                 min_tokens: int, write_queue: int = 16) -> None:
        self.ram_budget = int(ram_bytes)
        self.disk_budget = int(disk_bytes)
        self.min_tokens = max(1, int(min_tokens))
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._buckets: dict[tuple[str, bytes], set[str]] = {}
        self._ram: OrderedDict[str, None] = OrderedDict()
        self._ram_total = 0
        self._sessions: dict[tuple[str, str], str] = {}
        self._pins: dict[str, int] = {}
        self._pin_order: OrderedDict[str, None] = OrderedDict()
        self._gen = 0
        self._stats = dict.fromkeys(("hits_ram", "hits_disk", "misses"), 0)
        self.disk_dir: Path | None = Path(disk_dir) if disk_dir is not None else None
        self._disk: DiskStore | None = None
        if self.disk_dir is not None:
            self._disk = DiskStore(self.disk_dir, budget=self.disk_budget, lock=self._lock,
                                   write_queue=write_queue, is_pinned=self._pins.__contains__,
                                   on_published=self._published, on_lost=self._lost)
            if self._disk.ok:
                self._index_disk()
                self._disk.start()

    # ------------------------------------------------------------------ public API

    @property
    def persistent(self) -> bool:
        """Whether a disk tier is configured and its directory is usable."""
        return self._disk is not None and self._disk.ok

    def lookup(self, namespace: str, tokens: Sequence[int]) -> CacheHit | None:
        """The entry of ``namespace`` sharing the longest prefix (>= min_tokens) with ``tokens``."""
        tb = tok_bytes(tokens)
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
                ent = self._entries.get(key)
                if ent is None:  # dropped by a failed disk read meanwhile
                    continue
                hit = self._fetch(ent, -negc)
                if hit is not None:
                    self._stats["hits_ram" if hit.tier == "ram" else "hits_disk"] += 1
                    return hit
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
        tb = tok_bytes(tokens)
        key = file_key(namespace, tb)
        with self._lock:
            self._gen += 1
            gen = self._gen
            e = self._entries.get(key)
            if e is None:
                e = _Entry(key, namespace, tb, session)
                self._add_entry(e)
            disk = self._disk if self.persistent else None
            # Same bytes already published (and fsync'ed), same session state: skip the rewrite.
            unchanged = (disk is not None and e.blob is not None
                         and disk.gen(key) == e.blob_gen
                         and (session is None or self._sessions.get((namespace, session)) == key)
                         and e.blob == blob)
            if disk is not None:
                disk.touch(key)
            if session is not None:
                self._set_session(namespace, session, key)
                e.session = session
            elif e.session is not None and self._sessions.get((namespace, e.session)) != key:
                e.session = None  # no longer that session's latest; don't re-pin on restart
            self._ram_put(e, blob, gen)
            self._enforce_ram()
            if disk is None:
                if self.disk_dir is not None and durable:
                    raise OSError(errno.EIO, f"prefix cache dir {self.disk_dir} is unusable")
                self._drop_if_empty(e)
                return
            if unchanged:
                return
            job = WriteJob(key=key, namespace=namespace, tb=tb, session=e.session,
                           created=time.time(), blob=blob, gen=gen)
            if not durable:
                disk.enqueue(job)
                # Not in RAM (too big) and not yet on disk: forgotten until the writer publishes.
                self._drop_if_empty(e)
                return
        disk.write(job)

    def session_entry(self, namespace: str, session: str) -> CacheHit | None:
        """The latest entry of ``session`` in ``namespace`` (RAM, else disk), or None.

        The disk tier's session pointer wins over this process's own index: another
        worker sharing the directory (a replica) may have saved a later turn."""
        with self._lock:
            key = self._sessions.get((namespace, session))
            if self._disk is not None and self.persistent:
                shared = self._disk.session_key(namespace, session)
                if shared is not None and shared != key:
                    rec = self._disk.adopt(shared)
                    if rec is not None and rec.namespace == namespace:
                        if shared not in self._entries:
                            self._add_entry(_Entry(rec.key, rec.namespace, rec.tb, session))
                        self._set_session(namespace, session, shared)
                        key = shared
            e = self._entries.get(key) if key is not None else None
            if e is None:
                return None
            return self._fetch(e, e.n)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait (up to ``timeout`` seconds) until queued disk writes are done."""
        if self._disk is not None:
            self._disk.flush(timeout)

    def close(self) -> None:
        """Flush queued writes and stop the writer thread (idempotent)."""
        if self._disk is not None:
            self._disk.close()

    def stats(self) -> dict[str, int]:
        """Counters and tier sizes."""
        with self._lock:
            disk = self._disk.stats() if self._disk is not None else dict.fromkeys(
                ("disk_entries", "disk_bytes", "disk_errors", "dropped_writes",
                 "corrupt_files"), 0)
            return {"ram_entries": len(self._ram), "ram_bytes": self._ram_total,
                    "disk_entries": disk["disk_entries"], "disk_bytes": disk["disk_bytes"],
                    **self._stats, "disk_errors": disk["disk_errors"],
                    "dropped_writes": disk["dropped_writes"],
                    "corrupt_files": disk["corrupt_files"]}

    def __enter__(self) -> PrefixCache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ disk store events

    def _published(self, job: WriteJob) -> None:
        """The store wrote ``job``: index it, and refresh a stale RAM copy."""
        e = self._entries.get(job.key)
        if e is None:
            e = _Entry(job.key, job.namespace, job.tb, job.session)
            self._add_entry(e)
        if e.blob is not None and e.blob_gen < job.gen:  # stale copy promoted meanwhile
            self._ram_put(e, job.blob, job.gen)
            self._enforce_ram()

    def _lost(self, key: str) -> None:
        """The store holds no copy of ``key``: forget it unless RAM does."""
        e = self._entries.get(key)
        if e is not None:
            self._drop_if_empty(e)

    # ------------------------------------------------------------------ index helpers

    def _index_disk(self) -> None:
        """Index the files found at startup; re-pin each session's newest entry."""
        assert self._disk is not None
        latest: dict[tuple[str, str], tuple[float, str]] = {}
        for rec in self._disk.scan():
            self._add_entry(_Entry(rec.key, rec.namespace, rec.tb, rec.session))
            if rec.session is not None:
                sk = (rec.namespace, rec.session)
                if sk not in latest or latest[sk][0] < rec.created:
                    latest[sk] = (rec.created, rec.key)
        for (ns, sess), (_, key) in sorted(latest.items(), key=lambda kv: kv[1][0]):
            self._set_session(ns, sess, key)
        self._disk.enforce_budget()

    def _fetch(self, e: _Entry, common: int) -> CacheHit | None:
        """``e`` as a hit from RAM, else from disk (promoted to RAM), else None."""
        disk = self._disk
        if disk is not None:
            disk.touch(e.key)
        if e.blob is not None:
            self._ram.move_to_end(e.key)
            return CacheHit(e.tokens(), common, e.blob, "ram")
        if disk is None:
            return None
        got = disk.read(e.key)
        if got is None:
            return None
        blob, gen = got
        self._ram_put(e, blob, gen)
        self._enforce_ram()
        return CacheHit(e.tokens(), common, blob, "disk")

    def _bucket_key(self, e: _Entry) -> tuple[str, bytes] | None:
        return (e.namespace, e.tb[:4 * self.min_tokens]) if e.n >= self.min_tokens else None

    def _add_entry(self, e: _Entry) -> None:
        self._entries[e.key] = e
        bk = self._bucket_key(e)
        if bk is not None:
            self._buckets.setdefault(bk, set()).add(e.key)

    def _drop_if_empty(self, e: _Entry) -> None:
        """Forget ``e`` once it is neither in RAM nor on disk."""
        if (e.blob is not None or (self._disk is not None and e.key in self._disk)
                or self._entries.get(e.key) is not e):
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
