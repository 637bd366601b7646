//! `agora bench queue`: the job queue on each backend (SQLite with both durability settings,
//! PostgreSQL when given) and, in the same run, the peers BullMQ and graphile-worker on the
//! same workloads through `bench/peers/run.sh`, with Agora's ratio to each.
//!
//! The workloads are those of `bench/peers/README.md`: `e2e` (no-op jobs added in bulk, then
//! drained by workers at concurrency 10 and 50, timed from the first handler start to the
//! last completion written), `add_single` (one add at a time, each awaited), `add_bulk`
//! (batches of 1,000) and `latency` (idle workers; add-to-start time of one job at a time).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use queue::worker::{JobContext, Worker, WorkerOptions};
use queue::{EventKind, JobOptions, JobRetention, JobSpec, Queue};
use store::{Durability, Store, StoreOptions};
use tokio::sync::{broadcast, mpsc};

/// Options of a queue benchmark run.
pub struct QueueBenchOptions {
    /// Jobs in the end-to-end and bulk-add runs.
    pub jobs: u64,
    /// Jobs in the one-by-one add run.
    pub single: u64,
    /// Samples of the latency run.
    pub samples: u64,
    /// PostgreSQL server to measure too (in a fresh schema named after the process).
    pub postgres_url: Option<String>,
    /// Run the peers through this script (`bench/peers/run.sh`), if given.
    pub peers_script: Option<std::path::PathBuf>,
}

const BULK_BATCH: usize = 1_000;

#[derive(Clone, Debug, Default)]
struct Figures {
    name: String,
    e2e_10: f64,
    e2e_50: f64,
    add_single: f64,
    add_bulk: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// A no-op job, deleted as it completes: the peers are measured so too (BullMQ with
/// `removeOnComplete: true`; graphile-worker always deletes completed jobs).
fn noop(i: u64) -> JobSpec {
    JobSpec::new("bench", "noop", serde_json::json!({ "i": i })).with(JobOptions {
        retention: JobRetention {
            completed_for_ms: Some(0),
            failed_for_ms: None,
        },
        ..JobOptions::default()
    })
}

/// The workloads, each run on a fresh store (a SQLite file or a PostgreSQL schema of its own).
const WORKLOADS: [&str; 5] = ["e2e10", "e2e50", "single", "bulk", "latency"];

/// Drops the PostgreSQL schemas the workloads made under `base`, so that a run leaves nothing
/// behind in the database it was given.
async fn drop_schemas(url: &str, base: &str) -> anyhow::Result<()> {
    use sqlx::Connection;
    let mut connection = sqlx::PgConnection::connect(url).await?;
    for label in WORKLOADS {
        // The names are the benchmark's own: a prefix, a process id and a workload label.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {base}_{label} CASCADE"
        )))
        .execute(&mut connection)
        .await?;
    }
    connection.close().await?;
    Ok(())
}

async fn fresh_queue(url: &str, options: &StoreOptions, label: &str) -> anyhow::Result<Queue> {
    let mut options = options.clone();
    if let Some(schema) = &options.pg_schema {
        options.pg_schema = Some(format!("{schema}_{label}"));
    }
    let url = match url.strip_prefix("sqlite://") {
        Some(path) => format!("sqlite://{path}.{label}.db"),
        None => url.to_string(),
    };
    let store = Arc::new(Store::open(&url, &options).await?);
    let queue = Queue::new(store);
    queue.declare("bench").await?;
    Ok(queue)
}

async fn fill(queue: &Queue, jobs: u64) -> anyhow::Result<()> {
    let mut from = 0;
    while from < jobs {
        let batch: Vec<JobSpec> = (from..jobs.min(from + BULK_BATCH as u64))
            .map(noop)
            .collect();
        queue.add_bulk(&batch).await?;
        from += batch.len() as u64;
    }
    Ok(())
}

/// Jobs a benchmark worker holds claimed ahead of its running ones.
const BENCH_PREFETCH: usize = 500;

fn worker_options(concurrency: usize) -> WorkerOptions {
    WorkerOptions {
        name: "bench".into(),
        concurrency,
        poll_ms: 1_000,
        stalled_check_ms: 60_000,
        // Tuned as graphile-worker's tuned run is (a local queue of 500 jobs); the default
        // of 50 trades throughput for fairness between workers and priorities.
        prefetch: BENCH_PREFETCH,
        ..WorkerOptions::default()
    }
}

