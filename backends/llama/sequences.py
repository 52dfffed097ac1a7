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
    :attr:`logits`, so sampling never reads a stale batch index.

    A decode may carry a draft after a sequence's tokens (speculative decoding):
    its cells go into the KV with a logits row each (:attr:`draft_rows`), but the
    sequence's history holds only its tokens until :meth:`accept_draft` keeps the
    next draft token; :meth:`reject_draft` removes the cells of the rest."""

    def __init__(self, ctx: LlamaContext, n_vocab: int, *, invariant: bool = False) -> None:
        self.ctx = ctx
        #: the ``batch_invariant`` option: every llama_decode call holds one sequence's
        #: tokens, at most n_ubatch of them, and never a lone token
        self.invariant = invariant
        n = ctx.n_seq_max
        #: what the KV of each sequence holds
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.logits = np.zeros((n, n_vocab), dtype=np.float32)
        self.has_logits = [False] * n
        self.batch = LlamaBatch(ctx.ffi, ctx.n_batch)
        #: per sequence: its pending draft, how much of it was kept, one logits row
        #: per draft token (the logits that follow it)
        self.draft: list[list[int]] = [[] for _ in range(n)]
        self.draft_kept = [0] * n
        self.draft_rows: list[np.ndarray | None] = [None] * n
        #: sequences with a pending draft
        self.drafted: set[int] = set()
        self._n_vocab = n_vocab

    def draft_left(self, s: int) -> int:
        return len(self.draft[s]) - self.draft_kept[s]

    def accept_draft(self, s: int) -> None:
        """The next draft token joins the history; its logits row becomes current."""
        i = self.draft_kept[s]
        rows = self.draft_rows[s]
        assert rows is not None and i < len(self.draft[s])
        self.tokens[s].append(self.draft[s][i])
        self.logits[s] = rows[i]
        self.draft_kept[s] = i + 1

    def reject_draft(self, s: int) -> None:
        """Remove the KV cells of what is left of the draft."""
        if s not in self.drafted:
            return
        self.drafted.discard(s)
        left = self.draft_left(s)
        self.draft[s], self.draft_kept[s] = [], 0
        if left and not self.ctx.seq_rm(s, len(self.tokens[s]), -1):
            self.clear(s)  # cannot drop part of it: the sequence is lost, never wrong
            raise InternalError(f"could not remove the rejected draft of sequence {s}")

    def reject_all(self) -> None:
        for s in list(self.drafted):
            self.reject_draft(s)

    def clear(self, s: int) -> None:
        self.drafted.discard(s)
        self.draft[s], self.draft_kept[s] = [], 0
        self.ctx.seq_rm(s)
        self.tokens[s] = []
        self.has_logits[s] = False

    def decode_small(self, work: list[tuple[int, list[int]]]) -> None:
        """The steady state of generation (one token per sequence), in one chunk."""
        if self.invariant and (len(work) > 1 or len(work[0][1]) > self.ctx.n_ubatch):
            self.decode([(s, np.asarray(t, dtype=np.int32)) for s, t in work])
            return
        n, outs = self.batch.fill_small(work, self.tokens)
        try:
            self._run_chunk(n, outs, {}, False)
        except BaseException:
            self._rollback({s: len(self.tokens[s]) for s, _ in work})
            raise
        for s, toks in work:
            self.tokens[s].extend(toks)
            self.has_logits[s] = True

    def decode(self, work: list[tuple[int, np.ndarray]],
               drafts: dict[int, int] | None = None) -> None:
        """Decode ``(seq, int32 tokens)`` work in chunks of n_batch; on failure no
        sequence changes. ``drafts[seq]``: that many of the sequence's last tokens
        are a draft (an output row each, held pending)."""
        batch = self.batch
        nb = min(batch.n_max, self.ctx.n_ubatch) if self.invariant else batch.n_max
        drafts = drafts or {}
        old_len = {s: len(self.tokens[s]) for s, _ in work}
        multi = sum(t.size for _, t in work) > nb or (self.invariant and len(work) > 1)
        staged: dict[int, np.ndarray] = {}
        # (seq, output number, batch index) outputs of the current chunk: output 0 is
        # the sequence's last token, 1.. its draft tokens
        done_out: list[tuple[int, int, int]] = []
        for s, nd in drafts.items():
            rows = self.draft_rows[s]
            if rows is None or rows.shape[0] < nd:
                self.draft_rows[s] = np.empty((max(nd, 16), self._n_vocab), dtype=np.float32)
        fill = 0
        try:
            for s, toks in work:
                start, off, n = old_len[s], 0, toks.size
                first = n - 1 - drafts.get(s, 0)  # the first token with an output
                if self.invariant and fill:  # a call per sequence
                    self._run_chunk(fill, done_out, staged, multi)
                    fill = 0
                    done_out = []
                while off < n:
                    take = min(n - off, nb - fill)
                    batch.put(fill, toks[off:off + take], start + off, s)
                    for i in range(max(off, first), off + take):
                        at = fill + i - off
                        batch.np_logits[at] = 1
                        done_out.append((s, i - first, at))
                    off += take
                    fill += take
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
            nd = drafts.get(s, 0)
            self.tokens[s].extend(toks[:toks.size - nd].tolist())
            if multi:
                self.logits[s] = staged[s]
            self.has_logits[s] = True
            if nd:
                self.draft[s], self.draft_kept[s] = toks[toks.size - nd:].tolist(), 0
                self.drafted.add(s)

    def _run_chunk(self, n: int, outs: list[tuple[int, int, int]],
                   staged: dict[int, np.ndarray], multi: bool) -> None:
        ctx = self.ctx
        if n == 1 and self.invariant:
            rc = self._decode_padded()
        else:
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
        for s, j, idx in outs:
            row = ctx.logits_ith(idx)
            if row is None:
                raise InternalError(f"no logits for batch index {idx}")
            if j:
                rows = self.draft_rows[s]
                assert rows is not None
                rows[j - 1] = row
            elif multi:
                staged[s] = row.copy()
            else:
                self.logits[s] = row

    def _decode_padded(self) -> int:
        """Decode the lone token at index 0 beside a throwaway copy of it at the next
        position of its sequence (no output), whose cell is removed at once: the lone
        token's logits and KV come out as in any batch of two or more."""
        b, ctx = self.batch, self.ctx
        s, pos = int(b.np_seq[0]), int(b.np_pos[0])
        b.np_token[1], b.np_pos[1], b.np_seq[1], b.np_logits[1] = b.np_token[0], pos + 1, s, 0
        rc = ctx.decode(b, 2)
        if not ctx.seq_rm(s, pos + 1, -1):
            raise InternalError(f"could not remove the padding token of sequence {s}")
        return rc

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
        self.reject_draft(s)
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
