"""A deterministic backend for tests (ours and our users').

The fake "model" is a byte-level language model whose next-token scores are a
hash of the last few tokens, the model seed and the active adapters. It is
faithful where a service's tests need it to be:

* tokens round-trip through detokenize (one token per byte, plus BOS/EOS and
  the ChatML control tokens ``<|im_start|>``/``<|im_end|>``);
* sampling follows :class:`~runtime.sampling.SamplingParams` (greedy at
  temperature 0, seeded otherwise, logit bias, repetition penalty);
* GBNF grammars and JSON schemas constrain the output; an invalid one is
  refused with BadRequest;
* KV pack/unpack round-trips the sequence exactly, with a checksummed header
  that refuses blobs from another fake model;
* adapters change outputs deterministically by name and scale;
* embeddings are deterministic unit vectors.

Options (all optional): ``name``, ``seed`` (int), ``n_ctx`` (2048),
``n_seq_max`` (4), ``n_batch`` (512), ``n_embd`` (16), ``chat_template``
(ChatML), ``token_delay`` (seconds slept per evaluated token batch, to make
streams slow in tests), ``load_delay`` and ``pack_delay`` (seconds), and fault injection for
supervisor tests: ``crash_on_load`` ("segv", "abort" or "exit") crashes the
process while loading; ``wedge_after`` (N) makes every evaluation after the
N-th hang forever, like a wedged native decode.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import signal
import struct
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from llamafleet.backends.base import Backend, ModelInfo, ProgressCallback
from llamafleet.backends.chat_template import CHATML_TEMPLATE, render_chat_template
from llamafleet.runtime.errors import BadRequest, Cancelled, NotFound
from llamafleet.runtime.fields import Field
from llamafleet.runtime.protocol import TokenLogprob
from llamafleet.runtime.sampling import SamplingParams

BOS, EOS, BYTE0 = 0, 1, 2
IM_START, IM_END = 258, 259
N_VOCAB = 260
SPECIAL_TEXT = {BOS: "<s>", EOS: "</s>", IM_START: "<|im_start|>", IM_END: "<|im_end|>"}
_SPECIAL_BY_TEXT = {v: k for k, v in SPECIAL_TEXT.items()}
#: Bytes the fake model likes to emit, so its output looks like text.
_PREFERRED = [ord(c) for c in "etaoinshrdlucmfwypvbgk ,."]

_KV_MAGIC = b"LFFK"
_KV_VERSION = 1
_KV_HEADER = struct.Struct("<4sHH16sIII")  # magic, version, reserved, model id, n_ctx, n, crc

_NUM = (int, float)
_MAX_SIZE = 1 << 20


class _Seq:
    __slots__ = ("tokens", "params", "rng", "matcher", "has_logits", "draft")

    def __init__(self, params: SamplingParams) -> None:
        self.tokens: list[int] = []
        #: the pending draft (evaluated, not yet accepted)
        self.draft: list[int] = []
        self.params = params
        self.rng = random.Random(0)
        self.matcher: Any = None
        self.has_logits = False


class FakeBackend(Backend):
    """Deterministic byte-level model; see the module docstring."""

    name = "fake"
    OPTIONS = {
        "name": Field((str,), default="fake", doc="model name reported by info"),
        "path": Field((str,), doc="a file that must exist (load fails otherwise)"),
        "seed": Field((int,), default=0, doc="changes every output"),
        "n_ctx": Field((int,), default=2048, doc="context length", min=1, max=_MAX_SIZE),
        "n_seq_max": Field((int,), default=4, doc="sequence slots", min=1, max=_MAX_SIZE),
        "n_batch": Field((int,), default=512, doc="tokens per evaluation", min=1, max=_MAX_SIZE),
        "n_embd": Field((int,), default=16, doc="embedding size", min=1, max=_MAX_SIZE),
        "chat_template": Field((str,), default=CHATML_TEMPLATE, doc="Jinja chat template"),
        "token_delay": Field(_NUM, default=0.0, min=0, doc="seconds slept per evaluation"),
        "load_delay": Field(_NUM, default=0.0, min=0, doc="seconds a load takes"),
        "pack_delay": Field(_NUM, default=0.0, min=0, doc="seconds a kv_pack takes"),
        "crash_on_load": Field((str,), choices=("segv", "abort", "exit"),
                               doc="crash the process while loading"),
        "wedge_after": Field((int,), min=0, doc="hang every evaluation after the N-th"),
    }

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__(options)
        o = self.options
        self.model_name: str = o["name"]
        self.seed: int = o["seed"]
        self.n_ctx: int = o["n_ctx"]
        self.n_seq_max: int = o["n_seq_max"]
        self.n_batch: int = o["n_batch"]
        self.n_embd: int = o["n_embd"]
        self.template: str = o["chat_template"]
        self.token_delay = float(o["token_delay"])
        self.pack_delay = float(o["pack_delay"])
        self.wedge_after: int | None = o["wedge_after"]
        self._evaluations = 0
        self.model_id = hashlib.sha256(
            f"fake:{self.model_name}:{self.seed}:{N_VOCAB}".encode()).digest()[:16]
        self._seqs: list[_Seq] = []
        self._adapters: dict[str, dict[str, Any]] = {}
        self._active: dict[str, float] = {}
        self._abort_flag = False
        self._loaded = False

    # -- lifecycle -------------------------------------------------------------
    def load(self, progress: ProgressCallback | None = None) -> None:
        crash = self.options["crash_on_load"]
        delay = float(self.options["load_delay"])
        steps = 10
        for i in range(steps):
            if progress:
                progress(i / steps)
            if delay:
                time.sleep(delay / steps)
            if crash and i == steps // 2:
                _crash(crash)
        path = self.options.get("path")
        if path is not None and not Path(path).is_file():
            raise BadRequest(f"model file {path} does not exist")
        self._seqs = [_Seq(self.default_params) for _ in range(self.n_seq_max)]
        self._loaded = True
        if progress:
            progress(1.0)

    def info(self) -> ModelInfo:
        return ModelInfo(name=self.model_name, backend="fake", architecture="fake",
                         n_params=0, n_vocab=N_VOCAB, n_ctx=self.n_ctx, n_ctx_train=self.n_ctx,
                         n_batch=self.n_batch, n_seq_max=self.n_seq_max, n_embd=self.n_embd,
                         bos_token=BOS, eos_token=EOS, chat_template=self.template,
                         features=["kv", "grammar", "lora", "embeddings", "chat_template",
                                   "logprobs", "speculative"])

    # -- vocabulary --------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True,
                 parse_special: bool = False) -> list[int]:
        out = [BOS] if add_special else []
        if not parse_special:
            out.extend(BYTE0 + b for b in text.encode("utf-8"))
            return out
        i = 0
        while i < len(text):
            for special, tok in _SPECIAL_BY_TEXT.items():
                if text.startswith(special, i):
                    out.append(tok)
                    i += len(special)
                    break
            else:
                out.extend(BYTE0 + b for b in text[i].encode("utf-8"))
                i += 1
        return out

    def token_to_piece(self, token: int, special: bool = True) -> bytes:
        self.check_tokens([token])
        if BYTE0 <= token < BYTE0 + 256:
            return bytes([token - BYTE0])
        return SPECIAL_TEXT[token].encode() if special else b""

    def is_eog(self, token: int) -> bool:
        return token in (EOS, IM_END)

    def check_tokens(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < N_VOCAB:
                raise BadRequest(f"token id {t!r} out of range [0, {N_VOCAB})")

    # -- sequences -----------------------------------------------------------------
    def _seq(self, seq: int) -> _Seq:
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < len(self._seqs):
            raise BadRequest(f"sequence {seq!r} out of range (n_seq_max={self.n_seq_max})")
        return self._seqs[seq]

    def seq_len(self, seq: int) -> int:
        return len(self._seq(seq).tokens)

    def seq_tokens(self, seq: int) -> list[int]:
        return list(self._seq(seq).tokens)

    def evaluate(self, batch: Sequence[tuple[int, Sequence[int]]]) -> None:
        self.evaluate_drafts(batch, {})

    def evaluate_drafts(self, batch: Sequence[tuple[int, Sequence[int]]],
                        drafts: Mapping[int, Sequence[int]]) -> None:
        seen: set[int] = set()
        total = 0
        for seq, tokens in batch:
            s = self._seq(seq)
            if seq in seen:
                raise BadRequest(f"sequence {seq} appears twice in one batch")
            seen.add(seq)
            draft = drafts.get(seq, ())
            if draft and not tokens:
                raise BadRequest(f"the draft of sequence {seq} follows no tokens")
            self.check_tokens(tokens)
            self.check_tokens(draft)
            n = len(tokens) + len(draft)
            if len(s.tokens) + n > self.n_ctx:
                raise BadRequest(f"sequence {seq} would exceed the context "
                                 f"({len(s.tokens)} + {n} > {self.n_ctx})")
            total += n
        if set(drafts) - seen:
            raise BadRequest("a draft for a sequence that is not in the batch")
        self._evaluations += 1
        if self.wedge_after is not None and self._evaluations > self.wedge_after:
            while True:  # fault injection: a decode that never returns (heartbeats go on)
                time.sleep(3600)
        if self.token_delay:
            # simulate compute in small slices so the abort predicate is honoured
            end = time.monotonic() + self.token_delay * max(1, math.ceil(total / self.n_batch))
            while time.monotonic() < end:
                if self._abort_flag:
                    raise Cancelled("evaluation aborted")
                time.sleep(min(0.005, max(0.0, end - time.monotonic())))
        for seq, tokens in batch:
            s = self._seqs[seq]
            s.tokens.extend(tokens)
            s.draft = list(drafts.get(seq, ()))
            if tokens:
                s.has_logits = True

    def draft_accept(self, seq: int) -> None:
        s = self._seq(seq)
        if not s.draft:
            raise BadRequest(f"sequence {seq} has no pending draft")
        s.tokens.append(s.draft.pop(0))  # the scores follow from the tokens

    def draft_reject(self, seq: int) -> None:
        self._seq(seq).draft = []

    def seq_clear(self, seq: int) -> None:
        s = self._seq(seq)
        self._seqs[seq] = _Seq(self.default_params)
        del s

    # -- sampling ------------------------------------------------------------------
    def set_default_sampling(self, params: SamplingParams) -> None:
        old = self.default_params
        super().set_default_sampling(params)
        for s in self._seqs:
            if s.params is old:  # still on the default: nobody set a sampler
                s.params = params

    def set_sampling(self, seq: int, params: SamplingParams) -> None:
        s = self._seq(seq)
        params.validate()
        matcher = None
        if params.grammar or params.json_schema is not None:
            from llamafleet.backends.gbnf import parse_or_refuse
            text = params.grammar
            if params.json_schema is not None:
                from llamafleet.backends.json_schema import json_schema_to_gbnf
                text = json_schema_to_gbnf(params.json_schema)
            matcher = parse_or_refuse(text or "").matcher()
        for tok in params.logit_bias:
            self.check_tokens([tok])
        s.params = params
        s.matcher = matcher
        seed = params.seed if params.seed >= 0 else random.SystemRandom().randrange(1 << 32)
        s.rng = random.Random(seed)

    def logits(self, seq: int) -> list[float]:
        """The model's raw scores for the next token of ``seq``."""
        s = self._seq(seq)
        ctx = s.tokens[-4:]
        key = repr((self.seed, ctx, sorted(self._active.items()))).encode()
        rng = random.Random(hashlib.blake2b(key, digest_size=8).digest())
        scores = [rng.uniform(-12.0, -6.0) for _ in range(N_VOCAB)]
        for b in _PREFERRED:
            scores[BYTE0 + b] = rng.uniform(0.0, 4.0)
        scores[EOS] = rng.uniform(0.0, 4.0) - 0.6
        return scores

    def token_logprob(self, seq: int, token: int, top_n: int) -> TokenLogprob:
        scores = self.logits(seq)
        peak = max(scores)
        lse = peak + math.log(sum(math.exp(x - peak) for x in scores))

        def entry(t: int) -> TokenLogprob:
            return {"token": t, "bytes": self.token_to_piece(t, special=True),
                    "logprob": scores[t] - lse}

        top = sorted(range(N_VOCAB), key=lambda t: (-scores[t], t))[:top_n]
        return {**entry(token), "top": [entry(t) for t in top]}

    def sample(self, seq: int) -> int | None:
        s = self._seq(seq)
        if not s.has_logits:
            raise BadRequest(f"sequence {seq} has no logits: prefill it first")
        p = s.params
        scores = self.logits(seq)
        for tok, bias in p.logit_bias.items():
            scores[tok] += bias
        if p.repeat_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
            window = s.tokens if p.repeat_last_n < 0 else s.tokens[-p.repeat_last_n:] \
                if p.repeat_last_n else []
            counts: dict[int, int] = {}
            for t in window:
                counts[t] = counts.get(t, 0) + 1
            for t, c in counts.items():
                v = scores[t]
                v = v / p.repeat_penalty if v > 0 else v * p.repeat_penalty
                scores[t] = v - c * p.frequency_penalty - p.presence_penalty
        candidates = list(range(N_VOCAB))
        if s.matcher is not None:
            allowed = set(s.matcher.allowed_bytes())
            candidates = [BYTE0 + b for b in sorted(allowed)]
            if s.matcher.is_complete():
                candidates.append(EOS)
            if not candidates:
                return None
        if p.greedy:
            token = max(candidates, key=lambda t: (scores[t], -t))
        else:
            token = self._draw(candidates, scores, p, s.rng)
        if s.matcher is not None and token != EOS:
            s.matcher.accept_byte(token - BYTE0)
        return token

    def accept(self, seq: int, tokens: Sequence[int]) -> None:
        s = self._seq(seq)
        self.check_tokens(tokens)
        for token in tokens:
            if s.matcher is not None and BYTE0 <= token < BYTE0 + 256:
                if not s.matcher.accepts_byte(token - BYTE0):
                    raise BadRequest(f"token {token} breaks this request's grammar")
                s.matcher.accept_byte(token - BYTE0)

    @staticmethod
    def _draw(candidates: list[int], scores: list[float], p: SamplingParams,
              rng: random.Random) -> int:
        ranked = sorted(candidates, key=lambda t: (-scores[t], t))
        if p.top_k > 0:
            ranked = ranked[:p.top_k]
        top = scores[ranked[0]]
        if not math.isfinite(top):
            return ranked[0]  # +inf bias forces a token; all -inf: nothing better to do
        weights = [math.exp(max(-700.0, (scores[t] - top) / p.temperature))
                   if math.isfinite(scores[t]) else 0.0 for t in ranked]
        total = sum(weights)
        if not total > 0:
            return ranked[0]
        probs = [w / total for w in weights]
        keep = len(ranked)
        if p.top_p < 1.0:
            acc = 0.0
            for i, pr in enumerate(probs):
                acc += pr
                if acc >= p.top_p:
                    keep = i + 1
                    break
        if p.min_p > 0.0:
            keep = max(1, min(keep, sum(1 for pr in probs if pr >= p.min_p * probs[0])))
        ranked, weights = ranked[:keep], weights[:keep]
        return rng.choices(ranked, weights=weights, k=1)[0]

    # -- KV state --------------------------------------------------------------------
    def kv_pack(self, seq: int) -> bytes:
        return self.kv_snapshot(seq)()

    def kv_snapshot(self, seq: int) -> Callable[[], bytes]:
        tokens = list(self._seq(seq).tokens)
        delay, model_id, n_ctx = self.pack_delay, self.model_id, self.n_ctx

        def build() -> bytes:  # pack_delay is spent here: off the scheduler's loop
            if delay:
                time.sleep(delay)
            payload = struct.pack(f"<{len(tokens)}I", *tokens)
            crc = zlib.crc32(payload, zlib.crc32(model_id))
            return _KV_HEADER.pack(_KV_MAGIC, _KV_VERSION, 0, model_id, n_ctx, len(tokens),
                                   crc) + payload

        return build

    def kv_unpack(self, seq: int, data: bytes) -> int:
        s = self._seq(seq)
        if len(data) < _KV_HEADER.size:
            raise BadRequest("KV blob truncated (shorter than its header)")
        magic, version, _, model_id, _n_ctx, n, crc = _KV_HEADER.unpack_from(data)
        if magic != _KV_MAGIC:
            raise BadRequest("not a fake-backend KV blob (bad magic)")
        if version != _KV_VERSION:
            raise BadRequest(f"KV blob format version {version} not supported")
        if model_id != self.model_id:
            raise BadRequest("KV blob was made by another model")
        payload = data[_KV_HEADER.size:]
        if len(payload) != 4 * n:
            raise BadRequest("KV blob truncated or padded (length does not match its header)")
        if zlib.crc32(payload, zlib.crc32(self.model_id)) != crc:
            raise BadRequest("KV blob checksum mismatch (corrupted)")
        if n > self.n_ctx:
            raise BadRequest(f"KV blob holds {n} tokens, more than this context ({self.n_ctx})")
        tokens = list(struct.unpack(f"<{n}I", payload))
        self.check_tokens(tokens)
        self.seq_clear(seq)
        s = self._seqs[seq]
        s.tokens = tokens
        s.has_logits = bool(tokens)
        return n

    def seq_truncate(self, seq: int, n_keep: int) -> None:
        s = self._seq(seq)
        if not 1 <= n_keep <= len(s.tokens):
            raise BadRequest(f"cannot keep {n_keep} of {len(s.tokens)} tokens")
        del s.tokens[n_keep:]
        s.has_logits = True

    def cache_namespace(self) -> str:
        active = ",".join(f"{k}={v}" for k, v in sorted(self._active.items()))
        return f"fake:{self.model_id.hex()}:{active}"

    # -- adapters --------------------------------------------------------------------
    def load_adapter(self, name: str, path: str) -> dict[str, Any]:
        p = Path(path)
        if not p.is_file():
            raise BadRequest(f"adapter file {path} does not exist")
        if name in self._adapters:
            raise BadRequest(f"adapter {name!r} is already loaded")
        self._adapters[name] = {"path": str(p)}
        return {"name": name, "path": str(p)}

    def unload_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise NotFound(f"adapter {name!r} is not loaded")
        self._active.pop(name, None)
        del self._adapters[name]

    def set_adapters(self, scales: dict[str, float]) -> None:
        for name in scales:
            if name not in self._adapters:
                raise NotFound(f"adapter {name!r} is not loaded")
        self._active = {k: round(float(v), 6) for k, v in scales.items() if float(v) != 0.0}

    def adapters(self) -> dict[str, Any]:
        return {k: {**v, "scale": self._active.get(k)} for k, v in self._adapters.items()}

    # -- embeddings and chat -------------------------------------------------------------
    def embed(self, texts: Sequence[str], normalize: bool = True) -> list[list[float]]:
        out = []
        for text in texts:
            key = hashlib.blake2b(f"{self.seed}\0{text}".encode(), digest_size=8).digest()
            rng = random.Random(key)
            vec = [rng.gauss(0.0, 1.0) for _ in range(self.n_embd)]
            if normalize:
                norm = math.sqrt(sum(v * v for v in vec)) or 1.0
                vec = [v / norm for v in vec]
            out.append(vec)
        return out

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], *,
                            add_generation_prompt: bool = True,
                            template: str | None = None,
                            enable_thinking: bool | None = None,
                            tools: Sequence[dict[str, Any]] | None = None) -> str:
        return render_chat_template(template or self.template, messages,
                                    add_generation_prompt=add_generation_prompt,
                                    bos_token=SPECIAL_TEXT[BOS], eos_token=SPECIAL_TEXT[EOS],
                                    enable_thinking=enable_thinking, tools=tools)

    def abort(self, flag: bool) -> None:
        self._abort_flag = bool(flag)


def _crash(kind: str) -> None:
    """Fault injection: die the way a native crash would."""
    if kind == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif kind == "abort":
        os.abort()
    os._exit(70)
