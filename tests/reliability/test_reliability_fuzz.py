"""Bad input, fuzzed against the database: stored exactly, or refused with a named error.

Each example runs inside a caller's session that also writes a business row. With
``savepoint=True`` that row commits after any refusal; without it, a refusal the server
raised says the transaction is aborted, and the transaction itself refuses further work.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from worker_fixtures import execute

from sqla_graphile import GraphileWorkerError, JobSpec, RawJobSpec, WorkerUtils, migrate
from sqla_graphile.errors import (
    InvalidCharacter,
    InvalidJobKey,
    InvalidMaxAttempts,
    InvalidSchemaName,
    PayloadNotSerializable,
    QueueNameTooLong,
    TaskIdentifierTooLong,
    ValueOutOfRange,
    sqlstate_of,
)
from sqla_graphile.schema import quote_schema, validate_schema_name

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Every code point, lone surrogates and NUL included.
ANY_CHAR = st.characters(codec=None, categories=None)
ANY_TEXT = st.text(ANY_CHAR, max_size=20)
ODD_TEXT = st.sampled_from(
    ["", "\x00", "a\x00b", "\ud800", "x\udfff", "\\u0000", "\\\\u0000", "😀", "é", "\u202e",
     "\ufeff", "\u2028", "a\u0301", "\U0010ffff", "'; drop table x; --", '"', "$$", "%s",
     ":name"]
)  # fmt: skip


def _walk(value: Any) -> Iterator[tuple[Any, int]]:
    """Every value and dict key inside ``value``, with its depth (iteratively)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        yield item, depth
        if isinstance(item, dict):
            stack.extend((k, depth + 1) for k in item)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def _has_bad_char(value: Any) -> bool:
    """Whether a (JSON-like) value holds NUL or a lone surrogate in any string or key."""
    return any(
        isinstance(item, str) and ("\x00" in item or any(0xD800 <= ord(c) <= 0xDFFF for c in item))
        for item, _ in _walk(value)
    )


def _json_ok(value: Any) -> bool:
    """Whether ``value`` is plain JSON data (what the codec stores without conversion)."""
    for item, _ in _walk(value):
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, dict) and not all(isinstance(k, str) for k in item):
            return False
        if not (item is None or isinstance(item, (bool, int, float, str, list, dict))):
            return False
    return True


def _depth(value: Any) -> int:
    return max(depth for _, depth in _walk(value))


# Deeper than this, encoding may stop at Python's recursion limit: a named refusal.
DEEP = 400


class _Unencodable:
    def __repr__(self) -> str:
        return "<unencodable>"


JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(ANY_CHAR, max_size=12)
    | ODD_TEXT
)
BAD_LEAVES = st.sampled_from(
    [float("nan"), float("inf"), -float("inf"), b"bytes", complex(1, 2), _Unencodable()]
)
PAYLOADS = st.recursive(
    JSON_LEAVES | BAD_LEAVES,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(ANY_CHAR, max_size=8) | ODD_TEXT, children, max_size=4)
    ),
    max_leaves=12,
)


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"k": [value]} if depth % 2 else [value]
    return value


@pytest.fixture
def business(engine: Engine, schema: str) -> str:
    table = f"{quote_schema(schema)}.business"
    execute(engine, f"create table {table} (token text primary key)")
    return table


def _in_caller_transaction(
    engine: Engine, schema: str, business: str, savepoint: bool, call: Any
) -> Iterator[Any]:
    """Run ``call(utils)`` next to a business write; yield its result or raise its error.

    Checks what becomes of the business row: committed with the job, after a refusal
    with a savepoint, after a refusal the client made before sending anything; or, after
    a refusal the server made without a savepoint, the transaction refuses to go on.
    """
    token = secrets.token_hex(8)
    session = Session(engine)
    try:
        session.begin()
        session.execute(text(f"insert into {business} values (:t)"), {"t": token})
        utils = WorkerUtils(session, schema, savepoint=savepoint)
        try:
            result = call(utils)
        except GraphileWorkerError as exc:
            server_side = sqlstate_of(exc.__cause__) is not None if exc.__cause__ else False
            if server_side and not savepoint:
                assert "transaction is aborted" in str(exc)
                with pytest.raises(DBAPIError) as info:
                    session.execute(text("select 1"))
                assert sqlstate_of(info.value) == "25P02"  # in failed SQL transaction
                session.rollback()
                stored = False
            else:
                session.commit()
                stored = True
            assert _business_rows(engine, business, token) == stored
            raise
        session.commit()
        assert _business_rows(engine, business, token)
        yield result
    finally:
        session.close()


def _business_rows(engine: Engine, business: str, token: str) -> bool:
    return bool(execute(engine, f"select 1 from {business} where token = :t", t=token))


