"""Fuzzing the HTTP gateway's request bodies (hypothesis) against one live fleet.

Every body must get a clear answer: 200, or a 4xx / 501 with an OpenAI error object;
never a 500, a hang or a dead process. At the end the worker and the gateway are the
same processes that started (no restarts) and still serve.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamafleet import Config, Supervisor
from llamafleet.client import Client
from tests.conftest import FAST

ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/tokenize",
             "/detokenize"]
OK_STATUSES = {200, 400, 404, 413, 501}
FIGURES: Counter[str] = Counter()

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=False), st.text(max_size=30),
                    st.just("\ud800"), st.just(1e308))
junk = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "robot", 3]),
     "content": st.one_of(st.text(max_size=40), junk,
                          st.lists(st.fixed_dictionaries({"type": st.sampled_from(
                              ["text", "image_url"]), "text": st.text(max_size=10)}),
                              max_size=2))})
schema = st.one_of(st.just({"type": "object"}), st.just({"type": 12}),
                   st.just({"type": "string", "maxLength": 2**31}),
                   st.just({"$ref": "#/nowhere"}), junk)
fields: dict[str, Any] = {
    "model": st.one_of(st.just("tiny"), st.just("tiny"), st.text(max_size=10), junk),
    "messages": st.one_of(st.lists(message, min_size=1, max_size=3), junk),
    "prompt": st.one_of(st.text(max_size=40), st.lists(st.integers(-5, 300), max_size=6),
                        st.lists(st.text(max_size=5), max_size=3), junk),
    "input": st.one_of(st.text(max_size=20), st.lists(st.text(max_size=10), max_size=3), junk),
    "content": st.one_of(st.text(max_size=40), junk),
    "tokens": st.one_of(st.lists(st.integers(-2**40, 2**40), max_size=8), junk),
    "max_tokens": st.one_of(st.integers(-3, 12), st.just(10**9), junk),
    "temperature": st.one_of(st.floats(-1, 3), junk),
    "top_p": st.one_of(st.floats(-1, 2), junk),
    "n": st.one_of(st.integers(0, 3), junk),
    "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=300), max_size=20),
                      junk),
    "seed": st.one_of(st.integers(-2**64, 2**64), junk),
    "logit_bias": st.one_of(st.dictionaries(st.text(max_size=6), st.floats(-200, 200),
                                            max_size=3), junk),
    "stream": st.one_of(st.booleans(), junk),
    "response_format": st.one_of(
        st.fixed_dictionaries({"type": st.sampled_from(["json_object", "json_schema",
                                                        "text", "sound"]),
                               "json_schema": st.fixed_dictionaries({"schema": schema})}),
        junk),
    "tools": st.one_of(st.lists(st.fixed_dictionaries({"type": st.just("function"),
                                                       "function": st.fixed_dictionaries({
                                                           "name": st.text(max_size=8),
                                                           "parameters": schema})}),
                                max_size=2), junk),
    "tool_choice": st.one_of(st.sampled_from(["auto", "none", "required"]), junk),
    "logprobs": st.one_of(st.booleans(), st.integers(-1, 30), junk),
    "top_logprobs": st.one_of(st.integers(-1, 30), junk),
    "grammar": st.one_of(st.just("root ::= \"a\""), st.text(max_size=20), junk),
    "session": st.one_of(st.text(max_size=10), junk),
    "encoding_format": st.one_of(st.sampled_from(["float", "base64", "hex"]), junk),
    st.text(max_size=6): junk,  # unknown keys
}


#: a valid body per endpoint, which "mutated" cases change one or two fields of
VALID: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
    "/v1/completions": {"model": "tiny", "prompt": "hi"},
    "/v1/embeddings": {"model": "tiny", "input": "hi"},
    "/tokenize": {"content": "hi"},
    "/detokenize": {"tokens": [104, 105]},
}


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    path = draw(st.sampled_from(ENDPOINTS))
    kind = draw(st.sampled_from(["object", "mutated", "mutated", "raw"]))
    if kind == "raw":
        return path, draw(st.one_of(st.binary(max_size=60), st.just(b'{"model": "tiny"'),
                                    st.just(b"[1, 2]"), st.just(b"\xff\xfe{}"),
                                    st.just(b"null")))
    keys = draw(st.lists(st.sampled_from(list(fields)), max_size=6 if kind == "object" else 2,
                         unique_by=str))
    body: dict[str, Any] = dict(VALID[path]) if kind == "mutated" else {}
    for k in keys:
        name = k if isinstance(k, str) else draw(k)
        body[name] = draw(fields[k])
    if draw(st.booleans()):
        body["model"] = "tiny"
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 12:
        body["max_tokens"] = 12  # keep valid generations short
    if path in ("/v1/chat/completions", "/v1/completions"):
        body.setdefault("max_tokens", 8)
    return path, json.dumps(body).encode()


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[Supervisor, httpx.Client]]:
    rd = tempfile.mkdtemp(prefix="lf-fz-", dir="/tmp")
    cfg = Config.from_dict({"supervisor": {"runtime_dir": rd, **FAST},
                            "http": {"listen": "127.0.0.1:0"},
                            "models": {"tiny": {"backend": "fake", "n_ctx": 512}}})
    with Supervisor(cfg) as sup, httpx.Client(base_url=str(sup.http_url), timeout=30) as http:
        sup.wait_ready(30)
        yield sup, http


def check(resp: httpx.Response) -> None:
    FIGURES[str(resp.status_code)] += 1
    assert resp.status_code in OK_STATUSES, (resp.status_code, resp.text[:300])
    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        for block in resp.text.split("\n\n")[:-1]:
            assert block.startswith("data: "), block
            payload = block[6:]
            if payload != "[DONE]":
                obj = json.loads(payload)
                assert "error" not in obj or obj["error"]["code"] in (
                    "bad_request", "not_supported"), obj
        return
    obj = resp.json()
    if resp.status_code != 200:
        assert {"message", "type", "code"} <= set(obj["error"]), obj


def test_fuzzed_bodies_get_clear_answers_and_kill_nothing(
        live: tuple[Supervisor, httpx.Client]) -> None:
    sup, http = live
    workers = [(w["pid"], w["restarts"]) for w in sup.status()]
    services = [(s["pid"], s["restarts"]) for s in sup.service_status()]
    started = time.monotonic()

    @settings(max_examples=2000, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(bodies())
    def one(case: tuple[str, bytes]) -> None:
        path, body = case
        FIGURES["cases"] += 1
        check(http.post(path, content=body, headers={"content-type": "application/json"}))

    one()
    assert [(w["pid"], w["restarts"]) for w in sup.status()] == workers
    assert [(s["pid"], s["restarts"]) for s in sup.service_status()] == services
    ok = http.post("/v1/completions", json={"model": "tiny", "prompt": "still", "max_tokens": 3,
                                                "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    print(f"\nhttp fuzz: {FIGURES['cases']} cases in {time.monotonic() - started:.1f}s, "
          f"statuses {dict((k, v) for k, v in FIGURES.items() if k != 'cases')}, "
          "worker and gateway restarts: 0")
    assert FIGURES["cases"] >= 2000 and FIGURES["200"] > 0 and FIGURES["400"] > 0


@pytest.fixture(scope="module")
def tight() -> Iterator[Supervisor]:
    rd = tempfile.mkdtemp(prefix="lf-fz-", dir="/tmp")
    cfg = Config.from_dict({"supervisor": {"runtime_dir": rd, **FAST},
                            "http": {"listen": "127.0.0.1:0", "max_body_bytes": 4096,
                                     "body_timeout": 1.0, "max_concurrent_requests": 2},
                            "models": {"slow": {"backend": "fake", "token_delay": 0.02,
                                                "n_ctx": 65536}}})
    with Supervisor(cfg) as sup:
        sup.wait_ready(30)
        yield sup


def test_oversized_body_is_413(tight: Supervisor) -> None:
    url = str(tight.http_url)
    r = httpx.post(url + "/v1/completions", json={"model": "slow", "prompt": "x" * 5000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    # without Content-Length (chunked): counted while read
    r = httpx.post(url + "/v1/completions", content=iter([b"{" + b" " * 5000 + b"}"]))
    assert r.status_code == 413


def test_a_body_sent_byte_by_byte_is_408(tight: Supervisor) -> None:
    import socket
    host, port = str(tight.http_url).removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\nContent-Length: 100\r\n\r\n")
        t0 = time.monotonic()
        for b in b'{"model": "slow", ':
            s.sendall(bytes([b]))
            time.sleep(0.3)
            if time.monotonic() - t0 > 3:
                break
        head = s.recv(4096)
    assert b" 408 " in head.split(b"\r\n")[0], head[:200]
    ok = httpx.post(str(tight.http_url) + "/v1/completions",
                    json={"model": "slow", "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200


def test_past_max_concurrent_requests_is_429(tight: Supervisor) -> None:
    url = str(tight.http_url)
    body = {"model": "slow", "prompt": "go", "max_tokens": 2000, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=30) as a, httpx.Client(timeout=30) as b:
        with a.stream("POST", url + "/v1/completions", json=body) as r1, \
                b.stream("POST", url + "/v1/completions", json=body) as r2:
            assert r1.status_code == r2.status_code == 200
            third = httpx.post(url + "/v1/completions", json={**body, "stream": False})
            assert third.status_code == 429 and third.headers["retry-after"] == "1"
            assert third.json()["error"]["type"] == "rate_limit_error"
    # once those ended, requests are served again
    assert httpx.post(url + "/v1/completions", json={"model": "slow", "prompt": "x",
                                                     "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("key", ["\u00b2", "1" * 5000, "-1", "1.5", " 1", ""])
def test_logit_bias_keys_that_are_not_token_ids_are_a_400(
        live: tuple[Supervisor, httpx.Client], key: str) -> None:
    # found by fuzzing: "²" passes str.isdigit() but not int(); 5000 digits exceed int()'s
    # conversion limit; both were 500s
    _, http = live
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2,
                                           "logit_bias": {key: 1}})
    assert r.status_code == 400, r.text[:200]
    assert r.json()["error"]["param"] == "logit_bias"


def test_tokenize_with_pieces_of_a_long_text_is_answered(
        live: tuple[Supervisor, httpx.Client]) -> None:
    # found by fuzzing: one detokenize per token, all at once, overflowed the worker's
    # reply queue and the request hung
    _, http = live
    r = http.post("/tokenize", json={"content": "a" * 4000, "with_pieces": True})
    assert r.status_code == 200
    pieces = r.json()["tokens"]
    assert len(pieces) >= 4000 and "".join(p["piece"] for p in pieces) == "a" * 4000


def test_too_many_prompts_is_a_400_and_leaves_nothing_running(
        live: tuple[Supervisor, httpx.Client]) -> None:
    # found by fuzzing: 100 prompts were queued at once, past the worker's queue: a 429
    # no retry could cure, and the queued ones kept generating
    sup, http = live
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": ["a"] * 100,
                                           "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    with Client(sup.address) as c:
        assert c.metrics("tiny").requests_running == 0
    ok = http.post("/v1/completions", json={"model": "tiny", "prompt": ["a"] * 16,
                                            "max_tokens": 1})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 16
