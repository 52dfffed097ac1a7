"""The embedding path: a second context (embeddings on, one sequence of at most
``n_ubatch`` tokens, created on first use) so that generation and embeddings work
on the same worker. LoRA adapters are not applied to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llamafleet.backends.llama.native import AbortFlag, LlamaEmbeddingContext, LlamaModel, NullHandle
from llamafleet.runtime.errors import BadRequest, Cancelled, InternalError

_POOLING_NONE = 0


def open_context(model: LlamaModel, *, n_ubatch: int, n_threads: int, n_threads_batch: int,
                 flash_attn: int, pooling: int,
                 abort: AbortFlag | None) -> LlamaEmbeddingContext:
    """The embedding context: ``n_ubatch`` cells, capped to the training context."""
    n = n_ubatch
    if model.n_ctx_train > 0:
        n = min(n, model.n_ctx_train)
    try:
        return LlamaEmbeddingContext(model, n_max=n, n_threads=n_threads,
                                     n_threads_batch=n_threads_batch, flash_attn=flash_attn,
                                     pooling=pooling, abort=abort)
    except NullHandle:
        raise BadRequest("llama.cpp could not create the embedding context") from None


def check_texts(texts: Sequence[str]) -> Sequence[str]:
    """``texts`` when it is a list of strings; BadRequest otherwise."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise BadRequest("texts must be a list of strings")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise BadRequest(f"text {i} is not a string")
    return texts


def embed(ectx: LlamaEmbeddingContext, token_lists: Sequence[Sequence[int]],
          normalize: bool) -> list[list[float]]:
    """One vector per token list (checked first: none empty, none over the limit),
    L2-normalized when ``normalize``. With pooling "none" in llama.cpp the vector
    is the mean over the tokens."""
    for i, toks in enumerate(token_lists):
        if not toks:
            raise BadRequest(f"text {i} has no tokens")
        if len(toks) > ectx.n_max:
            raise BadRequest(f"text {i} has {len(toks)} tokens, more than the embedding "
                             f"limit {ectx.n_max} (n_ubatch)")
    out: list[list[float]] = []
    for toks in token_lists:
        n = len(toks)
        rc = ectx.run(toks)
        if rc == 2:
            raise Cancelled("embedding aborted")
        if rc != 0:
            raise InternalError(f"embedding decode failed with code {rc}")
        if ectx.pooling == _POOLING_NONE:
            n_out = ectx.model.n_embd_out
            acc = np.zeros(n_out, dtype=np.float64)
            for i in range(n):
                row = ectx.embeddings_ith(i, n_out)
                if row is None:
                    raise InternalError("no embeddings for token")
                acc += row
            vec = acc / n
        else:
            row = ectx.embeddings_seq(0, ectx.dim)
            if row is None:
                raise InternalError("no pooled embedding")
            vec = row.astype(np.float64)
        if normalize:
            norm = float(np.linalg.norm(vec))
            if norm > 0:
                vec = vec / norm
        out.append(vec.tolist())
    ectx.memory_clear()
    return out
