"""Tests of the tiny GGUF generator (llamafleet/testing/tiny_gguf.py).

The llama-marked tests load the generated files with llama-cpp-python's own API, the peer
reference, to prove that llama.cpp accepts them; they are skipped if it is not installed.
"""

from __future__ import annotations

import time

import pytest

gguf = pytest.importorskip("gguf")

from llamafleet.testing.tiny_gguf import (  # noqa: E402 - after the importorskip
    BOS_ID,
    BYTE_BASE_ID,
    CHATML_TEMPLATE,
    EOS_ID,
    IM_END_ID,
    IM_START_ID,
    N_VOCAB,
    SPM_SPACE,
    TinyModelSpec,
    tiny_vocab,
    write_lora_adapter,
    write_tiny_model,
)

# ---------------------------------------------------------------- generator only (no llama.cpp)


def test_same_spec_writes_identical_bytes(tmp_path):
    spec = TinyModelSpec(seed=3)
    a = write_tiny_model(tmp_path / "a.gguf", spec).read_bytes()
    b = write_tiny_model(tmp_path / "b.gguf", TinyModelSpec(seed=3)).read_bytes()
    assert a == b
    c = write_tiny_model(tmp_path / "c.gguf", TinyModelSpec(seed=4)).read_bytes()
    assert c != a and len(c) == len(a)

    la = write_lora_adapter(tmp_path / "la.gguf", spec).read_bytes()
    lb = write_lora_adapter(tmp_path / "lb.gguf", spec).read_bytes()
    assert la == lb


def test_writing_is_fast(tmp_path):
    t0 = time.perf_counter()
    write_tiny_model(tmp_path / "m.gguf")
    write_lora_adapter(tmp_path / "l.gguf")
    assert time.perf_counter() - t0 < 1.0


def test_vocab_layout():
    tokens, scores, types = tiny_vocab()
    T = gguf.TokenType
    assert len(tokens) == len(scores) == len(types) == N_VOCAB
    assert len(set(tokens)) == N_VOCAB
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and BOS_ID == 1
    assert tokens[BYTE_BASE_ID:BYTE_BASE_ID + 256] == [f"<0x{b:02X}>" for b in range(256)]
    assert all(t == T.BYTE for t in types[BYTE_BASE_ID:BYTE_BASE_ID + 256])
    assert tokens[IM_START_ID] == "<|im_start|>" and types[IM_START_ID] == T.CONTROL
    assert tokens[IM_END_ID] == "<|im_end|>" and types[IM_END_ID] == T.CONTROL
    assert EOS_ID == IM_END_ID

    normal = {tok: s for tok, s, ty in zip(tokens, scores, types) if ty == T.NORMAL}
    assert SPM_SPACE in normal and all(chr(c) in normal for c in range(0x21, 0x7F))
    assert {SPM_SPACE + "the", SPM_SPACE + "hello", SPM_SPACE + "world", "ing"} <= normal.keys()
    # SPM merges adjacent symbols only into pieces of the vocab: every piece must be
    # reachable through its prefixes, and longer pieces must score higher.
    for tok, s in normal.items():
        if len(tok) > 1:
            assert tok[:-1] in normal, tok
            assert s > normal[tok[:-1]], tok


def test_file_contents(tmp_path):
    spec = TinyModelSpec()
    r = gguf.GGUFReader(write_tiny_model(tmp_path / "m.gguf", spec))
    f = r.fields
    assert f["general.architecture"].contents() == "llama"
    assert f["general.name"].contents() == spec.name
    assert f["tokenizer.ggml.model"].contents() == "llama"
    assert f["tokenizer.chat_template"].contents() == CHATML_TEMPLATE
    assert f["tokenizer.ggml.eos_token_id"].contents() == IM_END_ID
    assert f["tokenizer.ggml.add_bos_token"].contents() is True
    assert f["llama.rope.dimension_count"].contents() == spec.n_embd // spec.n_head
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}  # ggml ne order
    assert shapes["token_embd.weight"] == (spec.n_embd, N_VOCAB)
    assert shapes["output.weight"] == (spec.n_embd, N_VOCAB)
    assert shapes["blk.1.attn_k.weight"] == (spec.n_embd, spec.n_head_kv * 16)
    assert shapes["blk.1.ffn_down.weight"] == (spec.n_ff, spec.n_embd)
    assert len(shapes) == 3 + 9 * spec.n_layer

    no_template = gguf.GGUFReader(
        write_tiny_model(tmp_path / "n.gguf", TinyModelSpec(chat_template=None))
    )
    assert "tokenizer.chat_template" not in no_template.fields

    a = gguf.GGUFReader(write_lora_adapter(tmp_path / "l.gguf", spec, rank=4, arch="qwen2"))
    assert a.fields["general.type"].contents() == "adapter"
    assert a.fields["adapter.type"].contents() == "lora"
    assert a.fields["adapter.lora.alpha"].contents() == pytest.approx(8.0)
    assert a.fields["general.architecture"].contents() == "qwen2"
    lshapes = {t.name: tuple(int(x) for x in t.shape) for t in a.tensors}
    assert lshapes["blk.0.attn_v.weight.lora_a"] == (spec.n_embd, 4)  # ne [n_in, r]
    assert lshapes["blk.0.attn_v.weight.lora_b"] == (4, spec.n_head_kv * 16)  # ne [r, n_out]
    assert lshapes["blk.1.ffn_up.weight.lora_b"] == (4, spec.n_ff)
    assert len(lshapes) == 2 * 3 * spec.n_layer


