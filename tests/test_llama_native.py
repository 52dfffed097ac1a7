"""The owner classes of backends/llama/native.py: each native handle freed exactly once."""

from __future__ import annotations

import gc
import pathlib

import pytest

from llamafleet.runtime.sampling import SamplingParams

pytestmark = pytest.mark.llama

try:
    from llamafleet.backends.llama import binding
    binding.lib()
except Exception as exc:  # noqa: BLE001
    pytest.skip(f"libllama not available: {exc}", allow_module_level=True)

from llamafleet.backends.llama import native  # noqa: E402
from llamafleet.backends.llama.backend import LlamaBackend  # noqa: E402
from llamafleet.testing.tiny_gguf import TinyModelSpec, write_lora_adapter, write_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    d = tmp_path_factory.mktemp("native")
    return {"model": write_tiny_model(d / "tiny.gguf"),
            "lora": write_lora_adapter(d / "lora.gguf", TinyModelSpec())}


def _model(path: pathlib.Path) -> native.LlamaModel:
    ffi, lib = binding.lib()
    return native.LlamaModel.load(ffi, lib, str(path), n_gpu_layers=0, load_mode=-1)


def _context(model: native.LlamaModel) -> native.LlamaContext:
    return native.LlamaContext(model, n_ctx=512, n_batch=32, n_ubatch=32, n_seq_max=2,
                               n_threads=1, n_threads_batch=1, flash_attn=-1,
                               abort=native.AbortFlag(model.ffi))


def test_model_closes_its_dependents_first(files: dict[str, pathlib.Path]) -> None:
    model = _model(files["model"])
    ctx = _context(model)
    adapter = native.LlamaAdapter(model, str(files["lora"]))
    grammar = native.LlamaSampler.grammar(model, 'root ::= "a"')
    assert not any(o.closed for o in (model, ctx, adapter, grammar))
    model.close()
    assert all(o.closed for o in (model, ctx, adapter, grammar))
    for o in (model, ctx, adapter, grammar):  # idempotent
        o.close()


def test_finalizers_in_any_order(files: dict[str, pathlib.Path]) -> None:
    model = _model(files["model"])
    ctx = _context(model)
    chain = native.LlamaSampler.chain(model.ffi, model.lib)
    chain.add_top_k(5)
    chain.add_dist(1)
    del model  # the context keeps its model alive
    gc.collect()
    assert not ctx.closed
    del ctx, chain
    gc.collect()


def test_null_handles_raise(files: dict[str, pathlib.Path]) -> None:
    model = _model(files["model"])
    try:
        with pytest.raises(native.NullHandle):
            native.LlamaSampler.grammar(model, "this is not gbnf")
        with pytest.raises(native.NullHandle):
            native.LlamaAdapter(model, str(files["model"]))  # a model, not an adapter
    finally:
        model.close()


def test_decode_through_the_owners(files: dict[str, pathlib.Path]) -> None:
    model = _model(files["model"])
    try:
        ctx = _context(model)
        batch = native.LlamaBatch(model.ffi, ctx.n_batch)
        history: list[list[int]] = [[], [7, 8]]
        n, outs = batch.fill_small([(0, [5, 6]), (1, [9])], history)
        assert (n, outs) == (3, [(0, 0, 1), (1, 0, 2)])  # (seq, output 0, batch index)
        assert list(batch.np_pos[:3]) == [0, 1, 2] and list(batch.np_logits[:3]) == [0, 1, 1]
        n, outs = batch.fill_small([(0, [5, 6]), (1, [9])], [[], []])
        assert ctx.decode(batch, n) == 0
        row = ctx.logits_ith(outs[0][2])
        assert row is not None and row.shape == (model.n_vocab,)
        assert ctx.seq_pos_max(0) == 1 and ctx.seq_pos_max(1) == 0
        blob = ctx.state_seq_get(0)
        assert ctx.seq_rm(0) and ctx.seq_pos_max(0) == -1
        assert ctx.state_seq_set(0, blob) and ctx.seq_pos_max(0) == 1
    finally:
        model.close()


def test_backend_close_frees_everything(files: dict[str, pathlib.Path]) -> None:
    b = LlamaBackend({"path": str(files["model"]), "n_ctx": 128, "n_seq_max": 2,
                      "n_batch": 32, "n_ubatch": 32, "n_threads": 1, "embeddings": True})
    b.load()
    b.load_adapter("a", str(files["lora"]))
    b.set_adapters({"a": 0.5})
    b.set_sampling(0, SamplingParams(grammar='root ::= "a"'))
    b.evaluate([(0, [1, 300])])
    assert b.sample(0) is not None
    owners = [b.model, b.ctx, b._embed_ctx, b._lora.loaded["a"]["handle"],
              b._samplers[0].grammar]  # type: ignore[union-attr]
    b.close()
    assert all(o is not None and o.closed for o in owners)
    b.close()
    assert b.adapters() == {}
    b.abort(True)  # harmless after close
