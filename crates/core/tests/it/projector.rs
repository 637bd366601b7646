//! The projector on both backends: read models that agree with the state, exactly once across
//! restarts, rebuildable from the journal, and an audit chain tied to the journal.

use std::collections::BTreeMap;
use std::sync::Arc;

use agora_core::CoreCommand;
use agora_core::projector::{PROJECTION, Projector, command_digest};
use agora_core::sequencer::{Sequencer, SequencerOptions};
use book::{MarketId, PlaceOrder, Price, Qty, Side};
use store::{ProjectionBatch, Store, StoreError, StoreOptions};

use crate::sequencer::{backends, ledger_balances};

fn commands() -> Vec<CoreCommand> {
    let mut commands = agora_core::workload::market();
    for user in 1..=4 {
        commands.push(CoreCommand::Deposit {
            user,
            asset: 1,
            amount: 10_000_000_000,
        });
        commands.push(CoreCommand::Deposit {
            user,
            asset: 2,
            amount: 10_000_000_000_000,
        });
    }
    for i in 0..60u64 {
        let side = if i % 2 == 0 { Side::Sell } else { Side::Buy };
        let price = 10_000 + (i * 7 % 11) as i64;
        commands.push(CoreCommand::Place(PlaceOrder::limit(
            MarketId(0),
            100 + i,
            1 + i % 4,
            side,
            Price(price),
            Qty(10 + i % 30),
        )));
        if i % 9 == 8 {
            commands.push(CoreCommand::Cancel {
                market: MarketId(0),
                id: 100 + i - 2,
                user: 1 + (i - 2) % 4,
            });
        }
    }
    commands.push(CoreCommand::RequestWithdrawal {
        id: 1,
        user: 1,
        asset: 1,
        amount: 5,
        destination: "bank:DE00 1234".into(),
    });
    commands.push(CoreCommand::CompleteWithdrawal { id: 1 });
    commands.push(CoreCommand::RequestWithdrawal {
        id: 2,
        user: 2,
        asset: 1,
        amount: 3,
        destination: "wallet:bc1q".into(),
    });
    // Without a destination, as journals written before destinations were kept.
    commands.push(CoreCommand::RequestWithdrawal {
        id: 3,
        user: 1,
        asset: 1,
        amount: 1,
        destination: String::new(),
    });
    commands.push(CoreCommand::CancelWithdrawal { id: 3 });
    commands
}

/// The withdrawals read model as (id, user, amount, destination, status), newest first.
async fn withdrawal_rows(store: &Store) -> Vec<(u64, u64, u128, String, &'static str)> {
    store
        .withdrawals(&store::WithdrawalFilter::default(), 100)
        .await
        .unwrap()
        .into_iter()
        .map(|w| (w.id, w.user, w.amount, w.destination, w.status))
        .collect()
}

async fn journal(
    store: &Arc<Store>,
    commands: &[CoreCommand],
) -> (BTreeMap<(String, u32), i128>, Vec<[u8; 32]>) {
    let (sequencer, tasks, _) = Sequencer::start(store.clone(), SequencerOptions::default())
        .await
        .unwrap();
    let mut digests = Vec::new();
    for command in commands {
        if sequencer.submit(command.clone()).await.is_ok() {
            digests.push(command_digest(command));
        }
    }
    let balances = sequencer
        .read(|state| ledger_balances(state, 4))
        .await
        .unwrap();
    drop(sequencer);
    tasks.join().await;
    (balances, digests)
}

