"""One ``generate`` request as the scheduler sees it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from llamafleet.runtime.protocol import Completion, CompletionStats, TokenLogprob
from llamafleet.runtime.sampling import SamplingParams
from llamafleet.worker.speculative import SpecConfig, make_drafter
from llamafleet.worker.textstream import TextStream


@dataclass
class GenerationStats:
    """Timings and counts reported with every result."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    t_received: float = field(default_factory=time.perf_counter)
    t_admitted: float | None = None
    t_first_token: float | None = None
    t_end: float | None = None

    def to_wire(self) -> CompletionStats:
        end = self.t_end or time.perf_counter()
        ttft = (self.t_first_token - self.t_received) * 1e3 if self.t_first_token else None
        queued = (self.t_admitted - self.t_received) * 1e3 if self.t_admitted else None
        decode_s = end - self.t_first_token if self.t_first_token else 0.0
        tps = (self.generated_tokens - 1) / decode_s \
            if decode_s > 0 and self.generated_tokens > 1 else None
        return CompletionStats(prompt_tokens=self.prompt_tokens,
                               cached_tokens=self.cached_tokens,
                               generated_tokens=self.generated_tokens, queue_ms=queued,
                               ttft_ms=ttft, total_ms=(end - self.t_received) * 1e3,
                               tokens_per_s=tps, drafted_tokens=self.drafted_tokens,
                               accepted_tokens=self.accepted_tokens)


class Generation:
    """State of one generation: input still to evaluate, output so far.

    The scheduler feeds ``pending`` tokens to the backend (prompt chunks, then
    one sampled token at a time); once ``pending`` is empty and the logits are
    fresh, it samples and calls :meth:`on_token`."""

    def __init__(self, *, peer: bytes, req_id: int, stream: bool, prompt_tokens: list[int],
                 params: SamplingParams, max_tokens: int, stop: list[str], ignore_eos: bool,
                 seq: int | None, deadline: float | None, session: str | None,
                 model: str = "", logprobs: int | None = None,
                 continued: list[int] | None = None,
                 continued_pieces: list[bytes] | None = None,
                 speculative: SpecConfig | None = None) -> None:
        self.peer = peer
        self.req_id = req_id
        self.stream = stream
        self.prompt_tokens = prompt_tokens
        self.params = params
        self.max_tokens = max_tokens
        self.ignore_eos = ignore_eos
        self.deadline = deadline
        self.session = session
        #: report logprobs with this many alternatives (None: none)
        self.logprobs = logprobs
        #: one TokenLogprob per token of ``tokens`` (with ``logprobs``), and those not
        #: streamed yet
        self.token_logprobs: list[TokenLogprob] = []
        self.out_logprobs: list[TokenLogprob] = []
        #: when the last token was sampled (perf_counter; for inter-token latency)
        self.t_last_token: float | None = None
        #: the caller named this sequence (it keeps its KV afterwards)
        self.explicit_seq = seq is not None
        self.seq: int | None = seq
        #: output a dead worker already produced (resumed here): it follows the prompt
        #: in the KV, counts as output and primes the text stream (its text was sent)
        self.continued = list(continued or ())
        self.pending: list[int] = [*prompt_tokens, *self.continued]
        self.text = TextStream(stop)
        for piece in continued_pieces or ():
            self.text.push(piece)
        self.tokens: list[int] = list(self.continued)
        self.stats = GenerationStats(prompt_tokens=len(prompt_tokens),
                                     generated_tokens=len(self.continued))
        self.finish_reason: str | None = None
        # streamed output not sent yet, and when the last chunk went out
        self.out_text = ""
        self.out_tokens: list[int] = []
        self.last_flush = 0.0
        #: tokens evaluated in the current tick; sample when it empties pending
        self.in_flight = False
        self.prompt_done = False
        #: finish reason to apply once the last token is evaluated into the KV
        self.finishing: str | None = None
        self.model = model
        #: the prefix-cache tier the prompt was restored from
        self.cache_tier: str | None = None
        #: for a session: whether its KV was persisted, and why not
        self.session_saved: bool | None = None
        self.session_error: str | None = None
        #: proposes draft tokens (None: this generation does not speculate)
        self.drafter = None if speculative is None else \
            make_drafter(speculative, [*prompt_tokens, *self.tokens])
        #: the draft evaluated after ``pending`` in the current tick
        self.draft: list[int] = []

    @property
    def key(self) -> tuple[bytes, int]:
        """Request ids are per client: (client identity, id) names a request."""
        return (self.peer, self.req_id)

    @property
    def input_tokens(self) -> list[int]:
        """What goes into the KV before sampling: the prompt, then any resumed output."""
        return [*self.prompt_tokens, *self.continued] if self.continued else self.prompt_tokens

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def keeps_kv(self) -> bool:
        """Whether the final token must reach the KV (caller's sequence, session, cache)."""
        return self.explicit_seq or self.session is not None

    def take(self, budget: int) -> list[int]:
        """Up to ``budget`` tokens of pending input for this tick."""
        chunk, self.pending = self.pending[:budget], self.pending[budget:]
        return chunk

    def on_token(self, token: int | None, is_eog: bool, piece: bytes) -> str:
        """Account for a sampled token; returns the text delta to stream."""
        now = time.perf_counter()
        if self.stats.t_first_token is None:
            self.stats.t_first_token = now
        if token is None:
            return self.end("grammar")
        if is_eog and not self.ignore_eos:
            return self.end("eog")
        self.tokens.append(token)
        self.stats.generated_tokens += 1
        delta = self.text.push(piece)
        reason = "stop" if self.text.stopped is not None else \
            "length" if len(self.tokens) >= self.max_tokens else None
        if reason is None:
            self.pending = [token]
            return delta
        if self.keeps_kv:
            # every returned token must be in the sequence's KV: evaluate it first
            self.pending = [token]
            self.finishing = reason
            return delta + self.text.finish()
        return delta + self.end(reason)

    def end(self, reason: str) -> str:
        """Mark finished; returns whatever text was still held back."""
        if self.finish_reason is None:
            self.finish_reason = reason
            self.stats.t_end = time.perf_counter()
        return self.text.finish()

    def result(self) -> Completion:
        """The final reply."""
        return Completion(text=self.text.text, tokens=list(self.tokens),
                          finish_reason=self.finish_reason or "", stop=self.text.stopped,
                          seq=self.seq if self.explicit_seq else None,
                          stats=self.stats.to_wire(), model=self.model, session=self.session,
                          session_saved=self.session_saved, session_error=self.session_error,
                          cache=self.cache_tier,
                          logprobs=None if self.logprobs is None else list(self.token_logprobs))
