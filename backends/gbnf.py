"""A pure-Python parser and byte-level matcher for llama.cpp's GBNF grammars.

GBNF (see llama.cpp ``grammars/README.md``) describes a language over Unicode
code points. :func:`parse_gbnf` compiles the grammar text into a
:class:`Grammar`; :meth:`Grammar.matcher` returns a :class:`Matcher` that is
fed the generated text one *byte* at a time (the fake backend's vocabulary is
bytes), so the matcher also tracks a pending partial UTF-8 sequence: a prefix
of a multi-byte sequence is accepted when some code point the grammar allows
at that point starts with those bytes.

Syntax accepted (mirrors llama.cpp's parser):

* rules ``name ::= alternatives``; names are ``[a-zA-Z0-9-]+``;
* string literals ``"..."``, character classes ``[a-z0-9_]`` / ``[^...]``, ``.``
  (any code point), escapes ``\\n \\t \\r \\\\ \\" \\[ \\] \\- \\xXX \\uXXXX
  \\UXXXXXXXX``;
* grouping ``( )``, alternation ``|``, postfix ``* + ?`` and ``{m}``, ``{m,}``,
  ``{m,n}``, ``{,n}`` (the last is an extension: llama.cpp needs ``{0,n}``);
* ``#`` comments. A newline ends a rule, except inside parentheses and right
  after ``::=`` or ``|`` (a line may not *start* with ``|``, as in llama.cpp).

Not supported: llama.cpp's token matchers ``<...>``, ``<[id]>`` and ``!<...>``
(they need a real vocabulary); they raise :class:`GrammarError`.

Matching follows llama.cpp's design: a set of parse stacks, each a tuple of
positions in the flattened rules (top last), whose top is always a terminal
(or the empty tuple: the root is complete). Expansions of rule references are
memoised per position, and stack transitions per stack, on the grammar.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable

from llamafleet.runtime.errors import BadRequest

__all__ = ["GrammarError", "Grammar", "Matcher", "parse_gbnf", "parse_or_refuse"]

MAX_CODE_POINT = 0x10FFFF
#: Largest number of parse stacks (or expansions of one position) allowed.
MAX_STACKS = 10_000
#: llama.cpp's MAX_REPETITION_THRESHOLD: a larger minimum is an error, a
#: larger maximum is treated as unbounded (exactly what llama.cpp does).
MAX_REPETITION = 2000
#: Largest number of grammar elements after expanding repetitions.
MAX_ELEMENTS = 1_000_000
_CACHE_LIMIT = 20_000

_CHAR, _REF, _END = 0, 1, 2

Ranges = tuple[tuple[int, int], ...]
Stack = tuple[int, ...]


class GrammarError(ValueError):
    """A grammar that cannot be parsed, or input the grammar rejects."""

    def __init__(self, message: str, line: int | None = None, col: int | None = None) -> None:
        where = f" at {line}:{col}" if line is not None else ""
        super().__init__(message + where)
        self.line = line
        self.col = col


# ---------------------------------------------------------------------------
# character ranges
# ---------------------------------------------------------------------------

def _normalize(ranges: Iterable[tuple[int, int]]) -> Ranges:
    """Sort and merge (lo, hi) ranges into disjoint, non-adjacent ones."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def _complement(ranges: Ranges) -> Ranges:
    """The code points in 0..MAX_CODE_POINT not covered by normalized ``ranges``."""
    out: list[tuple[int, int]] = []
    nxt = 0
    for lo, hi in ranges:
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= MAX_CODE_POINT:
        out.append((nxt, MAX_CODE_POINT))
    return tuple(out)


class _CharSet:
    """Disjoint sorted code point ranges with fast membership/overlap tests."""

    __slots__ = ("ranges", "los", "his")

    def __init__(self, ranges: Ranges) -> None:
        self.ranges = ranges
        self.los = [lo for lo, _ in ranges]
        self.his = [hi for _, hi in ranges]

    def contains(self, cp: int) -> bool:
        """Whether code point ``cp`` is in the set."""
        i = bisect_right(self.los, cp) - 1
        return i >= 0 and cp <= self.his[i]

    def overlaps(self, lo: int, hi: int) -> bool:
        """Whether any code point in ``lo..hi`` is in the set."""
        i = bisect_right(self.los, hi) - 1
        return i >= 0 and self.his[i] >= lo


