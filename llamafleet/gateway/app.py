"""The OpenAI-compatible HTTP API on :class:`~llamafleet.client.AsyncClient` (Starlette).

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``,
``POST /v1/embeddings``, ``POST /tokenize``, ``POST /detokenize`` (llama-server's),
``GET /health`` and ``GET /metrics``. Every request runs through our client, so it keeps
what the runtime gives: supervised workers, typed errors (mapped by
:mod:`~llamafleet.gateway.errors`), batching, the prefix cache and sessions.

:class:`Guard` is the outer ASGI layer: API keys, the concurrent-request bound and the
HTTP metrics. Bodies are read under a size bound and a deadline (a client that sends
its body byte by byte gets 408). A client that disconnects cancels its generation.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llamafleet.client import AsyncClient
from llamafleet.client.aio import AsyncStream
from llamafleet.gateway import translate as tr
from llamafleet.gateway.errors import HTTPError, from_error
from llamafleet.gateway.metrics import FleetMetrics
from llamafleet.gateway.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)
from llamafleet.runtime.errors import LlamafleetError

log = logging.getLogger("llamafleet.gateway")
B = TypeVar("B", bound=BaseModel)
T = TypeVar("T")

#: how long /health and /v1/models reuse one answer of the supervisor (seconds)
STATUS_TTL = 0.5
#: paths that need no API key
PUBLIC_PATHS = frozenset({"/health", "/v1/health"})
#: the endpoints, as the HTTP metrics label them (any other path counts as "other")
ENDPOINTS = frozenset({"/health", "/v1/health", "/metrics", "/v1/models", "/v1/chat/completions",
                       "/v1/completions", "/v1/embeddings", "/tokenize", "/detokenize"})
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
#: prompts one /v1/completions request may carry (each becomes a queued generation)
MAX_PROMPTS = 16
#: per-token detokenize calls in flight for /tokenize with_pieces
PIECES_IN_FLIGHT = 32


async def all_or_none(aws: list[Awaitable[T]]) -> list[T]:
    """Run them concurrently; the first failure cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


#: worker states in which /health counts a model as served
_SERVING = frozenset({"ready", "unloaded", "stopping"})


@dataclass
class Settings:
    """The gateway's limits and keys (the ``[http]`` table, see config.HTTP_OPTIONS)."""

    models: list[str]
    api_keys: list[str] = field(default_factory=list)
    max_body_bytes: int = 8 * 1024 * 1024
    max_concurrent_requests: int = 512
    body_timeout: float = 30.0
    request_timeout: float = 600.0
    #: ``metrics``: only /metrics and /health
    metrics_only: bool = False

    @classmethod
    def from_options(cls, models: list[str], options: dict[str, Any],
                     metrics_only: bool = False) -> Settings:
        keys = ("api_keys", "max_body_bytes", "max_concurrent_requests", "body_timeout",
                "request_timeout")
        return cls(models=list(models), metrics_only=metrics_only,
                   **{k: options[k] for k in keys if options.get(k) is not None})


def error_response(err: HTTPError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def sse(obj: Any) -> bytes:
    """One Server-Sent Event carrying ``obj`` as JSON."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


class Guard:
    """ASGI middleware: API keys, the concurrent-request bound, HTTP metrics."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: FleetMetrics) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.active = 0
        self._keys = [k.encode() for k in settings.api_keys]

    def _authorized(self, scope: Scope) -> bool:
        if not self._keys or scope["path"] in PUBLIC_PATHS:
            return True
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"")
        token = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
        return any(hmac.compare_digest(token, k) for k in self._keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}
        scope.setdefault("state", {})

        async def send_tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if not self._authorized(scope):
                err = HTTPError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                type="authentication_error", code="invalid_api_key")
                await error_response(err)(scope, receive, send_tracked)
            elif self.active >= self.settings.max_concurrent_requests:
                err = HTTPError(429, f"too many concurrent requests (at most "
                                f"{self.settings.max_concurrent_requests})",
                                type="rate_limit_error", code="overloaded",
                                headers={"Retry-After": "1"})
                await error_response(err)(scope, receive, send_tracked)
            else:
                self.active += 1
                try:
                    await self.app(scope, receive, send_tracked)
                finally:
                    self.active -= 1
        finally:
            model = scope["state"].get("model") or ""
            path = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.metrics.observe_http(model, path, status["code"],
                                      time.perf_counter() - started)


