//! Kill -9 under load. A child process (this test binary, re-run in child mode) runs the
//! sequencer with concurrent submitters and prints every acknowledgement; the parent kills it
//! with SIGKILL at a random moment, recovers, and checks:
//! - every acknowledged command is in the journal exactly once, at its sequence number;
//! - nothing is half-applied: the recovered state passes every invariant, and each asset's
//!   supply equals the journaled deposits minus withdrawals;
//! - the state recovered from the newest snapshot has the hash of a replay from zero;
//! - the read models, projected beside the sequencer until the kill (on SQLite in a file of
//!   their own), are never ahead of the journal and, once caught up, hold every journaled
//!   command exactly once: an unbroken audit chain over the journal's commands, and balances
//!   equal to the ledger's.
//!
//! Rounds per backend come from `AGORA_CRASH_ROUNDS` (default 20; a soak runs hundreds).

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use agora_core::codec::{decode_all, encode};
use agora_core::projector::{PROJECTION, Projector, command_digest};
use agora_core::sequencer::{RecoverFrom, Sequencer, SequencerOptions, recover};
use agora_core::{CoreCommand, State};

use crate::sequencer::{backends, ledger_balances, market_commands};
use book::{MarketId, PlaceOrder, Price, Qty, Side};
use store::{Store, StoreOptions};

const CHILD_URL: &str = "AGORA_CRASH_CHILD_URL";
const CHILD_SCHEMA: &str = "AGORA_CRASH_CHILD_SCHEMA";
const CHILD_ROUND: &str = "AGORA_CRASH_CHILD_ROUND";
const SUBMITTERS: u64 = 8;

