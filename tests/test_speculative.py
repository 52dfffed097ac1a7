"""Speculative decoding through real worker processes and sockets: the model option,
the per-request option, the reported counts and the metrics (fake backend), and the
real backend on the tiny generated GGUF models (drafts verified in one decode, the
rejected cells removed)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from llamafleet.client import Client
from llamafleet.runtime.errors import NotSupported
from llamafleet.testing import fake_fleet

HEAD = "Once upon a time, in a land far away"


MODELS = {"spec": {"backend": "fake", "speculative": "lookup", "draft_max": 8,
                   "token_delay": 0.002},
          # the fake model as its own draft model (any existing file is a fake model)
          "drafted": {"backend": "fake", "draft_model": __file__, "token_delay": 0.002},
          "plain": {"backend": "fake", "token_delay": 0.002},
          "bare": {"backend": "llamafleet.testing.minimal_backend:MinimalBackend"}}


@pytest.fixture(scope="module")
def c() -> Iterator[Client]:
    with fake_fleet(MODELS) as sup, Client(sup.address, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def echo(c: Client) -> list[int]:
    """A prompt after which the fake model says again what it said before."""
    head = c.tokenize("plain", HEAD)
    out = c.generate("plain", tokens=head, max_tokens=120, temperature=0, ignore_eos=True)
    return head + out.tokens + head[1:]


def test_model_option_speculates_with_the_same_output(c: Client, echo: list[int]) -> None:
    kw = {"tokens": echo, "max_tokens": 100, "temperature": 0, "ignore_eos": True}
    plain = c.generate("plain", **kw)
    spec = c.generate("spec", **kw)
    assert spec.tokens == plain.tokens and spec.text == plain.text
    assert spec.stats.drafted_tokens >= spec.stats.accepted_tokens > 50
    assert plain.stats.drafted_tokens == plain.stats.accepted_tokens == 0
    # per request: None turns the model's lookup off, "lookup" turns it on elsewhere
    off = c.generate("spec", speculative=None, **kw)
    assert off.tokens == plain.tokens and off.stats.drafted_tokens == 0
    on = c.generate("plain", speculative="lookup", **kw)
    assert on.tokens == plain.tokens and on.stats.accepted_tokens > 50
    # streamed, the deltas add up to the same text
    s = c.stream("spec", **kw)
    assert "".join(s) == plain.text and s.result is not None
    assert s.result.stats.accepted_tokens > 50


def test_metrics_count_drafted_and_accepted_tokens(c: Client, echo: list[int]) -> None:
    before = c.metrics("spec")
    r = c.generate("spec", tokens=echo, max_tokens=60, temperature=0, ignore_eos=True)
    after = c.metrics("spec")
    assert after.drafted_tokens - before.drafted_tokens == r.stats.drafted_tokens > 0
    assert after.accepted_tokens - before.accepted_tokens == r.stats.accepted_tokens > 0


def test_a_backend_that_cannot_verify_drafts_refuses_lookup(c: Client) -> None:
    with pytest.raises(NotSupported, match="drafts"):
        c.generate("bare", "hello", max_tokens=2, speculative="lookup")
    assert c.generate("bare", "hello", max_tokens=2).finish_reason  # the model default: off


def _failure(sup: Any) -> str:
    """Wait for the fleet's only model to be marked failed; why it failed."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = sup.status()[0]
        if st["state"] == "failed":
            return str(st.get("error") or st.get("last_exit") or "")
        time.sleep(0.1)
    raise AssertionError(f"not failed: {st}")


def test_a_model_configured_for_lookup_on_such_a_backend_fails_to_load(fleet) -> None:
    sup = fleet({"bare": {"backend": "llamafleet.testing.minimal_backend:MinimalBackend",
                          "speculative": "lookup"}}, wait=False, max_restarts=0)
    assert "cannot verify drafts" in _failure(sup)


def test_a_draft_model_drafts_in_the_same_worker(c: Client, echo: list[int]) -> None:
    kw = {"prompt": "free text the model makes up", "max_tokens": 60, "temperature": 0,
          "ignore_eos": True}
    plain = c.generate("plain", **kw)
    drafted = c.generate("drafted", **kw)  # draft_model: speculative defaults to "draft"
    assert drafted.tokens == plain.tokens
    st = drafted.stats
    assert st.drafted_tokens > 20 and st.accepted_tokens == st.drafted_tokens  # itself
    assert c.generate("drafted", speculative="lookup", tokens=echo, max_tokens=40,
                      temperature=0, ignore_eos=True).stats.accepted_tokens > 0
    assert c.generate("drafted", speculative=None, **kw).stats.drafted_tokens == 0
    with pytest.raises(NotSupported, match="no draft_model"):
        c.generate("plain", speculative="draft", **kw)


def test_a_draft_model_with_another_vocabulary_fails_to_load(fleet, tmp_path) -> None:
    from llamafleet.runtime.config import default_model_path
    from llamafleet.runtime.errors import ConfigError
    try:
        from llamafleet.backends.llama import binding
        binding.lib()
        smol = default_model_path()
        from llamafleet.testing.tiny_gguf import TinyModelSpec, write_tiny_model
    except (ImportError, OSError, ConfigError) as exc:
        pytest.skip(f"needs libllama, gguf and SmolLM2: {exc}")
    tiny = write_tiny_model(tmp_path / "tiny.gguf", TinyModelSpec())
    sup = fleet({"m": {"backend": "llama", "path": str(tiny), "n_ctx": 256, "n_seq_max": 1,
                       "n_threads": 2, "draft_model": str(smol)}}, wait=False, max_restarts=0)
    assert "does not share the vocabulary" in _failure(sup)

