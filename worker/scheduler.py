"""Continuous batching over a backend's sequence slots.

Every tick builds ONE batch for the backend: the next token of every decoding
sequence plus chunks of pending prompts (chunked prefill, so a long prompt
does not stall the others), evaluates it with one ``backend.evaluate`` call,
then samples every sequence whose input is complete. New requests join
between ticks; finished or cancelled ones free their slot at once. Requests
wait in a bounded FIFO queue for a free slot; past ``max_queue`` they are
refused with ``overloaded``.

With a prefix cache, a request whose prompt shares a long enough prefix with
a cached KV state restores it (``kv_unpack`` + ``seq_truncate``) and prefills
only the rest; finished requests publish their state back to the cache, and
named sessions publish durably so a restarted worker resumes them.

Publishing is split so that it never stalls the other streams: the tick reads
the finished sequence's KV (``backend.kv_snapshot``, the only part that touches
the context, a few milliseconds) and frees its slot; a publisher thread builds
the blob (header, checksum) and inserts it into the cache (for a session:
written and fsync'ed). The generation's result is sent only once that is done,
so a reply still means "in the cache", and for a session "persisted".

Speculative decoding (a generation with a drafter, see ``worker.speculative``)
adds a draft after a sequence's decode token in the same batch; after the
evaluation the sequence is sampled position by position with its own sampler,
keeping draft tokens while they equal what it sampled (the longest accepted
prefix plus the corrected or bonus token); the backend drops the rest of the
draft's KV cells. Everything that ends or shapes a generation (EOG, stop
strings, max_tokens, grammar, penalties, logprobs) runs per token, as without
speculation.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from llamafleet.backends.base import Backend
from llamafleet.runtime.errors import (
    BadRequest,
    Cancelled,
    InternalError,
    LlamafleetError,
    NotSupported,
    Overloaded,
    RequestTimeout,
)
from llamafleet.runtime.protocol import Completion, StreamChunk
from llamafleet.worker.generation import Generation
from llamafleet.worker.metrics import WorkerCounters
from llamafleet.worker.prefix_cache import CacheHit, common_prefix_tokens, tok_bytes
from llamafleet.worker.speculative import even_drafts, verify_draft

log = logging.getLogger("llamafleet.worker.scheduler")

#: what the scheduler sends a caller: a stream chunk, the final result or an error
Outgoing = StreamChunk | Completion | LlamafleetError
Send = Callable[[bytes, int, Outgoing], None]  # (peer, request id, message)
Key = tuple[bytes, int]  # (client identity, request id)


class KVCache(Protocol):
    """What the scheduler needs of a prefix cache (see ``prefix_cache.PrefixCache``)."""

    min_tokens: int

    def lookup(self, namespace: str, tokens: Sequence[int]) -> CacheHit | None: ...
    def session_entry(self, namespace: str, session: str) -> CacheHit | None: ...
    def insert(self, namespace: str, tokens: Sequence[int], blob: bytes, *,
               session: str | None = None, durable: bool = False) -> None: ...
    def stats(self) -> dict[str, int]: ...


class Scheduler:
    """Owns the backend's sequences while generations run."""

    def __init__(self, backend: Backend, *, send: Send, max_queue: int, stream_interval: float,
                 cache: KVCache | None = None,
                 wake_watcher: Callable[[], None] | None = None,
                 paused: Callable[[bytes], bool] | None = None,
                 wake: Callable[[], None] | None = None) -> None:
        """``max_queue`` and ``stream_interval`` (seconds) are the model's worker options
        (``config.WORKER_OPTIONS``: their defaults live there). ``paused(peer)`` tells
        whose generations wait (their client is not reading its replies): they keep
        their slot and KV but get no tokens until it turns False. ``wake()`` (any
        thread) gets the worker's loop to tick: a published result is ready."""
        info = backend.info()
        self.backend = backend
        self.n_seq_max = info.n_seq_max
        self.n_batch = max(1, info.n_batch)
        self.n_ctx = info.n_ctx
        self.max_queue = max_queue
        self.cache = cache
        #: seconds over which streamed deltas are coalesced (0: one chunk per token)
        self.stream_interval = stream_interval
        self._send = send
        self._paused = paused
        #: what /metrics reports (see worker.metrics)
        self.counters = WorkerCounters()
        self.queue: deque[Generation] = deque()
        self.running: dict[Key, Generation] = {}
        self.seq_owner: dict[int, Key] = {}
        self._rr = 0
        self.ticks = 0
        self.peak_running = 0  # most generations ever batched together
        #: monotonic time after which the running batch may be aborted (or None)
        self.abort_at: float | None = None
        #: tells the worker's watcher thread that a new abort time was armed
        self._wake_watcher = wake_watcher
        self._armed_for: float | None = None
        #: when the coalesced stream output of every running generation goes out next
        self._flush_at = 0.0
        #: a generation with a deadline may be queued or running (cleared by _expire)
        self._timed = False
        self._wake = wake
        #: finished generations whose KV the publisher thread is still caching
        self._publishing = 0
        #: ... and those it is done with (appended by that thread; results to send)
        self._published: deque[Generation] = deque()
        self._publisher: ThreadPoolExecutor | None = None
        self._publisher_lock = threading.Lock()

    # -- requests ------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """Work is queued or running, or results wait for their KV to be cached (the
        worker keeps ticking)."""
        return bool(self.queue or self.running or self._publishing)

    @property
    def active(self) -> bool:
        """Generations are running and not paused (the worker should not sleep
        between ticks)."""
        paused = self._paused
        if paused is None:
            return bool(self.running)
        return any(not paused(g.peer) for g in self.running.values())

    def inflight(self) -> int:
        return len(self.queue) + len(self.running) + self._publishing

    def owner(self, seq: int) -> int | None:
        """Request id of the generation using ``seq`` (None when free)."""
        key = self.seq_owner.get(seq)
        return None if key is None else key[1]

    def submit(self, g: Generation) -> None:
        """Queue a validated generation (raises Overloaded/BadRequest at once)."""
        if g.key in self.running or any(q.key == g.key for q in self.queue):
            raise BadRequest(f"request id {g.req_id} is already running")
        if g.deadline is not None:
            self._timed = True
        if g.explicit_seq:
            assert g.seq is not None
            owner = self.owner(g.seq)
            if owner is not None:
                raise BadRequest(f"sequence {g.seq} is in use by running request {owner}")
            self._start(g, g.seq)  # the caller's own slot: no queueing
            return
        if len(self.queue) >= self.max_queue:
            raise Overloaded(f"queue full ({len(self.queue)} waiting, {len(self.running)} "
                             f"running)", data={"queue_length": len(self.queue),
                                                "max_queue": self.max_queue,
                                                "running": len(self.running)})
        self.queue.append(g)

    def cancel(self, key: Key, *, notify: bool = True) -> bool:
        """Stop a queued or running generation; its caller gets ``cancelled``
        (unless ``notify`` is False: the caller is gone)."""
        req_id = key[1]
        for q in self.queue:
            if q.key == key:
                self.queue.remove(q)
                self._fail(q, Cancelled(f"request {req_id} was cancelled"), notify=notify)
                return True
        g = self.running.get(key)
        if g is None:
            return False
        self._fail(g, Cancelled(f"request {req_id} was cancelled",
                                data={"tokens": g.tokens, "text": g.text.text}), notify=notify)
        return True

    def fail_peer(self, peer: bytes,
                  error: Callable[[Generation], LlamafleetError] | None = None) -> list[int]:
        """End every queued or running generation of one client; each caller gets
        ``error(g)`` (none when ``error`` is None: the client is gone). Returns
        their request ids."""
        hit = [g for g in (*self.queue, *self.running.values()) if g.peer == peer]
        for g in hit:
            if g in self.queue:
                self.queue.remove(g)
            err = error(g) if error is not None else Cancelled(f"request {g.req_id} was "
                                                                "cancelled")
            self._fail(g, err, notify=error is not None)
        return [g.req_id for g in hit]

    def fail_all(self, err: LlamafleetError) -> None:
        for g in list(self.queue) + list(self.running.values()):
            self._fail(g, err)
        self.queue.clear()

    # -- admission ---------------------------------------------------------------------
    def _free_seq(self) -> int | None:
        # from the top: callers managing sequences by hand usually take low ids
        for seq in reversed(range(self.n_seq_max)):
            if seq not in self.seq_owner and self.backend.seq_len(seq) == 0:
                return seq
        return None

    def _admit(self) -> None:
        while self.queue:
            seq = self._free_seq()
            if seq is None:
                if not self.running:
                    # every slot holds a caller's sequence and nothing running will
                    # free one: waiting would be forever
                    for g in list(self.queue):
                        self._fail(g, Overloaded(
                            f"all {self.n_seq_max} sequences hold caller state (free some "
                            "with seq_clear)", data={"queue_length": len(self.queue),
                                                     "n_seq_max": self.n_seq_max}))
                    self.queue.clear()
                return
            g = self.queue.popleft()
            try:
                self._start(g, seq)
            except LlamafleetError as exc:
                self._fail(g, exc)
            except Exception as exc:
                log.exception("starting a generation failed")
                self._fail(g, InternalError(f"{type(exc).__name__}: {exc}"))

    def _start(self, g: Generation, seq: int) -> None:
        g.seq = seq
        g.stats.t_admitted = time.perf_counter()
        self.seq_owner[seq] = g.key
        self.running[g.key] = g
        try:
            if not g.explicit_seq:
                self._restore_prefix(g)
            # after the restore: restoring may reset the sequence's sampler
            self.backend.set_sampling(seq, g.params)
            if g.drafter is not None:
                g.drafter.bind(seq)
            if g.continued:
                self.backend.accept(seq, g.continued)
        except BaseException:
            self.running.pop(g.key, None)
            self._release(g)
            raise
        if not g.pending:
            g.prompt_done = True
            g.in_flight = True  # logits are fresh (restored); sample this tick

    def _namespace(self) -> str | None:
        if self.cache is None:
            return None
        try:
            return self.backend.cache_namespace()
        except NotSupported:
            return None

    def _restore_prefix(self, g: Generation) -> None:
        ns = self._namespace()
        if ns is None or self.cache is None:
            return
        prompt = g.input_tokens
        found = [self.cache.lookup(ns, prompt)]
        if g.session is not None:
            entry = self.cache.session_entry(ns, g.session)
            if entry is not None:
                # the session's latest state, measured against this prompt
                common = common_prefix_tokens(tok_bytes(entry.tokens), tok_bytes(prompt))
                found.append(CacheHit(tokens=entry.tokens, common=common, blob=entry.blob,
                                      tier=entry.tier))
        least = max(1, self.cache.min_tokens)
        hits = [h for h in found if h is not None and h.common >= least]
        if not hits:
            self.counters.cache_query(hit=False)
            return
        hit = max(hits, key=lambda h: h.common)
        assert g.seq is not None
        try:
            self.backend.kv_unpack(g.seq, hit.blob)
            if hit.common < len(hit.tokens):
                self.backend.seq_truncate(g.seq, hit.common)
        except LlamafleetError as exc:
            log.warning("prefix cache entry not restorable (%s); prefilling instead", exc)
            self.backend.seq_clear(g.seq)
            self.counters.cache_query(hit=False)
            return
        self.counters.cache_query(hit=True)
        g.pending = list(prompt[hit.common:])
        g.stats.cached_tokens = hit.common
        g.cache_tier = hit.tier

    # -- the tick ----------------------------------------------------------------------------
    def tick(self) -> None:
        """Admit, evaluate one batch, sample, stream."""
        self.ticks += 1
        self._deliver_published()
        self._expire()
        self._admit()
        if not self.running:
            return
        order = list(self.running.values())
        self.peak_running = max(self.peak_running, len(order))
        paused = self._paused
        # a paused generation (its client is not reading) keeps its slot and KV but
        # gets no input: no new tokens pile up behind the replies it has not read
        live = order if paused is None else [g for g in order if not paused(g.peer)]
        batch: list[tuple[Generation, list[int]]] = []
        budget = self.n_batch
        # decode tokens first: every running sequence advances every tick
        decoding: list[Generation] = []
        for g in live:
            if g.prompt_done and g.pending and budget > 0:
                batch.append((g, g.take(1)))
                budget -= 1
                decoding.append(g)
        # then drafts of the speculating ones, verified in the same evaluation
        drafts: dict[int, list[int]] = {}
        for g in decoding:
            if g.drafter is None or g.finishing is not None or budget <= 0 or g.pending:
                continue
            assert g.seq is not None
            room = min(budget, g.max_tokens - len(g.tokens) - 1,
                       self.n_ctx - self.backend.seq_len(g.seq) - 2)
            draft = g.drafter.propose(room)
            if draft:
                drafts[g.seq] = draft
                budget -= len(draft)
        budget += even_drafts(drafts)
        # then prompt chunks, rotating who goes first so no prompt starves
        prefilling = [g for g in live if not g.prompt_done and g.pending]
        if prefilling:
            start = self._rr % len(prefilling)
            self._rr += 1
            for g in prefilling[start:] + prefilling[:start]:
                if budget <= 0:
                    break
                chunk = g.take(budget)
                batch.append((g, chunk))
                budget -= len(chunk)
        if batch:
            self._evaluate(batch, drafts)
            self.abort_at = None
        for g in order:
            if g.done or g.key not in self.running:
                continue
            if g.in_flight and not g.pending:
                g.in_flight = False
                if g.finishing or len(g.tokens) >= g.max_tokens:
                    g.prompt_done = True
                    g.end(g.finishing or "length")
                elif g.draft:
                    self._verify(g)
                else:
                    g.prompt_done = True
                    self._sample(g)
            if g.finish_reason is not None:  # ended in this tick
                self._finish(g)
        if self.stream_interval > 0:
            now = time.monotonic()
            if now >= self._flush_at:
                # one clock for every stream: their chunks leave in the same tick, so
                # a client reading several streams wakes once per interval, not per stream
                self._flush_at = now + self.stream_interval
                for g in self.running.values():
                    if g.out_text or g.out_tokens:
                        self._flush(g, now)

    def _arm_abort(self, batch: list[tuple[Generation, list[int]]]) -> None:
        """Publish when this batch may be stopped mid-compute: once every request
        in it is past its deadline (nobody waits for the result any more). The
        worker's watcher thread raises the backend's abort flag at that time."""
        deadlines = [g.deadline for g, _ in batch]
        self.abort_at = None if None in deadlines else max(deadlines)  # type: ignore[type-var]
        if self.abort_at is not None and self.abort_at != self._armed_for:
            self._armed_for = self.abort_at
            if self._wake_watcher is not None:
                self._wake_watcher()  # it sleeps until the next heartbeat otherwise
        self.backend.abort(False)

    def _evaluate(self, batch: list[tuple[Generation, list[int]]],
                  drafts: dict[int, list[int]] | None = None) -> None:
        self._arm_abort(batch)
        try:
            work = [(g.seq, toks) for g, toks in batch]
            if drafts:
                self.backend.evaluate_drafts(work, drafts)  # type: ignore[arg-type]
            else:
                self.backend.evaluate(work)  # type: ignore[arg-type]
            for g, _ in batch:
                g.in_flight = True
                if drafts:
                    g.draft = drafts.get(g.seq, [])  # type: ignore[arg-type]
            return
        except Cancelled:
            self.abort_at = None
            # aborted mid-compute (deadline or shutdown): nothing was appended; put the
            # input back and let _expire / the shutdown path answer the callers
            for g, toks in batch:
                g.pending = toks + g.pending
            return
        except LlamafleetError as exc:
            self.abort_at = None
            if len(batch) == 1:
                self._fail(batch[0][0], exc)
                return
            log.warning("batch of %d failed (%s); evaluating sequences one by one",
                        len(batch), exc)
        except Exception as exc:
            log.exception("batch evaluation failed")
            if len(batch) == 1:
                self._fail(batch[0][0], InternalError(f"{type(exc).__name__}: {exc}"))
                return
        for g, toks in batch:  # isolate the request that broke the batch
            try:
                self.backend.evaluate([(g.seq, toks)])  # type: ignore[list-item]
                g.in_flight = True
            except LlamafleetError as exc:
                self._fail(g, exc)
            except Exception as exc:
                log.exception("evaluation failed")
                self._fail(g, InternalError(f"{type(exc).__name__}: {exc}"))

    def _verify(self, g: Generation) -> None:
        """Sample a sequence whose draft was evaluated: keep the draft tokens its own
        sampler chooses, then the corrected (or bonus) token; drop the rest."""
        draft, g.draft = g.draft, []
        b, seq = self.backend, g.seq
        assert seq is not None and g.drafter is not None

        def sample_at(i: int) -> int | None:
            if i > 0:  # draft[i - 1] was sampled: it is in the KV, with its logits
                b.draft_accept(seq)
                g.pending = []
                if g.finishing is not None:  # a kept-KV ending: its last token is in
                    g.end(g.finishing)
                    return None
            token = self._sample(g)
            return None if g.done else token

        accepted = 0
        try:
            accepted, _ = verify_draft(draft, sample_at)
        except LlamafleetError as exc:
            self._fail(g, exc)
        finally:
            if g.key in self.running:  # (a failed one was cleared with its draft)
                b.draft_reject(seq)
        g.stats.drafted_tokens += len(draft)
        g.stats.accepted_tokens += accepted
        g.drafter.feedback(len(draft), accepted)

    def _sample(self, g: Generation) -> int | None:
        """Sample the next token; returns it when it is output (and now pending or
        ending the generation), None otherwise (EOG, grammar's end, an error)."""
        b = self.backend
        assert g.seq is not None
        n_before = len(g.tokens)
        try:
            token = b.sample(g.seq)
            piece = b.token_to_piece(token, special=False) if token is not None else b""
            delta = g.on_token(token, token is not None and b.is_eog(token), piece)
            if g.logprobs is not None and token is not None and len(g.tokens) > n_before:
                entry = b.token_logprob(g.seq, token, g.logprobs)
                g.token_logprobs.append(entry)
                if g.stream:
                    g.out_logprobs.append(entry)
            if len(g.tokens) > n_before:  # an output token (not EOG, not grammar's end)
                now = time.perf_counter()
                if g.t_last_token is not None:
                    self.counters.token_gap(now - g.t_last_token)
                g.t_last_token = now
                if g.drafter is not None:
                    g.drafter.push(g.tokens[-1])
        except LlamafleetError as exc:
            self._fail(g, exc)
            return None
        except Exception as exc:  # a backend bug: fail this request, keep serving
            log.exception("sampling failed")
            self._fail(g, InternalError(f"{type(exc).__name__}: {exc}"))
            return None
        if g.stream:
            g.out_text += delta
            g.out_tokens += g.tokens[n_before:]
            # the first delta goes out at once (time to first token); later ones wait
            # for the tick's flush clock (stream_interval), which saves the client a
            # wake-up per token; whatever is left goes out before the result
            if (g.out_text or g.out_tokens) and (
                    g.done or g.last_flush == 0.0 or self.stream_interval <= 0):
                self._flush(g, time.monotonic())
        return g.tokens[-1] if len(g.tokens) > n_before else None

    def _flush(self, g: Generation, now: float) -> None:
        if g.out_text or g.out_tokens:
            self._send(g.peer, g.req_id, StreamChunk(
                text=g.out_text, tokens=g.out_tokens,
                logprobs=None if g.logprobs is None else g.out_logprobs))
            g.out_text, g.out_tokens, g.out_logprobs = "", [], []
        g.last_flush = now

    def _expire(self) -> None:
        if not self._timed:
            return
        now = time.monotonic()
        timed = False
        for g in list(self.queue) + list(self.running.values()):
            if g.deadline is None:
                continue
            timed = True
            if now > g.deadline:
                if g in self.queue:
                    self.queue.remove(g)
                self._fail(g, RequestTimeout(
                    f"request {g.req_id} passed its deadline",
                    data={"tokens": g.tokens, "text": g.text.text}))
        self._timed = timed

    # -- endings ---------------------------------------------------------------------------
    def _finish(self, g: Generation) -> None:
        if g.stream:
            self._flush(g, time.monotonic())
        self.running.pop(g.key, None)
        try:
            job = self._snapshot(g)  # reads the KV: before the slot is released
        finally:
            self._release(g)
        if job is None:
            self._reply(g)
            return
        self._publishing += 1
        with self._publisher_lock:
            if self._publisher is None:
                self._publisher = ThreadPoolExecutor(1, thread_name_prefix="kv-publish")
            # one thread: a session's publishes are applied in the order they finished
            self._publisher.submit(self._publish, g, job)

    def _reply(self, g: Generation) -> None:
        result = g.result()
        self.counters.finished(result.finish_reason, result.stats)
        self._send(g.peer, g.req_id, result)

    def _deliver_published(self) -> None:
        """Send the results whose KV the publisher thread has cached."""
        while self._published:
            g = self._published.popleft()
            self._publishing -= 1
            self._reply(g)

    def close(self, timeout: float | None = None) -> None:
        """Wait for the publisher thread to finish what it holds (before the cache
        closes), and send those results."""
        with self._publisher_lock:
            pub, self._publisher = self._publisher, None
        if pub is not None:
            pub.shutdown(wait=True)
        self._deliver_published()

    def _fail(self, g: Generation, err: LlamafleetError, notify: bool = True) -> None:
        g.end("error")
        self.counters.failed(err.code)
        if self.running.pop(g.key, None) is not None:
            self._release(g)
        if notify:
            self._send(g.peer, g.req_id, err)

    def _release(self, g: Generation) -> None:
        if g.seq is None:
            return
        if g.drafter is not None:
            g.drafter.release()
        if self.seq_owner.get(g.seq) == g.key:
            del self.seq_owner[g.seq]
        if not g.explicit_seq:
            self.backend.seq_clear(g.seq)

    def _snapshot(self, g: Generation) -> tuple[str, list[int], Callable[[], bytes]] | None:
        """On the loop: what the finished sequence offers the cache (namespace, tokens
        and the blob's builder, its KV already read), or None when nothing is published."""
        if g.explicit_seq or g.seq is None:
            return None
        ns = self._namespace()
        if self.cache is None or ns is None:
            if g.session is not None:
                g.session_saved = False
                g.session_error = ("this model keeps no KV cache (prefix_cache is off "
                                            "or the backend cannot pack KV)")
            return None
        tokens = self.backend.seq_tokens(g.seq)
        if len(tokens) < self.cache.min_tokens and g.session is None:
            return None
        if not tokens:
            return None
        try:
            return ns, tokens, self.backend.kv_snapshot(g.seq)
        except LlamafleetError as exc:
            log.warning("kv_pack for the cache failed: %s", exc)
            self._not_saved(g, exc)
            return None

    def _publish(self, g: Generation, job: tuple[str, list[int], Callable[[], bytes]]) -> None:
        """On the publisher thread: build the blob and cache it (durably for a
        session), then hand the result back to the loop."""
        ns, tokens, build = job
        try:
            assert self.cache is not None
            self.cache.insert(ns, tokens, build(), session=g.session,
                              durable=g.session is not None)
            if g.session is not None:
                g.session_saved = True
        except OSError as exc:
            log.warning("session %s not persisted: %s", g.session, exc)
            self._not_saved(g, exc)
        except Exception as exc:  # noqa: BLE001 - a bug must not lose the reply
            log.exception("publishing to the prefix cache failed")
            self._not_saved(g, exc)
        finally:
            self._published.append(g)
            if self._wake is not None:
                self._wake()

    @staticmethod
    def _not_saved(g: Generation, exc: BaseException) -> None:
        if g.session is not None:
            g.session_saved = False
            g.session_error = str(exc)
