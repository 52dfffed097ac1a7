"""The fleet lifecycle on real processes: models on demand, eviction, keep_alive,
replicas, streams that survive a crash, live reload."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from llamafleet.client import BadRequest, Client, WorkerFailed
from llamafleet.runtime.config import Config
from llamafleet.runtime.errors import ConfigError, NotFound
from llamafleet.runtime.lifecycle import Resident, idle_expired, plan_load, too_big
from llamafleet.runtime.supervisor import Supervisor
from tests.conftest import FAST, kill, make_config, wait_for, worker_pid
from tests.figures import merge_figures

SLOW = {"backend": "fake", "token_delay": 0.02, "n_seq_max": 8, "n_ctx": 8192}
GREEDY = {"temperature": 0}


def record(name: str, **figures: Any) -> None:
    merge_figures({"lifecycle": {name: figures}})


def _alive(sup: Supervisor) -> int:
    return sum(1 for h in sup.handles() if h.proc is not None)


def _state(c: Client, model: str, replica: int = 0) -> dict[str, Any]:
    return next(w for w in c.status() if w["model"] == model and w["replica"] == replica)


# -- pure decisions ------------------------------------------------------------------------
def R(name: str, mb: float = 100, busy: bool = False, pinned: bool = False,
      last_used: float = 0.0, stopping: bool = False) -> Resident:
    return Resident(name, mb, busy, pinned, last_used, stopping)


def test_plan_load_evicts_the_least_recently_used_idle_model() -> None:
    assert plan_load([], 100, max_models=1, budget_mb=0) == plan_load([R("a")], 100,
                                                                      max_models=0, budget_mb=0)
    assert plan_load([R("a")], 100, max_models=2, budget_mb=0).ready  # type: ignore[union-attr]
    plan = plan_load([R("a", last_used=5), R("b", last_used=1)], 100, max_models=2, budget_mb=0)
    assert plan is not None and plan.evict == ("b",) and not plan.ready
    # busy and pinned models are never evicted; with nothing else the load waits
    assert plan_load([R("a", busy=True), R("b", pinned=True)], 100, max_models=2,
                     budget_mb=0) is None
    plan = plan_load([R("a", busy=True, last_used=0), R("b", last_used=9)], 100, max_models=2,
                     budget_mb=0)
    assert plan is not None and plan.evict == ("b",)
    # the memory budget: evict as many as needed, oldest first
    plan = plan_load([R("a", 300, last_used=1), R("b", 300, last_used=2),
                      R("c", 300, last_used=3)], 500, max_models=0, budget_mb=1000)
    assert plan is not None and plan.evict == ("a", "b")
    # a model already stopping still holds memory: wait for it, evict nothing more
    plan = plan_load([R("a", 600, stopping=True)], 500, max_models=0, budget_mb=1000)
    assert plan is not None and plan.evict == () and not plan.ready
    assert too_big(1001, 1000) and not too_big(1001, 0) and not too_big(10, 1000)


def test_idle_expired() -> None:
    assert idle_expired(now=10, last_used=4, keep_alive=5, busy=False)
    assert not idle_expired(now=10, last_used=6, keep_alive=5, busy=False)
    assert not idle_expired(now=10, last_used=0, keep_alive=5, busy=True)
    assert not idle_expired(now=1e9, last_used=0, keep_alive=-1, busy=False)


def test_eager_models_beyond_max_loaded_models_are_a_config_error(short_dir: Path) -> None:
    with pytest.raises(ConfigError, match="max_loaded_models"):
        make_config(short_dir, {"a": {"backend": "fake"}, "b": {"backend": "fake"}},
                    max_loaded_models=1)


# -- on demand -----------------------------------------------------------------------------
def test_ten_on_demand_models_never_more_than_two_alive_and_all_served(fleet) -> None:
    models = {f"m{i}": {"backend": "fake", "load": "on_demand", "token_delay": 0.002}
              for i in range(10)}
    sup = fleet(models, max_loaded_models=2)
    assert _alive(sup) == 0
    assert {w["state"] for w in sup.status()} == {"unloaded"}
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _alive(sup))
            time.sleep(0.005)

    served: list[str] = []
    failed: list[BaseException] = []
    rng = random.Random(7)
    plan = [[f"m{rng.randrange(10)}" for _ in range(8)] for _ in range(3)]

    def run(names: list[str]) -> None:
        with Client(sup.address, timeout=120) as c:
            for name in names:
                try:
                    r = c.generate(name, "hello", max_tokens=4, ignore_eos=True, **GREEDY)
                    assert len(r.tokens) == 4
                    served.append(name)
                except BaseException as exc:  # noqa: BLE001 - counted below
                    failed.append(exc)

    watcher = threading.Thread(target=watch)
    watcher.start()
    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(p,)) for p in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    stop.set()
    watcher.join()
    took = time.monotonic() - t0
    assert failed == []
    assert len(served) == 24
    assert 1 <= peak[0] <= 2
    loads = sum(h.generation > 0 for h in sup.handles())  # models ever loaded
    generations = max(h.generation for h in sup.handles())  # worker starts in all
    record("lifecycle_on_demand", models=10, max_loaded_models=2, requests=24, failed=0,
           peak_alive=peak[0], worker_starts=generations, models_loaded=loads,
           evictions=generations - _alive(sup), seconds=round(took, 1))


def test_two_models_used_in_turn_within_the_limit_load_once_each(fleet) -> None:
    sup = fleet({"a": {"backend": "fake", "load": "on_demand"},
                 "b": {"backend": "fake", "load": "on_demand"}}, max_loaded_models=2)
    with Client(sup.address, timeout=60) as c:
        for _ in range(6):
            for name in ("a", "b"):
                assert c.generate(name, "x", max_tokens=2, ignore_eos=True).tokens
        gens = {w["model"]: w["generation"] for w in c.status()}
        assert sorted(gens.values()) == [1, 2]  # one start each, nothing evicted
        assert all(w["state"] == "ready" and w["rss_mb"] for w in c.status())


def test_keep_alive_unloads_idle_models_but_never_pinned_ones(fleet) -> None:
    sup = fleet({"brief": {"backend": "fake", "load": "on_demand", "keep_alive": 1},
                 "pinned": {"backend": "fake"},  # eager: keep_alive -1
                 "asked": {"backend": "fake", "load": "on_demand"}})  # keep_alive 300
    with Client(sup.address, timeout=60) as c:
        for name in ("brief", "pinned"):
            c.generate(name, "x", max_tokens=2)
        # a request's own keep_alive (as in Ollama) replaces the configured one
        c.generate("asked", "x", max_tokens=2, keep_alive=1)
        assert _state(c, "brief")["keep_alive"] == 1
        t0 = time.monotonic()
        wait_for(lambda: _state(c, "brief")["state"] == "unloaded"
                 and _state(c, "asked")["state"] == "unloaded", timeout=10)
        assert time.monotonic() - t0 >= 0.5
        assert _state(c, "brief")["pid"] is None
        time.sleep(1.5)
        pinned = _state(c, "pinned")
        assert pinned["state"] == "ready" and pinned["keep_alive"] == -1
        # the next request loads it again
        assert c.generate("brief", "x", max_tokens=2, ignore_eos=True).tokens
        assert _state(c, "brief")["state"] == "ready"


def test_load_and_unload_by_hand_and_load_failures(fleet) -> None:
    sup = fleet({"m": {"backend": "fake", "load": "on_demand"},
                 "bad": {"backend": "fake", "load": "on_demand", "crash_on_load": "exit"},
                 "huge": {"backend": "fake", "load": "on_demand", "memory_mb": 5000}},
                memory_budget_mb=1000, max_restarts=1)
    with Client(sup.address, timeout=60) as c:
        found = c.load("m", wait=30)
        assert [e.replica for e in found.endpoints] == [0]
        assert _state(c, "m")["state"] == "ready"
        c.unload("m")
        wait_for(lambda: _state(c, "m")["state"] == "unloaded", timeout=10)
        with pytest.raises(WorkerFailed, match="memory_budget_mb"):
            c.generate("huge", "x", max_tokens=1)
        with pytest.raises(WorkerFailed) as info:
            c.generate("bad", "x", max_tokens=1)
        assert "exit" in info.value.message
        with pytest.raises(NotFound):
            c.load("nope")


# -- replicas and resume ---------------------------------------------------------------------
PROMPTS = [f"prompt number {i} " * (i + 1) for i in range(8)]


def test_sigkill_of_one_of_two_replicas_under_eight_streams_fails_nothing(fleet) -> None:
    sup = fleet({"r": {**SLOW, "replicas": 2}})
    with Client(sup.address, timeout=60) as c:
        solo = [c.generate("r", p, max_tokens=80, ignore_eos=True, **GREEDY).tokens
                for p in PROMPTS]
        assert {w["replica"] for w in c.status()} == {0, 1}
    results: list[Any] = [None] * 8
    started = threading.Barrier(9)

    def run(i: int) -> None:
        with Client(sup.address, timeout=60) as c:
            s = c.stream("r", PROMPTS[i], max_tokens=80, ignore_eos=True, **GREEDY)
            next(s)
            started.wait(10)
            try:
                results[i] = s.collect()
            except BaseException as exc:  # noqa: BLE001 - asserted below
                results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    started.wait(10)
    wait_for(lambda: sum(w["inflight"] for w in sup.status()) == 8, timeout=10)
    victim = max(sup.status(), key=lambda w: w["inflight"])
    kill(victim["pid"])
    for t in threads:
        t.join(60)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    assert [r.tokens for r in results] == solo
    resumed = sum(r.stats.resumed for r in results)
    assert resumed >= 1  # the streams of the killed replica moved on
    record("lifecycle_replica_kill", streams=8, failed=0, resumed=resumed,
           same_as_solo=True)


def test_sigkill_of_the_only_worker_mid_stream_resumes_with_the_crash_free_text(fleet) -> None:
    sup = fleet({"m": SLOW})
    with Client(sup.address, timeout=60) as c:
        solo = c.generate("m", "once upon a time", max_tokens=60, ignore_eos=True, **GREEDY)
        s = c.stream("m", "once upon a time", max_tokens=60, ignore_eos=True, **GREEDY)
        text = "".join(next(s) for _ in range(10))
        kill(worker_pid(sup, "m"))
        text += "".join(s)
        assert s.result is not None
        assert s.result.stats.resumed == 1
        assert text == solo.text and s.result.text == solo.text
        assert s.result.tokens == solo.tokens and s.result.finish_reason == "length"
        # a plain generate is resent whole
        pid = worker_pid(sup, "m")
        t = threading.Timer(0.4, lambda: kill(pid))
        t.start()
        again = c.generate("m", "once upon a time", max_tokens=60, ignore_eos=True, **GREEDY)
        t.join()
        assert again.tokens == solo.tokens and again.stats.resumed == 1
        # under sampling, what was already sent is continued, never repeated
        pid = worker_pid(sup, "m")
        s = c.stream("m", "once", max_tokens=60, ignore_eos=True, temperature=1.0, seed=3)
        first = [next(s) for _ in range(10)]
        sent = list(s.tokens)
        kill(pid)
        rest = list(s)
        assert s.result is not None and s.result.stats.resumed == 1
        assert s.result.tokens[:len(sent)] == sent and len(s.result.tokens) == 60
        assert "".join(first + rest) == s.result.text


def test_resume_off_and_explicit_sequences_still_fail(fleet) -> None:
    from llamafleet.client import WorkerCrashed
    sup = fleet({"m": SLOW})
    with Client(sup.address, timeout=60) as c:
        s = c.stream("m", "x", max_tokens=500, ignore_eos=True, resume=False)
        next(s)
        kill(worker_pid(sup, "m"))
        with pytest.raises(WorkerCrashed):
            list(s)
        c.prefill("m", 1, c.tokenize("m", "abc"))
        s = c.stream("m", None, tokens=c.tokenize("m", "d"), seq=1, max_tokens=500,
                     ignore_eos=True)
        next(s)
        kill(worker_pid(sup, "m"))
        with pytest.raises(WorkerCrashed):
            list(s)


# -- live reload ---------------------------------------------------------------------------
def _write(path: Path, rd: Path, models: dict[str, dict[str, Any]]) -> None:
    import json
    lines = ["[supervisor]", f'runtime_dir = "{rd}"']
    lines += [f"{k} = {v}" for k, v in FAST.items()]
    for name, table in models.items():
        lines.append(f"[models.{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")


def test_reload_under_load_adds_removes_and_changes_with_nothing_failed(
        short_dir: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "fleet.toml"
    fast = {"backend": "fake", "token_delay": 0.005}
    _write(cfg, short_dir, {"keep": fast, "chg": {**fast, "replicas": 2},
                            "gone": fast})
    sup = Supervisor(Config.load(cfg)).start()
    try:
        sup.wait_ready(30)
        pids = {(w["model"], w["replica"]): w["pid"] for w in sup.status()}
        stop = threading.Event()
        counts = {"keep": 0, "chg": 0}
        failed: list[BaseException] = []

        def hammer(model: str) -> None:
            with Client(sup.address, timeout=60) as c:
                while not stop.is_set():
                    try:
                        r = c.generate(model, "hello there", max_tokens=8, ignore_eos=True)
                        assert len(r.tokens) == 8
                        counts[model] += 1
                    except BaseException as exc:  # noqa: BLE001 - asserted below
                        failed.append(exc)

        threads = [threading.Thread(target=hammer, args=(m,)) for m in ("keep", "chg") * 2]
        for t in threads:
            t.start()
        time.sleep(0.5)
        # a configuration that does not load is refused whole
        cfg.write_text(cfg.read_text() + "\n[models.broken]\nbackend = 'nope'\n")
        with Client(sup.address) as c, pytest.raises(BadRequest, match="unknown backend"):
            c.reload()
        assert {w["model"] for w in sup.status()} == {"keep", "chg", "gone"}
        _write(cfg, short_dir, {"keep": fast, "chg": {**fast, "replicas": 2, "n_ctx": 2048},
                                "new": fast})
        with Client(sup.address) as c:
            done = c.reload()
        assert (done.added, done.removed, done.changed, done.unchanged) == \
            (["new"], ["gone"], ["chg"], ["keep"])
        wait_for(lambda: all(w["state"] == "ready" for w in sup.status())
                 and all(w["pid"] != pids[("chg", w["replica"])]
                         for w in sup.status() if w["model"] == "chg"), timeout=30)
        before = dict(counts)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(30)
        assert failed == []
        assert counts["keep"] > before["keep"] and counts["chg"] > before["chg"]
        now = {(w["model"], w["replica"]): w["pid"] for w in sup.status()}
        assert now[("keep", 0)] == pids[("keep", 0)]  # unchanged: not touched
        assert set(now) == {("keep", 0), ("chg", 0), ("chg", 1), ("new", 0)}
        with Client(sup.address, timeout=30) as c:
            assert c.info("chg").n_ctx == 2048
            assert c.generate("new", "x", max_tokens=2, ignore_eos=True).tokens
            with pytest.raises(NotFound):
                c.ping("gone")
        record("lifecycle_reload", requests_during=sum(counts.values()), failed=0)
    finally:
        sup.stop()


def test_cli_load_unload_reload_and_sighup(short_dir: Path, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    cfg = tmp_path / "fleet.toml"
    _write(cfg, short_dir, {"m": {"backend": "fake", "load": "on_demand"}})
    address = f"ipc://{short_dir}/supervisor.sock"
    serve = subprocess.Popen([sys.executable, "-m", "llamafleet", "serve", "--config",
                              str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True)

    def cli(*argv: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "llamafleet", *argv, "--address",
                               address], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    try:
        assert serve.stdout is not None and "supervisor at" in serve.stdout.readline()
        assert "unloaded" in cli("status")
        cli("load", "m")
        assert " ready " in cli("status")
        cli("unload", "m")
        with Client(address) as c:
            wait_for(lambda: _state(c, "m")["state"] == "unloaded", timeout=10)
            _write(cfg, short_dir, {"m": {"backend": "fake", "load": "on_demand"},
                                    "n": {"backend": "fake"}})
            out = cli("reload")
            assert "added: n" in out and "unchanged: m" in out
            wait_for(lambda: _state(c, "n")["state"] == "ready", timeout=20)
            _write(cfg, short_dir, {"m": {"backend": "fake", "load": "on_demand"}})
            serve.send_signal(signal.SIGHUP)
            wait_for(lambda: {w["model"] for w in c.status()} == {"m"}, timeout=20)
            assert c.generate("m", "x", max_tokens=2, ignore_eos=True).tokens  # loaded on demand
    finally:
        serve.terminate()
        serve.wait(30)


def test_gateway_keep_alive_and_model_states(short_dir: Path) -> None:
    import httpx
    raw = {"supervisor": {"runtime_dir": str(short_dir), **FAST},
           "models": {"od": {"backend": "fake", "load": "on_demand"}},
           "http": {"listen": "127.0.0.1:0"}}
    sup = Supervisor(Config.from_dict(raw)).start()
    try:
        sup.wait_ready(30)
        url = sup.http_url
        assert url is not None
        states = {m["id"]: m for m in httpx.get(url + "/v1/models").json()["data"]}
        assert "unloaded" in str(states["od"])
        r = httpx.post(url + "/v1/completions", json={"model": "od", "prompt": "x",
                                                      "max_tokens": 2, "keep_alive": 1},
                       timeout=60)
        assert r.status_code == 200, r.text
        wait_for(lambda: sup.status()[0]["state"] == "unloaded", timeout=10)
    finally:
        sup.stop()


def test_reload_of_only_replicas_starts_or_retires_the_difference(
        short_dir: Path, tmp_path: Path) -> None:
    """2 -> 3 -> 1 replicas under load: the replicas kept are not restarted, clients
    that are already connected find the added one (a background lookup), and the
    retired ones drain: nothing fails."""
    cfg = tmp_path / "fleet.toml"
    fast = {"backend": "fake", "token_delay": 0.005}
    _write(cfg, short_dir, {"r": {**fast, "replicas": 2}})
    sup = Supervisor(Config.load(cfg)).start()
    try:
        sup.wait_ready(30)

        def pids() -> dict[int, int | None]:
            return {w["replica"]: w["pid"] for w in sup.status() if w["model"] == "r"}

        first = pids()
        stop = threading.Event()
        failed: list[BaseException] = []

        def hammer() -> None:
            with Client(sup.address, timeout=60) as c:
                while not stop.is_set():
                    try:
                        r = c.generate("r", "hello there", max_tokens=6, ignore_eos=True)
                        assert len(r.tokens) == 6
                    except BaseException as exc:  # noqa: BLE001 - asserted below
                        failed.append(exc)

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        _write(cfg, short_dir, {"r": {**fast, "replicas": 3}})
        with Client(sup.address) as c:
            assert c.reload().changed == ["r"]
            wait_for(lambda: len(pids()) == 3 and all(pids().values())
                     and _state(c, "r", 2)["state"] == "ready", timeout=30)
            now = pids()
            assert now[0] == first[0] and now[1] == first[1]  # kept: not restarted
            # the connected clients use the new replica within their rescan period
            wait_for(lambda: sum(c.metrics("r", replica=2).finished.values()) > 0,
                     timeout=20)
            _write(cfg, short_dir, {"r": {**fast, "replicas": 1}})
            assert c.reload().changed == ["r"]
            wait_for(lambda: set(pids()) == {0}, timeout=30)
            assert pids()[0] == first[0]
            time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(30)
        assert failed == []
    finally:
        sup.stop()


def test_a_session_sticks_to_its_replica_and_moves_with_its_kv_when_that_one_dies(
        fleet) -> None:
    """Sessions spread over two replicas and each stays on its own; when its replica
    is killed the next turn goes to the other one, which restores the session from
    the disk tier both share; once the replica is back the session returns to it and
    finds the turn the other one saved."""
    from llamafleet.client.pool import rendezvous
    sup = fleet({"r": {"backend": "fake", "replicas": 2, "cache_min_tokens": 8}})
    # names whose rendezvous choice covers both replicas (the hash is deterministic)
    names = [f"chat-{i}" for i in range(40)]
    home = {n: rendezvous(n, [0, 1]) for n in names}
    sessions = [next(n for n in names if home[n] == r) for r in (0, 1)]
    sessions += [n for n in names if n not in sessions][:2]

    with Client(sup.address, timeout=30) as c:
        def served(r: int) -> int:
            return sum(c.metrics("r", replica=r).finished.values())

        def turn(session: str, history: str) -> tuple[Any, int]:
            """One turn; the replica that served it (by its finished count)."""
            before = [served(0), served(1)]
            out = c.generate("r", history, max_tokens=8, temperature=0, session=session)
            after = [served(0), served(1)]
            moved = [after[r] - before[r] for r in (0, 1)]
            assert sorted(moved) == [0, 1], moved
            return out, moved.index(1)

        history = {s: f"user: tell me about {s} in some detail please\nassistant:"
                   for s in sessions}
        for s in sessions:  # two turns each: the second on the first one's replica
            first, r1 = turn(s, history[s])
            history[s] += first.text + "\nuser: more?\nassistant:"
            second, r2 = turn(s, history[s])
            assert r1 == r2 == home[s], (s, r1, r2)
            assert second.stats.cached_tokens > 0 and second.session_saved
            history[s] += second.text + "\nuser: and then?\nassistant:"
        assert {home[s] for s in sessions} == {0, 1}

        s = sessions[0]  # lives on replica 0
        persisted = len(c.tokenize("r", history[s])) - len(c.tokenize(
            "r", "\nuser: and then?\nassistant:", add_special=False))
        old, before = _state(c, "r", 0)["pid"], served(1)
        kill(old)
        moved = c.generate("r", history[s], max_tokens=8, temperature=0, session=s)
        assert served(1) == before + 1  # its replica is gone: the other one took it
        assert moved.stats.cached_tokens >= persisted - 1  # restored, not re-prefilled
        assert moved.cache == "disk"  # replica 1 never had it in RAM
        wait_for(lambda: _state(c, "r", 0)["state"] == "ready"
                 and _state(c, "r", 0)["pid"] not in (None, old), timeout=30)
        history[s] += moved.text + "\nuser: thanks\nassistant:"
        time.sleep(0.6)  # the client's pool learns the restarted replica
        saved_by_1 = len(c.tokenize("r", history[s])) - len(c.tokenize(
            "r", "\nuser: thanks\nassistant:", add_special=False))
        back, where = turn(s, history[s])
        assert where == 0  # home again, and it has the turn replica 1 saved
        assert back.stats.cached_tokens >= saved_by_1 - 1 > moved.stats.cached_tokens


@pytest.mark.parametrize("replicas", [2, 1])
def test_repeated_kills_with_resume_fail_nothing(fleet, replicas: int) -> None:
    """Streams and plain requests for ~6 s while a worker is SIGKILLed every 1.5 s."""
    sup = fleet({"m": {**SLOW, "token_delay": 0.005, "replicas": replicas}})
    with Client(sup.address, timeout=60) as c:
        solo = c.generate("m", "the same prompt", max_tokens=40, ignore_eos=True, **GREEDY)
    stop = threading.Event()
    served = [0]
    resumed = [0]
    failed: list[BaseException] = []

    def run(i: int) -> None:
        with Client(sup.address, timeout=60) as c:
            while not stop.is_set():
                try:
                    if i % 2:
                        r = c.stream("m", "the same prompt", max_tokens=40, ignore_eos=True,
                                     **GREEDY).collect()
                    else:
                        r = c.generate("m", "the same prompt", max_tokens=40,
                                       ignore_eos=True, **GREEDY)
                    assert r.tokens == solo.tokens
                    served[0] += 1
                    resumed[0] += r.stats.resumed
                except BaseException as exc:  # noqa: BLE001 - asserted below
                    failed.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    rng = random.Random(replicas)
    kills = 0
    for _ in range(4):
        time.sleep(1.5)
        # a restart on a loaded machine may take longer than the pause: wait for it
        live = wait_for(lambda: [w for w in sup.status()
                                 if w["pid"] and w["state"] == "ready"], timeout=20)
        kill(rng.choice(live)["pid"])
        kills += 1
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(60)
    assert failed == []
    assert kills == 4 and served[0] > 0 and resumed[0] >= 1
    record(f"repeated_kills_replicas_{replicas}", kills=kills, served=served[0],
           failed=len(failed), resumed=resumed[0])


def test_requests_waiting_for_room_queue_in_order_then_overloaded(fleet) -> None:
    from llamafleet.client import Overloaded
    od = {"backend": "fake", "load": "on_demand", "token_delay": 0.01}
    sup = fleet({"a": od, "b": od, "c": od}, max_loaded_models=1, max_load_queue=1)
    with Client(sup.address, timeout=60) as c:
        busy = c.stream("a", "x", max_tokens=400, ignore_eos=True)  # ~4 s: a stays busy
        next(busy)
        got: list[Any] = []
        waiter = threading.Thread(target=lambda: got.append(
            c.generate("b", "y", max_tokens=2, ignore_eos=True)))
        waiter.start()
        wait_for(lambda: "waiting for room" in str(sup._describe("b")), timeout=10)
        with pytest.raises(Overloaded, match="max_load_queue"):
            c.generate("c", "z", max_tokens=2)
        assert busy.collect().finish_reason == "length"  # a was never evicted mid-request
        waiter.join(30)
        assert len(got) == 1 and len(got[0].tokens) == 2  # b loaded once a was idle
        assert _alive(sup) == 1


def test_a_request_for_a_model_being_unloaded_loads_it_again_after_the_drain(fleet) -> None:
    """The unload drains the request in flight; a request that arrives meanwhile waits
    for the old worker to exit, then loads a new one (it never waits out its timeout)."""
    sup = fleet({"a": {"backend": "fake", "load": "on_demand", "token_delay": 0.01}})
    with Client(sup.address, timeout=60) as c, Client(sup.address, timeout=60) as late:
        running = c.stream("a", "x", max_tokens=300, ignore_eos=True)  # ~3 s
        next(running)
        first = _state(c, "a")["generation"]
        c.unload("a")
        wait_for(lambda: _state(c, "a")["state"] == "stopping", timeout=10)
        t0 = time.monotonic()
        r = late.generate("a", "y", max_tokens=2, ignore_eos=True)
        took = time.monotonic() - t0
        assert len(r.tokens) == 2
        assert running.collect().finish_reason == "length"  # the drain finished it
        assert _state(c, "a")["generation"] > first and _state(c, "a")["state"] == "ready"
        assert took < 20, took  # not the 30 s lookup timeout


def test_memory_budget_evicts_the_least_recently_used_until_the_load_fits(fleet) -> None:
    od = {"backend": "fake", "load": "on_demand"}
    sup = fleet({"a": {**od, "memory_mb": 400}, "b": {**od, "memory_mb": 400},
                 "c": {**od, "memory_mb": 700}, "d": {**od, "memory_mb": 100}},
                memory_budget_mb=1000)
    with Client(sup.address, timeout=60) as c:
        def use(model: str) -> set[str]:
            """One request; then the models loaded (use is ordered by heartbeats, which
            follow a request within 50 ms: leave them apart)."""
            c.generate(model, "x", max_tokens=1)
            time.sleep(0.2)
            return {w["model"] for w in c.status() if w["pid"] is not None}
        use("a")
        use("b")
        assert use("d") == {"a", "b", "d"}  # 900 MiB: all three fit
        use("a")  # least recently used now: b, then d, then a
        # c needs 700: evicting b leaves 500 + 700, d 400 + 700, so a must go too
        assert use("c") == {"c"}
        assert use("d") == {"c", "d"}  # 800: nothing evicted
        assert use("b") == {"b", "d"}  # 1200 would not fit: c is older than d
        assert all(w["rss_mb"] for w in c.status() if w["pid"])


def test_a_failed_on_demand_model_is_tried_again_after_failed_retry_s(
        fleet, tmp_path: Path) -> None:
    weights = tmp_path / "weights.bin"  # the fake backend's load fails while absent
    sup = fleet({"m": {"backend": "fake", "load": "on_demand", "path": str(weights)}},
                failed_retry_s=1.5, max_restarts=1)
    with Client(sup.address, timeout=30) as c:
        with pytest.raises(WorkerFailed):
            c.generate("m", "x", max_tokens=1)
        weights.write_bytes(b"now it is here")
        t0 = time.monotonic()
        with pytest.raises(WorkerFailed):  # within failed_retry_s: at once, no load
            c.generate("m", "x", max_tokens=1)
        assert time.monotonic() - t0 < 1.0
        assert _state(c, "m")["state"] == "failed"
        time.sleep(1.6)
        assert len(c.generate("m", "x", max_tokens=2, ignore_eos=True).tokens) == 2
        assert _state(c, "m")["state"] == "ready"
