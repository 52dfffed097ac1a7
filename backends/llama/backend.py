"""The real backend: libllama through our own cffi (ABI mode) binding.

Options (worker config ``[models.NAME]``; unknown or badly typed ones are a BadRequest):

=================  =======================================================================
``path``           GGUF model file (required)
``name``           model name reported by ``info`` (default: ``general.name`` or file name)
``n_ctx``          tokens per sequence (default 4096, capped to the training context);
                   the context holds ``n_ctx * n_seq_max`` cells in all
``n_seq_max``      number of sequences (default 4)
``n_batch``        most tokens per ``llama_decode`` (default 512)
``n_ubatch``       physical micro-batch (default 512, at most ``n_batch``); also the
                   longest text ``embed`` accepts
``n_threads``      generation threads (default: CPUs this process may use)
``n_threads_batch``  prompt threads (default: ``n_threads``)
``n_gpu_layers``   layers to offload (default 0; -1 = all)
``flash_attn``     "auto" | "on" | "off" (default "auto"; booleans accepted)
``kv_unified``     one KV buffer shared by all sequences (default false)
``type_k``/``type_v``  KV cache types: f16 (default), f32, bf16, q8_0, q4_0, q4_1, q5_0,
                   q5_1, iq4_nl (a quantized V cache needs flash attention)
``embeddings``     create the embedding context at load instead of on first ``embed``
``pooling``        "unspecified" (model default, mean if none) | "none" | "mean" | "cls" |
                   "last" | "rank": pooling of the embedding context
``seed``           sampling seed used when a request's seed is negative (default -1: random)
``load_mode``      "auto" | "none" | "mmap" | "mlock" | "mmap_mlock" | "direct_io"
=================  =======================================================================

Design notes:

* Everything a request carries is validated in Python before native code runs:
  llama.cpp aborts the process on out-of-range tokens or sequence ids.
* After each decode the logits row of every sequence that got one is copied into
  a per-sequence numpy buffer, so ``sample`` never reads a stale batch index.
* ``embed`` uses a second, lazily created context (embeddings on, one sequence,
  ``n_ubatch`` cells) so that generation and embeddings work on the same worker;
  LoRA adapters are not applied to it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from backends.base import Backend, ModelInfo, ProgressCallback
from backends.llama import binding, kvformat
from backends.llama.gguf_meta import check_model_file, file_identity, read_metadata
from runtime.errors import (BadRequest, Cancelled, InternalError, LlamafleetError, NotFound,
                            NotSupported, Overloaded)
from runtime.sampling import SamplingParams

log = logging.getLogger("llamafleet.llama")

_GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8,
               "iq4_nl": 20, "bf16": 30}
_POOLING = {"unspecified": -1, "none": 0, "mean": 1, "cls": 2, "last": 3, "rank": 4}
_FLASH = {"auto": -1, "off": 0, "on": 1}
_LOAD_MODE = {"auto": -1, "none": 0, "mmap": 1, "mlock": 2, "mmap_mlock": 3, "direct_io": 4}
LLAMA_DEFAULT_SEED = 0xFFFFFFFF
_NEG_INF = float("-inf")
#: batches of at most this many tokens (given as lists of ints) skip numpy
_SMALL = 16


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _opt_int(o: dict[str, Any], key: str, default: int | None, lo: int, hi: int) -> int | None:
    v = o.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"option {key} must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise BadRequest(f"option {key} must be in [{lo}, {hi}], got {v}")
    return v


def _opt_bool(o: dict[str, Any], key: str, default: bool) -> bool:
    v = o.get(key, default)
    if not isinstance(v, bool):
        raise BadRequest(f"option {key} must be a boolean, got {type(v).__name__}")
    return v


def _opt_choice(o: dict[str, Any], key: str, default: str, table: dict[str, int]) -> str:
    v = o.get(key, default)
    if not isinstance(v, str) or v.lower() not in table:
        raise BadRequest(f"option {key} must be one of {', '.join(table)}, got {v!r}")
    return v.lower()


class LlamaBackend(Backend):
    """One GGUF model and one llama context (plus a lazy embedding context)."""

    name = "llama"
    OPTIONS = frozenset({"path", "name", "n_ctx", "n_seq_max", "n_batch", "n_ubatch",
                         "n_threads", "n_threads_batch", "n_gpu_layers", "flash_attn",
                         "kv_unified", "type_k", "type_v", "embeddings", "pooling", "seed",
                         "load_mode"})

    def __init__(self, options: dict[str, Any]) -> None:
        if not isinstance(options, dict):
            raise BadRequest("backend options must be a mapping")
        super().__init__(options)
        o = self.options
        unknown = sorted(set(o) - self.OPTIONS)
        if unknown:
            raise BadRequest(f"unknown llama option(s): {', '.join(map(str, unknown))} "
                             f"(known: {', '.join(sorted(self.OPTIONS))})")
        path = o.get("path")
        if not isinstance(path, str) or not path:
            raise BadRequest("option path (the GGUF model file) is required")
        self.path = path
        name = o.get("name")
        if name is not None and not isinstance(name, str):
            raise BadRequest("option name must be a string")
        self._name_opt = name
        self.n_ctx_opt = _opt_int(o, "n_ctx", 4096, 16, 1 << 24)
        self.n_seq_max_opt = _opt_int(o, "n_seq_max", 4, 1, 256)
        self.n_batch_opt = _opt_int(o, "n_batch", 512, 1, 1 << 20)
        self.n_ubatch_opt = _opt_int(o, "n_ubatch", 512, 1, 1 << 20)
        self.n_threads_opt = _opt_int(o, "n_threads", _cpu_count(), 1, 1024)
        self.n_threads_batch_opt = _opt_int(o, "n_threads_batch", self.n_threads_opt, 1, 1024)
        self.n_gpu_layers_opt = _opt_int(o, "n_gpu_layers", 0, -1, 1 << 16)
        fa = o.get("flash_attn", "auto")
        if isinstance(fa, bool):
            fa = "on" if fa else "off"
        self.flash_attn_opt = _opt_choice({"flash_attn": fa}, "flash_attn", "auto", _FLASH)
        self.kv_unified_opt = _opt_bool(o, "kv_unified", False)
        self.type_k_opt = _opt_choice(o, "type_k", "f16", _GGML_TYPES)
        self.type_v_opt = _opt_choice(o, "type_v", "f16", _GGML_TYPES)
        self.embeddings_opt = _opt_bool(o, "embeddings", False)
        self.pooling_opt = _opt_choice(o, "pooling", "unspecified", _POOLING)
        self.seed_opt = _opt_int(o, "seed", -1, -(1 << 63), (1 << 32) - 1)
        self.load_mode_opt = _opt_choice(o, "load_mode", "auto", _LOAD_MODE)

        self.ffi: Any = None
        self.lib: Any = None
        self.model: Any = None
        self.ctx: Any = None
        self.vocab: Any = None
        self.mem: Any = None
        self._info: ModelInfo | None = None
        self._closed = False
        self._abort_cb: Any = None
        self._abort_fn: Callable[[], bool] | None = None
        self._embed_ctx: Any = None
        self._adapters: dict[str, dict[str, Any]] = {}
        self._active: dict[str, float] = {}
        self._samplers: list[_SeqSampler | None] = []

    # ------------------------------------------------------------------ lifecycle
    def load(self, progress: ProgressCallback | None = None) -> None:
        if self.model is not None:
            raise BadRequest("model already loaded")
        path = check_model_file(self.path, "model")
        ffi, L = binding.lib()
        self.ffi, self.lib = ffi, L
        self._model_id = file_identity(path)

        mp = L.llama_model_default_params()
        mp.n_gpu_layers = self.n_gpu_layers_opt
        mp.load_mode = _LOAD_MODE[self.load_mode_opt]
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
        model = L.llama_model_load_from_file(path.encode(), mp)
        del cb
        if failure:
            if model != ffi.NULL:
                L.llama_model_free(model)
            exc = failure[0]
            if isinstance(exc, LlamafleetError):
                raise exc
            raise Cancelled(f"model loading stopped by the progress callback: {exc!r}")
        if model == ffi.NULL:
            raise BadRequest(f"llama.cpp could not load the model {path} (truncated, corrupt, "
                             "or an unsupported architecture; see the worker log)")
        self.model = model
        try:
            self._init_context()
        except BaseException:
            self.close()
            raise
        if progress is not None:
            progress(1.0)

    def _init_context(self) -> None:
        ffi, L, model = self.ffi, self.lib, self.model
        self.vocab = L.llama_model_get_vocab(model)
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(L.llama_model_n_ctx_train(model))
        self.n_layer = int(L.llama_model_n_layer(model))
        self.n_embd = int(L.llama_model_n_embd(model))
        if not L.llama_model_has_decoder(model):
            raise BadRequest("encoder-only models cannot generate; this backend needs a decoder")
        self.recurrent = bool(L.llama_model_is_recurrent(model) or L.llama_model_is_hybrid(model))

        n_ctx = self.n_ctx_opt
        if self.n_ctx_train > 0:
            n_ctx = min(n_ctx, self.n_ctx_train)
        n_seq = self.n_seq_max_opt
        max_par = int(L.llama_max_parallel_sequences())
        if n_seq > max_par:
            raise BadRequest(f"n_seq_max {n_seq} exceeds llama.cpp's limit {max_par}")
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx * n_seq
        cp.n_batch = self.n_batch_opt
        cp.n_ubatch = min(self.n_ubatch_opt, self.n_batch_opt)
        cp.n_seq_max = n_seq
        cp.n_threads = self.n_threads_opt
        cp.n_threads_batch = self.n_threads_batch_opt
        cp.flash_attn_type = _FLASH[self.flash_attn_opt]
        cp.kv_unified = self.kv_unified_opt
        cp.type_k = _GGML_TYPES[self.type_k_opt]
        cp.type_v = _GGML_TYPES[self.type_v_opt]
        cp.no_perf = True
        cp.embeddings = False
        cp.abort_callback, cp.abort_callback_data = self._abort_callback()
        ctx = L.llama_init_from_model(model, cp)
        if ctx == ffi.NULL:
            raise BadRequest("llama.cpp could not create the context (out of memory, or an "
                             "unsupported option combination such as a quantized V cache "
                             "with flash_attn off; see the worker log)")
        self.ctx = ctx
        self.mem = L.llama_get_memory(ctx)
        self.n_seq_max = int(L.llama_n_seq_max(ctx))
        self.n_batch = int(L.llama_n_batch(ctx))
        self.n_ubatch = int(L.llama_n_ubatch(ctx))
        self.n_ctx_total = int(L.llama_n_ctx(ctx))
        # our per-sequence limit: what the user asked (capped), never more than llama's
        self.n_ctx = min(n_ctx, int(L.llama_n_ctx_seq(ctx)))
        self._cp = cp

        # per-sequence state
        n = self.n_seq_max
        self._tokens: list[list[int]] = [[] for _ in range(n)]
        self._logits = np.zeros((n, self.n_vocab), dtype=np.float32)
        self._has_logits = [False] * n
        self._samplers = [None] * n
        self._default_params = SamplingParams()

        # preallocated batch (our own arrays; seq_id[i] points into one int32 array)
        nb = self.n_batch
        self._b_token = ffi.new("llama_token[]", nb)
        self._b_pos = ffi.new("llama_pos[]", nb)
        self._b_nseq = ffi.new("int32_t[]", nb)
        self._b_seq = ffi.new("llama_seq_id[]", nb)
        self._b_seqp = ffi.new("llama_seq_id *[]", nb)
        self._b_logits = ffi.new("int8_t[]", nb)
        for i in range(nb):
            self._b_nseq[i] = 1
            self._b_seqp[i] = self._b_seq + i
        self._batch = ffi.new("llama_batch *")
        b = self._batch
        b.token, b.embd, b.pos = self._b_token, ffi.NULL, self._b_pos
        b.n_seq_id, b.seq_id, b.logits = self._b_nseq, self._b_seqp, self._b_logits
        self._np_token = np.frombuffer(ffi.buffer(self._b_token), dtype=np.int32)
        self._np_pos = np.frombuffer(ffi.buffer(self._b_pos), dtype=np.int32)
        self._np_seq = np.frombuffer(ffi.buffer(self._b_seq), dtype=np.int32)
        self._np_logits = np.frombuffer(ffi.buffer(self._b_logits), dtype=np.int8)

        # candidates buffer for sampling
        nv = self.n_vocab
        self._cand = ffi.new("llama_token_data[]", nv)
        self._cand_np = np.frombuffer(ffi.buffer(self._cand), dtype=np.dtype(
            [("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]))
        self._cand_ids = np.arange(nv, dtype=np.int32)
        self._cur_p = ffi.new("llama_token_data_array *")
        self._one = ffi.new("llama_token_data[]", 1)
        self._one_p = ffi.new("llama_token_data_array *")
        self._logits_nbytes = nv * 4

        # vocabulary facts
        self._eog = frozenset(t for t in range(nv) if L.llama_vocab_is_eog(self.vocab, t))
        self.bos = int(L.llama_vocab_bos(self.vocab))
        self.eos = int(L.llama_vocab_eos(self.vocab))
        self._piece_buf = ffi.new("char[]", 256)
        self._pieces: tuple[dict[int, bytes], dict[int, bytes]] = ({}, {})

        if self._abort_fn is not None:
            self.set_abort(self._abort_fn)
        self._shape = self._kv_shape()
        self._info = self._build_info()
        if self.embeddings_opt:
            self._ensure_embed_ctx()

    def _meta(self, key: str) -> str | None:
        ffi, L = self.ffi, self.lib
        buf = ffi.new("char[]", 512)
        n = L.llama_model_meta_val_str(self.model, key.encode(), buf, 512)
        if n < 0:
            return None
        if n >= 512:
            buf = ffi.new("char[]", n + 1)
            L.llama_model_meta_val_str(self.model, key.encode(), buf, n + 1)
        return ffi.string(buf).decode("utf-8", "replace")

    def _build_info(self) -> ModelInfo:
        ffi, L = self.ffi, self.lib
        tmpl_p = L.llama_model_chat_template(self.model, ffi.NULL)
        tmpl = ffi.string(tmpl_p).decode("utf-8", "replace") if tmpl_p != ffi.NULL else None
        self.chat_template = tmpl
        self.architecture = self._meta("general.architecture") or ""
        name = self._name_opt or self._meta("general.name") or \
            os.path.splitext(os.path.basename(self.path))[0]
        desc = ffi.new("char[]", 256)
        L.llama_model_desc(self.model, desc, 256)
        features = ["kv", "grammar", "json_schema", "lora", "embeddings"]
        if tmpl:
            features.append("chat_template")
        return ModelInfo(
            name=name, backend=self.name, architecture=self.architecture,
            n_params=int(L.llama_model_n_params(self.model)), n_vocab=self.n_vocab,
            n_ctx=self.n_ctx, n_ctx_train=self.n_ctx_train, n_batch=self.n_batch,
            n_seq_max=self.n_seq_max, n_embd=self.n_embd,
            bos_token=self.bos if self.bos >= 0 else None,
            eos_token=self.eos if self.eos >= 0 else None,
            chat_template=tmpl, features=features,
            extra={"n_ctx_total": self.n_ctx_total, "n_ubatch": self.n_ubatch,
                   "n_layer": self.n_layer, "description": ffi.string(desc).decode(),
                   "model_size": int(L.llama_model_size(self.model)),
                   "kv_unified": self.kv_unified_opt, "flash_attn": self.flash_attn_opt,
                   "type_k": self.type_k_opt, "type_v": self.type_v_opt,
                   "n_threads": self.n_threads_opt, "n_gpu_layers": self.n_gpu_layers_opt,
                   "library": binding.library_path(),
                   "llama_version": ffi.string(L.llama_version()).decode()},
        )

    def info(self) -> ModelInfo:
        self._need()
        assert self._info is not None
        return self._info

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        L = self.lib
        if L is None:
            return
        for s in self._samplers:
            if s is not None:
                s.free()
        self._samplers = []
        if self.ctx is not None and self._active:
            try:
                L.llama_set_adapters_lora(self.ctx, self.ffi.NULL, 0, self.ffi.NULL)
            except Exception:  # noqa: BLE001
                pass
        self._active = {}
        for a in self._adapters.values():
            L.llama_adapter_lora_free(a["handle"])
        self._adapters = {}
        if self._embed_ctx is not None:
            L.llama_free(self._embed_ctx)
            self._embed_ctx = None
        if self.ctx is not None:
            L.llama_free(self.ctx)
            self.ctx = None
        if self.model is not None:
            L.llama_model_free(self.model)
            self.model = None

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

    def _tok_array(self, tokens: Sequence[int]) -> np.ndarray:
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
        ffi, L = self.ffi, self.lib
        cap = len(data) + 8
        buf = ffi.new("llama_token[]", cap)
        n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, bool(add_special),
                             bool(parse_special))
        if n < 0:
            if n == -(1 << 31):
                raise BadRequest("text produces too many tokens")
            cap = -n
            buf = ffi.new("llama_token[]", cap)
            n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, bool(add_special),
                                 bool(parse_special))
            if n < 0:
                raise InternalError("llama_tokenize failed twice")
        return list(ffi.unpack(buf, n))

    def token_to_piece(self, token: int, special: bool = True) -> bytes:
        self._need()
        t = self._check_token(token)
        cache = self._pieces[bool(special)]
        piece = cache.get(t)
        if piece is None:  # a vocabulary's pieces never change: look each up once
            piece = cache[t] = self._token_to_piece(t, bool(special))
        return piece

    def _token_to_piece(self, t: int, special: bool) -> bytes:
        ffi, L = self.ffi, self.lib
        n = L.llama_token_to_piece(self.vocab, t, self._piece_buf, 256, 0, bool(special))
        if n >= 0:
            return ffi.unpack(self._piece_buf, n)
        buf = ffi.new("char[]", -n)
        n = L.llama_token_to_piece(self.vocab, t, buf, len(buf), 0, bool(special))
        if n < 0:
            raise InternalError("llama_token_to_piece failed twice")
        return ffi.unpack(buf, n)

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
        ffi, L = self.ffi, self.lib
        toks = ffi.from_buffer("llama_token[]", np.ascontiguousarray(arr))
        cap = max(64, arr.size * 8)
        buf = ffi.new("char[]", cap)
        n = L.llama_detokenize(self.vocab, toks, arr.size, buf, cap, False, bool(special))
        if n < 0:
            buf = ffi.new("char[]", -n)
            n = L.llama_detokenize(self.vocab, toks, arr.size, buf, -n, False, bool(special))
            if n < 0:
                raise InternalError("llama_detokenize failed twice")
        return ffi.unpack(buf, n).decode("utf-8", errors="replace")

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
        self.lib.llama_memory_seq_rm(self.mem, s, -1, -1)
        self._tokens[s] = []
        self._has_logits[s] = False
        smp = self._samplers[s]
        if smp is not None:
            smp.reset()

    def evaluate(self, batch: Sequence[tuple[int, Sequence[int]]]) -> None:
        self._need()
        if type(batch) is list:
            small = self._small_work(batch)
            if small is not None:
                if small:
                    self._decode_small(small)
                return
        if isinstance(batch, (str, bytes)) or not isinstance(batch, Sequence):
            raise BadRequest("batch must be a list of (seq, tokens) pairs")
        work: list[tuple[int, np.ndarray | list[int]]] = []
        seen: set[int] = set()
        total = 0
        nv = self.n_vocab
        for item in batch:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise BadRequest("batch items must be (seq, tokens) pairs")
            s = self._check_seq(item[0])
            if s in seen:
                raise BadRequest(f"sequence {s} appears twice in one batch")
            seen.add(s)
            toks: np.ndarray | list[int] = item[1]
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
                total += n
        if work:
            # llama.cpp splits a batch whose sequences are out of order into more
            # micro-batches (8 sequences in descending order decode ~2x slower)
            if len(work) > 1:
                work.sort(key=lambda w: w[0])
            if total <= _SMALL and all(type(t) is list for _, t in work):
                self._decode_small(work)  # type: ignore[arg-type]
            else:
                self._decode([(s, np.asarray(t, dtype=np.int32)) for s, t in work])

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

    def _decode_small(self, work: list[tuple[int, list[int]]]) -> None:
        """The steady state of generation (one token per sequence): plain stores into
        the batch arrays. Decode time is dominated by llama.cpp, but on a small model
        a hundred microseconds of cache-cold Python per token is a few percent."""
        bt, bp, bs, bl = self._b_token, self._b_pos, self._b_seq, self._b_logits
        outs: list[tuple[int, int]] = []
        i = 0
        for s, toks in work:
            pos = len(self._tokens[s])
            for t in toks:
                bt[i] = t
                bp[i] = pos
                bs[i] = s
                bl[i] = 0
                i += 1
                pos += 1
            bl[i - 1] = 1
            outs.append((s, i - 1))
        try:
            self._run_chunk(i, outs, {}, False)
        except BaseException:
            self._rollback({s: len(self._tokens[s]) for s, _ in work})
            raise
        for s, toks in work:
            self._tokens[s].extend(toks)
            self._has_logits[s] = True

    def _rollback(self, old_len: dict[int, int]) -> None:
        """Drop what a failed decode may have appended to each sequence's KV."""
        L = self.lib
        for s, n in old_len.items():
            if not L.llama_memory_seq_rm(self.mem, s, n, -1):
                L.llama_memory_seq_rm(self.mem, s, -1, -1)
                self._tokens[s] = []
                self._has_logits[s] = False

    def _decode(self, work: list[tuple[int, np.ndarray]]) -> None:
        """Decode validated work in chunks of n_batch; all-or-nothing on failure."""
        nb = self.n_batch
        old_len = {s: len(self._tokens[s]) for s, _ in work}
        total = sum(t.size for _, t in work)
        multi = total > nb
        staged: dict[int, np.ndarray] = {}
        done_out: list[tuple[int, int]] = []  # (seq, batch index) outputs of the current chunk
        tok_np, pos_np, seq_np, lg_np = self._np_token, self._np_pos, self._np_seq, self._np_logits
        fill = 0
        try:
            for s, toks in work:
                start = old_len[s]
                off = 0
                n = toks.size
                while off < n:
                    take = min(n - off, nb - fill)
                    tok_np[fill:fill + take] = toks[off:off + take]
                    pos_np[fill:fill + take] = np.arange(start + off, start + off + take,
                                                         dtype=np.int32)
                    seq_np[fill:fill + take] = s
                    lg_np[fill:fill + take] = 0
                    off += take
                    fill += take
                    if off == n:
                        lg_np[fill - 1] = 1
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
            self._tokens[s].extend(toks.tolist())
            if multi:
                self._logits[s] = staged[s]
            self._has_logits[s] = True

    def _run_chunk(self, n: int, outs: list[tuple[int, int]], staged: dict[int, np.ndarray],
                   multi: bool) -> None:
        ffi, L = self.ffi, self.lib
        self._batch.n_tokens = n
        rc = L.llama_decode(self.ctx, self._batch[0])
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
            p = L.llama_get_logits_ith(self.ctx, idx)
            if p == ffi.NULL:
                raise InternalError(f"no logits for batch index {idx}")
            row = np.frombuffer(ffi.buffer(p, self._logits_nbytes), dtype=np.float32)
            if multi:
                staged[s] = row.copy()
            else:
                self._logits[s] = row

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

    def _build_sampler(self, p: SamplingParams, seq: int) -> "_SeqSampler":
        ffi, L = self.ffi, self.lib
        for tok in p.logit_bias:
            if not 0 <= tok < self.n_vocab:
                raise BadRequest(f"logit_bias token id {tok} out of range [0, {self.n_vocab})")
        grammar_text: str | None = None
        if p.grammar:
            grammar_text = p.grammar
        elif p.json_schema is not None:
            from backends.json_schema import json_schema_to_gbnf
            grammar_text = json_schema_to_gbnf(p.json_schema)
        grammar = ffi.NULL
        if grammar_text:
            if "\0" in grammar_text:
                raise BadRequest("invalid grammar: contains a NUL character")
            try:
                from backends.gbnf import GrammarError, parse_gbnf
            except ImportError:  # pragma: no cover - gbnf ships with llamafleet
                parse_gbnf = None  # type: ignore[assignment]
            if parse_gbnf is not None:
                try:
                    parse_gbnf(grammar_text)
                except GrammarError as exc:
                    raise BadRequest(f"invalid grammar: {exc}") from None
                except RecursionError:
                    raise BadRequest("invalid grammar: nested too deeply") from None
            grammar = L.llama_sampler_init_grammar(self.vocab, grammar_text.encode(), b"root")
            if grammar == ffi.NULL:
                raise BadRequest("invalid grammar: llama.cpp could not parse it (see the "
                                 "worker's stderr for the parse error)")
        return _SeqSampler(self, p, grammar, seq)

    def _seed_for(self, p: SamplingParams) -> int:
        seed = p.seed if p.seed >= 0 else self.seed_opt
        if seed is None or seed < 0:
            return LLAMA_DEFAULT_SEED
        return seed & 0xFFFFFFFF

    def sample(self, seq: int) -> int | None:
        self._need()
        s = self._check_seq(seq)
        if not self._has_logits[s]:
            raise BadRequest(f"sequence {s} has no logits (evaluate tokens first)")
        smp = self._samplers[s]
        if smp is None:
            smp = self._samplers[s] = self._build_sampler(self._default_params, s)
        return smp.sample(self._logits[s])

    # ------------------------------------------------------------------ KV state
    def _adapter_id(self) -> bytes:
        if not self._active:
            return b"\0" * 16
        import hashlib
        h = hashlib.sha256()
        for name in sorted(self._active, key=lambda n: self._adapters[n]["file_id"]):
            h.update(self._adapters[name]["file_id"])
            h.update(repr(float(self._active[name])).encode())
        return h.digest()[:16]

    def _kv_shape(self) -> kvformat.KVShape:
        return kvformat.KVShape(
            model_id=self._model_id, n_vocab=self.n_vocab, n_layer=self.n_layer,
            n_embd=self.n_embd, kv_unified=self.kv_unified_opt,
            flash_attn=self.flash_attn_opt != "off", type_k=_GGML_TYPES[self.type_k_opt],
            type_v=_GGML_TYPES[self.type_v_opt],
            n_stream=0 if self.kv_unified_opt else self.n_seq_max,
            adapter_id=self._adapter_id())

    def kv_pack(self, seq: int) -> bytes:
        self._need()
        s = self._check_seq(seq)
        ffi, L = self.ffi, self.lib
        size = int(L.llama_state_seq_get_size(self.ctx, s))
        buf = bytearray(size)
        got = int(L.llama_state_seq_get_data(self.ctx, ffi.from_buffer(buf), size, s))
        if got != size:
            raise InternalError(f"llama_state_seq_get_data wrote {got} of {size} bytes")
        return kvformat.pack(self._kv_shape(), self._tokens[s], bytes(buf))

    def kv_unpack(self, seq: int, data: bytes) -> int:
        self._need()
        s = self._check_seq(seq)
        blob = kvformat.unpack(data)
        kvformat.check_compatible(blob.shape, self._kv_shape())
        n = len(blob.tokens)
        if n > self.n_ctx:
            raise BadRequest(f"KV blob holds {n} tokens, more than n_ctx {self.n_ctx}")
        self.seq_clear(s)
        if n == 0:
            return 0
        ffi, L = self.ffi, self.lib
        payload = blob.payload
        rc = L.llama_state_seq_set_data(self.ctx, ffi.from_buffer(payload), len(payload), s)
        if rc == 0:
            L.llama_memory_seq_rm(self.mem, s, -1, -1)
            raise BadRequest("llama.cpp refused the KV blob (incompatible context or corrupt "
                             "state; see the worker log)")
        pmin = int(L.llama_memory_seq_pos_min(self.mem, s))
        pmax = int(L.llama_memory_seq_pos_max(self.mem, s))
        if pmin != 0 or pmax != n - 1:
            L.llama_memory_seq_rm(self.mem, s, -1, -1)
            raise BadRequest(f"KV blob positions [{pmin}, {pmax}] do not match its {n} tokens")
        # fresh logits: drop the last cell and decode the last token again
        if not L.llama_memory_seq_rm(self.mem, s, n - 1, -1):
            L.llama_memory_seq_rm(self.mem, s, -1, -1)
            raise NotSupported("this model's memory cannot drop its last token (recurrent "
                               "model); KV restore is not supported")
        self._tokens[s] = blob.tokens[:-1]
        try:
            self._decode([(s, np.asarray(blob.tokens[-1:], dtype=np.int32))])
        except BaseException:
            L.llama_memory_seq_rm(self.mem, s, -1, -1)
            self._tokens[s] = []
            self._has_logits[s] = False
            raise
        return n

    def seq_truncate(self, seq: int, n_keep: int) -> None:
        self._need()
        s = self._check_seq(seq)
        toks = self._tokens[s]
        if isinstance(n_keep, bool) or not isinstance(n_keep, int) or not 1 <= n_keep <= len(toks):
            raise BadRequest(f"cannot keep {n_keep!r} of {len(toks)} tokens")
        L = self.lib
        # drop from the last kept token on, then decode it again for fresh logits
        if not L.llama_memory_seq_rm(self.mem, s, n_keep - 1, -1):
            raise NotSupported("this model's memory cannot drop tokens (recurrent model)")
        last = toks[n_keep - 1]
        self._tokens[s] = toks[:n_keep - 1]
        try:
            self._decode([(s, np.asarray([last], dtype=np.int32))])
        except BaseException:
            L.llama_memory_seq_rm(self.mem, s, -1, -1)
            self._tokens[s] = []
            self._has_logits[s] = False
            raise

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
        if name in self._adapters:
            raise BadRequest(f"adapter {name!r} is already loaded (unload it first)")
        apath = check_model_file(path, "adapter")
        meta = read_metadata(apath, {"general.architecture", "general.type", "adapter.type",
                                     "adapter.lora.alpha"})
        arch = meta.get("general.architecture")
        if meta.get("general.type") not in (None, "adapter") or \
                meta.get("adapter.type") not in (None, "lora"):
            raise BadRequest(f"{apath} is not a LoRA adapter (general.type="
                             f"{meta.get('general.type')!r}, adapter.type={meta.get('adapter.type')!r})")
        if arch != self.architecture:
            raise BadRequest(f"adapter architecture {arch!r} does not match the model's "
                             f"{self.architecture!r}")
        ffi, L = self.ffi, self.lib
        handle = L.llama_adapter_lora_init(self.model, apath.encode())
        if handle == ffi.NULL:
            raise BadRequest(f"llama.cpp could not load the adapter {apath} (tensor shapes "
                             "do not fit this model, or the file is corrupt; see the worker log)")
        self._adapters[name] = {"handle": handle, "path": apath, "file_id": file_identity(apath),
                                "alpha": meta.get("adapter.lora.alpha"), "architecture": arch}
        return {"name": name, "path": apath, "architecture": arch,
                "alpha": meta.get("adapter.lora.alpha")}

    def _apply_adapters(self, scales: dict[str, float]) -> None:
        ffi, L = self.ffi, self.lib
        names = list(scales)
        n = len(names)
        if n == 0:
            rc = L.llama_set_adapters_lora(self.ctx, ffi.NULL, 0, ffi.NULL)
        else:
            arr = ffi.new("struct llama_adapter_lora *[]", [self._adapters[k]["handle"]
                                                            for k in names])
            sc = ffi.new("float[]", [float(scales[k]) for k in names])
            rc = L.llama_set_adapters_lora(self.ctx, arr, n, sc)
        if rc != 0:
            raise InternalError(f"llama_set_adapters_lora failed ({rc})")
        self._active = dict(scales)

    def set_adapters(self, scales: dict[str, float]) -> None:
        self._need()
        if not isinstance(scales, dict):
            raise BadRequest("adapters must be a map of name to scale")
        clean: dict[str, float] = {}
        for k, v in scales.items():
            if k not in self._adapters:
                raise NotFound(f"no adapter named {k!r}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise BadRequest(f"scale of adapter {k!r} must be a finite number")
            clean[k] = float(v)
        self._apply_adapters(clean)
        self._shape = self._kv_shape()

    def unload_adapter(self, name: str) -> None:
        self._need()
        if name not in self._adapters:
            raise NotFound(f"no adapter named {name!r}")
        if name in self._active:
            rest = {k: v for k, v in self._active.items() if k != name}
            self._apply_adapters(rest)
        a = self._adapters.pop(name)
        self.lib.llama_adapter_lora_free(a["handle"])

    def adapters(self) -> dict[str, Any]:
        return {k: {"path": v["path"], "scale": self._active.get(k)}
                for k, v in self._adapters.items()}

    # ------------------------------------------------------------------ embeddings & chat
    def _ensure_embed_ctx(self) -> Any:
        if self._embed_ctx is not None:
            return self._embed_ctx
        ffi, L = self.ffi, self.lib
        n = self.n_ubatch
        if self.n_ctx_train > 0:
            n = min(n, self.n_ctx_train)
        cp = L.llama_context_default_params()
        cp.n_ctx = n
        cp.n_batch = n
        cp.n_ubatch = n
        cp.n_seq_max = 1
        cp.n_threads = self.n_threads_opt
        cp.n_threads_batch = self.n_threads_batch_opt
        cp.flash_attn_type = _FLASH[self.flash_attn_opt]
        cp.embeddings = True
        cp.pooling_type = _POOLING[self.pooling_opt]
        cp.no_perf = True
        cp.abort_callback, cp.abort_callback_data = self._abort_callback()
        ctx = L.llama_init_from_model(self.model, cp)
        if ctx == ffi.NULL:
            raise BadRequest("llama.cpp could not create the embedding context")
        self._embed_ctx = ctx
        self._embed_n = min(n, int(L.llama_n_ctx(ctx)), int(L.llama_n_ubatch(ctx)))
        self._embed_pool = int(L.llama_pooling_type(ctx))
        self._embed_dim = (int(L.llama_model_n_cls_out(self.model)) if self._embed_pool == 4
                           else int(L.llama_model_n_embd_out(self.model)))
        self._e_batch_arrays = (ffi.new("llama_token[]", self._embed_n),
                                ffi.new("llama_pos[]", self._embed_n),
                                ffi.new("int32_t[]", [1] * self._embed_n),
                                ffi.new("llama_seq_id[]", self._embed_n),
                                ffi.new("llama_seq_id *[]", self._embed_n),
                                ffi.new("int8_t[]", [1] * self._embed_n))
        tok, pos, nseq, sid, sidp, lg = self._e_batch_arrays
        for i in range(self._embed_n):
            sidp[i] = sid + i
        self._e_batch = ffi.new("llama_batch *", {"token": tok, "embd": ffi.NULL, "pos": pos,
                                                  "n_seq_id": nseq, "seq_id": sidp,
                                                  "logits": lg})
        if self._abort_cb is not None:
            L.llama_set_abort_callback(ctx, self._abort_cb, ffi.NULL)
        return ctx

    def embed(self, texts: Sequence[str], normalize: bool = True) -> list[list[float]]:
        self._need()
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise BadRequest("texts must be a list of strings")
        token_lists = []
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise BadRequest(f"text {i} is not a string")
            token_lists.append(self.tokenize(t, add_special=True))
        ctx = self._ensure_embed_ctx()
        for i, toks in enumerate(token_lists):
            if not toks:
                raise BadRequest(f"text {i} has no tokens")
            if len(toks) > self._embed_n:
                raise BadRequest(f"text {i} has {len(toks)} tokens, more than the embedding "
                                 f"limit {self._embed_n} (n_ubatch)")
        ffi, L = self.ffi, self.lib
        encoder = bool(L.llama_model_has_encoder(self.model))
        tok, pos, _nseq, sid, _sidp, _lg = self._e_batch_arrays
        mem = L.llama_get_memory(ctx)
        out: list[list[float]] = []
        for toks in token_lists:
            n = len(toks)
            if mem != ffi.NULL:
                L.llama_memory_clear(mem, True)
            tok[0:n] = toks
            pos[0:n] = list(range(n))
            sid[0:n] = [0] * n
            self._e_batch.n_tokens = n
            rc = (L.llama_encode if encoder else L.llama_decode)(ctx, self._e_batch[0])
            if rc == 2:
                raise Cancelled("embedding aborted")
            if rc != 0:
                raise InternalError(f"embedding decode failed with code {rc}")
            d = self._embed_dim
            if self._embed_pool == 0:  # no pooling in llama.cpp: mean over tokens here
                acc = np.zeros(L.llama_model_n_embd_out(self.model), dtype=np.float64)
                for i in range(n):
                    p = L.llama_get_embeddings_ith(ctx, i)
                    if p == ffi.NULL:
                        raise InternalError("no embeddings for token")
                    acc += np.frombuffer(ffi.buffer(p, acc.size * 4), dtype=np.float32)
                vec = acc / n
            else:
                p = L.llama_get_embeddings_seq(ctx, 0)
                if p == ffi.NULL:
                    raise InternalError("no pooled embedding")
                vec = np.frombuffer(ffi.buffer(p, d * 4), dtype=np.float32).astype(np.float64)
            if normalize:
                norm = float(np.linalg.norm(vec))
                if norm > 0:
                    vec = vec / norm
            out.append(vec.tolist())
        if mem != ffi.NULL:
            L.llama_memory_clear(mem, True)
        return out

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], *,
                            add_generation_prompt: bool = True,
                            template: str | None = None,
                            enable_thinking: bool | None = None) -> str:
        self._need()
        from backends.chat_template import render_chat_template
        tmpl = template if template is not None else self.chat_template
        if not tmpl:
            raise NotSupported("the model has no chat template; pass one explicitly")

        def text(tok: int) -> str:
            if tok < 0:
                return ""
            return self.token_to_piece(tok, special=True).decode("utf-8", "replace")

        return render_chat_template(tmpl, messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=text(self.bos), eos_token=text(self.eos),
                                    enable_thinking=enable_thinking)

    # ------------------------------------------------------------------ control
    def _abort_callback(self) -> tuple[Any, Any]:
        """A native abort callback with no Python on the compute path.

        llama.cpp polls ``bool cb(void *data)`` for every graph node. libc's
        ``strlen`` over the 2-byte buffer ``[flag, 0]`` returns 0 or 1, which is
        exactly that predicate; :meth:`abort` flips the flag from any thread."""
        ffi = self.ffi
        if getattr(self, "_abort_flag", None) is None:
            self._abort_flag = ffi.new("char[2]")
            self._libc = ffi.dlopen(None)
            self._flag_cb = ffi.cast("ggml_abort_callback", ffi.addressof(self._libc, "strlen"))
        return self._flag_cb, self._abort_flag

    def abort(self, flag: bool) -> None:
        if getattr(self, "_abort_flag", None) is not None:
            self._abort_flag[0] = b"\x01" if flag else b"\x00"

    def set_abort(self, should_abort: Callable[[], bool] | None) -> None:
        if should_abort is not None and not callable(should_abort):
            raise BadRequest("abort predicate must be callable")
        self._abort_fn = should_abort
        if self.ctx is None:
            return
        ffi, L = self.ffi, self.lib
        if should_abort is None:  # back to the native flag callback
            cb, data = self._abort_callback()
            L.llama_set_abort_callback(self.ctx, cb, data)
            if self._embed_ctx is not None:
                L.llama_set_abort_callback(self._embed_ctx, cb, data)
            self._abort_cb = None
            return

        def cb(_data: Any) -> bool:
            try:
                return bool(should_abort())
            except Exception:  # noqa: BLE001 - never raise into C
                log.exception("abort predicate failed")
                return False

        new = ffi.callback("bool(void *)", cb, onerror=lambda *a: False)
        L.llama_set_abort_callback(self.ctx, new, ffi.NULL)
        if self._embed_ctx is not None:
            L.llama_set_abort_callback(self._embed_ctx, new, ffi.NULL)
        self._abort_cb = new  # keep alive while installed