async fn e2e(queue: &Queue, jobs: u64, concurrency: usize) -> anyhow::Result<f64> {
    fill(queue, jobs).await?;
    let mut events = queue.subscribe();
    let first_start = Arc::new(std::sync::OnceLock::<Instant>::new());
    let seen = first_start.clone();
    let worker = Worker::new(queue.clone(), "bench", worker_options(concurrency))
        .handle("noop", move |_ctx: JobContext| {
            let seen = seen.clone();
            async move {
                seen.get_or_init(Instant::now);
                Ok(None)
            }
        })
        .start()
        .await?;
    // Done when every job is recorded completed: counted from the queue's events, which
    // are published once a completion has committed (polling the table would load the
    // store it measures). A lagging stream falls back to counting rows.
    let mut completed = 0u64;
    while completed < jobs {
        match events.recv().await {
            Ok(event) if event.event == EventKind::Completed => completed += 1,
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => {
                completed = queue
                    .counts("bench")
                    .await?
                    .iter()
                    .filter(|c| c.state == "completed")
                    .map(|c| c.jobs)
                    .sum();
            }
            Err(broadcast::error::RecvError::Closed) => anyhow::bail!("the event stream closed"),
        }
    }
    let elapsed = first_start.get().map_or(Duration::ZERO, |t| t.elapsed());
    worker.shutdown().await?;
    Ok(jobs as f64 / elapsed.as_secs_f64())
}

async fn add_single(queue: &Queue, jobs: u64) -> anyhow::Result<f64> {
    queue.add(noop(0)).await?; // warm-up
    let started = Instant::now();
    for i in 0..jobs {
        queue.add(noop(i)).await?;
    }
    Ok(jobs as f64 / started.elapsed().as_secs_f64())
}

async fn add_bulk(queue: &Queue, jobs: u64) -> anyhow::Result<f64> {
    queue.add(noop(0)).await?; // warm-up
    let started = Instant::now();
    fill(queue, jobs).await?;
    Ok(jobs as f64 / started.elapsed().as_secs_f64())
}