def _attempt(engine: Engine, schema: str, business: str, savepoint: bool, call: Any) -> Any:
    return next(iter(_in_caller_transaction(engine, schema, business, savepoint, call)))


def _stored_payload(engine: Engine, schema: str, job_id: int) -> Any:
    # Read back with a fresh utils (no name cache): what the database holds.
    job = WorkerUtils(engine, schema).get_job(job_id)
    assert job is not None
    return job.payload


def _check_payload(
    engine: Engine, schema: str, business: str, payload: Any, savepoint: bool, batch: bool
) -> None:
    def add(utils: WorkerUtils) -> Any:
        if batch:
            (job,) = utils.add_raw_jobs([RawJobSpec("fuzz", payload)])
            return job
        return utils.add_raw_job("fuzz", payload)

    storable = _json_ok(payload) and not _has_bad_char(payload)
    if storable and _depth(payload) > DEEP:
        try:
            job = _attempt(engine, schema, business, savepoint, add)
        except PayloadNotSerializable:
            return
        assert json.dumps(_stored_payload(engine, schema, job.id)) == json.dumps(payload)
    elif storable:
        job = _attempt(engine, schema, business, savepoint, add)
        expected = {} if payload is None else payload
        assert job.payload == expected
        stored = _stored_payload(engine, schema, job.id)
        # Equal as JSON text too: no float or big-integer drift, ints stay ints.
        assert json.dumps(stored, sort_keys=True) == json.dumps(expected, sort_keys=True)
    else:
        with pytest.raises((PayloadNotSerializable, InvalidCharacter)):
            _attempt(engine, schema, business, savepoint, add)


@FUZZ
@given(payload=PAYLOADS, savepoint=st.booleans(), batch=st.booleans())
@example(payload=["\\u0000", {"\\\\u0000": "\\"}], savepoint=False, batch=True)
@example(payload={"a\x00": 1}, savepoint=False, batch=False)
@example(payload={"\ud800": 1}, savepoint=False, batch=True)
def test_payloads_are_stored_exactly_or_refused_by_name(
    engine: Engine, schema: str, business: str, payload: Any, savepoint: bool, batch: bool
) -> None:
    _check_payload(engine, schema, business, payload, savepoint, batch)


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({"x": "é" * 1_000_000}, id="1MB"),
        pytest.param(["😀" * 250_000, 2**70, 1e308, -0.0, 5e-324], id="1MB-mixed"),
        pytest.param(_nested(800), id="nested-800"),
        pytest.param(_nested(1000), id="nested-1000"),
        pytest.param(_nested(5000), id="nested-5000"),
    ],
)
def test_huge_and_deep_payloads(
    engine: Engine, schema: str, business: str, payload: Any, batch: bool
) -> None:
    _check_payload(engine, schema, business, payload, False, batch)


def _boundary_texts(limit: int) -> st.SearchStrategy[str]:
    return st.sampled_from(
        ["x" * limit, "é" * limit, "😀" * limit, "x" * (limit + 1), "😀" * (limit + 1),
         "é" * (limit - 1) + "\x00", "\ud800" * 3, ""]
    )  # fmt: skip


NAMES = st.text(ANY_CHAR, max_size=140) | ODD_TEXT | _boundary_texts(128)
KEYS = st.none() | st.text(ANY_CHAR, max_size=520) | ODD_TEXT | _boundary_texts(512)
SMALLINTS = st.none() | st.sampled_from([-32769, -32768, -1, 0, 1, 32767, 32768, 2**31, -(2**40)])
NUMBERS = SMALLINTS | st.integers(min_value=-(2**33), max_value=2**33)


def _text_ok(value: str, max_chars: int, min_chars: int = 0) -> bool:
    return min_chars <= len(value) <= max_chars and not _has_bad_char(value)


