"""OpenAI requests to our calls, and our results to OpenAI responses (no I/O here).

The HTTP layer (:mod:`~llamafleet.gateway.app`) parses a body into a
:mod:`~llamafleet.gateway.schemas` model, asks this module what to send, sends it
with :class:`~llamafleet.client.AsyncClient`, and asks this module again how the
answer reads in OpenAI's shapes.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from llamafleet.gateway.errors import HTTPError
from llamafleet.gateway.schemas import ChatCompletionRequest, ResponseFormat, Sampled
from llamafleet.runtime import protocol
from llamafleet.runtime.protocol import Completion, CompletionStats, TokenLogprob

#: OpenAI's ``finish_reason`` for ours
FINISH_REASONS = {"eog": "stop", "stop": "stop", "grammar": "stop", "length": "length"}
SYSTEM_FINGERPRINT = "llamafleet"


def not_supported(message: str, param: str | None = None) -> HTTPError:
    return HTTPError(501, message, type="not_supported_error", code="not_supported",
                     param=param)


def bad_request(message: str, param: str | None = None) -> HTTPError:
    return HTTPError(400, message, code="bad_request", param=param)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


# -- requests ---------------------------------------------------------------------
def check_common(req: Sampled) -> None:
    """Refuse what is valid JSON but not something we do (400/501)."""
    if req.n is not None and req.n != 1:
        raise bad_request("n must be 1: one choice per request (send several requests "
                          "for several choices)", "n")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true",
                          "stream_options")
    keep_alive_of(req)


def keep_alive_of(req: Sampled) -> float | None:
    """The request's ``keep_alive`` (seconds the model stays loaded once idle, -1:
    never unloaded, as Ollama's); 400 for anything else."""
    v = req.keep_alive
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or \
            not (v == -1 or 0 <= v <= 10 ** 7):
        raise bad_request("keep_alive must be a number of seconds (0..10000000) or -1 "
                          "(never unload)", "keep_alive")
    return float(v)


def speculative_of(req: Sampled) -> str | None:
    """The client's ``speculative`` argument: the model's own setting by default,
    None for "off"."""
    mode = req.speculative or "model"
    return None if mode == "off" else mode


def sampling_of(req: Sampled, json_schema: Any = None) -> dict[str, Any]:
    """The request's sampling parameters (absent ones fall back to the model's
    defaults in the worker)."""
    out: dict[str, Any] = {}
    for key in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty",
                "top_k", "min_p", "repeat_penalty", "grammar"):
        value = getattr(req, key)
        if value is not None:
            out[key] = value
    if req.logit_bias:
        bias: dict[int, float] = {}
        for k, v in req.logit_bias.items():
            # ASCII digits only: str.isdigit() admits "²", which int() refuses, and int()
            # refuses more than 4300 digits
            if not (k.isascii() and k.isdigit() and len(k) <= 10):
                raise bad_request(f"logit_bias key {k[:20]!r} is not a token id", "logit_bias")
            bias[int(k)] = v
        out["logit_bias"] = bias
    if json_schema is not None:
        if "grammar" in out:
            raise bad_request("give either grammar or a JSON schema (response_format, "
                              "json_schema, tools), not both", "grammar")
        out["json_schema"] = json_schema
    return out


def schema_of(fmt: ResponseFormat | None, extra: dict[str, Any] | None) -> Any:
    """The JSON schema that ``response_format`` (or llama.cpp's ``json_schema``) asks for."""
    if extra is not None:
        if fmt is not None and fmt.type != "text":
            raise bad_request("give either response_format or json_schema, not both",
                              "json_schema")
        return extra
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return fmt.schema_ if fmt.schema_ is not None else {"type": "object"}
    schema = fmt.json_schema.schema_ if fmt.json_schema is not None else fmt.schema_
    if schema is None:
        raise bad_request("response_format of type json_schema needs json_schema.schema",
                          "response_format")
    return schema


def max_tokens_of(req: Sampled, alt: int | None = None) -> int:
    """``max_tokens`` (or ``max_completion_tokens``); none given: up to the context."""
    if req.max_tokens is not None:
        return req.max_tokens
    if alt is not None:
        return alt
    return protocol.MAX_GENERATE_TOKENS  # the worker stops where the context ends


def stops_of(req: Sampled) -> list[str]:
    if req.stop is None:
        return []
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    for s in stops:
        if not s or len(s) > protocol.MAX_STOP_CHARS:
            raise bad_request(f"each stop string must be 1..{protocol.MAX_STOP_CHARS} "
                              "characters", "stop")
    return stops


@dataclass(frozen=True)
class ToolPlan:
    """How a chat request's tools are used: given to the template, and (for
    ``tool_choice`` "required" or a named function) forced by a JSON schema."""

    template_tools: list[dict[str, Any]] | None
    schema: dict[str, Any] | None
    names: tuple[str, ...]

    @property
    def forced(self) -> bool:
        return self.schema is not None


NO_TOOLS = ToolPlan(None, None, ())


