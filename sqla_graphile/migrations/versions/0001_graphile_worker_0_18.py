"""Graphile Worker 0.18: the worker schema at Node's migration 20.

Creates, on an empty database, the schema Node graphile-worker 0.18 ends with after its
migrations 1–20, and records those 20 rows in Graphile's ledger ``<schema>.migrations``
(breaking: 1, 3, 11, 13, 14, 16, 19), announcing each on ``worker:migrate`` as Node does.

A schema Node already migrated is adopted: ledger at 20, nothing is changed; at 18 or
19, migrations 19 (a marker) and 20 (new ``add_job``/``add_jobs`` bodies) are applied;
older ledgers are refused with instructions.

Downgrade drops every Graphile Worker object of the schema, and the schema itself when
nothing else is left in it; it refuses while the schema holds any job.

Revision ID: graphile_worker_0001
Revises:
Create Date: 2026-11-28
"""

from collections.abc import Sequence

from alembic import context, op
from sqlalchemy import exists, insert, select, text
from sqlalchemy.schema import CreateSchema, DropSchema

from sqla_graphile.errors import MigrationError
from sqla_graphile.migrations import (
    BREAKING_MIGRATIONS,
    HIGHEST_KNOWN_MIGRATION,
    check_database,
    current_schema,
    notify_migration,
)
from sqla_graphile.schema import literal_sql, quote_schema, worker_schema

revision: str = "graphile_worker_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("graphile_worker",)
depends_on: str | Sequence[str] | None = None

# Every statement below is a template: "@S" stands for the quoted schema name, which is
# baked into the function bodies exactly as Node bakes it in at migration time.
# NOT NULL constraints carry the names Node's history gives them (PostgreSQL 18 records
# them in pg_constraint; older versions ignore the names).

LEDGER = """
create table if not exists @S.migrations (
  id integer primary key,
  ts timestamptz default now() not null,
  breaking boolean default false not null
)
"""

TABLES = [
    """
create type @S.job_spec as (
  identifier text,
  payload json,
  queue_name text,
  run_at timestamptz,
  max_attempts smallint,
  job_key text,
  priority smallint,
  flags text[]
)
""",
    """
create table @S._private_jobs (
  id bigint generated always as identity
    (sequence name @S.jobs_id_seq1 start with 1 increment by 1 cache 1)
    constraint jobs_id_not_null1 not null,
  job_queue_id integer,
  task_id integer constraint jobs_task_id_not_null not null,
  payload json default '{}'::json constraint jobs_payload_not_null1 not null,
  priority smallint default 0 constraint jobs_priority_not_null1 not null,
  run_at timestamptz default now() constraint jobs_run_at_not_null1 not null,
  attempts smallint default 0 constraint jobs_attempts_not_null1 not null,
  max_attempts smallint default 25 constraint jobs_max_attempts_not_null1 not null,
  last_error text,
  created_at timestamptz default now() constraint jobs_created_at_not_null1 not null,
  updated_at timestamptz default now() constraint jobs_updated_at_not_null1 not null,
  key text,
  locked_at timestamptz,
  locked_by text,
  revision integer default 0 constraint jobs_revision_not_null1 not null,
  flags jsonb,
  is_available boolean generated always as (locked_at is null and attempts < max_attempts) stored
    constraint jobs_is_available_not_null not null,
  constraint jobs_pkey1 primary key (id),
  constraint jobs_key_key1 unique (key),
  constraint jobs_key_check check (length(key) > 0 and length(key) <= 512),
  constraint jobs_max_attempts_check check (max_attempts >= 1)
)
""",
    """
create table @S._private_job_queues (
  id integer generated always as identity
    (sequence name @S.job_queues_id_seq start with 1 increment by 1 cache 1)
    constraint job_queues_id_not_null not null,
  queue_name text constraint job_queues_queue_name_not_null1 not null,
  locked_at timestamptz,
  locked_by text,
  is_available boolean generated always as (locked_at is null) stored
    constraint job_queues_is_available_not_null not null,
  constraint job_queues_pkey1 primary key (id),
  constraint job_queues_queue_name_key unique (queue_name),
  constraint job_queues_queue_name_check check (length(queue_name) <= 128)
)
""",
    """
create table @S._private_tasks (
  id integer generated always as identity
    (sequence name @S.tasks_id_seq start with 1 increment by 1 cache 1)
    constraint tasks_id_not_null not null,
  identifier text constraint tasks_identifier_not_null not null,
  constraint tasks_pkey primary key (id),
  constraint tasks_identifier_key unique (identifier),
  constraint tasks_identifier_check check (length(identifier) <= 128)
)
""",
    """
create table @S._private_known_crontabs (
  identifier text constraint known_crontabs_identifier_not_null not null,
  known_since timestamptz constraint known_crontabs_known_since_not_null not null,
  last_execution timestamptz,
  constraint known_crontabs_pkey primary key (identifier)
)
""",
    """
create index jobs_main_index on @S._private_jobs (priority, run_at)
  include (id, task_id, job_queue_id) where is_available = true
""",
    """
create index jobs_no_queue_index on @S._private_jobs (priority, run_at)
  include (id, task_id) where is_available = true and job_queue_id is null
""",
    "alter table @S._private_jobs enable row level security",
    "alter table @S._private_job_queues enable row level security",
    "alter table @S._private_tasks enable row level security",
    "alter table @S._private_known_crontabs enable row level security",
    """
create view @S.jobs as
  select j.id, q.queue_name, t.identifier as task_identifier, j.priority, j.run_at,
         j.attempts, j.max_attempts, j.last_error, j.created_at, j.updated_at, j.key,
         j.locked_at, j.locked_by, j.revision, j.flags
    from @S._private_jobs as j
    join @S._private_tasks as t on t.id = j.task_id
    left join @S._private_job_queues as q on q.id = j.job_queue_id
""",
]

