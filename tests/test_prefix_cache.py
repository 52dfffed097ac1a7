"""PrefixCache: longest-prefix lookup, RAM LRU, disk tier, sessions, corruption, errors."""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from llamafleet.worker.cache_file import file_key
from llamafleet.worker.prefix_cache import CacheHit, PrefixCache, common_prefix_tokens, tok_bytes

NS = "model-a|adapters:"
#: the constructor's arguments are required (the worker passes its configuration)
Caches = Callable[..., PrefixCache]
DEFAULTS: dict[str, Any] = {"ram_bytes": 256 << 20, "disk_dir": None, "disk_bytes": 2 << 30,
                            "min_tokens": 4}


def toks(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def got(hit: CacheHit | None) -> CacheHit:
    """A lookup that must hit."""
    assert hit is not None
    return hit


def kv_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.suffix == ".kv")


@pytest.fixture
def caches() -> Iterator[Callable[..., PrefixCache]]:
    made: list[PrefixCache] = []

    def make(**kw: Any) -> PrefixCache:
        c = PrefixCache(**{**DEFAULTS, **kw})
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def test_common_prefix_tokens() -> None:
    rng = random.Random(1)
    for _ in range(200):
        n = rng.randint(0, 3000)
        a = [rng.randint(-5, 70000) for _ in range(n)]
        k = rng.randint(0, n)
        b = a[:k] + [rng.randint(-5, 70000) for _ in range(rng.randint(0, 2000))]
        want = 0
        while want < min(len(a), len(b)) and a[want] == b[want]:
            want += 1
        assert common_prefix_tokens(tok_bytes(a), tok_bytes(b)) == want


def test_longest_prefix_and_min_tokens(caches: Caches) -> None:
    c = caches(min_tokens=4)
    base = toks(50)
    c.insert(NS, base[:10], b"ten")
    c.insert(NS, base[:30], b"thirty")
    c.insert(NS, base[:20] + [999] * 10, b"twenty-then-diverge")
    hit = c.lookup(NS, base)
    assert hit == CacheHit(tuple(base[:30]), 30, b"thirty", "ram")
    # prompt shorter than an entry: common is the prompt length
    hit = c.lookup(NS, base[:25])
    assert hit is not None and hit.common == 25 and hit.tokens in (tuple(base[:30]),
                                                                    tuple(base[:20] + [999] * 10))
    # ties prefer the shorter entry
    assert got(c.lookup(NS, base[:8] + [7])).blob == b"ten"
    # below min_tokens: miss
    assert c.lookup(NS, base[:3]) is None
    assert c.lookup(NS, base[:3] + [1000] * 10) is None
    c.insert(NS, [1, 2, 3], b"short")  # too short to ever match
    assert c.lookup(NS, [1, 2, 3, 4, 5]) is None
    s = c.stats()
    assert s["hits_ram"] == 3 and s["misses"] == 3


def test_namespace_isolation(caches: Caches) -> None:
    c = caches()
    c.insert("m|a", toks(10), b"A")
    c.insert("m|b", toks(10), b"B")
    assert got(c.lookup("m|a", toks(12))).blob == b"A"
    assert got(c.lookup("m|b", toks(12))).blob == b"B"
    assert c.lookup("m|c", toks(12)) is None


def test_refresh_replaces_blob(caches: Caches) -> None:
    c = caches()
    c.insert(NS, toks(10), b"old")
    c.insert(NS, toks(10), b"new!")
    assert got(c.lookup(NS, toks(10))).blob == b"new!"
    assert c.stats()["ram_entries"] == 1 and c.stats()["ram_bytes"] == 4


