"""Owners of libllama's native handles: the layer between the raw cffi binding
(:mod:`.binding`, :mod:`._cdef`) and :class:`~.backend.LlamaBackend`'s policy.

One small class per handle, each freeing its handle exactly once: ``close()`` is
idempotent and ``__del__`` calls it. A model closes what depends on it (contexts,
adapters, grammar samplers) before freeing itself, so no garbage-collection order
frees a context after its model. Nothing here validates a request: callers pass
checked values (llama.cpp aborts the process on bad tokens or sequence ids).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence, Sized
from typing import Any

import numpy as np

from llamafleet.backends.base import ProgressCallback
from llamafleet.runtime.errors import BadRequest, Cancelled, InternalError, LlamafleetError

_NEG_INF = float("-inf")
#: ``llama_token_data``: what a candidates array holds
TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


def max_parallel_sequences(lib: Any) -> int:
    """The most sequences one context may hold in this build."""
    return int(lib.llama_max_parallel_sequences())


def library_version(ffi: Any, lib: Any) -> str:
    """libllama's version string."""
    return str(ffi.string(lib.llama_version()).decode())


class NullHandle(Exception):
    """A libllama constructor returned NULL (the caller says why it matters)."""


class _Owner:
    """Owns one native pointer (``ptr``; None once freed) and frees it exactly once."""

    ptr: Any = None

    def __init__(self, ffi: Any, lib: Any, ptr: Any) -> None:
        if ptr == ffi.NULL:
            raise NullHandle(type(self).__name__)
        self.ffi, self.lib, self.ptr = ffi, lib, ptr

    def _free(self, ptr: Any) -> None:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        return self.ptr is None

    def close(self) -> None:
        """Free the handle; later calls do nothing."""
        ptr, self.ptr = self.ptr, None
        if ptr is not None:
            self._free(ptr)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass


class LlamaModel(_Owner):
    """A loaded ``llama_model*``: sizes, vocabulary and metadata reads."""

    def __init__(self, ffi: Any, lib: Any, ptr: Any) -> None:
        super().__init__(ffi, lib, ptr)
        L = lib
        self._dependents: weakref.WeakSet[_Owner] = weakref.WeakSet()
        self.vocab = L.llama_model_get_vocab(ptr)
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(L.llama_model_n_ctx_train(ptr))
        self.n_layer = int(L.llama_model_n_layer(ptr))
        self.n_embd = int(L.llama_model_n_embd(ptr))
        self.n_embd_out = int(L.llama_model_n_embd_out(ptr))
        self.n_cls_out = int(L.llama_model_n_cls_out(ptr))
        self.n_params = int(L.llama_model_n_params(ptr))
        self.size = int(L.llama_model_size(ptr))
        self.has_encoder = bool(L.llama_model_has_encoder(ptr))
        self.has_decoder = bool(L.llama_model_has_decoder(ptr))
        #: recurrent or hybrid: its memory cannot always drop tokens
        self.recurrent = bool(L.llama_model_is_recurrent(ptr) or L.llama_model_is_hybrid(ptr))
        self.bos = int(L.llama_vocab_bos(self.vocab))
        self.eos = int(L.llama_vocab_eos(self.vocab))
        self._piece_buf = ffi.new("char[]", 256)

    @classmethod
    def load(cls, ffi: Any, lib: Any, path: str, *, n_gpu_layers: int, load_mode: int,
             progress: ProgressCallback | None = None) -> LlamaModel:
        """Load ``path``, reporting progress in [0, 1] (NullHandle when llama.cpp fails).

        An exception from ``progress`` stops the load: a LlamafleetError is re-raised
        as is, anything else as Cancelled."""
        mp = lib.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        mp.load_mode = load_mode
        failure: list[BaseException] = []

        def on_progress(fraction: float, _ud: Any) -> bool:
            if progress is not None and not failure:
                try:
                    progress(max(0.0, min(1.0, float(fraction))))
                except BaseException as exc:  # noqa: BLE001 - reported after the load
                    failure.append(exc)
                    return False
            return True

        cb = ffi.callback("bool(float, void *)", on_progress, onerror=lambda *a: False)
        mp.progress_callback = cb
        ptr = lib.llama_model_load_from_file(path.encode(), mp)
        del cb
        if failure:
            if ptr != ffi.NULL:
                lib.llama_model_free(ptr)
            exc = failure[0]
            if isinstance(exc, LlamafleetError):
                raise exc
            raise Cancelled(f"model loading stopped by the progress callback: {exc!r}")
        return cls(ffi, lib, ptr)

    def _free(self, ptr: Any) -> None:
        for dep in list(self._dependents):  # contexts and adapters go first
            dep.close()
        self.lib.llama_model_free(ptr)

    def adopt(self, dependent: _Owner) -> None:
        """Close ``dependent`` before this model is freed."""
        self._dependents.add(dependent)

    # -- metadata
    def meta(self, key: str) -> str | None:
        """A metadata value as llama.cpp prints it (None when absent)."""
        ffi, L = self.ffi, self.lib
        buf = ffi.new("char[]", 512)
        n = L.llama_model_meta_val_str(self.ptr, key.encode(), buf, 512)
        if n < 0:
            return None
        if n >= 512:
            buf = ffi.new("char[]", n + 1)
            L.llama_model_meta_val_str(self.ptr, key.encode(), buf, n + 1)
        return ffi.string(buf).decode("utf-8", "replace")

    def chat_template(self) -> str | None:
        """The GGUF's default chat template (Jinja text), or None."""
        ffi = self.ffi
        p = self.lib.llama_model_chat_template(self.ptr, ffi.NULL)
        return ffi.string(p).decode("utf-8", "replace") if p != ffi.NULL else None

    def desc(self) -> str:
        """llama.cpp's one-line description (architecture, size, type)."""
        buf = self.ffi.new("char[]", 256)
        self.lib.llama_model_desc(self.ptr, buf, 256)
        return self.ffi.string(buf).decode()

    # -- vocabulary (ids checked by the caller)
    def eog_tokens(self) -> frozenset[int]:
        """Every end-of-generation token id."""
        L, v = self.lib, self.vocab
        return frozenset(t for t in range(self.n_vocab) if L.llama_vocab_is_eog(v, t))

    def tokenize(self, data: bytes, add_special: bool, parse_special: bool) -> list[int]:
        """UTF-8 bytes to token ids."""
        ffi, L = self.ffi, self.lib
        cap = len(data) + 8
        buf = ffi.new("llama_token[]", cap)
        n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            if n == -(1 << 31):
                raise BadRequest("text produces too many tokens")
            cap = -n
            buf = ffi.new("llama_token[]", cap)
            n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special,
                                 parse_special)
            if n < 0:
                raise InternalError("llama_tokenize failed twice")
        return list(ffi.unpack(buf, n))

    def token_to_piece(self, token: int, special: bool) -> bytes:
        """The bytes one (valid) token renders to."""
        ffi, L = self.ffi, self.lib
        n = L.llama_token_to_piece(self.vocab, token, self._piece_buf, 256, 0, special)
        if n >= 0:
            return ffi.unpack(self._piece_buf, n)
        buf = ffi.new("char[]", -n)
        n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            raise InternalError("llama_token_to_piece failed twice")
        return ffi.unpack(buf, n)

    def detokenize(self, tokens: np.ndarray, special: bool) -> bytes:
        """Valid int32 token ids to text bytes (special tokens rendered when ``special``)."""
        ffi, L = self.ffi, self.lib
        n_tok = int(tokens.size)
        toks = ffi.from_buffer("llama_token[]", np.ascontiguousarray(tokens))
        cap = max(64, n_tok * 8)
        buf = ffi.new("char[]", cap)
        n = L.llama_detokenize(self.vocab, toks, n_tok, buf, cap, False, special)
        if n < 0:
            buf = ffi.new("char[]", -n)
            n = L.llama_detokenize(self.vocab, toks, n_tok, buf, -n, False, special)
            if n < 0:
                raise InternalError("llama_detokenize failed twice")
        return ffi.unpack(buf, n)


class LlamaAdapter(_Owner):
    """A LoRA adapter (``llama_adapter_lora*``) loaded for one model."""

    def __init__(self, model: LlamaModel, path: str) -> None:
        super().__init__(model.ffi, model.lib,
                         model.lib.llama_adapter_lora_init(model.ptr, path.encode()))
        model.adopt(self)

    def _free(self, ptr: Any) -> None:
        self.lib.llama_adapter_lora_free(ptr)