# The enqueue functions (migration 20's versions: task and queue rows are inserted only
# when missing, so identity values are not consumed on every call).
ADD_JOBS = r"""
create or replace function @S.add_jobs(specs @S.job_spec[], job_key_preserve_run_at boolean default false)
returns setof @S._private_jobs
language plpgsql volatile
as $body$
begin
  -- Register unknown task identifiers and queue names first; the job rows refer to them
  -- by id. A NULL identifier fails here on the NOT NULL constraint, as it should.
  insert into @S._private_tasks (identifier)
    select distinct spec.identifier
      from unnest(specs) as spec
     where not exists (select 1 from @S._private_tasks as t where t.identifier = spec.identifier)
    on conflict do nothing;

  insert into @S._private_job_queues (queue_name)
    select distinct spec.queue_name
      from unnest(specs) as spec
     where spec.queue_name is not null
       and not exists (select 1 from @S._private_job_queues as q where q.queue_name = spec.queue_name)
    on conflict do nothing;

  -- A keyed job that is running or permanently failed cannot be overwritten: it gives up
  -- its key (and any further retry) so that the new job below is inserted beside it.
  update @S._private_jobs as j
     set key = null, attempts = j.max_attempts, updated_at = now()
    from unnest(specs) as spec
   where spec.job_key is not null
     and j.key = spec.job_key
     and j.is_available is not true;

  -- Delivered at commit; "r" keeps identical notifications of one transaction distinct.
  -- An empty or NULL array has no length: the payload is then empty, as with Node's
  -- function (listeners read a payload that is not JSON as one new job).
  perform pg_notify(
    'jobs:insert',
    coalesce('{"r":' || random()::text || ',"count":' || array_length(specs, 1)::text || '}', '')
  );

  return query
    insert into @S._private_jobs as j
      (job_queue_id, task_id, payload, priority, run_at, max_attempts, key, flags)
    select q.id,
           t.id,
           coalesce(spec.payload, '{}'::json),
           coalesce(spec.priority, 0),
           coalesce(spec.run_at, now()),
           coalesce(spec.max_attempts, 25),
           spec.job_key,
           (select jsonb_object_agg(flag, true) from unnest(spec.flags) as flag)
      from unnest(specs) as spec
      join @S._private_tasks as t on t.identifier = spec.identifier
      left join @S._private_job_queues as q on q.queue_name = spec.queue_name
    on conflict (key) do update set
      job_queue_id = excluded.job_queue_id,
      task_id = excluded.task_id,
      payload = case
        when json_typeof(j.payload) = 'array' and json_typeof(excluded.payload) = 'array'
          then (j.payload::jsonb || excluded.payload::jsonb)::json
        else excluded.payload
      end,
      max_attempts = excluded.max_attempts,
      priority = excluded.priority,
      flags = excluded.flags,
      run_at = case
        when job_key_preserve_run_at and j.attempts = 0 then j.run_at
        else excluded.run_at
      end,
      revision = j.revision + 1,
      attempts = 0,
      last_error = null,
      updated_at = now()
    where j.locked_at is null
    returning *;
end;
$body$
"""

