"""A backend with only the required methods, to test ``not_supported`` replies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llamafleet.backends.base import Backend, ModelInfo, ProgressCallback
from llamafleet.backends.fake import FakeBackend
from llamafleet.runtime.sampling import SamplingParams


class MinimalBackend(Backend):
    """Delegates the required methods to a FakeBackend; lacks every optional one."""

    name = "minimal"

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__(options)
        self._fake = FakeBackend(options)

    def load(self, progress: ProgressCallback | None = None) -> None:
        self._fake.load(progress)

    def info(self) -> ModelInfo:
        info = self._fake.info()
        info.backend, info.features = "minimal", []
        return info

    def tokenize(self, text: str, add_special: bool = True,
                 parse_special: bool = False) -> list[int]:
        return self._fake.tokenize(text, add_special, parse_special)

    def token_to_piece(self, token: int, special: bool = True) -> bytes:
        return self._fake.token_to_piece(token, special)

    def is_eog(self, token: int) -> bool:
        return self._fake.is_eog(token)

    def check_tokens(self, tokens: Sequence[int]) -> None:
        self._fake.check_tokens(tokens)

    def seq_len(self, seq: int) -> int:
        return self._fake.seq_len(seq)

    def evaluate(self, batch: Sequence[tuple[int, Sequence[int]]]) -> None:
        self._fake.evaluate(batch)

    def set_sampling(self, seq: int, params: SamplingParams) -> None:
        self._fake.set_sampling(seq, params)

    def sample(self, seq: int) -> int | None:
        return self._fake.sample(seq)

    def seq_clear(self, seq: int) -> None:
        self._fake.seq_clear(seq)

    def seq_tokens(self, seq: int) -> list[int]:
        return self._fake.seq_tokens(seq)
