//! `agora bench core`: durable commands per second through the sequencer on each backend,
//! acknowledgement latency at a fixed offered load, replay rate, snapshot cost with a million
//! resting orders, and the disk's own limit (appending the same bytes to a plain file with
//! one fsync per batch), with every figure also given as a ratio to that limit.

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_core::sequencer::{RecoverFrom, Sequencer, SequencerOptions, SubmitError, recover};
use agora_core::{CoreCommand, Output, State, workload};
use book::{MarketId, PlaceOrder, Price, Qty, Side};
use store::{Durability, Snapshot, Store, StoreOptions};

/// Options of a benchmark run.
pub struct BenchOptions {
    /// Commands in the throughput run.
    pub commands: u64,
    /// Concurrent submitters.
    pub submitters: u64,
    /// Offered load of the latency run, commands per second.
    pub offered_per_second: u64,
    /// Length of the latency run.
    pub latency_run: Duration,
    /// Resting orders in the snapshot run.
    pub snapshot_orders: u64,
    /// PostgreSQL server to measure too (in a fresh schema named after the process).
    pub postgres_url: Option<String>,
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q) as usize]
}

struct BackendFigures {
    name: String,
    commands_per_second: f64,
    mean_batch: f64,
    p50: Duration,
    p99: Duration,
    achieved_per_second: f64,
    replay_per_second: f64,
    recovery_time: Duration,
    hash_time: Duration,
}

async fn run_backend(
    name: &str,
    url: &str,
    store_options: StoreOptions,
    options: &BenchOptions,
) -> anyhow::Result<BackendFigures> {
    let store = Arc::new(Store::open(url, &store_options).await?);
    let sequencer_options = SequencerOptions {
        snapshot_every_commands: 0,
        ..SequencerOptions::default()
    };
    let (sequencer, tasks, _) = Sequencer::start(store.clone(), sequencer_options.clone()).await?;
    for command in workload::setup(options.submitters) {
        sequencer.submit(command).await?;
    }
    let batches_before = store.tail().batch;

    // Throughput: every submitter waits for each acknowledgement before its next command.
    let per_submitter = options.commands / options.submitters;
    let started = Instant::now();
    let mut handles = Vec::new();
    for user in 1..=options.submitters {
        let sequencer = sequencer.clone();
        handles.push(tokio::spawn(async move {
            for n in 0..per_submitter {
                match sequencer.submit(workload::place_cancel(user, n)).await {
                    Ok(_) | Err(SubmitError::Rejected(_)) => {}
                    Err(error) => return Err(error),
                }
            }
            Ok(())
        }));
    }
    for handle in handles {
        handle.await??;
    }
    let elapsed = started.elapsed();
    let done = per_submitter * options.submitters;
    let batches = store.tail().batch - batches_before;

    // Latency at a fixed offered load: commands are sent on a schedule, whatever the answers.
    let interval = Duration::from_secs_f64(1.0 / options.offered_per_second as f64);
    let total = (options.latency_run.as_secs_f64() * options.offered_per_second as f64) as u64;
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
    let start = tokio::time::Instant::now();
    for i in 0..total {
        let due = start + interval.mul_f64(i as f64);
        if due > tokio::time::Instant::now() {
            tokio::time::sleep_until(due).await;
        }
        let sequencer = sequencer.clone();
        let sender = sender.clone();
        let user = 1 + i % options.submitters;
        let command = workload::place_cancel(user, (1 << 30) + i / options.submitters);
        tokio::spawn(async move {
            let result = sequencer.submit(command).await;
            let _ = sender.send((
                due.elapsed(),
                result.is_ok() || matches!(result, Err(SubmitError::Rejected(_))),
            ));
        });
    }
    drop(sender);
    let mut latencies = Vec::with_capacity(total as usize);
    while let Some((latency, ok)) = receiver.recv().await {
        anyhow::ensure!(ok, "a command failed during the latency run");
        latencies.push(latency);
    }
    let achieved = total as f64 / start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    drop(sequencer);
    tasks.join().await;

    // Replay: recovery from the first command. Recovery ends by hashing the whole state, a cost
    // proportional to the state rather than to the journal; it is timed apart.
    let replay_started = Instant::now();
    let (state, recovery) = recover(&store, RecoverFrom::Zero).await?;
    let recovery_time = replay_started.elapsed();
    let hash_started = Instant::now();
    let _ = state.state_hash();
    let hash_time = hash_started.elapsed();
    let replay_per_second =
        recovery.replayed_commands as f64 / recovery_time.saturating_sub(hash_time).as_secs_f64();
    store.close().await;

    Ok(BackendFigures {
        name: name.to_string(),
        commands_per_second: done as f64 / elapsed.as_secs_f64(),
        mean_batch: done as f64 / batches.max(1) as f64,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        achieved_per_second: achieved,
        replay_per_second,
        recovery_time,
        hash_time,
    })
}

/// The disk's limit: appending the same bytes, batch by batch, to a plain file with one
/// fsync (fdatasync) per batch. Returns commands per second at the given mean batch size.
fn raw_file_limit(
    dir: &std::path::Path,
    batch_commands: usize,
    seconds: f64,
) -> anyhow::Result<(f64, f64)> {
    let mut payload = Vec::new();
    for n in 0..batch_commands as u64 {
        agora_core::codec::encode(&workload::place_cancel(1, n), &mut payload);
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("raw.log"))?;
    let started = Instant::now();
    let mut batches = 0u64;
    while started.elapsed().as_secs_f64() < seconds {
        file.write_all(&payload)?;
        file.sync_data()?;
        batches += 1;
    }
    let per_batch = started.elapsed().as_secs_f64() / batches as f64;
    Ok((batch_commands as f64 / per_batch, 1.0 / per_batch))
}

