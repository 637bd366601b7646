//! The sequencer against real stores (SQLite always, PostgreSQL when configured): durable
//! acknowledgements, refusals kept out of the journal, recovery from snapshots and from zero,
//! and a failed write stopping the writer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use agora_core::sequencer::{RecoverFrom, Sequencer, SequencerOptions, SubmitError, recover};
use agora_core::{CoreCommand, CoreRejection};
use book::{MarketId, PlaceOrder, Price, Qty, Side};
use ledger::Rejection;
use store::{Store, StoreOptions};

pub(crate) struct Backend {
    pub(crate) url: String,
    pub(crate) options: StoreOptions,
    _dir: Option<tempfile::TempDir>,
}

impl Backend {
    pub(crate) async fn open(&self) -> Arc<Store> {
        Arc::new(
            Store::open(&self.url, &self.options)
                .await
                .expect("store opens"),
        )
    }
}

static NEXT_SCHEMA: AtomicU32 = AtomicU32::new(0);

pub(crate) fn backends(test: &str) -> Vec<Backend> {
    let dir = tempfile::tempdir().unwrap();
    let mut backends = vec![Backend {
        url: format!("sqlite://{}/agora.db", dir.path().display()),
        options: StoreOptions::default(),
        _dir: Some(dir),
    }];
    match std::env::var("AGORA_TEST_POSTGRES_URL") {
        Ok(url) => backends.push(Backend {
            url,
            options: StoreOptions {
                pg_schema: Some(format!(
                    "c_{test}_{}_{}",
                    std::process::id(),
                    NEXT_SCHEMA.fetch_add(1, Ordering::Relaxed)
                )),
                ..StoreOptions::default()
            },
            _dir: None,
        }),
        Err(_) if std::env::var("CI").is_ok() => {
            panic!("CI must run the PostgreSQL suite: AGORA_TEST_POSTGRES_URL is not set")
        }
        Err(_) => {}
    }
    backends
}

/// Every account's balance (available plus held) in assets 1 and 2 that is not zero, for the
/// fee account and users 1 to `users`, named as the read models name owners.
pub(crate) fn ledger_balances(
    state: &agora_core::State,
    users: u64,
) -> std::collections::BTreeMap<(String, u32), i128> {
    let mut owners = vec![ledger::Owner::Fees];
    owners.extend((1..=users).map(ledger::Owner::User));
    let mut sums = std::collections::BTreeMap::new();
    for owner in owners {
        for asset in [1u32, 2] {
            let balance = state.ledger().balance(owner, asset);
            let total = (balance.available + balance.held) as i128;
            if total != 0 {
                let name = match owner {
                    ledger::Owner::User(user) => format!("user:{user}"),
                    ledger::Owner::Fees => "fees".into(),
                };
                sums.insert((name, asset), total);
            }
        }
    }
    sums
}

/// The assets and the market every core test starts with.
pub(crate) fn market_commands() -> Vec<CoreCommand> {
    agora_core::workload::market()
}

fn setup_commands() -> Vec<CoreCommand> {
    let mut commands = market_commands();
    commands.extend([
        CoreCommand::Deposit {
            user: 1,
            asset: 1,
            amount: 1_000_000_000,
        },
        CoreCommand::Deposit {
            user: 2,
            asset: 2,
            amount: 1_000_000_000_000_000,
        },
    ]);
    commands
}

fn order(id: u64, user: u64, side: Side, price: i64) -> CoreCommand {
    CoreCommand::Place(PlaceOrder::limit(
        MarketId(0),
        id,
        user,
        side,
        Price(price),
        Qty(100),
    ))
}

#[tokio::test]
async fn acknowledged_commands_survive_a_restart_and_refusals_are_not_journaled() {
    for backend in backends("restart") {
        let store = backend.open().await;
        let (sequencer, tasks, recovery) =
            Sequencer::start(store.clone(), SequencerOptions::default())
                .await
                .unwrap();
        assert_eq!(recovery.seq, 0);
        for command in setup_commands() {
            sequencer.submit(command).await.unwrap();
        }
        let ack = sequencer
            .submit(order(1, 1, Side::Sell, 100))
            .await
            .unwrap();
        assert_eq!(ack.seq, 6);
        let too_big = PlaceOrder::limit(MarketId(0), 2, 1, Side::Sell, Price(100), Qty(1_000_000));
        let refused = sequencer.submit(CoreCommand::Place(too_big)).await;
        assert_eq!(
            refused.unwrap_err(),
            SubmitError::Rejected(CoreRejection::Ledger(Rejection::InsufficientFunds))
        );
        let ack = sequencer.submit(order(3, 2, Side::Buy, 100)).await.unwrap();
        assert_eq!(ack.seq, 7, "the refused command took no sequence number");
        let hash = sequencer.read(|state| state.state_hash()).await.unwrap();
        drop(sequencer);
        tasks.join().await;
        assert_eq!(store.tail().seq, 7);

        let (sequencer, _tasks, recovery) =
            Sequencer::start(backend.open().await, SequencerOptions::default())
                .await
                .unwrap();
        assert_eq!(
            (
                recovery.seq,
                recovery.replayed_commands,
                recovery.state_hash
            ),
            (7, 7, hash)
        );
        let ack = sequencer
            .submit(order(4, 1, Side::Sell, 101))
            .await
            .unwrap();
        assert_eq!(ack.seq, 8);
    }
}

