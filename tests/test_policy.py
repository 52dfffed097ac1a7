"""The restart policy, pure: backoff, its cap, the sliding window, giving up."""

from __future__ import annotations

import pytest

from llamafleet.runtime.config import SupervisorConfig
from llamafleet.runtime.policy import GiveUp, Restart, RestartPolicy

POLICY = RestartPolicy(max_restarts=5, window=60.0, backoff_initial=0.2, backoff_max=10.0)


def crash_loop(policy: RestartPolicy, times: list[float]) -> list[Restart | GiveUp]:
    """Feed crashes at ``times``, keeping the history the way the supervisor does."""
    history: tuple[float, ...] = ()
    out: list[Restart | GiveUp] = []
    for t in times:
        d = policy.decide(history, t)
        history = d.history
        out.append(d)
    return out


def test_backoff_doubles_from_the_initial_delay() -> None:
    p = RestartPolicy(max_restarts=10, window=60.0, backoff_initial=0.2, backoff_max=100.0)
    delays = [d.delay for d in crash_loop(p, [0.0, 1.0, 2.0, 3.0, 4.0])]
    assert delays == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2])
    assert all(isinstance(d, Restart) for d in crash_loop(p, [0.0, 1.0, 2.0]))


def test_backoff_is_capped() -> None:
    p = RestartPolicy(max_restarts=100, window=1e9, backoff_initial=0.2, backoff_max=1.0)
    delays = [d.delay for d in crash_loop(p, [float(t) for t in range(8)])]
    assert delays == pytest.approx([0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert p.backoff(10_000) == 1.0  # no overflow, however long the history


def test_gives_up_exactly_past_max_restarts() -> None:
    p = RestartPolicy(max_restarts=2, window=60.0, backoff_initial=0.05, backoff_max=0.5)
    first, second, third = crash_loop(p, [0.0, 0.1, 0.2])
    assert isinstance(first, Restart) and isinstance(second, Restart)
    assert isinstance(third, GiveUp)
    assert third.reason == "3 crashes within 60s" and third.crashes == 3


def test_max_restarts_zero_gives_up_at_the_first_crash() -> None:
    p = RestartPolicy(max_restarts=0, window=60.0, backoff_initial=0.1, backoff_max=1.0)
    d = p.decide((), 5.0)
    assert isinstance(d, GiveUp) and d.history == (5.0,)


def test_the_window_slides() -> None:
    p = RestartPolicy(max_restarts=2, window=10.0, backoff_initial=1.0, backoff_max=100.0)
    # two crashes, then a quiet spell longer than the window: the count starts over
    a, b, c = crash_loop(p, [0.0, 5.0, 16.0])
    assert isinstance(c, Restart) and c.history == (16.0,) and c.delay == 1.0
    # a crash exactly `window` old still counts; one a hair older does not
    assert p.decide((0.0, 5.0), 10.0) == GiveUp("3 crashes within 10s", (0.0, 5.0, 10.0))
    d = p.decide((0.0, 5.0), 10.001)
    assert isinstance(d, Restart) and d.history == (5.0, 10.001) and d.delay == 2.0


def test_backoff_follows_the_crashes_in_the_window() -> None:
    p = RestartPolicy(max_restarts=10, window=10.0, backoff_initial=1.0, backoff_max=100.0)
    assert p.decide((1.0, 2.0, 3.0), 4.0).delay == 8.0
    assert p.decide((1.0, 2.0, 3.0), 12.5).delay == 2.0  # 1.0 and 2.0 slid out


def test_a_model_that_cannot_be_loaded_fails_at_once() -> None:
    d = POLICY.decide((), 0.0, load_failed=True)
    assert isinstance(d, GiveUp) and d.reason == "its model cannot be loaded"
    assert d.history == (0.0,)


def test_decide_is_pure() -> None:
    history = [1.0, 2.0]
    assert POLICY.decide(history, 3.0) == POLICY.decide(history, 3.0)
    assert history == [1.0, 2.0]


def test_from_config() -> None:
    sup = SupervisorConfig(max_restarts=3, restart_window=30.0, restart_backoff_initial=0.5,
                           restart_backoff_max=4.0)
    assert RestartPolicy.from_config(sup) == RestartPolicy(3, 30.0, 0.5, 4.0)