#[tokio::test]
async fn read_models_agree_with_the_state_exactly_once_and_rebuild_the_same() {
    for backend in backends("projector") {
        let store = backend.open().await;
        let all = commands();
        let (first, rest) = all.split_at(40);
        let (_, mut digests) = journal(&store, first).await;

        let mut projector = Projector::start(store.clone()).await.unwrap();
        let projected = projector.catch_up().await.unwrap();
        assert_eq!(projected, digests.len() as u64);
        assert_eq!(
            projector.catch_up().await.unwrap(),
            0,
            "nothing is projected twice"
        );

        // More commands, and a projector restarted from the stored offset.
        let (balances, more) = journal(&store, rest).await;
        digests.extend(more);
        let mut projector = Projector::start(store.clone()).await.unwrap();
        projector.catch_up().await.unwrap();
        assert_eq!(projector.seq(), digests.len() as u64);
        assert_eq!(
            store.projection_offset(PROJECTION).await.unwrap(),
            digests.len() as u64
        );

        assert_eq!(
            store.projected_balances().await.unwrap(),
            balances,
            "balance history sums to the ledger"
        );
        let counts = store.projection_counts().await.unwrap();
        assert_eq!(
            counts[3],
            digests.len() as u64,
            "one audit entry per journaled command"
        );
        assert!(counts[1] > 0, "the stream traded");
        let statuses = store.order_statuses().await.unwrap();
        assert!(
            statuses.contains_key("filled") && statuses.contains_key("cancelled"),
            "{statuses:?}"
        );
        let audit = store.verify_audit(Some(&digests)).await.unwrap();
        assert_eq!((audit.entries, audit.problem), (digests.len() as u64, None));
        let withdrawals = withdrawal_rows(&store).await;
        assert_eq!(
            withdrawals,
            vec![
                (3, 1, 1, String::new(), "cancelled"),
                (2, 2, 3, "wallet:bc1q".into(), "pending"),
                (1, 1, 5, "bank:DE00 1234".into(), "completed"),
            ]
        );
        let pending = store
            .withdrawals(
                &store::WithdrawalFilter {
                    user: Some(2),
                    status: Some("pending"),
                    before_id: None,
                },
                10,
            )
            .await
            .unwrap();
        assert_eq!(pending.iter().map(|w| w.id).collect::<Vec<_>>(), [2]);
        assert_eq!(store.max_withdrawal_id().await.unwrap(), 3);

        // Rebuilt from the journal, the read models come out the same.
        store.reset_projection(PROJECTION).await.unwrap();
        let mut rebuilt = Projector::start(store.clone()).await.unwrap();
        rebuilt.catch_up().await.unwrap();
        assert_eq!(store.projection_counts().await.unwrap(), counts);
        assert_eq!(store.projected_balances().await.unwrap(), balances);
        assert_eq!(store.order_statuses().await.unwrap(), statuses);
        assert_eq!(withdrawal_rows(&store).await, withdrawals);
        assert_eq!(
            store.verify_audit(Some(&digests)).await.unwrap().head,
            audit.head
        );

        // A batch that does not follow the offset is refused.
        let stale = ProjectionBatch {
            first_seq: 1,
            last_seq: 1,
            ..ProjectionBatch::default()
        };
        assert!(matches!(
            store.write_projection(PROJECTION, &stale).await,
            Err(StoreError::OutOfOrder { .. })
        ));
    }
}

#[tokio::test]
async fn a_failed_write_is_projected_again_not_skipped() {
    for backend in backends("projector_failure") {
        let store = backend.open().await;
        let (balances, digests) = journal(&store, &commands()).await;
        let mut projector = Projector::start(store.clone()).await.unwrap();
        store.inject_projection_failures(1);
        assert!(matches!(
            projector.catch_up().await,
            Err(agora_core::sequencer::RecoveryError::Store(
                StoreError::Injected
            ))
        ));
        assert_eq!(store.projection_offset(PROJECTION).await.unwrap(), 0);

        // The next pass starts again from the stored offset and writes everything once.
        assert_eq!(projector.catch_up().await.unwrap(), digests.len() as u64);
        assert_eq!(
            store.projection_offset(PROJECTION).await.unwrap(),
            digests.len() as u64
        );
        assert_eq!(store.projected_balances().await.unwrap(), balances);
        let audit = store.verify_audit(Some(&digests)).await.unwrap();
        assert_eq!((audit.entries, audit.problem), (digests.len() as u64, None));
        assert_eq!(projector.catch_up().await.unwrap(), 0);
    }
}