/// Builds a core with `orders` resting orders and times its snapshot both ways and through the
/// store.
async fn snapshot_figures(dir: &std::path::Path, orders: u64) -> anyhow::Result<Vec<String>> {
    let mut state = State::new();
    let mut out = Output::default();
    // Enough users that none holds more live orders than the core allows one user; buys rest
    // below the mid and sells above it, so nothing crosses.
    let per_user = u64::from(agora_core::limits::OPEN_ORDERS_PER_USER_MAX) / 2;
    let users = orders.div_ceil(per_user).max(2);
    for command in workload::setup(users) {
        state
            .apply(&command, &mut out)
            .map_err(|e| anyhow::anyhow!("setup refused: {}", e.code()))?;
    }
    for n in 0..orders {
        out.clear();
        let side = if n.is_multiple_of(2) {
            Side::Buy
        } else {
            Side::Sell
        };
        let offset = 1 + (n / 2 % 10_000) as i64;
        let price = if side == Side::Buy {
            1_000_000 - offset
        } else {
            1_000_000 + offset
        };
        let command = CoreCommand::Place(PlaceOrder::limit(
            MarketId(0),
            n + 1,
            1 + n % users,
            side,
            Price(price),
            Qty(1),
        ));
        state
            .apply(&command, &mut out)
            .map_err(|e| anyhow::anyhow!("order refused: {}", e.code()))?;
    }
    let started = Instant::now();
    let bytes = state.snapshot();
    let encode = started.elapsed();
    let started = Instant::now();
    let hash = state.state_hash();
    let hashing = started.elapsed();
    let started = Instant::now();
    let restored = State::restore(&bytes)?;
    let decode = started.elapsed();
    anyhow::ensure!(
        restored.state_hash() == hash,
        "the restored snapshot differs"
    );
    let store = Store::open(
        &format!("sqlite://{}/snapshot.db", dir.display()),
        &StoreOptions::default(),
    )
    .await?;
    let started = Instant::now();
    store
        .put_snapshot(
            &Snapshot {
                seq: 1,
                state_hash: hash,
                payload: bytes.clone(),
            },
            0,
        )
        .await?;
    let write = started.elapsed();
    let started = Instant::now();
    let (loaded, _) = store.latest_valid_snapshot().await?;
    let read = started.elapsed();
    anyhow::ensure!(
        loaded.is_some_and(|s| s.payload.len() == bytes.len()),
        "the stored snapshot differs"
    );
    Ok(vec![
        format!(
            "snapshot of {orders} resting orders: {:.1} MB",
            bytes.len() as f64 / 1e6
        ),
        format!("  encode {encode:.2?}, state hash {hashing:.2?}, restore and verify {decode:.2?}"),
        format!("  SQLite write {write:.2?}, read and checksum {read:.2?}"),
    ])
}

/// Runs the whole benchmark and prints its report.
pub async fn run(options: BenchOptions) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut figures = Vec::new();
    for (name, durability) in [
        ("sqlite (synchronous=FULL)", Durability::Full),
        ("sqlite (synchronous=NORMAL)", Durability::Normal),
    ] {
        let url = format!(
            "sqlite://{}/{}.db",
            dir.path().display(),
            if durability == Durability::Full {
                "full"
            } else {
                "normal"
            }
        );
        eprintln!("measuring {name}…");
        let store_options = StoreOptions {
            durability,
            ..StoreOptions::default()
        };
        figures.push(run_backend(name, &url, store_options, &options).await?);
    }
    if let Some(url) = &options.postgres_url {
        eprintln!("measuring postgres…");
        let schema = format!("agora_bench_{}", std::process::id());
        let store_options = StoreOptions {
            pg_schema: Some(schema.clone()),
            ..StoreOptions::default()
        };
        figures.push(run_backend("postgres", url, store_options, &options).await?);
    }
    let mean_batch = figures.first().map_or(1.0, |f| f.mean_batch.max(1.0));
    let (raw_commands, raw_fsyncs) = raw_file_limit(dir.path(), mean_batch.round() as usize, 2.0)?;

    println!();
    println!(
        "Core benchmark: {} commands from {} submitters (place/cancel mix); latency at {} commands/s offered for {:?}.",
        options.commands, options.submitters, options.offered_per_second, options.latency_run
    );
    println!(
        "Disk limit: a plain file, same bytes, one fsync per batch of {mean_batch:.0} commands: {raw_fsyncs:.0} fsyncs/s = {raw_commands:.0} commands/s."
    );
    println!();
    println!(
        "| backend | durable commands/s | ÷ disk limit | mean batch | ack p50 | ack p99 | offered load achieved | replay commands/s | recovery (final state hash) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for f in &figures {
        println!(
            "| {} | {:.0} | {:.2} | {:.0} | {:.2?} | {:.2?} | {:.0}/s | {:.0} | {:.2?} ({:.2?}) |",
            f.name,
            f.commands_per_second,
            f.commands_per_second / raw_commands,
            f.mean_batch,
            f.p50,
            f.p99,
            f.achieved_per_second,
            f.replay_per_second,
            f.recovery_time,
            f.hash_time
        );
    }
    println!();
    for line in snapshot_figures(dir.path(), options.snapshot_orders).await? {
        println!("{line}");
    }
    Ok(())
}