fn fingerprint(command: &CoreCommand) -> Vec<u8> {
    let mut bytes = Vec::new();
    encode(command, &mut bytes);
    bytes
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The child: recover, then submit from several tasks until killed, printing each ack.
#[test]
fn crash_child() {
    let Ok(url) = std::env::var(CHILD_URL) else {
        return; // Only runs when the parent starts this binary in child mode.
    };
    let round: u64 = std::env::var(CHILD_ROUND).unwrap().parse().unwrap();
    let options = StoreOptions {
        pg_schema: std::env::var(CHILD_SCHEMA).ok(),
        ..StoreOptions::default()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async move {
        let store = Arc::new(Store::open(&url, &options).await.unwrap());
        let sequencer_options = SequencerOptions {
            snapshot_every_commands: 300,
            ..SequencerOptions::default()
        };
        let (sequencer, _tasks, recovery) = Sequencer::start(store.clone(), sequencer_options)
            .await
            .unwrap();
        // The read models follow the journal in steps, as the server's projector does, so
        // that kills land inside projection transactions too.
        let mut projector = Projector::start(store).await.unwrap();
        tokio::spawn(async move {
            loop {
                projector.step().await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        let print = |seq: u64, command: &CoreCommand| {
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "ack {seq} {}", hex(&fingerprint(command))).unwrap();
            stdout.flush().unwrap();
        };
        // An earlier child may have been killed halfway through the set-up: finish it (the
        // parts already done are refused as duplicates).
        let _ = recovery;
        {
            // Tells the parent that recovery is done, so the time before the kill is all work
            // however slowly the process started.
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "ready").unwrap();
            stdout.flush().unwrap();
        }
        for command in market_commands() {
            if let Ok(ack) = sequencer.submit(command.clone()).await {
                print(ack.seq, &command);
            }
        }
        let mut tasks = Vec::new();
        for worker in 0..SUBMITTERS {
            let sequencer = sequencer.clone();
            tasks.push(tokio::spawn(async move {
                let user = 1 + worker;
                for n in 0u64.. {
                    // Ids are unique across rounds, so every journaled command is distinct.
                    let id = (round << 40) | (worker << 32) | n;
                    let command = match n % 10 {
                        0 => CoreCommand::Deposit {
                            user,
                            asset: 1 + (n % 2) as u32,
                            amount: 1_000_000_000 + id as u128,
                        },
                        1 => CoreCommand::RequestWithdrawal {
                            id,
                            user,
                            asset: 1,
                            amount: 1 + n as u128 % 100,
                            destination: "bank:DE00 1234".into(),
                        },
                        2 => CoreCommand::CompleteWithdrawal { id: id - 1 },
                        // Cancels the order placed four commands earlier.
                        3 => CoreCommand::Cancel {
                            market: MarketId(0),
                            id: id - 4,
                            user,
                        },
                        _ => {
                            let side = if (n / 10 + worker) % 2 == 0 {
                                Side::Buy
                            } else {
                                Side::Sell
                            };
                            let price =
                                10_000 + ((id.wrapping_mul(2_654_435_761) >> 7) % 21) as i64;
                            CoreCommand::Place(PlaceOrder::limit(
                                MarketId(0),
                                id,
                                user,
                                side,
                                Price(price),
                                Qty(1 + n % 50),
                            ))
                        }
                    };
                    if let Ok(ack) = sequencer.submit(command.clone()).await {
                        print(ack.seq, &command);
                    }
                }
            }));
        }
        for task in tasks {
            let _ = task.await;
        }
    });
}

/// A small deterministic generator for kill times.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[tokio::test]
async fn kill_minus_9_loses_nothing_acknowledged() {
    let rounds: u64 = std::env::var("AGORA_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut random = 0x9E37_79B9_7F4A_7C15u64;
    for backend in backends("crash") {
        let options = backend.options.clone();
        // Acknowledged fingerprints by sequence number, over every round.
        let mut acked: HashMap<u64, String> = HashMap::new();
        let mut total_acks = 0;
        // Rounds whose child had projected something before it was killed.
        let mut projections_checked = 0;
        for round in 0..rounds {
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "crash::crash_child",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_URL, &backend.url)
                .env(CHILD_ROUND, round.to_string())
                .envs(
                    backend
                        .options
                        .pg_schema
                        .as_ref()
                        .map(|s| (CHILD_SCHEMA, s.clone())),
                )
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("the child starts");
            let stdout = child.stdout.take().unwrap();
            let (ready_tx, ready) = std::sync::mpsc::channel();
            let reader = std::thread::spawn(move || {
                let mut lines = Vec::new();
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    // The test harness may print its own text before ours on the same line.
                    if line.ends_with("ready") {
                        let _ = ready_tx.send(());
                    }
                    lines.push(line);
                }
                lines
            });
            // Wait until it has recovered, let it work for a random while, then kill it without
            // warning.
            ready
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| {
                    panic!("round {round}: the child did not recover within a minute")
                });
            let work_ms = 50 + next_random(&mut random) % 400;
            tokio::time::sleep(Duration::from_millis(work_ms)).await;
            child.kill().expect("SIGKILL");
            child.wait().unwrap();
            let lines = reader.join().unwrap();
            for line in lines.iter().filter_map(|l| l.strip_prefix("ack ")) {
                let (seq, print) = line.split_once(' ').unwrap();
                let seq: u64 = seq.parse().unwrap();
                assert!(
                    acked.insert(seq, print.to_string()).is_none(),
                    "round {round}: seq {seq} acknowledged twice"
                );
                total_acks += 1;
            }

            // Recover as a restart would, and from zero, and compare.
            let store = Arc::new(Store::open(&backend.url, &options).await.unwrap());
            wait_for_orphaned_writes(&store).await;
            let (state, recovery) = recover(&store, RecoverFrom::LatestSnapshot).await.unwrap();
            let (_, from_zero) = recover(&store, RecoverFrom::Zero).await.unwrap();
            assert_eq!(
                recovery.state_hash, from_zero.state_hash,
                "round {round}: snapshot and replay disagree"
            );
            state
                .verify()
                .unwrap_or_else(|problem| panic!("round {round}: {problem}"));

            // Every acknowledged command is in the journal, once, where its ack said.
            let mut journal: Vec<CoreCommand> = Vec::new();
            let mut from = 1;
            loop {
                let batches = store.read(from, 1_000).await.unwrap();
                let Some(last) = batches.last() else { break };
                from = last.batch + 1;
                for batch in &batches {
                    journal.extend(decode_all(&batch.payload).unwrap());
                }
            }
            assert_eq!(journal.len() as u64, recovery.seq);
            let prints: Vec<String> = journal.iter().map(|c| hex(&fingerprint(c))).collect();
            let distinct: HashSet<&String> = prints.iter().collect();
            assert_eq!(
                distinct.len(),
                prints.len(),
                "round {round}: a command is journaled twice"
            );
            for (seq, print) in &acked {
                assert_eq!(
                    prints.get(*seq as usize - 1),
                    Some(print),
                    "round {round}: acknowledged seq {seq} is missing or different"
                );
            }
            assert_supply_matches_journal(&state, &journal);

            // The read models: behind the journal or level with it, never ahead; caught up,
            // each journaled command is in them once.
            let projected = store.projection_offset(PROJECTION).await.unwrap();
            assert!(
                projected <= recovery.seq,
                "round {round}: read models at {projected}, journal at {}",
                recovery.seq
            );
            let mut projector = Projector::start(store.clone()).await.unwrap();
            projector.catch_up().await.unwrap();
            assert_eq!(
                store.projection_offset(PROJECTION).await.unwrap(),
                recovery.seq
            );
            let digests: Vec<[u8; 32]> = journal.iter().map(command_digest).collect();
            let audit = store.verify_audit(Some(&digests)).await.unwrap();
            assert_eq!(
                (audit.entries, audit.problem),
                (recovery.seq, None),
                "round {round}: the audit trail"
            );
            assert_eq!(
                store.projected_balances().await.unwrap(),
                ledger_balances(&state, SUBMITTERS),
                "round {round}: projected balances"
            );
            projections_checked += u64::from(projected > 0);
            store.close().await;
        }
        assert!(
            total_acks > rounds,
            "the children acknowledged too little work ({total_acks} acks)"
        );
        assert!(
            projections_checked > 0,
            "no child projected anything before its kill"
        );
        eprintln!(
            "{}: {rounds} kills, {total_acks} acknowledged commands, all present; read models \
             checked in the {projections_checked} rounds whose child had projected before its kill",
            backend.url.split(':').next().unwrap()
        );
    }
}

