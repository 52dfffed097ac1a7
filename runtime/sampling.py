"""Sampling parameters shared by the protocol, the worker and every backend."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from llamafleet.runtime.errors import BadRequest

#: Largest grammar text accepted (bytes of GBNF or of the JSON schema).
MAX_GRAMMAR_BYTES = 64 * 1024


@dataclass
class SamplingParams:
    """How the next token of a sequence is chosen.

    ``temperature == 0`` is greedy (argmax after logit bias and grammar).
    ``grammar`` is GBNF text; ``json_schema`` a JSON schema (dict or JSON text)
    converted to GBNF. At most one of the two may be set. ``seed < 0`` picks a
    random seed. ``logit_bias`` maps token ids to additive biases.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int = -1
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None
    json_schema: Any = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> SamplingParams:
        """Build and validate from a plain dict; unknown keys are a BadRequest."""
        raw = dict(raw or {})
        names = {f.name for f in fields(cls)}
        unknown = [k for k in raw if not isinstance(k, str) or k not in names]
        if unknown:
            raise BadRequest("unknown sampling parameter(s): "
                             f"{', '.join(sorted(repr(k) for k in unknown))}")
        params = cls(**raw)
        params.validate()
        return params

    def to_dict(self) -> dict[str, Any]:
        """Plain dict form (msgpack-ready)."""
        return asdict(self)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def validate(self) -> None:
        """Raise BadRequest when a value has the wrong type or is out of range."""
        def num(name: str, lo: float | None = None, hi: float | None = None) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise BadRequest(f"{name} must be a number, got {type(v).__name__}")
            if v != v:  # NaN
                raise BadRequest(f"{name} must not be NaN")
            if lo is not None and v < lo:
                raise BadRequest(f"{name} must be >= {lo}, got {v}")
            if hi is not None and v > hi:
                raise BadRequest(f"{name} must be <= {hi}, got {v}")

        def integer(name: str, lo: int | None = None, hi: int | None = None) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise BadRequest(f"{name} must be an integer, got {type(v).__name__}")
            if lo is not None and v < lo:
                raise BadRequest(f"{name} must be >= {lo}, got {v}")
            if hi is not None and v > hi:
                raise BadRequest(f"{name} must be <= {hi}, got {v}")

        num("temperature", 0.0, 100.0)
        integer("top_k", 0, 1 << 31)
        num("top_p", 0.0, 1.0)
        num("min_p", 0.0, 1.0)
        num("typical_p", 0.0, 1.0)
        num("repeat_penalty", 0.0, 100.0)
        if self.repeat_penalty <= 0.0:
            raise BadRequest("repeat_penalty must be > 0 (1.0 disables it)")
        integer("repeat_last_n", -1, 1 << 20)
        num("frequency_penalty", -100.0, 100.0)
        num("presence_penalty", -100.0, 100.0)
        integer("seed", -(1 << 63), (1 << 32) - 1)
        if not isinstance(self.logit_bias, dict):
            raise BadRequest("logit_bias must be a map of token id to bias")
        bias: dict[int, float] = {}
        for k, v in self.logit_bias.items():
            try:
                tok = int(k)
            except (TypeError, ValueError, OverflowError):
                raise BadRequest(f"logit_bias key {k!r} is not a token id") from None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                raise BadRequest(f"logit_bias value for {k!r} must be a number")
            bias[tok] = float(v)
        self.logit_bias = bias
        if self.grammar is not None:
            if not isinstance(self.grammar, str):
                raise BadRequest("grammar must be GBNF text")
            if len(self.grammar.encode()) > MAX_GRAMMAR_BYTES:
                raise BadRequest(f"grammar larger than {MAX_GRAMMAR_BYTES} bytes")
        if self.json_schema is not None:
            if self.grammar:
                raise BadRequest("set either grammar or json_schema, not both")
            if isinstance(self.json_schema, (str, bytes)):
                try:
                    self.json_schema = json.loads(self.json_schema)
                except ValueError as exc:
                    raise BadRequest(f"json_schema is not valid JSON: {exc}") from None
            if not isinstance(self.json_schema, (dict, bool)):
                raise BadRequest("json_schema must be an object")
            try:
                size = len(json.dumps(self.json_schema))
            except (TypeError, ValueError, RecursionError):
                raise BadRequest("json_schema must be plain JSON data") from None
            if size > MAX_GRAMMAR_BYTES:
                raise BadRequest(f"json_schema larger than {MAX_GRAMMAR_BYTES} bytes")