#[tokio::test]
async fn concurrent_submitters_share_batches() {
    for backend in backends("batches") {
        let store = backend.open().await;
        let (sequencer, tasks, _) = Sequencer::start(store.clone(), SequencerOptions::default())
            .await
            .unwrap();
        for command in setup_commands() {
            sequencer.submit(command).await.unwrap();
        }
        let mut handles = Vec::new();
        for i in 0..400u64 {
            let sequencer = sequencer.clone();
            let side = if i % 2 == 0 { Side::Sell } else { Side::Buy };
            handles.push(tokio::spawn(async move {
                sequencer
                    .submit(order(100 + i, 1 + i % 2, side, 100 + (i % 7) as i64))
                    .await
            }));
        }
        let mut seqs = Vec::new();
        for handle in handles {
            seqs.push(handle.await.unwrap().unwrap().seq);
        }
        seqs.sort_unstable();
        assert_eq!(
            seqs,
            (6..406).collect::<Vec<_>>(),
            "every command acknowledged once, in one sequence"
        );
        drop(sequencer);
        tasks.join().await;
        let report = store.verify_journal().await.unwrap();
        assert_eq!((report.commands, report.problem), (405, None));
        assert!(
            report.batches < 405,
            "group commit put several commands in a batch ({} batches)",
            report.batches
        );
    }
}

#[tokio::test]
async fn snapshots_shorten_recovery_and_agree_with_a_replay_from_zero() {
    for backend in backends("snapshots") {
        let store = backend.open().await;
        let options = SequencerOptions {
            snapshot_every_commands: 10,
            ..SequencerOptions::default()
        };
        let (sequencer, tasks, _) = Sequencer::start(store.clone(), options.clone())
            .await
            .unwrap();
        for command in setup_commands() {
            sequencer.submit(command).await.unwrap();
        }
        for i in 0..30u64 {
            let (side, user) = if i % 3 == 0 {
                (Side::Buy, 2)
            } else {
                (Side::Sell, 1)
            };
            sequencer
                .submit(order(10 + i, user, side, 100 + (i % 5) as i64))
                .await
                .unwrap();
        }
        drop(sequencer);
        tasks.join().await;
        let (_, from_snapshot) = recover(&store, RecoverFrom::LatestSnapshot).await.unwrap();
        let (_, from_zero) = recover(&store, RecoverFrom::Zero).await.unwrap();
        assert!(
            from_snapshot.snapshot_seq.is_some(),
            "a snapshot was written"
        );
        assert!(from_snapshot.replayed_commands < from_zero.replayed_commands);
        assert_eq!(from_zero.replayed_commands, 35);
        assert_eq!(from_snapshot.state_hash, from_zero.state_hash);
        assert_eq!(from_snapshot.seq, 35);
    }
}

#[tokio::test]
async fn a_failed_append_stops_the_writer_and_nothing_unacknowledged_survives() {
    for backend in backends("failure") {
        let store = backend.open().await;
        let (sequencer, tasks, _) = Sequencer::start(store.clone(), SequencerOptions::default())
            .await
            .unwrap();
        for command in setup_commands() {
            sequencer.submit(command).await.unwrap();
        }
        let durable_hash = sequencer.read(|state| state.state_hash()).await.unwrap();
        store.inject_append_failure_after(0);
        let failed = sequencer.submit(order(1, 1, Side::Sell, 100)).await;
        assert!(
            matches!(failed, Err(SubmitError::Stopped(ref reason)) if reason.contains("injected")),
            "{failed:?}"
        );
        // Everything after is refused with the reason, reads included.
        let later = sequencer.submit(order(2, 1, Side::Sell, 100)).await;
        assert!(matches!(later, Err(SubmitError::Stopped(_))), "{later:?}");
        assert!(sequencer.read(|state| state.state_hash()).await.is_err());
        assert!(sequencer.stopped().is_some());
        drop(sequencer);
        tasks.join().await;
        // A restart holds exactly the acknowledged commands.
        let (_, recovery) = recover(&backend.open().await, RecoverFrom::LatestSnapshot)
            .await
            .unwrap();
        assert_eq!((recovery.seq, recovery.state_hash), (5, durable_hash));
    }
}