class Gateway:
    """The endpoints, on one AsyncClient."""

    def __init__(self, client: AsyncClient, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.metrics = FleetMetrics(client, settings.models)
        self.started = tr.now()
        self._status: tuple[float, list[dict[str, Any]]] | None = None
        self._status_lock = asyncio.Lock()

    # -- plumbing -------------------------------------------------------------------
    async def body(self, request: Request, schema: type[B]) -> B:
        """Read and validate the JSON body (413 over the size bound, 408 too slow)."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPError(413, f"request body larger than {limit} bytes",
                            code="body_too_large")
        parts: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.settings.body_timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise HTTPError(413, f"request body larger than {limit} bytes",
                                        code="body_too_large")
                    parts.append(chunk)
        except TimeoutError:
            raise HTTPError(408, f"request body not received within "
                            f"{self.settings.body_timeout:g}s", code="body_timeout") from None
        try:
            return schema.model_validate_json(b"".join(parts))
        except ValidationError as exc:
            raise invalid(exc) from None

    def model(self, request: Request, name: str | None) -> str:
        if name is None:
            if not self.settings.models:
                raise HTTPError(404, "this fleet serves no models", type="not_found_error",
                                code="model_not_found")
            name = self.settings.models[0]
        if name not in self.settings.models:
            raise HTTPError(404, f"model {name!r} is not served here (models: "
                            f"{', '.join(self.settings.models)})", type="not_found_error",
                            code="model_not_found", param="model")
        request.state.model = name
        return name

    async def status(self) -> list[dict[str, Any]]:
        """The supervisor's worker list, reused for STATUS_TTL seconds."""
        async with self._status_lock:
            t = time.monotonic()
            if self._status is None or t - self._status[0] > STATUS_TTL:
                self._status = (t, await self.client.status(timeout=5.0))
            return self._status[1]

    async def until_disconnect(self, request: Request, work: Awaitable[T]) -> T:
        """Run ``work``; cancel it if the client goes away first."""
        task = asyncio.ensure_future(work)

        async def watch() -> None:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task not in done:
                task.cancel()
                raise ClientDisconnect()
            return task.result()
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()

    # -- endpoints ------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        try:
            workers = await self.status()
        except LlamafleetError as exc:
            return error_response(from_error(exc))
        states: dict[str, str] = {}
        for w in workers:
            name = w["model"] if not w.get("replica") else f"{w['model']}#{w['replica']}"
            states[name] = w["state"]
        # an unloaded (on-demand) model is served: the first request loads it
        if all(s in _SERVING for s in states.values()):
            return JSONResponse({"status": "ok", "models": states})
        return JSONResponse({"error": {"code": 503, "message": "Loading model",
                                       "type": "unavailable_error"}, "models": states},
                            status_code=503, headers={"Retry-After": "1"})

    async def metrics_endpoint(self, request: Request) -> Response:
        await self.metrics.refresh()
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request: Request) -> Response:
        states: dict[str, dict[str, Any]] = {}
        try:
            states = {w["model"]: w for w in await self.status()}
        except LlamafleetError:
            pass  # the list of configured models is still right
        data = [{"id": m, "object": "model", "created": self.started, "owned_by": "llamafleet",
                 "state": states.get(m, {}).get("state", "unknown"),
                 "backend": states.get(m, {}).get("backend")}
                for m in self.settings.models]
        return JSONResponse({"object": "list", "data": data})

    async def tokenize(self, request: Request) -> Response:
        req = await self.body(request, TokenizeRequest)
        model = self.model(request, req.model)
        tokens = await self.client.tokenize(model, req.content, add_special=req.add_special,
                                            parse_special=req.parse_special)
        if not req.with_pieces:
            return JSONResponse({"tokens": tokens})
        limit = asyncio.Semaphore(PIECES_IN_FLIGHT)

        async def piece(t: int) -> str:
            async with limit:  # a long text must not flood the worker's reply queue
                return await self.client.detokenize(model, [t], special=True)

        pieces = await all_or_none([piece(t) for t in tokens])
        return JSONResponse({"tokens": [{"id": t, "piece": p} for t, p in zip(tokens, pieces)]})

    async def detokenize(self, request: Request) -> Response:
        req = await self.body(request, DetokenizeRequest)
        model = self.model(request, req.model)
        return JSONResponse({"content": await self.client.detokenize(model, req.tokens)})

    async def embeddings(self, request: Request) -> Response:
        req = await self.body(request, EmbeddingRequest)
        model = self.model(request, req.model)
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts:
            raise tr.bad_request("input must not be empty", "input")
        if not all(isinstance(t, str) for t in texts):
            raise tr.not_supported("token-id input to embeddings is not supported: send text",
                                   "input")
        if req.dimensions is not None:
            raise tr.not_supported("dimensions is not supported: the model's embedding size "
                                   "is used", "dimensions")
        strings = [str(t) for t in texts]
        vectors, counts = await asyncio.gather(
            self.client.embed(model, strings, timeout=self.settings.request_timeout),
            asyncio.gather(*(self.client.tokenize(model, t) for t in strings)))
        data = []
        for i, vec in enumerate(vectors):
            emb: Any = vec
            if req.encoding_format == "base64":
                emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        n = sum(len(c) for c in counts)
        return JSONResponse({"object": "list", "data": data, "model": model,
                             "usage": {"prompt_tokens": n, "total_tokens": n}})

    async def chat_completions(self, request: Request) -> Response:
        req = await self.body(request, ChatCompletionRequest)
        model = self.model(request, req.model)
        tr.check_common(req)
        plan = tr.tool_plan(req)
        schema = plan.schema if plan.forced else tr.schema_of(req.response_format,
                                                              req.json_schema)
        if plan.forced and (req.response_format is not None or req.json_schema is not None):
            raise tr.bad_request("a forced tool call is its own format: drop response_format",
                                 "response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise tr.bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        kwargs = dict(max_tokens=tr.max_tokens_of(req, req.max_completion_tokens),
                      stop=tr.stops_of(req), session=req.session, ignore_eos=req.ignore_eos,
                      keep_alive=tr.keep_alive_of(req), speculative=tr.speculative_of(req),
                      logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                      timeout=self.settings.request_timeout,
                      add_special=False, parse_special=True,
                      **tr.sampling_of(req, schema))
        prompt = await self.client.apply_chat_template(model, tr.chat_messages(req),
                                                       tools=plan.template_tools)
        if not req.stream:
            c = await self.until_disconnect(
                request, self.client.generate(model, prompt, **kwargs))
            return JSONResponse(tr.chat_response(c, model, plan, bool(req.logprobs)))
        stream = self.client.stream(model, prompt, **kwargs)
        first = await self.until_disconnect(request, _first(stream))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(self._chat_events(stream, first, model, plan, bool(req.logprobs),
                                                   include_usage),
                                 media_type="text/event-stream", headers=SSE_HEADERS)

    async def _chat_events(self, stream: AsyncStream, first: str | None, model: str,
                           plan: tr.ToolPlan, logprobs: bool,
                           include_usage: bool) -> AsyncIterator[bytes]:
        cid, created = tr.new_id("chatcmpl"), tr.now()
        sent_lp = 0

        def chunk(delta: dict[str, Any], finish: str | None = None,
                  lp: list[dict[str, Any]] | None = None) -> bytes:
            return sse(tr.chat_chunk(cid, created, model, delta, finish, lp, include_usage))

        # a reply that may be a tool call is held back and sent whole at the end; with
        # tool_choice "auto" only while it still looks like one (a JSON object)
        holding = bool(plan.names)
        try:
            yield chunk({"role": "assistant", "content": ""})
            buffered: list[str] = []
            pending = first
            while pending is not None:
                if holding:
                    buffered.append(pending)
                    head = "".join(buffered).lstrip()
                    if not plan.forced and head and not head.startswith(("{", "[")):
                        holding = False
                        pending, buffered = "".join(buffered), []
                if not holding:
                    lp = None
                    if logprobs:
                        lp = tr.chat_logprobs(stream.logprobs[sent_lp:])
                        sent_lp = len(stream.logprobs)
                    yield chunk({"content": pending}, lp=lp)
                pending = await _next(stream)
            c = stream.result
            assert c is not None
            reason = tr.finish_reason(c)
            if holding:
                calls = tr.parse_tool_calls("".join(buffered), plan.names)
                if calls is not None:
                    yield chunk({"tool_calls": [dict(call, index=i)
                                                for i, call in enumerate(calls)]})
                    reason = "tool_calls"
                else:
                    if plan.forced:
                        reason = "length"
                    yield chunk({"content": "".join(buffered)})
            tail = tr.chat_logprobs(stream.logprobs[sent_lp:]) if logprobs else None
            yield chunk({}, reason, tail or None)
            if include_usage:
                yield sse(tr.usage_chunk(cid, created, model, "chat.completion.chunk", c.stats))
            yield SSE_DONE
        except LlamafleetError as exc:
            yield sse(from_error(exc).body())
        finally:
            await stream.cancel()

    async def completions(self, request: Request) -> Response:
        req = await self.body(request, CompletionRequest)
        model = self.model(request, req.model)
        tr.check_common(req)
        if req.best_of not in (None, 1):
            raise tr.bad_request("best_of must be 1", "best_of")
        if req.suffix:
            raise tr.not_supported("suffix (fill in the middle) is not supported", "suffix")
        if req.echo and req.logprobs is not None:
            raise tr.not_supported("echo with logprobs needs the prompt's logprobs, which are "
                                   "not computed", "echo")
        p: Any = req.prompt
        prompts: list[str | list[int]]
        if isinstance(p, str):
            prompts = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]  # one prompt of token ids
        else:
            prompts = list(p)  # several prompts
        if not prompts:
            raise tr.bad_request("prompt must not be empty", "prompt")
        if len(prompts) > MAX_PROMPTS:
            raise tr.bad_request(f"at most {MAX_PROMPTS} prompts per request (got "
                                 f"{len(prompts)}): send several requests", "prompt")
        if req.session is not None and len(prompts) > 1:
            raise tr.bad_request("a session holds one conversation: send one prompt with it",
                                 "session")
        schema = tr.schema_of(req.response_format, req.json_schema)
        kwargs = dict(max_tokens=tr.max_tokens_of(req, 16), stop=tr.stops_of(req),
                      ignore_eos=req.ignore_eos, session=req.session, logprobs=req.logprobs,
                      keep_alive=tr.keep_alive_of(req), speculative=tr.speculative_of(req),
                      timeout=self.settings.request_timeout, **tr.sampling_of(req, schema))

        def args(prompt: str | list[int]) -> dict[str, Any]:
            return {"prompt": prompt} if isinstance(prompt, str) else {"tokens": prompt}

        echoes = [await self._echo(model, x) if req.echo else "" for x in prompts]
        if not req.stream:
            results = await self.until_disconnect(request, all_or_none([
                self.client.generate(model, **args(x), **kwargs)
                for x in prompts]))
            choices = [tr.completion_choice(i, echoes[i] + c.text, c, None,
                                            tr.completion_logprobs(c.logprobs or [],
                                                                   len(echoes[i]))
                                            if req.logprobs is not None else None)
                       for i, c in enumerate(results)]
            return JSONResponse({"id": tr.new_id("cmpl"), "object": "text_completion",
                                 "created": tr.now(), "model": model,
                                 "system_fingerprint": tr.SYSTEM_FINGERPRINT,
                                 "choices": choices,
                                 "usage": tr.usage([c.stats for c in results])})
        streams = [self.client.stream(model, **args(x), **kwargs)
                   for x in prompts]
        firsts = await self.until_disconnect(request, all_or_none([_first(s) for s in streams]))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            self._completion_events(streams, firsts, echoes, model, req.logprobs is not None,
                                    include_usage),
            media_type="text/event-stream", headers=SSE_HEADERS)

    async def _echo(self, model: str, prompt: str | list[int]) -> str:
        return prompt if isinstance(prompt, str) else await self.client.detokenize(model, prompt)

    async def _completion_events(self, streams: list[AsyncStream], firsts: list[str | None],
                                 echoes: list[str], model: str, logprobs: bool,
                                 include_usage: bool) -> AsyncIterator[bytes]:
        cid, created = tr.new_id("cmpl"), tr.now()
        queue: asyncio.Queue[tuple[int, str | None, BaseException | None]] = asyncio.Queue()

        def event(i: int, text: str, reason: str | None, lp: dict[str, Any] | None) -> bytes:
            body: dict[str, Any] = {
                "id": cid, "object": "text_completion", "created": created, "model": model,
                "system_fingerprint": tr.SYSTEM_FINGERPRINT,
                "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": reason}]}
            if include_usage:
                body["usage"] = None
            return sse(body)

        async def pump(i: int) -> None:
            try:
                item = firsts[i]
                while item is not None:
                    await queue.put((i, item, None))
                    item = await _next(streams[i])
                await queue.put((i, None, None))
            except BaseException as exc:  # delivered to the response, then re-raised there
                await queue.put((i, None, exc))

        tasks = [asyncio.ensure_future(pump(i)) for i in range(len(streams))]
        sent = [0] * len(streams)
        offsets = [len(e) for e in echoes]
        try:
            for i, e in enumerate(echoes):
                if e:
                    yield event(i, e, None, None)
            open_streams = len(streams)
            while open_streams:
                i, text, exc = await queue.get()
                if exc is not None:
                    if isinstance(exc, LlamafleetError):
                        yield sse(from_error(exc).body())
                        return
                    raise exc
                s = streams[i]
                lp = None
                if logprobs:
                    lp = tr.completion_logprobs(s.logprobs[sent[i]:], offsets[i])
                    sent[i] = len(s.logprobs)
                if text is not None:
                    offsets[i] += len(text)
                    yield event(i, text, None, lp)
                    continue
                open_streams -= 1
                assert s.result is not None
                yield event(i, "", tr.finish_reason(s.result),
                            lp if lp and lp["tokens"] else None)
            if include_usage:
                yield sse(tr.usage_chunk(cid, created, model, "text_completion",
                                         [s.result.stats for s in streams
                                          if s.result is not None]))
            yield SSE_DONE
        finally:
            for t in tasks:
                t.cancel()
            for s in streams:
                await s.cancel()