class AbortFlag:
    """A native abort callback with no Python on the compute path.

    llama.cpp polls ``bool cb(void *data)`` for every graph node. libc's ``strlen``
    over the 2-byte buffer ``[flag, 0]`` returns 0 or 1, which is exactly that
    predicate; :meth:`set` flips the flag from any thread."""

    def __init__(self, ffi: Any) -> None:
        self.data = ffi.new("char[2]")
        self._libc = ffi.dlopen(None)
        self.callback = ffi.cast("ggml_abort_callback", ffi.addressof(self._libc, "strlen"))

    def set(self, flag: bool) -> None:
        self.data[0] = b"\x01" if flag else b"\x00"


class LlamaBatch:
    """A ``llama_batch`` over arrays of our own: one sequence id per token
    (``seq_id[i]`` points into one int32 array), filled in place."""

    def __init__(self, ffi: Any, n_max: int, *, outputs: bool = False) -> None:
        self.n_max = n_max
        self.token = ffi.new("llama_token[]", n_max)
        self.pos = ffi.new("llama_pos[]", n_max)
        self.n_seq = ffi.new("int32_t[]", [1] * n_max)
        self.seq = ffi.new("llama_seq_id[]", n_max)
        self.seqp = ffi.new("llama_seq_id *[]", n_max)
        self.logits = ffi.new("int8_t[]", [1] * n_max if outputs else n_max)
        seq, seqp = self.seq, self.seqp
        for i in range(n_max):
            seqp[i] = seq + i
        self.c = ffi.new("llama_batch *")
        c = self.c
        c.token, c.embd, c.pos = self.token, ffi.NULL, self.pos
        c.n_seq_id, c.seq_id, c.logits = self.n_seq, self.seqp, self.logits
        self.np_token = np.frombuffer(ffi.buffer(self.token), dtype=np.int32)
        self.np_pos = np.frombuffer(ffi.buffer(self.pos), dtype=np.int32)
        self.np_seq = np.frombuffer(ffi.buffer(self.seq), dtype=np.int32)
        self.np_logits = np.frombuffer(ffi.buffer(self.logits), dtype=np.int8)

    def fill_small(self, work: Sequence[tuple[int, list[int]]],
                   history: Sequence[Sized]) -> tuple[int, list[tuple[int, int, int]]]:
        """The decode step (a few tokens per sequence, lists of ints): plain stores
        from index 0, positions continuing after ``history[seq]``, the last token of
        each sequence an output. Returns the token count and the ``(seq, 0, batch
        index)`` of every output (0: the sequence's last token).

        Decode time is dominated by llama.cpp, but on a small model a hundred
        microseconds of cache-cold Python per token is a few percent."""
        bt, bp, bs, bl = self.token, self.pos, self.seq, self.logits
        outs: list[tuple[int, int, int]] = []
        i = 0
        for s, toks in work:
            pos = len(history[s])
            for t in toks:
                bt[i] = t
                bp[i] = pos
                bs[i] = s
                bl[i] = 0
                i += 1
                pos += 1
            bl[i - 1] = 1
            outs.append((s, 0, i - 1))
        return i, outs

    def put(self, at: int, tokens: np.ndarray, pos0: int, seq: int) -> None:
        """Tokens at ``at..`` with positions from ``pos0``, no outputs (numpy stores)."""
        end = at + tokens.size
        self.np_token[at:end] = tokens
        self.np_pos[at:end] = np.arange(pos0, pos0 + tokens.size, dtype=np.int32)
        self.np_seq[at:end] = seq
        self.np_logits[at:end] = 0

    def set_sequence(self, tokens: Sequence[int], seq: int = 0) -> int:
        """One whole sequence from position 0 (outputs left as they are)."""
        n = len(tokens)
        self.np_token[:n] = tokens
        self.np_pos[:n] = np.arange(n, dtype=np.int32)
        self.np_seq[:n] = seq
        return n


