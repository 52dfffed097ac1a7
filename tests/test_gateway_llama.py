"""The gateway on a tiny real llama model: the OpenAI client's answers equal what our own
client gives for the same greedy request, streamed or not."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator

import httpx
import openai
import pytest

from llamafleet import Config, Supervisor
from llamafleet.client import Client
from tests.conftest import FAST

pytestmark = pytest.mark.llama

try:
    from llamafleet.backends.llama import binding
    binding.lib()
except Exception as exc:  # noqa: BLE001 - any failure means: no libllama here
    pytest.skip(f"libllama not available: {exc}", allow_module_level=True)

from llamafleet.testing.tiny_gguf import write_tiny_model  # noqa: E402

OPTS = {"backend": "llama", "n_ctx": 256, "n_seq_max": 4, "n_batch": 64, "n_ubatch": 64,
        "n_threads": 2}


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    path = write_tiny_model(tmp_path_factory.mktemp("gwl") / "tiny.gguf")
    rd = tempfile.mkdtemp(prefix="lf-gwl-", dir="/tmp")
    cfg = Config.from_dict({"supervisor": {"runtime_dir": rd, **FAST},
                            "http": {"listen": "127.0.0.1:0"},
                            "models": {"tiny": {**OPTS, "path": str(path)}}})
    with Supervisor(cfg) as s:
        s.wait_ready(60)
        yield s


def test_completions_equal_our_client(sup: Supervisor) -> None:
    with Client(sup.address) as c:
        ours = c.generate("tiny", "Hello", max_tokens=12, temperature=0, ignore_eos=True)
    with openai.OpenAI(base_url=f"{sup.http_url}/v1", api_key="x", max_retries=0) as oai:
        r = oai.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0,
                                   extra_body={"ignore_eos": True})
        assert r.choices[0].text == ours.text
        assert r.usage is not None and r.usage.completion_tokens == len(ours.tokens) == 12
        streamed = "".join(ch.choices[0].text for ch in oai.completions.create(
            model="tiny", prompt="Hello", max_tokens=12, temperature=0, stream=True,
            extra_body={"ignore_eos": True}))
        assert streamed == ours.text


def test_tokenize_round_trip_and_context_overflow(sup: Supervisor) -> None:
    url = str(sup.http_url)
    toks = httpx.post(url + "/tokenize", json={"content": "hello world"}).json()["tokens"]
    assert toks
    back = httpx.post(url + "/detokenize", json={"tokens": toks}).json()["content"]
    assert back.strip() == "hello world"
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "word " * 400})
    assert r.status_code == 400
    e = r.json()["error"]
    assert e["code"] == "context_length_exceeded" and e["n_ctx"] == 256
    assert e["n_prompt_tokens"] > 256
