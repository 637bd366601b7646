// Shared pieces of the peer benchmark: the child-process protocol, timing
// helpers and the four workloads. The workloads are written once, against a
// small "adapter" interface, so that every peer is measured by the very same
// code path and definitions (which are also the definitions Agora's own
// `agora bench queue` uses for its side of the comparison).
//
// Adapter interface (see bullmq.mjs and graphile.mjs):
//   name, version             strings for the report
//   open()                    connect and check the backing store; throws if down
//   close()                   release everything and drop what open() created
//   createQueue(label)        a fresh, empty queue; returns an opaque handle
//   closeQueue(q)             release a queue handle
//   add(q, payload)           enqueue one job, resolved once the store has it
//   addBulk(q, payloads)      enqueue many jobs with the peer's bulk API
//   startWorkers(q, { concurrency, onJob, onComplete })
//                             start consuming; onJob(payload) is called
//                             synchronously at the start of every handler,
//                             onComplete() once per job the peer reports done.
//                             Returns { settle(), stop() }: settle() resolves
//                             once every job reported done is also recorded
//                             complete in the store (a no-op where the report
//                             already implies it).

import { performance } from "node:perf_hooks";

// Library chatter must never reach stdout: stdout carries exactly one JSON
// line (the result) back to run.mjs.
console.log = console.info = console.debug = (...args) => console.error(...args);

/** Progress line on stderr, tagged with the peer's name. */
export function log(tag, message) {
  process.stderr.write(`[peers] ${tag}: ${message}\n`);
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** A promise together with its resolve/reject functions. */
export function deferred() {
  let resolve, reject;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

/** Rejects with a clear message if `promise` does not settle within `ms`. */
export function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/**
 * Counts events towards a target. `done` resolves (with the time of the last
 * event) when the target is reached, and rejects if no event arrives for
 * `stallMs`, so a dead backend turns into an error instead of a hang.
 */
export function makeCountdown(target, stallMs, what) {
  const d = deferred();
  let count = 0;
  let timer = null;
  const arm = () => {
    clearTimeout(timer);
    timer = setTimeout(
      () => d.reject(new Error(`stalled for ${stallMs} ms at ${count}/${target}: ${what}`)),
      stallMs,
    );
  };
  arm();
  return {
    tick: () => {
      count += 1;
      if (count === target) {
        clearTimeout(timer);
        d.resolve(performance.now());
      } else if (count < target) {
        arm();
      }
    },
    get count() {
      return count;
    },
    done: d.promise,
  };
}

/** Nearest-rank percentile of an ascending array. */
export function percentile(sorted, p) {
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length, Math.max(1, rank)) - 1];
}

const perSecond = (n, ms) => Math.round((n * 1000) / ms);
const round3 = (x) => Math.round(x * 1000) / 1000;

/** Payloads are tiny JSON objects carrying their index. */
const payloads = (from, count) => Array.from({ length: count }, (_, k) => ({ i: from + k }));

/** Enqueue `count` jobs with the bulk API, in batches of `batch` (untimed helper). */
async function fill(adapter, q, count, batch) {
  for (let from = 0; from < count; from += batch) {
    await adapter.addBulk(q, payloads(from, Math.min(batch, count - from)));
  }
}

// How long without any progress before a workload is declared failed.
const STALL_MS = 30_000;

/**
 * e2e: `jobs` no-op jobs are added in bulk first, then workers at
 * `concurrency` drain them. Measured from the first handler start to the
 * moment the last job is recorded complete by the queue.
 */
export async function e2e(adapter, cfg, concurrency) {
  const q = await adapter.createQueue(`e2e_${concurrency}`);
  try {
    await fill(adapter, q, cfg.jobs, cfg.batch);
    let first = null;
    const completed = makeCountdown(cfg.jobs, STALL_MS, `e2e at concurrency ${concurrency}`);
    const workers = await adapter.startWorkers(q, {
      concurrency,
      onJob() {
        if (first === null) first = performance.now();
      },
      onComplete: completed.tick,
    });
    try {
      await completed.done;
      await withTimeout(workers.settle(), STALL_MS, "completions to reach the store");
      const end = performance.now();
      return perSecond(cfg.jobs, end - first);
    } finally {
      await workers.stop();
    }
  } finally {
    await adapter.closeQueue(q);
  }
}

/** A few untimed adds first, so connections are open and scripts/statements prepared. */
const warmupCount = (n) => Math.min(200, Math.max(10, Math.floor(n / 10)));

/** add_single: `single` jobs added one by one, each add awaited before the next. */
export async function addSingle(adapter, cfg) {
  const q = await adapter.createQueue("add_single");
  try {
    for (const p of payloads(-warmupCount(cfg.single), warmupCount(cfg.single))) {
      await adapter.add(q, p);
    }
    const t0 = performance.now();
    for (let i = 0; i < cfg.single; i++) {
      await adapter.add(q, { i });
    }
    return perSecond(cfg.single, performance.now() - t0);
  } finally {
    await adapter.closeQueue(q);
  }
}