/// Add-to-start latency with idle workers: one job at a time, the next once the previous has
/// started and 3 ms have passed.
async fn latency(queue: &Queue, samples: u64) -> anyhow::Result<(f64, f64)> {
    let origin = Instant::now();
    let (started_tx, mut started_rx) = mpsc::unbounded_channel::<(u64, u64)>();
    let worker = Worker::new(queue.clone(), "bench", worker_options(10))
        .handle("noop", move |ctx: JobContext| {
            let started_tx = started_tx.clone();
            async move {
                let at = origin.elapsed().as_nanos() as u64;
                let i = ctx.job.payload["i"].as_u64().unwrap_or(0);
                let _ = started_tx.send((i, at));
                Ok(None)
            }
        })
        .start()
        .await?;
    let sent = Arc::new(AtomicU64::new(0));
    let mut latencies = Vec::with_capacity(samples as usize);
    for i in 0..samples + 3 {
        tokio::time::sleep(Duration::from_millis(3)).await;
        let before = origin.elapsed().as_nanos() as u64;
        sent.store(before, Ordering::Relaxed);
        queue.add(noop(i)).await?;
        let (seen, at) = started_rx
            .recv()
            .await
            .ok_or_else(|| anyhow::anyhow!("the worker stopped"))?;
        anyhow::ensure!(seen == i, "job {seen} started while waiting for {i}");
        if i >= 3 {
            latencies.push(at.saturating_sub(before));
        }
    }
    worker.shutdown().await?;
    latencies.sort_unstable();
    let pick = |q: f64| {
        let rank = ((q * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len());
        latencies[rank - 1] as f64 / 1e6
    };
    Ok((pick(0.50), pick(0.99)))
}

async fn run_backend(
    name: &str,
    url: &str,
    options: &StoreOptions,
    bench: &QueueBenchOptions,
) -> anyhow::Result<Figures> {
    eprintln!("measuring {name}…");
    let [e2e10_at, e2e50_at, single_at, bulk_at, latency_at] = WORKLOADS;
    let e2e_10 = e2e(&fresh_queue(url, options, e2e10_at).await?, bench.jobs, 10).await?;
    let e2e_50 = e2e(&fresh_queue(url, options, e2e50_at).await?, bench.jobs, 50).await?;
    let single = add_single(&fresh_queue(url, options, single_at).await?, bench.single).await?;
    let bulk = add_bulk(&fresh_queue(url, options, bulk_at).await?, bench.jobs).await?;
    let (p50_ms, p99_ms) =
        latency(&fresh_queue(url, options, latency_at).await?, bench.samples).await?;
    Ok(Figures {
        name: name.to_string(),
        e2e_10,
        e2e_50,
        add_single: single,
        add_bulk: bulk,
        p50_ms,
        p99_ms,
    })
}

fn peers(script: &Path, bench: &QueueBenchOptions) -> anyhow::Result<Vec<Figures>> {
    eprintln!("measuring the peers with {}…", script.display());
    let output = std::process::Command::new("bash")
        .arg(script)
        .args(["--jobs", &bench.jobs.to_string()])
        .args(["--single", &bench.single.to_string()])
        .args(["--samples", &bench.samples.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "the peer benchmark failed: {}",
        output.status
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let mut figures = Vec::new();
    for peer in report["peers"].as_array().into_iter().flatten() {
        let name = peer["name"].as_str().unwrap_or("?").to_string();
        if let Some(error) = peer["error"].as_str() {
            eprintln!("peer {name} failed: {error}");
            continue;
        }
        let number = |value: &serde_json::Value| value.as_f64().unwrap_or(0.0);
        figures.push(Figures {
            name: format!("{name} {}", peer["version"].as_str().unwrap_or("")),
            e2e_10: number(&peer["e2e"]["10"]),
            e2e_50: number(&peer["e2e"]["50"]),
            add_single: number(&peer["add_single"]),
            add_bulk: number(&peer["add_bulk"]),
            p50_ms: number(&peer["latency_ms"]["p50"]),
            p99_ms: number(&peer["latency_ms"]["p99"]),
        });
    }
    Ok(figures)
}

/// Runs the whole benchmark and prints its report.
pub async fn run(bench: QueueBenchOptions) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut ours = Vec::new();
    for (name, durability) in [
        (
            "agora sqlite (synchronous=NORMAL: survives kill -9)",
            Durability::Normal,
        ),
        (
            "agora sqlite (synchronous=FULL: survives power loss)",
            Durability::Full,
        ),
    ] {
        let url = format!("sqlite://{}/queue-{durability:?}", dir.path().display());
        let options = StoreOptions {
            durability,
            ..StoreOptions::default()
        };
        ours.push(run_backend(name, &url, &options, &bench).await?);
    }
    if let Some(url) = &bench.postgres_url {
        let base = format!("agora_qbench_{}", std::process::id());
        let options = StoreOptions {
            pg_schema: Some(base.clone()),
            ..StoreOptions::default()
        };
        let figures = run_backend("agora postgres (fsync on)", url, &options, &bench).await;
        if let Err(error) = drop_schemas(url, &base).await {
            eprintln!("the benchmark's schemas ({base}_*) could not be dropped: {error}");
        }
        ours.push(figures?);
    }
    let theirs = match &bench.peers_script {
        Some(script) => peers(script, &bench)?,
        None => Vec::new(),
    };

    println!();
    println!(
        "Queue benchmark: {} no-op jobs end to end, {} single adds, {} bulk adds in batches of {BULK_BATCH}, {} latency samples.",
        bench.jobs, bench.single, bench.jobs, bench.samples
    );
    println!();
    println!(
        "| queue | e2e c10 jobs/s | e2e c50 jobs/s | single adds/s | bulk adds/s | add-to-start p50 | p99 |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for f in ours.iter().chain(&theirs) {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} ms | {:.2} ms |",
            f.name, f.e2e_10, f.e2e_50, f.add_single, f.add_bulk, f.p50_ms, f.p99_ms
        );
    }
    if !theirs.is_empty() {
        println!();
        println!("Agora ÷ peer (higher is better for Agora; latency as peer ÷ Agora):");
        println!();
        println!(
            "| agora backend | peer | e2e c10 | e2e c50 | single adds | bulk adds | p50 latency |"
        );
        println!("|---|---|---:|---:|---:|---:|---:|");
        for a in &ours {
            for p in &theirs {
                let ratio = |x: f64, y: f64| if y > 0.0 { x / y } else { f64::NAN };
                println!(
                    "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                    a.name,
                    p.name,
                    ratio(a.e2e_10, p.e2e_10),
                    ratio(a.e2e_50, p.e2e_50),
                    ratio(a.add_single, p.add_single),
                    ratio(a.add_bulk, p.add_bulk),
                    ratio(p.p50_ms, a.p50_ms),
                );
            }
        }
    }
    Ok(())
}
