//! Replay's CPU cost without storage: the place/cancel mix of `agora bench core`, encoded in
//! journal batches, decoded and applied to a fresh core. Prints commands per second for
//! decode plus apply, and for apply alone; then the same batches appended to a SQLite store
//! in a temporary directory and recovered from it (`sequencer::recover` from the first
//! command: reading, checksums, decoding and applying, as a restart does, less the final
//! state hash). Run with `cargo bench -p agora-core --bench replay`.

use std::time::Instant;

use agora_core::sequencer::{RecoverFrom, recover};
use agora_core::{Output, State, codec, workload};

const USERS: u64 = 2_048;
const COMMANDS: u64 = 450_000;
const BATCH: u64 = 680;
/// Rounds of each measurement, unless `AGORA_REPLAY_ROUNDS` says otherwise (1 suits cachegrind).
const ROUNDS: usize = 5;

fn main() {
    let mut commands = workload::setup(USERS);
    for n in 0..COMMANDS / USERS {
        for user in 1..=USERS {
            commands.push(workload::place_cancel(user, n));
        }
    }
    let batches: Vec<Vec<u8>> = commands
        .chunks(BATCH as usize)
        .map(|chunk| {
            let mut payload = Vec::new();
            for command in chunk {
                codec::encode(command, &mut payload);
            }
            payload
        })
        .collect();
    let rounds = std::env::var("AGORA_REPLAY_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(ROUNDS)
        .max(1);
    let total = commands.len() as f64;
    let mut decode_apply = Vec::new();
    let mut apply_only = Vec::new();
    for _ in 0..rounds {
        let mut state = State::new();
        let mut out = Output::default();
        let started = Instant::now();
        for payload in &batches {
            for command in codec::decode_each(payload) {
                out.clear();
                state
                    .apply(&command.expect("decodes"), &mut out)
                    .expect("applies");
            }
        }
        decode_apply.push(total / started.elapsed().as_secs_f64());
        drop(state);

        let mut state = State::new();
        let started = Instant::now();
        for command in &commands {
            out.clear();
            state.apply(command, &mut out).expect("applies");
        }
        apply_only.push(total / started.elapsed().as_secs_f64());
    }
    let from_store = recover_rounds(&batches, rounds);
    for (name, mut rates) in [
        ("decode+apply", decode_apply),
        ("apply", apply_only),
        ("recover from SQLite", from_store),
    ] {
        rates.sort_by(f64::total_cmp);
        println!(
            "{name}: median {:.0} commands/s (min {:.0}, max {:.0}) over {rounds} rounds of {total}",
            rates[rounds / 2],
            rates[0],
            rates[rounds - 1]
        );
    }
}

/// Appends `batches` to a fresh SQLite store, then times `rounds` recoveries from it; the
/// final state hash, which recovery computes, is timed apart and left out.
fn recover_rounds(batches: &[Vec<u8>], rounds: usize) -> Vec<f64> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("temporary directory");
        let url = format!("sqlite://{}/agora.db", dir.path().display());
        let options = store::StoreOptions {
            durability: store::Durability::Normal,
            ..store::StoreOptions::default()
        };
        let store = std::sync::Arc::new(store::Store::open(&url, &options).await.expect("opens"));
        for payload in batches {
            let commands = codec::decode_each(payload).count() as u64;
            store
                .append(commands, payload.clone())
                .await
                .expect("appends");
        }
        let mut rates = Vec::new();
        for _ in 0..rounds {
            let started = Instant::now();
            let (state, recovery) = recover(&store, RecoverFrom::Zero).await.expect("recovers");
            let elapsed = started.elapsed();
            let hashed = Instant::now();
            let _ = state.state_hash();
            let hash_time = hashed.elapsed();
            drop(state);
            rates.push(
                recovery.replayed_commands as f64 / elapsed.saturating_sub(hash_time).as_secs_f64(),
            );
        }
        store.close().await;
        rates
    })
}
