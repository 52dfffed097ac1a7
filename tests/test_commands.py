"""Every protocol command round-trips through supervisor, worker and client (fake backend)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from llamafleet.client import Client
from llamafleet.runtime.errors import BadRequest, NotFound, NotSupported, ProtocolError

MODELS = {"tiny": {"backend": "fake", "n_seq_max": 4},
          "bare": {"backend": "llamafleet.testing.minimal_backend:MinimalBackend"}}


@pytest.fixture
def client(fleet, tmp_path: Path) -> Client:
    models = {**MODELS, "tiny": {**MODELS["tiny"], "adapter_dirs": [str(tmp_path)]}}
    sup = fleet(models)
    with Client(sup.address, timeout=30) as c:
        yield c


def greedy(c: Client, prompt: str, n: int = 12, **kw) -> str:
    return c.generate("tiny", prompt, max_tokens=n, temperature=0, **kw).text


def test_ping_info_and_status(client: Client) -> None:
    pong = client.ping("tiny")
    assert pong.pong is True and pong.model == "tiny" and pong.pid > 0
    info = client.info("tiny")
    assert info.backend == "fake" and info.n_seq_max == 4 and info.n_vocab == 260
    assert info.chat_template
    states = {w["model"]: w for w in client.status()}
    assert states["tiny"]["state"] == "ready" and states["tiny"]["pid"] == pong.pid
    assert states["tiny"]["restarts"] == 0 and states["tiny"]["last_exit"] is None


def test_tokenize_detokenize_round_trip(client: Client) -> None:
    text = "héllo wörld ✓"
    toks = client.tokenize("tiny", text)
    assert toks[0] == 0  # BOS
    assert client.detokenize("tiny", toks) == text
    assert client.tokenize("tiny", text, add_special=False) == toks[1:]
    special = client.tokenize("tiny", "<|im_start|>x", add_special=False, parse_special=True)
    assert special == [258, 2 + ord("x")]


def test_generate_is_deterministic_and_streams_the_same_text(client: Client) -> None:
    a = client.generate("tiny", "Once upon", max_tokens=16, temperature=0)
    b = client.generate("tiny", "Once upon", max_tokens=16, temperature=0)
    assert a.tokens == b.tokens and a.text == b.text
    assert a.finish_reason in ("length", "eog")
    assert a.stats.prompt_tokens == len(client.tokenize("tiny", "Once upon"))
    assert a.stats.generated_tokens == len(a.tokens)
    stream = client.stream("tiny", "Once upon", max_tokens=16, temperature=0)
    pieces = list(stream)
    assert "".join(pieces) == a.text
    assert stream.result is not None and stream.result.tokens == a.tokens
    assert stream.tokens == a.tokens
    # other prompts, other outputs; seeded sampling is reproducible
    assert greedy(client, "Something else entirely") != a.text or a.text == ""
    s1 = client.generate("tiny", "x", max_tokens=20, temperature=1.0, seed=7)
    s2 = client.generate("tiny", "x", max_tokens=20, temperature=1.0, seed=7)
    assert s1.tokens == s2.tokens


def test_stop_strings_and_max_tokens(client: Client) -> None:
    full = client.generate("tiny", "abc", max_tokens=40, temperature=0, ignore_eos=True)
    assert len(full.tokens) == 40 and full.finish_reason == "length"
    stop = full.text[10:12]
    cut = client.generate("tiny", "abc", max_tokens=40, temperature=0, ignore_eos=True,
                          stop=[stop])
    assert cut.finish_reason == "stop" and cut.stop == stop
    assert cut.text == full.text[:full.text.index(stop)]
    assert stop not in "".join(client.stream("tiny", "abc", max_tokens=40, temperature=0,
                                             ignore_eos=True, stop=[stop]))


def test_prefill_decode_and_kv_round_trip(client: Client) -> None:
    toks = client.tokenize("tiny", "The cat")
    assert client.prefill("tiny", 1, toks) == len(toks)
    client.set_sampling("tiny", 1, temperature=0)
    first = [client.decode("tiny", 1) for _ in range(3)]
    assert all(d.token is not None for d in first)
    blob = client.kv_pack("tiny", 1)
    assert isinstance(blob, bytes) and len(blob) > 0
    rest = [client.decode("tiny", 1).token for _ in range(5)]
    # restore into another sequence: the continuation is identical
    assert client.kv_unpack("tiny", 2, blob) == len(toks) + 3
    client.set_sampling("tiny", 2, temperature=0)
    assert [client.decode("tiny", 2).token for _ in range(5)] == rest
    # generate can continue an existing sequence
    cont = client.generate("tiny", tokens=[], seq=2, max_tokens=3, temperature=0)
    assert cont.seq == 2 and len(cont.tokens) == 3
    client.seq_clear("tiny", 1)
    with pytest.raises(BadRequest, match="no logits"):
        client.decode("tiny", 1)
    with pytest.raises(BadRequest, match="checksum|truncated"):
        client.kv_unpack("tiny", 3, blob[:-1] + bytes([blob[-1] ^ 1]))


def test_grammar_constrains_and_bad_grammar_fails_closed(client: Client) -> None:
    r = client.generate("tiny", "Answer:", max_tokens=10, temperature=0,
                        grammar='root ::= "yes" | "no"')
    assert r.text in ("yes", "no")
    with pytest.raises(BadRequest, match="invalid grammar"):
        client.generate("tiny", "Answer:", grammar='root ::= "yes" | undefined_rule')
    schema = {"type": "object", "properties": {"n": {"type": "integer"},
                                               "ok": {"type": "boolean"}},
              "required": ["n", "ok"]}
    out = client.generate("tiny", "JSON:", max_tokens=64, temperature=0, json_schema=schema)
    doc = json.loads(out.text)
    assert isinstance(doc["n"], int) and isinstance(doc["ok"], bool)
    # per-sequence grammar through set_grammar + decode
    client.prefill("tiny", 3, client.tokenize("tiny", "q"))
    client.set_grammar("tiny", 3, 'root ::= [0-9]+ "!"')
    text = ""
    for _ in range(20):
        d = client.decode("tiny", 3)
        if d.eog:
            break
        text += d.piece
    assert text.endswith("!") and text[:-1].isdigit()
    with pytest.raises(BadRequest):
        client.set_grammar("tiny", 3, "root ::= (")
    assert client.ping("tiny").pong


def test_adapters_change_output_by_name_and_scale(client: Client, tmp_path: Path) -> None:
    base = greedy(client, "hello", 20)
    f = tmp_path / "a.gguf"
    f.write_bytes(b"GGUF")
    client.load_adapter("tiny", "style", str(f))
    client.load_adapter("tiny", "other", str(f))
    active = client.set_adapters("tiny", {"style": 1.0})
    assert active["style"]["scale"] == 1.0 and active["other"]["scale"] is None
    styled = greedy(client, "hello", 20)
    assert styled != base and greedy(client, "hello", 20) == styled
    client.set_adapters("tiny", {"style": 0.5})
    assert greedy(client, "hello", 20) not in (base, styled)
    client.set_adapters("tiny", {"other": 1.0})
    assert greedy(client, "hello", 20) != styled
    client.set_adapters("tiny", {})
    assert greedy(client, "hello", 20) == base
    with pytest.raises(NotFound):
        client.set_adapters("tiny", {"missing": 1.0})
    with pytest.raises(BadRequest, match="does not exist"):
        client.load_adapter("tiny", "x", str(tmp_path / "nope.gguf"))
    client.unload_adapter("tiny", "style")
    with pytest.raises(NotFound):
        client.unload_adapter("tiny", "style")
    # paths from requests are confined to adapter_dirs: traversal and symlinks refused
    outside = tmp_path.parent / f"{tmp_path.name}-outside.gguf"
    outside.write_bytes(b"GGUF")
    (tmp_path / "link.gguf").symlink_to(outside)
    for bad in (str(outside), str(tmp_path / ".." / outside.name), str(tmp_path / "link.gguf"),
                "/etc/passwd"):
        with pytest.raises(BadRequest, match="outside the allowed"):
            client.load_adapter("tiny", "evil", bad)
    outside.unlink()
    import os
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)  # opening it would block the worker forever
    with pytest.raises(BadRequest, match="not a regular file"):
        client.load_adapter("tiny", "fifo", str(fifo))
    assert client.ping("tiny").pong
    assert set(client.info("tiny").adapters) == {"other"}


def test_embeddings_are_deterministic_unit_vectors(client: Client) -> None:
    a, b, a2 = client.embed("tiny", ["alpha", "beta", "alpha"])
    assert a == a2 and a != b
    assert math.isclose(sum(x * x for x in a), 1.0, rel_tol=1e-9)
    raw = client.embed("tiny", "alpha", normalize=False)[0]
    assert not math.isclose(sum(x * x for x in raw), 1.0, rel_tol=1e-3)


def test_chat_template_and_chat(client: Client) -> None:
    prompt = client.apply_chat_template("tiny", [{"role": "user", "content": "Hi"}],
                                        system="Be brief.")
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                      "<|im_start|>assistant\n")
    no_think = client.apply_chat_template("tiny", [{"role": "user", "content": "Hi"}],
                                          enable_thinking=False)
    assert no_think.endswith("<think>\n\n</think>\n\n")
    r = client.chat("tiny", [{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0)
    assert r.tokens == client.generate("tiny", tokens=client.tokenize(
        "tiny", prompt.replace("<|im_start|>system\nBe brief.<|im_end|>\n", ""),
        add_special=False, parse_special=True), max_tokens=8, temperature=0).tokens


def test_cancel_a_stream_frees_its_sequence(fleet) -> None:
    sup = fleet({"slow": {"backend": "fake", "n_seq_max": 1, "token_delay": 0.02}})
    with Client(sup.address, timeout=30) as c:
        stream = c.stream("slow", "x", max_tokens=60_000, ignore_eos=True, temperature=0)
        next(stream)
        stream.cancel()
        # the only sequence is free again: a new request runs at once
        assert c.generate("slow", "y", max_tokens=2, temperature=0).finish_reason == "length"


def test_bad_requests_are_typed_and_the_worker_keeps_serving(client: Client) -> None:
    with pytest.raises(BadRequest, match="out of range"):
        client.detokenize("tiny", [999_999])
    with pytest.raises(BadRequest, match="sequence 9 out of range"):
        client.prefill("tiny", 9, [1, 2])
    with pytest.raises(BadRequest, match="type str"):
        client.call("tiny", "tokenize", {"text": "x", "add_special": "yes"})
    with pytest.raises(BadRequest, match="missing argument"):
        client.call("tiny", "prefill", {"seq": 0})
    with pytest.raises(BadRequest, match="unknown command"):
        client.call("tiny", "format_disk", {})
    with pytest.raises(BadRequest, match="unknown argument"):
        client.call("tiny", "ping", {"evil": 1})
    with pytest.raises(BadRequest, match="does not fit the context"):
        client.generate("tiny", "x" * 5000)
    with pytest.raises(BadRequest):
        client.generate("tiny", "x", temperature=-1)
    with pytest.raises(TypeError):
        client.generate("tiny", "x", no_such_knob=1)
    with pytest.raises(NotFound, match="no model named"):
        client.ping("nope")
    # what msgpack cannot carry (found by the long fuzz run) is refused on the client side
    with pytest.raises(BadRequest, match="cannot be encoded"):
        client.call("tiny", "set_sampling", {"seq": 0, "sampling": {"logit_bias": {10**30: 0.0}}})
    assert not any(conn.calls for conn in client._async._connections())  # nothing left behind
    assert client.ping("tiny").pong


def test_missing_features_answer_not_supported(client: Client, tmp_path: Path) -> None:
    for call in (lambda: client.kv_pack("bare", 0),
                 lambda: client.embed("bare", "x"),
                 lambda: client.load_adapter("bare", "a", str(tmp_path)),
                 lambda: client.apply_chat_template("bare", [{"role": "user", "content": "x"}])):
        with pytest.raises(NotSupported):
            call()
    assert client.generate("bare", "ok", max_tokens=3, temperature=0).tokens


def test_raw_garbage_gets_a_protocol_error(fleet) -> None:
    import zmq

    from llamafleet.runtime import protocol
    sup = fleet({"tiny": {"backend": "fake"}})
    endpoint = sup.status()[0]["endpoint"]
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(endpoint)
    try:
        s.send(b"\xc1 definitely not msgpack")
        assert s.poll(5000)
        msg = protocol.unpack(s.recv())
        assert msg["kind"] == "error" and msg["error"]["code"] == ProtocolError.code
        s.send(protocol.pack({"v": 99, "id": 1, "cmd": "ping"}))
        assert s.poll(5000)
        assert protocol.unpack(s.recv())["error"]["code"] == "protocol_error"
        s.send(protocol.request(5, "ping"))
        assert s.poll(5000)
        assert protocol.unpack(s.recv())["result"]["pong"] is True
    finally:
        s.close(0)
        ctx.term()


def test_tcp_transport(fleet) -> None:
    sup = fleet({"tiny": {"backend": "fake"}}, transport="tcp",
                address="tcp://127.0.0.1:*", insecure_tcp=True)
    assert sup.address.startswith("tcp://127.0.0.1:")
    assert sup.status()[0]["endpoint"].startswith("tcp://127.0.0.1:")
    with Client(sup.address, timeout=30) as c:
        r = c.generate("tiny", "hi", max_tokens=5, temperature=0)
        assert len(r.tokens) == 5
        assert "".join(c.stream("tiny", "hi", max_tokens=5, temperature=0)) == r.text


def test_model_sampling_defaults_and_request_values_win(fleet) -> None:
    sup = fleet({"cold": {"backend": "fake", "sampling": {"temperature": 0.0}},
                 "warm": {"backend": "fake"}})
    with Client(sup.address, timeout=30) as c:
        assert c.info("cold").sampling == {"temperature": 0.0}
        assert c.info("warm").sampling == {}
        # the model's default makes an unparameterised request greedy ...
        greedy_text = c.generate("warm", "Once upon", max_tokens=24, temperature=0).text
        assert [c.generate("cold", "Once upon", max_tokens=24).text
                for _ in range(2)] == [greedy_text] * 2
        # ... and a request's own values override it
        hot = {c.generate("cold", "Once upon", max_tokens=24, temperature=1.5, seed=s).text
               for s in range(4)}
        assert hot != {greedy_text}
        # the stream path uses the same defaults
        assert "".join(c.stream("cold", "Once upon", max_tokens=24)) == greedy_text


def test_every_reply_field_is_an_attribute(fleet, short_dir: Path) -> None:
    sup = fleet({"tiny": {"backend": "fake", "cache_min_tokens": 4,
                          "cache_dir": str(short_dir / "cache")},
                 "nocache": {"backend": "fake", "prefix_cache": False}})
    prompt = "a shared prompt that is long enough to be worth caching"
    with Client(sup.address, timeout=30) as c:
        first = c.generate("tiny", prompt, max_tokens=6, temperature=0, session="s1")
        assert first.session == "s1" and first.session_saved is True
        assert first.session_error is None and first.model == "tiny"
        assert first.cache is None and first.stats.cached_tokens == 0
        again = c.generate("tiny", prompt, max_tokens=6, temperature=0)
        assert again.cache == "ram" and again.stats.cached_tokens > 0
        assert again.session is None and again.session_saved is None
        unsaved = c.generate("nocache", prompt, max_tokens=4, session="s2")
        assert unsaved.session_saved is False and "prefix_cache" in (unsaved.session_error or "")
        # the stream's result carries the same fields
        s = c.stream("tiny", prompt, max_tokens=6, temperature=0, session="s3")
        done = s.collect()
        assert done.session == "s3" and done.session_saved is True
        assert done.stats.generated_tokens == len(done.tokens)
        info = c.info("tiny")
        assert info.scheduler is not None and info.scheduler.max_queue == 64
        assert info.cache is not None and info.cache["ram_entries"] >= 1


def test_model_defaults_reach_caller_sequences_and_constraints(fleet) -> None:
    grammar = 'root ::= "yes" | "no"'
    sup = fleet({"cold": {"backend": "fake", "sampling": {"temperature": 0.0}},
                 "yesno": {"backend": "fake", "sampling": {"grammar": grammar}}})
    with Client(sup.address, timeout=30) as c:
        # prefill + decode with no sampling of its own samples with the model's defaults
        toks = c.tokenize("cold", "Once upon")
        greedy_tokens = c.generate("cold", tokens=toks, max_tokens=8, ignore_eos=True).tokens
        c.prefill("cold", 0, toks)
        assert [c.decode("cold", 0).token for _ in range(8)] == greedy_tokens
        c.seq_clear("cold", 0)  # after a clear the defaults apply again
        c.prefill("cold", 0, toks)
        assert c.decode("cold", 0).token == greedy_tokens[0]
        # a default grammar constrains; a request's own json_schema replaces it
        assert c.generate("yesno", "Answer:", max_tokens=8).text in ("yes", "no")
        r = c.generate("yesno", "Answer:", max_tokens=40, json_schema={"type": "boolean"})
        assert json.loads(r.text) in (True, False)  # JSON: whitespace may follow
