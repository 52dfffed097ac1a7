"""The OpenAI-compatible HTTP gateway, driven by the real ``openai`` package and raw HTTP.

A real fleet (fake backend) with an ``[http]`` table: the supervisor binds the port and
runs the gateway as its own supervised process.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llamafleet import Config, Supervisor
from llamafleet.client import Client
from llamafleet.runtime.errors import ConfigError
from tests.conftest import FAST, kill, wait_for, worker_pid

MODELS: dict[str, dict[str, Any]] = {
    "tiny": {"backend": "fake", "n_seq_max": 4},
    "slow": {"backend": "fake", "token_delay": 0.02, "n_seq_max": 2, "n_ctx": 65536},
    "small": {"backend": "fake", "n_ctx": 64},
}
GREEDY = {"temperature": 0, "seed": 1}
CHAT = [{"role": "user", "content": "Say something."}]


def start(models: dict[str, dict[str, Any]], http: dict[str, Any] | None = None,
          **supervisor: Any) -> Supervisor:
    rd = tempfile.mkdtemp(prefix="lf-gw-", dir="/tmp")
    raw: dict[str, Any] = {"supervisor": {"runtime_dir": rd, **FAST, **supervisor},
                           "models": models}
    if http is not None:
        raw["http"] = {"listen": "127.0.0.1:0", **http}
    sup = Supervisor(Config.from_dict(raw)).start()
    sup.wait_ready(30)
    return sup


@pytest.fixture(scope="module")
def gw() -> Iterator[Supervisor]:
    sup = start(MODELS, {})
    yield sup
    sup.stop()


@pytest.fixture(scope="module")
def url(gw: Supervisor) -> str:
    assert gw.http_url is not None
    return gw.http_url


@pytest.fixture
def oai(url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics as ``name{labels}`` -> value, parsed by prometheus_client."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def sse_events(resp: httpx.Response) -> list[str]:
    """The ``data:`` payloads of an SSE response, checking the framing as it goes."""
    body = resp.read().decode()
    assert body.endswith("\n\n"), body[-50:]
    events = []
    for block in body.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        assert "\n" not in block, block  # one data line per event
        events.append(block[len("data: "):])
    return events


# -- the happy paths ---------------------------------------------------------------------
def test_models_and_health(url: str, gw: Supervisor) -> None:
    r = httpx.get(url + "/v1/models")
    assert r.status_code == 200
    data = r.json()["data"]
    assert [m["id"] for m in data] == list(MODELS)
    assert all(m["object"] == "model" and m["state"] == "ready" for m in data)
    h = httpx.get(url + "/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    services = gw.service_status()
    assert services[0]["name"] == "http" and services[0]["state"] == "ready"
    assert services[0]["url"] == url


def test_chat_sync_stream_equals_non_stream(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, **GREEDY)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert r.id.startswith("chatcmpl-") and r.model == "tiny"
    parts, usage, finish = [], None, []
    for chunk in oai.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12,
                                             stream=True, stream_options={"include_usage": True},
                                             **GREEDY):
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        parts.append(chunk.choices[0].delta.content or "")
        finish.append(chunk.choices[0].finish_reason)
    assert "".join(parts) == choice.message.content
    assert finish[-1] == "length" and all(f is None for f in finish[:-1])
    assert usage is not None and usage.completion_tokens == 12
    assert usage.prompt_tokens == r.usage.prompt_tokens


def test_async_client_chat_and_completions(url: str) -> None:
    async def run() -> tuple[str, str, list[str]]:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as c:
            chat = await c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6,
                                                   **GREEDY)
            stream = await c.completions.create(model="tiny", prompt="Once", max_tokens=6,
                                                stream=True, **GREEDY)
            streamed = [ch.choices[0].text async for ch in stream]
            plain = await c.completions.create(model="tiny", prompt="Once", max_tokens=6,
                                               **GREEDY)
            return chat.choices[0].message.content or "", plain.choices[0].text, streamed
    chat, plain, streamed = asyncio.run(run())
    assert len(chat) > 0
    assert "".join(streamed) == plain and len(plain) > 0


def test_completions_many_prompts_and_tokens(oai: openai.OpenAI) -> None:
    r = oai.completions.create(model="tiny", prompt=["a", "bb", "ccc"], max_tokens=5, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1, 2]
    solo = oai.completions.create(model="tiny", prompt="bb", max_tokens=5, **GREEDY)
    assert r.choices[1].text == solo.choices[0].text
    assert r.usage is not None and r.usage.completion_tokens == 15
    toks = httpx.post(str(oai.base_url).replace("/v1/", "") + "/tokenize",
                      json={"model": "tiny", "content": "bb", "add_special": True}).json()["tokens"]
    by_ids = oai.completions.create(model="tiny", prompt=toks, max_tokens=5, **GREEDY)
    assert by_ids.choices[0].text == solo.choices[0].text
    echoed = oai.completions.create(model="tiny", prompt="bb", max_tokens=5, echo=True, **GREEDY)
    assert echoed.choices[0].text == "bb" + solo.choices[0].text


def test_raw_sse_framing(url: str) -> None:
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}, **GREEDY}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:-1] if c["choices"])
    final, usage = chunks[-2], chunks[-1]
    assert final["choices"][0]["finish_reason"] == "length"
    assert final["choices"][0]["delta"] == {}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    assert all(c["usage"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert len(text) > 0


def test_tokenize_detokenize_embeddings(url: str, oai: openai.OpenAI) -> None:
    toks = httpx.post(url + "/tokenize", json={"model": "tiny", "content": "héllo"}).json()
    assert toks["tokens"] and all(isinstance(t, int) for t in toks["tokens"])
    back = httpx.post(url + "/detokenize", json={"model": "tiny", "tokens": toks["tokens"]})
    assert back.json()["content"] == "héllo"
    pieces = httpx.post(url + "/tokenize", json={"model": "tiny", "content": "ab",
                                                 "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "ab"
    e = oai.embeddings.create(model="tiny", input=["one", "two"])
    assert [d.index for d in e.data] == [0, 1]
    assert e.usage.prompt_tokens == e.usage.total_tokens > 0
    raw = httpx.post(url + "/v1/embeddings", json={"model": "tiny", "input": "one",
                                                   "encoding_format": "base64"}).json()
    vec = struct.unpack(f"<{len(e.data[0].embedding)}f",
                        base64.b64decode(raw["data"][0]["embedding"]))
    assert vec == pytest.approx(e.data[0].embedding, rel=1e-6)


def test_json_schema_and_json_object(oai: openai.OpenAI, url: str) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    r = oai.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=60, **GREEDY,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    doc = json.loads(r.choices[0].message.content or "")
    assert set(doc) == {"n"} and isinstance(doc["n"], int)
    r = oai.chat.completions.create(model="tiny", messages=CHAT, max_tokens=60, **GREEDY,
                                    response_format={"type": "json_object"})
    text = r.choices[0].message.content or ""
    # any object: the fake model's random keys may run past max_tokens
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    bad = httpx.post(url + "/v1/chat/completions", json={
        "model": "tiny", "messages": CHAT,
        "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 12}}}})
    assert bad.status_code == 400, bad.text
    assert bad.json()["error"]["type"] == "invalid_request_error"


def test_forced_tool_calls(oai: openai.OpenAI) -> None:
    tools: Any = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
            "required": ["city"], "additionalProperties": False}}},
        {"type": "function", "function": {"name": "add", "parameters": {
            "type": "object", "properties": {"a": {"type": "integer"}},
            "required": ["a"], "additionalProperties": False}}}]
    r = oai.chat.completions.create(model="tiny", messages=CHAT, tools=tools, max_tokens=80,
                                    tool_choice={"type": "function", "function": {"name": "add"}},
                                    **GREEDY)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].function.name == "add"  # type: ignore[union-attr]
    args = json.loads(calls[0].function.arguments)  # type: ignore[union-attr]
    assert set(args) == {"a"} and isinstance(args["a"], int)
    deltas = [ch.choices[0].delta for ch in oai.chat.completions.create(
        model="tiny", messages=CHAT, tools=tools, tool_choice="required", max_tokens=80,
        stream=True, **GREEDY) if ch.choices]
    streamed = [d.tool_calls[0] for d in deltas if d.tool_calls]
    assert len(streamed) == 1 and streamed[0].index == 0 and streamed[0].id
    assert streamed[0].function is not None
    assert streamed[0].function.name in ("get_weather", "add")
    json.loads(streamed[0].function.arguments or "")


# -- errors -------------------------------------------------------------------------------
def err(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    e = resp.json()["error"]
    assert {"message", "type", "code"} <= set(e) and e["message"]
    return e


def test_bad_requests_are_openai_errors(url: str, oai: openai.OpenAI) -> None:
    post = lambda body: httpx.post(url + "/v1/chat/completions", json=body)  # noqa: E731
    assert err(post({"model": "nope", "messages": CHAT}), 404)["code"] == "model_not_found"
    assert err(post({"model": "tiny", "messages": CHAT, "n": 2}), 400)["param"] == "n"
    assert err(post({"model": "tiny", "messages": CHAT, "temperature": "hot"}), 400)
    assert err(post({"model": "tiny", "messages": CHAT, "frobnicate": 1}),
               400)["code"] == "unknown_field"
    assert err(post({"model": "tiny", "messages": []}), 400)
    assert err(post({"model": "tiny", "messages": CHAT, "keep_alive": "5m"}),
               400)["param"] == "keep_alive"
    assert err(post({"model": "tiny", "messages": CHAT, "keep_alive": -2}), 400)
    bad_json = httpx.post(url + "/v1/chat/completions", content=b"{\"model\": ",
                          headers={"content-type": "application/json"})
    assert err(bad_json, 400)["code"] == "invalid_json"
    assert err(httpx.get(url + "/v1/nothing"), 404)
    assert err(httpx.get(url + "/v1/chat/completions"), 405)
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="nope", messages=CHAT)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="tiny", messages=CHAT, n=3)  # type: ignore[arg-type]


def test_context_overflow_says_what_fits(url: str) -> None:
    r = httpx.post(url + "/v1/completions", json={"model": "small", "prompt": "x" * 200})
    e = err(r, 400)
    assert e["code"] == "context_length_exceeded"
    assert e["n_ctx"] == 64 and e["n_prompt_tokens"] >= 200
    assert "200" in e["message"] or str(e["n_prompt_tokens"]) in e["message"]


def test_worker_crash_mid_stream_is_resumed_with_the_crash_free_text(
        url: str, gw: Supervisor) -> None:
    body = {"model": "slow", "prompt": "go", "max_tokens": 60, "ignore_eos": True,
            "temperature": 0}
    solo = httpx.post(url + "/v1/completions", json=body, timeout=30).json()
    pid = worker_pid(gw, "slow")
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True},
                      timeout=30) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        first = next(lines)
        assert first.startswith("data: ")
        kill(pid)
        rest = [ln for ln in lines if ln]
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(ln[len("data: "):]) for ln in [first, *rest[:-1]]]
    assert not any("error" in c for c in chunks)
    text = "".join(ch["text"] for c in chunks for ch in c["choices"])
    assert text == solo["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    wait_for(lambda: any(w["model"] == "slow" and w["state"] == "ready" and w["pid"] != pid
                         for w in gw.status()), timeout=30)


def test_worker_crash_without_resume_is_an_sse_error_or_a_503() -> None:
    sup = start({"slow": MODELS["slow"]}, {"resume": False})
    try:
        url = sup.http_url
        assert url is not None
        pid = worker_pid(sup, "slow")
        body = {"model": "slow", "prompt": "go", "max_tokens": 2000, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")
            kill(pid)
            rest = [ln for ln in lines if ln]
        last = json.loads(rest[-1][len("data: "):])
        assert last["error"]["code"] == "worker_crashed"
        wait_for(lambda: any(w["state"] == "ready" and w["pid"] != pid
                             for w in sup.status()), timeout=30)
        again = httpx.post(url + "/v1/completions", json={"model": "slow", "prompt": "go",
                                                          "max_tokens": 3}, timeout=30)
        assert again.status_code == 200, again.text
        # a plain request: the error in OpenAI's shape, retryable
        pid = worker_pid(sup, "slow")
        t = threading.Timer(0.5, lambda: kill(pid))
        t.start()
        r = httpx.post(url + "/v1/completions", json={
            "model": "slow", "prompt": "go", "max_tokens": 3000, "ignore_eos": True},
            timeout=30)
        t.join()
        e = err(r, 503)
        assert e["code"] == "worker_crashed" and r.headers["retry-after"] == "1"
    finally:
        sup.stop()


def test_disconnect_cancels_the_generation(url: str, gw: Supervisor) -> None:
    with Client(gw.address) as c:
        before = c.metrics("slow").failed.get("cancelled", 0)
        body = json.dumps({"model": "slow", "prompt": "go", "max_tokens": 5000,
                           "stream": True, "ignore_eos": True}).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                      b"application/json\r\nContent-Length: " + str(len(body)).encode() +
                      b"\r\n\r\n" + body)
            assert b"200 OK" in s.recv(4096)
            wait_for(lambda: c.metrics("slow").requests_running == 1, timeout=10)
        # the socket is closed: the worker must stop generating within a moment
        wait_for(lambda: c.metrics("slow").requests_running == 0, timeout=10)
        assert c.metrics("slow").failed.get("cancelled", 0) == before + 1


def test_gateway_crash_restarts_it_on_the_same_port_and_spares_the_workers(
        url: str, gw: Supervisor, oai: openai.OpenAI) -> None:
    workers = {w["model"]: w["pid"] for w in gw.status()}
    svc = gw.service_status()[0]
    kill(svc["pid"])
    # a connection made while it is down waits in the backlog and is then served
    r = httpx.get(url + "/health", timeout=30)
    assert r.status_code == 200
    after = gw.service_status()[0]
    assert after["restarts"] == svc["restarts"] + 1 and after["pid"] != svc["pid"]
    assert after["url"] == url
    assert {w["model"]: w["pid"] for w in gw.status()} == workers
    assert oai.completions.create(model="tiny", prompt="a", max_tokens=2).choices[0].text


def test_metrics_move_as_requests_are_served(url: str, oai: openai.OpenAI) -> None:
    before = metrics(url)
    r = oai.completions.create(model="tiny", prompt="count me", max_tokens=7, **GREEDY)
    assert r.usage is not None
    after = metrics(url)
    key = "llamafleet_generation_tokens_total{model=tiny,replica=0}"
    assert after[key] - before.get(key, 0) == 7
    key = "llamafleet_prompt_tokens_total{model=tiny,replica=0}"
    assert after[key] - before.get(key, 0) == r.usage.prompt_tokens
    key = "llamafleet_e2e_request_latency_seconds_count{model=tiny,replica=0}"
    assert after[key] - before.get(key, 0) == 1
    key = "llamafleet_requests_finished_total{finish_reason=length,model=tiny,replica=0}"
    assert after[key] - before.get(key, 0) == 1
    assert after["llamafleet_worker_state{model=tiny,replica=0,state=ready}"] == 1
    assert after["llamafleet_worker_state{model=tiny,replica=0,state=failed}"] == 0
    assert after["llamafleet_kv_cache_capacity_tokens{model=tiny,replica=0}"] == 2048
    assert after["llamafleet_worker_load_seconds{model=tiny,replica=0}"] >= 0
    key = "llamafleet_http_requests_total{code=200,endpoint=/v1/completions,model=tiny}"
    assert after[key] - before.get(key, 0) == 1


# -- configurations --------------------------------------------------------------------------
def test_api_keys(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# ops\nsecret-one\nsecret-two\n")
    sup = start({"tiny": MODELS["tiny"]}, {"api_keys": str(keys)})
    try:
        assert sup.http_url is not None
        base = sup.http_url
        assert err(httpx.get(base + "/v1/models"), 401)["type"] == "authentication_error"
        wrong = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer nope"})
        assert err(wrong, 401)
        ok = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer secret-two"})
        assert ok.status_code == 200
        assert httpx.get(base + "/health").status_code == 200  # public
        with openai.OpenAI(base_url=base + "/v1", api_key="secret-one", max_retries=0) as c:
            assert c.completions.create(model="tiny", prompt="a", max_tokens=2).choices
        with openai.OpenAI(base_url=base + "/v1", api_key="bad", max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError):
                c.models.list()
    finally:
        sup.stop()


def test_no_keys_beyond_loopback_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLAMAFLEET_API_KEYS", raising=False)
    with pytest.raises(ConfigError, match="insecure_no_auth"):
        Config.from_dict({"http": {"listen": "0.0.0.0:8080"}})
    Config.from_dict({"http": {"listen": "0.0.0.0:8080", "insecure_no_auth": True}})
    monkeypatch.setenv("LLAMAFLEET_API_KEYS", "k1, k2")
    cfg = Config.from_dict({"http": {"listen": "0.0.0.0:8080"}})
    assert cfg.http is not None and cfg.http["api_keys"] == ["k1", "k2"]
    with pytest.raises(ConfigError, match="listen"):
        Config.from_dict({"http": {"listen": "nowhere"}})
    with pytest.raises(ConfigError, match="unknown"):
        Config.from_dict({"http": {"lisen": "127.0.0.1:1"}})


def test_health_is_503_until_the_workers_are_ready() -> None:
    rd = tempfile.mkdtemp(prefix="lf-gw-", dir="/tmp")
    cfg = Config.from_dict({"supervisor": {"runtime_dir": rd, **FAST},
                            "http": {"listen": "127.0.0.1:0"},
                            "models": {"late": {"backend": "fake", "load_delay": 3.0}}})
    with Supervisor(cfg) as sup:
        assert sup.http_url is not None
        r = wait_for(lambda: _get(sup.http_url + "/health"), timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "unavailable_error"
        wait_for(lambda: (x := _get(str(sup.http_url) + "/health")) is not None
                 and x.status_code == 200, timeout=20)


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None


def test_metrics_listen_alone() -> None:
    sup = start({"tiny": MODELS["tiny"]}, None, metrics_listen="127.0.0.1:0")
    try:
        assert sup.http_url is None and sup.metrics_url is not None
        with Client(sup.address) as c:
            r = c.generate("tiny", "a", max_tokens=3, ignore_eos=True)
        assert len(r.tokens) == 3
        m = metrics(sup.metrics_url)
        assert m["llamafleet_generation_tokens_total{model=tiny,replica=0}"] == 3
        assert httpx.get(sup.metrics_url + "/v1/models").status_code == 404
    finally:
        sup.stop()


def test_serve_http_prints_the_base_url(tmp_path: Path) -> None:
    cfg = tmp_path / "fleet.toml"
    rd = tempfile.mkdtemp(prefix="lf-gw-", dir="/tmp")
    cfg.write_text(f'[supervisor]\nruntime_dir = "{rd}"\n[models.tiny]\nbackend = "fake"\n')
    proc = subprocess.Popen([sys.executable, "-m", "llamafleet", "serve", "--config", str(cfg),
                             "--http", "127.0.0.1:0"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert "supervisor at" in first
        base = proc.stdout.readline().strip()
        assert base.startswith("http://127.0.0.1:") and base.split(":")[-1] != "0"
        r = wait_for(lambda: (x := _get(base + "/health")) is not None
                     and x.status_code == 200 and x, timeout=30)
        assert r.json()["models"] == {"tiny": "ready"}
        st = subprocess.run([sys.executable, "-m", "llamafleet", "status", "--address",
                             f"ipc://{rd}/supervisor.sock"], capture_output=True, text=True,
                            timeout=30)
        assert "[http]" in st.stdout and base in st.stdout
    finally:
        proc.terminate()
        proc.wait(30)
    assert time.monotonic() > 0


def test_auto_tools_reach_the_template_and_plain_replies_still_stream(
        oai: openai.OpenAI, gw: Supervisor) -> None:
    tools: Any = [{"type": "function", "function": {
        "name": "lookup_weather", "parameters": {"type": "object", "properties": {}}}}]
    with Client(gw.address) as c:
        prompt = c.apply_chat_template("tiny", CHAT, tools=tools)
    assert "lookup_weather" in prompt  # the fake's template has no tools: a system message
    whole = oai.chat.completions.create(model="tiny", messages=CHAT, tools=tools,
                                        max_tokens=12, **GREEDY)
    assert whole.choices[0].message.tool_calls is None
    chunks = [ch for ch in oai.chat.completions.create(
        model="tiny", messages=CHAT, tools=tools, max_tokens=12, stream=True, **GREEDY)]
    contents = [ch.choices[0].delta.content for ch in chunks if ch.choices[0].delta.content]
    assert "".join(contents) == whole.choices[0].message.content
    assert len(contents) > 1 or len(whole.choices[0].message.content or "") <= 1


def test_worker_crash_under_a_plain_request_is_resubmitted(url: str, gw: Supervisor) -> None:
    body = {"model": "slow", "prompt": "go", "max_tokens": 60, "ignore_eos": True,
            "temperature": 0}
    solo = httpx.post(url + "/v1/completions", json=body, timeout=30).json()
    pid = worker_pid(gw, "slow")
    t = threading.Timer(0.5, lambda: kill(pid))
    t.start()
    r = httpx.post(url + "/v1/completions", json=body, timeout=30)
    t.join()
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == solo["choices"][0]["text"]
    assert r.json()["usage"]["completion_tokens"] == 60
    wait_for(lambda: any(w["model"] == "slow" and w["state"] == "ready" and w["pid"] != pid
                         for w in gw.status()), timeout=30)


def test_a_named_session_keeps_its_prefix(oai: openai.OpenAI) -> None:
    long = [{"role": "user", "content": "Remember this long story about a lighthouse keeper "
             "who counted ships every night and wrote their names in a book. " * 3}]
    first = oai.chat.completions.create(model="tiny", messages=long, max_tokens=4,
                                        extra_body={"session": "gw-s1"}, **GREEDY)
    assert first.usage is not None
    follow = [*long, {"role": "assistant", "content": first.choices[0].message.content or ""},
              {"role": "user", "content": "And then?"}]
    second = oai.chat.completions.create(model="tiny", messages=follow, max_tokens=4,
                                         extra_body={"session": "gw-s1"}, **GREEDY)
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1


def test_gateway_of_a_curve_fleet(tmp_path: Path) -> None:
    from llamafleet.runtime.security import generate_keys
    keys = generate_keys(tmp_path / "keys")
    with pytest.raises(ConfigError, match="curve_client_cert"):
        Config.from_dict({"supervisor": {"transport": "tcp", "address": "tcp://127.0.0.1:*",
                                         "curve_server_key": keys["server_secret"],
                                         "curve_authorized_clients": keys["authorized"]},
                          "http": {"listen": "127.0.0.1:0"}})
    sup = start({"tiny": MODELS["tiny"]}, {"curve_client_cert": keys["client_secret"]},
                transport="tcp", address="tcp://127.0.0.1:*",
                curve_server_key=keys["server_secret"],
                curve_authorized_clients=keys["authorized"])
    try:
        assert sup.status()[0]["endpoint"].startswith("tcp://")
        r = httpx.post(f"{sup.http_url}/v1/completions",
                       json={"model": "tiny", "prompt": "a", "max_tokens": 3,
                             "ignore_eos": True}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        sup.stop()


def test_speculative_reaches_the_worker_and_leaves_the_text_as_it_was(
        gw: Supervisor, oai: openai.OpenAI) -> None:
    """`speculative` (ours, in extra_body) is passed on: lookup drafts on a prompt that
    repeats itself, "off" drafts nothing, and the completion is the same either way."""
    with Client(gw.address, timeout=30) as c:
        head = c.tokenize("tiny", "Once upon a time, in a land far away")
        said = c.generate("tiny", tokens=head, max_tokens=80, temperature=0, ignore_eos=True)
        echo = head + said.tokens + head[1:]  # the fake model now says it all again

        def complete(mode: str | None) -> tuple[str, int]:
            before = c.metrics("tiny").drafted_tokens
            body = {"ignore_eos": True, **({"speculative": mode} if mode else {})}
            r = oai.completions.create(model="tiny", prompt=echo, max_tokens=60,
                                       temperature=0, extra_body=body)
            return r.choices[0].text, c.metrics("tiny").drafted_tokens - before

        plain, none = complete(None)  # the model's own setting: none configured
        looked, drafted = complete("lookup")
        off, zero = complete("off")
    assert none == 0 and zero == 0 and drafted > 0
    assert looked == plain == off
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model="tiny", prompt="x", max_tokens=2,
                               extra_body={"speculative": "fast"})
