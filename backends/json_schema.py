"""JSON Schema -> GBNF, reusing llama-cpp-python's converter without libllama.

llama-cpp-python ships ``llama_cpp/llama_grammar.py`` (``SchemaConverter``,
``json_schema_to_gbnf``), a pure-Python module that imports nothing from the
``llama_cpp`` package. Importing it the normal way would run
``llama_cpp/__init__.py``, which loads the native library through ctypes; a
worker using only the fake backend must not do that. So the file is located
with :func:`importlib.util.find_spec` (which does not execute the package) and
loaded on its own under a private module name, once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import threading
from types import ModuleType
from typing import Any

from llamafleet.runtime.errors import BadRequest, NotSupported

__all__ = ["json_schema_to_gbnf"]

_MODULE_NAME = "_llamafleet_llama_grammar"
_lock = threading.Lock()
#: the loaded converter module, once (a dict: no narrowing games across the lock)
_loaded: dict[str, ModuleType] = {}
#: Largest repetition bound a schema may ask for (llama.cpp's MAX_REPETITION_THRESHOLD,
#: as for GBNF ``{m,n}``): the converter writes out bounded repetitions one element at a
#: time, so ``maxLength: 2147483647`` would hold the worker for minutes and take
#: gigabytes before any other check could see the grammar.
MAX_SCHEMA_REPETITION = 2000
_BOUND_KEYS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties",
               "maxProperties")
_PATTERN_BOUND = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")
#: One JSON string character: unescaped (no '"', '\\', controls, DEL) or an escape.
_CHAR_RULE = r'[^"\\\x7F\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'


def _converter_module() -> ModuleType:
    """llama-cpp-python's ``llama_grammar.py``, loaded standalone and cached."""
    if "converter" in _loaded:
        return _loaded["converter"]
    with _lock:
        if "converter" in _loaded:
            return _loaded["converter"]
        spec = importlib.util.find_spec("llama_cpp")
        locations = list(spec.submodule_search_locations or []) if spec else []
        path = next((os.path.join(d, "llama_grammar.py") for d in locations
                     if os.path.isfile(os.path.join(d, "llama_grammar.py"))), None)
        if path is None:
            raise NotSupported("JSON schemas need llama-cpp-python's llama_cpp/llama_grammar.py, "
                               "which was not found; install llama-cpp-python==0.3.36")
        file_spec = importlib.util.spec_from_file_location(_MODULE_NAME, path)
        assert file_spec is not None and file_spec.loader is not None
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[_MODULE_NAME] = module  # dataclasses/typing may look it up
        try:
            file_spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(_MODULE_NAME, None)
            raise
        # The converter's string character rule admits raw control characters,
        # which JSON forbids; use upstream llama.cpp's rule (keeping "\\/").
        module.PRIMITIVE_RULES["char"] = module.BuiltinRule(_CHAR_RULE, [])
        _loaded["converter"] = module
        return module


def json_schema_to_gbnf(schema: dict[str, Any] | bool | str) -> str:
    """A GBNF grammar (root rule ``root``) for JSON documents matching ``schema``.

    ``schema`` is a dict, a JSON string, or a boolean (``True`` is the empty
    schema, which the converter, like llama.cpp, maps to "any JSON object";
    ``False`` matches nothing and is rejected). Whitespace between tokens is
    limited to at most one space. Invalid or unsupported schemas raise
    :class:`runtime.errors.BadRequest`.
    """
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise BadRequest(f"JSON schema is not valid JSON: {e}") from None
    if schema is True:
        schema = {}
    elif schema is False:
        raise BadRequest("JSON schema 'false' matches no document")
    if not isinstance(schema, dict):
        raise BadRequest(f"JSON schema must be an object or a boolean, not {type(schema).__name__}")
    try:
        # a deep copy (the converter rewrites $ref values in place) that also
        # proves the schema is plain JSON data
        text = json.dumps(schema)
    except (TypeError, ValueError) as e:
        raise BadRequest(f"JSON schema is not JSON-serialisable: {e}") from None

    _check_bounds(schema)
    module = _converter_module()
    try:
        grammar = module.json_schema_to_gbnf(text)
    except RecursionError:
        raise BadRequest("JSON schema is too deeply nested or infinitely recursive") from None
    except Exception as e:  # the converter signals bad schemas with assert/KeyError/ValueError...
        detail = str(e) or type(e).__name__
        if isinstance(e, KeyError):
            detail = f"unresolved reference or missing key {e}"
        raise BadRequest(f"unsupported or invalid JSON schema: {detail}") from None

    # Every grammar handed out must be one our matcher (and llama.cpp) accepts.
    from llamafleet.backends.gbnf import parse_or_refuse

    parse_or_refuse(grammar, "JSON schema produced an unusable grammar")
    return grammar


def _check_bounds(schema: Any) -> None:
    """BadRequest for a repetition bound (length/items keyword, ``{m,n}`` in a
    pattern) above MAX_SCHEMA_REPETITION, anywhere in the schema."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key in _BOUND_KEYS and isinstance(value, (int, float)) \
                        and not isinstance(value, bool) and value > MAX_SCHEMA_REPETITION:
                    raise BadRequest(f"JSON schema {key} {value} exceeds "
                                     f"{MAX_SCHEMA_REPETITION} (the grammar grows with it)")
                if key == "pattern" and isinstance(value, str):
                    for m in _PATTERN_BOUND.finditer(value):
                        for n in m.groups():
                            if n and int(n) > MAX_SCHEMA_REPETITION:
                                raise BadRequest(
                                    f"JSON schema pattern repetition {{{m.group(0)[1:-1]}}} "
                                    f"exceeds {MAX_SCHEMA_REPETITION}")
                stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)