@settings(FUZZ, max_examples=120)
@given(
    identifier=NAMES,
    queue_name=st.none() | NAMES,
    job_key=KEYS,
    priority=NUMBERS,
    max_attempts=NUMBERS,
    savepoint=st.booleans(),
    batch=st.booleans(),
)
def test_specs_are_stored_exactly_or_refused_by_name(
    engine: Engine,
    schema: str,
    business: str,
    identifier: str,
    queue_name: str | None,
    job_key: str | None,
    priority: int | None,
    max_attempts: int | None,
    savepoint: bool,
    batch: bool,
) -> None:
    problems: list[type[GraphileWorkerError]] = []
    texts = [identifier] + [v for v in (queue_name, job_key) if v is not None]
    if any(_has_bad_char(v) for v in texts):
        problems.append(InvalidCharacter)
    else:
        if len(identifier) > 128:
            problems.append(TaskIdentifierTooLong)
        if queue_name is not None and len(queue_name) > 128:
            problems.append(QueueNameTooLong)
        if job_key is not None and not _text_ok(job_key, 512, 1):
            problems.append(InvalidJobKey)
    for number in (priority, max_attempts):
        if number is not None and not -32768 <= number <= 32767:
            problems.append(ValueOutOfRange)
    if max_attempts is not None and -32768 <= max_attempts < 1:
        problems.append(InvalidMaxAttempts)

    def add(utils: WorkerUtils) -> Any:
        # Numbers out of range are refused by JobSpec itself, before anything is sent.
        spec = JobSpec(
            queue_name=queue_name, job_key=job_key, priority=priority, max_attempts=max_attempts
        )
        if batch:
            (job,) = utils.add_raw_jobs([RawJobSpec(identifier, {"n": 1}, spec)])
            return job
        return utils.add_raw_job(identifier, {"n": 1}, spec)

    if not problems:
        job = _attempt(engine, schema, business, savepoint, add)
        stored = WorkerUtils(engine, schema).get_job(job.id)
        assert stored is not None
        for read in (job, stored):
            assert read.task_identifier == identifier
            assert read.queue_name == queue_name
            assert read.key == job_key
            assert read.priority == (0 if priority is None else priority)
            assert read.max_attempts == (25 if max_attempts is None else max_attempts)
        if job_key is not None:
            # Keys are reused across examples: leave none behind for the next one.
            WorkerUtils(engine, schema).remove_job(job_key)
        return
    with pytest.raises(GraphileWorkerError) as info:
        _attempt(engine, schema, business, savepoint, add)
    assert isinstance(info.value, tuple(problems)), (problems, info.value)


HOSTILE = st.sampled_from(
    ['"; drop table sentinel; --', "$$; drop table sentinel; $$", "%(x)s %s %%", ":name",
     "a\x00b", "\ud800", "pg_catalog", "pg_x", "", "😀" * 16, "😀" * 15 + "abc", "x" * 63,
     "x" * 64, "é" * 32, "MixedCase", "select", " ", "a.b", "\\"]
)  # fmt: skip


def _schema_ok(name: str) -> bool:
    return (
        bool(name)
        and not _has_bad_char(name)
        and not name.startswith("pg_")
        and len(name.encode("utf-8")) <= 63
    )


@settings(max_examples=300, deadline=None)
@given(name=HOSTILE | st.text(ANY_CHAR, max_size=70))
def test_schema_names_are_accepted_or_refused_by_name(name: str) -> None:
    if _schema_ok(name):
        assert validate_schema_name(name) == name
        assert quote_schema(name).startswith('"')
    else:
        with pytest.raises(InvalidSchemaName):
            validate_schema_name(name)
        with pytest.raises(InvalidSchemaName):
            WorkerUtils("postgresql://nobody@localhost/none", name)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(name=HOSTILE | st.text(ANY_CHAR, min_size=1, max_size=20))
@example(name="MixedCase")
@example(name="$$x$$")
@example(name="select")
def test_hostile_schema_names_work_end_to_end(engine: Engine, name: str) -> None:
    assume(_schema_ok(name))
    exists = "select count(*) as n from pg_namespace where nspname = :name"
    assume(execute(engine, exists, name=name)[0]["n"] == 0)
    try:
        migrate(engine, schema=name)
        assert execute(engine, exists, name=name)[0]["n"] == 1
        utils = WorkerUtils(engine, name)
        job = utils.add_raw_job("fuzz", {"schema": name}, JobSpec(queue_name=name[:128]))
        assert WorkerUtils(engine, name).get_job(job.id) is not None
        assert utils.complete_jobs([job.id])[0].id == job.id
    finally:
        with engine.connect() as connection:
            # The name reaches DDL as a quoted identifier only (no bind parameter parsing).
            connection.exec_driver_sql(
                f"drop schema if exists {quote_schema(name).replace('%', '%%')} cascade"
            )
            connection.commit()


def test_mixed_case_schema_is_never_folded_into_another(engine: Engine) -> None:
    upper = f"Rel_{secrets.token_hex(3)}"
    lower = upper.lower()
    try:
        migrate(engine, schema=upper)
        migrate(engine, schema=lower)
        job = WorkerUtils(engine, upper).add_raw_job("t", {"where": upper})
        assert [j.id for j in WorkerUtils(engine, upper).list_jobs()] == [job.id]
        assert WorkerUtils(engine, lower).list_jobs() == []
    finally:
        for name in (upper, lower):
            execute(engine, f"drop schema if exists {quote_schema(name)} cascade")
