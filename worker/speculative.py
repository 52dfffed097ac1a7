"""Speculative decoding's pure parts: the prompt-lookup drafter, its per-sequence
adaptation, and the verification rule. No backend, no I/O.

**Prompt lookup**: the last few tokens of a sequence's history (its prompt and
what it generated so far) are looked up among earlier positions of the same
history; the tokens that followed the most recent earlier occurrence are the
draft. Longer n-grams are tried first (``NGRAM_MAX`` down to ``NGRAM_MIN``).
An index maps each n-gram to the position after its latest occurrence, updated
as tokens arrive, so a lookup costs O(1) per n.

**Verification** (:func:`verify_draft`): the target samples each position with
its own sampler chain (grammar, penalties, bias, truncation, temperature and its
RNG, exactly as without speculation) and a draft token is kept while it equals
what the target sampled. For a deterministic drafter the draft distribution is
a point mass, and this *is* the standard speculative-sampling rule: the draft
token ``t`` is kept with probability ``p_target(t)``; otherwise the token kept is
distributed as ``p_target`` with ``t`` removed and renormalised. The output is
the target's, token for token, given the same logits.

**Adaptation** (:class:`Drafter`): the draft length doubles after a fully
accepted draft and drops to one more than what was accepted otherwise, within
``[draft_min, draft_max]``; after ``MISS_LIMIT`` failed drafts in a row (less
than two thirds kept: on a CPU a verified token costs about half a decode, so
such drafts lose time) the sequence stops drafting for ``cooldown`` tokens, a pause that
doubles each time it happens again (so text where lookup does not help soon
drafts almost never).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

#: longest and shortest n-gram looked up (on SmolLM2, 2-grams drafted on free text
#: often enough to cost 3% there; 3-grams cost nothing and drafted copied text as well)
NGRAM_MAX = 4
NGRAM_MIN = 3
#: failed drafts in a row (less than two thirds kept) before a pause
MISS_LIMIT = 3
#: the first pause (tokens) and the longest one
COOLDOWN_FIRST = 16
COOLDOWN_MAX = 4096


@dataclass(frozen=True)
class SpecConfig:
    """How one generation speculates: the method ("lookup" or "draft"), its draft
    length bounds, and for "draft" the worker's draft model (``draft_model.DraftModel``)."""

    method: str = "lookup"
    draft_min: int = 2
    draft_max: int = 16
    model: Any = None


class NgramIndex:
    """The history of a sequence and, per n-gram size, where each n-gram last
    occurred (the index of the token that followed it)."""

    def __init__(self, tokens: Sequence[int] = (), n_max: int = NGRAM_MAX,
                 n_min: int = NGRAM_MIN) -> None:
        self.n_max, self.n_min = n_max, n_min
        self.tokens: list[int] = []
        self._after: dict[int, dict[tuple[int, ...], int]] = {
            n: {} for n in range(n_min, n_max + 1)}
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        """Append tokens to the history, indexing the n-grams they complete."""
        hist, after = self.tokens, self._after
        for t in tokens:
            i = len(hist)  # t's position: it follows the n-grams ending at i-1
            hist.append(t)
            for n, table in after.items():
                if i >= n:
                    table[tuple(hist[i - n:i])] = i

    def lookup(self, k: int) -> list[int]:
        """``k`` tokens that followed the latest earlier occurrence of the history's
        longest matching suffix n-gram (empty when none matches); where that
        continuation reaches the end of the history, the repetition goes on."""
        hist = self.tokens
        end = len(hist)
        if k <= 0:
            return []
        for n in range(self.n_max, self.n_min - 1, -1):
            if end < n:
                continue
            pos = self._after[n].get(tuple(hist[end - n:]))
            if pos is not None:
                draft = hist[pos:pos + k]
                # a continuation that runs into the present repeats itself (a period)
                while len(draft) < k:
                    draft.append(draft[len(draft) - (end - pos)])
                return draft
        return []