def test_chat_template_renders():
    jinja2 = pytest.importorskip("jinja2")
    tpl = jinja2.Environment().from_string(CHATML_TEMPLATE)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    base = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    assert tpl.render(messages=msgs) == base
    assert tpl.render(messages=msgs, add_generation_prompt=True) == base + "<|im_start|>assistant\n"
    assert tpl.render(messages=msgs, add_generation_prompt=True, enable_thinking=True) == (
        base + "<|im_start|>assistant\n"
    )
    assert tpl.render(messages=msgs, add_generation_prompt=True, enable_thinking=False) == (
        base + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


# ---------------------------------------------------------------- loaded by llama.cpp


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    spec = TinyModelSpec()
    return {
        "model": str(write_tiny_model(d / "model.gguf", spec)),
        "lora": str(write_lora_adapter(d / "lora.gguf", spec)),
        "lora_qwen2": str(write_lora_adapter(d / "lora_qwen2.gguf", spec, arch="qwen2")),
        "eos_model": str(write_tiny_model(d / "eos.gguf", TinyModelSpec(eos_after="."))),
    }


@pytest.fixture(scope="module")
def llm(llama_cpp, files):
    m = llama_cpp.Llama(model_path=files["model"], n_ctx=256, n_threads=2, verbose=False)
    yield m
    m.close()


def greedy(m, prompt: str, n: int = 16) -> list[int]:
    m.reset()
    out: list[int] = []
    for tok in m.generate(m.tokenize(prompt.encode()), temp=0.0, top_k=1):
        out.append(tok)
        if len(out) >= n or tok == EOS_ID:
            break
    return out


@pytest.mark.llama
def test_llama_cpp_loads_and_tokenizes(llm, llama_cpp):
    assert llm.n_vocab() == N_VOCAB
    assert llm.token_bos() == BOS_ID
    assert llm.token_eos() == IM_END_ID
    vocab = llm._model.vocab
    assert llama_cpp.llama_vocab_is_eog(vocab, IM_END_ID)
    assert not llama_cpp.llama_vocab_is_eog(vocab, IM_START_ID)

    ids = llm.tokenize(b"hello world")
    assert ids[0] == BOS_ID
    assert all(0 <= i < N_VOCAB for i in ids)
    assert [llm._model.token_get_text(i) for i in ids[1:]] == ["▁hello", "▁world"]
    assert llm.detokenize(ids) == b"hello world"

    # Newlines and non-ASCII text go through the byte tokens and still round-trip.
    text = "The thing is: naïve\ncafé, 10% off!".encode()
    ids = llm.tokenize(text)
    assert any(BYTE_BASE_ID <= i < BYTE_BASE_ID + 256 for i in ids)
    assert any(len(llm._model.token_get_text(i)) > 2 for i in ids)  # some word pieces
    assert llm.detokenize(ids) == text

    # The chat tokens are single control tokens when special tokens are parsed.
    ids = llm.tokenize(b"<|im_start|>user\nhi<|im_end|>", add_bos=False, special=True)
    assert ids[0] == IM_START_ID and ids[-1] == IM_END_ID


@pytest.mark.llama
def test_llama_cpp_generates(llm):
    a = greedy(llm, "hello world")
    b = greedy(llm, "the cat sat on the mat")
    assert len(a) == 16 and len(set(a)) > 1
    assert all(0 <= t < N_VOCAB for t in a + b)
    assert a != b
    assert greedy(llm, "hello world") == a  # greedy is deterministic


@pytest.mark.llama
def test_llama_cpp_sees_chat_template(llm):
    assert llm.metadata["tokenizer.chat_template"] == CHATML_TEMPLATE
    assert llm.metadata["general.name"] == "tiny-llama"


@pytest.mark.llama
def test_lora_adapter_changes_greedy_output(llama_cpp, files, llm):
    with_lora = llama_cpp.Llama(
        model_path=files["model"], lora_path=files["lora"], n_ctx=256, n_threads=2,
        verbose=False,
    )
    try:
        for prompt in ("hello world", "the cat sat on the mat"):
            assert greedy(with_lora, prompt) != greedy(llm, prompt)
    finally:
        with_lora.close()


@pytest.mark.llama
def test_adapter_for_another_architecture_is_refused(llama_cpp, files, llm):
    # llama.cpp logs "failed to apply lora adapter: model arch and LoRA arch mismatch" and
    # llama_adapter_lora_init returns NULL.  (llama-cpp-python's Llama(lora_path=...) does
    # not notice the NULL: it raises nothing and the first decode segfaults, so the check is
    # made on the C call.)
    model = llm._model.model
    bad = llama_cpp.llama_adapter_lora_init(model, files["lora_qwen2"].encode())
    assert not bad
    good = llama_cpp.llama_adapter_lora_init(model, files["lora"].encode())
    assert good
    llama_cpp.llama_adapter_lora_free(good)


@pytest.mark.llama
def test_eos_after_option_stops_generation(llama_cpp, files):
    m = llama_cpp.Llama(model_path=files["eos_model"], n_ctx=256, n_threads=2, verbose=False)
    try:
        for prompt in ("the cat sat.", "I like it. It is good."):
            assert greedy(m, prompt) == [EOS_ID]
        assert EOS_ID not in greedy(m, "hello world")
    finally:
        m.close()
