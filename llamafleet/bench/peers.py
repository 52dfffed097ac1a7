"""llama.cpp's own tools as peers: ``llama-bench``, ``llama-batched-bench`` and
``llama-server``.

Binaries are looked up in ``$LLAMAFLEET_LLAMA_BENCH`` / ``$LLAMAFLEET_LLAMA_BATCHED_BENCH``
/ ``$LLAMAFLEET_LLAMA_SERVER``,
then the cache llamafleet/bench/build_peers.sh builds into (``$LLAMAFLEET_PEERS_DIR``,
default ``~/.cache/llamafleet/peers/bin``), then ``PATH``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: interleaved rounds (ours, peer, ours, peer, ...) of every ours-vs-peer comparison
ROUNDS = 3


def ratios(ours: Sequence[float | None], peer: Sequence[float | None]
           ) -> tuple[float | None, list[float] | None]:
    """The median of the per-round ratios ours / peer, and their [min, max]."""
    rs = [o / t for o, t in zip(ours, peer) if o and t]
    return (statistics.median(rs), [min(rs), max(rs)]) if rs else (None, None)


class LineProcess:
    """A peer script in a subprocess, driven by one JSON line each way: its first line
    (``hello``) says it is ready, or why not (``{"error": ...}``)."""

    name = "peer"

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.hello: dict[str, Any] = (json.loads(line) if line else
                                      {"error": f"{self.name} exited ({self.proc.wait()})"})

    def request(self, req: dict[str, Any]) -> dict[str, Any]:
        """Send ``req``, return the answer; an ``{"error": ...}`` answer raises."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} exited ({self.proc.wait()})")
        out: dict[str, Any] = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"{self.name}: {out['error']}")
        return out

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                assert self.proc.stdin is not None
                self.proc.stdin.write('{"quit": true}\n')
                self.proc.stdin.close()
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait()


