"""Speculative decoding with a draft model: a small GGUF sharing the target's
vocabulary, loaded in the same worker, proposes the next tokens greedily.

The draft model runs on a backend of its own (a second llama context with the
target's ``n_seq_max``, ``n_ctx`` and threads) and mirrors each speculating
sequence in the sequence of the same number: before drafting, its KV is brought
to the generation's history (kept where they agree, truncated where they do not,
the rest evaluated), then it samples ``k`` tokens greedily, one decode each. A
greedy draft is a deterministic drafter, so :func:`speculative.verify_draft`'s
rule keeps the target's output and distribution (see ``worker.speculative``).

Limits: the draft model drafts one sequence at a time, on the scheduler's loop
(its catch-up prefill of a long prompt delays that tick), and its cost is not
weighed against the target's: it pays off only with a draft much cheaper than the
target.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from llamafleet.backends.base import Backend
from llamafleet.runtime.errors import IncompatibleModels, LlamafleetError
from llamafleet.runtime.sampling import SamplingParams
from llamafleet.worker.speculative import Drafter, SpecConfig

log = logging.getLogger("llamafleet.worker.draft_model")
_GREEDY = SamplingParams(temperature=0.0)
#: llama-server's tolerance: token ids from this one on must render the same
_SPECIAL_IDS = 5


def check_vocabularies(target: Backend, draft: Backend) -> None:
    """Raise IncompatibleModels unless ``draft`` shares ``target``'s vocabulary: the
    same size, BOS and EOS, and every token rendering the same bytes (from id 5 on,
    as llama-server checks)."""
    ti, di = target.info(), draft.info()
    diffs = []
    if ti.n_vocab != di.n_vocab:
        diffs.append(f"{di.n_vocab} tokens, not {ti.n_vocab}")
    if (ti.bos_token, ti.eos_token) != (di.bos_token, di.eos_token):
        diffs.append(f"BOS/EOS {di.bos_token}/{di.eos_token}, not {ti.bos_token}/"
                     f"{ti.eos_token}")
    if not diffs:
        for t in range(_SPECIAL_IDS, ti.n_vocab):
            if target.token_to_piece(t) != draft.token_to_piece(t):
                diffs.append(f"token {t} is {draft.token_to_piece(t)!r}, not "
                             f"{target.token_to_piece(t)!r}")
                break
    if diffs:
        raise IncompatibleModels(f"the draft model {di.name!r} does not share the vocabulary "
                                 f"of {ti.name!r}: " + "; ".join(diffs))


def draft_options(target: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The draft backend's options: the target's context shape and threads."""
    keep = ("n_ctx", "n_seq_max", "n_batch", "n_ubatch", "n_threads", "n_threads_batch",
            "n_gpu_layers", "flash_attn", "kv_unified", "type_k", "type_v", "load_mode")
    return {"path": path, **{k: target[k] for k in keep if target.get(k) is not None}}


class DraftModel:
    """The worker's draft model: one backend, one mirrored sequence per slot."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        backend.set_default_sampling(_GREEDY)  # what a cleared sequence samples with too
        for seq in range(backend.info().n_seq_max):
            backend.set_sampling(seq, _GREEDY)

    def drafter(self, cfg: SpecConfig, history: Sequence[int]) -> ModelDrafter:
        return ModelDrafter(self, cfg, history)

    def draft(self, seq: int, history: Sequence[int], k: int) -> list[int]:
        """``k`` greedy tokens to follow ``history`` in the draft's sequence ``seq``."""
        b = self.backend
        have = b.seq_tokens(seq)
        common = 0
        for x, y in zip(have, history):
            if x != y:
                break
            common += 1
        if common == 0:
            b.seq_clear(seq)
        elif common < len(have) or common == len(history):
            b.seq_truncate(seq, common)  # drops what differs; fresh logits for the rest
        rest = list(history[common:])
        if rest:
            b.evaluate([(seq, rest)])
        out: list[int] = []
        while True:
            t = b.sample(seq)
            if t is None or b.is_eog(t):
                return out
            out.append(t)
            if len(out) >= k:
                return out
            b.evaluate([(seq, [t])])

    def release(self, seq: int) -> None:
        self.backend.seq_clear(seq)


class ModelDrafter(Drafter):
    """A :class:`Drafter` whose drafts come from the draft model (same adaptation)."""

    def __init__(self, model: DraftModel, cfg: SpecConfig, history: Sequence[int]) -> None:
        super().__init__(cfg, history)
        self.model = model
        self.seq: int | None = None

    def bind(self, seq: int) -> None:
        self.seq = seq

    def release(self) -> None:
        if self.seq is not None:
            self.model.release(self.seq)
            self.seq = None

    def _draft(self, k: int) -> list[int]:
        if self.seq is None:
            return []
        try:
            return self.model.draft(self.seq, self.index.tokens, k)
        except LlamafleetError as exc:  # e.g. the draft's context is shorter: stop drafting
            log.warning("the draft model cannot draft for this generation: %s", exc)
            self.release()
            return []
