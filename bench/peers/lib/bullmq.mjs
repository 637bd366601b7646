// BullMQ peer: Redis at 127.0.0.1:6379 (override with AGORA_PEER_REDIS=host:port).
// Every key this run creates lives under the prefix `agora_peer_<pid>`, and is
// deleted at the end; leftovers of runs whose process is gone are deleted too.

import { readFileSync } from "node:fs";
import { Queue, Worker } from "bullmq";
import IORedis from "ioredis";
import { log, pidAlive, readConfig, runPeer } from "./common.mjs";

const [host, port] = (process.env.AGORA_PEER_REDIS ?? "127.0.0.1:6379").split(":");
const version = JSON.parse(
  readFileSync(new URL("../node_modules/bullmq/package.json", import.meta.url), "utf8"),
).version;

const NAME = "bullmq";
const prefix = `agora_peer_${process.pid}`;
// BullMQ's own connections: maxRetriesPerRequest null is what BullMQ requires
// for workers (blocking commands); a dead Redis is caught by open() instead.
const connection = { host, port: Number(port), maxRetriesPerRequest: null };

let admin = null; // a plain client for the health check and key cleanup

/** Deletes every key under `keyPrefix:` with SCAN + UNLINK. */
async function deleteKeys(keyPrefix) {
  let cursor = "0";
  do {
    const [next, keys] = await admin.scan(cursor, "MATCH", `${keyPrefix}:*`, "COUNT", 1000);
    if (keys.length) await admin.unlink(...keys);
    cursor = next;
  } while (cursor !== "0");
}

const adapter = {
  name: NAME,
  version,

  async open() {
    // Fail fast (no reconnect loop) if Redis is not there.
    admin = new IORedis({
      host,
      port: Number(port),
      lazyConnect: true,
      connectTimeout: 2000,
      maxRetriesPerRequest: 0,
      retryStrategy: () => null,
    });
    let cause = null; // the socket error, more telling than connect()'s rejection
    admin.on("error", (e) => (cause ??= e));
    try {
      await admin.connect();
      await admin.ping();
    } catch (e) {
      admin.disconnect();
      admin = null;
      throw new Error(`Redis at ${host}:${port} unreachable: ${(cause ?? e).message}`);
    }
    // Leftovers of earlier runs that died before cleaning up.
    const stale = new Set();
    let cursor = "0";
    do {
      const [next, keys] = await admin.scan(cursor, "MATCH", "agora_peer_*", "COUNT", 1000);
      for (const k of keys) {
        const m = /^agora_peer_(\d+):/.exec(k);
        if (m && !pidAlive(Number(m[1]))) stale.add(`agora_peer_${m[1]}`);
      }
      cursor = next;
    } while (cursor !== "0");
    for (const p of stale) {
      log(NAME, `deleting leftover keys ${p}:*`);
      await deleteKeys(p);
    }
  },

  async close() {
    if (!admin) return;
    await deleteKeys(prefix);
    admin.disconnect();
    admin = null;
  },

  async createQueue(label) {
    // Completed jobs are removed, as graphile-worker does (it deletes them),
    // so that both peers leave the same amount of state behind per job.
    const queue = new Queue(label, {
      connection,
      prefix,
      defaultJobOptions: { removeOnComplete: true },
    });
    queue.on("error", (e) => log(NAME, `queue error: ${e.message}`));
    await queue.waitUntilReady();
    return queue;
  },

  async closeQueue(queue) {
    await queue.close();
  },

  async add(queue, payload) {
    await queue.add("noop", payload);
  },

  async addBulk(queue, batch) {
    await queue.addBulk(batch.map((data) => ({ name: "noop", data })));
  },

  async startWorkers(queue, { concurrency, onJob, onComplete }) {
    // One Worker at the given concurrency, BullMQ defaults otherwise.
    const worker = new Worker(
      queue.name,
      async (job) => {
        onJob(job.data);
      },
      { connection, prefix, concurrency },
    );
    // 'completed' is emitted after the job was moved to completed in Redis.
    worker.on("completed", onComplete);
    worker.on("failed", (job, e) => log(NAME, `job ${job?.id} failed: ${e.message}`));
    worker.on("error", (e) => log(NAME, `worker error: ${e.message}`));
    await worker.waitUntilReady();
    return {
      settle: async () => {},
      stop: () => worker.close(),
    };
  },
};

runPeer(adapter, readConfig());