async def _first(stream: AsyncStream) -> str | None:
    """The first text delta (None: the stream ended without text). Errors raised before
    anything was sent become plain HTTP errors."""
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None
    except BaseException:
        await stream.cancel()
        raise


async def _next(stream: AsyncStream) -> str | None:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


def invalid(exc: ValidationError) -> HTTPError:
    """A 400 that names the first problem of a body."""
    first = exc.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return HTTPError(400, f"request body is not valid JSON: {first['msg']}",
                         code="invalid_json")
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return HTTPError(400, f"unrecognized request argument: {loc}", code="unknown_field",
                         param=loc)
    return HTTPError(400, f"{loc}: {first['msg']}" if loc else first["msg"],
                     code="invalid_value", param=loc or None)


def _endpoint(fn: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    async def run(request: Request) -> Response:
        try:
            return await fn(request)
        except HTTPError as err:
            return error_response(err)
        except LlamafleetError as exc:
            return error_response(from_error(exc))
        except ClientDisconnect:
            return Response(status_code=499)
    return run


def create_app(client: AsyncClient, settings: Settings) -> tuple[ASGIApp, Gateway]:
    """The ASGI app (wrapped in :class:`Guard`) and the Gateway behind it."""
    gw = Gateway(client, settings)
    routes = [Route("/health", _endpoint(gw.health), methods=["GET"]),
              Route("/v1/health", _endpoint(gw.health), methods=["GET"]),
              Route("/metrics", _endpoint(gw.metrics_endpoint), methods=["GET"])]
    if not settings.metrics_only:
        routes += [
            Route("/v1/models", _endpoint(gw.models), methods=["GET"]),
            Route("/v1/chat/completions", _endpoint(gw.chat_completions), methods=["POST"]),
            Route("/v1/completions", _endpoint(gw.completions), methods=["POST"]),
            Route("/v1/embeddings", _endpoint(gw.embeddings), methods=["POST"]),
            Route("/tokenize", _endpoint(gw.tokenize), methods=["POST"]),
            Route("/detokenize", _endpoint(gw.detokenize), methods=["POST"]),
        ]

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(HTTPError(404, f"no such endpoint: {request.method} "
                                        f"{request.url.path}", type="not_found_error",
                                        code="not_found"))

    async def bad_method(request: Request, exc: Exception) -> Response:
        return error_response(HTTPError(405, f"{request.method} is not allowed on "
                                        f"{request.url.path}", code="method_not_allowed"))

    async def crashed(request: Request, exc: Exception) -> Response:
        log.exception("gateway error on %s", request.url.path, exc_info=exc)
        return error_response(HTTPError(500, f"internal error: {type(exc).__name__}",
                                        type="server_error", code="internal"))

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: bad_method,
                                                       500: crashed})
    return Guard(app, settings, gw.metrics), gw