# ---------------------------------------------------------------------------
# UTF-8 helpers
# ---------------------------------------------------------------------------

_UTF8_MIN = {2: 0x80, 3: 0x800, 4: 0x10000}
_UTF8_MAX = {2: 0x7FF, 3: 0xFFFF, 4: MAX_CODE_POINT}
_LEAD_MASK = {2: 0x1F, 3: 0x0F, 4: 0x07}


def _utf8_len(lead: int) -> int:
    """Sequence length announced by a lead byte; 0 for a byte that cannot lead."""
    if lead < 0x80:
        return 1
    if lead & 0xE0 == 0xC0:
        return 2
    if lead & 0xF0 == 0xE0:
        return 3
    if lead & 0xF8 == 0xF0:
        return 4
    return 0


def _utf8_prefix_ranges(prefix: bytes) -> list[tuple[int, int]]:
    """Valid code points whose UTF-8 encoding starts with ``prefix`` (a lead
    byte plus continuation bytes), as at most two ranges; [] if none."""
    n = _utf8_len(prefix[0])
    if n < 2 or len(prefix) > n:
        return []
    lo = hi = prefix[0] & _LEAD_MASK[n]
    for b in prefix[1:]:
        if b & 0xC0 != 0x80:
            return []
        lo = (lo << 6) | (b & 0x3F)
        hi = (hi << 6) | (b & 0x3F)
    for _ in range(n - len(prefix)):
        lo <<= 6
        hi = (hi << 6) | 0x3F
    lo, hi = max(lo, _UTF8_MIN[n]), min(hi, _UTF8_MAX[n])
    if lo > hi:
        return []
    out = []
    if lo < 0xD800:
        out.append((lo, min(hi, 0xD7FF)))
    if hi > 0xDFFF:
        out.append((max(lo, 0xE000), hi))
    return out


# ---------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------

def _is_word_char(c: str) -> bool:
    """Whether ``c`` may appear in a rule name."""
    return ("a" <= c <= "z") or ("A" <= c <= "Z") or ("0" <= c <= "9") or c == "-"


_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"',
                   "[": "[", "]": "]", "-": "-"}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}

Element = tuple[int, int]


