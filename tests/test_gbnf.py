"""GBNF parser/matcher (backends.gbnf) and JSON Schema -> GBNF (backends.json_schema)."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from llamafleet.backends.gbnf import Grammar, GrammarError, Matcher, parse_gbnf
from llamafleet.backends.json_schema import json_schema_to_gbnf
from llamafleet.runtime.errors import BadRequest


def full_match(grammar: Grammar | str, text: str | bytes) -> bool:
    """Whether ``text`` is accepted byte by byte and complete at the end."""
    g = parse_gbnf(grammar) if isinstance(grammar, str) else grammar
    data = text.encode() if isinstance(text, str) else text
    m = g.matcher()
    for b in data:
        if not m.accepts_byte(b):
            return False
        m.accept_byte(b)
    return m.is_complete()


def check(grammar: str, good: list[str], bad: list[str]) -> None:
    g = parse_gbnf(grammar)
    for s in good:
        assert full_match(g, s), f"{grammar!r} should accept {s!r}"
    for s in bad:
        assert not full_match(g, s), f"{grammar!r} should reject {s!r}"


# ---------------------------------------------------------------------------
# syntax features
# ---------------------------------------------------------------------------

def test_literal_and_sequence() -> None:
    check('root ::= "ab" "c"', ["abc"], ["", "ab", "abcc", "abd"])


def test_literal_escapes() -> None:
    check(r'root ::= "\n\t\r\\\"\x41\u00e9\U0001F600"',
          ["\n\t\r\\\"Aé\U0001F600"], ["\n\t\r\\\"A"])


def test_char_classes() -> None:
    check("root ::= [a-cx] [0-9]", ["a0", "c9", "x5"], ["d0", "a", "aa", "A1"])
    check(r"root ::= [^a-z\n]", ["A", "é", "-", "\u4e2d"], ["a", "z", "\n", ""])
    check(r"root ::= [\]\[\-\\]+", ["]", "[-\\"], ["a"])
    check("root ::= [a-]", ["a", "-"], ["b"])          # trailing '-' is literal
    check(r"root ::= [\x00-\x1F]", ["\x00", "\x1f"], [" "])


def test_any_char() -> None:
    check("root ::= . .", ["ab", "\n\U0001F600", "éé"], ["a", "abc"])


def test_alternation_and_groups() -> None:
    check('root ::= ("a" | "bc") "d" | "e"', ["ad", "bcd", "e"], ["d", "bd", "ed"])
    check('root ::= "x" ( ) "y" | ', ["xy", ""], ["x"])  # empty group, empty alternative


def test_postfix_operators() -> None:
    check('root ::= "a"* "b"+ "c"?', ["b", "aabbb", "bc", "abbc"], ["", "a", "cb", "bcc"])
    check('root ::= "ab"*', ["", "ab", "abab"], ["a", "aba"])  # operator applies to whole literal
    check('root ::= ("a" "b"?)+', ["a", "ab", "aab", "abab"], ["", "b", "abb"])


@pytest.mark.parametrize("op,lo,hi", [("{3}", 3, 3), ("{2,}", 2, 9), ("{1,3}", 1, 3),
                                       ("{,2}", 0, 2), ("{0,2}", 0, 2), ("{ 1 , 2 }", 1, 2),
                                       ("{0}", 0, 0)])
def test_bounded_repetition(op: str, lo: int, hi: int) -> None:
    g = parse_gbnf(f'root ::= "x"{op} "."')
    for n in range(10):
        assert full_match(g, "x" * n + ".") == (lo <= n <= hi), (op, n)


def test_rule_references_and_names() -> None:
    check('root ::= greet-2 " " Name\ngreet-2 ::= "hi" | "yo"\nName ::= [A-Z] [a-z]*',
          ["hi Bob", "yo X"], ["hi bob", "hey Bob"])


def test_comments_and_line_continuation() -> None:
    grammar = """
# leading comment
root ::=   # comment after ::=
    item (
        "," # inside a group newlines are fine
        item
    )* |
    "empty"   # a trailing '|' continues the rule