ADD_JOB = r"""
create or replace function @S.add_job(
  identifier text,
  payload json default null,
  queue_name text default null,
  run_at timestamptz default null,
  max_attempts integer default null,
  job_key text default null,
  priority integer default null,
  flags text[] default null,
  job_key_mode text default 'replace'
)
returns @S._private_jobs
language plpgsql volatile
as $body$
declare
  added @S._private_jobs;
begin
  if add_job.job_key is null
     or add_job.job_key_mode is null
     or add_job.job_key_mode in ('replace', 'preserve_run_at') then
    -- The common path is add_jobs with a single spec (and its notification).
    select * into added
      from @S.add_jobs(
        array[(
          add_job.identifier,
          add_job.payload,
          add_job.queue_name,
          add_job.run_at,
          add_job.max_attempts::smallint,
          add_job.job_key,
          add_job.priority::smallint,
          add_job.flags
        )::@S.job_spec],
        coalesce(add_job.job_key_mode = 'preserve_run_at', false)
      );
    return added;
  elsif add_job.job_key_mode = 'unsafe_dedupe' then
    insert into @S._private_tasks (identifier)
      select add_job.identifier
       where not exists (select 1 from @S._private_tasks as t where t.identifier = add_job.identifier)
      on conflict do nothing;
    if add_job.queue_name is not null then
      insert into @S._private_job_queues (queue_name)
        select add_job.queue_name
         where not exists (select 1 from @S._private_job_queues as q where q.queue_name = add_job.queue_name)
        on conflict do nothing;
    end if;

    -- Whatever state the existing keyed job is in, it is kept; only its revision moves.
    insert into @S._private_jobs as j
      (job_queue_id, task_id, payload, priority, run_at, max_attempts, key, flags)
    select (select q.id from @S._private_job_queues as q where q.queue_name = add_job.queue_name),
           (select t.id from @S._private_tasks as t where t.identifier = add_job.identifier),
           coalesce(add_job.payload, '{}'::json),
           coalesce(add_job.priority::smallint, 0),
           coalesce(add_job.run_at, now()),
           coalesce(add_job.max_attempts::smallint, 25),
           add_job.job_key,
           (select jsonb_object_agg(flag, true) from unnest(add_job.flags) as flag)
    on conflict (key) do update set
      revision = j.revision + 1,
      updated_at = now()
    returning * into added;

    if added.revision = 0 then
      perform pg_notify('jobs:insert', '{"r":' || random()::text || ',"count":1}');
    end if;
    return added;
  else
    raise exception 'Invalid job_key_mode value, expected ''replace'', ''preserve_run_at'' or ''unsafe_dedupe''.'
      using errcode = 'GWBKM';
  end if;
end;
$body$
"""