class Drafter:
    """Prompt-lookup drafts for one generation, adapting their length to how many
    of them the target accepts."""

    def __init__(self, cfg: SpecConfig, history: Sequence[int]) -> None:
        self.cfg = cfg
        self.index = NgramIndex(history)
        #: the draft length to propose next
        self.k = cfg.draft_min
        self.misses = 0
        #: tokens left to generate before drafting again, and the next pause
        self.paused = 0
        self.cooldown = COOLDOWN_FIRST

    def push(self, token: int) -> None:
        """A token the generation produced (it joins the history)."""
        self.index.extend((token,))
        if self.paused:
            self.paused -= 1

    def propose(self, limit: int) -> list[int]:
        """A draft of at most ``limit`` tokens to follow the history (empty: none,
        also while paused or when lookup finds fewer than ``draft_min``)."""
        if self.paused or limit < self.cfg.draft_min:
            return []
        draft = self._draft(min(self.k, limit))
        return draft if len(draft) >= self.cfg.draft_min else []

    def _draft(self, k: int) -> list[int]:
        return self.index.lookup(k)

    def bind(self, seq: int) -> None:
        """The generation got sequence ``seq`` (a draft model mirrors it)."""

    def release(self) -> None:
        """The generation let its sequence go."""

    def feedback(self, drafted: int, accepted: int) -> None:
        """The target kept ``accepted`` of the ``drafted`` tokens just verified."""
        cfg = self.cfg
        if drafted <= 0:
            return
        if accepted >= drafted:
            self.k = min(cfg.draft_max, self.k * 2)
        else:
            self.k = max(cfg.draft_min, min(cfg.draft_max, accepted + 1))
        if accepted * 3 >= drafted * 2:  # two thirds kept: worth its verification
            self.misses = 0
            if accepted >= drafted:
                self.cooldown = COOLDOWN_FIRST
            return
        self.misses += 1
        if self.misses >= MISS_LIMIT:
            self.misses = 0
            self.paused = self.cooldown
            self.cooldown = min(COOLDOWN_MAX, self.cooldown * 2)


def even_drafts(drafts: dict[int, list[int]]) -> int:
    """Cut the drafts of one evaluation to the shortest of them (in place); returns
    the tokens this frees.

    llama.cpp splits a batch of several sequences into micro-batches that hold the
    same number of tokens of each sequence (``split_equal``), so a draft longer than
    its neighbours' is evaluated in a micro-batch of its own, at the fixed cost of a
    whole model pass: on SmolLM2 (CPU) eight sequences' 48 tokens took 245 ms in
    drafts of mixed lengths and 200 ms in drafts of one length."""
    if len(drafts) < 2:
        return 0
    d = min(len(x) for x in drafts.values())
    freed = 0
    for draft in drafts.values():
        freed += len(draft) - d
        del draft[d:]
    return freed


def verify_draft(draft: Sequence[int],
                 sample_at: Callable[[int], int | None]) -> tuple[int, list[int]]:
    """Verify ``draft`` against the target: ``sample_at(i)`` samples the target at
    draft position ``i`` (after the first ``i`` draft tokens were kept) and returns
    its token, or None when the generation ends there. Returns how many draft
    tokens were kept and every token sampled (the kept ones, then the corrected or
    bonus one)."""
    out: list[int] = []
    for i, d in enumerate(draft):
        t = sample_at(i)
        if t is None:
            return i, out
        out.append(t)
        if t != d:
            return i, out
    t = sample_at(len(draft))
    if t is not None:
        out.append(t)
    return len(draft), out


def make_drafter(cfg: SpecConfig, history: Sequence[int]) -> Drafter:
    """The drafter of one generation: the draft model's, else prompt lookup."""
    if cfg.method == "draft" and cfg.model is not None:
        return cfg.model.drafter(cfg, history)
    return Drafter(cfg, history)
