"""Soak: several client threads send thousands of mixed requests while we watch for leaks.

Client threads (``SOAK_THREADS``, default 4) each loop over a mix of requests: short
generates, streamed generates read to the end, streams cancelled after their first piece,
generates with a deadline that cannot be met, tokenize, embed, kv_pack/kv_unpack on a
sequence of their own, ping and info. Meanwhile a sampler reads the resident memory (VmRSS)
and open file descriptors of the worker and of this process (which runs the supervisor
in-process) every ``SAMPLE_INTERVAL`` seconds.

Asserted: no request hangs (every call has a timeout, every thread finishes), no error but
the expected ones, RSS growth after warm-up below ``max(20 MiB, 10%)`` per process, and fd
growth of at most a few.

CI runs the short form (``test_soak_short``: 10,000 requests, fake backend, well under 60 s).
``test_soak_long`` is marked ``slow`` and runs only when ``LLAMAFLEET_SOAK_REQUESTS`` is set
(e.g. 50000); ``LLAMAFLEET_SOAK_BACKEND=llama`` soaks the tiny GGUF model instead of the fake
one. With ``LLAMAFLEET_FIGURES=path`` the numbers are merged into that JSON file under
``{"soak": {...}}`` (``{"soak_llama": {...}}`` for the llama backend).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from llamafleet.client import Client
from llamafleet.runtime.errors import BadRequest, LlamafleetError, RequestTimeout
from llamafleet.runtime.supervisor import Supervisor
from tests.conftest import make_config, pid_alive, worker_pid
from tests.figures import merge_figures

THREADS = int(os.environ.get("SOAK_THREADS", "4"))
#: "per-thread": every thread its own Client (several clients on one worker, the realistic
#: case); "shared": one Client shared by all threads (its documented thread safety).
CLIENTS = os.environ.get("LLAMAFLEET_SOAK_CLIENTS", "per-thread")
SAMPLE_INTERVAL = 0.2
#: Seconds any one call may take before we call it a hang.
CALL_TIMEOUT = 30.0
RSS_BOUND_MB = 20.0
RSS_BOUND_FRAC = 0.10
FD_BOUND = 4
N_SEQ = 8  # threads own sequences 0..THREADS-1 for kv work; the rest serve generates

FAKE_OPTS = {"backend": "fake", "n_ctx": 512, "n_seq_max": N_SEQ, "n_batch": 128}
LLAMA_OPTS = {"backend": "llama", "n_ctx": 512, "n_seq_max": N_SEQ, "n_batch": 64,
              "n_ubatch": 64, "n_threads": 2}

#: (operation, weight): the request mix of every client thread.
MIX = [("generate", 18), ("stream", 12), ("stream_cancel", 8), ("deadline", 3),
       ("tokenize", 15), ("embed", 10), ("kv", 8), ("ping", 16), ("info", 10)]




# -- process probes ------------------------------------------------------------------------
def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise AssertionError(f"no VmRSS for {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Samples:
    t: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)

    def add(self, t: float, pid: int) -> None:
        self.t.append(t)
        self.rss.append(rss_mb(pid))
        self.fds.append(fd_count(pid))

    def after(self, t0: float) -> Samples:
        out = Samples()
        for t, r, f in zip(self.t, self.rss, self.fds):
            if t >= t0:
                out.t.append(t)
                out.rss.append(r)
                out.fds.append(f)
        return out


class Sampler(threading.Thread):
    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self.pids = pids
        self.samples = {name: Samples() for name in pids}
        self.stop = threading.Event()

    def sample(self) -> None:
        now = time.monotonic()
        for name, pid in self.pids.items():
            self.samples[name].add(now, pid)

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_INTERVAL):
            self.sample()


# -- the load ---------------------------------------------------------------------------------
@dataclass
class Tally:
    done: int = 0
    by_op: Counter = field(default_factory=Counter)
    expected_errors: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    slowest: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _one(c: Client, op: str, rng: random.Random, seq: int) -> str | None:
    """Run one request; return the name of an expected error, None on success."""
    if op == "generate":
        r = c.generate("m", rng.choice(["hi", "Once upon a time", "abc " * 5]),
                       max_tokens=rng.randint(1, 12), temperature=rng.choice([0.0, 0.8]))
        assert r.finish_reason in ("length", "eog", "stop") and len(r.tokens) <= 12
    elif op == "stream":
        s = c.stream("m", "stream me", max_tokens=rng.randint(1, 16), temperature=0)
        text = "".join(s)
        assert s.result is not None and s.result.text == text
    elif op == "stream_cancel":
        s = c.stream("m", "cancel me", max_tokens=400, ignore_eos=True, temperature=0)
        next(s, None)
        s.cancel()
    elif op == "deadline":
        # the worker-side deadline (deadline_ms) is not a client keyword: raw call
        try:
            c.call("m", "generate", {"prompt": "late", "max_tokens": 400, "ignore_eos": True,
                                     "stream": False, "deadline_ms": rng.choice([0, 1, 2]),
                                     "sampling": {"temperature": 0.0}})
        except RequestTimeout:
            return "timeout"
    elif op == "tokenize":
        text = rng.choice(["héllo wörld", "x" * rng.randint(0, 300), "<|im_start|>hi"])
        toks = c.tokenize("m", text, add_special=False)
        assert c.detokenize("m", toks) == text
    elif op == "embed":
        vecs = c.embed("m", [f"text {rng.random()}" for _ in range(rng.randint(1, 4))])
        assert vecs and all(len(v) == len(vecs[0]) for v in vecs)
    elif op == "kv":
        toks = c.tokenize("m", f"kv state {rng.randint(0, 10**6)}")
        try:
            n = c.prefill("m", seq, toks)
        except BadRequest as exc:
            # explicit sequences are not reserved: while ours is empty, a seq-less generate
            # of another thread may be running on it (documented scheduler behaviour)
            if "in use by running request" in exc.message:
                return "seq_in_use"
            raise
        assert n == len(toks)
        blob = c.kv_pack("m", seq)
        assert c.kv_unpack("m", seq, blob) == len(toks)
        c.seq_clear("m", seq)
    elif op == "ping":
        assert c.ping("m").pong is True
    elif op == "info":
        assert c.info("m").n_seq_max == N_SEQ
    else:
        raise AssertionError(op)
    return None


def _client_thread(sup: Supervisor, index: int, quota: int, tally: Tally,
                   shared: Client | None) -> None:
    rng = random.Random(1000 + index)
    ops, weights = zip(*MIX)
    c = Client(sup.address, timeout=CALL_TIMEOUT) if shared is None else shared
    try:
        for _ in range(quota):
            op = rng.choices(ops, weights)[0]
            t0 = time.monotonic()
            try:
                expected = _one(c, op, rng, seq=index)
            except LlamafleetError as exc:
                with tally.lock:
                    tally.errors.append(f"{op}: {exc}")
                expected = None
            except Exception as exc:  # noqa: BLE001 - anything else is a finding too
                with tally.lock:
                    tally.errors.append(f"{op}: {type(exc).__name__}: {exc}")
                expected = None
            dt = time.monotonic() - t0
            with tally.lock:
                tally.done += 1
                tally.by_op[op] += 1
                tally.slowest = max(tally.slowest, dt)
                if expected:
                    tally.expected_errors[expected] += 1
    finally:
        if shared is None:
            _close_bounded(c)


def _close_bounded(c: Client, timeout: float = 15.0) -> None:
    """Close a client, failing (not hanging) if close() never returns."""
    t = threading.Thread(target=c.close, name="soak-close", daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"HANG: Client.close() did not return within {timeout}s"


def _fleet(backend: str) -> tuple[Supervisor, Path]:
    rd = Path(tempfile.mkdtemp(prefix="lfs-", dir="/tmp"))
    if backend == "llama":
        try:
            from llamafleet.backends.llama import binding
            binding.lib()
        except Exception as exc:  # noqa: BLE001
            shutil.rmtree(rd, ignore_errors=True)
            pytest.skip(f"libllama not available: {exc}")
        from llamafleet.testing.tiny_gguf import TinyModelSpec, write_tiny_model
        model = write_tiny_model(rd / "tiny.gguf", TinyModelSpec())
        opts: dict[str, Any] = {**LLAMA_OPTS, "path": str(model)}
    else:
        opts = dict(FAKE_OPTS)
    sup = Supervisor(make_config(rd / "run", {"m": opts})).start()
    sup.wait_ready(timeout=60)
    return sup, rd


@pytest.fixture
def soak_fleet(request: pytest.FixtureRequest) -> Iterator[tuple[Supervisor, str]]:
    backend = getattr(request, "param", None) or os.environ.get("LLAMAFLEET_SOAK_BACKEND",
                                                                  "fake")
    sup, rd = _fleet(backend)
    try:
        yield sup, backend
    finally:
        sup.stop()
        shutil.rmtree(rd, ignore_errors=True)


def run_soak(sup: Supervisor, backend: str, total: int) -> dict[str, Any]:
    wpid = worker_pid(sup, "m")
    restarts0 = next(w for w in sup.status() if w["model"] == "m")["restarts"]
    sampler = Sampler({"worker": wpid, "supervisor": os.getpid()})
    # warm-up: a slice of the same load, so caches, arenas and sockets reach steady state
    warm_total = max(200, total // 10)
    tally = Tally()
    t_start = time.monotonic()
    sampler.sample()
    sampler.start()

    shared = Client(sup.address, timeout=CALL_TIMEOUT) if CLIENTS == "shared" else None

    def phase(n: int) -> None:
        per = [n // THREADS + (1 if i < n % THREADS else 0) for i in range(THREADS)]
        threads = [threading.Thread(target=_client_thread, args=(sup, i, per[i], tally, shared),
                                    name=f"soak-{i}", daemon=True) for i in range(THREADS)]
        for t in threads:
            t.start()
        # every call has CALL_TIMEOUT; a thread alive long after its share is a hang
        limit = time.monotonic() + CALL_TIMEOUT + 10 + n * 0.01
        for t in threads:
            t.join(max(0.0, limit - time.monotonic()))
            assert not t.is_alive(), f"HANG: client thread {t.name} did not finish"

    try:
        phase(warm_total)
        time.sleep(SAMPLE_INTERVAL * 2)
        t_warm = time.monotonic()
        sampler.sample()
        phase(total)
    finally:
        if shared is not None:
            _close_bounded(shared)
    time.sleep(SAMPLE_INTERVAL * 2)
    sampler.sample()
    sampler.stop.set()
    sampler.join(5)
    duration = time.monotonic() - t_warm

    assert pid_alive(wpid), "the worker died during the soak"
    st = next(w for w in sup.status() if w["model"] == "m")
    assert st["pid"] == wpid and st["restarts"] == restarts0, f"worker restarted: {st}"

    report: dict[str, Any] = {"backend": backend, "threads": THREADS, "clients": CLIENTS,
                              "requests": total,
                              "warmup_requests": warm_total,
                              "duration_s": round(duration, 2),
                              "requests_per_s": round(total / duration, 1),
                              "slowest_call_s": round(tally.slowest, 3),
                              "errors": len(tally.errors),
                              "expected_errors": dict(tally.expected_errors),
                              "by_op": dict(tally.by_op)}
    problems = []
    for name, s in sampler.samples.items():
        steady = s.after(t_warm)
        start_rss = steady.rss[0]
        # the end level: median of the last few samples (robust to a transient spike)
        end_rss = statistics.median(steady.rss[-5:])
        drift = end_rss - start_rss
        bound = max(RSS_BOUND_MB, RSS_BOUND_FRAC * start_rss)
        prefix = "" if name == "worker" else f"{name}_"
        report.update({f"{prefix}rss_start_mb": round(start_rss, 1),
                       f"{prefix}rss_end_mb": round(end_rss, 1),
                       f"{prefix}rss_max_mb": round(max(steady.rss), 1),
                       f"{prefix}rss_drift_mb": round(drift, 2),
                       f"{prefix}fds_start": steady.fds[0],
                       f"{prefix}fds_end": steady.fds[-1],
                       f"{prefix}fds_max": max(steady.fds)})
        if drift > bound:
            problems.append(f"{name} RSS grew {drift:.1f} MiB after warm-up "
                            f"({start_rss:.1f} -> {end_rss:.1f}, bound {bound:.1f})")
        if steady.fds[-1] - steady.fds[0] > FD_BOUND:
            problems.append(f"{name} fds grew {steady.fds[0]} -> {steady.fds[-1]}")
    report["t_total_s"] = round(time.monotonic() - t_start, 2)
    key = "soak" if backend == "fake" else f"soak_{backend}"
    merge_figures({key: report})
    print(f"\nsoak report: {json.dumps(report, sort_keys=True)}")
    assert tally.done == total + warm_total
    assert not tally.errors, f"{len(tally.errors)} unexpected errors, e.g. {tally.errors[:5]}"
    assert not problems, "; ".join(problems)
    return report


def test_soak_short(soak_fleet: tuple[Supervisor, str]) -> None:
    sup, backend = soak_fleet
    run_soak(sup, backend, int(os.environ.get("LLAMAFLEET_SOAK_SHORT_REQUESTS", "10000")))


@pytest.mark.slow
@pytest.mark.timeout(7200)
@pytest.mark.skipif(not os.environ.get("LLAMAFLEET_SOAK_REQUESTS"),
                    reason="set LLAMAFLEET_SOAK_REQUESTS (e.g. 50000) for the long soak")
def test_soak_long(soak_fleet: tuple[Supervisor, str]) -> None:
    sup, backend = soak_fleet
    run_soak(sup, backend, int(os.environ["LLAMAFLEET_SOAK_REQUESTS"]))