class LlamaContext(_Owner):
    """A ``llama_context*`` (with its memory): decode, logits, KV sequence ops."""

    def __init__(self, model: LlamaModel, *, n_ctx: int, n_batch: int, n_ubatch: int,
                 n_seq_max: int, n_threads: int, n_threads_batch: int, flash_attn: int,
                 type_k: int | None = None, type_v: int | None = None,
                 kv_unified: bool | None = None, embeddings: bool = False,
                 pooling: int | None = None, abort: AbortFlag | None = None) -> None:
        ffi, L = model.ffi, model.lib
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = n_ubatch
        cp.n_seq_max = n_seq_max
        cp.n_threads = n_threads
        cp.n_threads_batch = n_threads_batch
        cp.flash_attn_type = flash_attn
        if kv_unified is not None:
            cp.kv_unified = kv_unified
        if type_k is not None:
            cp.type_k = type_k
        if type_v is not None:
            cp.type_v = type_v
        cp.embeddings = embeddings
        if pooling is not None:
            cp.pooling_type = pooling
        cp.no_perf = True
        if abort is not None:
            cp.abort_callback, cp.abort_callback_data = abort.callback, abort.data
            self._abort = abort  # the flag buffer lives as long as the context
        super().__init__(ffi, L, L.llama_init_from_model(model.ptr, cp))
        model.adopt(self)
        self.model = model
        self.params = cp
        ptr = self.ptr
        self.mem = L.llama_get_memory(ptr)
        self.n_ctx = int(L.llama_n_ctx(ptr))
        self.n_ctx_seq = int(L.llama_n_ctx_seq(ptr))
        self.n_batch = int(L.llama_n_batch(ptr))
        self.n_ubatch = int(L.llama_n_ubatch(ptr))
        self.n_seq_max = int(L.llama_n_seq_max(ptr))
        self.pooling = int(L.llama_pooling_type(ptr))
        self._logits_nbytes = model.n_vocab * 4

    def _free(self, ptr: Any) -> None:
        self.lib.llama_free(ptr)

    # -- compute
    def decode(self, batch: LlamaBatch, n: int) -> int:
        """``llama_decode`` of the first ``n`` tokens of ``batch``; its return code."""
        c = batch.c
        c.n_tokens = n
        return self.lib.llama_decode(self.ptr, c[0])

    def encode(self, batch: LlamaBatch, n: int) -> int:
        """``llama_encode`` of the first ``n`` tokens of ``batch``; its return code."""
        c = batch.c
        c.n_tokens = n
        return self.lib.llama_encode(self.ptr, c[0])

    def logits_ith(self, i: int) -> np.ndarray | None:
        """The logits row of output ``i`` of the last decode (a view; None if none)."""
        p = self.lib.llama_get_logits_ith(self.ptr, i)
        if p == self.ffi.NULL:
            return None
        return np.frombuffer(self.ffi.buffer(p, self._logits_nbytes), dtype=np.float32)

    def embeddings_ith(self, i: int, n: int) -> np.ndarray | None:
        """The ``n`` embedding floats of token ``i`` (a view; None if none)."""
        p = self.lib.llama_get_embeddings_ith(self.ptr, i)
        if p == self.ffi.NULL:
            return None
        return np.frombuffer(self.ffi.buffer(p, n * 4), dtype=np.float32)

    def embeddings_seq(self, seq: int, n: int) -> np.ndarray | None:
        """The ``n`` pooled embedding floats of sequence ``seq`` (a view; None if none)."""
        p = self.lib.llama_get_embeddings_seq(self.ptr, seq)
        if p == self.ffi.NULL:
            return None
        return np.frombuffer(self.ffi.buffer(p, n * 4), dtype=np.float32)

    def set_adapters(self, adapters: Sequence[LlamaAdapter], scales: Sequence[float]) -> int:
        """Replace the active LoRA set (empty clears); llama.cpp's return code."""
        ffi, L = self.ffi, self.lib
        if not adapters:
            return int(L.llama_set_adapters_lora(self.ptr, ffi.NULL, 0, ffi.NULL))
        arr = ffi.new("struct llama_adapter_lora *[]", [a.ptr for a in adapters])
        sc = ffi.new("float[]", [float(s) for s in scales])
        return int(L.llama_set_adapters_lora(self.ptr, arr, len(adapters), sc))

    # -- memory (KV cells)
    def memory_clear(self, data: bool = True) -> None:
        if self.mem != self.ffi.NULL:
            self.lib.llama_memory_clear(self.mem, data)

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> bool:
        """Drop positions ``[p0, p1)`` of ``seq`` (-1: open end); False if impossible."""
        return bool(self.lib.llama_memory_seq_rm(self.mem, seq, p0, p1))

    def seq_pos_min(self, seq: int) -> int:
        return int(self.lib.llama_memory_seq_pos_min(self.mem, seq))

    def seq_pos_max(self, seq: int) -> int:
        return int(self.lib.llama_memory_seq_pos_max(self.mem, seq))

    # -- sequence state
    def state_seq_size(self, seq: int) -> int:
        """Bytes of the sequence's state blob."""
        return int(self.lib.llama_state_seq_get_size(self.ptr, seq))

    def state_seq_get_into(self, seq: int, out: memoryview) -> None:
        """Write the sequence's state blob (exactly ``state_seq_size`` bytes) into ``out``."""
        size = len(out)
        got = int(self.lib.llama_state_seq_get_data(self.ptr, self.ffi.from_buffer(out), size,
                                                    seq))
        if got != size:
            raise InternalError(f"llama_state_seq_get_data wrote {got} of {size} bytes")

    def state_seq_get(self, seq: int) -> bytes:
        """The sequence's state blob (KV cells and positions)."""
        buf = bytearray(self.state_seq_size(seq))
        self.state_seq_get_into(seq, memoryview(buf))
        return bytes(buf)

    def state_seq_set(self, seq: int, data: bytes) -> bool:
        """Load a blob from :meth:`state_seq_get` into ``seq``; False when refused."""
        return self.lib.llama_state_seq_set_data(self.ptr, self.ffi.from_buffer(data),
                                                 len(data), seq) != 0


