"""Per-sequence sampling on libllama's samplers, and the sampling a GGUF recommends.

A :class:`SeqSampler` runs three stages on the candidates array: ``pre`` (logit
bias, penalties), the grammar, and ``post`` (truncation, temperature and the pick).
The grammar is consulted lazily: the unconstrained choice is checked against it
first, and only when the grammar rejects that token is the whole vocabulary
constrained and sampled again.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from llamafleet.backends.llama.gguf_meta import FLOAT32, FLOAT64, INT_TYPES, read_typed_metadata
from llamafleet.backends.llama.native import LlamaModel, LlamaSampler, LlamaTokenDataArray, NullHandle
from llamafleet.runtime.errors import BadRequest
from llamafleet.runtime.sampling import SamplingParams

log = logging.getLogger("llamafleet.llama")

#: llama.cpp's seed meaning "pick a random one"
LLAMA_DEFAULT_SEED = 0xFFFFFFFF
_NEG_INF = float("-inf")

#: GGUF ``general.sampling.*`` key -> (SamplingParams field, expected kind). llama.cpp
#: also defines ``sequence``, ``xtc_*`` and ``mirostat*`` keys, which have no field here.
GGUF_SAMPLING: dict[str, tuple[str, type]] = {
    "general.sampling.temp": ("temperature", float),
    "general.sampling.top_k": ("top_k", int),
    "general.sampling.top_p": ("top_p", float),
    "general.sampling.min_p": ("min_p", float),
    "general.sampling.penalty_last_n": ("repeat_last_n", int),
    "general.sampling.penalty_repeat": ("repeat_penalty", float),
}


def seed_for(seed: int, default: int) -> int:
    """The RNG seed of a request: its own, else ``default``, else llama.cpp's random."""
    if seed < 0:
        seed = default
    if seed is None or seed < 0:
        return LLAMA_DEFAULT_SEED
    return seed & 0xFFFFFFFF


def recommended_sampling(model: LlamaModel, path: str) -> dict[str, Any]:
    """The SamplingParams fields a GGUF file recommends (its ``general.sampling.*`` keys).

    Keys absent from the file are absent from the result; a value of the wrong GGUF
    type (an integer field given a float, anything given a string, ...) is skipped
    with a warning. llama.cpp is asked which keys exist; only if some do is the
    header read again for their types."""
    present = {k for k in GGUF_SAMPLING if model.meta(k) is not None}
    if not present:
        return {}
    try:
        typed = read_typed_metadata(path, present)
    except (OSError, BadRequest) as exc:
        log.warning("cannot read the sampling metadata of %s: %s", path, exc)
        return {}
    out: dict[str, Any] = {}
    for key, (field, kind) in GGUF_SAMPLING.items():
        if key not in typed:
            continue
        vtype, value = typed[key]
        if vtype in INT_TYPES:
            out[field] = value if kind is int else float(value)
        elif vtype in (FLOAT32, FLOAT64) and kind is float:
            out[field] = value
        else:
            log.warning("%s: ignoring %s = %r (GGUF type %d; expected %s)", path, key, value,
                        vtype, "an integer" if kind is int else "a number")
    return out


def compile_grammar(model: LlamaModel, p: SamplingParams) -> LlamaSampler | None:
    """The grammar sampler of ``p`` (its GBNF, or its JSON schema converted), or None.

    An invalid grammar raises BadRequest: it is parsed in Python first, since
    llama.cpp reports its parse errors on stderr only."""
    text: str | None = None
    if p.grammar:
        text = p.grammar
    elif p.json_schema is not None:
        from llamafleet.backends.json_schema import json_schema_to_gbnf
        text = json_schema_to_gbnf(p.json_schema)
    if not text:
        return None
    from llamafleet.backends.gbnf import parse_or_refuse
    parse_or_refuse(text)
    try:
        return LlamaSampler.grammar(model, text)
    except NullHandle:
        raise BadRequest("invalid grammar: llama.cpp could not parse it (see the "
                         "worker's stderr for the parse error)") from None


