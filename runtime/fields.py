"""Declared values: one :class:`Field` type for protocol arguments, configuration
keys and backend options, and one checker for all of them.

A field states the accepted types, its default, and its bounds once; the
protocol validates request arguments with it, the configuration loader
validates ``[models.NAME]`` keys with it (worker options and the backend's),
and every backend declares its options as a mapping of name to Field.
(``[supervisor]`` keys are the fields of the SupervisorConfig dataclass.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from llamafleet.runtime.errors import ConfigError


@dataclass(frozen=True)
class Field:
    """One declared value: accepted types, default, bounds, extra check.

    ``nullable`` lets an explicit ``None`` (msgpack nil) stand for the default;
    ``check`` returns a problem description or None; ``min``/``max`` bound
    numbers; ``choices`` lists the accepted values (compared case-insensitively
    for strings); ``doc`` is the one-line description shown in errors and docs.
    """

    types: tuple[type, ...]
    required: bool = False
    default: Any = None
    check: Callable[[Any], str | None] | None = None
    nullable: bool = False
    doc: str = ""
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] = ()

    def problem(self, value: Any) -> str | None:
        """Why ``value`` (not None) is unacceptable, or None when it is fine."""
        if isinstance(value, bool) and bool not in self.types:
            return f"has type bool, expected {type_names(self.types)}"
        if not isinstance(value, self.types):
            return f"has type {type(value).__name__}, expected {type_names(self.types)}"
        if self.min is not None and value < self.min:  # type: ignore[operator]
            return f"must be >= {self.min}"
        if self.max is not None and value > self.max:  # type: ignore[operator]
            return f"must be <= {self.max}"
        if self.choices:
            v = value.lower() if isinstance(value, str) else value
            if v not in self.choices:
                return f"must be one of {', '.join(map(repr, self.choices))}"
        if self.check is not None:
            return self.check(value)
        return None

    def default_value(self) -> Any:
        """A fresh copy of the default (tuples become lists, as on the wire)."""
        d = self.default
        if isinstance(d, tuple):
            return list(d)
        if isinstance(d, (list, dict)):
            return type(d)(d)
        return d


def type_names(types: tuple[type, ...]) -> str:
    """``int/str`` for a tuple of types."""
    return "/".join(sorted({t.__name__ for t in types}))


def defaults(spec: Mapping[str, Field]) -> dict[str, Any]:
    """Every field's default."""
    return {name: f.default_value() for name, f in spec.items()}


def parse(spec: Mapping[str, Field], raw: Mapping[str, Any], where: str,
          error: Callable[[str], Exception] = ConfigError) -> dict[str, Any]:
    """Check ``raw`` against ``spec``; return every declared key, defaults filled in.

    Unknown keys, missing required keys and bad values raise ``error`` with a
    message that starts with ``where`` (``[models.smol]``, ``llama option``)."""
    unknown = sorted(str(k) for k in raw if k not in spec)
    if unknown:
        raise error(f"{where}: unknown key(s) {', '.join(map(repr, unknown))} "
                    f"(known: {', '.join(sorted(spec))})")
    out: dict[str, Any] = {}
    for name, f in spec.items():
        value = raw.get(name)
        if value is None:
            if f.required:
                doc = f" ({f.doc})" if f.doc else ""
                raise error(f"{where}: {name}{doc} is required")
            out[name] = f.default_value()
            continue
        problem = f.problem(value)
        if problem:
            raise error(f"{where}: {name} {problem}")
        out[name] = value.lower() if f.choices and isinstance(value, str) else value
    return out