def test_ram_lru_by_bytes(caches: Caches) -> None:
    c = caches(ram_bytes=300)
    for i in range(3):
        c.insert(NS, toks(10, 100 * i), bytes(100))
    assert c.lookup(NS, toks(10, 0)) is not None  # touch entry 0: entry 1 becomes LRU
    c.insert(NS, toks(10, 300), bytes(100))
    assert c.lookup(NS, toks(10, 100)) is None
    assert c.lookup(NS, toks(10, 0)) is not None
    assert c.lookup(NS, toks(10, 200)) is not None
    s = c.stats()
    assert s["ram_entries"] == 3 and s["ram_bytes"] == 300
    c.insert(NS, toks(10, 400), bytes(301))  # larger than the budget: not kept
    assert c.lookup(NS, toks(10, 400)) is None
    assert c.stats()["ram_bytes"] == 300


def test_disk_round_trip(caches: Caches, tmp_path: Path) -> None:
    d = tmp_path / "pc"
    c = caches(disk_dir=d)
    blob = os.urandom(5000)
    c.insert(NS, toks(40), blob, session="chat-1")
    c.insert(NS, toks(20, 500), b"other")
    c.flush()
    assert (d.stat().st_mode & 0o777) == 0o700
    assert len(kv_files(d)) == 2
    c.close()

    c2 = caches(disk_dir=d)
    assert c2.stats()["disk_entries"] == 2 and c2.stats()["ram_entries"] == 0
    hit = c2.lookup(NS, toks(60))
    assert hit == CacheHit(tuple(toks(40)), 40, blob, "disk")
    assert c2.stats()["hits_disk"] == 1 and c2.stats()["ram_entries"] == 1  # promoted
    assert got(c2.lookup(NS, toks(60))).tier == "ram"
    sess = c2.session_entry(NS, "chat-1")
    assert sess is not None and sess.tokens == tuple(toks(40)) and sess.blob == blob
    assert c2.session_entry("other-ns", "chat-1") is None
    assert c2.session_entry(NS, "nope") is None


