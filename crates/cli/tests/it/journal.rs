//! `agora journal verify` on a real journal: OK when intact, non-zero with the batch number
//! when a batch is damaged.

use std::process::Command;
use std::sync::Arc;

use agora_core::CoreCommand;
use agora_core::sequencer::{Sequencer, SequencerOptions};
use store::{Store, StoreOptions};

async fn write_journal(url: &str) {
    let store = Arc::new(Store::open(url, &StoreOptions::default()).await.unwrap());
    let options = SequencerOptions {
        snapshot_every_commands: 3,
        ..SequencerOptions::default()
    };
    let (sequencer, tasks, _) = Sequencer::start(store, options).await.unwrap();
    sequencer
        .submit(CoreCommand::CreateAsset {
            asset: 1,
            symbol: "BTC".into(),
            decimals: 8,
        })
        .await
        .unwrap();
    for user in 1..=6 {
        sequencer
            .submit(CoreCommand::Deposit {
                user,
                asset: 1,
                amount: 1_000,
            })
            .await
            .unwrap();
    }
    drop(sequencer);
    tasks.join().await;
    let store = Arc::new(Store::open(url, &StoreOptions::default()).await.unwrap());
    agora_core::projector::Projector::start(store)
        .await
        .unwrap()
        .catch_up()
        .await
        .unwrap();
}

fn verify(url: &str) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_agora"))
        .args(["journal", "verify", "--database", url])
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[tokio::test]
async fn verify_reports_ok_then_the_damaged_batch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agora.db");
    let url = format!("sqlite://{}", path.display());
    write_journal(&url).await;

    let (ok, report) = verify(&url);
    assert!(ok, "{report}");
    assert!(
        report.contains("7 commands, checksum chain intact"),
        "{report}"
    );
    assert!(report.contains("same state hash"), "{report}");
    assert!(
        report.contains("audit: 7 entries, hash chain intact"),
        "{report}"
    );
    assert!(report.contains("result: OK"), "{report}");

    // A rewritten audit entry is found.
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::query("UPDATE audit SET detail = 'forged' WHERE seq = 3")
        .execute(&pool)
        .await
        .unwrap();
    let (ok, report) = verify(&url);
    assert!(
        !ok && report.contains("audit: PROBLEM at entry 3"),
        "{report}"
    );
    sqlx::query("DELETE FROM audit")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;

    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::query("UPDATE journal SET payload = CAST('x' AS BLOB) || payload WHERE batch = 4")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let (ok, report) = verify(&url);
    assert!(!ok, "{report}");
    assert!(report.contains("PROBLEM at batch 4"), "{report}");

    let (ok, _) = verify(&format!("sqlite://{}/missing.db", dir.path().display()));
    assert!(!ok);
}
