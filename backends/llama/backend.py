"""The real backend: libllama through our own cffi (ABI mode) binding.

Layers, as in llama-cpp-python (raw binding / ``_internals`` / ``Llama``):

* :mod:`._cdef`, :mod:`.binding`: the declarations and the library, opened on the
  first ``load()`` (importing this package opens nothing);
* :mod:`.native`: one owner class per native handle (model, context, batch,
  sampler, adapter, embedding context), each freeing its handle once;
* :mod:`.options` (every option and its default), :mod:`.sequences` (token
  histories, logits rows, all-or-nothing decoding), :mod:`.sampler` (the
  per-sequence sampler), :mod:`.adapters` (LoRA), :mod:`.embed` (embeddings);
* this module: :class:`LlamaBackend`, the policy: every request is validated here
  before anything reaches native code.

llama.cpp aborts the process on out-of-range tokens or sequence ids, hence the
validation; after each decode the logits row of every sequence that got one is
copied into a per-sequence buffer, so ``sample`` never reads a stale batch index.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from llamafleet.backends.base import Backend, ModelInfo, ProgressCallback
from llamafleet.backends.llama import binding, kvformat, native
from llamafleet.backends.llama import embed as _embed
from llamafleet.backends.llama.adapters import LoraSet
from llamafleet.backends.llama.gguf_meta import check_model_file, file_identity
from llamafleet.backends.llama.options import (
    _FLASH,
    _GGML_TYPES,
    _LOAD_MODE,
    _POOLING,
    OPTIONS,
    flash_mode,
    thread_counts,
)
from llamafleet.backends.llama.sampler import SeqSampler, compile_grammar, recommended_sampling, seed_for
from llamafleet.backends.llama.sequences import Sequences
from llamafleet.runtime.errors import BadRequest, NotFound, NotSupported
from llamafleet.runtime.protocol import TokenLogprob
from llamafleet.runtime.sampling import SamplingParams

#: batches of at most this many tokens (given as lists of ints) skip numpy
_SMALL = 16


class LlamaBackend(Backend):
    """One GGUF model and one llama context (plus a lazy embedding context)."""

    name = "llama"
    OPTIONS = OPTIONS
    # set by load(); every method that uses them checks that a model is loaded first
    _model: native.LlamaModel
    _ctx: native.LlamaContext
    _seqs: Sequences
    _lora: LoraSet

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__(options)
        o = self.options
        self.path: str = o["path"]
        self._name_opt: str | None = o["name"]
        self.n_ctx_opt: int = o["n_ctx"]
        self.n_seq_max_opt: int = o["n_seq_max"]
        self.n_batch_opt: int = o["n_batch"]
        self.n_ubatch_opt: int = o["n_ubatch"]
        self.n_threads_opt, self.n_threads_batch_opt = thread_counts(o)
        self.n_gpu_layers_opt: int = o["n_gpu_layers"]
        self.flash_attn_opt = flash_mode(o["flash_attn"])
        self.batch_invariant_opt: bool = o["batch_invariant"]
        self.kv_unified_opt: bool = o["kv_unified"]
        if self.batch_invariant_opt:
            if self.flash_attn_opt == "on":
                raise BadRequest("batch_invariant needs flash_attn off: llama.cpp's CPU flash "
                                 "attention computes a token differently by batch size")
            if self.kv_unified_opt:
                raise BadRequest("batch_invariant needs kv_unified off: in a unified KV the "
                                 "cells of sequences interleave, and a token's attention sums "
                                 "depend on where its cells lie")
            self.flash_attn_opt = "off"
        self.type_k_opt: str = o["type_k"]
        self.type_v_opt: str = o["type_v"]
        self.embeddings_opt: bool = o["embeddings"]
        self.pooling_opt: str = o["pooling"]
        self.seed_opt: int = o["seed"]
        self.load_mode_opt: str = o["load_mode"]

        self.ffi: Any = None
        self.lib: Any = None
        self.model: native.LlamaModel | None = None
        self.ctx: native.LlamaContext | None = None
        self._info: ModelInfo | None = None
        self._closed = False
        self._abort_flag: native.AbortFlag | None = None
        self._embed_ctx: native.LlamaEmbeddingContext | None = None
        self._samplers: list[SeqSampler | None] = []
        self._recommended: dict[str, Any] | None = None

    # ------------------------------------------------------------------ lifecycle
    def load(self, progress: ProgressCallback | None = None) -> None:
        if self.model is not None:
            raise BadRequest("model already loaded")
        path = check_model_file(self.path, "model")
        self.ffi, self.lib = binding.lib()
        self._model_path = path
        self._model_id = file_identity(path)
        try:
            model = native.LlamaModel.load(self.ffi, self.lib, path, n_gpu_layers=self.n_gpu_layers_opt,
                                    load_mode=_LOAD_MODE[self.load_mode_opt], progress=progress)
        except native.NullHandle:
            raise BadRequest(f"llama.cpp could not load the model {path} (truncated, corrupt, "
                             "or an unsupported architecture; see the worker log)") from None
        self._model = self.model = model
        try:
            self._init_context(model)
        except BaseException:
            self.close()
            raise
        if progress is not None:
            progress(1.0)

    def _init_context(self, model: native.LlamaModel) -> None:
        self.n_vocab = model.n_vocab
        self.n_ctx_train = model.n_ctx_train
        self.n_layer = model.n_layer
        self.n_embd = model.n_embd
        if not model.has_decoder:
            raise BadRequest("encoder-only models cannot generate; this backend needs a decoder")
        self.recurrent = model.recurrent
        n_ctx = self.n_ctx_opt
        if self.n_ctx_train > 0:
            n_ctx = min(n_ctx, self.n_ctx_train)
        n_seq = self.n_seq_max_opt
        max_par = native.max_parallel_sequences(self.lib)
        if n_seq > max_par:
            raise BadRequest(f"n_seq_max {n_seq} exceeds llama.cpp's limit {max_par}")
        if self.batch_invariant_opt and min(self.n_batch_opt, self.n_ubatch_opt) < 2:
            raise BadRequest("batch_invariant needs n_batch and n_ubatch of at least 2")
        self._abort_flag = native.AbortFlag(self.ffi)
        try:
            ctx = native.LlamaContext(
                # batch_invariant: a cell more per sequence for a throwaway token
                model, n_ctx=(n_ctx + self.batch_invariant_opt) * n_seq, n_batch=self.n_batch_opt,
                n_ubatch=min(self.n_ubatch_opt, self.n_batch_opt), n_seq_max=n_seq,
                n_threads=self.n_threads_opt, n_threads_batch=self.n_threads_batch_opt,
                flash_attn=_FLASH[self.flash_attn_opt], kv_unified=self.kv_unified_opt,
                type_k=_GGML_TYPES[self.type_k_opt], type_v=_GGML_TYPES[self.type_v_opt],
                embeddings=False, abort=self._abort_flag)
        except native.NullHandle:
            raise BadRequest("llama.cpp could not create the context (out of memory, or an "
                             "unsupported option combination such as a quantized V cache "
                             "with flash_attn off; see the worker log)") from None
        self._ctx = self.ctx = ctx
        self._lora = LoraSet(model, ctx)
        self.n_seq_max, self.n_batch, self.n_ubatch = ctx.n_seq_max, ctx.n_batch, ctx.n_ubatch
        self.n_ctx_total = ctx.n_ctx
        # our per-sequence limit: what the user asked (capped), never more than llama's
        self.n_ctx = min(n_ctx, ctx.n_ctx_seq)

        self._seqs = Sequences(ctx, self.n_vocab, invariant=self.batch_invariant_opt)
        self._tokens, self._logits = self._seqs.tokens, self._seqs.logits
        self._has_logits = self._seqs.has_logits
        self._samplers = [None] * self.n_seq_max
        self._cand = native.LlamaTokenDataArray(self.ffi, self.n_vocab)
        self._eog = model.eog_tokens()
        self.bos, self.eos = model.bos, model.eos
        self._pieces: tuple[dict[int, bytes], dict[int, bytes]] = ({}, {})
        self._info = self._build_info(model)
        if self.embeddings_opt:
            self._embed_context()

    def _build_info(self, model: native.LlamaModel) -> ModelInfo:
        self.chat_template = tmpl = model.chat_template()
        self.architecture = model.meta("general.architecture") or ""
        name = self._name_opt or model.meta("general.name") or \
            os.path.splitext(os.path.basename(self.path))[0]
        features = ["kv", "grammar", "json_schema", "lora", "embeddings", "logprobs"]
        if not self.recurrent:  # drafts need their KV cells dropped
            features.append("speculative")
        if tmpl:
            features.append("chat_template")
        return ModelInfo(
            name=name, backend=self.name, architecture=self.architecture,
            n_params=model.n_params, n_vocab=self.n_vocab, n_ctx=self.n_ctx,
            n_ctx_train=self.n_ctx_train, n_batch=self.n_batch, n_seq_max=self.n_seq_max,
            n_embd=self.n_embd, bos_token=self.bos if self.bos >= 0 else None,
            eos_token=self.eos if self.eos >= 0 else None, chat_template=tmpl,
            features=features,
            extra={"n_ctx_total": self.n_ctx_total, "n_ubatch": self.n_ubatch,
                   "n_layer": self.n_layer, "description": model.desc(),
                   "model_size": model.size, "kv_unified": self.kv_unified_opt,
                   "batch_invariant": self.batch_invariant_opt,
                   "flash_attn": self.flash_attn_opt, "type_k": self.type_k_opt,
                   "type_v": self.type_v_opt, "n_threads": self.n_threads_opt,
                   "n_gpu_layers": self.n_gpu_layers_opt, "library": binding.library_path(),
                   "llama_version": native.library_version(self.ffi, self.lib)},
        )

    def info(self) -> ModelInfo:
        self._need()
        assert self._info is not None
        return self._info

    def default_sampling(self) -> dict[str, Any]:
        self._need()
        if self._recommended is None:
            self._recommended = recommended_sampling(self._model, self._model_path)
        return dict(self._recommended)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in self._samplers:
            if s is not None:
                s.free()
        self._samplers = []
        if self.ctx is not None:
            self._lora.close()
        for owner in (self._embed_ctx, self.ctx, self.model):  # dependents first
            if owner is not None:
                owner.close()
        self._embed_ctx = self.ctx = self.model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def _need(self) -> None:
        if self.ctx is None:
            raise BadRequest("model is not loaded" if not self._closed else "backend is closed")

    # ------------------------------------------------------------------ vocabulary
    def check_tokens(self, tokens: Sequence[int]) -> None:
        self._need()
        self._tok_array(tokens)

    def _tok_array(self, tokens: Any) -> np.ndarray:
        """Validated token ids as int32 (BadRequest on non-ints or out-of-range ids)."""
        if isinstance(tokens, (str, bytes)):
            raise BadRequest("tokens must be a list of integers")
        if isinstance(tokens, np.ndarray):
            arr = tokens
        else:
            try:
                arr = np.asarray(tokens)
            except (ValueError, TypeError):
                raise BadRequest("tokens must be a list of integers") from None
        if arr.ndim != 1:
            raise BadRequest("tokens must be a flat list of integers")
        if arr.size == 0:
            return arr.astype(np.int32)
        if arr.dtype.kind not in "iu":
            raise BadRequest("tokens must be integers")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.n_vocab:
            bad = lo if lo < 0 else hi
            raise BadRequest(f"token id {bad} out of range [0, {self.n_vocab})")
        return arr.astype(np.int32, copy=False)

    def _check_token(self, token: int) -> int:
        if type(token) is int and 0 <= token < self.n_vocab:
            return token
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
            raise BadRequest(f"token id must be an integer, got {type(token).__name__}")
        t = int(token)
        if not 0 <= t < self.n_vocab:
            raise BadRequest(f"token id {t} out of range [0, {self.n_vocab})")
        return t

    def tokenize(self, text: str, add_special: bool = True,
                 parse_special: bool = False) -> list[int]:
        self._need()
        if not isinstance(text, str):
            raise BadRequest("text must be a string")
        data = text.encode("utf-8", "surrogatepass") if text else b""
        if len(data) > (1 << 30):
            raise BadRequest("text too long to tokenize")
        return self._model.tokenize(data, bool(add_special), bool(parse_special))

    def token_to_piece(self, token: int, special: bool = True) -> bytes:
        self._need()
        t = self._check_token(token)
        cache = self._pieces[bool(special)]
        piece = cache.get(t)
        if piece is None:  # a vocabulary's pieces never change: look each up once
            piece = cache[t] = self._model.token_to_piece(t, bool(special))
        return piece

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        self._need()
        arr = self._tok_array(tokens)
        if not special and self.bos >= 0:
            # a leading BOS renders empty but would keep SPM's space prefix in the text
            k = 0
            while k < arr.size and arr[k] == self.bos:
                k += 1
            arr = arr[k:]
        if arr.size == 0:
            return ""
        return self._model.detokenize(arr, bool(special)).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        self._need()
        return self._check_token(token) in self._eog

    # ------------------------------------------------------------------ sequences
    def _check_seq(self, seq: int) -> int:
        if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)):
            raise BadRequest(f"sequence id must be an integer, got {type(seq).__name__}")
        s = int(seq)
        if not 0 <= s < self.n_seq_max:
            raise BadRequest(f"sequence id {s} out of range [0, {self.n_seq_max})")
        return s

    def seq_len(self, seq: int) -> int:
        self._need()
        return len(self._tokens[self._check_seq(seq)])

    def seq_tokens(self, seq: int) -> list[int]:
        self._need()
        return list(self._tokens[self._check_seq(seq)])

    def seq_clear(self, seq: int) -> None:
        self._need()
        s = self._check_seq(seq)
        self._seqs.clear(s)
        smp = self._samplers[s]
        if smp is not None:
            smp.reset()

    def evaluate(self, batch: Any) -> None:
        self._need()
        if self._seqs.drafted:
            self._seqs.reject_all()
        if type(batch) is list:
            small = self._small_work(batch)
            if small is not None:
                if small:
                    self._seqs.decode_small(small)
                return
        work = self._work(batch)
        if work:
            if sum(len(t) for _, t in work) <= _SMALL and all(type(t) is list for _, t in work):
                self._seqs.decode_small(work)  # type: ignore[arg-type]
            else:
                self._seqs.decode([(s, np.asarray(t, dtype=np.int32)) for s, t in work])

    def evaluate_drafts(self, batch: Any, drafts: Any) -> None:
        self._need()
        if self._seqs.drafted:
            self._seqs.reject_all()
        if not isinstance(drafts, dict):
            raise BadRequest("drafts must be a map of sequence to tokens")
        clean: dict[int, np.ndarray] = {}
        for seq, toks in drafts.items():
            arr = self._tok_array(toks)
            if arr.size:
                clean[self._check_seq(seq)] = arr
        if not clean:
            self.evaluate(batch)
            return
        if isinstance(batch, (str, bytes)) or not isinstance(batch, Sequence):
            raise BadRequest("batch must be a list of (seq, tokens) pairs")
        # each draft follows its sequence's tokens: validated (context room) together
        joined = [(s, np.concatenate([self._tok_array(t), clean[s]])
                   if isinstance(s, int) and s in clean else t) for s, t in batch]
        work = self._work(joined)
        given = {s: len(t) for s, t in work}
        for s, d in clean.items():
            if given.get(s, 0) <= d.size:
                raise BadRequest(f"the draft of sequence {s} follows no tokens in the batch")
        self._seqs.decode([(s, np.asarray(t, dtype=np.int32)) for s, t in work],
                          drafts={s: int(d.size) for s, d in clean.items()})

    def draft_accept(self, seq: int) -> None:
        self._need()
        s = self._check_seq(seq)
        if not self._seqs.draft_left(s):
            raise BadRequest(f"sequence {s} has no pending draft")
        self._seqs.accept_draft(s)

    def draft_reject(self, seq: int) -> None:
        self._need()
        self._seqs.reject_draft(self._check_seq(seq))

    def _work(self, batch: Any) -> list[tuple[int, np.ndarray | list[int]]]:
        """``batch`` validated (sequences, token ids, context room) and sorted by
        sequence, without empty items."""
        if isinstance(batch, (str, bytes)) or not isinstance(batch, Sequence):
            raise BadRequest("batch must be a list of (seq, tokens) pairs")
        work: list[tuple[int, np.ndarray | list[int]]] = []
        seen: set[int] = set()
        nv = self.n_vocab
        for item in batch:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise BadRequest("batch items must be (seq, tokens) pairs")
            s = self._check_seq(item[0])
            if s in seen:
                raise BadRequest(f"sequence {s} appears twice in one batch")
            seen.add(s)
            toks: Any = item[1]
            if (type(toks) is list and len(toks) <= _SMALL
                    and all(type(t) is int and 0 <= t < nv for t in toks)):
                n = len(toks)  # the decode step: a few valid ints, no numpy needed
            else:
                toks = self._tok_array(toks)
                n = toks.size
            if len(self._tokens[s]) + n > self.n_ctx:
                raise BadRequest(f"sequence {s} would exceed the context: {len(self._tokens[s])} "
                                 f"+ {n} > n_ctx {self.n_ctx}")
            if n:
                work.append((s, toks))
        # llama.cpp splits a batch whose sequences are out of order into more
        # micro-batches (8 sequences in descending order decode ~2x slower)
        if len(work) > 1:
            work.sort(key=lambda w: w[0])
        return work

    def _small_work(self, batch: list[Any]) -> list[tuple[int, list[int]]] | None:
        """``batch`` sorted by sequence when it is the decode step's shape, valid, and
        at most _SMALL tokens; None sends it down the general path (which also gives
        the precise error for anything invalid)."""
        nv, nsm, n_ctx, toks_of = self.n_vocab, self.n_seq_max, self.n_ctx, self._tokens
        work: list[tuple[int, list[int]]] = []
        seen: set[int] = set()
        total = 0
        for item in batch:
            if type(item) is not tuple or len(item) != 2:
                return None
            s, toks = item
            if type(s) is not int or not 0 <= s < nsm or s in seen or type(toks) is not list:
                return None
            seen.add(s)
            n = len(toks)
            total += n
            if total > _SMALL or len(toks_of[s]) + n > n_ctx:
                return None
            for t in toks:
                if type(t) is not int or not 0 <= t < nv:
                    return None
            if n:
                work.append(item)
        if len(work) > 1:
            work.sort(key=lambda w: w[0])
        return work

    # ------------------------------------------------------------------ sampling
    def set_sampling(self, seq: int, params: SamplingParams) -> None:
        self._need()
        s = self._check_seq(seq)
        if isinstance(params, dict):
            params = SamplingParams.from_dict(params)
        if not isinstance(params, SamplingParams):
            raise BadRequest("sampling parameters must be a SamplingParams")
        params.validate()
        new = self._build_sampler(params, s)
        old = self._samplers[s]
        self._samplers[s] = new
        if old is not None:
            old.free()

    def _build_sampler(self, p: SamplingParams, seq: int) -> SeqSampler:
        for tok in p.logit_bias:
            if not 0 <= tok < self.n_vocab:
                raise BadRequest(f"logit_bias token id {tok} out of range [0, {self.n_vocab})")
        grammar = compile_grammar(self._model, p)
        return SeqSampler(self._model, self._cand, p, grammar, history=self._tokens, seq=seq,
                          n_ctx=self.n_ctx, seed=seed_for(p.seed, self.seed_opt))

    def token_logprob(self, seq: int, token: int, top_n: int) -> TokenLogprob:
        self._need()
        row = self._logits[self._check_seq(seq)].astype(np.float64)
        peak = row.max()
        logp = row - (peak + np.log(np.exp(row - peak).sum()))

        def entry(t: int) -> TokenLogprob:
            return {"token": t, "bytes": self.token_to_piece(t, special=True),
                    "logprob": float(logp[t])}

        top: list[int] = []
        if top_n > 0:
            idx = np.argpartition(-logp, top_n - 1)[:top_n]
            top = [int(t) for t in idx[np.lexsort((idx, -logp[idx]))]]
        return {**entry(token), "top": [entry(t) for t in top]}

    def sample(self, seq: int) -> int | None:
        self._need()
        s = self._check_seq(seq)
        if not self._has_logits[s]:
            raise BadRequest(f"sequence {s} has no logits (evaluate tokens first)")
        smp = self._samplers[s]
        if smp is None:
            smp = self._samplers[s] = self._build_sampler(self.default_params, s)
        return smp.sample(self._logits[s])

    def accept(self, seq: int, tokens: Sequence[int]) -> None:
        self._need()
        s = self._check_seq(seq)
        self.check_tokens(tokens)
        smp = self._samplers[s]
        if smp is None:
            smp = self._samplers[s] = self._build_sampler(self.default_params, s)
        for t in tokens:
            smp.accept(int(t))

    # ------------------------------------------------------------------ KV state
    def _kv_shape(self) -> kvformat.KVShape:
        return kvformat.KVShape(
            model_id=self._model_id, n_vocab=self.n_vocab, n_layer=self.n_layer,
            n_embd=self.n_embd, kv_unified=self.kv_unified_opt,
            flash_attn=self.flash_attn_opt != "off", type_k=_GGML_TYPES[self.type_k_opt],
            type_v=_GGML_TYPES[self.type_v_opt],
            n_stream=0 if self.kv_unified_opt else self.n_seq_max,
            adapter_id=self._lora.identity())

    def kv_pack(self, seq: int) -> bytes:
        return self.kv_snapshot(seq)()

    def kv_snapshot(self, seq: int) -> Callable[[], bytes]:
        self._need()
        s = self._check_seq(seq)
        self._seqs.reject_draft(s)
        tokens, shape = list(self._tokens[s]), self._kv_shape()
        # the one native read (a few ms per 1,000 SmolLM2 tokens) goes straight into
        # the blob; its header and CRC32 (most of the cost) are left to the caller
        buf, payload = kvformat.blank(len(tokens), self._ctx.state_seq_size(s))
        try:
            self._ctx.state_seq_get_into(s, payload)
        finally:
            payload.release()
        return lambda: kvformat.seal(buf, shape, tokens)

    def kv_unpack(self, seq: int, data: bytes) -> int:
        self._need()
        s = self._check_seq(seq)
        blob = kvformat.unpack(data)
        kvformat.check_compatible(blob.shape, self._kv_shape())
        n = len(blob.tokens)
        if n > self.n_ctx:
            raise BadRequest(f"KV blob holds {n} tokens, more than n_ctx {self.n_ctx}")
        self.seq_clear(s)
        if n:
            self._seqs.restore(s, blob.tokens, blob.payload)
        return n

    def seq_truncate(self, seq: int, n_keep: int) -> None:
        self._need()
        s = self._check_seq(seq)
        n = len(self._tokens[s])
        if isinstance(n_keep, bool) or not isinstance(n_keep, int) or not 1 <= n_keep <= n:
            raise BadRequest(f"cannot keep {n_keep!r} of {n} tokens")
        self._seqs.truncate(s, n_keep)

    def cache_namespace(self) -> str:
        self._need()
        shape = self._kv_shape()
        return (f"llama:{shape.model_id.hex()}:{shape.adapter_id.hex()}:{int(shape.flash_attn)}:"
                f"{shape.type_k}:{shape.type_v}:{int(shape.kv_unified)}:{shape.n_stream}")

    # ------------------------------------------------------------------ adapters
    def load_adapter(self, name: str, path: str) -> dict[str, Any]:
        self._need()
        if not isinstance(name, str) or not name:
            raise BadRequest("adapter name must be a non-empty string")
        if name in self._lora.loaded:
            raise BadRequest(f"adapter {name!r} is already loaded (unload it first)")
        return self._lora.load(name, path, self.architecture)

    def set_adapters(self, scales: dict[str, float]) -> None:
        self._need()
        if not isinstance(scales, dict):
            raise BadRequest("adapters must be a map of name to scale")
        clean: dict[str, float] = {}
        for k, v in scales.items():
            if k not in self._lora.loaded:
                raise NotFound(f"no adapter named {k!r}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise BadRequest(f"scale of adapter {k!r} must be a finite number")
            clean[k] = float(v)
        self._lora.apply(clean)

    def unload_adapter(self, name: str) -> None:
        self._need()
        if name not in self._lora.loaded:
            raise NotFound(f"no adapter named {name!r}")
        self._lora.unload(name)

    def adapters(self) -> dict[str, Any]:
        return {} if self.ctx is None else self._lora.describe()

    # ------------------------------------------------------------------ embeddings & chat
    def _embed_context(self) -> native.LlamaEmbeddingContext:
        if self._embed_ctx is None:
            self._embed_ctx = _embed.open_context(
                self._model, n_ubatch=self.n_ubatch, n_threads=self.n_threads_opt,
                n_threads_batch=self.n_threads_batch_opt, flash_attn=_FLASH[self.flash_attn_opt],
                pooling=_POOLING[self.pooling_opt], abort=self._abort_flag)
        return self._embed_ctx

    def embed(self, texts: Sequence[str], normalize: bool = True) -> list[list[float]]:
        self._need()
        token_lists = [self.tokenize(t, add_special=True) for t in _embed.check_texts(texts)]
        return _embed.embed(self._embed_context(), token_lists, normalize)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], *,
                            add_generation_prompt: bool = True,
                            template: str | None = None,
                            enable_thinking: bool | None = None,
                            tools: Sequence[dict[str, Any]] | None = None) -> str:
        self._need()
        from llamafleet.backends.chat_template import render_chat_template
        tmpl = template if template is not None else self.chat_template
        if not tmpl:
            raise NotSupported("the model has no chat template; pass one explicitly")

        def text(tok: int) -> str:
            if tok < 0:
                return ""
            return self.token_to_piece(tok, special=True).decode("utf-8", "replace")

        return render_chat_template(tmpl, messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=text(self.bos), eos_token=text(self.eos),
                                    enable_thinking=enable_thinking, tools=tools)

    # ------------------------------------------------------------------ control
    def abort(self, flag: bool) -> None:
        if self._abort_flag is not None:
            self._abort_flag.set(flag)
