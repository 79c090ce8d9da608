// A Node graphile-worker@0.18.0 process driven by the Python interop tests.
//
// Usage: node interop.mjs '<json config>'. Config: {connectionString, clockOffsetMs?}.
// Requests arrive on stdin, one JSON object per line: {id, op, ...arguments}. Replies and
// events leave on stdout, one JSON object per line after the "@@ " marker (other output,
// e.g. from libraries, is ignored by the tests): {reply: id, result} or {reply: id, error}
// and {event, name, ...}. Graphile's own logs go to stderr.
//
// Operations:
//   start {name, schema, concurrency, pollInterval, tasks, crontab?}  run() a worker pool
//   runOnce {schema, concurrency, tasks}                              runOnce(), until idle
//   stop {name}                                                       runner.stop()
//   addJob {schema, identifier, payload, spec}                        workerUtils.addJob
//   addJobs {schema, specs, preserveRunAt}                            workerUtils.addJobs
//   query {schema, sql, values}                                       via withPgClient
//   completeJobs | permanentlyFailJobs | rescheduleJobs | forceUnlockWorkers | cleanup
//       {schema, args}                                                workerUtils.<op>(...args)
//   exit                                                              stop everything, exit 0
//
// A task in `tasks` is {log?, sleepMs?, fail?}: it records what it received (the job as
// helpers.job, the queue name from helpers.getQueueName(), database start and end times
// from clock_timestamp()) into the table named by `log`, sleeps (until the pool aborts),
// then throws `fail` if given.

import { EventEmitter } from "node:events";
import { createInterface } from "node:readline";

const config = JSON.parse(process.argv[2] ?? "{}");

if (config.clockOffsetMs) {
  // Cron reads only the process clock: shift it, for simulated minutes.
  const RealDate = Date;
  const offset = Number(config.clockOffsetMs);
  class ShiftedDate extends RealDate {
    constructor(...args) {
      if (args.length === 0) super(RealDate.now() + offset);
      else super(...args);
    }
    static now() {
      return RealDate.now() + offset;
    }
  }
  globalThis.Date = ShiftedDate;
}

const { Logger, makeWorkerUtils, run, runOnce } = await import("graphile-worker");

const logger = new Logger((scope) => (level, message) => {
  process.stderr.write(`[${level}] ${scope.label ?? ""} ${message}\n`);
});

function emit(message) {
  process.stdout.write(`@@ ${JSON.stringify(message)}\n`);
}

const utilsBySchema = new Map();
async function utilsFor(schema) {
  if (!utilsBySchema.has(schema)) {
    utilsBySchema.set(
      schema,
      makeWorkerUtils({ connectionString: config.connectionString, schema, logger }),
    );
  }
  return utilsBySchema.get(schema);
}

function abortableSleep(ms, signal) {
  return new Promise((resolve) => {
    if (!ms) return resolve(false);
    const timer = setTimeout(() => resolve(false), ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve(true);
    });
  });
}

function makeTaskList(tasks) {
  const taskList = {};
  for (const [identifier, behaviour] of Object.entries(tasks ?? {})) {
    taskList[identifier] = async (payload, helpers) => {
      const queueName = await helpers.getQueueName();
      const { log } = behaviour;
      if (log) {
        await helpers.query(
          `insert into ${log} (job_id, attempt, who, task, queue_name, job, started)` +
            " values ($1, $2, 'node', $3, $4, $5::jsonb, clock_timestamp())",
          [
            helpers.job.id,
            helpers.job.attempts,
            helpers.job.task_identifier,
            queueName,
            JSON.stringify({ ...helpers.job, payload }),
          ],
        );
      }
      const aborted = await abortableSleep(behaviour.sleepMs, helpers.abortSignal);
      if (log) {
        await helpers.query(
          `update ${log} set ended = clock_timestamp()` +
            " where job_id = $1 and attempt = $2 and who = 'node' and ended is null",
          [helpers.job.id, helpers.job.attempts],
        );
      }
      if (aborted) throw new Error("aborted by the pool's shutdown");
      if (behaviour.fail) throw new Error(behaviour.fail);
    };
  }
  return taskList;
}

