"""When models load and unload: room for a load, who is evicted, who idled out.

Pure decisions over a snapshot, in the manner of :mod:`~llamafleet.runtime.policy`;
the supervisor acts on them. A model is *resident* while any of its workers is a
process (starting, ready, restarting or stopping). The limits are the
supervisor's ``max_loaded_models`` and ``memory_budget_mb`` (0: none).

Eviction takes the least recently used model that is idle (no request in flight,
none answered within the grace period) and not pinned (``keep_alive = -1``).
A model that is already stopping still holds its memory until it exits, so a load
may have to wait for it even when nothing more needs evicting.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from llamafleet.runtime.config import ModelConfig


@dataclass(frozen=True)
class Resident:
    """One resident model, as the supervisor sees it now."""

    name: str
    memory_mb: float
    #: requests in flight, or a lookup answered within the grace period
    busy: bool
    #: ``keep_alive = -1``: never evicted
    pinned: bool
    #: monotonic time of its last request (or of its load)
    last_used: float
    #: its workers are already being stopped
    stopping: bool = False


@dataclass(frozen=True)
class Plan:
    """How to make room: unload ``evict`` (least recently used first); the load may
    start once ``ready`` (nothing resident stands in its way any more)."""

    evict: tuple[str, ...]
    ready: bool


def plan_load(resident: Sequence[Resident], need_mb: float, *, max_models: int,
              budget_mb: float) -> Plan | None:
    """Room for one more model needing ``need_mb``; None when it cannot be made now
    (every model in the way is busy or pinned: the load waits)."""

    def fits(models: int, mb: float) -> bool:
        return (max_models <= 0 or models + 1 <= max_models) and \
            (budget_mb <= 0 or mb + need_mb <= budget_mb)

    staying = [r for r in resident if not r.stopping]
    if fits(len(resident), sum(r.memory_mb for r in resident)):
        return Plan(evict=(), ready=True)
    candidates = sorted((r for r in staying if not r.busy and not r.pinned),
                        key=lambda r: r.last_used)
    count, mb = len(staying), sum(r.memory_mb for r in staying)
    evict: list[str] = []
    for r in candidates:
        if fits(count, mb):
            break
        evict.append(r.name)
        count -= 1
        mb -= r.memory_mb
    if not fits(count, mb):
        return None
    return Plan(evict=tuple(evict), ready=False)


def too_big(need_mb: float, budget_mb: float) -> bool:
    """Whether a model cannot fit the budget even alone."""
    return budget_mb > 0 and need_mb > budget_mb


def idle_expired(now: float, last_used: float, keep_alive: float, busy: bool) -> bool:
    """Whether an idle model has outlived its ``keep_alive`` (-1: never)."""
    return keep_alive >= 0 and not busy and now - last_used >= keep_alive


def memory_estimate(model: ModelConfig, measured_mb: float | None) -> float:
    """MiB one worker of ``model`` needs: its declared ``memory_mb``, else what its
    last load measured, else the size of its model file, else 0."""
    if model.memory_mb is not None:
        return model.memory_mb
    if measured_mb:
        return measured_mb
    path = model.options.get("path")
    if isinstance(path, str):
        try:
            return os.path.getsize(path) / (1 << 20)
        except OSError:
            pass
    return 0.0


def rss_mb(pid: int | None) -> float | None:
    """The resident memory of a process (MiB), from /proc; None when unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20), 1)
