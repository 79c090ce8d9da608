// Node graphile-worker's side of benchmarks/worker.py.
//
// Usage: node worker.mjs '<json options>'
//   {"connectionString": "...", "schema": "...", "concurrency": 10, "batched": false}
//
// graphile-worker is resolved from the directory named by GRAPHILE_WORKER_NODE_DIR
// (default: tests/node of this repository, where the pinned 0.18.0 is installed).
// It prints {"ready": true, "version": ...}; then, for each line read from stdin:
//   {"cmd": "once"}  runs runOnce() over the jobs already queued (task "noop") and prints
//                    {"seconds": <from the call until it resolved>};
//   {"cmd": "latency", "count": n, "warmup": w}  runs a worker pool, adds w + n jobs of
//                    task "latency" one at a time (addJob's statement, autocommit, on one
//                    client), each awaited until its handler starts, and prints
//                    {"from_commit_ms": [...], "from_call_ms": [...]} for the last n (from
//                    the statement's answer, and from its call, to handler entry).
// It exits at the end of stdin.

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
const { connectionString, schema } = options;
const concurrency = options.concurrency || 10;
const quotedSchema = `"${schema.replace(/"/g, '""')}"`;

const silent = () => () => {};
const logger = new gw.Logger(silent);

// The batching configuration of graphile-worker's own perfTest (see protocol §8).
const batchedPreset = {
  worker: {
    localQueue: { size: 500, refetchDelay: { durationMs: 10 } },
    completeJobBatchDelay: 0,
    failJobBatchDelay: 0,
  },
};

const baseOptions = () => ({
  connectionString,
  schema,
  concurrency,
  logger,
  ...(options.batched ? { preset: batchedPreset } : {}),
});

function elapsedMs(started) {
  return Number(process.hrtime.bigint() - started) / 1e6;
}

async function once() {
  const taskList = { noop: async () => {} };
  const started = process.hrtime.bigint();
  await gw.runOnce(baseOptions(), taskList);
  return { seconds: elapsedMs(started) / 1000 };
}

async function latency(count, warmup) {
  let arrived = null;
  const taskList = {
    latency: async () => {
      const at = process.hrtime.bigint();
      arrived(at);
    },
  };
  const runner = await gw.run({ ...baseOptions(), taskList });
  const utils = await gw.makeWorkerUtils({ connectionString, schema, logger });
  const fromCommit = [];
  const fromCall = [];
  // The statement addJob sends, on one client held throughout (as benchmarks/worker.py
  // does for our side): "committed" is when its answer arrives, nothing more.
  const sql = `select * from ${quotedSchema}.add_job(identifier => 'latency'::text, payload => $1::json)`;
  try {
    await utils.withPgClient(async (client) => {
      for (let i = 0; i < warmup + count; i++) {
        const entered = new Promise((resolve) => {
          arrived = resolve;
        });
        const called = process.hrtime.bigint();
        await client.query(sql, [JSON.stringify({ i })]);
        const committed = process.hrtime.bigint();
        const at = await entered;
        if (i >= warmup) {
          fromCommit.push(Number(at - committed) / 1e6);
          fromCall.push(Number(at - called) / 1e6);
        }
      }
    });
  } finally {
    await utils.release();
    await runner.stop();
  }
  return { from_commit_ms: fromCommit, from_call_ms: fromCall };
}

const write = (message) => process.stdout.write(JSON.stringify(message) + "\n");

write({ ready: true, version });
for await (const line of readline.createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  const command = JSON.parse(line);
  if (command.cmd === "once") {
    write(await once());
  } else if (command.cmd === "latency") {
    write(await latency(command.count, command.warmup));
  } else {
    throw new Error(`unknown command ${command.cmd}`);
  }
}