function watch(name, events) {
  events.on("pool:create", ({ workerPool }) => emit({ event: "pool", name, id: workerPool.id }));
  events.on("pool:listen:success", () => emit({ event: "listening", name }));
  events.on("cron:started", ({ start }) =>
    emit({ event: "cronStarted", name, now: Date.now(), start: start.getTime() }),
  );
  events.on("job:error", ({ job, error }) =>
    emit({ event: "jobError", name, id: job.id, message: String(error?.message ?? error) }),
  );
}

function runnerOptions(request, events) {
  return {
    connectionString: config.connectionString,
    schema: request.schema,
    concurrency: request.concurrency ?? 1,
    pollInterval: request.pollInterval ?? 2000,
    taskList: makeTaskList(request.tasks),
    crontab: request.crontab,
    noHandleSignals: true,
    logger,
    events,
  };
}

const runners = new Map();

// JSON has no dates: a spec's runAt arrives as an ISO string and goes on as a Date.
function withDates(spec) {
  return spec.runAt == null ? spec : { ...spec, runAt: new Date(spec.runAt) };
}

const operations = {
  async start(request) {
    const events = new EventEmitter();
    watch(request.name, events);
    let poolId = null;
    events.on("pool:create", ({ workerPool }) => {
      poolId = workerPool.id;
    });
    const runner = await run(runnerOptions(request, events));
    runners.set(request.name, runner);
    runner.promise.then(
      () => emit({ event: "stopped", name: request.name }),
      (error) => emit({ event: "stopped", name: request.name, error: String(error) }),
    );
    return { poolId };
  },
  async runOnce(request) {
    const events = new EventEmitter();
    watch(request.name ?? "once", events);
    let poolId = null;
    events.on("pool:create", ({ workerPool }) => {
      poolId = workerPool.id;
    });
    await runOnce(runnerOptions(request, events));
    return { poolId };
  },
  async stop({ name }) {
    const runner = runners.get(name);
    runners.delete(name);
    if (runner) await runner.stop();
    return null;
  },
  async addJob({ schema, identifier, payload, spec }) {
    return (await utilsFor(schema)).addJob(identifier, payload, withDates(spec ?? {}));
  },
  async addJobs({ schema, specs, preserveRunAt }) {
    return (await utilsFor(schema)).addJobs(specs.map(withDates), preserveRunAt ?? false);
  },
  async query({ schema, sql, values }) {
    const utils = await utilsFor(schema);
    const { rows } = await utils.withPgClient((client) => client.query(sql, values ?? []));
    return rows;
  },
};
for (const name of [
  "completeJobs",
  "permanentlyFailJobs",
  "rescheduleJobs",
  "forceUnlockWorkers",
  "cleanup",
]) {
  operations[name] = async ({ schema, args }) => {
    const result = await (await utilsFor(schema))[name](...(args ?? []));
    return result ?? null;
  };
}

async function shutdown() {
  for (const runner of runners.values()) await runner.stop().catch(() => {});
  runners.clear();
  for (const utils of utilsBySchema.values()) await (await utils).release().catch(() => {});
}

emit({ event: "ready", pid: process.pid });

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  const request = JSON.parse(line);
  if (request.op === "exit") break;
  const operation = operations[request.op];
  // Requests run concurrently; each reply names its request.
  Promise.resolve()
    .then(() => {
      if (!operation) throw new Error(`unknown operation ${request.op}`);
      return operation(request);
    })
    .then(
      (result) => emit({ reply: request.id, result }),
      (error) => emit({ reply: request.id, error: String(error?.stack ?? error) }),
    );
}
await shutdown();
emit({ event: "exited" });
process.exit(0);