def peers_dir() -> Path:
    env = os.environ.get("LLAMAFLEET_PEERS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "llamafleet" / "peers"


def find_binary(name: str, env_var: str) -> str | None:
    """The path of a llama.cpp tool, or None."""
    env = os.environ.get(env_var)
    if env:
        return env if os.access(env, os.X_OK) else None
    cached = peers_dir() / "bin" / name
    if os.access(cached, os.X_OK):
        return str(cached)
    return shutil.which(name)


def find_llama_bench() -> str | None:
    return find_binary("llama-bench", "LLAMAFLEET_LLAMA_BENCH")


def find_llama_batched_bench() -> str | None:
    return find_binary("llama-batched-bench", "LLAMAFLEET_LLAMA_BATCHED_BENCH")


def find_llama_server() -> str | None:
    return find_binary("llama-server", "LLAMAFLEET_LLAMA_SERVER")


def run_llama_batched_bench(binary: str, model: str, threads: int, n_ctx: int,
                            prompt: int, n_gen: int, parallel: tuple[int, ...] = (1, 2, 4, 8),
                            timeout: float = 900) -> dict[str, Any]:
    """``llama-batched-bench``: llama.cpp decoding ``B`` sequences in one batch, no
    server, no IPC. Its text-generation speed at B=8 over B=1 is what batching
    itself can give on this machine and library."""
    cmd = [binary, "-m", model, "-t", str(threads), "-tb", str(threads),
           "-c", str(max(n_ctx, max(parallel) * (prompt + n_gen) + 64)),
           "-npp", str(prompt), "-ntg", str(n_gen),
           "-npl", ",".join(str(p) for p in parallel), "--output-format", "jsonl"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-batched-bench failed ({proc.returncode}): "
                           f"{proc.stderr[-500:]}")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    by_pl = {int(r["pl"]): r for r in rows if "pl" in r}
    if not by_pl:
        raise RuntimeError("llama-batched-bench printed no results")
    tg = {pl: float(r["speed_tg"]) for pl, r in sorted(by_pl.items())}
    return {"tg_tokens_per_s": {str(pl): v for pl, v in tg.items()},
            "pp_tokens_per_s": {str(pl): float(r["speed_pp"]) for pl, r in sorted(by_pl.items())},
            "scaling_8": tg[8] / tg[1] if 8 in tg and 1 in tg else None,
            "command": " ".join(cmd)}


def run_llama_bench(binary: str, model: str, threads: int, n_gen: int = 128,
                    reps: int = 3, timeout: float = 600) -> dict[str, Any]:
    """``llama-bench -p 0 -n N`` (tgN): mean tokens/s and its spread."""
    cmd = [binary, "-m", model, "-t", str(threads), "-p", "0", "-n", str(n_gen),
           "-r", str(reps), "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({proc.returncode}): {proc.stderr[-500:]}")
    rows = json.loads(proc.stdout)
    row = next(r for r in rows if int(r.get("n_gen", 0)) == n_gen)
    return {"tokens_per_s": float(row["avg_ts"]), "stddev": float(row.get("stddev_ts", 0.0)),
            "test": f"tg{n_gen}", "reps": reps, "build": row.get("build_commit"),
            "samples": row.get("samples_ts"), "command": " ".join(cmd)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """``llama-server -np N`` on a free loopback port (continuous batching on)."""

    def __init__(self, binary: str, model: str, threads: int, n_parallel: int,
                 n_ctx_per_seq: int) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [binary, "-m", model, "-t", str(threads), "-tb", str(threads),
                    "-np", str(n_parallel), "-c", str(n_ctx_per_seq * n_parallel),
                    "-b", "512", "-ub", "512", "-cb", "--host", "127.0.0.1",
                    "--port", str(self.port), "--no-webui"]
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LlamaServer:
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        err_tail: list[bytes] = []
        assert self.proc.stderr is not None
        stderr = self.proc.stderr

        def pump() -> None:
            for line in iter(stderr.readline, b""):
                err_tail.append(line)
                del err_tail[:-30]

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("llama-server exited: "
                                   + b"".join(err_tail).decode(errors="replace")[-800:])
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError("llama-server not healthy after 120 s")

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stream(self, prompt: str, n_predict: int) -> dict[str, Any]:
        """One streamed greedy completion: tokens, ttft, wall time."""
        body = json.dumps({"prompt": prompt, "n_predict": n_predict, "temperature": 0.0,
                           "top_k": 1, "ignore_eos": True, "stream": True,
                           "cache_prompt": False}).encode()
        req = urllib.request.Request(self.url + "/completion", data=body,
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        t_first = None
        n = 0
        predicted = None
        with urllib.request.urlopen(req, timeout=600) as r:
            for raw in r:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                ev = json.loads(payload)
                if ev.get("content") or ev.get("tokens"):
                    n += 1
                    if t_first is None:
                        t_first = time.perf_counter()
                if ev.get("stop"):
                    predicted = ev.get("tokens_predicted") or \
                        (ev.get("timings") or {}).get("predicted_n")
                    break
        t_end = time.perf_counter()
        return {"tokens": int(predicted if predicted is not None else n),
                "ttft_s": (t_first or t_end) - t0, "t0": t0, "t_end": t_end}


def concurrent_run(fn: Callable[[int, int], dict[str, Any]], clients: int,
                   requests_per_client: int) -> dict[str, Any]:
    """Run ``fn(client, round)`` from ``clients`` threads; aggregate tokens/s and TTFT."""
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def worker(i: int) -> None:
        try:
            barrier.wait()
            for r in range(requests_per_client):
                out = fn(i, r)
                with lock:
                    results.append(out)
        except BaseException as exc:  # reported below
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    tokens = sum(r["tokens"] for r in results)
    ttfts = sorted(r["ttft_s"] * 1e3 for r in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens,
            "wall_s": round(wall, 3), "tokens_per_s": tokens / wall,
            "ttft_ms_p50": statistics.median(ttfts),
            "ttft_ms_max": ttfts[-1], "resent": sum(r.get("resent", 0) for r in results)}