def test_startup_reads_only_headers(caches: Caches, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    c = caches(disk_dir=tmp_path)
    c.insert(NS, toks(10), bytes(1 << 20), durable=True)
    reads: list[int] = []
    real_open = open

    class Spy:
        def __init__(self, f: Any) -> None:
            self.f = f

        def __enter__(self) -> Spy:
            return self

        def __exit__(self, *a: object) -> None:
            self.f.close()

        def read(self, n: int = -1) -> bytes:
            reads.append(n)
            return self.f.read(n)

        def fileno(self) -> int:
            return self.f.fileno()

    monkeypatch.setattr("builtins.open", lambda p, *a, **k: Spy(real_open(p, *a, **k)))
    c2 = PrefixCache(**{**DEFAULTS, "disk_dir": tmp_path})
    monkeypatch.undo()
    c2.close()
    assert c2.stats()["disk_entries"] == 1
    assert reads and all(0 <= n < 4096 for n in reads)


def test_session_pinning_and_latest(caches: Caches, tmp_path: Path) -> None:
    c = caches(disk_dir=tmp_path)
    c.insert(NS, toks(10), b"t1", session="s")
    c.insert(NS, toks(20), b"t2", session="s")
    c.insert(NS, toks(10), b"t1", session="s")  # back to an earlier state: must be rewritten
    assert got(c.session_entry(NS, "s")).blob == b"t1"
    c.close()
    c2 = caches(disk_dir=tmp_path)
    assert got(c2.session_entry(NS, "s")).tokens == tuple(toks(10))


def test_durable_insert_is_on_disk_when_it_returns(caches: Caches, tmp_path: Path) -> None:
    c = caches(disk_dir=tmp_path)
    c.insert(NS, toks(12), b"durable-blob", session="s1", durable=True)
    assert len(kv_files(tmp_path)) == 1
    # a fresh instance sees it immediately, without any flush of the first one
    c2 = caches(disk_dir=tmp_path)
    hit = c2.session_entry(NS, "s1")
    assert hit is not None and hit.blob == b"durable-blob" and hit.tier == "disk"


def test_replicas_sharing_a_directory_see_each_others_latest_session_turn(
        caches: Caches, tmp_path: Path) -> None:
    """Two live caches on one directory (two replicas): a session saved by one is
    found by the other, which started before it was saved, and back again."""
    a, b = caches(disk_dir=tmp_path), caches(disk_dir=tmp_path)
    a.insert(NS, toks(12), b"turn-1 on a", session="s", durable=True)
    hit = got(b.session_entry(NS, "s"))
    assert (hit.blob, hit.tier, hit.tokens) == (b"turn-1 on a", "disk", tuple(toks(12)))
    b.insert(NS, toks(20), b"turn-2 on b", session="s", durable=True)
    hit = got(a.session_entry(NS, "s"))  # a's own index still names turn 1
    assert (hit.blob, hit.tokens) == (b"turn-2 on b", tuple(toks(20)))
    assert a.session_entry(NS, "other") is None and a.session_entry("ns-2", "s") is None
    # a pointer to a file that is gone (another replica's budget evicted it) is no hit
    for f in kv_files(tmp_path):
        f.unlink()
    c = caches(disk_dir=tmp_path)
    assert c.session_entry(NS, "s") is None
    # a damaged pointer is ignored
    for f in tmp_path.glob("*.session"):
        f.write_text("not a key")
    assert c.session_entry(NS, "s") is None


def _two_on_disk(caches: Caches, d: Path) -> tuple[Path, Path]:
    c = caches(disk_dir=d)
    c.insert(NS, toks(30), b"long-entry-blob" * 10, durable=True)
    c.insert(NS, toks(10), b"short-entry-blob", durable=True)
    c.close()
    return (d / (file_key(NS, tok_bytes(toks(30))) + ".kv"),
            d / (file_key(NS, tok_bytes(toks(10))) + ".kv"))


@pytest.mark.parametrize("damage", ["flip_blob", "truncate", "flip_digest"])
def test_corrupt_file_detected_on_lookup(caches: Caches, tmp_path: Path, damage: str) -> None:
    long_p, short_p = _two_on_disk(caches, tmp_path)
    data = bytearray(long_p.read_bytes())
    if damage == "flip_blob":
        data[-40] ^= 0xFF
    elif damage == "flip_digest":
        data[-1] ^= 0x01
    c = caches(disk_dir=tmp_path)
    if damage == "truncate":  # truncated after startup: size check at scan would catch it first
        data = data[:len(data) // 2]
    long_p.write_bytes(bytes(data))
    hit = c.lookup(NS, toks(40))
    assert hit is not None and hit.blob == b"short-entry-blob" and hit.common == 10
    s = c.stats()
    assert s["corrupt_files"] == 1 and s["disk_entries"] == 1
    assert not long_p.exists() and short_p.exists()
    # both broken -> None
    short_p.write_bytes(b"LFPC" + b"\x00" * 10)
    c2 = caches(disk_dir=tmp_path)
    assert c2.stats()["corrupt_files"] == 1 and c2.stats()["disk_entries"] == 0
    assert c2.lookup(NS, toks(40)) is None


def test_garbage_and_truncated_headers_at_startup(caches: Caches, tmp_path: Path) -> None:
    long_p, short_p = _two_on_disk(caches, tmp_path)
    long_p.write_bytes(b"LFPC\x01\x00\x00\x00\x10" + os.urandom(100))  # garbage header
    short_p.write_bytes(short_p.read_bytes()[:-5])  # truncated
    (tmp_path / ("0" * 64 + ".kv")).write_bytes(b"not a cache file")
    c = caches(disk_dir=tmp_path)
    s = c.stats()
    assert s["corrupt_files"] == 3 and s["disk_entries"] == 0
    assert c.lookup(NS, toks(40)) is None
    c.insert(NS, toks(10), b"fresh", durable=True)
    assert got(caches(disk_dir=tmp_path).lookup(NS, toks(40))).blob == b"fresh"


def test_temp_files_ignored_and_cleaned(caches: Caches, tmp_path: Path) -> None:
    _two_on_disk(caches, tmp_path)
    fresh = tmp_path / ".tmp-123-abc"
    old = tmp_path / ".tmp-123-def"
    fresh.write_bytes(b"partial")
    old.write_bytes(b"partial")
    t = time.time() - 3600
    os.utime(old, (t, t))
    c = caches(disk_dir=tmp_path)
    assert c.stats()["disk_entries"] == 2 and c.stats()["corrupt_files"] == 0
    assert fresh.exists() and not old.exists()


def test_disk_budget_keeps_session_entries(caches: Caches, tmp_path: Path) -> None:
    c = caches(disk_dir=tmp_path, disk_bytes=5000, ram_bytes=0)
    c.insert(NS, toks(10, 0), bytes(2000), session="keep", durable=True)
    for i in range(1, 6):
        c.insert(NS, toks(10, 100 * i), bytes(1000))
        c.flush()
    s = c.stats()
    assert s["disk_bytes"] <= 5000 and s["disk_entries"] == len(kv_files(tmp_path))
    assert c.session_entry(NS, "keep") is not None
    assert c.lookup(NS, toks(10, 500)) is not None  # newest kept
    assert c.lookup(NS, toks(10, 100)) is None      # oldest evicted
    # over budget with only pinned entries: they stay
    c2 = caches(disk_dir=tmp_path / "b", disk_bytes=100, ram_bytes=0)
    c2.insert(NS, toks(10), bytes(500), session="x", durable=True)
    assert c2.session_entry(NS, "x") is not None


def test_disk_lru_at_startup_uses_mtime(caches: Caches, tmp_path: Path) -> None:
    c = caches(disk_dir=tmp_path)
    c.insert(NS, toks(10, 0), bytes(1000), durable=True)
    c.insert(NS, toks(10, 100), bytes(1000), durable=True)
    c.close()
    p0 = tmp_path / (file_key(NS, tok_bytes(toks(10, 0))) + ".kv")
    t = time.time() - 1000
    os.utime(p0, (t, t))
    c2 = caches(disk_dir=tmp_path, disk_bytes=1500)
    assert c2.stats()["disk_entries"] == 1 and not p0.exists()


def test_disk_dir_cannot_be_created(caches: Caches, tmp_path: Path) -> None:
    f = tmp_path / "a-file"
    f.write_bytes(b"x")
    c = caches(disk_dir=f / "sub")
    assert not c.persistent
    assert c.stats()["disk_errors"] == 1
    c.insert(NS, toks(10), b"blob")  # does not raise
    assert got(c.lookup(NS, toks(10))).blob == b"blob"
    with pytest.raises(OSError):
        c.insert(NS, toks(10, 50), b"b2", session="s", durable=True)
    assert got(c.lookup(NS, toks(10, 50))).blob == b"b2"  # still served from RAM


def test_enospc_on_publish(caches: Caches, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = caches(disk_dir=tmp_path)

    def full(*a: object, **k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    c.insert(NS, toks(10), b"blob")
    c.flush()
    assert c.stats()["disk_errors"] == 1
    with pytest.raises(OSError) as ei:
        c.insert(NS, toks(10, 50), b"b2", session="s", durable=True)
    assert ei.value.errno == errno.ENOSPC
    assert c.stats()["disk_errors"] == 2
    assert got(c.lookup(NS, toks(10))).blob == b"blob"
    assert got(c.session_entry(NS, "s")).blob == b"b2"
    assert c.stats()["disk_entries"] == 0
    assert not [p for p in tmp_path.iterdir()]  # temp files cleaned up
    monkeypatch.undo()
    c.insert(NS, toks(10, 50), b"b2", session="s", durable=True)
    assert c.stats()["disk_entries"] == 1


def test_pinned_sessions_survive_lru(caches: Caches) -> None:
    c = caches(ram_bytes=1000)
    c.insert(NS, toks(10, 0), bytes(300), session="a")
    c.insert(NS, toks(10, 100), bytes(300), session="b")
    for i in range(2, 10):
        c.insert(NS, toks(10, 100 * i), bytes(300))
    assert c.session_entry(NS, "a") is not None and c.session_entry(NS, "b") is not None
    assert c.stats()["ram_bytes"] <= 1000
    # moving a session unpins its previous entry
    c.insert(NS, toks(10, 1000), bytes(300), session="a")
    for i in range(11, 15):
        c.insert(NS, toks(10, 100 * i), bytes(300))
    assert c.lookup(NS, toks(10, 0)) is None
    assert got(c.session_entry(NS, "a")).tokens == tuple(toks(10, 1000))
    # pinned total is capped: the oldest pinned entries leave RAM
    for i in range(5):
        c.insert(NS, toks(10, 5000 + 100 * i), bytes(300), session=f"p{i}")
    assert c.stats()["ram_bytes"] <= 1000
    assert c.session_entry(NS, "p4") is not None
    assert c.session_entry(NS, "b") is None  # no disk tier: dropped for good


def test_pinned_dropped_from_ram_still_on_disk(caches: Caches, tmp_path: Path) -> None:
    c = caches(ram_bytes=500, disk_dir=tmp_path)
    for i in range(4):
        c.insert(NS, toks(10, 100 * i), bytes([i]) * 300, session=f"s{i}")
    c.flush()
    assert c.stats()["ram_bytes"] <= 500
    hit = c.session_entry(NS, "s0")
    assert hit is not None and hit.tier == "disk" and hit.blob == bytes([0]) * 300


def test_flush_waits_for_writes(caches: Caches, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    c = caches(disk_dir=tmp_path)
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.05)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    for i in range(5):
        c.insert(NS, toks(10, 100 * i), bytes(100))
    c.flush()
    assert c.stats()["disk_entries"] == 5 and len(kv_files(tmp_path)) == 5


def test_full_queue_drops_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (gate.wait(5), real_fsync(fd)))
    c = PrefixCache(**{**DEFAULTS, "disk_dir": tmp_path}, write_queue=2)
    try:
        for i in range(10):
            c.insert(NS, toks(10, 100 * i), bytes(10))
        assert c.stats()["dropped_writes"] >= 6
        gate.set()
        c.flush()
        s = c.stats()
        assert s["disk_entries"] + s["dropped_writes"] == 10
        assert s["ram_entries"] == 10
    finally:
        gate.set()
        c.close()


def test_large_blob_goes_to_disk_only(caches: Caches, tmp_path: Path) -> None:
    c = caches(ram_bytes=100, disk_dir=tmp_path)
    c.insert(NS, toks(10), bytes(1000))
    c.flush()
    assert c.stats()["ram_entries"] == 0
    hit = c.lookup(NS, toks(10))
    assert hit is not None and hit.tier == "disk" and len(hit.blob) == 1000


def test_concurrent_insert_lookup_with_writer(caches: Caches, tmp_path: Path) -> None:
    c = caches(ram_bytes=20_000, disk_dir=tmp_path, disk_bytes=60_000, write_queue=1000)
    rng = random.Random(7)
    prefixes = [toks(rng.randint(20, 400), 10_000 * k) for k in range(30)]
    expected: dict[tuple[int, ...], bytes] = {}
    history: dict[tuple[int, ...], set[bytes]] = {}
    for i in range(200):
        p = prefixes[rng.randrange(len(prefixes))]
        t = tuple(p[:rng.randint(8, len(p))])
        blob = bytes(t[-1] % 256 for _ in range(1)) * rng.randint(100, 3000)
        c.insert(NS, t, blob, session=f"s{i % 3}" if i % 5 == 0 else None)
        expected[t] = blob
        history.setdefault(t, set()).add(blob)
        if i % 20 == 19:
            c.flush()  # let the writer catch up now and then so lookups also hit the disk tier
        qp = prefixes[rng.randrange(len(prefixes))]
        q = qp[:rng.randint(8, len(qp))] + [-1, -2, -3]
        hit = c.lookup(NS, q)
        if hit is not None:
            assert hit.common == common_prefix_tokens(tok_bytes(hit.tokens), tok_bytes(q))
            # a disk copy may briefly lag a newer blob still queued for writing
            assert hit.common >= 4 and hit.blob in history[hit.tokens]
    c.flush()
    s = c.stats()
    assert s["ram_bytes"] <= 20_000 and s["hits_disk"] > 0
    assert s["corrupt_files"] == 0 and s["disk_errors"] == 0
    assert s["disk_entries"] == len(kv_files(tmp_path))
    assert s["disk_bytes"] == sum(p.stat().st_size for p in kv_files(tmp_path))
    for t, blob in expected.items():  # whichever tier serves it, it is the latest blob
        hit = c.lookup(NS, t)
        if hit is not None and hit.tokens == t:
            assert hit.blob == blob
    c.close()
    c2 = caches(disk_dir=tmp_path, disk_bytes=10 << 20)
    assert c2.stats()["disk_entries"] == s["disk_entries"]
    assert c2.stats()["corrupt_files"] == 0
    for k in range(3):
        assert c2.session_entry(NS, f"s{k}") is not None


def test_lookup_many_entries_long_prompt_is_fast(caches: Caches) -> None:
    c = caches(min_tokens=16, ram_bytes=1 << 30)
    base = toks(8000)
    for i in range(300):
        c.insert(NS, base[:2000 + 10 * i] + [-1 - i], b"x")
    t0 = time.perf_counter()
    for _ in range(10):
        hit = c.lookup(NS, base)
    dt = (time.perf_counter() - t0) / 10
    assert hit is not None and hit.common == 2000 + 10 * 299
    assert dt < 0.05, dt


def test_constructor_arguments_are_required() -> None:
    """No defaults of its own: the worker passes its configuration (WORKER_OPTIONS)."""
    with pytest.raises(TypeError):
        PrefixCache(ram_bytes=1 << 20, disk_dir=None, disk_bytes=1 << 20)  # type: ignore[call-arg]
    from llamafleet.runtime.config import WORKER_OPTIONS
    c = PrefixCache(ram_bytes=1 << 20, disk_dir=None, disk_bytes=1 << 20,
                    min_tokens=WORKER_OPTIONS["cache_min_tokens"].default)
    assert c.min_tokens == 32 and not c.persistent
    c.close()


def test_cache_file_round_trip_and_damage() -> None:
    from llamafleet.worker import cache_file as cf
    tb = tok_bytes(toks(20, -3))
    data = b"".join(cf.encode(NS, tb, "s", 12.5, b"the-blob"))
    assert data[:4] == cf.MAGIC and cf.tokens_from_bytes(tb) == tuple(toks(20, -3))
    assert cf.decode(data, NS, tb) == b"the-blob"
    hlen = cf.header_length(data[:cf.PREFIX_SIZE])
    hdr = cf.parse_header(data[cf.PREFIX_SIZE:cf.PREFIX_SIZE + hlen])
    assert hdr == cf.FileHeader(NS, tuple(toks(20, -3)), "s", 12.5, len(b"the-blob"))
    assert cf.file_size(hlen, hdr.blob_len) == len(data)
    with pytest.raises(cf.CorruptFile):
        cf.decode(data, "other-ns", tb)  # not the indexed entry
    for i in (0, 4, cf.PREFIX_SIZE + 1, len(data) - 40, len(data) - 1):
        bad = bytearray(data)
        bad[i] ^= 0x01
        with pytest.raises(cf.CorruptFile):
            cf.decode(bytes(bad), NS, tb)
    with pytest.raises(cf.CorruptFile):
        cf.decode(data[:-1], NS, tb)
    with pytest.raises(cf.CorruptFile):
        cf.header_length(b"LFPC\x02\x00\x00\x00\x01")  # unknown version
    with pytest.raises(cf.CorruptFile):
        cf.parse_header(b"\x93\x01\x02\x03")  # a msgpack list, not a map