class _Parser:
    """Recursive-descent GBNF parser producing rules of element sequences."""

    def __init__(self, text: str) -> None:
        self.src = text
        self.pos = 0
        self.symbol_ids: dict[str, int] = {}
        self.names: list[str] = []        # display name per rule id
        self.origins: list[str] = []      # user rule a generated rule belongs to
        self.rules: dict[int, list[list[Element]]] = {}
        self.first_ref: dict[int, int] = {}  # rule id -> source offset of first reference
        self.def_pos: dict[int, int] = {}    # rule id -> source offset of its definition
        self.terminals: list[_CharSet] = []
        self._terminal_ids: dict[Ranges, int] = {}
        self.n_elements = 0

    # -- helpers --------------------------------------------------------
    def where(self, pos: int) -> tuple[int, int]:
        """1-based (line, column) of source offset ``pos``."""
        line = self.src.count("\n", 0, pos) + 1
        col = pos - (self.src.rfind("\n", 0, pos) + 1) + 1
        return line, col

    def error(self, message: str, pos: int | None = None) -> GrammarError:
        """A GrammarError located at ``pos`` (default: the current position)."""
        return GrammarError(message, *self.where(self.pos if pos is None else pos))

    def peek(self, offset: int = 0) -> str:
        """The character ``offset`` ahead, or "" at end of input."""
        i = self.pos + offset
        return self.src[i] if i < len(self.src) else ""

    def describe(self) -> str:
        """The current character for messages."""
        c = self.peek()
        return "end of input" if not c else repr(c)

    def skip_space(self, newline_ok: bool) -> None:
        """Skip blanks and comments, and newlines too when ``newline_ok``."""
        src, n, i = self.src, len(self.src), self.pos
        while i < n:
            c = src[i]
            if c == " " or c == "\t" or (newline_ok and c in "\r\n"):
                i += 1
            elif c == "#":
                while i < n and src[i] not in "\r\n":
                    i += 1
            else:
                break
        self.pos = i

    def symbol_id(self, name: str) -> int:
        """The id of user rule ``name``, allocated on first sight."""
        rid = self.symbol_ids.get(name)
        if rid is None:
            rid = self.symbol_ids[name] = len(self.names)
            self.names.append(name)
            self.origins.append(name)
        return rid

    def generate_id(self, base: str) -> int:
        """A fresh id for a helper rule (group or repetition) of rule ``base``."""
        rid = len(self.names)
        self.names.append(f"{base}_{rid}")  # '_' cannot appear in a user name
        self.origins.append(base)
        return rid

    def add_rule(self, rid: int, alternatives: list[list[Element]]) -> None:
        """Define rule ``rid`` (a later definition replaces an earlier one, as in llama.cpp)."""
        self.n_elements += sum(len(a) + 1 for a in alternatives)
        if self.n_elements > MAX_ELEMENTS:
            raise self.error("grammar too large after expanding repetitions")
        self.rules[rid] = alternatives

    def terminal(self, ranges: Ranges) -> Element:
        """A terminal element for the code point ranges (deduplicated)."""
        tid = self._terminal_ids.get(ranges)
        if tid is None:
            tid = self._terminal_ids[ranges] = len(self.terminals)
            self.terminals.append(_CharSet(ranges))
        return (_CHAR, tid)

    def parse_name(self) -> str:
        """A rule name ``[a-zA-Z0-9-]+``."""
        start = self.pos
        while _is_word_char(self.peek()):
            self.pos += 1
        if self.pos == start:
            hint = ""
            if self.peek() == "|":
                hint = " (a line cannot start with '|': end the previous line with it, or use parentheses)"
            raise self.error(f"expecting a rule name, found {self.describe()}{hint}")
        return self.src[start:self.pos]

    def parse_int(self) -> int:
        """A decimal integer."""
        start = self.pos
        while "0" <= self.peek() <= "9" and self.peek():
            self.pos += 1
        if self.pos == start:
            raise self.error(f"expecting an integer, found {self.describe()}")
        return int(self.src[start:self.pos])

    def parse_char(self) -> int:
        """One (possibly escaped) character of a literal or class."""
        start = self.pos
        c = self.peek()
        if not c:
            raise self.error("unexpected end of input")
        if c != "\\":
            self.pos += 1
            return ord(c)
        e = self.peek(1)
        if e in _SIMPLE_ESCAPES:
            self.pos += 2
            return ord(_SIMPLE_ESCAPES[e])
        if e in _HEX_ESCAPES:
            size = _HEX_ESCAPES[e]
            digits = self.src[start + 2:start + 2 + size]
            if len(digits) != size or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.error(f"expecting {size} hex digits after \\{e}", start)
            value = int(digits, 16)
            if value > MAX_CODE_POINT:
                raise self.error(f"code point \\{e}{digits} out of range", start)
            self.pos += 2 + size
            return value
        if not e:
            raise self.error("unexpected end of input after '\\'", start)
        raise self.error(f"unknown escape '\\{e}'", start)

    # -- grammar structure ----------------------------------------------
    def parse(self) -> None:
        """Parse the whole grammar text."""
        self.skip_space(True)
        if self.pos >= len(self.src):
            raise self.error("empty grammar: no rules defined")
        while self.pos < len(self.src):
            self.parse_rule()

    def parse_rule(self) -> None:
        """``name ::= alternates`` followed by a newline or the end of input."""
        start = self.pos
        name = self.parse_name()
        rid = self.symbol_id(name)
        self.def_pos[rid] = start
        self.skip_space(False)
        if not self.src.startswith("::=", self.pos):
            raise self.error(f"expecting '::=' after rule name '{name}', found {self.describe()}")
        self.pos += 3
        self.skip_space(True)
        self.parse_alternates(name, rid, nested=False)
        c = self.peek()
        if c == "\r":
            self.pos += 2 if self.peek(1) == "\n" else 1
        elif c == "\n":
            self.pos += 1
        elif c:
            if c == ")":
                raise self.error("unmatched ')'")
            raise self.error(f"unexpected {c!r} in rule '{name}'; expecting a newline or end of input")
        self.skip_space(True)

    def parse_alternates(self, rule_name: str, rid: int, nested: bool) -> None:
        """Sequences separated by ``|``, stored as rule ``rid``."""
        alternatives = [self.parse_sequence(rule_name, nested)]
        while self.peek() == "|":
            self.pos += 1
            self.skip_space(True)
            alternatives.append(self.parse_sequence(rule_name, nested))
        self.add_rule(rid, alternatives)

    def parse_sequence(self, rule_name: str, nested: bool) -> list[Element]:
        """Items up to ``|``, ``)`` or (outside parentheses) a newline."""
        seq: list[Element] = []
        last_start = 0
        while True:
            c = self.peek()
            start = self.pos
            if c == '"':
                self.pos += 1
                last_start = len(seq)
                while self.peek() != '"':
                    if not self.peek():
                        raise self.error("unterminated string literal", start)
                    cp = self.parse_char()
                    seq.append(self.terminal(((cp, cp),)))
                self.pos += 1
                self.skip_space(nested)
            elif c == "[":
                self.pos += 1
                negated = self.peek() == "^"
                if negated:
                    self.pos += 1
                ranges: list[tuple[int, int]] = []
                while self.peek() != "]":
                    if not self.peek():
                        raise self.error("unterminated character class", start)
                    lo = self.parse_char()
                    hi = lo
                    if self.peek() == "-" and self.peek(1) != "]":
                        if not self.peek(1):
                            raise self.error("unterminated character class", start)
                        self.pos += 1
                        range_at = self.pos
                        hi = self.parse_char()
                        if hi < lo:
                            raise self.error(f"invalid range {chr(lo)!r}-{chr(hi)!r}: end before start",
                                             range_at)
                    ranges.append((lo, hi))
                self.pos += 1
                if not ranges:
                    raise self.error("empty character class", start)
                norm = _normalize(ranges)
                if negated:
                    norm = _complement(norm)
                last_start = len(seq)
                seq.append(self.terminal(norm))
                self.skip_space(nested)
            elif c == "<" or c == "!":
                raise self.error("token matchers (<...>, !<...>) are not supported")
            elif c and _is_word_char(c):
                name = self.parse_name()
                rid = self.symbol_id(name)
                self.first_ref.setdefault(rid, start)
                last_start = len(seq)
                seq.append((_REF, rid))
                self.skip_space(nested)
            elif c == "(":
                self.pos += 1
                self.skip_space(True)
                sub = self.generate_id(rule_name)
                self.parse_alternates(rule_name, sub, nested=True)
                if self.peek() != ")":
                    raise self.error(f"expecting ')' to close the group opened at "
                                     f"{':'.join(map(str, self.where(start)))}, found {self.describe()}")
                self.pos += 1
                last_start = len(seq)
                seq.append((_REF, sub))
                self.skip_space(nested)
            elif c == ".":
                self.pos += 1
                last_start = len(seq)
                seq.append(self.terminal(((0, MAX_CODE_POINT),)))
                self.skip_space(nested)
            elif c in ("*", "+", "?"):
                self.pos += 1
                self.skip_space(nested)
                lo_n, hi_n = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
                self.repeat(seq, last_start, lo_n, hi_n, rule_name, start)
            elif c == "{":
                self.pos += 1
                self.skip_space(nested)
                if self.peek() == ",":  # {,n}: extension, llama.cpp wants {0,n}
                    min_times = 0
                else:
                    min_times = self.parse_int()
                    self.skip_space(nested)
                max_times: int | None
                if self.peek() == "}":
                    max_times = min_times
                elif self.peek() == ",":
                    self.pos += 1
                    self.skip_space(nested)
                    max_times = None
                    if self.peek() and "0" <= self.peek() <= "9":
                        max_times = self.parse_int()
                        self.skip_space(nested)
                    if self.peek() != "}":
                        raise self.error(f"expecting '}}' to close the repetition, found {self.describe()}")
                else:
                    raise self.error(f"expecting ',' or '}}' in repetition, found {self.describe()}")
                self.pos += 1
                self.skip_space(nested)
                if min_times > MAX_REPETITION:
                    raise self.error(f"repetition minimum {min_times} exceeds {MAX_REPETITION}", start)
                if max_times is not None and max_times < min_times:
                    raise self.error(f"repetition maximum {max_times} is below minimum {min_times}", start)
                if max_times is not None and max_times > MAX_REPETITION:
                    max_times = None  # as llama.cpp does
                self.repeat(seq, last_start, min_times, max_times, rule_name, start)
            else:
                return seq

    def repeat(self, seq: list[Element], last_start: int, min_times: int,
               max_times: int | None, rule_name: str, at: int) -> None:
        """Rewrite the last item of ``seq`` as S{min,max} (llama.cpp's scheme):
        S repeated min times, then a chain of optional helper rules."""
        if last_start >= len(seq):
            raise self.error("repetition operator without a preceding item", at)
        prev = seq[last_start:]
        if self.n_elements + len(seq) + len(prev) * max(min_times, max_times or 0) > MAX_ELEMENTS:
            raise self.error("grammar too large after expanding repetitions", at)
        if min_times == 0:
            del seq[last_start:]
        else:
            seq.extend(prev * (min_times - 1))
        if max_times is None:
            rec = self.generate_id(rule_name)
            self.add_rule(rec, [prev + [(_REF, rec)], []])
            seq.append((_REF, rec))
        else:
            last = -1
            for _ in range(max_times - min_times):
                rec = self.generate_id(rule_name)
                self.add_rule(rec, [prev + ([(_REF, last)] if last >= 0 else []), []])
                last = rec
            if last >= 0:
                seq.append((_REF, last))

    # -- validation -----------------------------------------------------
    def check(self, root: str) -> int:
        """Undefined references, missing root and left recursion; returns root id."""
        for rid in sorted(self.first_ref, key=self.first_ref.__getitem__):
            if rid not in self.rules:
                raise self.error(f"undefined rule '{self.names[rid]}'", self.first_ref[rid])
        root_id = self.symbol_ids.get(root)
        if root_id is None or root_id not in self.rules:
            raise GrammarError(f"grammar has no root rule '{root}'")

        n = len(self.names)
        nullable = [False] * n
        changed = True
        while changed:
            changed = False
            for rid, alts in self.rules.items():
                if not nullable[rid] and any(
                        all(k == _REF and nullable[v] for k, v in alt) for alt in alts):
                    nullable[rid] = changed = True
        self.nullable = nullable

        # edges r -> s when s can be the leftmost symbol of r
        left: list[list[int]] = [[] for _ in range(n)]
        for rid, alts in self.rules.items():
            for alt in alts:
                for k, v in alt:
                    if k != _REF:
                        break
                    left[rid].append(v)
                    if not nullable[v]:
                        break
        state = [0] * n  # 0 new, 1 on path, 2 done
        for start in self.rules:
            if state[start]:
                continue
            state[start] = 1
            path = [(start, iter(left[start]))]
            while path:
                rid, it = path[-1]
                nxt = next(it, None)
                if nxt is None:
                    state[rid] = 2
                    path.pop()
                elif state[nxt] == 1:
                    name = self.origins[nxt]
                    raise self.error(f"left recursion detected in rule '{name}' "
                                     f"(llama.cpp rejects left-recursive grammars)",
                                     self.def_pos.get(self.symbol_ids[name], 0))
                elif state[nxt] == 0:
                    state[nxt] = 1
                    path.append((nxt, iter(left[nxt])))
        return root_id

