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
}

fn project(url: &str, rebuild: bool) -> String {
    let mut args = vec!["journal", "project", "--database", url];
    if rebuild {
        args.push("--rebuild");
    }
    let output = Command::new(env!("CARGO_BIN_EXE_agora"))
        .args(&args)
        .output()
        .unwrap();
    assert!(output.status.success());
    String::from_utf8_lossy(&output.stdout).into_owned()
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
    assert_eq!(project(&url, false).trim(), "projected 7 commands");
    assert_eq!(project(&url, false).trim(), "projected 0 commands");

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

    // A rewritten audit entry is found (the read models have their own file).
    let read_models = store::sqlite_read_models_path(path.to_str().unwrap());
    assert!(read_models.exists(), "{}", read_models.display());
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", read_models.display()))
        .await
        .unwrap();
    sqlx::query("UPDATE audit SET detail = 'forged' WHERE seq = 3")
        .execute(&pool)
        .await
        .unwrap();
    let (ok, report) = verify(&url);
    assert!(
        !ok && report.contains("audit: PROBLEM at entry 3"),
        "{report}"
    );
    pool.close().await;
    // Rebuilt from the journal, the audit is whole again.
    assert_eq!(project(&url, true).trim(), "projected 7 commands");
    let (ok, report) = verify(&url);
    assert!(ok, "{report}");

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