def tool_plan(req: ChatCompletionRequest) -> ToolPlan:
    """What to do with ``tools`` / ``tool_choice``."""
    if not req.tools:
        if req.tool_choice not in (None, "none", "auto"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return NO_TOOLS
    choice = req.tool_choice or "auto"
    if choice == "none":
        return NO_TOOLS
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    names = tuple(t.function.name for t in req.tools)
    if choice == "auto":
        return ToolPlan(tools, None, names)
    if isinstance(choice, str):  # "required"
        chosen = list(req.tools)
    else:
        chosen = [t for t in req.tools if t.function.name == choice.function.name]
        if not chosen:
            raise bad_request(f"tool_choice names {choice.function.name!r}, which is not "
                              "among the tools", "tool_choice")
    options = [{"type": "object",
                "properties": {"name": {"const": t.function.name},
                               "arguments": t.function.parameters or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False}
               for t in chosen]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return ToolPlan(tools, schema, tuple(t.function.name for t in chosen))


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The messages as the chat template takes them."""
    out: list[dict[str, Any]] = []
    for m in req.messages:
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                               "content": m.text()}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


# -- results ----------------------------------------------------------------------
def usage(stats: CompletionStats | list[CompletionStats]) -> dict[str, Any]:
    """OpenAI's ``usage`` (with the prefix cache's tokens as ``cached_tokens``)."""
    items = stats if isinstance(stats, list) else [stats]
    prompt = sum(s.prompt_tokens for s in items)
    generated = sum(s.generated_tokens for s in items)
    return {"prompt_tokens": prompt, "completion_tokens": generated,
            "total_tokens": prompt + generated,
            "prompt_tokens_details": {"cached_tokens": sum(s.cached_tokens for s in items)}}


def finish_reason(c: Completion) -> str:
    return FINISH_REASONS.get(c.finish_reason, "stop")


def _token_text(raw: bytes) -> str:
    return bytes(raw).decode("utf-8", "replace")


def chat_logprobs(entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    """``choices[].logprobs.content`` of a chat completion."""
    return [{"token": _token_text(e["bytes"]), "logprob": e["logprob"],
             "bytes": list(bytes(e["bytes"])),
             "top_logprobs": [{"token": _token_text(t["bytes"]), "logprob": t["logprob"],
                               "bytes": list(bytes(t["bytes"]))} for t in e["top"]]}
            for e in entries]


def completion_logprobs(entries: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """``choices[].logprobs`` of a legacy completion (text offsets from ``offset``)."""
    tokens, offsets, pos = [], [], offset
    for e in entries:
        text = _token_text(e["bytes"])
        tokens.append(text)
        offsets.append(pos)
        pos += len(text)
    return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{_token_text(t["bytes"]): t["logprob"] for t in e["top"]}
                             for e in entries],
            "text_offset": offsets}


def parse_tool_calls(text: str, names: tuple[str, ...]) -> list[dict[str, Any]] | None:
    """The tool call a reply holds (``{"name": ..., "arguments": {...}}``), as OpenAI's
    ``tool_calls``; None when the text is not one."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    calls = obj if isinstance(obj, list) else [obj]
    out = []
    for call in calls:
        if not (isinstance(call, dict) and call.get("name") in names
                and isinstance(call.get("arguments"), dict)):
            return None
        out.append({"id": new_id("call"), "type": "function",
                    "function": {"name": call["name"],
                                 "arguments": json.dumps(call["arguments"],
                                                         ensure_ascii=False)}})
    return out or None


def chat_choice(c: Completion, plan: ToolPlan, logprobs: bool) -> dict[str, Any]:
    """One ``choices[]`` entry of a chat completion."""
    message: dict[str, Any] = {"role": "assistant", "content": c.text}
    reason = finish_reason(c)
    calls = parse_tool_calls(c.text, plan.names) if plan.names else None
    if plan.forced and calls is None:
        # the grammar ended early (max_tokens): no complete call to return
        reason = "length"
    if calls is not None:
        message = {"role": "assistant", "content": None, "tool_calls": calls}
        reason = "tool_calls"
    return {"index": 0, "message": message, "finish_reason": reason,
            "logprobs": {"content": chat_logprobs(c.logprobs or [])} if logprobs else None}


def chat_response(c: Completion, model: str, plan: ToolPlan, logprobs: bool) -> dict[str, Any]:
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(),
            "model": model, "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [chat_choice(c, plan, logprobs)], "usage": usage(c.stats)}


def chat_chunk(cid: str, created: int, model: str, delta: dict[str, Any],
               finish: str | None = None, logprobs: list[dict[str, Any]] | None = None,
               usage_null: bool = False) -> dict[str, Any]:
    """One ``chat.completion.chunk``."""
    chunk: dict[str, Any] = {
        "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                     "logprobs": None if logprobs is None else {"content": logprobs}}]}
    if usage_null:
        chunk["usage"] = None
    return chunk


def usage_chunk(cid: str, created: int, model: str, obj: str,
                stats: CompletionStats | list[CompletionStats]) -> dict[str, Any]:
    """The last chunk when ``stream_options.include_usage`` is set: ``choices: []``."""
    return {"id": cid, "object": obj, "created": created, "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT, "choices": [], "usage": usage(stats)}


def completion_choice(index: int, text: str, c: Completion | None, reason: str | None,
                      logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs,
            "finish_reason": reason if c is None else finish_reason(c)}