class _SeqSampler:
    """The sampler of one sequence: pre (bias, penalties), grammar, post (truncation + pick)."""

    def __init__(self, be: LlamaBackend, p: SamplingParams, grammar: Any, seq: int) -> None:
        ffi, L = be.ffi, be.lib
        self.be, self.L, self.ffi = be, L, ffi
        self.params = p
        self.grammar = grammar
        self.pre = ffi.NULL
        self.post = ffi.NULL
        cparams = L.llama_sampler_chain_default_params()
        cparams.no_perf = True
        pre_parts = []
        self._bias_keep: Any = None
        if p.logit_bias:
            items = list(p.logit_bias.items())
            arr = ffi.new("llama_logit_bias[]", [{"token": t, "bias": b} for t, b in items])
            self._bias_keep = arr
            pre_parts.append(L.llama_sampler_init_logit_bias(be.n_vocab, len(items), arr))
        self.penalties = ffi.NULL
        if (p.repeat_penalty != 1.0 or p.frequency_penalty != 0.0
                or p.presence_penalty != 0.0) and p.repeat_last_n != 0:
            last_n = be.n_ctx if p.repeat_last_n < 0 else p.repeat_last_n
            self.penalties = L.llama_sampler_init_penalties(
                be.n_vocab, last_n, p.repeat_penalty, p.frequency_penalty, p.presence_penalty)
            pre_parts.append(self.penalties)
            self._last_n = last_n
        if pre_parts:
            self.pre = L.llama_sampler_chain_init(cparams)
            for part in pre_parts:
                L.llama_sampler_chain_add(self.pre, part)
        self.greedy = p.greedy
        if self.greedy:
            if pre_parts or grammar != ffi.NULL:
                self.post = L.llama_sampler_chain_init(cparams)
                L.llama_sampler_chain_add(self.post, L.llama_sampler_init_greedy())
        else:
            self.post = L.llama_sampler_chain_init(cparams)
            add = lambda s: L.llama_sampler_chain_add(self.post, s)  # noqa: E731
            if p.top_k > 0:
                add(L.llama_sampler_init_top_k(min(p.top_k, be.n_vocab)))
            if p.typical_p < 1.0:
                add(L.llama_sampler_init_typical(p.typical_p, 1))
            if p.top_p < 1.0:
                add(L.llama_sampler_init_top_p(p.top_p, 1))
            if p.min_p > 0.0:
                add(L.llama_sampler_init_min_p(p.min_p, 1))
            add(L.llama_sampler_init_temp(p.temperature))
            add(L.llama_sampler_init_dist(be._seed_for(p)))
        self.has_grammar = grammar != ffi.NULL
        #: nothing but argmax: no chain, no grammar
        self.plain = self.pre == ffi.NULL and self.post == ffi.NULL and not self.has_grammar
        self.seq = seq
        self._fed = 0  # tokens of the sequence already fed to the penalties

    def free(self) -> None:
        L, ffi = self.L, self.ffi
        for attr in ("pre", "post", "grammar"):
            h = getattr(self, attr)
            if h != ffi.NULL:
                L.llama_sampler_free(h)
                setattr(self, attr, ffi.NULL)

    def reset(self) -> None:
        L, ffi = self.L, self.ffi
        self._fed = 0
        for h in (self.pre, self.grammar, self.post):
            if h != ffi.NULL:
                L.llama_sampler_reset(h)

    def _fill(self, logits: np.ndarray) -> Any:
        be = self.be
        cand = be._cand_np
        cand["id"] = be._cand_ids
        cand["logit"] = logits
        cand["p"] = 0.0
        cur = be._cur_p
        cur.data = be._cand
        cur.size = be.n_vocab
        cur.selected = -1
        cur.sorted = False
        return cur

    def _all_masked(self, cur: Any) -> bool:
        n = cur.size
        if n == 0:
            return True
        buf = self.ffi.buffer(cur.data, n * 12)
        arr = np.frombuffer(buf, dtype=self.be._cand_np.dtype)
        return bool(np.isneginf(arr["logit"]).all())

    def _pick(self, cur: Any) -> int | None:
        """Run the post chain (or argmax) on ``cur``; None when nothing is admissible."""
        if self._all_masked(cur):
            return None
        if self.post == self.ffi.NULL:  # plain greedy
            i = int(np.argmax(self.be._cand_np["logit"][:cur.size]))
            return int(self.be._cand_np["id"][i])
        self.L.llama_sampler_apply(self.post, cur)
        sel = cur.selected
        if sel < 0 or sel >= cur.size:
            return None
        d = cur.data[sel]
        if d.logit == _NEG_INF:
            return None
        return int(d.id)

    def _grammar_admits(self, tok: int) -> bool:
        one, onep = self.be._one, self.be._one_p
        one[0].id = tok
        one[0].logit = 0.0
        one[0].p = 0.0
        onep.data = one
        onep.size = 1
        onep.selected = -1
        onep.sorted = False
        self.L.llama_sampler_apply(self.grammar, onep)
        return one[0].logit != _NEG_INF

    def sample(self, logits: np.ndarray) -> int | None:
        if self.plain:
            i = int(logits.argmax())  # greedy fast path
            return None if logits[i] == _NEG_INF else i
        L, ffi = self.L, self.ffi
        if self.penalties != ffi.NULL:
            # the penalties see the sequence's whole history (prompt and generated tokens,
            # as in llama-server), fed from the KV bookkeeping rather than at accept time
            hist = self.be._tokens[self.seq]
            start = max(self._fed, len(hist) - self._last_n)
            for t in hist[start:]:
                L.llama_sampler_accept(self.penalties, t)
            self._fed = len(hist)
        cur = self._fill(logits)
        if self.pre != ffi.NULL:
            L.llama_sampler_apply(self.pre, cur)
        tok = self._pick(cur)
        if self.has_grammar and tok is not None and not self._grammar_admits(tok):
            # the unconstrained choice breaks the grammar: constrain the full vocabulary
            cur = self._fill(logits)
            if self.pre != ffi.NULL:
                L.llama_sampler_apply(self.pre, cur)
            L.llama_sampler_apply(self.grammar, cur)
            tok = self._pick(cur)
        elif self.has_grammar and tok is None:
            return None
        if tok is None:
            return None
        # EOG is admitted by llama's grammar only once it is complete, so accepting is safe
        if self.has_grammar:
            L.llama_sampler_accept(self.grammar, tok)
        if self.post != ffi.NULL:
            L.llama_sampler_accept(self.post, tok)
        return tok