/// A killed client's PostgreSQL sessions live on until the server notices the closed socket,
/// and a statement the child sent just before the kill may still commit (a journal batch never
/// acknowledged, which the contract allows, or a snapshot). Recovering while that happens would
/// compare two recoveries that read different journals, so wait until the journal and the
/// snapshots have stopped changing. SQLite has no such sessions: the first check passes.
async fn wait_for_orphaned_writes(store: &Store) {
    let quiet = Duration::from_millis(200);
    let look = || async {
        let journal = store.verify_journal().await.unwrap();
        let snapshot = store
            .latest_valid_snapshot()
            .await
            .unwrap()
            .0
            .map(|s| s.seq);
        (journal.batches, snapshot)
    };
    let mut last = look().await;
    for _ in 0..50 {
        tokio::time::sleep(quiet).await;
        let now = look().await;
        if now == last {
            return;
        }
        last = now;
    }
    panic!("the killed child's writes never stopped");
}

/// Per asset, the ledger's supply equals the journal's deposits minus completed withdrawals.
fn assert_supply_matches_journal(state: &State, journal: &[CoreCommand]) {
    let mut requested: HashMap<u64, (u32, u128)> = HashMap::new();
    let mut expected: HashMap<u32, i128> = HashMap::new();
    for command in journal {
        match command {
            CoreCommand::Deposit { asset, amount, .. } => {
                *expected.entry(*asset).or_default() += *amount as i128
            }
            CoreCommand::RequestWithdrawal {
                id, asset, amount, ..
            } => {
                requested.insert(*id, (*asset, *amount));
            }
            CoreCommand::CompleteWithdrawal { id } => {
                let (asset, amount) = requested[id];
                *expected.entry(asset).or_default() -= amount as i128;
            }
            _ => {}
        }
    }
    for (asset, supply) in expected {
        assert_eq!(
            state.ledger().asset(asset).unwrap().supply as i128,
            supply,
            "asset {asset}"
        );
    }
}
