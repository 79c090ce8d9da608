"""Typed SQLAlchemy bindings for the worker schema's SQL functions.

Each method returns a SQLAlchemy function expression, schema-qualified and quoted, that
can stand anywhere SQL allows a function call — so a job can be enqueued from a query,
one per row, in the caller's transaction::

    from sqlalchemy import func, select
    from sqla_graphile.functions import worker_functions

    gw = worker_functions()  # the "graphile_worker" schema
    session.execute(
        select(gw.add_job("send_email", func.json_build_object("to", User.email)))
        .where(User.wants_newsletter)
    )

Functions returning a job row (``add_job``, ``remove_job``) or a set of rows
(``add_jobs``, ``complete_jobs`` …) can also be used as a ``FROM`` item with
:meth:`WorkerFunctions.rows_of`, which yields the columns of ``_private_jobs``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ARRAY, BigInteger, Boolean, Integer, Text, cast, literal, null
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import ColumnElement
from sqlalchemy.sql.functions import Function
from sqlalchemy.sql.selectable import TableValuedAlias
from sqlalchemy.types import DateTime, NullType

from .errors import InvalidArgumentType
from .schema import DEFAULT_SCHEMA, WorkerSchema, worker_schema

__all__ = ["WorkerFunctions", "worker_functions"]

_Arg = Any  # a Python value or any SQL expression


class _WorkerFunction(Function[Any]):
    """A function of the worker schema, always called as ``"schema"."name"(...)``."""

    inherit_cache = True


@compiles(_WorkerFunction)
def _compile_worker_function(element: _WorkerFunction, compiler: Any, **kw: Any) -> str:
    # SQLAlchemy quotes a function's schema prefix only when it holds characters outside
    # [A-Za-z0-9_$]: a mixed-case name would be folded to lower case (another schema),
    # and names such as "$$x" or reserved words would not parse. Here the prefix gets the
    # full rules of a schema name (case, reserved words, first character), applied by the
    # compiling dialect's preparer, which also escapes "%" as its paramstyle needs.
    preparer = compiler.preparer
    (schema,) = element.packagenames
    return (
        f"{preparer.quote(schema)}.{preparer.quote_identifier(element.name)}"
        f"{compiler.function_argspec(element, **kw)}"
    )


def _arg(value: _Arg, type_: Any) -> ColumnElement[Any]:
    """Bind a Python value with the SQL type of the function's parameter.

    Explicit types keep PostgreSQL's overload resolution exact (as Node's explicit casts
    do) and let SQL expressions pass through untouched.
    """
    if isinstance(value, ColumnElement):
        return value if not isinstance(value.type, NullType) else cast(value, type_)
    if value is None:
        return cast(null(), type_)
    return literal(value, type_)


class WorkerFunctions:
    """The SQL functions of one worker schema as typed SQLAlchemy expressions."""

    def __init__(self, schema: WorkerSchema) -> None:
        self.schema = schema
        self._row_type = schema.private_jobs

    def _call(self, name: str, *args: ColumnElement[Any], type_: Any = None) -> Function[Any]:
        return _WorkerFunction(name, *args, packagenames=(self.schema.name,), type_=type_)

    def add_job(
        self,
        identifier: _Arg,
        payload: _Arg = None,
        *,
        queue_name: _Arg = None,
        run_at: _Arg | datetime = None,
        max_attempts: _Arg = None,
        job_key: _Arg = None,
        priority: _Arg = None,
        flags: _Arg | Sequence[str] = None,
        job_key_mode: _Arg = None,
    ) -> Function[Any]:
        """``add_job(...)``: enqueue one job; returns the ``_private_jobs`` row.

        ``payload`` is a JSON text or a SQL expression of type ``json`` (for example
        ``func.json_build_object(...)``); Python dicts are encoded by WorkerUtils, not here.
        """
        return self._call(
            "add_job",
            _arg(identifier, Text),
            _payload(payload),
            _arg(queue_name, Text),
            _arg(run_at, DateTime(timezone=True)),
            _arg(max_attempts, Integer),
            _arg(job_key, Text),
            _arg(priority, Integer),
            _arg(list(flags) if isinstance(flags, (list, tuple)) else flags, ARRAY(Text)),
            _arg(job_key_mode, Text),
        )

    def add_jobs(self, specs: _Arg, job_key_preserve_run_at: _Arg = False) -> Function[Any]:
        """``add_jobs(specs job_spec[], job_key_preserve_run_at)``: returns a set of rows.

        ``specs`` is an expression of type ``job_spec[]``; :meth:`specs_from_json` builds
        one from a JSON array of objects.
        """
        return self._call("add_jobs", specs, _arg(job_key_preserve_run_at, Boolean))

    def specs_from_json(self, specs_json: _Arg) -> ColumnElement[Any]:
        """A ``job_spec[]`` built from a JSON array of objects.

        The objects carry the type's fields: ``identifier``, ``payload``, ``queue_name``,
        ``run_at``, ``max_attempts``, ``job_key``, ``priority``, ``flags``.
        """
        from sqlalchemy import func, select

        records = func.json_populate_recordset(
            cast(null(), self.schema.job_spec), _json(specs_json)
        )
        return select(func.array_agg(records.column_valued())).scalar_subquery()

    def remove_job(self, job_key: _Arg) -> Function[Any]:
        """``remove_job(job_key)``: delete a waiting keyed job, or stop a running one retrying."""
        return self._call("remove_job", _arg(job_key, Text))

    def complete_jobs(self, job_ids: _Arg) -> Function[Any]:
        """``complete_jobs(job_ids bigint[])``: delete unlocked jobs; returns them."""
        return self._call("complete_jobs", _ids(job_ids))

    def permanently_fail_jobs(self, job_ids: _Arg, error_message: _Arg = None) -> Function[Any]:
        """``permanently_fail_jobs(job_ids, error_message)``: returns the failed rows."""
        return self._call("permanently_fail_jobs", _ids(job_ids), _arg(error_message, Text))

    def reschedule_jobs(
        self,
        job_ids: _Arg,
        *,
        run_at: _Arg | datetime = None,
        priority: _Arg = None,
        attempts: _Arg = None,
        max_attempts: _Arg = None,
    ) -> Function[Any]:
        """``reschedule_jobs(job_ids, run_at, priority, attempts, max_attempts)``."""
        return self._call(
            "reschedule_jobs",
            _ids(job_ids),
            _arg(run_at, DateTime(timezone=True)),
            _arg(priority, Integer),
            _arg(attempts, Integer),
            _arg(max_attempts, Integer),
        )

    def force_unlock_workers(self, worker_ids: _Arg) -> Function[Any]:
        """``force_unlock_workers(worker_ids text[])``: clear those workers' locks."""
        value = list(worker_ids) if isinstance(worker_ids, (list, tuple)) else worker_ids
        return self._call("force_unlock_workers", _arg(value, ARRAY(Text)))

    def rows_of(self, call: Function[Any], name: str = "job") -> TableValuedAlias:
        """Use a row-returning function call as a ``FROM`` item.

        The item has ``_private_jobs``'s columns: ``select(rows.c.id).select_from(rows)``.
        """
        columns = [column.name for column in self._row_type.columns]
        return call.table_valued(*columns, name=name)


def _json(value: _Arg) -> ColumnElement[Any]:
    """A ``json`` argument: JSON text is cast as is; other Python values are encoded."""
    if isinstance(value, ColumnElement):
        return value if isinstance(value.type, postgresql.JSON) else cast(value, postgresql.JSON)
    if value is None:
        return cast(null(), postgresql.JSON)
    if isinstance(value, str):
        return cast(literal(value, Text), postgresql.JSON)
    return literal(value, postgresql.JSON)


def _payload(payload: _Arg) -> ColumnElement[Any]:
    if isinstance(payload, (ColumnElement, str)) or payload is None:
        return _json(payload)
    raise InvalidArgumentType(
        "payload must be JSON text or a SQL expression; WorkerUtils encodes objects"
    )


def _ids(job_ids: _Arg) -> ColumnElement[Any]:
    value = [int(i) for i in job_ids] if isinstance(job_ids, (list, tuple)) else job_ids
    return _arg(value, ARRAY(BigInteger))


@functools.lru_cache(maxsize=64)
def worker_functions(schema: str = DEFAULT_SCHEMA) -> WorkerFunctions:
    """The function bindings of the worker schema called ``schema`` (cached per name)."""
    return WorkerFunctions(worker_schema(schema))