#[tokio::test]
async fn a_step_projects_one_read_of_the_journal_and_returns() {
    for backend in backends("projector_step") {
        let store = backend.open().await;
        // Submitted one at a time: one journal batch per command, 100 batches.
        let deposits: Vec<CoreCommand> = (0..100)
            .map(|n| CoreCommand::Deposit {
                user: 1 + n % 4,
                asset: 1,
                amount: 1 + u128::from(n),
            })
            .collect();
        let mut all = commands()[..2].to_vec();
        all.extend(deposits);
        let (_, digests) = journal(&store, &all).await;
        assert_eq!(store.tail().batch, 102);
        let mut projector = Projector::start(store.clone()).await.unwrap();
        // One read is 64 batches; they share one transaction.
        assert_eq!(projector.step().await.unwrap(), 64);
        assert_eq!(store.projection_offset(PROJECTION).await.unwrap(), 64);
        assert_eq!(projector.step().await.unwrap(), 38);
        assert_eq!(projector.step().await.unwrap(), 0);
        let audit = store.verify_audit(Some(&digests)).await.unwrap();
        assert_eq!((audit.entries, audit.problem), (102, None));
    }
}

#[tokio::test]
async fn a_tampered_audit_entry_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agora.db");
    let url = format!("sqlite://{}", path.display());
    let store = Arc::new(Store::open(&url, &StoreOptions::default()).await.unwrap());
    let (_, digests) = journal(&store, &commands()[..12]).await;
    Projector::start(store.clone())
        .await
        .unwrap()
        .catch_up()
        .await
        .unwrap();
    let read_models = store::sqlite_read_models_path(path.to_str().unwrap());
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", read_models.display()))
        .await
        .unwrap();
    sqlx::query("UPDATE audit SET detail = 'user 1 asset 1 amount 1' WHERE seq = 5")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let report = store.verify_audit(Some(&digests)).await.unwrap();
    assert_eq!(report.problem.map(|p| p.0), Some(5));
}

#[tokio::test]
async fn read_models_ahead_of_the_journal_are_rebuilt_from_it() {
    for backend in backends("projector_ahead") {
        let store = backend.open().await;
        let (balances, digests) = journal(&store, &commands()).await;
        let end = digests.len() as u64;
        let mut projector = Projector::start(store.clone()).await.unwrap();
        projector.catch_up().await.unwrap();
        let counts = store.projection_counts().await.unwrap();
        // What a power loss can leave on SQLite with `synchronous=NORMAL`: the read models'
        // file kept projections of journal batches that the database file lost.
        let lost = ProjectionBatch {
            first_seq: end + 1,
            last_seq: end + 5,
            ..ProjectionBatch::default()
        };
        store.write_projection(PROJECTION, &lost).await.unwrap();
        assert_eq!(store.projection_offset(PROJECTION).await.unwrap(), end + 5);

        let mut rebuilt = Projector::start(store.clone()).await.unwrap();
        assert_eq!(rebuilt.catch_up().await.unwrap(), end);
        assert_eq!(store.projection_offset(PROJECTION).await.unwrap(), end);
        assert_eq!(store.projection_counts().await.unwrap(), counts);
        assert_eq!(store.projected_balances().await.unwrap(), balances);
        let audit = store.verify_audit(Some(&digests)).await.unwrap();
        assert_eq!((audit.entries, audit.problem), (end, None));
    }
}

#[tokio::test]
async fn a_projector_beside_another_process_does_not_take_its_progress_for_a_loss() {
    for backend in backends("projector_beside") {
        // Opened first, this store still holds the journal's end as empty when the other
        // (another process, in life) has appended and projected.
        let ours = backend.open().await;
        let theirs = backend.open().await;
        let (balances, digests) = journal(&theirs, &commands()).await;
        let end = digests.len() as u64;
        Projector::start(theirs.clone())
            .await
            .unwrap()
            .catch_up()
            .await
            .unwrap();
        assert_eq!(ours.tail().seq, 0);

        let mut beside = Projector::start(ours.clone()).await.unwrap();
        assert_eq!(beside.catch_up().await.unwrap(), 0, "it rebuilt them");
        assert_eq!(ours.projection_offset(PROJECTION).await.unwrap(), end);
        assert_eq!(ours.projected_balances().await.unwrap(), balances);
    }
}
