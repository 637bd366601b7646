//! Queue tests, run against every backend available: SQLite always (a real file in a temporary
//! directory), PostgreSQL when `AGORA_TEST_POSTGRES_URL` is set (one schema per test).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use queue::{Queue, QueueError};
use store::{Store, StoreOptions};

mod crash;
mod flows;
mod jobs;
mod model;
mod observe;
mod schedules;
mod workers;

/// A backend under test.
pub struct Target {
    url: String,
    options: StoreOptions,
    _dir: Option<tempfile::TempDir>,
}

impl Target {
    /// Opens a store on this backend.
    pub async fn open(&self) -> Arc<Store> {
        Arc::new(
            Store::open(&self.url, &self.options)
                .await
                .expect("store opens"),
        )
    }
}

static NEXT_SCHEMA: AtomicU32 = AtomicU32::new(0);

/// Every backend this run can test.
pub fn targets(test: &str) -> Vec<Target> {
    let dir = tempfile::tempdir().unwrap();
    let mut targets = vec![Target {
        url: format!("sqlite://{}/agora-data/agora.db", dir.path().display()),
        options: StoreOptions::default(),
        _dir: Some(dir),
    }];
    if let Ok(url) = std::env::var("AGORA_TEST_POSTGRES_URL") {
        let schema = format!(
            "q_{test}_{}_{}",
            std::process::id(),
            NEXT_SCHEMA.fetch_add(1, Ordering::Relaxed)
        );
        targets.push(Target {
            url,
            options: StoreOptions {
                pg_schema: Some(schema),
                ..StoreOptions::default()
            },
            _dir: None,
        });
    } else if std::env::var("CI").is_ok() {
        panic!("CI must run the PostgreSQL suite: AGORA_TEST_POSTGRES_URL is not set");
    }
    targets
}

/// The field an error names, for table-driven checks.
pub fn field_of(error: &QueueError) -> &'static str {
    match error {
        QueueError::Invalid { field, .. } => field,
        QueueError::UnknownQueue(_) => "queue (unknown)",
        other => panic!("expected a validation error, got {other}"),
    }
}

/// Total jobs of a queue in any state.
pub async fn total_jobs(queue: &Queue, name: &str) -> u64 {
    queue
        .counts(name)
        .await
        .unwrap()
        .iter()
        .map(|c| c.jobs)
        .sum()
}