OTHER_FUNCTIONS = [
    r"""
create or replace function @S.remove_job(job_key text)
returns @S._private_jobs
language plpgsql volatile strict
as $body$
declare
  removed @S._private_jobs;
begin
  -- A waiting job (or one whose lock is past the 4-hour expiry) is deleted outright.
  delete from @S._private_jobs as j
   where j.key = remove_job.job_key
     and (j.locked_at is null or j.locked_at < now() - interval '4 hours')
  returning * into removed;
  if found then
    perform pg_notify('jobs:insert', '{"r":' || random()::text || ',"count":-1}');
    return removed;
  end if;

  -- A running job finishes, but loses its key and will not be retried.
  update @S._private_jobs as j
     set key = null, attempts = j.max_attempts, updated_at = now()
   where j.key = remove_job.job_key
  returning * into removed;
  return removed;
end;
$body$
""",
    """
create or replace function @S.complete_jobs(job_ids bigint[])
returns setof @S._private_jobs
language sql volatile
as $body$
  delete from @S._private_jobs as j
   where j.id = any(job_ids)
     and (j.locked_at is null or j.locked_at < now() - interval '4 hours')
  returning *;
$body$
""",
    """
create or replace function @S.permanently_fail_jobs(job_ids bigint[], error_message text default null)
returns setof @S._private_jobs
language sql volatile
as $body$
  update @S._private_jobs as j
     set last_error = coalesce(error_message, 'Manually marked as failed'),
         attempts = j.max_attempts,
         updated_at = now()
   where j.id = any(job_ids)
     and (j.locked_at is null or j.locked_at < now() - interval '4 hours')
  returning *;
$body$
""",
    """
create or replace function @S.reschedule_jobs(
  job_ids bigint[],
  run_at timestamptz default null,
  priority integer default null,
  attempts integer default null,
  max_attempts integer default null
)
returns setof @S._private_jobs
language sql volatile
as $body$
  update @S._private_jobs as j
     set run_at = coalesce(reschedule_jobs.run_at, j.run_at),
         priority = coalesce(reschedule_jobs.priority::smallint, j.priority),
         attempts = coalesce(reschedule_jobs.attempts::smallint, j.attempts),
         max_attempts = coalesce(reschedule_jobs.max_attempts::smallint, j.max_attempts),
         updated_at = now()
   where j.id = any(job_ids)
     and (j.locked_at is null or j.locked_at < now() - interval '4 hours')
  returning *;
$body$
""",
    """
create or replace function @S.force_unlock_workers(worker_ids text[])
returns void
language sql volatile
as $body$
  update @S._private_jobs as j
     set locked_at = null, locked_by = null
   where j.locked_by = any(worker_ids);
  update @S._private_job_queues as q
     set locked_at = null, locked_by = null
   where q.locked_by = any(worker_ids);
$body$
""",
]

DROP = [
    "drop function if exists @S.add_job(text, json, text, timestamptz, integer, text, integer, text[], text)",
    "drop function if exists @S.add_jobs(@S.job_spec[], boolean)",
    "drop function if exists @S.remove_job(text)",
    "drop function if exists @S.complete_jobs(bigint[])",
    "drop function if exists @S.permanently_fail_jobs(bigint[], text)",
    "drop function if exists @S.reschedule_jobs(bigint[], timestamptz, integer, integer, integer)",
    "drop function if exists @S.force_unlock_workers(text[])",
    "drop view if exists @S.jobs",
    "drop table if exists @S._private_jobs",
    "drop table if exists @S._private_job_queues",
    "drop table if exists @S._private_tasks",
    "drop table if exists @S._private_known_crontabs",
    "drop type if exists @S.job_spec",
    "drop table if exists @S.migrations",
]


def _dollar_tag(quoted: str) -> str:
    """A dollar-quote tag for function bodies that the schema name cannot close early."""
    tag = "$body$"
    while tag in quoted:
        tag = tag[:-1] + "_$"
    return tag


def _run(statements: Sequence[str], schema: str) -> None:
    quoted = quote_schema(schema)
    tag = _dollar_tag(quoted)
    for statement in statements:
        # Colons are escaped so that text() sees no bind parameters in the SQL bodies.
        sql = statement.replace("$body$", tag).replace("@S", quoted)
        op.execute(text(sql.replace(":", "\\:")))


