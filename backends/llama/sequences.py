"""Per-sequence bookkeeping over one context: what each sequence's KV holds, the
logits of its last token, and decoding that is all-or-nothing.

Callers pass validated work: sequence ids in range, token ids in the vocabulary,
histories that stay within the context.
"""

from __future__ import annotations

import numpy as np

from llamafleet.backends.llama.native import LlamaBatch, LlamaContext
from llamafleet.runtime.errors import BadRequest, Cancelled, InternalError, NotSupported, Overloaded


class Sequences:
    """Token histories, logits rows and decoding for the sequences of ``ctx``.

    After each decode the logits row of every sequence that got one is copied into
    :attr:`logits`, so sampling never reads a stale batch index."""

    def __init__(self, ctx: LlamaContext, n_vocab: int) -> None:
        self.ctx = ctx
        n = ctx.n_seq_max
        #: what the KV of each sequence holds
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.logits = np.zeros((n, n_vocab), dtype=np.float32)
        self.has_logits = [False] * n
        self.batch = LlamaBatch(ctx.ffi, ctx.n_batch)

    def clear(self, s: int) -> None:
        self.ctx.seq_rm(s)
        self.tokens[s] = []
        self.has_logits[s] = False

    def decode_small(self, work: list[tuple[int, list[int]]]) -> None:
        """The steady state of generation (one token per sequence), in one chunk."""
        n, outs = self.batch.fill_small(work, self.tokens)
        try:
            self._run_chunk(n, outs, {}, False)
        except BaseException:
            self._rollback({s: len(self.tokens[s]) for s, _ in work})
            raise
        for s, toks in work:
            self.tokens[s].extend(toks)
            self.has_logits[s] = True

    def decode(self, work: list[tuple[int, np.ndarray]]) -> None:
        """Decode ``(seq, int32 tokens)`` work in chunks of n_batch; on failure no
        sequence changes."""
        nb, batch = self.batch.n_max, self.batch
        old_len = {s: len(self.tokens[s]) for s, _ in work}
        multi = sum(t.size for _, t in work) > nb
        staged: dict[int, np.ndarray] = {}
        done_out: list[tuple[int, int]] = []  # (seq, batch index) outputs of the current chunk
        fill = 0
        try:
            for s, toks in work:
                start, off, n = old_len[s], 0, toks.size
                while off < n:
                    take = min(n - off, nb - fill)
                    batch.put(fill, toks[off:off + take], start + off, s)
                    off += take
                    fill += take
                    if off == n:
                        batch.np_logits[fill - 1] = 1
                        done_out.append((s, fill - 1))
                    if fill == nb:
                        self._run_chunk(fill, done_out, staged, multi)
                        fill = 0
                        done_out = []
            if fill:
                self._run_chunk(fill, done_out, staged, multi)
        except BaseException:
            self._rollback(old_len)
            raise
        for s, toks in work:
            self.tokens[s].extend(toks.tolist())
            if multi:
                self.logits[s] = staged[s]
            self.has_logits[s] = True

    def _run_chunk(self, n: int, outs: list[tuple[int, int]], staged: dict[int, np.ndarray],
                   multi: bool) -> None:
        ctx = self.ctx
        rc = ctx.decode(self.batch, n)
        if rc != 0:
            if rc == 1:
                raise Overloaded("no free KV cache slot for this batch (the context is full; "
                                 "free sequences or retry later)")
            if rc == 2:
                raise Cancelled("decode aborted")
            if rc == -1:
                raise BadRequest("llama.cpp rejected the batch as invalid")
            raise InternalError(f"llama_decode failed with code {rc}")
        for s, idx in outs:
            row = ctx.logits_ith(idx)
            if row is None:
                raise InternalError(f"no logits for batch index {idx}")
            if multi:
                staged[s] = row.copy()
            else:
                self.logits[s] = row

    def _rollback(self, old_len: dict[int, int]) -> None:
        """Drop what a failed decode may have appended to each sequence's KV."""
        ctx = self.ctx
        for s, n in old_len.items():
            if not ctx.seq_rm(s, n, -1):
                ctx.seq_rm(s)
                self.tokens[s] = []
                self.has_logits[s] = False

    def truncate(self, s: int, n_keep: int) -> None:
        """Keep the first ``n_keep`` (1..len) tokens, with fresh logits for the last."""
        toks = self.tokens[s]
        # drop from the last kept token on, then decode it again for fresh logits
        if not self.ctx.seq_rm(s, n_keep - 1, -1):
            raise NotSupported("this model's memory cannot drop tokens (recurrent model)")
        self._redecode_last(s, toks[:n_keep - 1], toks[n_keep - 1])

    def restore(self, s: int, tokens: list[int], state: bytes) -> None:
        """Load a state blob of ``tokens`` (at least one) into the empty sequence ``s``
        and decode its last token again (a blob holds no logits). On failure the
        sequence is left empty."""
        ctx, n = self.ctx, len(tokens)
        if not ctx.state_seq_set(s, state):
            ctx.seq_rm(s)
            raise BadRequest("llama.cpp refused the KV blob (incompatible context or corrupt "
                             "state; see the worker log)")
        pmin, pmax = ctx.seq_pos_min(s), ctx.seq_pos_max(s)
        if pmin != 0 or pmax != n - 1:
            ctx.seq_rm(s)
            raise BadRequest(f"KV blob positions [{pmin}, {pmax}] do not match its {n} tokens")
        if not ctx.seq_rm(s, n - 1, -1):
            ctx.seq_rm(s)
            raise NotSupported("this model's memory cannot drop its last token (recurrent "
                               "model); KV restore is not supported")
        self._redecode_last(s, tokens[:-1], tokens[-1])

    def _redecode_last(self, s: int, kept: list[int], last: int) -> None:
        """``kept`` is in the KV: decode ``last`` after it (the sequence is left empty
        if that fails)."""
        self.tokens[s] = kept
        try:
            self.decode([(s, np.asarray([last], dtype=np.int32))])
        except BaseException:
            self.clear(s)
            raise