/// Recovery reads and decodes ahead of replay in groups; across many reads and groups it
/// applies every batch once and in order, and a batch that passes its checksum but does not
/// decode is named, after the commands before it in that batch are applied.
#[tokio::test]
async fn recovery_replays_every_batch_in_order_and_names_one_that_does_not_decode() {
    use agora_core::{Output, State, codec, workload};
    const USERS: u64 = 8;
    const BATCHES: u64 = 600;
    const PER_BATCH: u64 = 9;
    for backend in backends("decode_ahead") {
        let store = backend.open().await;
        let mut state = State::new();
        let mut out = Output::default();
        let mut append = async |commands: &[CoreCommand], state: &mut State| {
            let mut payload = Vec::new();
            for command in commands {
                codec::encode(command, &mut payload);
                out.clear();
                state.apply(command, &mut out).expect("the mix applies");
            }
            store
                .append(commands.len() as u64, payload)
                .await
                .expect("appends");
        };
        append(&workload::setup(USERS), &mut state).await;
        for batch in 0..BATCHES {
            // The bench's order: users take turns, each with its own place/cancel sequence.
            let commands: Vec<CoreCommand> = (batch * PER_BATCH..(batch + 1) * PER_BATCH)
                .map(|k| workload::place_cancel(1 + k % USERS, k / USERS))
                .collect();
            append(&commands, &mut state).await;
        }
        let total = workload::setup(USERS).len() as u64 + BATCHES * PER_BATCH;
        let (recovered, recovery) = recover(&store, RecoverFrom::Zero).await.unwrap();
        assert_eq!((recovery.replayed_commands, recovery.seq), (total, total));
        assert_eq!(recovered.state_hash(), state.state_hash());

        // One good command, then bytes that are no command: the checksum is right, the
        // payload is not.
        let mut payload = Vec::new();
        codec::encode(&workload::place_cancel(1, 1 << 30), &mut payload);
        payload.extend_from_slice(&[0xff; 7]);
        let bad = store.append(2, payload).await.unwrap();
        let failed = recover(&store, RecoverFrom::Zero).await;
        match failed {
            Err(agora_core::sequencer::RecoveryError::Decode { batch, .. }) => {
                assert_eq!(batch, bad.batch)
            }
            other => panic!(
                "expected a decode error, got {:?}",
                other.map(|(_, r)| r.seq)
            ),
        }
    }
}

/// Recovery hands replay groups of about 4,096 decoded commands and reads 64 batches at a
/// time: batches of very different sizes (one command, one short of a group, a group, more
/// than a group) make groups close in the middle of reads and single batches fill a group
/// alone. Recovery from zero and from a snapshot taken between them must both reach the
/// state built while appending.
#[tokio::test]
async fn recovery_replays_batches_of_every_size_across_groups_and_reads() {
    use agora_core::{Output, State, codec, workload};
    use store::Snapshot;
    const USERS: u64 = 8;
    const BATCHES: usize = 105;
    const SIZES: [u64; 7] = [1, 4_095, 4_096, 5_003, 37, 1, 200];
    const SNAPSHOT_AFTER: usize = 60;
    for backend in backends("every_size") {
        let store = backend.open().await;
        let mut state = State::new();
        let mut out = Output::default();
        let mut k = 0u64;
        let setup = workload::setup(USERS);
        let mut payload = Vec::new();
        for command in &setup {
            codec::encode(command, &mut payload);
            state.apply(command, &mut out).expect("the set-up applies");
        }
        store.append(setup.len() as u64, payload).await.unwrap();
        let mut seq = setup.len() as u64;
        let mut snapshot_seq = 0;
        for batch in 0..BATCHES {
            let size = SIZES[batch % SIZES.len()];
            let mut payload = Vec::new();
            for _ in 0..size {
                let command = workload::place_cancel(1 + k % USERS, k / USERS);
                k += 1;
                codec::encode(&command, &mut payload);
                out.clear();
                state.apply(&command, &mut out).expect("the mix applies");
            }
            store.append(size, payload).await.unwrap();
            seq += size;
            if batch == SNAPSHOT_AFTER {
                snapshot_seq = seq;
                let snapshot = Snapshot {
                    seq,
                    state_hash: state.state_hash(),
                    payload: state.snapshot(),
                };
                store.put_snapshot(&snapshot, 0).await.unwrap();
            }
        }
        let (_, from_zero) = recover(&store, RecoverFrom::Zero).await.unwrap();
        assert_eq!((from_zero.replayed_commands, from_zero.seq), (seq, seq));
        assert_eq!(from_zero.state_hash, state.state_hash());
        let (_, from_snapshot) = recover(&store, RecoverFrom::LatestSnapshot).await.unwrap();
        assert_eq!(from_snapshot.snapshot_seq, Some(snapshot_seq));
        assert_eq!(
            (from_snapshot.replayed_commands, from_snapshot.seq),
            (seq - snapshot_seq, seq)
        );
        assert_eq!(from_snapshot.state_hash, state.state_hash());
    }
}