class LlamaEmbeddingContext(LlamaContext):
    """The second context ``embed`` uses: embeddings on, one sequence of at most
    ``n_max`` tokens (cells, batch and micro-batch alike), its own batch."""

    def __init__(self, model: LlamaModel, *, n_max: int, n_threads: int, n_threads_batch: int,
                 flash_attn: int, pooling: int, abort: AbortFlag | None = None) -> None:
        super().__init__(model, n_ctx=n_max, n_batch=n_max, n_ubatch=n_max, n_seq_max=1,
                         n_threads=n_threads, n_threads_batch=n_threads_batch,
                         flash_attn=flash_attn, embeddings=True, pooling=pooling, abort=abort)
        #: the longest sequence one run takes
        self.n_max = min(n_max, self.n_ctx, self.n_ubatch)
        #: floats per pooled vector (rank pooling: classifier outputs)
        self.dim = model.n_cls_out if self.pooling == 4 else model.n_embd_out
        self.batch = LlamaBatch(model.ffi, self.n_max, outputs=True)
        self._encoder = model.has_encoder

    def run(self, tokens: Sequence[int]) -> int:
        """Clear the memory and compute ``tokens`` (at most ``n_max``) as sequence 0;
        llama.cpp's return code."""
        self.memory_clear()
        n = self.batch.set_sequence(tokens)
        return (self.encode if self._encoder else self.decode)(self.batch, n)


class LlamaTokenDataArray:
    """The candidates array samplers run on (``n_vocab`` entries), plus a
    one-entry array for asking a grammar about a single token."""

    def __init__(self, ffi: Any, n_vocab: int) -> None:
        self.ffi = ffi
        self.n_vocab = n_vocab
        self.data = ffi.new("llama_token_data[]", n_vocab)
        self.np = np.frombuffer(ffi.buffer(self.data), dtype=TOKEN_DATA)
        self.ids = np.arange(n_vocab, dtype=np.int32)
        self.p = ffi.new("llama_token_data_array *")
        self._one = ffi.new("llama_token_data[]", 1)
        self._one_p = ffi.new("llama_token_data_array *")

    def fill(self, logits: np.ndarray) -> Any:
        """Every token with its logit, unsorted, nothing selected; the array pointer."""
        cand = self.np
        cand["id"] = self.ids
        cand["logit"] = logits
        cand["p"] = 0.0
        cur = self.p
        cur.data = self.data
        cur.size = self.n_vocab
        cur.selected = -1
        cur.sorted = False
        return cur

    def all_masked(self, cur: Any) -> bool:
        """True when ``cur`` holds nothing but -inf logits (or nothing at all)."""
        n = cur.size
        if n == 0:
            return True
        arr = np.frombuffer(self.ffi.buffer(cur.data, n * 12), dtype=TOKEN_DATA)
        return bool(np.isneginf(arr["logit"]).all())

    @staticmethod
    def selected(cur: Any) -> int | None:
        """The token a sampler selected in ``cur`` (None when none or masked)."""
        sel = cur.selected
        if sel < 0 or sel >= cur.size:
            return None
        d = cur.data[sel]
        if d.logit == _NEG_INF:
            return None
        return int(d.id)

    def single(self, token: int) -> Any:
        """A one-token array (logit 0) for ``token``."""
        one, onep = self._one, self._one_p
        one[0].id = token
        one[0].logit = 0.0
        one[0].p = 0.0
        onep.data = one
        onep.size = 1
        onep.selected = -1
        onep.sorted = False
        return onep

    def single_masked(self) -> bool:
        """Whether the sampler applied to :meth:`single`'s array masked the token."""
        return self._one[0].logit == _NEG_INF


