"""Shutdown of a worker process by signals: no completion or failure is ever lost."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import Engine
from worker_fixtures import TIMEOUT, rows, wait_for

from sqla_graphile import WorkerUtils

SCRIPT = Path(__file__).resolve().parents[1] / "worker_process.py"


class WorkerProcess:
    def __init__(self, database_url: str, schema: str, grace: float, delay: float) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, str(SCRIPT), database_url, schema, str(grace), str(delay)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def saw(self, prefix: str) -> bool:
        return any(line.startswith(prefix) for line in self.lines)

    def wait_line(self, prefix: str) -> None:
        wait_for(lambda: self.saw(prefix), what=f"{prefix!r} in {self.lines}")

    def exit_code(self) -> int:
        code = self.process.wait(TIMEOUT)
        self._reader.join(5)
        return code


@contextmanager
def worker_process(
    database_url: str, schema: str, *, grace: float, delay: float = 0.0
) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(database_url, schema, grace, delay)
    try:
        yield proc
    finally:
        if proc.process.poll() is None:
            proc.process.kill()
            proc.process.wait()


@pytest.mark.parametrize("delay", [0.0, 0.3])
def test_sigterm_mid_job_still_writes_the_completion(
    engine: Engine, database_url: str, schema: str, utils: WorkerUtils, delay: float
) -> None:
    job = utils.add_raw_job("sleepy", {"seconds": 1.0})
    with worker_process(database_url, schema, grace=20.0, delay=delay) as proc:
        proc.wait_line(f"STARTED {job.id}")
        proc.process.send_signal(signal.SIGTERM)
        assert proc.exit_code() == 0, proc.lines
    assert proc.saw(f"FINISHED {job.id}") and proc.saw("EXITED")
    # Node 0.18 logs such a job as completed yet leaves its row locked; ours is gone.
    assert rows(engine, schema) == []


def test_job_outliving_the_grace_period_is_failed_not_lost(
    engine: Engine, database_url: str, schema: str, utils: WorkerUtils
) -> None:
    job = utils.add_raw_job("sleepy", {"seconds": 120})
    with worker_process(database_url, schema, grace=0.5) as proc:
        proc.wait_line(f"STARTED {job.id}")
        proc.process.send_signal(signal.SIGTERM)
        assert proc.exit_code() == 0, proc.lines
    assert not proc.saw(f"FINISHED {job.id}")
    (row,) = rows(engine, schema)
    assert row["last_error"] == "Worker shutdown: job still running after the 0.5 s grace period"
    assert row["locked_by"] is None and row["locked_at"] is None and row["attempts"] == 1
    assert row["run_at"] > row["created_at"]


def test_second_signal_forces_the_shutdown(
    engine: Engine, database_url: str, schema: str, utils: WorkerUtils
) -> None:
    jobs = [utils.add_raw_job("sleepy", {"seconds": 120}) for _ in range(2)]
    with worker_process(database_url, schema, grace=600.0) as proc:
        for job in jobs:
            proc.wait_line(f"STARTED {job.id}")
        proc.process.send_signal(signal.SIGTERM)
        proc.wait_line("sqla_graphile.worker SIGTERM received: shutting down")
        proc.process.send_signal(signal.SIGTERM)
        assert proc.exit_code() == 0, proc.lines
    left = rows(engine, schema)
    assert [r["id"] for r in left] == [j.id for j in jobs]
    for row in left:
        assert row["last_error"] == "Forced worker shutdown (forced by SIGTERM)"
        assert row["locked_by"] is None and row["attempts"] == 1