class SeqSampler:
    """The sampler of one sequence: pre (bias, penalties), grammar, post (truncation + pick).

    ``history[seq]`` is the sequence's token history (prompt and generated tokens);
    the penalties see all of it, as in llama-server."""

    def __init__(self, model: LlamaModel, cand: LlamaTokenDataArray, p: SamplingParams,
                 grammar: LlamaSampler | None, *, history: list[list[int]], seq: int,
                 n_ctx: int, seed: int) -> None:
        ffi, lib, n_vocab = model.ffi, model.lib, cand.n_vocab
        self.params = p
        self.grammar = grammar
        self.seq = seq
        self._cand = cand
        self._history = history
        self.pre: LlamaSampler | None = None
        self.post: LlamaSampler | None = None
        self._penalties: Any = None  # the penalties sampler inside ``pre``
        self._last_n = 0
        self._fed = 0  # tokens of the sequence already fed to the penalties
        has_bias = bool(p.logit_bias)
        has_pen = ((p.repeat_penalty != 1.0 or p.frequency_penalty != 0.0
                    or p.presence_penalty != 0.0) and p.repeat_last_n != 0)
        if has_bias or has_pen:
            self.pre = LlamaSampler.chain(ffi, lib)
            if has_bias:
                self.pre.add_logit_bias(n_vocab, p.logit_bias)
            if has_pen:
                self._last_n = n_ctx if p.repeat_last_n < 0 else p.repeat_last_n
                self._penalties = self.pre.add_penalties(
                    n_vocab, self._last_n, p.repeat_penalty, p.frequency_penalty,
                    p.presence_penalty)
        self.greedy = p.greedy
        if self.greedy:
            if self.pre is not None or grammar is not None:
                self.post = LlamaSampler.chain(ffi, lib)
                self.post.add_greedy()
        else:
            post = self.post = LlamaSampler.chain(ffi, lib)
            if p.top_k > 0:
                post.add_top_k(min(p.top_k, n_vocab))
            if p.typical_p < 1.0:
                post.add_typical(p.typical_p, 1)
            if p.top_p < 1.0:
                post.add_top_p(p.top_p, 1)
            if p.min_p > 0.0:
                post.add_min_p(p.min_p, 1)
            post.add_temp(p.temperature)
            post.add_dist(seed)
        self.has_grammar = grammar is not None
        #: nothing but argmax: no chain, no grammar
        self.plain = self.pre is None and self.post is None and not self.has_grammar

    def free(self) -> None:
        """Free every native sampler (idempotent)."""
        for smp in (self.pre, self.post, self.grammar):
            if smp is not None:
                smp.close()
        self.pre = self.post = self.grammar = None
        self._penalties = None

    def reset(self) -> None:
        """Back to the state of a fresh sequence (penalty history, grammar, RNG)."""
        self._fed = 0
        for smp in (self.pre, self.grammar, self.post):
            if smp is not None:
                smp.reset()

    def _pick(self, cur: Any) -> int | None:
        """Run the post chain on ``cur``; None when nothing is admissible."""
        cand = self._cand
        if cand.all_masked(cur):
            return None
        assert self.post is not None  # no post chain only when plain (never here)
        self.post.apply(cur)
        return cand.selected(cur)

    def _grammar_admits(self, tok: int) -> bool:
        cand = self._cand
        assert self.grammar is not None
        self.grammar.apply(cand.single(tok))
        return not cand.single_masked()

    def accept(self, tok: int) -> None:
        """Advance the grammar and the chain's state by ``tok``, chosen elsewhere."""
        if self.grammar is not None:
            self.grammar.accept(tok)
        if self.post is not None:
            self.post.accept(tok)

    def sample(self, logits: np.ndarray) -> int | None:
        """The next token for these logits (accepted into the sampler state), or
        None when the grammar (or bias) leaves nothing admissible."""
        if self.plain:
            i = int(logits.argmax())  # greedy fast path
            return None if logits[i] == _NEG_INF else i
        if self._penalties is not None:
            # fed from the KV bookkeeping rather than at accept time
            hist = self._history[self.seq]
            start = max(self._fed, len(hist) - self._last_n)
            assert self.pre is not None
            self.pre.feed(self._penalties, hist[start:])
            self._fed = len(hist)
        cand, pre = self._cand, self.pre
        cur = cand.fill(logits)
        if pre is not None:
            pre.apply(cur)
        tok = self._pick(cur)
        if self.has_grammar and tok is not None and not self._grammar_admits(tok):
            # the unconstrained choice breaks the grammar: constrain the full vocabulary
            cur = cand.fill(logits)
            if pre is not None:
                pre.apply(cur)
            assert self.grammar is not None
            self.grammar.apply(cur)
            tok = self._pick(cur)
        if tok is None:
            return None
        # EOG is admitted by llama's grammar only once it is complete, so accepting is safe
        if self.grammar is not None:
            self.grammar.accept(tok)
        if self.post is not None:
            self.post.accept(tok)
        return tok