/** add_bulk: `jobs` jobs added with the bulk API in batches of `batch`, sequentially. */
export async function addBulk(adapter, cfg) {
  const q = await adapter.createQueue("add_bulk");
  try {
    await adapter.addBulk(q, payloads(-cfg.batch, cfg.batch)); // one warm-up batch
    const t0 = performance.now();
    await fill(adapter, q, cfg.jobs, cfg.batch);
    return perSecond(cfg.jobs, performance.now() - t0);
  } finally {
    await adapter.closeQueue(q);
  }
}

/**
 * latency: workers (concurrency 10) sit idle; one job is added at a time and
 * we measure from just before the add call to the start of its handler, in
 * the same process. The next job is added only after the previous one has
 * started, plus a gap of `gapMs`, so the workers are back to waiting.
 */
export async function latency(adapter, cfg) {
  const q = await adapter.createQueue("latency");
  const waiting = new Map(); // payload index -> deferred resolved with the start time
  try {
    const workers = await adapter.startWorkers(q, {
      concurrency: 10,
      onJob(payload) {
        waiting.get(payload.i)?.resolve(performance.now());
      },
      onComplete() {},
    });
    try {
      await sleep(300); // let the workers settle into their idle wait
      const warmup = Math.min(20, cfg.samples);
      const samples = [];
      for (let i = -warmup; i < cfg.samples; i++) {
        const started = deferred();
        waiting.set(i, started);
        const t0 = performance.now();
        await adapter.add(q, { i });
        const t1 = await withTimeout(started.promise, 10_000, `latency sample ${i} never started`);
        waiting.delete(i);
        if (i >= 0) samples.push(t1 - t0);
        await sleep(cfg.gapMs);
      }
      samples.sort((a, b) => a - b);
      return { p50: round3(percentile(samples, 50)), p99: round3(percentile(samples, 99)) };
    } finally {
      await workers.stop();
    }
  } finally {
    await adapter.closeQueue(q);
  }
}

/** Reads the run configuration that run.mjs passes in AGORA_PEER_CONFIG. */
export function readConfig() {
  const raw = process.env.AGORA_PEER_CONFIG;
  if (!raw) throw new Error("AGORA_PEER_CONFIG is not set; start the benchmark through run.mjs");
  return JSON.parse(raw);
}

/**
 * Runs every workload for one adapter and writes the result as one JSON line
 * on stdout. On failure the line carries `error` (and whatever figures were
 * already measured) and the process exits 1.
 */
export async function runPeer(adapter, cfg) {
  const result = { name: adapter.name, version: adapter.version, node: process.version };
  let cleanedUp = false;
  const cleanup = async () => {
    if (cleanedUp) return;
    cleanedUp = true;
    try {
      await adapter.close();
    } catch (e) {
      log(adapter.name, `cleanup failed: ${e.message}`);
    }
  };
  // An interrupted run still drops its database / Redis keys.
  for (const sig of ["SIGINT", "SIGTERM"]) {
    process.once(sig, () => {
      log(adapter.name, `${sig}: cleaning up`);
      // Dropping the database cuts the peer's own connections; their errors
      // are expected now and must not turn into a crash before cleanup ends.
      process.on("uncaughtException", () => {});
      process.on("unhandledRejection", () => {});
      cleanup().finally(() => process.exit(130));
    });
  }

  let code = 0;
  try {
    await adapter.open();
    for (const c of cfg.concurrencies) {
      log(adapter.name, `e2e: ${cfg.jobs} jobs at concurrency ${c}`);
      result.e2e ??= {};
      result.e2e[String(c)] = await e2e(adapter, cfg, c);
      log(adapter.name, `e2e ${c}: ${result.e2e[String(c)]} jobs/s`);
    }
    log(adapter.name, `add_single: ${cfg.single} jobs`);
    result.add_single = await addSingle(adapter, cfg);
    log(adapter.name, `add_single: ${result.add_single} jobs/s`);
    log(adapter.name, `add_bulk: ${cfg.jobs} jobs in batches of ${cfg.batch}`);
    result.add_bulk = await addBulk(adapter, cfg);
    log(adapter.name, `add_bulk: ${result.add_bulk} jobs/s`);
    log(adapter.name, `latency: ${cfg.samples} samples`);
    result.latency_ms = await latency(adapter, cfg);
    log(adapter.name, `latency: p50 ${result.latency_ms.p50} ms, p99 ${result.latency_ms.p99} ms`);
  } catch (e) {
    result.error = e && e.message ? e.message : String(e);
    log(adapter.name, `failed: ${result.error}`);
    code = 1;
  }
  // Dropping the database (`with (force)`) also cuts connections a library's pool
  // still holds after its own close; their errors come after the figures and must not
  // crash the process before it writes them.
  const ignore = (e) => log(adapter.name, `during cleanup: ${e && e.message ? e.message : e}`);
  process.on("uncaughtException", ignore);
  process.on("unhandledRejection", ignore);
  await cleanup();
  process.stdout.write(JSON.stringify(result) + "\n");
  // Some client libraries keep timers alive; the result is out, so leave.
  process.exit(code);
}

/** True if a process with this pid exists (used to find leftovers of dead runs). */
export function pidAlive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return e.code === "EPERM";
  }
}
