"""Crashes, restarts, crash loops, heartbeats and shutdown, on real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llamafleet.client import AsyncClient, Client
from llamafleet.runtime.errors import (
    AlreadyRunning,
    RequestTimeout,
    ShuttingDown,
    Unavailable,
    WorkerCrashed,
    WorkerFailed,
)
from tests.conftest import catch, kill, pid_alive, wait_for, worker_pid

SLOW = {"backend": "fake", "token_delay": 0.02, "n_seq_max": 4}


def test_sigkill_mid_stream_gives_worker_crashed_then_serves_again(fleet) -> None:
    sup = fleet({"slow": SLOW})
    with Client(sup.address, timeout=30, resume=False) as c:
        before = c.generate("slow", "abc", max_tokens=5, temperature=0)
        stream = c.stream("slow", "abc", max_tokens=60_000, ignore_eos=True, temperature=0)
        for _ in range(3):
            next(stream)
        pid = worker_pid(sup, "slow")
        kill(pid)
        t0 = time.monotonic()
        with pytest.raises(WorkerCrashed) as info:
            for _ in stream:
                pass
        assert time.monotonic() - t0 < 1.5
        assert info.value.retryable
        # the next call reaches the restarted worker, same client, nothing rebuilt
        after = c.generate("slow", "abc", max_tokens=5, temperature=0)
        assert after.tokens == before.tokens
        w = wait_for(lambda: c.status()[0] if c.status()[0]["state"] == "ready" else None)
        assert w["restarts"] == 1 and w["pid"] != pid
        assert w["last_exit"].startswith("killed by SIGKILL")


def test_every_call_in_flight_ends_with_worker_crashed(fleet) -> None:
    sup = fleet({"slow": SLOW})
    results: list[BaseException | None] = []
    with Client(sup.address, timeout=30, resume=False) as c:
        c.ping("slow")

        def call() -> None:
            try:
                c.generate("slow", "x", max_tokens=60_000, ignore_eos=True)
                results.append(None)
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
                results.append(exc)

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        wait_for(lambda: c.status()[0]["inflight"] == 4, timeout=10)
        kill(worker_pid(sup, "slow"))
        t0 = time.monotonic()
        for t in threads:
            t.join(5)
        assert time.monotonic() - t0 < 2.0
        assert len(results) == 4 and all(isinstance(r, WorkerCrashed) for r in results)


async def until_idle(c: AsyncClient, timeout: float = 10.0) -> None:
    """Wait until the supervisor reports no request in flight (it learns it from the
    worker's heartbeats, so a cancel shows there a beat later)."""
    deadline = time.monotonic() + timeout
    while (await c.status())[0]["inflight"] != 0:
        assert time.monotonic() < deadline, "a request stayed in flight"
        await asyncio.sleep(0.05)


def test_async_client_sees_the_crash_and_recovers(fleet) -> None:
    sup = fleet({"slow": SLOW})

    async def main() -> None:
        async with AsyncClient(sup.address, timeout=30, resume=False) as c:
            stream = c.stream("slow", "abc", max_tokens=60_000, ignore_eos=True)
            await stream.__anext__()
            kill(worker_pid(sup, "slow"))
            with pytest.raises(WorkerCrashed):
                async for _ in stream:
                    pass
            r = await c.generate("slow", "abc", max_tokens=3, temperature=0)
            assert len(r.tokens) == 3
            # async cancellation of the awaiting task cancels on the worker too
            task = asyncio.ensure_future(c.generate("slow", "z", max_tokens=60_000,
                                                    ignore_eos=True))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await until_idle(c)
            # leaving an `async with` block early stops the stream on the worker
            async with c.stream("slow", "w", max_tokens=60_000, ignore_eos=True) as s:
                assert await s.__anext__()
            await until_idle(c)

    asyncio.run(main())


def test_crash_loop_ends_failed_while_other_model_serves(fleet) -> None:
    sup = fleet({"crashy": {"backend": "fake", "crash_on_load": "segv"},
                 "good": {"backend": "fake"}}, wait=False, max_restarts=2)
    wait_for(lambda: {w["model"]: w["state"] for w in sup.status()}["crashy"] == "failed",
             timeout=30)
    crashy = next(w for w in sup.status() if w["model"] == "crashy")
    assert crashy["restarts"] == 2 and crashy["pid"] is None
    assert "SIGSEGV" in crashy["last_exit"]
    assert "Fatal Python error: Segmentation fault" in crashy["last_exit"]
    sup.wait_ready(models=["good"], timeout=30)
    with Client(sup.address, timeout=30) as c:
        assert c.generate("good", "hi", max_tokens=3, ignore_eos=True).tokens
        with pytest.raises(WorkerFailed, match="SIGSEGV") as info:
            c.ping("crashy")
        assert not info.value.retryable
        assert info.value.data["state"] == "failed"


def test_unloadable_model_fails_fast_with_the_reason(fleet, tmp_path: Path) -> None:
    sup = fleet({"broken": {"backend": "fake", "path": str(tmp_path / "missing.gguf")}},
                wait=False)
    wait_for(lambda: sup.status()[0]["state"] == "failed", timeout=20)
    w = sup.status()[0]
    assert "load failed" in w["last_exit"] and "does not exist" in w["last_exit"]
    assert w["restarts"] == 0


def test_wedged_worker_is_killed_by_heartbeat_timeout(fleet) -> None:
    sup = fleet({"slow": SLOW})
    with Client(sup.address, timeout=30, resume=False) as c:
        pid = worker_pid(sup, "slow")
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(WorkerCrashed):
            c.generate("slow", "x", max_tokens=10)
        assert time.monotonic() - t0 < 5.0
        wait_for(lambda: "no heartbeat" in (c.status()[0]["last_exit"] or ""), timeout=5)
        assert c.generate("slow", "x", max_tokens=2, ignore_eos=True).tokens
        assert not pid_alive(pid)


def test_timeout_cancels_the_request_on_the_worker(fleet) -> None:
    sup = fleet({"slow": {**SLOW, "n_seq_max": 1}})
    with Client(sup.address, timeout=30) as c:
        with pytest.raises(RequestTimeout):
            c.generate("slow", "x", max_tokens=60_000, ignore_eos=True, timeout=0.3)
        # the only sequence was freed by the cancel
        assert c.generate("slow", "y", max_tokens=2, temperature=0).finish_reason == "length"


def test_lookup_waits_for_a_restarting_worker(fleet) -> None:
    sup = fleet({"slow": {**SLOW, "load_delay": 0.5}}, restart_backoff_initial=0.3)
    with Client(sup.address, timeout=30, connect_timeout=10) as c:
        c.ping("slow")
        kill(worker_pid(sup, "slow"))
        wait_for(lambda: c.status()[0]["state"] == "restarting", timeout=5)
        with pytest.raises(Unavailable):
            c.lookup("slow")
        assert c.ping("slow").pong  # waited for readiness


def test_graceful_stop_lets_inflight_requests_finish(fleet) -> None:
    sup = fleet({"slow": SLOW})
    with Client(sup.address, timeout=30) as c:
        stream = c.stream("slow", "abc", max_tokens=40, ignore_eos=True, temperature=0)
        next(stream)
        stopper = threading.Thread(target=sup.stop)
        stopper.start()
        wait_for(lambda: sup._shutting_down, timeout=5)
        with pytest.raises((ShuttingDown, WorkerCrashed, RequestTimeout)):
            c.generate("slow", "new", max_tokens=2, timeout=3)
        rest = list(stream)
        assert stream.result is not None and stream.result.finish_reason == "length"
        assert len(stream.tokens) == 40 and rest
        stopper.join(10)
    assert all(w["state"] == "stopped" and w["pid"] is None for w in sup.status())


def _serve(config: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    return subprocess.Popen([sys.executable, "-m", "llamafleet", "serve", "--config",
                             str(config)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _write_config(d: Path) -> Path:
    cfg = d / "fleet.toml"
    cfg.write_text(f"""
[supervisor]
runtime_dir = "{d / 'rt'}"
heartbeat_interval = 0.1
heartbeat_timeout = 2.0

[models.tiny]
backend = "fake"
n_ctx = 1024

[models.other]
backend = "fake"
seed = 3
""")
    return cfg


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "llamafleet", *args], env=env, text=True,
                          capture_output=True, timeout=60)


def test_serve_cli_status_generate_and_sigterm(short_dir: Path) -> None:
    import json
    cfg = _write_config(short_dir)
    proc = _serve(cfg)
    addr = f"ipc://{short_dir / 'rt' / 'supervisor.sock'}"
    try:
        line = proc.stdout.readline().decode()
        assert addr in line
        with Client(addr, timeout=30) as c:
            wait_for(lambda: all(w["state"] == "ready" for w in c.status()), timeout=30)
            pids = [w["pid"] for w in c.status()]
        st = _cli("status", "--json", "--address", addr)
        assert st.returncode == 0, st.stderr
        workers = json.loads(st.stdout)["workers"]
        assert {w["model"] for w in workers} == {"tiny", "other"}
        for w in workers:
            assert {"model", "pid", "state", "restarts", "last_exit"} <= set(w)
            assert w["state"] == "ready"
        gen = _cli("generate", "--address", addr, "--model", "tiny", "--json",
                   "--temperature", "0", "--max-tokens", "7", "hello")
        assert gen.returncode == 0, gen.stderr
        doc = json.loads(gen.stdout)
        assert len(doc["tokens"]) == 7 or doc["stats"]["generated_tokens"] == len(doc["tokens"])
        assert isinstance(doc["text"], str) and "stats" in doc
        again = json.loads(_cli("generate", "--address", addr, "--model", "tiny", "--json",
                                "--temperature", "0", "--max-tokens", "7", "hello").stdout)
        assert again["tokens"] == doc["tokens"]
        plain = _cli("generate", "--address", addr, "--model", "tiny", "--temperature", "0",
                     "--max-tokens", "7", "hello")
        assert plain.stdout.rstrip("\n") == doc["text"]
        table = _cli("status", "--address", addr)
        assert "tiny" in table.stdout and "ready" in table.stdout
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        for pid in pids:
            wait_for(lambda pid=pid: not pid_alive(pid), timeout=5)
        assert not list((short_dir / "rt").glob("*.sock"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_workers_exit_when_the_supervisor_is_killed_and_restart_is_clean(short_dir) -> None:
    cfg = _write_config(short_dir)
    addr = f"ipc://{short_dir / 'rt' / 'supervisor.sock'}"
    proc = _serve(cfg)
    try:
        proc.stdout.readline()
        with Client(addr, timeout=30) as c:
            wait_for(lambda: all(w["state"] == "ready" for w in c.status()), timeout=30)
            pids = [w["pid"] for w in c.status()]
        proc.kill()
        proc.wait()
        for pid in pids:
            wait_for(lambda pid=pid: not pid_alive(pid), timeout=5)
        assert (short_dir / "rt" / "supervisor.sock").exists()  # stale socket left behind
        proc = _serve(cfg)
        proc.stdout.readline()
        with Client(addr, timeout=30) as c:
            wait_for(lambda: all(w["state"] == "ready" for w in c.status()), timeout=30)
            assert c.generate("tiny", "hi", max_tokens=3, ignore_eos=True).tokens
        stop = _cli("stop", "--address", addr)
        assert stop.returncode == 0
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_second_supervisor_on_the_same_directory_is_refused(fleet, short_dir) -> None:
    from llamafleet.runtime.supervisor import Supervisor
    from tests.conftest import make_config
    fleet({"tiny": {"backend": "fake"}})
    with pytest.raises(AlreadyRunning, match="another supervisor"):
        Supervisor(make_config(short_dir, {"tiny": {"backend": "fake"}})).start()


def _voluntary_switches(pid: int, tids: set[int] | None = None) -> int:
    """Times the threads of ``pid`` (or those in ``tids``) went to sleep and woke up."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        if tids is not None and int(task.name) not in tids:
            continue
        for line in (task / "status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_an_idle_fleet_sleeps_and_still_stops_at_once(fleet) -> None:
    # Wake-ups of idle processes take cores from the decode threads of busy ones.
    # At heartbeat_interval 0.5 s an idle worker wakes a few times a second in all
    # (it was ~35/s with a 50 ms watcher and a 100 ms idle poll), the supervisor
    # loop ~2/s (it was ~22/s polling every 50 ms for exits).
    sup = fleet({"a": {"backend": "fake"}}, heartbeat_interval=0.5, heartbeat_timeout=5.0)
    pid = worker_pid(sup, "a")
    assert sup._thread is not None and sup._thread.native_id is not None
    loop_tid = {sup._thread.native_id}
    time.sleep(0.5)
    w0, s0 = _voluntary_switches(pid), _voluntary_switches(os.getpid(), loop_tid)
    time.sleep(3.0)
    w1, s1 = _voluntary_switches(pid), _voluntary_switches(os.getpid(), loop_tid)
    assert (w1 - w0) / 3.0 < 12, f"idle worker woke {(w1 - w0) / 3.0:.1f} times/s"
    assert (s1 - s0) / 3.0 < 6, f"idle supervisor loop woke {(s1 - s0) / 3.0:.1f} times/s"
    # sleeping is no excuse for a slow shutdown: SIGTERM and stop() wake both loops
    t0 = time.monotonic()
    sup.stop()
    assert time.monotonic() - t0 < 0.8
    assert sup.status()[0]["state"] == "stopped" and not pid_alive(pid)


def _control(sup):
    """A raw DEALER on the supervisor's control socket, and a call helper."""
    import zmq

    from llamafleet.runtime import protocol
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(sup.address)

    def recv(timeout_ms: int = 5000) -> dict:
        assert s.poll(timeout_ms), "no reply from the supervisor"
        return protocol.unpack(s.recv())

    return ctx, s, recv


def test_the_registry_follows_the_worker_and_answers_lookups(fleet) -> None:
    from llamafleet.runtime import protocol
    sup = fleet({"slow": {**SLOW, "load_delay": 0.3}})
    first = sup.registry.endpoints("slow")
    assert [e.generation for e in first] == [1]
    assert first[0].endpoint == sup.status()[0]["endpoint"]
    ctx, s, recv = _control(sup)
    try:
        s.send(protocol.request(1, "lookup", {"model": "slow"}))
        reply = recv()
        assert reply["kind"] == "result"
        assert [e["generation"] for e in reply["result"]["endpoints"]] == [1]
        assert reply["result"]["replicas"] == 1
        # the caller saw generation 1 die: it waits for another one
        s.send(protocol.request(2, "lookup", {"model": "slow", "wait_ms": 20_000,
                                              "exclude": [1]}))
        assert not s.poll(200)  # generation 1 is still there: no answer yet
        kill(worker_pid(sup, "slow"))
        reply = recv(20_000)
        assert reply["id"] == 2
        assert [e["generation"] for e in reply["result"]["endpoints"]] == [2]
        assert [e.generation for e in sup.registry.endpoints("slow")] == [2]
        # a wait that ends before the model is ready is answered unavailable
        kill(worker_pid(sup, "slow"))
        wait_for(lambda: sup.registry.endpoints("slow") == [], timeout=5)
        s.send(protocol.request(3, "lookup", {"model": "slow", "wait_ms": 1,
                                              "exclude": [2, 3]}))
        reply = recv()
        assert reply["kind"] == "error" and reply["error"]["code"] == "unavailable"
        assert reply["error"]["data"]["model"] == "slow"
    finally:
        s.close()
        ctx.term()


def test_shutdown_answers_every_queued_request(fleet) -> None:
    from llamafleet.runtime import protocol
    sup = fleet({"m": {"backend": "fake", "n_batch": 8192, "n_ctx": 8192,
                       "token_delay": 30}}, shutdown_grace=3.0)
    ctx, s, recv = _control(sup)
    errors: list[BaseException | None] = []
    try:
        with Client(sup.address, timeout=30) as c:
            c.ping("m")
            t = threading.Thread(target=lambda: errors.append(catch(
                lambda: c.generate("m", "p" * 1000, max_tokens=1))))
            t.start()
            wait_for(lambda: c.status()[0]["inflight"] == 1, timeout=5)
            s.send(protocol.request(0, "lookup", {"model": "m", "wait_ms": 60_000,
                                                  "exclude": [1]}))
            stopper = threading.Thread(target=sup.stop)
            stopper.start()
            wait_for(lambda: sup._shutting_down, timeout=5)
            assert recv()["error"]["code"] == "shutting_down"  # the waiter
            # a burst queued while the workers drain: every one is answered at once
            n = 200
            for i in range(1, n + 1):
                s.send(protocol.request(i, "lookup" if i % 2 else "status",
                                        {"model": "m"} if i % 2 else {}))
            t0 = time.monotonic()
            replies = [recv() for _ in range(n)]
            assert time.monotonic() - t0 < 1.5
            assert {r["id"] for r in replies} == set(range(1, n + 1))
            for r in replies:
                if r["id"] % 2:
                    assert r["error"]["code"] == "shutting_down"
                else:
                    assert r["kind"] == "result" and r["result"]["workers"]
            stopper.join(10)
            t.join(10)
    finally:
        s.close()
        ctx.term()
    assert isinstance(errors[0], ShuttingDown)
    assert sup.status()[0]["state"] == "stopped"

