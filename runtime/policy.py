"""The restart policy: when a crashed worker is restarted, and when it is given up.

OTP's restart intensity (at most ``max_restarts`` crashes within ``window``
seconds) with exponential backoff between restarts (``backoff_initial`` doubling
up to ``backoff_max``); a worker whose model cannot be loaded is given up at once,
since restarting it would fail the same way.

The policy is pure: it starts no processes and reads no clock. The caller keeps the
crash history (what :meth:`RestartPolicy.decide` hands back) and passes the time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llamafleet.runtime.config import SupervisorConfig

#: doubling stops here: ``2 ** 64`` times any sane initial backoff is past any cap
_MAX_DOUBLINGS = 64


@dataclass(frozen=True)
class Restart:
    """Restart the worker after ``delay`` seconds."""

    delay: float
    #: the crash times still inside the window, this crash included
    history: tuple[float, ...]

    @property
    def crashes(self) -> int:
        """Crashes within the window, this one included."""
        return len(self.history)


@dataclass(frozen=True)
class GiveUp:
    """Restart no more: the worker is ``failed``, for ``reason``."""

    reason: str
    history: tuple[float, ...]

    @property
    def crashes(self) -> int:
        return len(self.history)


Decision = Restart | GiveUp


@dataclass(frozen=True)
class RestartPolicy:
    """Restart intensity plus exponential backoff (see the module docstring)."""

    max_restarts: int
    window: float
    backoff_initial: float
    backoff_max: float

    @classmethod
    def from_config(cls, sup: SupervisorConfig) -> RestartPolicy:
        """The policy of a ``[supervisor]`` table."""
        return cls(max_restarts=sup.max_restarts, window=sup.restart_window,
                   backoff_initial=sup.restart_backoff_initial,
                   backoff_max=sup.restart_backoff_max)

    def backoff(self, crashes: int) -> float:
        """Seconds to wait before the restart that follows the ``crashes``-th crash
        within the window (1: ``backoff_initial``; then doubling, capped)."""
        doublings = min(max(crashes - 1, 0), _MAX_DOUBLINGS)
        return min(self.backoff_max, self.backoff_initial * 2.0 ** doublings)

    def window_of(self, history: Sequence[float], now: float) -> tuple[float, ...]:
        """The crash times of ``history`` not older than ``window`` seconds at ``now``."""
        return tuple(t for t in history if now - t <= self.window)

    def decide(self, history: Sequence[float], now: float, *,
               load_failed: bool = False) -> Decision:
        """The decision for a crash at ``now``, given the earlier crash times.

        ``load_failed``: the worker reported that its model cannot be loaded."""
        recent = self.window_of((*history, now), now)
        if load_failed:
            return GiveUp("its model cannot be loaded", recent)
        if len(recent) > self.max_restarts:
            return GiveUp(f"{len(recent)} crashes within {self.window:.0f}s", recent)
        return Restart(self.backoff(len(recent)), recent)