class LlamaSampler(_Owner):
    """One ``llama_sampler*``; a chain (:meth:`chain`) owns the samplers added to it."""

    @classmethod
    def chain(cls, ffi: Any, lib: Any) -> LlamaSampler:
        cparams = lib.llama_sampler_chain_default_params()
        cparams.no_perf = True
        return cls(ffi, lib, lib.llama_sampler_chain_init(cparams))

    @classmethod
    def grammar(cls, model: LlamaModel, text: str, root: str = "root") -> LlamaSampler:
        """A GBNF grammar sampler (NullHandle when llama.cpp cannot parse it)."""
        smp = cls(model.ffi, model.lib,
                  model.lib.llama_sampler_init_grammar(model.vocab, text.encode(),
                                                       root.encode()))
        model.adopt(smp)
        return smp

    def _free(self, ptr: Any) -> None:
        self.lib.llama_sampler_free(ptr)

    def _add(self, smp: Any) -> Any:
        self.lib.llama_sampler_chain_add(self.ptr, smp)
        return smp

    # chain building: each returns the raw sampler added (owned by the chain)
    def add_logit_bias(self, n_vocab: int, bias: dict[int, float]) -> Any:
        items = list(bias.items())
        arr = self.ffi.new("llama_logit_bias[]", [{"token": t, "bias": b} for t, b in items])
        self._bias_keep = arr
        return self._add(self.lib.llama_sampler_init_logit_bias(n_vocab, len(items), arr))

    def add_penalties(self, n_vocab: int, last_n: int, repeat: float, freq: float,
                      present: float) -> Any:
        return self._add(self.lib.llama_sampler_init_penalties(n_vocab, last_n, repeat, freq,
                                                               present))

    def add_greedy(self) -> Any:
        return self._add(self.lib.llama_sampler_init_greedy())

    def add_top_k(self, k: int) -> Any:
        return self._add(self.lib.llama_sampler_init_top_k(k))

    def add_typical(self, p: float, min_keep: int = 1) -> Any:
        return self._add(self.lib.llama_sampler_init_typical(p, min_keep))

    def add_top_p(self, p: float, min_keep: int = 1) -> Any:
        return self._add(self.lib.llama_sampler_init_top_p(p, min_keep))

    def add_min_p(self, p: float, min_keep: int = 1) -> Any:
        return self._add(self.lib.llama_sampler_init_min_p(p, min_keep))

    def add_temp(self, t: float) -> Any:
        return self._add(self.lib.llama_sampler_init_temp(t))

    def add_dist(self, seed: int) -> Any:
        return self._add(self.lib.llama_sampler_init_dist(seed))

    # use
    def apply(self, cur: Any) -> None:
        self.lib.llama_sampler_apply(self.ptr, cur)

    def accept(self, token: int) -> None:
        self.lib.llama_sampler_accept(self.ptr, token)

    def reset(self) -> None:
        self.lib.llama_sampler_reset(self.ptr)

    def feed(self, smp: Any, tokens: Sequence[int]) -> None:
        """Accept ``tokens`` into one sampler of this chain (from an ``add_*`` call)."""
        accept = self.lib.llama_sampler_accept
        for t in tokens:
            accept(smp, t)
