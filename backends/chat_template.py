"""Render GGUF/Hugging Face chat templates (Jinja) safely. Pure Python.

Templates come from model files, i.e. from strangers: they are rendered in
:class:`jinja2.sandbox.ImmutableSandboxedEnvironment` (no attribute access to
``__class__`` & co., no mutation of the passed objects). Any failure, including
a sandbox violation, raises :class:`runtime.errors.BadRequest`.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from llamafleet.runtime.errors import BadRequest

#: The ChatML template (SmolLM2, Qwen...): the default of backends without one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}{% endif %}"
)

#: Largest template source accepted (bytes).
MAX_TEMPLATE_BYTES = 256 * 1024
#: Largest rendered prompt (characters) before rendering is refused.
MAX_OUTPUT_CHARS = 16 * 1024 * 1024


class TemplateError(Exception):
    """Raised by ``raise_exception`` inside a template."""


def _raise_exception(message: str) -> None:
    raise TemplateError(str(message))


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False,
            separators: Any = None, sort_keys: bool = False) -> str:
    # like transformers' tojson: no HTML escaping, unicode kept
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii,
                      separators=tuple(separators) if separators else None,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except TemplateSyntaxError as exc:
        raise BadRequest(f"chat template does not compile: {exc.message} (line {exc.lineno})") \
            from None


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise BadRequest("messages must be a list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"message {i} is not an object")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise BadRequest(f"message {i} has no role")
        out.append(dict(m))
    return out


def render_chat_template(template: str, messages: Sequence[dict[str, Any]], *,
                         add_generation_prompt: bool = True,
                         bos_token: str = "", eos_token: str = "",
                         enable_thinking: bool | None = None,
                         tools: Sequence[dict[str, Any]] | None = None,
                         extra: dict[str, Any] | None = None) -> str:
    """Render ``messages`` with the Jinja ``template``.

    Variables: ``messages``, ``add_generation_prompt``, ``bos_token``,
    ``eos_token``, ``enable_thinking`` (only when not None), ``tools`` (only when
    given), plus ``extra``. A template that does not use ``tools`` gets them as a
    system message instead (:func:`tools_system_prompt`), as llama.cpp's generic
    tool format does. Helpers: ``raise_exception(msg)``, ``strftime_now(fmt)``,
    ``tojson``.
    """
    if not isinstance(template, str) or not template:
        raise BadRequest("no chat template")
    if len(template.encode("utf-8", "surrogatepass")) > MAX_TEMPLATE_BYTES:
        raise BadRequest(f"chat template larger than {MAX_TEMPLATE_BYTES} bytes")
    msgs = _check_messages(messages)
    if tools and "tools" not in template:
        msgs = with_tools_prompt(msgs, tools)
    from jinja2.exceptions import SecurityError
    from jinja2.exceptions import TemplateError as JinjaTemplateError

    tmpl = _compile(template)
    ctx: dict[str, Any] = dict(extra or {})
    ctx.update(messages=msgs, add_generation_prompt=bool(add_generation_prompt),
               bos_token=bos_token, eos_token=eos_token)
    if enable_thinking is not None:
        ctx["enable_thinking"] = bool(enable_thinking)
    if tools and "tools" in template:
        ctx["tools"] = [dict(t) for t in tools]
    try:
        out = tmpl.render(**ctx)
    except SecurityError as exc:
        raise BadRequest(f"chat template violates the sandbox: {exc}") from None
    except TemplateError as exc:
        raise BadRequest(f"chat template raised: {exc}") from None
    except JinjaTemplateError as exc:
        raise BadRequest(f"chat template failed: {exc}") from None
    except RecursionError:
        raise BadRequest("chat template recursed too deeply") from None
    except Exception as exc:  # errors of template logic (TypeError, KeyError...)
        raise BadRequest(f"chat template failed: {type(exc).__name__}: {exc}") from None
    if len(out) > MAX_OUTPUT_CHARS:
        raise BadRequest("rendered chat prompt is too large")
    return out


def tools_system_prompt(tools: Sequence[dict[str, Any]]) -> str:
    """The system text that declares ``tools`` to a template without tool support."""
    import json
    return ("You can call these functions. To call one, answer with only a JSON object "
            '{"name": <function name>, "arguments": <arguments object>}.\n'
            + json.dumps([dict(t) for t in tools], ensure_ascii=False))


def with_tools_prompt(messages: list[dict[str, Any]],
                      tools: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` with the tools declared in their (first) system message."""
    text = tools_system_prompt(tools)
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        first["content"] = f"{first.get('content') or ''}\n\n{text}".strip()
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]