def _record(numbers: Sequence[int]) -> None:
    """Write ledger rows first, as Node does, then announce them on ``worker:migrate``."""
    ledger = worker_schema(current_schema()).migrations
    for number in numbers:
        op.execute(insert(ledger).values(id=number, breaking=number in BREAKING_MIGRATIONS))
    if not context.is_offline_mode():
        for number in numbers:
            notify_migration(op.get_bind(), number)


def _ensure_schema(schema: str) -> None:
    """Create the schema when it is missing (in an application's history no env does).

    Online, an existing schema is left alone without a CREATE: PostgreSQL checks the
    right to create schemas even for ``IF NOT EXISTS``, and a restricted role may migrate
    a schema that was created for it.
    """
    if context.is_offline_mode():
        op.execute(CreateSchema(schema, if_not_exists=True))
        return
    found = op.get_bind().scalar(
        text("select exists (select 1 from pg_namespace where nspname = :s)"), {"s": schema}
    )
    if not found:
        op.execute(CreateSchema(schema))


def _install(schema: str) -> None:
    _ensure_schema(schema)
    _run([LEDGER], schema)
    _record(range(1, HIGHEST_KNOWN_MIGRATION + 1))
    _run([*TABLES, ADD_JOBS, ADD_JOB, *OTHER_FUNCTIONS], schema)


def upgrade() -> None:
    schema = current_schema()
    if context.is_offline_mode():
        _install(schema)
        return
    ledger = check_database(op.get_bind(), schema)
    if ledger.highest is None:
        _install(schema)
    elif ledger.highest < HIGHEST_KNOWN_MIGRATION:
        # 18 or 19 (older ledgers were refused by check_database): 19 is a marker only,
        # 20 brings the enqueue functions that no longer burn identity values.
        pending = list(range(ledger.highest + 1, HIGHEST_KNOWN_MIGRATION + 1))
        _record(pending)
        _run([ADD_JOBS, ADD_JOB], schema)


# What is left in a schema once the worker's objects are dropped (its relations,
# functions and standalone types), for a schema named by the parameter ``s``.
_LEFTOVERS = (
    "select (select count(*) from pg_class c where c.relnamespace = n.oid)"
    " + (select count(*) from pg_proc p where p.pronamespace = n.oid)"
    " + (select count(*) from pg_type t where t.typnamespace = n.oid and t.typrelid = 0)"
    " from pg_namespace n where n.nspname = :s"
)


def _refusal(schema: str) -> str:
    return (
        f"refusing to drop the worker schema {schema!r}: it still holds jobs; "
        "complete or delete them first"
    )


def downgrade() -> None:
    schema = current_schema()
    if context.is_offline_mode():
        _offline_downgrade(schema)
        return
    bind = op.get_bind()
    has_jobs = bind.scalar(select(exists().select_from(worker_schema(schema).private_jobs)))
    if has_jobs:
        raise MigrationError(_refusal(schema))
    _run(DROP, schema)
    if bind.scalar(text(_LEFTOVERS), {"s": schema}) == 0:
        op.execute(DropSchema(schema))


def _offline_downgrade(schema: str) -> None:
    """The downgrade as a script that checks, when it runs, what a live one checks first.

    No job may be left; the schema is dropped only if nothing else is in it.
    """
    quoted = quote_schema(schema)
    literal = _sql_literal(schema)
    _do(
        f"if exists (select from {quoted}._private_jobs) then"
        f" raise exception {_sql_literal(_refusal(schema))}; end if;",
        quoted,
    )
    _run(DROP, schema)
    leftovers = _LEFTOVERS.replace(":s", literal)
    _do(
        f"if ({leftovers}) = 0 then execute 'drop schema ' || quote_ident({literal}); end if;",
        quoted,
    )


def _do(body: str, quoted: str) -> None:
    """Emit a PL/pgSQL ``DO`` block running ``body``."""
    tag = _dollar_tag(quoted)
    # Colons are escaped so that text() sees no bind parameters.
    op.execute(literal_sql(f"do {tag} begin {body} end {tag}"))


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
