//! The projector's cost: the place/cancel mix of `agora bench core`, appended to a SQLite
//! store in a temporary directory in journal batches of the size the server's group commit
//! makes under REST load, and projected into the read models a step at a time, each step
//! covering as many batches as gather while the server's projector pauses. Only the steps
//! are timed: wall time, and the process's CPU time (the projector and the read models'
//! SQLite thread). It runs with the binary's allocator (mimalloc, which SQLite's allocations
//! go through too) and without transparent huge pages, as `agora` does. Run with
//! `cargo bench -p cli --bench project`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agora_core::projector::Projector;
use agora_core::{codec, workload};

const USERS: u64 = 2_048;
const COMMANDS: u64 = 200_000;
/// Commands per journal batch: the server's group commit under `agora bench api`.
const BATCH: usize = 45;
/// Journal batches per projection step: about 25 ms of that load.
const BATCHES_PER_STEP: usize = 14;
/// Rounds, unless `AGORA_PROJECT_ROUNDS` says otherwise.
const ROUNDS: usize = 3;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    cli::without_transparent_huge_pages();
    let mut commands = workload::setup(USERS);
    for n in 0..COMMANDS / USERS {
        for user in 1..=USERS {
            commands.push(workload::place_cancel(user, n));
        }
    }
    let batches: Vec<(u64, Vec<u8>)> = commands
        .chunks(BATCH)
        .map(|chunk| {
            let mut payload = Vec::new();
            for command in chunk {
                codec::encode(command, &mut payload);
            }
            (chunk.len() as u64, payload)
        })
        .collect();
    let rounds = std::env::var("AGORA_PROJECT_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(ROUNDS)
        .max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let total = commands.len() as f64;
    let mut rates = Vec::new();
    let mut cpu_per_command = Vec::new();
    let mut file_bytes = 0;
    for _ in 0..rounds {
        let (wall, cpu, bytes) = runtime.block_on(project_round(&batches));
        rates.push(total / wall.as_secs_f64());
        cpu_per_command.push(cpu.as_secs_f64() * 1e6 / total);
        file_bytes = bytes;
    }
    rates.sort_by(f64::total_cmp);
    cpu_per_command.sort_by(f64::total_cmp);
    println!(
        "project into SQLite: median {:.0} commands/s (min {:.0}, max {:.0}), CPU median {:.2} µs a command (min {:.2}, max {:.2}) over {rounds} rounds of {total}; read models {:.1} MB",
        rates[rounds / 2],
        rates[0],
        rates[rounds - 1],
        cpu_per_command[rounds / 2],
        cpu_per_command[0],
        cpu_per_command[rounds - 1],
        file_bytes as f64 / 1e6,
    );
}

/// One fresh store: appends the batches and projects them in steps; returns the steps' wall
/// time and CPU time, and the size of the read models' file and log afterwards.
async fn project_round(batches: &[(u64, Vec<u8>)]) -> (Duration, Duration, u64) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("agora.db");
    let url = format!("sqlite://{}", path.display());
    let options = store::StoreOptions {
        durability: store::Durability::Normal,
        ..store::StoreOptions::default()
    };
    let store = Arc::new(store::Store::open(&url, &options).await.expect("opens"));
    let mut projector = Projector::start(store.clone()).await.expect("starts");
    let mut wall = Duration::ZERO;
    let mut cpu = Duration::ZERO;
    for step in batches.chunks(BATCHES_PER_STEP) {
        for (commands, payload) in step {
            store
                .append(*commands, payload.clone())
                .await
                .expect("appends");
        }
        let cpu_before = process_cpu();
        let started = Instant::now();
        projector.step().await.expect("projects");
        wall += started.elapsed();
        cpu += process_cpu().saturating_sub(cpu_before);
    }
    store.close().await;
    let read_models = store::sqlite_read_models_path(path.to_str().expect("a UTF-8 path"));
    let mut bytes = 0;
    for suffix in ["", "-wal"] {
        let mut file = read_models.clone().into_os_string();
        file.push(suffix);
        bytes += std::fs::metadata(&file).map_or(0, |m| m.len());
    }
    (wall, cpu, bytes)
}

/// The CPU time of the whole process so far (every thread: the projector's and SQLite's).
fn process_cpu() -> Duration {
    #[cfg(target_os = "linux")]
    {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
        Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
    }
    #[cfg(not(target_os = "linux"))]
    Duration::ZERO
}
