"""Per-token logprobs (``generate(..., logprobs=N)``) on the fake and the tiny llama models
(and SmolLM2 when installed), and through the gateway's ``logprobs`` / ``top_logprobs``."""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from llamafleet import Config, Supervisor
from llamafleet.backends.fake import EOS, N_VOCAB, FakeBackend
from llamafleet.client import AsyncClient, Client
from llamafleet.runtime.config import default_model_path
from llamafleet.runtime.errors import BadRequest, ConfigError, NotSupported
from llamafleet.runtime.protocol import MAX_LOGPROBS, Completion, TokenLogprob
from llamafleet.runtime.sampling import SamplingParams
from llamafleet.testing import FAST_SETTINGS as FAST
from tests.conftest import run_together

GREEDY: dict[str, Any] = {"temperature": 0.0, "seed": 3}
#: every fleet-level check runs on both backends; the llama half needs libllama
MODELS = ["fake", pytest.param("llama", marks=pytest.mark.llama)]
LLAMA_OPTS: dict[str, Any] = {"backend": "llama", "n_ctx": 256, "n_seq_max": 2,
                              "n_batch": 64, "n_ubatch": 64, "n_threads": 2}


@contextlib.contextmanager
def _running(models: dict[str, Any], **sections: Any) -> Iterator[Supervisor]:
    """A ready supervisor over ``models`` in a private runtime directory."""
    rd = tempfile.mkdtemp(prefix="lf-lp-", dir="/tmp")
    cfg = Config.from_dict({"supervisor": {"runtime_dir": rd, **FAST}, "models": models,
                            **sections})
    try:
        with Supervisor(cfg) as sup:
            sup.wait_ready(60)
            yield sup
    finally:
        shutil.rmtree(rd, ignore_errors=True)


@pytest.fixture(scope="module")
def fakes() -> Iterator[Supervisor]:
    """Fake models (one slow enough that streamed chunks coalesce several tokens), a
    backend without logprobs, and the HTTP gateway."""
    with _running({"fake": {"backend": "fake"},
                   "fake_slow": {"backend": "fake", "token_delay": 0.005},
                   "minimal": {"backend": "llamafleet.testing.minimal_backend:MinimalBackend"}},
                  http={"listen": "127.0.0.1:0"}) as sup:
        yield sup


@pytest.fixture(scope="module")
def llamas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    """The tiny random-weight llama model (two sequence slots)."""
    try:
        from llamafleet.backends.llama import binding
        binding.lib()
    except Exception as exc:  # noqa: BLE001 - any failure means: no libllama here
        pytest.skip(f"libllama not available: {exc}")
    from llamafleet.testing.tiny_gguf import write_tiny_model
    path = write_tiny_model(tmp_path_factory.mktemp("lp") / "tiny.gguf")
    with _running({"llama": {**LLAMA_OPTS, "path": str(path)}}) as sup:
        yield sup