# ---------------------------------------------------------------------------
# compiled grammar
# ---------------------------------------------------------------------------

class Grammar:
    """A compiled GBNF grammar; make matchers with :meth:`matcher`.

    Holds flattened rules plus caches shared by all its matchers (rule
    expansions, stack transitions, allowed-byte sets).
    """

    def __init__(self, parser: _Parser, root_id: int, root: str) -> None:
        self.root = root
        self.rule_names = sorted(parser.symbol_ids)
        self._terminals = parser.terminals
        kinds: list[int] = []
        values: list[int] = []
        starts: dict[int, list[int]] = {}
        for rid, alts in parser.rules.items():
            starts[rid] = []
            for alt in alts:
                starts[rid].append(len(kinds))
                for k, v in alt:
                    kinds.append(k)
                    values.append(v)
                kinds.append(_END)
                values.append(0)
        self._start_pos = len(kinds)
        kinds += [_REF, _END]
        values += [root_id, 0]
        self._kinds = kinds
        self._values = values
        self._starts = starts
        self._nullable = parser.nullable
        self._closure: dict[int, frozenset[Stack]] = {}
        self._advance: dict[Stack, frozenset[Stack]] = {}
        self._allowed: dict[tuple[frozenset[int], bytes], frozenset[int]] = {}
        self._unions: dict[frozenset[int], _CharSet] = {}
        self._initial = self._expand([(self._start_pos,)])

    def __repr__(self) -> str:
        return f"<Grammar root={self.root!r} rules={len(self.rule_names)}>"

    def matcher(self) -> Matcher:
        """A fresh matcher positioned at the start of the root rule."""
        return Matcher(self, self._initial, b"")

    # -- expansion --------------------------------------------------------
    def _closure_of(self, pos: int) -> frozenset[Stack]:
        """Stack suffixes (top last, tops terminal) reachable by expanding the
        element at ``pos``; ``()`` means it can derive the empty string."""
        memo = self._closure
        got = memo.get(pos)
        if got is not None:
            return got
        kinds, values = self._kinds, self._values
        work = [pos]      # depth-first path: each entry waits on the one above it
        on_path = {pos}
        while work:
            p = work[-1]
            if kinds[p] == _CHAR:
                memo[p] = frozenset([(p,)])
                on_path.discard(work.pop())
                continue
            rid = values[p]
            rest = p + 1 if kinds[p + 1] != _END else -1
            deps = [a for a in self._starts[rid] if kinds[a] != _END]
            if rest >= 0 and self._nullable[rid]:
                deps.append(rest)
            missing = next((d for d in deps if d not in memo), None)
            if missing is not None:
                if missing in on_path:  # cannot happen: the parser rejects left recursion
                    raise GrammarError("left recursion in grammar")
                on_path.add(missing)
                work.append(missing)
                continue
            out: set[Stack] = set()
            for a in self._starts[rid]:
                for s in (memo[a] if kinds[a] != _END else ((),)):
                    if s:
                        out.add((rest,) + s if rest >= 0 else s)
                    elif rest >= 0:
                        out.update(memo[rest])
                    else:
                        out.add(())
                if len(out) > MAX_STACKS:
                    raise GrammarError(f"grammar expansion exceeds {MAX_STACKS} parse stacks")
            memo[p] = frozenset(out)
            on_path.discard(work.pop())
        return memo[pos]

    def _expand(self, stacks: Iterable[Stack]) -> frozenset[Stack]:
        """Expand each stack's top (a position not yet expanded) until every
        resulting stack has a terminal on top or is empty."""
        out: set[Stack] = set()
        for stack in stacks:
            while True:
                if not stack:
                    out.add(())
                    break
                below = stack[:-1]
                passthrough = False
                for s in self._closure_of(stack[-1]):
                    if s:
                        out.add(below + s)
                    else:
                        passthrough = True
                if not passthrough:
                    break
                stack = below
            if len(out) > MAX_STACKS:
                raise GrammarError(f"grammar matching exceeds {MAX_STACKS} parse stacks")
        return frozenset(out)

    def _advance_stack(self, stack: Stack) -> frozenset[Stack]:
        """The stacks after the terminal on top of ``stack`` has matched."""
        got = self._advance.get(stack)
        if got is None:
            top = stack[-1]
            nxt = top + 1
            below = stack[:-1]
            got = self._expand([below + (nxt,) if self._kinds[nxt] != _END else below])
            if len(self._advance) > _CACHE_LIMIT:
                self._advance.clear()
            self._advance[stack] = got
        return got

    def _step(self, stacks: frozenset[Stack], cp: int) -> frozenset[Stack]:
        """Stacks after matching code point ``cp``."""
        out: set[Stack] = set()
        values, terminals = self._values, self._terminals
        for stack in stacks:
            if stack and terminals[values[stack[-1]]].contains(cp):
                out |= self._advance_stack(stack)
        if len(out) > MAX_STACKS:
            raise GrammarError(f"grammar matching exceeds {MAX_STACKS} parse stacks")
        return frozenset(out)

    def _allowed_for(self, stacks: frozenset[Stack], pending: bytes) -> frozenset[int]:
        """Bytes that may follow, given the stacks and a partial UTF-8 sequence."""
        terms = frozenset(self._values[s[-1]] for s in stacks if s)
        key = (terms, pending)
        got = self._allowed.get(key)
        if got is not None:
            return got
        union = self._unions.get(terms)
        if union is None:
            union = _CharSet(_normalize(r for t in terms for r in self._terminals[t].ranges))
            if len(self._unions) > _CACHE_LIMIT:
                self._unions.clear()
            self._unions[terms] = union
        allowed: list[int] = []
        if union.ranges:
            if not pending:
                allowed.extend(b for b in range(0x80) if union.contains(b))
                candidates: Iterable[int] = range(0xC0, 0x100)
            else:
                candidates = range(0x80, 0xC0)
            for b in candidates:
                prefix = pending + bytes((b,))
                if any(union.overlaps(lo, hi) for lo, hi in _utf8_prefix_ranges(prefix)):
                    allowed.append(b)
        got = frozenset(allowed)
        if len(self._allowed) > _CACHE_LIMIT:
            self._allowed.clear()
        self._allowed[key] = got
        return got


