"""Result types returned by the clients."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Completion:
    """A finished generation."""

    text: str
    tokens: list[int]
    finish_reason: str
    stats: dict[str, Any] = field(default_factory=dict)
    stop: str | None = None
    seq: int | None = None
    model: str = ""

    @classmethod
    def from_wire(cls, model: str, r: dict[str, Any]) -> "Completion":
        return cls(text=r.get("text", ""), tokens=list(r.get("tokens", [])),
                   finish_reason=r.get("finish_reason") or "", stats=dict(r.get("stats") or {}),
                   stop=r.get("stop"), seq=r.get("seq"), model=model)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "text": self.text, "tokens": self.tokens,
                "finish_reason": self.finish_reason, "stop": self.stop, "stats": self.stats}


@dataclass
class Decoded:
    """One ``decode`` step: the sampled token (None when a grammar ended it)."""

    token: int | None
    piece: str
    eog: bool
    n_tokens: int
    reason: str | None = None
