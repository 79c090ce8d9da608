"""The backoff schedules of the retry loops (no database)."""

from __future__ import annotations

import math

import pytest

from sqla_graphile._backoff import Backoff
from sqla_graphile.worker.listener import reconnect_delay


def test_a_schedule_grows_caps_and_jitters() -> None:
    backoff = Backoff(first=0.1, factor=2.0, cap=1.0)
    assert [backoff.base(n) for n in (1, 2, 3, 4, 5)] == [0.1, 0.2, 0.4, 0.8, 1.0]
    assert backoff.delay(3, draw=0.0) == pytest.approx(0.2)  # half, at the low end
    assert backoff.delay(3, draw=0.999) == pytest.approx(0.4, rel=1e-3)
    for attempt in range(1, 200):  # a long outage neither overflows nor passes the cap
        assert 0.05 <= backoff.delay(attempt) <= 1.0


def test_jitter_above_one_is_still_capped() -> None:
    backoff = Backoff(first=0.2, factor=1.5, cap=60.0, jitter=(0.5, 1.5))
    assert backoff.delay(1, draw=0.0) == pytest.approx(0.1)
    assert backoff.delay(1, draw=1.0) == pytest.approx(0.3)
    assert backoff.delay(100, draw=1.0) == 60.0


def test_no_jitter() -> None:
    backoff = Backoff(first=1.0, factor=2.0, cap=30.0, jitter=(1.0, 1.0))
    assert [backoff.delay(n) for n in (1, 2, 3, 6, 9)] == [1.0, 2.0, 4.0, 30.0, 30.0]


@pytest.mark.parametrize("attempt", range(12))
@pytest.mark.parametrize("jitter", [0.5, 0.75, 0.99])
def test_the_listener_keeps_nodes_reconnection_schedule(attempt: int, jitter: float) -> None:
    node_ms = math.ceil(jitter * min(60_000.0, 50.0 * math.exp(attempt)))
    assert reconnect_delay(attempt, jitter) * 1000 == pytest.approx(node_ms, abs=1)
