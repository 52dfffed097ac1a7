"""The llama backend's ``batch_invariant`` option: a token's logits and KV come out
bit for bit the same however it was batched, so greedy output does not depend on
the prefix cache, on other sequences in the batch or on speculative decoding.

Without the option llama.cpp's CPU kernels make these differ on SmolLM2 (a lone
token, flash attention at long contexts, a KV split per sequence; see
docs/benchmarks.md); the bench's grounded prompt is one where that changed text."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from llamafleet.runtime.config import ConfigError, default_model_path
from llamafleet.runtime.errors import BadRequest
from llamafleet.runtime.sampling import SamplingParams

pytestmark = pytest.mark.llama

try:
    from llamafleet.backends.llama import binding
    binding.lib()
except Exception as exc:  # noqa: BLE001 - any failure means: no libllama here
    pytest.skip(f"libllama not available: {exc}", allow_module_level=True)

from llamafleet.backends.llama.backend import LlamaBackend  # noqa: E402
from llamafleet.bench.speculative import PROMPTS  # noqa: E402
from llamafleet.testing.tiny_gguf import TinyModelSpec, write_tiny_model  # noqa: E402
from llamafleet.worker.generation import Generation  # noqa: E402
from llamafleet.worker.prefix_cache import PrefixCache  # noqa: E402
from llamafleet.worker.scheduler import Scheduler  # noqa: E402
from llamafleet.worker.speculative import SpecConfig  # noqa: E402


def _smollm() -> Path:
    try:
        return default_model_path()
    except ConfigError as exc:
        pytest.skip(f"SmolLM2 is not installed: {exc}")


@pytest.fixture(scope="module")
def smol() -> Iterator[LlamaBackend]:
    b = LlamaBackend({"path": str(_smollm()), "n_ctx": 1024, "n_seq_max": 4,
                      "n_threads": 2, "batch_invariant": True})
    b.load()
    try:
        yield b
    finally:
        b.close()


def _row(b: LlamaBackend, seq: int) -> np.ndarray:
    return np.array(b._seqs.logits[seq])  # the logits row sampling reads


def test_options_are_checked_and_reported(tmp_path: Path) -> None:
    tiny = write_tiny_model(tmp_path / "tiny.gguf", TinyModelSpec())
    base = {"path": str(tiny), "n_ctx": 128, "n_seq_max": 2, "n_threads": 2,
            "batch_invariant": True}
    with pytest.raises(BadRequest, match="flash_attn off"):
        LlamaBackend({**base, "flash_attn": "on"})
    with pytest.raises(BadRequest, match="kv_unified off"):
        LlamaBackend({**base, "kv_unified": True})
    b = LlamaBackend({**base, "n_batch": 1, "n_ubatch": 1})
    with pytest.raises(BadRequest, match="at least 2"):
        b.load()
    b = LlamaBackend(base)
    b.load()
    try:
        extra = b.info().extra
        assert extra["batch_invariant"] is True and extra["kv_unified"] is False
        assert extra["flash_attn"] == "off"
    finally:
        b.close()


def test_a_token_computes_the_same_however_it_is_batched(smol: LlamaBackend) -> None:
    p = smol.tokenize(PROMPTS["grounded"])
    p = p + p[1:200]  # long contexts too, where flash attention would depend on the batch
    for n in (37, 379, 400, 511, 513):
        smol.seq_clear(0)
        smol.evaluate([(0, p[:n + 1])])
        whole = _row(smol, 0)
        blob = smol.kv_pack(0)
        for split in (n, n - 1, n - 7):  # the token alone, after one more, in a batch of 8
            smol.seq_clear(0)
            smol.evaluate([(0, p[:split])])
            smol.evaluate([(0, p[split:n + 1])])
            assert np.array_equal(_row(smol, 0), whole), (n, split)
        # beside other sequences' work of other lengths (llama.cpp would split such a
        # batch per sequence into ubatches, some of them lone tokens)
        smol.seq_clear(0)
        smol.evaluate([(0, p[:n])])
        for s in (1, 2):
            smol.seq_clear(s)
            smol.evaluate([(s, p[:20 * s])])
        smol.evaluate([(0, [p[n]]), (1, p[20:23]), (2, p[40:41])])
        assert np.array_equal(_row(smol, 0), whole), n
        # a restored KV blob decodes its last token again: still the same
        smol.seq_clear(0)
        smol.kv_unpack(0, blob)
        assert np.array_equal(_row(smol, 0), whole), n
        assert smol.seq_len(0) == n + 1
    for s in range(3):
        smol.seq_clear(s)


def test_greedy_output_is_the_same_with_the_cache_company_and_lookup(
        smol: LlamaBackend) -> None:
    cache = PrefixCache(ram_bytes=1 << 30, disk_dir=None, disk_bytes=0, min_tokens=16)
    sent: dict[int, object] = {}
    sched = Scheduler(smol, send=lambda p, r, o: sent.__setitem__(r, o), max_queue=16,
                      stream_interval=0, cache=cache)
    prompt = smol.tokenize(PROMPTS["grounded"])
    others = [smol.tokenize(f"Write a poem about the number {i}.") for i in range(3)]

    def submit(req: int, toks: list[int], spec: SpecConfig | None) -> None:
        sched.submit(Generation(peer=b"p", req_id=req, stream=False, prompt_tokens=toks,
                                params=SamplingParams(temperature=0.0), max_tokens=96, stop=[],
                                ignore_eos=True, seq=None, deadline=None, session=None,
                                speculative=spec))

    def run(req: int, spec: SpecConfig | None, company: bool = False) -> list[int]:
        submit(req, prompt, spec)
        if company:  # three other sequences, each at its own length, in the same batches
            for i, o in enumerate(others):
                submit(req * 10 + i, o, None)
        while sched.busy:  # busy until the finished KV is in the cache, too
            sched.tick()
        return list(sent[req].tokens)  # type: ignore[attr-defined]

    lookup = SpecConfig(draft_min=1, draft_max=16)
    plain = run(1, None)
    assert run(2, None) == plain  # the prompt now comes from the prefix cache
    assert sent[2].stats.cached_tokens > 0  # type: ignore[attr-defined]
    spec = run(3, lookup)
    assert spec == plain
    assert sent[3].stats.accepted_tokens > 30  # type: ignore[attr-defined]
    assert run(4, None, company=True) == plain
    assert run(5, lookup, company=True) == plain
