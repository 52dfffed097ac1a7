"""One running ``generate`` request: prefill, then one token per step."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from backends.base import Backend
from runtime.sampling import SamplingParams
from worker.textstream import TextStream


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    t_start: float = field(default_factory=time.perf_counter)
    t_prefilled: float | None = None
    t_first_token: float | None = None
    t_end: float | None = None

    def to_dict(self) -> dict[str, Any]:
        end = self.t_end or time.perf_counter()
        ttft = (self.t_first_token - self.t_start) * 1e3 if self.t_first_token else None
        prefill = (self.t_prefilled - self.t_start) * 1e3 if self.t_prefilled else None
        decode_s = end - self.t_first_token if self.t_first_token else 0.0
        tps = (self.generated_tokens - 1) / decode_s if decode_s > 0 and self.generated_tokens > 1 \
            else None
        return {"prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.generated_tokens,
                "prefill_ms": prefill, "ttft_ms": ttft,
                "total_ms": (end - self.t_start) * 1e3, "tokens_per_s": tps}


class Generation:
    """State machine of one generation on one sequence of a backend.

    ``step()`` does one unit of work (the prefill, or one token) and returns the
    text delta and token produced; ``finish_reason`` is set when it is over."""

    def __init__(self, backend: Backend, *, req_id: int, seq: int, owns_seq: bool,
                 prompt_tokens: list[int], params: SamplingParams, max_tokens: int,
                 stop: list[str], ignore_eos: bool) -> None:
        self.backend = backend
        self.req_id = req_id
        self.seq = seq
        self.owns_seq = owns_seq
        self.prompt_tokens = prompt_tokens
        self.params = params
        self.max_tokens = max_tokens
        self.ignore_eos = ignore_eos
        self.text = TextStream(stop)
        self.tokens: list[int] = []
        self.stats = GenerationStats(prompt_tokens=len(prompt_tokens))
        self.finish_reason: str | None = None
        self.prefilled = False
        self.cancelled = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def start(self) -> None:
        """Install the sampler (validates grammar; raises BadRequest)."""
        self.backend.set_sampling(self.seq, self.params)

    def step(self) -> tuple[str, int | None]:
        """Advance by one unit; returns (text delta, new token or None)."""
        if self.done:
            return "", None
        if not self.prefilled:
            if self.prompt_tokens:
                self.backend.prefill(self.seq, self.prompt_tokens)
            self.prefilled = True
            self.stats.t_prefilled = time.perf_counter()
            if self.max_tokens == 0:
                return self._end("length"), None
            if self.backend.seq_len(self.seq) == 0:
                return self._end("length"), None
            return "", None
        token = self.backend.sample(self.seq)
        if token is None:
            return self._end("grammar"), None
        if self.backend.is_eog(token) and not self.ignore_eos:
            self.stats.t_first_token = self.stats.t_first_token or time.perf_counter()
            return self._end("eog"), None
        self.tokens.append(token)
        self.stats.generated_tokens += 1
        if self.stats.t_first_token is None:
            self.stats.t_first_token = time.perf_counter()
        delta = self.text.push(self.backend.token_to_piece(token, special=False))
        if self.text.stopped is not None:
            return delta + self._end("stop"), token
        last = len(self.tokens) >= self.max_tokens
        # keep the KV complete on caller-owned sequences; skip the useless last eval
        if not last or not self.owns_seq:
            self.backend.evaluate([(self.seq, [token])])
        if last:
            return delta + self._end("length"), token
        return delta, token

    def _end(self, reason: str) -> str:
        self.finish_reason = reason
        self.stats.t_end = time.perf_counter()
        return self.text.finish()

    def result(self) -> dict[str, Any]:
        return {"text": self.text.text, "tokens": list(self.tokens),
                "finish_reason": self.finish_reason, "stop": self.text.stopped,
                "seq": None if self.owns_seq else self.seq,
                "stats": self.stats.to_dict()}
