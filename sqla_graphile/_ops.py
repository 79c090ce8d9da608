"""Every job-management operation, written once for both the sync and asyncio faces.

Each operation is an :data:`~sqla_graphile._drive.Op`: it yields the statements of
:mod:`sqla_graphile.sql` with their parameters and returns its value. ``WorkerUtils``
drives it with ``connection.execute``, ``AsyncWorkerUtils`` with
``await connection.execute`` (:mod:`sqla_graphile._drive`); neither face holds any SQL
or logic of its own.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Executable

from ._checks import (
    check_identifier,
    check_spec,
    iterable_of,
    job_ids,
    kind,
)
from ._drive import Op
from ._jobdata import (
    NameCache,
    Targets,
    dict_rows,
    flags_json,
    in_input_order,
    insert_request,
    inserted_job,
    one_row,
    options_json,
    pairs,
    plain_options,
    single_hint,
    spec_params,
    spec_tail,
)
from .codec import (
    encode_json_value,
    encode_json_values,
    encode_payload,
    to_json_value,
    to_json_values,
)
from .errors import (
    InvalidArgument,
    InvalidArgumentType,
    InvalidHookResult,
    JobKeyLocked,
    ValueOutOfRange,
)
from .hooks import Hooks
from .job import Job
from .specs import (
    CleanupTask,
    JobKeyMode,
    JobSpec,
    RawJobSpec,
    RescheduleJobOptions,
    check_run_at,
)
from .sql import AdminStatements, statements
from .tasks import BatchTaskHandler, batch_payload, identifier_of

__all__ = ["ANALYZE_THRESHOLD", "KEY_RACE_RETRIES", "NameCache", "Operations"]

#: After inserting this many jobs in one call the jobs table is analysed.
ANALYZE_THRESHOLD = 10_000
#: How often a keyed add that lost a race (Node issue #580) is retried.
KEY_RACE_RETRIES = 10


class Operations:
    """The operations of one utils object: its schema, hooks, name cache, known tasks."""

    def __init__(
        self,
        schema: str,
        hooks: Hooks | None,
        names: NameCache,
        known_identifiers: Collection[str] = (),
    ) -> None:
        self.schema = schema
        self._statements = statements(schema)
        self.adding_sql = self._statements.adding
        self.hooks = hooks
        self.names = names
        self.known_identifiers = known_identifiers

    @property
    def admin_sql(self) -> AdminStatements:
        """The admin statements, built on first use (adding jobs needs none of them)."""
        return self._statements.admin

    # -- payloads and hooks -------------------------------------------------------

    def _prepare(self, identifier: str, payload: Any, spec: JobSpec) -> str:
        """Run the schedule hooks, then encode; both happen before any write."""
        value = to_json_value(payload)
        if self.hooks:
            value = self.hooks.schedule(identifier, value, spec)
        return encode_json_value(value)

    # -- reading rows back as Jobs ------------------------------------------------

    def _jobs(
        self,
        rows: Sequence[Mapping[Any, Any]],
        task_hint: Mapping[int, str] | None = None,
        queue_hint: Mapping[int, str] | None = None,
    ) -> Op[list[Job]]:
        names = self.names
        for task_id, identifier in (task_hint or {}).items():
            names.learn_task(task_id, identifier)
        for queue_id, queue_name in (queue_hint or {}).items():
            names.learn_queue(queue_id, queue_name)
        missing_tasks = {r["task_id"] for r in rows} - names.tasks.keys()
        if missing_tasks:
            result = yield self.adding_sql.task_names, {"ids": sorted(missing_tasks)}
            for task_id, identifier in pairs(result):
                names.learn_task(task_id, identifier)
        queue_ids = {r["job_queue_id"] for r in rows if r["job_queue_id"] is not None}
        missing_queues = queue_ids - names.queues.keys()
        if missing_queues:
            result = yield self.adding_sql.queue_names, {"ids": sorted(missing_queues)}
            for queue_id, queue_name in pairs(result):
                names.learn_queue(queue_id, queue_name)
        return [
            Job.from_row(
                row,
                # A task row deleted meanwhile (GC) leaves the name unknown: "".
                task_identifier=names.tasks.get(row["task_id"], ""),
                queue_name=(
                    names.queues.get(row["job_queue_id"])
                    if row["job_queue_id"] is not None
                    else None
                ),
            )
            for row in rows
        ]

    def _known_ids(self, identifier: str, spec: JobSpec) -> tuple[int, int | None] | None:
        """The cached task and queue ids of an unkeyed job the fast path can insert.

        ``None`` sends the job through the SQL functions: keyed jobs (their upsert rules
        live there), names not seen yet, and option values of unusual types, whose
        conversion is left to the functions' own casts.
        """
        if spec.job_key is not None or type(identifier) is not str:
            return None
        task_id = self.names.task_ids.get(identifier)
        if task_id is None:
            return None
        queue_name = spec.queue_name
        queue_id = None
        if queue_name is not None:
            if type(queue_name) is not str:
                return None
            queue_id = self.names.queue_ids.get(queue_name)
            if queue_id is None:
                return None
        if not plain_options(spec):
            return None
        return task_id, queue_id

    # -- adding jobs --------------------------------------------------------------

    def add_job(
        self, identifier: str, payload: Any, spec: JobSpec | None, method: str = "add_raw_job"
    ) -> Op[Job]:
        check_identifier(identifier, method)
        spec = check_spec(spec, method)
        payload_json = self._prepare(identifier, payload, spec)
        return (yield from self._insert_one(identifier, payload_json, spec))

    def add_batch_job(self, items: Sequence[Any], spec: JobSpec | None) -> Op[Job]:
        items = list(iterable_of(items, "BatchTaskHandler items", "add_batch_job"))
        if not items:
            raise InvalidArgument("a batch job payload must contain at least one item")
        classes = {type(item) for item in items}
        for cls in classes:
            if not issubclass(cls, BatchTaskHandler):
                raise InvalidArgumentType(
                    f"add_batch_job takes BatchTaskHandler items, not {cls.__name__}; "
                    "for a single typed task use add_job(task)"
                )
        if len(classes) != 1:
            names = ", ".join(sorted(cls.__name__ for cls in classes))
            raise InvalidArgumentType(
                f"all items of a batch job must be of one BatchTaskHandler class, not {names}"
            )
        identifier = identifier_of(classes.pop())
        spec = check_spec(spec, "add_batch_job")
        payload = batch_payload(items)
        if self.hooks:
            payload = self.hooks.schedule(identifier, payload, spec)
            if not isinstance(payload, list):
                raise InvalidHookResult(
                    "a before_job_schedule hook must return a JSON array for batch jobs"
                )
            if not payload:
                raise InvalidHookResult(
                    "a before_job_schedule hook emptied a batch job: a batch job payload must "
                    "contain at least one item"
                )
        return (yield from self._insert_one(identifier, encode_payload(payload), spec))

    def _insert_one(self, identifier: str, payload_json: str, spec: JobSpec) -> Op[Job]:
        known = self._known_ids(identifier, spec)
        if known is not None:
            task_id, queue_id = known
            flags = flags_json(spec.flags)
            params = {
                "task_id": task_id,
                "identifier": identifier,
                "payload": payload_json,
                "priority": spec.priority,
                "run_at": spec.run_at,
                "max_attempts": spec.max_attempts,
                "flags": flags,
            }
            statement = self.adding_sql.insert_job
            if queue_id is not None:
                params["queue_id"] = queue_id
                params["queue_name"] = spec.queue_name
                statement = self.adding_sql.insert_queued_job
            result = yield statement, params
            inserted: Sequence[Any] | None = result.first()
            if inserted is not None:
                return inserted_job(
                    inserted[0],
                    inserted[1],
                    inserted[2],
                    identifier,
                    spec,
                    json.loads(payload_json),
                    task_id,
                    queue_id,
                )
            # The task or queue row is gone (deleted by a cleanup, or its creation rolled
            # back): nothing was inserted or notified; the SQL function creates it anew.
            self.names.forget(identifier, spec.queue_name)
        params = spec_params(identifier, payload_json, spec)
        for _ in range(KEY_RACE_RETRIES):
            result = yield self.adding_sql.add_job, params
            row = one_row(result)
            if row["id"] is not None:
                break
            # Node issue #580: the keyed job was locked between add_jobs' detach step
            # and its upsert, so nothing was written. Trying again detaches it properly.
        else:
            raise JobKeyLocked(
                f"could not add job {identifier!r} with key {spec.job_key!r}: the keyed job "
                f"was locked by a worker in each of {KEY_RACE_RETRIES} attempts; nothing "
                "was written",
                [str(spec.job_key)],
            )
        task_hint: dict[int, str] = {}
        queue_hint: dict[int, str] = {}
        if spec.key_mode != JobKeyMode.UNSAFE_DEDUPE.value or row["revision"] == 0:
            # The row was inserted or overwritten from this spec: its ids are ours.
            task_hint[row["task_id"]] = identifier
            if row["job_queue_id"] is not None and spec.queue_name is not None:
                queue_hint[row["job_queue_id"]] = spec.queue_name
        jobs = yield from self._jobs([row], task_hint, queue_hint)
        return jobs[0]

    def add_jobs(self, jobs: Sequence[RawJobSpec]) -> Op[list[Job]]:
        added = yield from self._add_jobs(jobs, counted=False)
        assert isinstance(added, list)
        return added

    def add_jobs_counted(self, jobs: Sequence[RawJobSpec]) -> Op[int]:
        """:meth:`add_jobs` answering only how many jobs were added: no ``Job`` is built.

        The jobs stored and notified are the same; the fast path's statement returns
        a count instead of the new rows.
        """
        added = yield from self._add_jobs(jobs, counted=True)
        return added if isinstance(added, int) else len(added)

    def _add_jobs(self, jobs: Sequence[RawJobSpec], counted: bool) -> Op[list[Job] | int]:
        if not jobs:
            return 0 if counted else []
        modes = {
            mode.value if isinstance(mode, JobKeyMode) else mode
            for mode in {job.spec.job_key_mode for job in jobs}
        }
        if JobKeyMode.UNSAFE_DEDUPE.value in modes:
            raise InvalidArgument(
                "UNSAFE_DEDUPE job_key_mode is not supported in batch add_jobs; "
                "add such jobs one at a time with add_job"
            )
        preserve = JobKeyMode.PRESERVE_RUN_AT.value in modes
        # Hooks and payload encoding run for every job before anything is written.
        texts: list[str] | None = None
        values: list[Any] = []
        if self.hooks:
            texts = [self._prepare(job.identifier, job.payload, job.spec) for job in jobs]
        else:
            values = to_json_values([job.payload for job in jobs])
        targets = self._targets(jobs)
        added: list[Job] | int
        if targets is not None:
            # All the payloads as one JSON array, encoded (or joined) in one go.
            document = "[" + ",".join(texts) + "]" if texts else encode_json_values(values)
            if counted:
                added = yield from self._insert_many_counted(jobs, document, targets)
            else:
                added = yield from self._insert_many(jobs, document, targets)
        else:
            if texts is None:
                texts = [encode_json_value(value) for value in values]
            # One statement for the whole batch, like Node's: one notification, and every
            # key rule applied at once. It also teaches the cache the new names' ids.
            added = yield from self._add_jobs_sql(jobs, texts, preserve)
        if len(jobs) >= ANALYZE_THRESHOLD:
            yield self.adding_sql.analyze, {}
        return added

    def _targets(self, jobs: Sequence[RawJobSpec]) -> Targets | None:
        """For the fast path: each job's target number, and the targets' (task, queue) ids.

        ``None`` when any job must go through the SQL function.
        """
        numbers: list[int] = []
        elements: list[str] = []
        targets: list[tuple[int, int | None]] = []
        described: list[dict[str, Any]] = []
        known: dict[tuple[int, int | None], int] = {}
        # Runs of jobs with one identifier and one spec object share everything here.
        last_identifier: str | None = None
        last_spec: JobSpec | None = None
        number = 0
        element = first = ""
        uniform = True
        for job in jobs:
            identifier, spec = job.identifier, job.spec
            if spec is not last_spec or identifier != last_identifier:
                ids = self._known_ids(identifier, spec)
                if ids is None:
                    return None
                found = known.get(ids)
                if found is None:
                    found = known[ids] = len(targets)
                    targets.append(ids)
                    names = {"i": identifier, "qn": spec.queue_name}
                    described.append({"k": found, "t": ids[0], "q": ids[1], **names})
                number = found
                element = f'{{"k":{number}{options_json(spec)}}}'
                first = first or element
                uniform = uniform and element == first
                last_identifier, last_spec = identifier, spec
            numbers.append(number)
            elements.append(element)
        return Targets(
            numbers,
            targets,
            json.dumps(described),
            "[" + ",".join(elements) + "]",
            jobs[0] if uniform else None,
        )

    def _insert_many(
        self, jobs: Sequence[RawJobSpec], document: str, targets: Targets
    ) -> Op[list[Job]]:
        """The fast path of a batch: one INSERT of jobs whose ids are all cached.

        ``document`` is the JSON array of the jobs' payloads.
        """
        numbers = targets.numbers
        result = yield insert_request(self.adding_sql, targets, document, counted=False)
        # No row at all when nothing was inserted.
        row: Sequence[Any] = result.first() or ([], [], None, [], [])
        ids, run_ats, created_at, task_ids, queue_ids = row[:5]
        # The payloads as stored: the text sent, decoded in one go.
        payloads: list[Any] = json.loads(document)
        target_ids = targets.ids
        if len(ids) == len(jobs):
            # Ids ascend with the positions (rows are inserted in position order).
            return [
                inserted_job(
                    job_id,
                    run_at,
                    created_at,
                    job.identifier,
                    job.spec,
                    payload,
                    *target_ids[number],
                )
                for job, job_id, run_at, payload, number in zip(
                    jobs, ids, run_ats, payloads, numbers, strict=True
                )
            ]
        # Jobs of a task or queue whose row is gone were left out, all of them: the
        # (task, queue) pairs that came back tell which.
        present = set(zip(task_ids, queue_ids, strict=True))
        gone = {k for k, ids_ in enumerate(target_ids) if ids_ not in present}
        inserted = [i for i, number in enumerate(numbers) if number not in gone]
        missing = [i for i, number in enumerate(numbers) if number in gone]
        added: list[Job | None] = [None] * len(jobs)
        for i, job_id, run_at in zip(inserted, ids, run_ats, strict=True):
            job = jobs[i]
            added[i] = inserted_job(
                job_id,
                run_at,
                created_at,
                job.identifier,
                job.spec,
                payloads[i],
                *target_ids[numbers[i]],
            )
        for i in missing:
            self.names.forget(jobs[i].identifier, jobs[i].spec.queue_name)
        # The decoded payloads encode back to the very text sent.
        again = yield from self._add_jobs_sql(
            [jobs[i] for i in missing], [encode_json_value(payloads[i]) for i in missing], False
        )
        for i, again_job in zip(missing, again, strict=True):
            added[i] = again_job
        return added  # type: ignore[return-value]

    def _insert_many_counted(
        self, jobs: Sequence[RawJobSpec], document: str, targets: Targets
    ) -> Op[int]:
        """:meth:`_insert_many` answering only how many jobs were added."""
        result = yield insert_request(self.adding_sql, targets, document, counted=True)
        # No row at all when nothing was inserted.
        row: Sequence[Any] = result.first() or (0, [])
        count: int = row[0]
        if count == len(jobs):
            return count
        # Jobs of a task or queue whose row is gone were left out, all of them; they go
        # through the SQL function, which creates the rows anew.
        passed = set(row[1] or ())
        missing = [i for i, number in enumerate(targets.numbers) if number not in passed]
        for i in missing:
            self.names.forget(jobs[i].identifier, jobs[i].spec.queue_name)
        payloads: list[Any] = json.loads(document)
        again = yield from self._add_jobs_sql(
            [jobs[i] for i in missing], [encode_json_value(payloads[i]) for i in missing], False
        )
        return count + len(again)

    def _add_jobs_sql(
        self, prepared: Sequence[RawJobSpec], texts: Sequence[str], preserve: bool
    ) -> Op[list[Job]]:
        """A batch through the ``add_jobs`` SQL function; the jobs in input order."""
        encoded: list[str] = []
        plain_tails: dict[str, str] = {}  # per identifier, for specs setting no option
        for job, payload_json in zip(prepared, texts, strict=True):
            spec = job.spec
            if (
                spec.queue_name is None
                and spec.run_at is None
                and spec.max_attempts is None
                and spec.job_key is None
                and spec.priority is None
                and spec.flags is None
            ):
                tail = plain_tails.get(job.identifier)
                if tail is None:
                    tail = plain_tails[job.identifier] = spec_tail(job.identifier, spec)
            else:
                tail = spec_tail(job.identifier, spec)
            encoded.append('{"payload":' + payload_json + "," + tail)
        keys = [job.spec.job_key for job in prepared]
        rows: list[dict[str, Any]] = []
        pending: Sequence[int] = range(len(encoded))
        for _ in range(KEY_RACE_RETRIES):
            result = yield (
                self.adding_sql.add_jobs_text,
                {
                    "specs": "[" + ",".join([encoded[i] for i in pending]) + "]",
                    "preserve_run_at": preserve,
                },
            )
            got = dict_rows(result)
            rows.extend(got)
            if len(got) == len(pending):
                break
            # Keyed specs that lost the race with a worker locking their job (see add_job)
            # returned no row; only they are sent again.
            written = {row["key"] for row in got}
            pending = [i for i in pending if keys[i] is not None and keys[i] not in written]
            if not pending:
                break
        else:
            raise JobKeyLocked(
                f"could not add {len(pending)} keyed job(s): their keyed jobs were locked by "
                f"workers in each of {KEY_RACE_RETRIES} attempts",
                [str(keys[i]) for i in pending],
            )
        stored = [row["payload"] for row in rows]
        for row in rows:
            row["payload"] = json.loads(row["payload"])
        task_hint = single_hint(rows, "task_id", {job.identifier for job in prepared})
        queue_hint = single_hint(rows, "job_queue_id", {job.spec.queue_name for job in prepared})
        added = yield from self._jobs(rows, task_hint, queue_hint)
        return in_input_order(prepared, texts, added, stored)

    # -- administration -----------------------------------------------------------

    def remove_job(self, job_key: str) -> Op[Job | None]:
        if not isinstance(job_key, str):
            hint = ""
            if isinstance(job_key, int) and not isinstance(job_key, bool):
                hint = f"; to delete the job with id {job_key} use complete_jobs([{job_key}])"
            raise InvalidArgumentType(
                f"remove_job takes a job key (a string), not {kind(job_key)}{hint}"
            )
        result = yield self.admin_sql.remove_job, {"job_key": job_key}
        row = one_row(result)
        if row["id"] is None:
            return None
        jobs = yield from self._jobs([row])
        return jobs[0]

    def _rows(self, statement: Executable, params: Mapping[str, Any]) -> Op[list[Job]]:
        result = yield statement, params
        return (yield from self._jobs(dict_rows(result)))

    def complete_jobs(self, ids: Iterable[int]) -> Op[list[Job]]:
        return self._rows(self.admin_sql.complete_jobs, {"ids": job_ids(ids, "complete_jobs")})

    def permanently_fail_jobs(self, ids: Iterable[int], reason: str | None) -> Op[list[Job]]:
        ids = job_ids(ids, "permanently_fail_jobs")
        return self._rows(self.admin_sql.permanently_fail_jobs, {"ids": ids, "reason": reason})

    def reschedule_jobs(self, ids: Iterable[int], options: object) -> Op[list[Job]]:
        if not isinstance(options, RescheduleJobOptions):
            raise InvalidArgumentType(
                f"reschedule_jobs takes RescheduleJobOptions, not {kind(options)}: write "
                "RescheduleJobOptions(run_at=..., priority=...)"
            )
        chosen = job_ids(ids, "reschedule_jobs")
        run_at = options.run_at
        if isinstance(run_at, timedelta):
            # From the database's clock, as every other time the jobs hold.
            now: datetime = (yield self.admin_sql.now, {}).scalar_one()
            try:
                run_at = now + run_at
            except OverflowError:
                raise ValueOutOfRange(
                    f"RescheduleJobOptions.run_at: now() + {run_at} is out of range"
                ) from None
            check_run_at("RescheduleJobOptions.run_at (now() + timedelta)", run_at)
        params = {
            "ids": chosen,
            "run_at": run_at,
            "priority": options.priority,
            "attempts": options.attempts,
            "max_attempts": options.max_attempts,
        }
        return (yield from self._rows(self.admin_sql.reschedule_jobs, params))

    def force_unlock_workers(self, worker_ids: Iterable[str]) -> Op[None]:
        ids = []
        for worker_id in iterable_of(worker_ids, "worker ids", "force_unlock_workers"):
            if not isinstance(worker_id, str):
                raise InvalidArgumentType(
                    f"force_unlock_workers takes worker ids (strings), not {kind(worker_id)}"
                )
            ids.append(worker_id)
        if ids:
            yield self.admin_sql.force_unlock_workers, {"worker_ids": ids}

    def cleanup(self, tasks: Iterable[CleanupTask | str] | None) -> Op[None]:
        chosen = [CleanupTask.GC_TASK_IDENTIFIERS, CleanupTask.GC_JOB_QUEUES]
        if tasks is not None:
            chosen = []
            for task in iterable_of(tasks, "CleanupTask values", "cleanup"):
                try:
                    chosen.append(CleanupTask(task))
                except ValueError:
                    known = ", ".join(t.value for t in CleanupTask)
                    raise InvalidArgument(
                        f"unknown cleanup task {task!r}; expected one of {known}"
                    ) from None
        keep = sorted(self.known_identifiers)
        for task in chosen:
            if task is CleanupTask.DELETE_PERMANENTLY_FAILED_JOBS:
                yield self.admin_sql.delete_permanently_failed, {}
            elif task is CleanupTask.GC_TASK_IDENTIFIERS:
                yield self.admin_sql.gc_task_identifiers, {"keep": keep}
                if keep:
                    # Workers of ours fetch by name, but Node workers cache task ids:
                    # make sure every known identifier still has its row.
                    yield self.adding_sql.register_tasks, {"identifiers": keep}
            else:
                yield self.admin_sql.gc_job_queues, {}
