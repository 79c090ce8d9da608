// Node graphile-worker's side of benchmarks/enqueue.py.
//
// Usage: node enqueue.mjs '<json options>'
//   {"connectionString": "...", "schema": "...",
//    "mode": "add_jobs" | "add_jobs_sql" | "add_job" | "add_job_tx", "batch": 1000}
//
// "add_jobs_sql" is a Node user's fastest bulk add: the add_jobs SQL function called
// directly, counting the rows instead of reading them, one autocommit statement a batch.
//
// graphile-worker is resolved from the directory named by GRAPHILE_WORKER_NODE_DIR
// (default: tests/node of this repository, where the pinned 0.18.0 is installed).
// Once its WorkerUtils is ready it prints {"ready": true, "version": ...}; then, for each
// line {"start": i, "count": n} read from stdin, it adds n jobs and prints
// {"seconds": <the timed part>}. It releases its pool and exits at the end of stdin.

import { createRequire } from "node:module";
import path from "node:path";
import readline from "node:readline";
import { fileURLToPath, pathToFileURL } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const nodeDir = process.env.GRAPHILE_WORKER_NODE_DIR || path.join(here, "..", "..", "tests", "node");
const require = createRequire(path.join(path.resolve(nodeDir), "package.json"));
const entry = require.resolve("graphile-worker");
const gw = await import(pathToFileURL(entry).href);
const { version } = await import(pathToFileURL(path.join(path.dirname(entry), "version.js")).href);

const options = JSON.parse(process.argv[2]);
const { connectionString, schema, mode } = options;
const batch = options.batch || 1000;
const quotedSchema = `"${schema.replace(/"/g, '""')}"`;

// The statement Node's own addJob sends, used for adds inside an open transaction
// (Node's WorkerUtils has no transaction-bound addJob).
const addJobSql = `
        select * from ${quotedSchema}.add_job(
          identifier => $1::text,
          payload => $2::json,
          queue_name => $3::text,
          run_at => $4::timestamptz,
          max_attempts => $5::int,
          job_key => $6::text,
          priority => $7::int,
          flags => $8::text[],
          job_key_mode => $9::text
        );
        `;

// The bare add_jobs call, counting what it added.
const addJobsSql = `
        select count(*) from ${quotedSchema}.add_jobs(
          array(select json_populate_recordset(null::${quotedSchema}.job_spec, $1::json))
        );
        `;

const payload = (i) => ({ i, to: `user${i}@example.com`, subject: "Welcome" });

const silent = () => () => {};
const logger = new gw.Logger(silent);
const utils = await gw.makeWorkerUtils({ connectionString, schema, logger });

// Each function adds n jobs numbered from start and returns the seconds its timed part took.

async function addJobs(start, n) {
  const started = process.hrtime.bigint();
  for (let offset = 0; offset < n; offset += batch) {
    const specs = [];
    for (let i = start + offset; i < start + Math.min(n, offset + batch); i++) {
      specs.push({ identifier: "bench_task", payload: payload(i) });
    }
    await utils.addJobs(specs);
  }
  return elapsed(started);
}

async function addJobsBareSql(start, n) {
  return utils.withPgClient(async (client) => {
    const started = process.hrtime.bigint();
    for (let offset = 0; offset < n; offset += batch) {
      const specs = [];
      for (let i = start + offset; i < start + Math.min(n, offset + batch); i++) {
        specs.push({ identifier: "bench_task", payload: payload(i) });
      }
      await client.query(addJobsSql, [JSON.stringify(specs)]);
    }
    return elapsed(started);
  });
}

async function addJob(start, n) {
  const started = process.hrtime.bigint();
  for (let i = start; i < start + n; i++) {
    await utils.addJob("bench_task", payload(i));
  }
  return elapsed(started);
}

// Adds inside a transaction already open; BEGIN and COMMIT are not timed.
async function addJobInTransaction(start, n) {
  return utils.withPgClient(async (client) => {
    await client.query("begin");
    const started = process.hrtime.bigint();
    for (let i = start; i < start + n; i++) {
      const values = ["bench_task", JSON.stringify(payload(i)), null, null, null, null, null, null, null];
      await client.query(addJobSql, values);
    }
    const seconds = elapsed(started);
    await client.query("commit");
    return seconds;
  });
}

function elapsed(started) {
  return Number(process.hrtime.bigint() - started) / 1e9;
}

const run = {
  add_jobs: addJobs,
  add_jobs_sql: addJobsBareSql,
  add_job: addJob,
  add_job_tx: addJobInTransaction,
}[mode];
if (!run) {
  throw new Error(`unknown mode ${mode}`);
}

const write = (message) => process.stdout.write(JSON.stringify(message) + "\n");

try {
  write({ ready: true, version });
  for await (const line of readline.createInterface({ input: process.stdin })) {
    if (line.trim()) {
      const { start, count } = JSON.parse(line);
      write({ seconds: await run(start, count) });
    }
  }
} finally {
  await utils.release();
}
