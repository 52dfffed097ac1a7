"""Every protocol command end to end on the llama backend: supervisor + llama worker + client.

The models are tiny random-weight GGUF files generated once per module (llamafleet.testing.tiny_gguf),
so this runs in seconds and needs no download; only libllama (llama-cpp-python) is required.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamafleet.client import Client
from llamafleet.runtime.errors import BadRequest, NotFound, WorkerCrashed, WorkerFailed
from tests.conftest import kill, make_config, pid_alive, run_together, wait_for, worker_pid

pytestmark = pytest.mark.llama

try:
    from llamafleet.backends.llama import binding
    binding.lib()
except Exception as exc:  # noqa: BLE001 - any failure means: no libllama here
    pytest.skip(f"libllama not available: {exc}", allow_module_level=True)

from llamafleet.runtime.supervisor import Supervisor  # noqa: E402
from llamafleet.testing.tiny_gguf import (  # noqa: E402
    BOS_ID,
    EOS_ID,
    IM_END_ID,
    IM_START_ID,
    N_VOCAB,
    TinyModelSpec,
    write_lora_adapter,
    write_tiny_model,
)

#: Options shared by every tiny llama worker.
OPTS = {"backend": "llama", "n_ctx": 256, "n_seq_max": 4, "n_batch": 64, "n_ubatch": 64,
        "n_threads": 2}
#: A model with a huge context and one sequence: generations long enough to interrupt.
LONG_OPTS = {**OPTS, "n_ctx": 65536, "n_seq_max": 1}
SPEC = TinyModelSpec()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("llama-fleet")
    junk = d / "junk.gguf"
    junk.write_text("this is not a GGUF file, just some text\n" * 4)
    model = write_tiny_model(d / "tiny.gguf", SPEC)
    trunc = d / "trunc.gguf"
    data = model.read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    return {
        "model": model,
        "other": write_tiny_model(d / "other.gguf", TinyModelSpec(seed=7)),
        "stop": write_tiny_model(d / "stop.gguf", TinyModelSpec(eos_after=".")),
        "long": write_tiny_model(d / "long.gguf", TinyModelSpec(n_ctx_train=65536)),
        "lora": write_lora_adapter(d / "lora.gguf", SPEC),
        "lora2": write_lora_adapter(d / "lora2.gguf", SPEC, seed=5),
        "lora_arch": write_lora_adapter(d / "lora_arch.gguf", SPEC, arch="qwen2"),
        "lora_shape": write_lora_adapter(d / "lora_shape.gguf", TinyModelSpec(n_embd=32)),
        "junk": junk,
        "trunc": trunc,
        "dir": d,
    }


@pytest.fixture(scope="module")
def sup(files: dict[str, Path]) -> Iterator[Supervisor]:
    """One fleet for the whole module (ipc paths need a short runtime dir under /tmp)."""
    rd = Path(tempfile.mkdtemp(prefix="lfl-", dir="/tmp"))
    models = {"tiny": {**OPTS, "path": str(files["model"])},
              "other": {**OPTS, "path": str(files["other"])},
              "stop": {**OPTS, "path": str(files["stop"])},
              "long": {**LONG_OPTS, "path": str(files["long"])},
              # the same model without the prefix cache: the reference for cached runs
              "nocache": {**OPTS, "path": str(files["model"]), "prefix_cache": False},
              # eight slots, for eight concurrent streams
              "eight": {**OPTS, "n_seq_max": 8, "path": str(files["model"]),
                        "prefix_cache": False}}
    s = Supervisor(make_config(rd, models)).start()
    try:
        s.wait_ready(timeout=60)
        yield s
    finally:
        s.stop()
        shutil.rmtree(rd, ignore_errors=True)


@pytest.fixture(scope="module")
def client(sup: Supervisor) -> Iterator[Client]:
    with Client(sup.address, timeout=30) as c:
        yield c


@pytest.fixture(autouse=True)
def _clean(request: pytest.FixtureRequest) -> Iterator[None]:
    """Leave the shared "tiny" worker as found: sequences empty, no adapter."""
    yield
    if "client" in request.fixturenames:
        c: Client = request.getfixturevalue("client")
        for seq in range(OPTS["n_seq_max"]):
            c.seq_clear("tiny", seq)
        c.set_adapters("tiny", {})
        for name in c.info("tiny").adapters:
            c.unload_adapter("tiny", name)


def greedy(c: Client, prompt: str, n: int = 12, model: str = "tiny", **kw):
    return c.generate(model, prompt, max_tokens=n, temperature=0, **kw)


# -- basics ----------------------------------------------------------------------------------
def test_ping_info_and_status(client: Client, sup: Supervisor) -> None:
    pong = client.ping("tiny")
    assert pong.pong is True and pong.model == "tiny"
    assert pong.pid == worker_pid(sup, "tiny")
    info = client.info("tiny")
    assert info.backend == "llama" and info.architecture == "llama"
    assert info.n_vocab == N_VOCAB == 512
    assert info.n_ctx == 256 and info.n_seq_max == 4 and info.n_embd == 64
    assert info.bos_token == BOS_ID and info.eos_token == EOS_ID
    assert info.chat_template and "<|im_start|>" in info.chat_template
    assert info.name == "tiny-llama" and info.model == "tiny"
    assert {"kv", "grammar", "json_schema", "lora", "embeddings",
            "chat_template"} <= set(info.features)
    assert info.adapters == {}
    assert client.info("long").n_ctx == 65536
    states = {w["model"]: w for w in client.status()}
    assert set(states) == {"tiny", "other", "stop", "long", "nocache", "eight"}
    assert all(w["state"] == "ready" and w["backend"] == "llama" for w in states.values())
    assert states["tiny"]["pid"] == pong.pid
    found = client.lookup("tiny").endpoints[0]
    assert found.pid == pong.pid and found.backend == "llama"
    assert found.endpoint == states["tiny"]["endpoint"]


def test_tokenize_detokenize_round_trip(client: Client) -> None:
    text = "hello world, the time is now!"
    toks = client.tokenize("tiny", text)
    assert toks[0] == BOS_ID and all(0 <= t < N_VOCAB for t in toks)
    assert client.detokenize("tiny", toks) == text
    assert client.detokenize("tiny", toks, special=True).startswith("<s>")
    assert client.tokenize("tiny", text, add_special=False) == toks[1:]
    # non-ASCII text goes through byte tokens and back
    uni = "héllo wörld ✓\n\ttab"
    assert client.detokenize("tiny", client.tokenize("tiny", uni)) == uni
    # special tokens are parsed only on request
    special = client.tokenize("tiny", "<|im_start|>user<|im_end|>", add_special=False,
                              parse_special=True)
    assert special[0] == IM_START_ID and special[-1] == IM_END_ID
    plain = client.tokenize("tiny", "<|im_start|>user<|im_end|>", add_special=False)
    assert IM_START_ID not in plain and IM_END_ID not in plain
    # (SPM puts its space prefix on text that follows a special token, as llama.cpp does)
    shown = client.detokenize("tiny", special, special=True)
    assert shown.startswith("<|im_start|>") and shown.endswith("<|im_end|>") and "user" in shown
    assert "<|im_" not in client.detokenize("tiny", special)
    assert client.tokenize("tiny", "") == [BOS_ID]
    assert client.detokenize("tiny", []) == ""


# -- generation -------------------------------------------------------------------------------
def test_generate_greedy_is_deterministic_and_stream_matches(client: Client) -> None:
    a = greedy(client, "Once upon a time", 24)
    b = greedy(client, "Once upon a time", 24)
    assert a.tokens == b.tokens and a.text == b.text and len(a.tokens) == 24
    assert a.finish_reason == "length" and a.seq is None
    assert a.stats.prompt_tokens == len(client.tokenize("tiny", "Once upon a time"))
    assert a.stats.generated_tokens == 24
    assert greedy(client, "something else", 24).tokens != a.tokens
    # the same prompt given as tokens
    toks = client.tokenize("tiny", "Once upon a time")
    assert client.generate("tiny", tokens=toks, max_tokens=24, temperature=0).tokens == a.tokens
    stream = client.stream("tiny", "Once upon a time", max_tokens=24, temperature=0)
    pieces = list(stream)
    assert "".join(pieces) == a.text
    assert stream.tokens == a.tokens
    assert stream.result is not None and stream.result.tokens == a.tokens
    assert stream.result.text == a.text and stream.result.finish_reason == "length"
    # seeded sampling is reproducible, and different from greedy
    s1 = client.generate("tiny", "x", max_tokens=20, temperature=1.0, seed=7)
    s2 = client.generate("tiny", "x", max_tokens=20, temperature=1.0, seed=7)
    assert s1.tokens == s2.tokens
    assert client.generate("tiny", "x", max_tokens=20, temperature=1.0, seed=8).tokens \
        != s1.tokens


def test_eight_concurrent_streams_equal_their_solo_runs(sup: Supervisor, client: Client) -> None:
    prompts = [f"the {w} of the world" for w in
               ("time", "hello", "number", "place", "word", "day", "way", "thing")]
    solo = [client.generate("eight", p, max_tokens=24, temperature=0, ignore_eos=True)
            for p in prompts]
    out: dict[int, tuple[str, list[int]]] = {}

    def run(i: int) -> None:
        s = client.stream("eight", prompts[i], max_tokens=24, temperature=0, ignore_eos=True)
        text = "".join(s)
        out[i] = (text, s.result.tokens if s.result else [])

    run_together(client, sup, "eight", [lambda i=i: run(i) for i in range(8)])
    assert [out.get(i) for i in range(8)] == [(r.text, r.tokens) for r in solo]
    # they really ran batched together
    assert client.info("eight").scheduler.peak_running >= 4


def test_libllama_override_is_honoured(fleet, files: dict[str, Path],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from llamafleet.backends.llama.binding import find_library
    real = find_library()
    monkeypatch.setenv("LLAMAFLEET_LIBLLAMA", "/nonexistent/libllama.so")
    sup = fleet({"bad": {**OPTS, "path": str(files["model"])}}, wait=False)
    wait_for(lambda: sup.status()[0]["state"] == "failed", timeout=30)
    assert "LLAMAFLEET_LIBLLAMA" in sup.status()[0]["last_exit"]
    sup.stop()
    monkeypatch.setenv("LLAMAFLEET_LIBLLAMA", real)
    good = fleet({"good": {**OPTS, "path": str(files["model"])}})
    with Client(good.address, timeout=30) as c:
        assert len(c.generate("good", "hello", max_tokens=3, temperature=0,
                              ignore_eos=True).tokens) == 3


def test_concurrent_generations_equal_solo_ones(client: Client) -> None:
    prompts = ["hello world", "the time", "what is it", "a number of"]
    solo = [greedy(client, p, 20).tokens for p in prompts]
    out: dict[int, list[int]] = {}

    def run(i: int) -> None:
        out[i] = greedy(client, prompts[i], 20).tokens

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [out.get(i) for i in range(len(prompts))] == solo


def test_eog_ends_generation_unless_ignored(client: Client) -> None:
    r = greedy(client, "hello world.", 16, model="stop")
    assert r.finish_reason == "eog" and r.tokens == [] and r.text == ""
    s = client.stream("stop", "hello world.", max_tokens=16, temperature=0)
    assert list(s) == [] and s.result is not None and s.result.finish_reason == "eog"
    r = greedy(client, "hello world.", 4, model="stop", ignore_eos=True)
    assert r.finish_reason == "length" and r.tokens[0] == EOS_ID and len(r.tokens) == 4


def _ascii_window(text: str, start: int, size: int = 2) -> str:
    """A stop string taken from ``text`` at or after ``start``: printable ASCII only."""
    for i in range(start, len(text) - size):
        w = text[i:i + size]
        if all(33 <= ord(ch) < 127 for ch in w):
            return w
    raise AssertionError(f"no ASCII window in {text!r}")


def test_stop_strings_and_max_tokens(client: Client) -> None:
    full = greedy(client, "hello world", 40, ignore_eos=True)
    assert len(full.tokens) == 40 and full.finish_reason == "length"
    stop = _ascii_window(full.text, 10)
    cut = greedy(client, "hello world", 40, ignore_eos=True, stop=[stop, "\x00never"])
    assert cut.finish_reason == "stop" and cut.stop == stop
    assert cut.text == full.text[:full.text.index(stop)]
    assert cut.tokens == full.tokens[:len(cut.tokens)] and len(cut.tokens) < 40
    streamed = client.stream("tiny", "hello world", max_tokens=40, temperature=0,
                             ignore_eos=True, stop=stop)
    assert "".join(streamed) == cut.text
    assert streamed.result is not None and streamed.result.stop == stop
    assert greedy(client, "hello world", 0).tokens == []
    assert greedy(client, "hello world", 0).finish_reason == "length"


def test_stop_string_on_a_callers_sequence_keeps_the_kv_complete(client: Client) -> None:
    toks = client.tokenize("tiny", "hello world")
    full = client.generate("tiny", tokens=toks, max_tokens=20, temperature=0, ignore_eos=True)
    stop = _ascii_window(full.text, 6)
    client.prefill("tiny", 2, toks)
    r = client.generate("tiny", tokens=[], seq=2, max_tokens=20, temperature=0,
                        ignore_eos=True, stop=[stop])
    assert r.finish_reason == "stop" and r.tokens == full.tokens[:len(r.tokens)]
    # as after finish_reason "length": every returned token is in the sequence...
    assert client.call("tiny", "kv_pack", {"seq": 2})["n_tokens"] == len(toks) + len(r.tokens)
    # ...and decoding goes on where the generation stopped
    client.set_sampling("tiny", 2, temperature=0)
    assert client.decode("tiny", 2).token == full.tokens[len(r.tokens)]


# -- sequences and KV ----------------------------------------------------------------------------
def test_prefill_decode_and_kv_round_trip(client: Client) -> None:
    toks = client.tokenize("tiny", "the world is a place where")
    ref = client.generate("tiny", tokens=toks, max_tokens=10, temperature=0).tokens
    assert client.prefill("tiny", 1, toks) == len(toks)
    client.set_sampling("tiny", 1, temperature=0)
    first = [client.decode("tiny", 1) for _ in range(3)]
    assert [d.token for d in first] == ref[:3]
    assert first[-1].n_tokens == len(toks) + 3 and not any(d.eog for d in first)
    assert first[0].piece == client.detokenize("tiny", [ref[0]]) or first[0].piece.strip()
    blob = client.kv_pack("tiny", 1)
    assert isinstance(blob, bytes) and len(blob) > 0
    rest = [client.decode("tiny", 1).token for _ in range(5)]
    assert rest == ref[3:8]
    # unpack into another sequence: identical greedy continuation
    assert client.kv_unpack("tiny", 2, blob) == len(toks) + 3
    client.set_sampling("tiny", 2, temperature=0)
    assert [client.decode("tiny", 2).token for _ in range(5)] == rest
    # decode with inline sampling parameters (replaces the sampler)
    assert client.kv_unpack("tiny", 3, blob) == len(toks) + 3
    assert client.decode("tiny", 3, temperature=0).token == rest[0]
    # generate continues a caller-owned sequence and leaves it filled
    client.kv_unpack("tiny", 2, blob)
    cont = client.generate("tiny", tokens=[], seq=2, max_tokens=5, temperature=0)
    assert cont.seq == 2 and cont.tokens == rest
    assert client.prefill("tiny", 2, [5]) == len(toks) + 3 + 5 + 1
    # cleared sequences have no logits; corrupt blobs are refused and change nothing
    client.seq_clear("tiny", 1)
    with pytest.raises(BadRequest, match="no logits"):
        client.decode("tiny", 1)
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(BadRequest, match="checksum"):
        client.kv_unpack("tiny", 1, bytes(bad))
    with pytest.raises(BadRequest, match="truncated"):
        client.kv_unpack("tiny", 1, blob[:-10])
    with pytest.raises(BadRequest, match="magic"):
        client.kv_unpack("tiny", 1, b"not a kv blob at all")
    with pytest.raises(BadRequest, match="no logits"):
        client.decode("tiny", 1)


def test_kv_blob_of_another_model_is_refused(client: Client, sup: Supervisor) -> None:
    pid = worker_pid(sup, "other")
    client.prefill("tiny", 0, client.tokenize("tiny", "hello world"))
    blob = client.kv_pack("tiny", 0)
    with pytest.raises(BadRequest, match="another model"):
        client.kv_unpack("other", 0, blob)
    with pytest.raises(BadRequest, match="no logits"):
        client.decode("other", 0)
    # the other worker still serves, same process
    assert client.ping("other").pid == pid
    assert len(greedy(client, "hello", 3, model="other").tokens) == 3
    # and its own blobs work there
    client.prefill("other", 0, client.tokenize("other", "hello world"))
    own = client.kv_pack("other", 0)
    assert client.kv_unpack("other", 1, own) == len(client.tokenize("other", "hello world"))
    client.seq_clear("other", 0)
    client.seq_clear("other", 1)


def test_sequence_in_use_by_a_generation_is_refused(client: Client) -> None:
    stream = client.stream("long", "x", max_tokens=60_000, ignore_eos=True, temperature=0)
    next(stream)
    try:
        with pytest.raises(BadRequest, match="in use"):
            client.prefill("long", 0, [5])
        with pytest.raises(BadRequest, match="in use"):
            client.kv_pack("long", 0)
    finally:
        stream.cancel()


# -- grammar and JSON schema ----------------------------------------------------------------------
def test_grammar_constrains_and_bad_grammar_fails_closed(client: Client, sup: Supervisor) -> None:
    pid = worker_pid(sup, "tiny")
    r = greedy(client, "Answer:", 10, grammar='root ::= "yes" | "no"')
    assert r.text in ("yes", "no") and r.finish_reason == "eog"
    g = 'root ::= ("yes" | "no") " " [0-9] [0-9]'
    r = client.generate("tiny", "hello", max_tokens=20, temperature=1.0, seed=3, grammar=g)
    assert r.text.split(" ")[0] in ("yes", "no") and r.text[-2:].isdigit(), r.text
    for bad in ('root ::= "yes" | undefined_rule', 'root ::= "unterminated', "nonsense"):
        with pytest.raises(BadRequest, match="invalid grammar"):
            client.generate("tiny", "Answer:", max_tokens=5, grammar=bad)
    # per-sequence grammar through set_grammar + decode
    client.prefill("tiny", 3, client.tokenize("tiny", "q"))
    client.set_grammar("tiny", 3, 'root ::= [0-9] [0-9]? "!"')
    text, last = "", None
    for _ in range(10):
        last = client.decode("tiny", 3)
        if last.eog:
            break
        text += last.piece
    assert last is not None and last.eog, text
    assert text.endswith("!") and text[:-1].isdigit() and 1 <= len(text) <= 3, text
    # an invalid grammar is refused and keeps the sequence's old sampler
    client.seq_clear("tiny", 3)
    client.set_sampling("tiny", 3, temperature=0, logit_bias={300: 100.0})
    with pytest.raises(BadRequest, match="invalid grammar"):
        client.set_grammar("tiny", 3, "root ::= (")
    with pytest.raises(BadRequest):
        client.set_grammar("tiny", 3, json_schema="{not json")
    client.prefill("tiny", 3, client.tokenize("tiny", "hi"))
    assert client.decode("tiny", 3).token == 300
    # a grammar nothing can satisfy ends the decode with reason "grammar"
    client.set_grammar("tiny", 3, "root ::= [\\x00] [a]")
    d = client.decode("tiny", 3)
    assert d.token is None and d.eog and d.reason == "grammar"
    r = greedy(client, "hi", 5, grammar="root ::= [\\x00] [a]")
    assert r.finish_reason == "grammar" and r.tokens == []
    assert client.ping("tiny").pid == pid


def test_json_schema_output_parses_and_matches(client: Client) -> None:
    schema = {"type": "object",
              "properties": {"color": {"enum": ["red", "green", "blue"]},
                             "ok": {"type": "boolean"},
                             "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["color", "ok", "n"], "additionalProperties": False}
    for prompt in ("hello", "JSON:"):
        out = greedy(client, prompt, 80, json_schema=schema)
        assert out.finish_reason == "eog", out
        doc = json.loads(out.text)
        assert set(doc) == {"color", "ok", "n"}
        assert doc["color"] in ("red", "green", "blue") and isinstance(doc["ok"], bool)
        assert isinstance(doc["n"], int) and 0 <= doc["n"] <= 99
    # set_grammar with a schema (given as JSON text)
    client.prefill("tiny", 0, client.tokenize("tiny", "x"))
    client.set_grammar("tiny", 0, json_schema=json.dumps({"type": "boolean"}))
    text = ""
    for _ in range(10):
        d = client.decode("tiny", 0)
        if d.eog:
            break
        text += d.piece
    assert json.loads(text) in (True, False)


# -- LoRA --------------------------------------------------------------------------------------
def test_lora_adapters(client: Client, sup: Supervisor, files: dict[str, Path]) -> None:
    pid = worker_pid(sup, "tiny")
    base = greedy(client, "hello world", 12).tokens
    loaded = client.load_adapter("tiny", "a", str(files["lora"]))
    assert loaded.name == "a" and loaded.extra["architecture"] == "llama"
    assert loaded.path == str(files["lora"]) and loaded.extra["alpha"] == 8.0
    client.load_adapter("tiny", "b", str(files["lora2"]))
    assert client.info("tiny").adapters == {
        "a": {"path": str(files["lora"]), "scale": None},
        "b": {"path": str(files["lora2"]), "scale": None}}
    assert greedy(client, "hello world", 12).tokens == base  # loaded is not active
    active = client.set_adapters("tiny", {"a": 1.0})
    assert active["a"]["scale"] == 1.0 and active["b"]["scale"] is None
    styled = greedy(client, "hello world", 12).tokens
    assert styled != base and greedy(client, "hello world", 12).tokens == styled
    client.set_adapters("tiny", {"b": 1.0})
    other = greedy(client, "hello world", 12).tokens
    assert other not in (base, styled)
    client.set_adapters("tiny", {"a": 1.0, "b": 1.0})
    assert greedy(client, "hello world", 12).tokens not in (base, styled, other)
    client.set_adapters("tiny", {"a": 0.0})
    assert greedy(client, "hello world", 12).tokens == base  # scale 0 is the base model
    # a KV blob computed under an adapter is refused without it
    client.set_adapters("tiny", {"a": 1.0})
    client.prefill("tiny", 0, client.tokenize("tiny", "hello"))
    blob = client.kv_pack("tiny", 0)
    client.set_adapters("tiny", {})
    assert greedy(client, "hello world", 12).tokens == base
    with pytest.raises(BadRequest, match="adapter"):
        client.kv_unpack("tiny", 1, blob)
    # unloading an active adapter removes it from the set first
    client.set_adapters("tiny", {"a": 1.0})
    client.unload_adapter("tiny", "a")
    assert set(client.info("tiny").adapters) == {"b"}
    assert greedy(client, "hello world", 12).tokens == base
    with pytest.raises(NotFound):
        client.unload_adapter("tiny", "a")
    with pytest.raises(NotFound):
        client.set_adapters("tiny", {"a": 1.0})
    with pytest.raises(BadRequest, match="already loaded"):
        client.load_adapter("tiny", "b", str(files["lora2"]))
    # refused adapter files
    with pytest.raises(BadRequest, match="architecture"):
        client.load_adapter("tiny", "x", str(files["lora_arch"]))
    with pytest.raises(BadRequest, match="could not load"):
        client.load_adapter("tiny", "x", str(files["lora_shape"]))
    with pytest.raises(BadRequest, match="not found"):
        client.load_adapter("tiny", "x", str(files["dir"] / "nope.gguf"))
    with pytest.raises(BadRequest, match="not GGUF"):
        client.load_adapter("tiny", "x", str(files["junk"]))
    with pytest.raises(BadRequest, match="directory"):
        client.load_adapter("tiny", "x", str(files["dir"]))
    with pytest.raises(BadRequest, match="not a LoRA"):
        client.load_adapter("tiny", "x", str(files["model"]))
    assert set(client.info("tiny").adapters) == {"b"}
    assert client.ping("tiny").pid == pid


# -- embeddings and chat --------------------------------------------------------------------------
def test_embeddings_are_deterministic_unit_vectors(client: Client) -> None:
    a, b, a2 = client.embed("tiny", ["hello world", "the time", "hello world"])
    assert len(a) == 64 and a == a2 and a != b
    assert math.isclose(sum(x * x for x in a), 1.0, rel_tol=1e-6)
    assert math.isclose(sum(x * x for x in b), 1.0, rel_tol=1e-6)
    assert client.embed("tiny", "hello world") == [a]
    raw = client.embed("tiny", "hello world", normalize=False)[0]
    norm = math.sqrt(sum(x * x for x in raw))
    assert not math.isclose(norm, 1.0, rel_tol=1e-3)
    assert all(math.isclose(x / norm, y, rel_tol=1e-5, abs_tol=1e-7) for x, y in zip(raw, a))
    with pytest.raises(BadRequest, match="limit"):
        client.embed("tiny", "the " * 100)  # more than n_ubatch (64) tokens
    # generation is unaffected by the embedding context
    assert len(greedy(client, "x", 3).tokens) == 3


def test_chat_template_and_chat(client: Client) -> None:
    msgs = [{"role": "user", "content": "Hi"}]
    prompt = client.apply_chat_template("tiny", msgs, system="Be brief.")
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                      "<|im_start|>assistant\n")
    no_think = client.apply_chat_template("tiny", msgs, enable_thinking=False)
    assert no_think == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
                        "<think>\n\n</think>\n\n")
    assert client.apply_chat_template("tiny", msgs, enable_thinking=True) == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert client.apply_chat_template("tiny", msgs, add_generation_prompt=False) == \
        "<|im_start|>user\nHi<|im_end|>\n"
    toks = client.tokenize("tiny", prompt, add_special=False, parse_special=True)
    assert toks[0] == IM_START_ID and toks.count(IM_END_ID) == 2 and BOS_ID not in toks
    r = client.chat("tiny", msgs, system="Be brief.", max_tokens=10, temperature=0)
    ref = client.generate("tiny", tokens=toks, max_tokens=10, temperature=0)
    assert r.tokens == ref.tokens and r.stats.prompt_tokens == len(toks)
    chunks = client.chat_stream("tiny", msgs, system="Be brief.", max_tokens=10, temperature=0)
    assert "".join(chunks) == r.text and chunks.tokens == r.tokens


# -- prefix cache and sessions (the llama backend's seq_truncate / cache_namespace) ---------------
LONG_PROMPT = ("the world is a place where you can see what they have said about the time "
               "and the number of people who would like to write with them on this day")


def test_prefix_cache_hits_give_the_uncached_output(client: Client,
                                                    files: dict[str, Path]) -> None:
    base = client.tokenize("tiny", LONG_PROMPT)
    assert len(base) >= 40  # above cache_min_tokens (32)
    prompts = [base, base, base + [client.tokenize("tiny", " hello", add_special=False)[0]],
               base[:36] + [300, 301, 302], base[:36] + [300, 301, 302]]
    cached = 0
    for toks in prompts:
        ref = client.generate("nocache", tokens=toks, max_tokens=12, temperature=0)
        got = client.generate("tiny", tokens=toks, max_tokens=12, temperature=0)
        assert got.tokens == ref.tokens
        assert ref.stats.cached_tokens == 0
        cached += got.stats.cached_tokens > 0
    assert cached >= 3  # repeated, extended and truncated prefixes were restored
    # a cached prefix is not reused under another adapter set (its namespace differs)
    client.load_adapter("tiny", "a", str(files["lora"]))
    client.load_adapter("nocache", "a", str(files["lora"]))
    try:
        client.set_adapters("tiny", {"a": 1.0})
        client.set_adapters("nocache", {"a": 1.0})
        got = client.generate("tiny", tokens=base, max_tokens=12, temperature=0)
        ref = client.generate("nocache", tokens=base, max_tokens=12, temperature=0)
        assert got.stats.cached_tokens == 0 and got.tokens == ref.tokens
        again = client.generate("tiny", tokens=base, max_tokens=12, temperature=0)
        assert again.stats.cached_tokens > 0 and again.tokens == ref.tokens
    finally:
        client.set_adapters("nocache", {})
        client.unload_adapter("nocache", "a")


def test_session_survives_a_worker_crash(fleet, files: dict[str, Path]) -> None:
    sup = fleet({"tiny": {**OPTS, "path": str(files["model"])},
                 "nocache": {**OPTS, "path": str(files["model"]), "prefix_cache": False},
              # eight slots, for eight concurrent streams
              "eight": {**OPTS, "n_seq_max": 8, "path": str(files["model"]),
                        "prefix_cache": False}})
    with Client(sup.address, timeout=30) as c:
        turn1 = c.tokenize("tiny", LONG_PROMPT)
        r1 = c.generate("tiny", tokens=turn1, max_tokens=8, temperature=0, session="conv")
        assert r1.tokens == c.generate("nocache", tokens=turn1, max_tokens=8,
                                       temperature=0).tokens
        turn2 = turn1 + r1.tokens + c.tokenize("tiny", " what is it", add_special=False)
        ref = c.generate("nocache", tokens=turn2, max_tokens=8, temperature=0)
        pid = worker_pid(sup, "tiny")
        kill(pid)
        wait_for(lambda: any(w["model"] == "tiny" and w["state"] == "ready"
                             and w["pid"] not in (None, pid) for w in sup.status()), timeout=20)
        r2 = c.generate("tiny", tokens=turn2, max_tokens=8, temperature=0, session="conv")
        assert r2.stats.cached_tokens >= len(turn1)
        assert r2.tokens == ref.tokens


# -- cancellation -------------------------------------------------------------------------------
def test_cancel_mid_stream_frees_the_sequence(client: Client) -> None:
    # "long" has a single sequence and room for 65k tokens: the stream runs for many seconds
    stream = client.stream("long", "x", max_tokens=60_000, ignore_eos=True, temperature=0)
    for _ in range(5):
        next(stream)
    t0 = time.monotonic()
    stream.cancel()
    assert list(stream) == []
    r = client.generate("long", "y", max_tokens=3, temperature=0)
    assert r.finish_reason == "length" and len(r.tokens) == 3
    assert time.monotonic() - t0 < 5.0
    wait_for(lambda: next(w for w in client.status() if w["model"] == "long")["inflight"] == 0,
             timeout=5)
    assert client.call("long", "cancel", {"target": 123456789}) == {"cancelled": False}


# -- bad input never kills the worker -------------------------------------------------------------
def test_bad_requests_are_refused_and_the_worker_survives(client: Client,
                                                         sup: Supervisor) -> None:
    pid = worker_pid(sup, "tiny")
    base = greedy(client, "hello", 5).tokens
    # token ids out of range, everywhere a token id goes in
    for bad in (N_VOCAB, 10**9, -1):
        with pytest.raises(BadRequest, match="out of range|token"):
            client.detokenize("tiny", [5, bad])
        with pytest.raises(BadRequest, match="out of range|token"):
            client.generate("tiny", tokens=[1, bad], max_tokens=3)
        with pytest.raises(BadRequest, match="out of range|token"):
            client.prefill("tiny", 0, [5, bad])
    with pytest.raises(BadRequest):
        client.call("tiny", "prefill", {"seq": 0, "tokens": [1.5]})
    with pytest.raises(BadRequest, match="logit_bias"):
        client.generate("tiny", "x", max_tokens=3, logit_bias={9999: 1.0})
    assert client.call("tiny", "kv_pack", {"seq": 0})["n_tokens"] == 0  # nothing was added
    # sequence ids out of range
    for seq in (4, 99):
        with pytest.raises(BadRequest, match="out of range"):
            client.prefill("tiny", seq, [5])
        with pytest.raises(BadRequest, match="out of range"):
            client.decode("tiny", seq)
        with pytest.raises(BadRequest, match="out of range"):
            client.kv_pack("tiny", seq)
        with pytest.raises(BadRequest, match="out of range"):
            client.seq_clear("tiny", seq)
        with pytest.raises(BadRequest, match="out of range"):
            client.set_grammar("tiny", seq, 'root ::= "a"')
        with pytest.raises(BadRequest, match="out of range"):
            client.generate("tiny", "x", seq=seq, max_tokens=2)
    with pytest.raises(BadRequest):
        client.call("tiny", "prefill", {"seq": -1, "tokens": [5]})
    # longer than the context (n_ctx 256)
    with pytest.raises(BadRequest, match="does not fit the context"):
        client.generate("tiny", "the " * 300, max_tokens=5)
    with pytest.raises(BadRequest, match="does not fit the context"):
        client.generate("tiny", tokens=[5] * 256, max_tokens=5)
    with pytest.raises(BadRequest, match="context"):
        client.prefill("tiny", 0, [5] * 257)
    client.prefill("tiny", 0, [5] * 250)
    with pytest.raises(BadRequest, match="context"):
        client.prefill("tiny", 0, [5] * 7)
    r = client.generate("tiny", tokens=[6], seq=0, max_tokens=100, temperature=0)
    assert r.finish_reason == "length" and len(r.tokens) == 5  # capped by the context
    client.seq_clear("tiny", 0)
    # bad sampling values: refused by the client, and by the worker when sent raw
    with pytest.raises(BadRequest):
        client.generate("tiny", "x", temperature=-1)
    raw_bad = [{"temperature": -1}, {"temperature": float("nan")}, {"top_p": 2.0},
               {"top_k": -5}, {"min_p": -0.1}, {"seed": 1 << 40}, {"repeat_last_n": -2},
               {"no_such_knob": 1}, {"temperature": "hot"}, {"grammar": 5},
               {"json_schema": "{nope"}, {"grammar": "root ::= \"a\"", "json_schema": {}},
               {"logit_bias": {"x": 1.0}}]
    for sampling in raw_bad:
        with pytest.raises(BadRequest):
            client.call("tiny", "generate", {"prompt": "x", "max_tokens": 3, "stream": False,
                                             "sampling": sampling})
        with pytest.raises(BadRequest):
            client.call("tiny", "set_sampling", {"seq": 0, "sampling": sampling})
    client.prefill("tiny", 1, [5, 6])
    with pytest.raises(BadRequest):
        client.call("tiny", "decode", {"seq": 1, "sampling": {"top_p": -3}})
    # malformed commands
    with pytest.raises(BadRequest, match="unknown command"):
        client.call("tiny", "format_disk", {})
    with pytest.raises(BadRequest, match="missing argument"):
        client.call("tiny", "prefill", {"seq": 0})
    with pytest.raises(BadRequest, match="empty"):
        client.prefill("tiny", 0, [])
    with pytest.raises(BadRequest):
        client.generate("tiny", tokens=[], max_tokens=3)
    with pytest.raises(BadRequest):
        client.call("tiny", "apply_chat_template", {"messages": [{"content": "no role"}]})
    # the same process is still serving, with the same answers
    assert client.ping("tiny").pid == pid == worker_pid(sup, "tiny")
    assert greedy(client, "hello", 5).tokens == base
    w = next(w for w in client.status() if w["model"] == "tiny")
    assert w["state"] == "ready" and w["restarts"] == 0 and w["last_exit"] is None


# -- process failures -----------------------------------------------------------------------------
def test_unloadable_model_files_fail_fast_with_the_reason(fleet, files: dict[str, Path]) -> None:
    t0 = time.monotonic()
    sup = fleet({"junk": {**OPTS, "path": str(files["junk"])},
                 "missing": {**OPTS, "path": str(files["dir"] / "missing.gguf")},
                 "trunc": {**OPTS, "path": str(files["trunc"])},
                 "dir": {**OPTS, "path": str(files["dir"])},
                 "good": {**OPTS, "path": str(files["model"])}}, wait=False)
    bad = ("junk", "missing", "trunc", "dir")
    wait_for(lambda: all(w["state"] == "failed" for w in sup.status() if w["model"] in bad),
             timeout=20)
    assert time.monotonic() - t0 < 10
    st = {w["model"]: w for w in sup.status()}
    for name, why in (("junk", "not GGUF"), ("missing", "not found"),
                      ("trunc", "could not load"), ("dir", "directory")):
        w = st[name]
        assert w["restarts"] == 0 and w["pid"] is None, w
        assert "load failed" in w["last_exit"] and why in w["last_exit"], w["last_exit"]
    sup.wait_ready(models=["good"], timeout=30)
    with Client(sup.address, timeout=30) as c:
        assert len(c.generate("good", "hi", max_tokens=3, temperature=0).tokens) == 3
        with pytest.raises(WorkerFailed, match="not GGUF") as info:
            c.ping("junk")
        assert not info.value.retryable and info.value.data["state"] == "failed"


def test_sigkill_mid_stream_gives_worker_crashed_then_serves_again(fleet,
                                                                  files: dict[str, Path]) -> None:
    sup = fleet({"long": {**LONG_OPTS, "path": str(files["long"])}})
    with Client(sup.address, timeout=30, resume=False) as c:
        before = c.generate("long", "abc", max_tokens=8, temperature=0)
        stream = c.stream("long", "abc", max_tokens=60_000, ignore_eos=True, temperature=0)
        for _ in range(3):
            next(stream)
        pid = worker_pid(sup, "long")
        kill(pid)
        t0 = time.monotonic()
        with pytest.raises(WorkerCrashed) as info:
            for _ in stream:
                pass
        assert time.monotonic() - t0 < 2.0
        assert info.value.retryable
        n = min(len(stream.tokens), 8)
        assert n >= 3 and stream.tokens[:n] == before.tokens[:n]
        # the same client reaches the restarted worker, which answers the same
        after = c.generate("long", "abc", max_tokens=8, temperature=0)
        assert after.tokens == before.tokens
        w = wait_for(lambda: next((w for w in c.status() if w["state"] == "ready"), None))
        assert w["restarts"] == 1 and w["pid"] != pid and not pid_alive(pid)
        assert w["last_exit"].startswith("killed by SIGKILL")


def test_shutdown_command_stops_the_fleet(fleet, files: dict[str, Path]) -> None:
    sup = fleet({"tiny": {**OPTS, "path": str(files["model"])}})
    pid = worker_pid(sup, "tiny")
    with Client(sup.address, timeout=30) as c:
        assert c.ping("tiny").pid == pid
        c.shutdown_fleet()
    wait_for(lambda: sup.status()[0]["state"] == "stopped", timeout=15)
    wait_for(lambda: not pid_alive(pid), timeout=5)