def parse_gbnf(text: str, root: str = "root") -> Grammar:
    """Parse GBNF ``text`` into a :class:`Grammar` whose start rule is ``root``.

    Raises :class:`GrammarError` (with line:col) for syntax errors, undefined
    rule references, a missing root rule, empty input and left recursion.
    """
    if not isinstance(text, str):
        raise GrammarError(f"grammar must be a string, not {type(text).__name__}")
    parser = _Parser(text)
    parser.parse()
    root_id = parser.check(root)
    return Grammar(parser, root_id, root)


def parse_or_refuse(text: str, what: str = "invalid grammar") -> Grammar:
    """:func:`parse_gbnf`, with every way a grammar can be refused as BadRequest
    (``"{what}: ..."``): the guard in front of llama.cpp's recursive parser and of
    our matcher, shared by every backend and the JSON-schema converter."""
    if "\0" in text:
        raise BadRequest(f"{what}: contains a NUL character")
    try:
        return parse_gbnf(text)
    except GrammarError as exc:
        raise BadRequest(f"{what}: {exc}") from None
    except RecursionError:
        raise BadRequest(f"{what}: nested too deeply") from None


# ---------------------------------------------------------------------------
# matcher
# ---------------------------------------------------------------------------

class Matcher:
    """Incremental, byte-level recogniser for one :class:`Grammar`.

    State is immutable data (a frozenset of stacks plus pending UTF-8 bytes),
    so :meth:`copy` is cheap.
    """

    __slots__ = ("_grammar", "_stacks", "_pending", "_allowed", "_n_bytes")

    def __init__(self, grammar: Grammar, stacks: frozenset[Stack], pending: bytes,
                 n_bytes: int = 0) -> None:
        self._grammar = grammar
        self._stacks = stacks
        self._pending = pending
        self._allowed: frozenset[int] | None = None
        self._n_bytes = n_bytes

    @property
    def grammar(self) -> Grammar:
        """The grammar this matcher runs."""
        return self._grammar

    def copy(self) -> Matcher:
        """An independent matcher in the same state."""
        m = Matcher(self._grammar, self._stacks, self._pending, self._n_bytes)
        m._allowed = self._allowed
        return m

    def _allowed_set(self) -> frozenset[int]:
        """The bytes that may come next (cached per state)."""
        if self._allowed is None:
            self._allowed = self._grammar._allowed_for(self._stacks, self._pending)
        return self._allowed

    def accepts_byte(self, b: int) -> bool:
        """Whether byte ``b`` keeps the input a valid prefix of the language."""
        return b in self._allowed_set()

    def accept_byte(self, b: int) -> None:
        """Consume byte ``b``; GrammarError (state unchanged) if it is rejected."""
        if b not in self._allowed_set():
            if not 0 <= b <= 255:
                raise GrammarError(f"not a byte: {b!r}")
            raise GrammarError(f"byte 0x{b:02x} rejected by the grammar after {self._n_bytes} bytes")
        if self._pending:
            seq = self._pending + bytes((b,))
        elif b < 0x80:
            seq = bytes((b,))
        else:
            seq = bytes((b,))
            self._pending = seq
            self._allowed = None
            self._n_bytes += 1
            return
        if len(seq) < _utf8_len(seq[0]):
            self._pending = seq
        else:
            stacks = self._grammar._step(self._stacks, ord(seq.decode("utf-8")))
            self._stacks = stacks
            self._pending = b""
        self._allowed = None
        self._n_bytes += 1

    def accept_bytes(self, data: bytes) -> None:
        """Consume ``data`` byte by byte. On rejection raises GrammarError and
        the state is the one after the accepted prefix."""
        for b in data:
            self.accept_byte(b)

    def allowed_bytes(self) -> list[int]:
        """Every byte value b in 0..255 for which :meth:`accepts_byte` is true."""
        return sorted(self._allowed_set())

    def is_complete(self) -> bool:
        """Whether the input so far is a complete sentence of the root rule."""
        return not self._pending and () in self._stacks

    def is_dead(self) -> bool:
        """Whether nothing can follow and the input is not complete."""
        return not self.is_complete() and not self._allowed_set()