@pytest.fixture(params=MODELS)
def target(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(supervisor address, model name) for each backend that reports logprobs."""
    model: str = request.param
    sup: Supervisor = request.getfixturevalue("fakes" if model == "fake" else "llamas")
    return sup.address, model


def check_entries(entries: list[TokenLogprob], tokens: list[int], n: int) -> None:
    """The invariants of every entry: aligned with ``tokens``, valid logprobs, ``top``
    of length ``n`` sorted descending, and the chosen token consistent with ``top``."""
    assert len(entries) == len(tokens)
    for e, tok in zip(entries, tokens):
        assert e["token"] == tok and e["logprob"] <= 0 and math.isfinite(e["logprob"])
        assert isinstance(e["bytes"], bytes)
        top = e["top"]
        assert len(top) == n and len({t["token"] for t in top}) == n
        lps = [t["logprob"] for t in top]
        assert lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)
        assert sum(math.exp(lp) for lp in lps) <= 1 + 1e-6
        same = [t for t in top if t["token"] == tok]
        if same:  # the chosen token among the alternatives: the same numbers
            assert same[0]["logprob"] == pytest.approx(e["logprob"], abs=1e-9)
            assert same[0]["bytes"] == e["bytes"]
        elif top:  # otherwise it is no likelier than the last one listed
            assert e["logprob"] <= top[-1]["logprob"] + 1e-9


def assert_same_entries(a: list[TokenLogprob], b: list[TokenLogprob]) -> None:
    """Equal tokens, bytes and (within float noise) logprobs, alternatives included."""
    assert [e["token"] for e in a] == [e["token"] for e in b]
    assert [e["bytes"] for e in a] == [e["bytes"] for e in b]
    assert [[t["token"] for t in e["top"]] for e in a] == [[t["token"] for t in e["top"]]
                                                           for e in b]
    assert [e["logprob"] for e in a] == pytest.approx([e["logprob"] for e in b], abs=1e-4)


async def _stream(address: str, model: str, prompt: str, **kw: Any
                  ) -> tuple[Completion, list[TokenLogprob], list[int]]:
    """Stream a generation; returns the result, the entries the chunks carried and how
    many tokens arrived between consecutive text deltas. Checks at each delta that the
    chunks' entries stay aligned with their tokens."""
    grew: list[int] = []
    async with AsyncClient(address, timeout=60) as c:
        s = c.stream(model, prompt, **kw)
        seen = 0
        async for _ in s:
            assert len(s.logprobs) == len(s.tokens)
            grew.append(len(s.tokens) - seen)
            seen = len(s.tokens)
        assert s.result is not None and len(s.logprobs) == len(s.tokens)
        return s.result, list(s.logprobs), grew


def _ascii_window(text: str, start: int, size: int = 2) -> str:
    """A stop string taken from ``text`` at or after ``start``: printable ASCII only."""
    for i in range(start, len(text) - size):
        w = text[i:i + size]
        if all(33 <= ord(ch) < 127 for ch in w):
            return w
    raise AssertionError(f"no ASCII window in {text!r}")


# -- the fake backend in-process: logprobs follow the distribution it samples from --------

def _fake_at(prompt: str, **params: Any) -> FakeBackend:
    b = FakeBackend({})
    b.load()
    b.set_sampling(0, SamplingParams(**params))
    b.evaluate([(0, b.tokenize(prompt))])
    return b


def test_fake_logprobs_are_the_log_softmax_of_its_logits() -> None:
    b = _fake_at("Hello", temperature=0.0)
    scores = b.logits(0)
    token = b.sample(0)
    assert token is not None
    e = b.token_logprob(0, token, N_VOCAB)
    assert len(e["top"]) == N_VOCAB
    assert sum(math.exp(t["logprob"]) for t in e["top"]) == pytest.approx(1.0, abs=1e-9)
    # differences of logprobs are differences of the raw scores
    for t in e["top"][:20]:
        assert t["logprob"] - e["logprob"] == pytest.approx(scores[t["token"]] - scores[token])
        assert t["bytes"] == b.token_to_piece(t["token"], special=True)
    assert e["top"][0]["token"] == token == max(range(N_VOCAB), key=lambda t: scores[t])
    assert b.token_logprob(0, token, 0)["top"] == []


def test_fake_sampling_frequencies_match_the_logprobs() -> None:
    """At temperature 1 with no truncation the fake draws from exactly the softmax its
    logprobs report: the observed frequencies of the likeliest tokens agree."""
    n = 3000
    plain: dict[str, Any] = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    b = _fake_at("Hi", **plain)
    counts: Counter[int] = Counter()
    for seed in range(n):
        b.set_sampling(0, SamplingParams(**plain, seed=seed))
        tok = b.sample(0)
        assert tok is not None
        counts[tok] += 1
    top = b.token_logprob(0, EOS, 3)["top"]
    for t in top:
        p = math.exp(t["logprob"])
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(counts[t["token"]] / n - p) < 5 * sigma, (t, counts[t["token"]])


# -- through the fleet, on each backend -------------------------------------------------

def test_greedy_chooses_the_top_alternative(target: tuple[str, str]) -> None:
    address, model = target
    with Client(address, timeout=60) as c:
        r = c.generate(model, "Hello there", max_tokens=10, logprobs=3, ignore_eos=True,
                       **GREEDY)
        assert r.logprobs is not None
        check_entries(r.logprobs, r.tokens, 3)
        for e in r.logprobs:
            assert e["top"][0]["token"] == e["token"]
            assert e["top"][0]["logprob"] == e["logprob"]
        # the bytes are the tokens' pieces: together they spell the text
        assert b"".join(e["bytes"] for e in r.logprobs).decode("utf-8", "replace") == r.text
        plain = c.generate(model, "Hello there", max_tokens=10, ignore_eos=True, **GREEDY)
        assert plain.logprobs is None and plain.tokens == r.tokens and plain.text == r.text


def test_sampled_tokens_have_their_own_logprob(target: tuple[str, str]) -> None:
    address, model = target
    with Client(address, timeout=60) as c:
        r = c.generate(model, "Hi", max_tokens=16, logprobs=MAX_LOGPROBS, ignore_eos=True,
                       temperature=1.5, seed=11)
        assert r.logprobs is not None
        check_entries(r.logprobs, r.tokens, MAX_LOGPROBS)
        # sampled, not greedy: some token was not the likeliest one
        assert any(e["top"][0]["token"] != e["token"] for e in r.logprobs)
        zero = c.generate(model, "Hi", max_tokens=16, logprobs=0, ignore_eos=True,
                          temperature=1.5, seed=11)
        assert zero.tokens == r.tokens and zero.logprobs is not None
        check_entries(zero.logprobs, zero.tokens, 0)
        assert [e["logprob"] for e in zero.logprobs] == \
            pytest.approx([e["logprob"] for e in r.logprobs], abs=1e-4)


def test_streamed_entries_equal_the_whole(target: tuple[str, str]) -> None:
    address, model = target
    kw: dict[str, Any] = dict(max_tokens=9, logprobs=2, ignore_eos=True, **GREEDY)
    with Client(address, timeout=60) as c:
        whole = c.generate(model, "Stream me", **kw)
    result, entries, grew = asyncio.run(_stream(address, model, "Stream me", **kw))
    assert whole.logprobs is not None and result.logprobs is not None
    assert len(grew) >= 2  # several chunks, each with its own entries
    assert result.tokens == whole.tokens
    assert_same_entries(entries, whole.logprobs)
    assert_same_entries(result.logprobs, whole.logprobs)


def test_coalesced_chunks_carry_every_entry(fakes: Supervisor) -> None:
    kw: dict[str, Any] = dict(max_tokens=40, logprobs=1, ignore_eos=True, **GREEDY)
    result, entries, grew = asyncio.run(_stream(fakes.address, "fake_slow", "slow", **kw))
    assert max(grew) > 1  # some chunk carried several tokens (and their entries)
    assert result.logprobs == entries and len(entries) == len(result.tokens) == 40


def test_stop_string_keeps_one_entry_per_token(target: tuple[str, str]) -> None:
    address, model = target
    kw: dict[str, Any] = dict(max_tokens=24, logprobs=2, ignore_eos=True, **GREEDY)
    with Client(address, timeout=60) as c:
        full = c.generate(model, "Hello there", **kw)
        assert full.logprobs is not None
        stop = _ascii_window(full.text, len(full.text) // 2)
        r = c.generate(model, "Hello there", stop=[stop], **kw)
    assert r.finish_reason == "stop" and r.stop == stop and stop not in r.text
    assert r.logprobs is not None and 0 < len(r.tokens) < len(full.tokens)
    check_entries(r.logprobs, r.tokens, 2)
    # the entries cover every generated token, the stop string's included
    assert stop in b"".join(e["bytes"] for e in r.logprobs).decode("utf-8", "replace")
    assert_same_entries(r.logprobs, full.logprobs[:len(r.tokens)])
    result, entries, _ = asyncio.run(_stream(address, model, "Hello there", stop=[stop], **kw))
    assert result.tokens == r.tokens and result.text == r.text
    assert_same_entries(entries, r.logprobs)


def test_the_end_of_a_grammar_adds_no_entry(target: tuple[str, str]) -> None:
    address, model = target
    with Client(address, timeout=60) as c:
        r = c.generate(model, "Hi", max_tokens=10, logprobs=2, grammar='root ::= "ab"',
                       **GREEDY)
    assert r.text == "ab" and r.finish_reason in ("eog", "grammar")
    assert r.logprobs is not None and len(r.tokens) >= 1
    check_entries(r.logprobs, r.tokens, 2)


def test_bad_and_unsupported(fakes: Supervisor) -> None:
    with Client(fakes.address) as c:
        for bad in (MAX_LOGPROBS + 1, -1, 2.5, "3"):
            with pytest.raises(BadRequest, match="logprobs"):
                c.generate("fake", "x", logprobs=bad)
        ticks = c.info("minimal").scheduler.ticks
        with pytest.raises(NotSupported, match="logprobs"):
            c.generate("minimal", "x", max_tokens=2, logprobs=1)
        # refused by the handler: the scheduler never saw it
        assert c.info("minimal").scheduler.ticks == ticks
        # the refusal is about logprobs only: the same request without them runs
        ok = c.generate("minimal", "x", max_tokens=2, ignore_eos=True, **GREEDY)
        assert len(ok.tokens) == 2 and ok.logprobs is None
        assert c.info("minimal").scheduler.ticks > ticks


@pytest.mark.llama
def test_llama_batched_sequences_read_their_own_logits(llamas: Supervisor) -> None:
    """Two generations decoded in the same batches get the entries they get alone."""
    prompts = ["the time of", "hello world"]
    kw: dict[str, Any] = dict(max_tokens=16, logprobs=3, ignore_eos=True, **GREEDY)
    with Client(llamas.address, timeout=60) as c:
        solo = [c.generate("llama", p, **kw) for p in prompts]
        assert solo[0].tokens != solo[1].tokens
        out: dict[int, Completion] = {}

        def run(i: int) -> Callable[[], None]:
            return lambda: out.__setitem__(i, c.generate("llama", prompts[i], **kw))

        run_together(c, llamas, "llama", [run(i) for i in range(2)])
        assert c.info("llama").scheduler.peak_running >= 2
    for i, r in enumerate(solo):
        got = out[i]
        assert got.tokens == r.tokens and got.logprobs is not None and r.logprobs is not None
        assert_same_entries(got.logprobs, r.logprobs)


def test_gateway_logprobs(fakes: Supervisor) -> None:
    url = str(fakes.http_url)
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


# -- a real model -------------------------------------------------------------------------

@pytest.mark.smollm
@pytest.mark.llama
def test_smollm_greedy_token_has_the_highest_logprob() -> None:
    try:
        path = default_model_path()
    except ConfigError as exc:
        pytest.skip(f"SmolLM2 is not installed: {exc}")
    try:
        from llamafleet.backends.llama import binding
        binding.lib()
    except Exception as exc:  # noqa: BLE001 - any failure means: no libllama here
        pytest.skip(f"libllama not available: {exc}")
    with _running({"smol": {"backend": "llama", "path": str(path), "n_ctx": 512,
                            "n_seq_max": 1, "n_threads": 2}}) as sup, \
            Client(sup.address, timeout=120) as c:
        r = c.generate("smol", "The capital of France is", max_tokens=8, logprobs=5,
                       ignore_eos=True, **GREEDY)
    assert r.logprobs is not None
    check_entries(r.logprobs, r.tokens, 5)
    for e in r.logprobs:
        assert e["top"][0]["token"] == e["token"]
        assert e["logprob"] == max(t["logprob"] for t in e["top"])
    # a trained model is confident where a random one is not
    assert max(math.exp(e["logprob"]) for e in r.logprobs) > 0.5
