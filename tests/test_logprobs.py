"""Per-token logprobs (``generate(..., logprobs=N)``) on the fake and the tiny llama models,
and through the gateway's ``logprobs`` / ``top_logprobs``."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llamafleet import Config, Supervisor
from llamafleet.client import Client
from llamafleet.runtime.errors import BadRequest, NotSupported
from tests.conftest import FAST

GREEDY = {"temperature": 0.0, "seed": 3}


def _llama_model(tmp: Path) -> dict[str, Any] | None:
    try:
        from llamafleet.backends.llama import binding
        binding.lib()
    except Exception:  # noqa: BLE001 - no libllama here
        return None
    from llamafleet.testing.tiny_gguf import write_tiny_model
    return {"backend": "llama", "path": str(write_tiny_model(tmp / "tiny.gguf")),
            "n_ctx": 256, "n_seq_max": 2, "n_batch": 64, "n_ubatch": 64, "n_threads": 2}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Supervisor, list[str]]]:
    models: dict[str, Any] = {
        "fake": {"backend": "fake"},
        "minimal": {"backend": "llamafleet.testing.minimal_backend:MinimalBackend"}}
    llama = _llama_model(tmp_path_factory.mktemp("lp"))
    if llama is not None:
        models["llama"] = llama
    rd = tempfile.mkdtemp(prefix="lf-lp-", dir="/tmp")
    cfg = Config.from_dict({"supervisor": {"runtime_dir": rd, **FAST},
                            "http": {"listen": "127.0.0.1:0"}, "models": models})
    with Supervisor(cfg) as sup:
        sup.wait_ready(60)
        yield sup, [m for m in ("fake", "llama") if m in models]


def check_entries(entries: list[dict[str, Any]], tokens: list[int], n: int) -> None:
    assert len(entries) == len(tokens)
    for e, tok in zip(entries, tokens):
        assert e["token"] == tok and e["logprob"] <= 0
        top = e["top"]
        assert len(top) == n
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert sum(math.exp(t["logprob"]) for t in top) <= 1 + 1e-6
        assert isinstance(e["bytes"], bytes)


def test_greedy_chooses_the_top_alternative(fleet: tuple[Supervisor, list[str]]) -> None:
    sup, models = fleet
    with Client(sup.address) as c:
        for model in models:
            r = c.generate(model, "Hello there", max_tokens=10, logprobs=3, ignore_eos=True,
                           **GREEDY)
            assert r.logprobs is not None
            check_entries(r.logprobs, r.tokens, 3)
            for e in r.logprobs:
                assert e["top"][0]["token"] == e["token"], model
                assert e["top"][0]["logprob"] == pytest.approx(e["logprob"])
            plain = c.generate(model, "Hello there", max_tokens=10, ignore_eos=True, **GREEDY)
            assert plain.logprobs is None and plain.tokens == r.tokens


def test_sampled_tokens_have_their_own_logprob(fleet: tuple[Supervisor, list[str]]) -> None:
    sup, models = fleet
    with Client(sup.address) as c:
        for model in models:
            r = c.generate(model, "Hi", max_tokens=12, logprobs=0, ignore_eos=True,
                           temperature=1.5, seed=11)
            assert r.logprobs is not None
            check_entries(r.logprobs, r.tokens, 0)


def test_streamed_entries_equal_the_whole(fleet: tuple[Supervisor, list[str]]) -> None:
    sup, models = fleet
    with Client(sup.address) as c:
        for model in models:
            whole = c.generate(model, "Stream me", max_tokens=9, logprobs=2, ignore_eos=True,
                               **GREEDY)
            s = c.stream(model, "Stream me", max_tokens=9, logprobs=2, ignore_eos=True,
                         **GREEDY)
            s.collect()
            assert s.result is not None and s.result.logprobs == whole.logprobs


def test_bad_and_unsupported(fleet: tuple[Supervisor, list[str]]) -> None:
    sup, _ = fleet
    with Client(sup.address) as c:
        with pytest.raises(BadRequest, match="logprobs"):
            c.generate("fake", "x", logprobs=21)
        with pytest.raises(NotSupported, match="logprobs"):
            c.generate("minimal", "x", max_tokens=2, logprobs=1)


def test_gateway_logprobs(fleet: tuple[Supervisor, list[str]]) -> None:
    sup, _ = fleet
    url = str(sup.http_url)
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 6, "logprobs": True, "top_logprobs": 2, **GREEDY}
    r = httpx.post(url + "/v1/chat/completions", json=body).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"] == 6
    assert "".join(e["token"] for e in content) == r["choices"][0]["message"]["content"]
    assert all(len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["token"] == e["token"]
               for e in content)
    legacy = httpx.post(url + "/v1/completions", json={
        "model": "fake", "prompt": "hi", "max_tokens": 5, "logprobs": 2, **GREEDY}).json()
    lp = legacy["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 5 and "".join(lp["tokens"]) == legacy["choices"][0]["text"]
    assert lp["text_offset"][0] == 0 and all(len(t) == 2 for t in lp["top_logprobs"])
    assert httpx.post(url + "/v1/chat/completions",
                      json={**body, "model": "minimal"}).status_code == 501