item ::= [0-9]
"""
    check(grammar, ["1", "1,2,3", "empty"], ["", "1,", "empty1"])


def test_crlf_and_last_definition_wins() -> None:
    check('root ::= a\r\na ::= "x"\r\na ::= "y"\r\n', ["y"], ["x"])  # as in llama.cpp


def test_right_recursion() -> None:
    g = parse_gbnf('root ::= "(" root ")" | "x"')
    assert full_match(g, "((((x))))")
    assert not full_match(g, "((x)")
    assert full_match(g, "(" * 300 + "x" + ")" * 300)


def test_custom_root() -> None:
    g = parse_gbnf('a ::= "a" b\nb ::= "b"', root="a")
    assert full_match(g, "ab")
    with pytest.raises(GrammarError, match="no root rule 'root'"):
        parse_gbnf('a ::= "a"')


def test_json_grammar_from_llama_cpp() -> None:
    grammar = r'''
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws
array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws
string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws ::= | " " | "\n" [ \t]{0,20}
'''
    g = parse_gbnf(grammar)
    doc = {"a": [1, 2.5, -3, {"b": None, "c": [True, False]}], "é": "x\"y\\z\u00ff", "e": []}
    assert full_match(g, json.dumps(doc))
    assert full_match(g, json.dumps(doc, ensure_ascii=False))
    assert full_match(g, json.dumps(doc, indent=2))
    assert not full_match(g, json.dumps(doc)[:-1])
    assert not full_match(g, '{"a": 01}')
    assert not full_match(g, "[1]")


def test_matches_regex_exhaustively() -> None:
    """Compare with an equivalent regex on every string over a small alphabet."""
    cases = [
        ('root ::= ("ab" | "c")* "d"{1,2} [x-y]?', r"(ab|c)*d{1,2}[x-y]?"),
        ('root ::= a ("," a)*\na ::= [ab]+ | "c"?', r"([ab]+|c?)(,([ab]+|c?))*"),
        ('root ::= ("a" "b"?){2,3} | [^a-c]', r"(ab?){2,3}|[^a-c]"),
    ]
    alphabet = "abcdxy,"
    for grammar, pattern in cases:
        g, rx = parse_gbnf(grammar), re.compile(pattern, re.S)
        for n in range(6):
            for chars in itertools.product(alphabet, repeat=n):
                s = "".join(chars)
                assert full_match(g, s) == bool(rx.fullmatch(s)), (grammar, s)


# ---------------------------------------------------------------------------
# byte-level behaviour and matcher API
# ---------------------------------------------------------------------------

def test_utf8_partial_sequences() -> None:
    g = parse_gbnf('root ::= "é" | [а-я]+')
    m = g.matcher()
    # 'é' is C3 A9; 'а'..'я' is D0 B0 .. D1 8F
    assert m.allowed_bytes() == [0xC3, 0xD0, 0xD1]
    assert not m.accepts_byte(ord("e"))
    m.accept_byte(0xC3)
    assert m.allowed_bytes() == [0xA9]
    assert not m.is_complete() and not m.is_dead()
    m.accept_byte(0xA9)
    assert m.is_complete() and m.is_dead() is False and m.allowed_bytes() == []

    m = g.matcher()
    m.accept_byte(0xD0)
    assert m.allowed_bytes() == list(range(0xB0, 0xC0))   # а..п
    m.accept_byte(0xBF)                                    # п
    assert m.is_complete()
    m.accept_byte(0xD1)
    assert not m.is_complete()                             # partial code point pending
    assert m.allowed_bytes() == list(range(0x80, 0x90))   # р..я
    m.accept_bytes("я".encode()[1:])
    assert m.is_complete()
    assert full_match(g, "привет")
    assert not full_match(g, "Привет")


def test_utf8_four_byte_and_invalid_bytes() -> None:
    g = parse_gbnf(r'root ::= [\U0001F600-\U0001F64F] | "a"')
    m = g.matcher()
    assert m.allowed_bytes() == [ord("a"), 0xF0]
    m.accept_bytes(b"\xf0\x9f")
    assert m.allowed_bytes() == [0x98, 0x99]
    m.accept_bytes(b"\x98\x80")
    assert m.is_complete()
    # '.' allows every valid UTF-8 lead byte but no stray continuation/overlong/invalid bytes
    allowed = parse_gbnf("root ::= .").matcher().allowed_bytes()
    assert allowed == list(range(0x00, 0x80)) + list(range(0xC2, 0xF5))
    m = parse_gbnf("root ::= .").matcher()
    m.accept_byte(0xE0)
    assert m.allowed_bytes() == list(range(0xA0, 0xC0))   # no overlong forms
    m = parse_gbnf("root ::= .").matcher()
    m.accept_byte(0xED)
    assert m.allowed_bytes() == list(range(0x80, 0xA0))   # no surrogates


def test_accept_byte_rejection_leaves_state() -> None:
    g = parse_gbnf('root ::= "ab"')
    m = g.matcher()
    m.accept_byte(ord("a"))
    with pytest.raises(GrammarError, match="0x78"):
        m.accept_byte(ord("x"))
    m.accept_byte(ord("b"))
    assert m.is_complete()


def test_copy_is_independent() -> None:
    g = parse_gbnf('root ::= "a" ("b" | "c")')
    m = g.matcher()
    m.accept_byte(ord("a"))
    c = m.copy()
    c.accept_byte(ord("b"))
    assert c.is_complete() and not m.is_complete()
    m.accept_byte(ord("c"))
    assert m.is_complete()


def test_is_complete_and_is_dead() -> None:
    m = parse_gbnf('root ::= "a"+').matcher()
    assert not m.is_complete() and not m.is_dead()
    m.accept_byte(ord("a"))
    assert m.is_complete() and not m.is_dead() and m.allowed_bytes() == [ord("a")]
    m = parse_gbnf('root ::= "a" | ""').matcher()
    assert m.is_complete()
    m.accept_byte(ord("a"))
    assert m.is_complete() and m.allowed_bytes() == []
    # a state can only become dead through a grammar that cannot finish
    m = parse_gbnf('root ::= "a" x\nx ::= "b" x').matcher()   # x never terminates
    assert not m.is_dead()
    m.accept_bytes(b"abbb")
    assert not m.is_complete() and not m.is_dead()


# ---------------------------------------------------------------------------
# grammar errors
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("grammar,message", [
    ("", "empty grammar"),
    ("  # nothing here\n\n", "empty grammar"),
    ('root ::= item\nitem ::= thing', "undefined rule 'thing' at 2:10"),
    ('main ::= "x"', "no root rule 'root'"),
    ('root ::= "abc\n', "unterminated string literal at 1:10"),
    ("root ::= [abc", "unterminated character class at 1:10"),
    ('root ::= expr\nexpr ::= expr "+" term | term\nterm ::= [0-9]', "left recursion.*'expr'.* at 2:1"),
    ('root ::= a\na ::= b? a "x" | "y"\nb ::= "b"', "left recursion.*'a'"),
    ('root ::= ("x"?)*', "left recursion"),
    ('root ::= "a"\n  | "b"', "expecting a rule name, found '\\|'.* at 2:3"),
    ('root = "a"', "expecting '::='"),
    ('root ::= ("a"', "expecting '\\)'"),
    ('root ::= "a")', "unmatched '\\)' at 1:13"),
    ('root ::= "\\q"', "unknown escape '\\\\q' at 1:11"),
    ('root ::= "\\x4"', "expecting 2 hex digits"),
    ("root ::= [z-a]", "invalid range"),
    ("root ::= []", "empty character class"),
    ("root ::= * \"a\"", "without a preceding item"),
    ('root ::= "a"{3,1}', "below minimum"),
    ('root ::= "a"{x}', "expecting an integer"),
    ('root ::= "a"{1,2', "expecting '}'"),
    ('root ::= "a"{2001}', "exceeds 2000"),
    ('root ::= <think> "x"', "token matchers"),
    ('root ::= "a" @', "unexpected '@'"),
])
def test_grammar_errors(grammar: str, message: str) -> None:
    with pytest.raises(GrammarError, match=message):
        parse_gbnf(grammar)


def test_grammar_error_is_value_error() -> None:
    with pytest.raises(ValueError):
        parse_gbnf("root ::= nope")
    try:
        parse_gbnf('root ::= "a"\nb ::= c')
    except GrammarError as e:
        assert (e.line, e.col) == (2, 7)


def test_stack_explosion_is_bounded() -> None:
    # every "a" doubles the distinct parse stacks (pending "b" or "c" closers)
    g = parse_gbnf('root ::= "a" root "b" | "a" root "c" | ""')
    m = g.matcher()
    m.accept_bytes(b"a" * 10)
    assert m.accepts_byte(ord("a"))
    with pytest.raises(GrammarError, match="parse stacks"):
        m.accept_bytes(b"a" * 10)
    # within the cap, ambiguous grammars work (stacks are deduplicated)
    g = parse_gbnf('root ::= ("a"? "a"? "a"? "a"? "a"? "a"? "a"?){0,50} "."')
    assert full_match(g, "a" * 300 + ".") and not full_match(g, "a" * 351 + ".")


# ---------------------------------------------------------------------------
# JSON schema -> GBNF
# ---------------------------------------------------------------------------

def _valid(value: Any, schema: dict[str, Any], root: dict[str, Any] | None = None) -> bool:
    """A tiny JSON Schema validator for the subset used below."""
    root = root or schema
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].split("#/")[1].split("/"):
            target = target[part]
        return _valid(value, target, root)
    if "anyOf" in schema or "oneOf" in schema:
        return any(_valid(value, s, root) for s in schema.get("anyOf") or schema["oneOf"])
    if "const" in schema:
        return value == schema["const"] and type(value) is type(schema["const"])
    if "enum" in schema:
        return any(value == e and type(value) is type(e) for e in schema["enum"])
    t = schema.get("type")
    if t == "object":
        props = schema.get("properties", {})
        if not isinstance(value, dict) or not set(schema.get("required", [])) <= set(value):
            return False
        if schema.get("additionalProperties") is False and not set(value) <= set(props):
            return False
        return all(_valid(v, props[k], root) for k, v in value.items() if k in props)
    if t == "array":
        return (isinstance(value, list)
                and schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 10**9)
                and all(_valid(v, schema.get("items", {}), root) for v in value))
    if t == "string":
        return (isinstance(value, str)
                and schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 10**9))
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t == "boolean":
        return isinstance(value, bool)
    if t == "null":
        return value is None
    return True


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer"},
        "height": {"type": "number"},
        "admin": {"type": "boolean"},
        "nick": {"type": "null"},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
TAGS = {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3}
COLOR = {"enum": ["red", "green", 7, None]}
NESTED = {
    "type": "object",
    "properties": {
        "id": {"const": "x-1"},
        "points": {"type": "array", "items": {"$ref": "#/$defs/point"}, "maxItems": 4},
        "label": {"anyOf": [{"type": "string", "maxLength": 6}, {"type": "integer"}]},
    },
    "required": ["id", "points"],
    "additionalProperties": False,
    "$defs": {"point": {"type": "object",
                        "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                        "required": ["x", "y"], "additionalProperties": False}},
}
NUMBER = {"type": "number"}

SCHEMA_CASES: list[tuple[dict[str, Any], list[Any], list[str]]] = [
    (PERSON,
     [{"name": "Ann", "age": 30}, {"name": "Zoë", "age": -1, "height": 1.75, "admin": True, "nick": None},
      {"name": "\u4e2d\"\\", "age": 0, "nick": None}],
     ['{"name":"Ann"}', '{"age":3,"name":"A"}', '{"name":"","age":3}', '{"name":"Ann","age":1.5}',
      '{"name":"Ann","age":3,"extra":1}', '{"name":"Ann","age":01}', '{"name":"Ann","age":3',
      '{"name":"Ann","age":3,"admin":"yes"}', '{"name":"123456789","age":1}']),
    (TAGS,
     [["a"], ["ab", "cd", "é"], [""]],
     ["[]", '["a","b","c","d"]', '["abcde"]', "[1]", '["a",]', '"a"']),
    (COLOR,
     ["red", 7, None],
     ['"blue"', "8", "null null", '"Red"', "[]"]),
    (NESTED,
     [{"id": "x-1", "points": []}, {"id": "x-1", "points": [{"x": 1, "y": -2.5e3}], "label": "hi"},
      {"id": "x-1", "points": [{"x": 0, "y": 0}] * 4, "label": 12}],
     ['{"id":"x-2","points":[]}', '{"id":"x-1"}', '{"id":"x-1","points":[{"x":1}]}',
      '{"id":"x-1","points":[],"label":true}', '{"id":"x-1","points":[],"label":"toolong"}']),
    (NUMBER,
     [0, -1, 3.25, 2.5e+30, 12345678901234, -0.5],
     ["01", "1.", ".5", "-", "1e", "+1", "NaN", '"1"']),
]


@pytest.mark.parametrize("schema,good,bad", SCHEMA_CASES,
                         ids=["object", "array", "enum", "nested", "number"])
def test_json_schema_grammars(schema: dict[str, Any], good: list[Any], bad: list[str]) -> None:
    grammar = json_schema_to_gbnf(schema)
    assert "root ::=" in grammar
    g = parse_gbnf(grammar)
    for value in good:
        assert _valid(value, schema)
        for text in (json.dumps(value, separators=(",", ":")), json.dumps(value),
                     json.dumps(value, ensure_ascii=False)):
            assert full_match(g, text), f"should accept {text!r}\n{grammar}"
    for text in bad:
        assert not full_match(g, text), f"should reject {text!r}\n{grammar}"
    if isinstance(good[0], (dict, list)):  # at most one space between tokens
        assert not full_match(g, json.dumps(good[0], indent=4))


def test_json_schema_input_forms() -> None:
    text = json.dumps(PERSON)
    assert json_schema_to_gbnf(text) == json_schema_to_gbnf(PERSON)
    assert full_match(json_schema_to_gbnf(True), '{"any": [1, {"x": null}]}')
    schema = {"$ref": "#/definitions/a", "definitions": {"a": {"type": "boolean"}}}
    before = json.dumps(schema)
    assert full_match(json_schema_to_gbnf(schema), "true")
    assert json.dumps(schema) == before  # the caller's dict is not modified


@pytest.mark.parametrize("schema", [
    False, "{not json", 42, ["type"], {"type": "frobnicate"},
    {"$ref": "#/$defs/missing"}, {"$ref": "https://example.com/schema.json"},
    {"type": "string", "pattern": "no-anchors"}, {"type": "object", "properties": {"a": {"type": set()}}},
])
def test_json_schema_invalid(schema: Any) -> None:
    with pytest.raises(BadRequest):
        json_schema_to_gbnf(schema)


@pytest.mark.parametrize("schema,what", [
    ({"type": "string", "maxLength": 2147483647}, "maxLength"),
    ({"type": "string", "minLength": 10**30}, "minLength"),
    ({"type": "array", "items": {"type": "string", "maxLength": 5000}}, "maxLength"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "^x{3,99999}$"}}},
     "pattern"),
])
def test_json_schema_huge_bounds_are_refused_at_once(schema: dict[str, Any], what: str) -> None:
    """The converter writes bounded repetitions out element by element; a bound in the
    billions used to hold the worker (and its GIL) for minutes."""
    import time
    t0 = time.monotonic()
    with pytest.raises(BadRequest, match=what):
        json_schema_to_gbnf(schema)
    assert time.monotonic() - t0 < 1.0
    # bounds up to the limit still work
    assert json_schema_to_gbnf({"type": "string", "maxLength": 64, "pattern": "^a{1,64}$"})


def test_json_schema_does_not_import_llama_cpp() -> None:
    import subprocess
    code = ("import sys; from backends.json_schema import json_schema_to_gbnf; "
            "json_schema_to_gbnf({'type': 'integer'}); print('llama_cpp' in sys.modules)")
    root = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=root, timeout=60, env={**os.environ, "PYTHONPATH": root})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------
# random generation under the grammar
# ---------------------------------------------------------------------------

_CLOSERS = frozenset(b'"]}')


def random_walk(m: Matcher, rng: random.Random, max_len: int = 3000) -> bytes:
    """Sample bytes from allowed_bytes() until the input is complete, drifting
    towards closing characters (and away from openers) as the text grows."""
    out = bytearray()
    while not m.is_complete() or (rng.random() < 0.3 and m.allowed_bytes()):
        allowed = m.allowed_bytes()
        assert allowed, f"dead end after {bytes(out)!r}"
        assert len(out) < max_len, f"walk did not terminate: {bytes(out)[:200]!r}"
        pressure = min(1.0, len(out) / 60)
        closers = [b for b in allowed if b in _CLOSERS]
        calm = [b for b in allowed if b not in b"[{,"]
        if closers and rng.random() < pressure:
            b = rng.choice(closers)
        elif calm and rng.random() < pressure:
            b = rng.choice(calm)
        else:
            b = rng.choice(allowed)
        m.accept_byte(b)
        out.append(b)
    return bytes(out)


@pytest.mark.parametrize("schema", [PERSON, TAGS, COLOR, NESTED, NUMBER, True],
                         ids=["object", "array", "enum", "nested", "number", "any-object"])
def test_random_walks_produce_valid_json(schema: Any) -> None:
    g = parse_gbnf(json_schema_to_gbnf(schema))
    rng = random.Random(1234)
    for _ in range(15):
        m = g.matcher()
        data = random_walk(m, rng)
        assert m.is_complete()
        value = json.loads(data.decode("utf-8"))
        if schema is True:
            assert isinstance(value, dict)
        else:
            assert _valid(value, schema), data
