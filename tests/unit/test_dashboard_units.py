"""The dashboard's pieces that need no database: throughput from samples, states, filters."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from sqla_graphile._admin import state_of
from sqla_graphile.admin import JobState
from sqla_graphile.dashboard import JobFilter, Throughput

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def test_throughput_is_measured_between_samples() -> None:
    throughput = Throughput()
    throughput.record(T0, total=100, max_id=1000)
    assert throughput.rates() == []  # one sample: nothing to measure yet
    # A minute later: 30 jobs added (ids up to 1030), the queue 10 shorter: 40 finished.
    throughput.record(T0 + timedelta(minutes=1), total=90, max_id=1030)
    rates = {rate.minutes: rate for rate in throughput.rates()}
    assert set(rates) == {1, 5, 15}
    assert rates[1].added == 30 and rates[1].finished == 40
    # A window starts at the latest sample at least that old, else at the oldest one.
    throughput.record(T0 + timedelta(minutes=3), total=90, max_id=1090)
    rates = {rate.minutes: rate for rate in throughput.rates()}
    assert rates[1].measured_over == timedelta(minutes=2)
    assert rates[1].added == 30 and rates[1].finished == 30
    assert rates[5].measured_over == timedelta(minutes=3)
    assert rates[5].added == 30 and rates[5].finished == pytest.approx(100 / 3)


def test_old_samples_are_dropped() -> None:
    throughput = Throughput(keep=timedelta(minutes=16))
    for minute in range(40):
        throughput.record(T0 + timedelta(minutes=minute), total=0, max_id=minute)
    assert len(throughput.samples) == 17
    assert throughput.samples[0][0] == T0 + timedelta(minutes=23)


def test_states() -> None:
    now = T0
    assert state_of(now, 0, 25, now, now) is JobState.LOCKED
    assert state_of(None, 25, 25, now, now) is JobState.FAILED
    assert state_of(None, 1, 25, now, now) is JobState.READY
    assert state_of(None, 0, 25, now + timedelta(seconds=1), now) is JobState.SCHEDULED


def test_filter_params_leave_out_the_cursor_and_empty_fields() -> None:
    where = JobFilter(JobState.FAILED, task="mail", text="refused", before=42)
    assert where.params() == {"state": "failed", "task": "mail", "text": "refused"}
    assert JobFilter().params() == {}
