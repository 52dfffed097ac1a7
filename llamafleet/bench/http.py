"""The gateway's figures for ``llamafleet bench``: single-stream tokens/s through HTTP as a
ratio to the Python client (interleaved rounds, same prompt), 8 concurrent HTTP streaming
clients (beside ``llama-server -np 8`` when it is built), and small-request latency."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx

from llamafleet.bench import peers
from llamafleet.client import Client

TOPICS = ("a lighthouse", "a robot", "the sea", "a city", "a forest", "the moon", "a train",
          "a garden")


def sse_stream(http: httpx.Client, url: str, model: str, prompt: str,
               max_tokens: int) -> dict[str, Any]:
    """One greedy streamed completion over HTTP, timed like the Python client's."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    for attempt in range(2):
        t0 = time.perf_counter()
        t_first = t_last = None
        chunks_first = chunks = 0
        tokens = 0
        try:
            with http.stream("POST", url + "/v1/completions", json=body) as resp:
                resp.raise_for_status()
                for line in resp.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    obj = json.loads(line[6:])
                    if "error" in obj:
                        raise RuntimeError(obj["error"]["message"])
                    if obj.get("usage"):
                        tokens = obj["usage"]["completion_tokens"]
                        continue
                    if obj["choices"] and obj["choices"][0]["text"]:
                        now = time.perf_counter()
                        chunks += 1
                        if t_first is None:
                            t_first, chunks_first = now, chunks
                        t_last = now
            break
        except httpx.RemoteProtocolError:
            # llama-server now and then closes a connection before answering on it
            # (about one round in eight here, nothing in its log): sent again once,
            # and counted; one that closes mid-answer is an error
            if attempt or t_first is not None:
                raise
    t_end = time.perf_counter()
    return {"tokens": tokens, "ttft_s": (t_first or t_end) - t0, "wall_s": t_end - t0,
            "t_first": t_first, "t_last": t_last, "chunks_after_first": chunks - chunks_first,
            "resent": attempt}


def _client_tps(n: int, t_first: float | None, t_last: float | None) -> float | None:
    # tokens after the first over the time after the first: the decode rate the caller sees
    return (n - 1) / (t_last - t_first) if t_first and t_last and t_last > t_first else None


def python_stream(c: Client, model: str, prompt: str, max_tokens: int) -> float | None:
    t_first = t_last = None
    s = c.stream(model, prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for _ in s:
        now = time.perf_counter()
        t_first = t_first or now
        t_last = now
    assert s.result is not None
    return _client_tps(len(s.result.tokens), t_first, t_last)


def phase_http(sup: Any, model: str, prompt: str, q: dict[str, Any],
               progress: Callable[[str], None], model_path: str, threads: int,
               n_ctx: int) -> dict[str, Any]:
    url = sup.http_url
    assert url is not None
    n, rounds = q["tokens"], max(3, q["rounds"])
    out: dict[str, Any] = {"url": url, "tokens": n, "rounds": rounds}
    with Client(sup.address) as c, httpx.Client(timeout=600) as http:
        python_stream(c, model, prompt, 16)
        sse_stream(http, url, model, prompt, 16)
        ours, via_http = [], []
        for r in range(rounds):  # interleaved: the machine's drift hits both alike
            progress(f"http: round {r + 1}/{rounds}: Python client, then HTTP ({n} tokens)")
            ours.append(python_stream(c, model, prompt, n))
            h = sse_stream(http, url, model, prompt, n)
            via_http.append(_client_tps(h["tokens"], h["t_first"], h["t_last"]))
        ratios = [h / o for h, o in zip(via_http, ours) if h and o]
        out["single_stream"] = {
            "python_tokens_per_s": ours, "http_tokens_per_s": via_http,
            "ratio": statistics.median(ratios) if ratios else None,
            "ratio_spread": [min(ratios), max(ratios)] if ratios else None}

        out["c8"], out["llama_server_c8"] = _c8(http, url, model, q, progress, model_path,
                                                threads, n_ctx)
        lat = []
        progress(f"http: {q['pings']} small requests (POST /tokenize)")
        for i in range(q["pings"] + 50):
            t = time.perf_counter()
            http.post(url + "/tokenize", json={"model": model, "content": "hi"}).raise_for_status()
            if i >= 50:
                lat.append((time.perf_counter() - t) * 1e6)
        lat.sort()
        out["small_request_us"] = {"p50": lat[len(lat) // 2],
                                   "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
                                   "request": "POST /tokenize {content: 'hi'}, keep-alive"}
    ls = out["llama_server_c8"]
    out["c8_vs_llama_server"] = None
    if ls:  # the median of the per-round ratios (rounds run back to back)
        ratios = [o / t for o, t in zip(out["c8"]["rounds"], ls["rounds"]) if t]
        out["c8_vs_llama_server"] = statistics.median(ratios) if ratios else None
        out["c8_vs_llama_server_spread"] = [min(ratios), max(ratios)] if ratios else None
    return out


#: rounds of (ours, llama-server) for the 8-client comparison, interleaved
C8_ROUNDS = 5  # the widest spread seen in 3 rounds was 0.82-1.13


def _c8(http: httpx.Client, url: str, model: str, q: dict[str, Any],
        progress: Callable[[str], None], model_path: str, threads: int,
        n_ctx: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """8 threads streaming ``/v1/completions`` through the same HTTP client code, against
    our gateway and (when built) ``llama-server -np 8``, rounds interleaved; each side's
    figure is its median round."""

    def run(base: str, name: str) -> dict[str, Any]:
        # fresh connections each round, on both sides: nothing pooled is carried
        # from one round (or one side) into the next
        with httpx.Client(timeout=600) as fresh:
            def one(i: int, r: int) -> dict[str, Any]:
                topic = TOPICS[(i + r * 8) % len(TOPICS)]
                return sse_stream(fresh, base, name, f"Request {r} from client {i}. "
                                  f"Write a short story about {topic}.", q["conc_tokens"])
            return peers.concurrent_run(one, 8, q["requests_per_client"])

    binary = peers.find_llama_server()
    if binary is None or q["quick"]:
        progress("http: 8 streaming clients (llama-server not built or --quick: ours only)")
        return run(url, model), None
    with peers.LlamaServer(binary, model_path, threads, 8, n_ctx) as srv:
        sse_stream(http, srv.url, model, "warm up", 16)
        ours, theirs = [], []
        for r in range(C8_ROUNDS):
            progress(f"http: 8 clients, round {r + 1}/{C8_ROUNDS}: gateway, then llama-server")
            ours.append(run(url, model))
            theirs.append(run(srv.url, model))

    def median(rows: list[dict[str, Any]]) -> dict[str, Any]:
        row = sorted(rows, key=lambda x: x["tokens_per_s"])[len(rows) // 2]
        return {**row, "rounds": [x["tokens_per_s"] for x in rows],
                "command": " ".join(srv.cmd) if rows is theirs else None}

    return median(ours), median(theirs)
