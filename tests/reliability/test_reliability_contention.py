"""Many concurrent ``add_job`` calls on the same keys while a worker locks and releases them.

Every call runs in a session of its own, from several threads; another thread plays a
worker: it locks a keyed job (as a fetch does), then either fails it (attempts kept) or
completes it.
Whatever the interleaving: no call returns ``None`` or fails, each key ends with exactly
one live job, and revisions count the keyed updates of each row exactly.
"""

from __future__ import annotations

import random
import threading
from collections import defaultdict

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session
from worker_fixtures import execute

from sqla_graphile import Job, JobKeyMode, JobSpec, WorkerUtils
from sqla_graphile.schema import quote_schema

THREADS = 8
CALLS = 40
KEYS = [f"rel_key_{n}" for n in range(3)]
LOCKER = "rel_locker"


class _Locker(threading.Thread):
    """Locks a keyed job like a worker's fetch, then fails or completes it; repeats."""

    def __init__(self, engine: Engine, schema: str) -> None:
        super().__init__(daemon=True)
        self.engine = engine
        self.s = quote_schema(schema)
        self.stop = threading.Event()
        self.locked = 0
        self.completed = 0
        self.error: BaseException | None = None
        self.random = random.Random(7)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.cycle()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def cycle(self) -> None:
        s = self.s
        with self.engine.begin() as connection:
            job_id = connection.execute(
                text(
                    f"update {s}._private_jobs set locked_by = :me, locked_at = now(), "
                    f"attempts = attempts + 1 where id = (select id from {s}._private_jobs "
                    "where key = any(:keys) and locked_at is null and attempts < max_attempts "
                    "order by random() limit 1 for update skip locked) returning id"
                ),
                {"me": LOCKER, "keys": KEYS},
            ).scalar()
        if job_id is None:
            return
        self.locked += 1
        self.stop.wait(self.random.choice([0, 0.001, 0.005]))
        with self.engine.begin() as connection:
            if self.random.random() < 0.3:
                connection.execute(
                    text(f"delete from {s}._private_jobs where id = :id and locked_by = :me"),
                    {"id": job_id, "me": LOCKER},
                )
                self.completed += 1
            else:
                connection.execute(
                    text(
                        f"update {s}._private_jobs set locked_by = null, locked_at = null, "
                        "last_error = 'failed' where id = :id and locked_by = :me"
                    ),
                    {"id": job_id, "me": LOCKER},
                )


@pytest.mark.parametrize("mode", list(JobKeyMode))
def test_concurrent_keyed_adds_while_a_worker_locks_the_job(
    engine: Engine, schema: str, mode: JobKeyMode
) -> None:
    results: dict[int, list[Job]] = defaultdict(list)
    errors: list[BaseException] = []
    barrier = threading.Barrier(THREADS + 1)
    utils = WorkerUtils(engine, schema)

    def add(thread: int, n: int) -> None:
        key = KEYS[n % len(KEYS)]
        with Session(engine) as session, session.begin():
            job = utils.using(session).add_raw_job(
                "rel_keyed",
                {"thread": thread, "n": n},
                JobSpec(job_key=key, job_key_mode=mode, max_attempts=25),
            )
        results[thread].append(job)

    def adder(thread: int) -> None:
        try:
            for n in range(CALLS - len(KEYS)):
                add(thread, n)
            barrier.wait(120)
            # The worker has stopped: one more add per key.
            for n in range(CALLS - len(KEYS), CALLS):
                add(thread, n)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    locker = _Locker(engine, schema)
    threads = [threading.Thread(target=adder, args=(t,), daemon=True) for t in range(THREADS)]
    locker.start()
    for thread in threads:
        thread.start()
    try:
        barrier.wait(120)
    finally:
        locker.stop.set()
        locker.join(60)
    barrier_broken = barrier.broken
    for thread in threads:
        thread.join(120)
    assert errors == [] and not barrier_broken, errors
    assert locker.error is None, locker.error
    assert locker.locked > 0, "the worker never got hold of a keyed job"

    # Every call returned a job, with its key.
    all_jobs = [job for jobs in results.values() for job in jobs]
    assert len(all_jobs) == THREADS * CALLS
    assert all(isinstance(job, Job) and job.id is not None for job in all_jobs)
    assert all(job.key in KEYS for job in all_jobs)

    s = quote_schema(schema)
    table = execute(
        engine,
        f"select id, key, revision, attempts, max_attempts, locked_by from {s}._private_jobs",
    )
    # Exactly one live job per key, unlocked now that the worker stopped.
    live = [row for row in table if row["key"] is not None]
    assert sorted(row["key"] for row in live) == sorted(KEYS)
    assert all(row["locked_by"] is None for row in table)
    # Jobs detached from their key (replace modes, locked meanwhile) never run again.
    for row in table:
        if row["key"] is None:
            assert mode is not JobKeyMode.UNSAFE_DEDUPE
            assert row["attempts"] == row["max_attempts"]

    # Revisions: per row, the calls that wrote it saw 0 (the insert), 1, 2, … each once,
    # in increasing order within each thread; the row's final revision is the last.
    by_row: dict[int, list[int]] = defaultdict(list)
    for jobs in results.values():
        last: dict[int, int] = {}
        for job in jobs:
            assert job.revision > last.get(job.id, -1), "revision went backwards"
            last[job.id] = job.revision
            by_row[job.id].append(job.revision)
    for revisions in by_row.values():
        assert sorted(revisions) == list(range(len(revisions)))
    for row in table:
        assert row["revision"] == len(by_row[row["id"]]) - 1
    if mode is JobKeyMode.UNSAFE_DEDUPE:
        # Deduplicated: a new row only after the worker completed the previous one.
        assert len(by_row) <= 1 * len(KEYS) + locker.completed
