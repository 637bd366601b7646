//! Store tests, run against every backend available: SQLite always (a real file in a temporary
//! directory), PostgreSQL when `AGORA_TEST_POSTGRES_URL` is set (one schema per test, so tests
//! and runs do not see each other).

use std::sync::atomic::{AtomicU32, Ordering};

mod accounts;

use store::{Durability, Snapshot, Store, StoreError, StoreOptions};

/// A backend under test: how to open it again, and how to reach its tables directly.
struct Target {
    url: String,
    options: StoreOptions,
    _dir: Option<tempfile::TempDir>,
}

impl Target {
    async fn open(&self) -> Store {
        Store::open(&self.url, &self.options)
            .await
            .expect("store opens")
    }

    /// Runs raw SQL against the store's tables, as a disk fault or an operator would.
    async fn tamper(&self, sql: &str) {
        self.tamper_file(sql, false).await
    }

    /// Like [`Target::tamper`], for the read models' tables (their own file on SQLite).
    async fn tamper_read_models(&self, sql: &str) {
        self.tamper_file(sql, true).await
    }

    async fn tamper_file(&self, sql: &str, read_models: bool) {
        if let Some(path) = self.url.strip_prefix("sqlite://") {
            let path = match read_models {
                true => store::sqlite_read_models_path(path),
                false => std::path::PathBuf::from(path),
            };
            let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
                .await
                .unwrap();
            sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        } else {
            let schema = self.options.pg_schema.as_deref().unwrap();
            let pool = sqlx::PgPool::connect(&self.url).await.unwrap();
            let sql = format!("SET search_path TO {schema}; {sql}");
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }
    }
}

static NEXT_SCHEMA: AtomicU32 = AtomicU32::new(0);

/// Every backend this run can test.
fn targets(test: &str) -> Vec<Target> {
    let dir = tempfile::tempdir().unwrap();
    let mut targets = vec![Target {
        url: format!("sqlite://{}/agora-data/agora.db", dir.path().display()),
        options: StoreOptions::default(),
        _dir: Some(dir),
    }];
    if let Ok(url) = std::env::var("AGORA_TEST_POSTGRES_URL") {
        let schema = format!(
            "t_{test}_{}_{}",
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

#[tokio::test]
async fn the_journal_appends_in_order_and_survives_reopening() {
    for target in targets("append") {
        let store = target.open().await;
        assert_eq!(store.tail().batch, 0);
        let first = store.append(3, b"abc".to_vec()).await.unwrap();
        let second = store.append(2, b"de".to_vec()).await.unwrap();
        assert_eq!((first.batch, first.first_seq, first.last_seq()), (1, 1, 3));
        assert_eq!(
            (second.batch, second.first_seq, second.last_seq()),
            (2, 4, 5)
        );
        store.close().await;

        let store = target.open().await;
        let tail = store.tail();
        assert_eq!(
            (tail.batch, tail.seq, tail.checksum),
            (2, 5, second.checksum),
            "{}",
            store.backend_name()
        );
        store.append(1, b"f".to_vec()).await.unwrap();
        let all = store.read(1, 100).await.unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[..2], [first, second.clone()]);
        let from_two = store.read(2, 1).await.unwrap();
        assert_eq!(from_two, [second]);
        assert!(store.read(9, 10).await.unwrap().is_empty());
        let report = store.verify_journal().await.unwrap();
        assert_eq!(
            (report.batches, report.commands, report.problem),
            (3, 6, None)
        );
        assert_eq!(store.batch_containing(1).await.unwrap(), Some(1));
        assert_eq!(store.batch_containing(4).await.unwrap(), Some(2));
        assert_eq!(store.batch_containing(6).await.unwrap(), Some(3));
        assert_eq!(store.batch_containing(7).await.unwrap(), None);
        store.inject_append_failure_after(1);
        store.append(1, b"g".to_vec()).await.unwrap();
        assert!(matches!(
            store.append(1, b"h".to_vec()).await,
            Err(StoreError::Injected)
        ));
        assert_eq!(store.tail().seq, 7);
        assert!(matches!(
            store.append(0, vec![]).await,
            Err(StoreError::InvalidBatch(_))
        ));
    }
}

#[tokio::test]
async fn a_damaged_journal_is_reported_with_its_position() {
    for target in targets("damaged") {
        let store = target.open().await;
        for i in 0..5u8 {
            store.append(1, vec![i; 10]).await.unwrap();
        }
        let flip = if target.url.starts_with("sqlite") {
            "UPDATE journal SET payload = CAST('x' AS BLOB) || payload WHERE batch = 3"
        } else {
            "UPDATE journal SET payload = '\\x78'::bytea || payload WHERE batch = 3"
        };
        target.tamper(flip).await;
        let report = store.verify_journal().await.unwrap();
        assert_eq!(report.batches, 2);
        assert_eq!(report.problem.as_ref().map(|p| p.0), Some(3), "{report:?}");
        match store.read(1, 10).await {
            Err(StoreError::Corrupt { position, .. }) => assert_eq!(position, 3),
            other => panic!("expected corruption at batch 3, got {other:?}"),
        }
        // A missing batch breaks the chain too.
        target.tamper("DELETE FROM journal WHERE batch = 3").await;
        let report = store.verify_journal().await.unwrap();
        assert_eq!(report.problem.as_ref().map(|p| p.0), Some(3), "{report:?}");
    }
}

#[tokio::test]
async fn the_newest_valid_snapshot_is_used_and_bad_ones_are_reported() {
    for target in targets("snapshots") {
        let store = target.open().await;
        let (none, rejected) = store.latest_valid_snapshot().await.unwrap();
        assert!(none.is_none() && rejected.is_empty());
        for seq in [10u64, 20, 30] {
            let snapshot = Snapshot {
                seq,
                state_hash: [seq as u8; 32],
                payload: vec![seq as u8; 100],
            };
            store
                .put_snapshot(&snapshot, 1_700_000_000_000)
                .await
                .unwrap();
        }
        let (latest, rejected) = store.latest_valid_snapshot().await.unwrap();
        assert_eq!(latest.unwrap().seq, 30);
        assert!(rejected.is_empty());
        let flip = if target.url.starts_with("sqlite") {
            "UPDATE snapshots SET payload = CAST('x' AS BLOB) || payload WHERE seq = 30"
        } else {
            "UPDATE snapshots SET payload = '\\x78'::bytea || payload WHERE seq = 30"
        };
        target.tamper(flip).await;
        let (latest, rejected) = store.latest_valid_snapshot().await.unwrap();
        assert_eq!(latest.unwrap().payload, vec![20u8; 100]);
        assert_eq!(rejected.iter().map(|r| r.0).collect::<Vec<_>>(), [30]);
        assert_eq!(store.prune_snapshots(1).await.unwrap(), 2);
    }
}

#[tokio::test]
async fn bad_urls_are_clear_errors_and_sqlite_durability_is_a_choice() {
    for url in ["mysql://x", "sqlite://", "postgres://host:notaport/db"] {
        match Store::open(url, &StoreOptions::default()).await {
            Err(StoreError::InvalidUrl { .. }) => {}
            other => panic!("{url}: expected InvalidUrl, got {:?}", other.err()),
        }
    }
    let schema = StoreOptions {
        pg_schema: Some("Bad Name".into()),
        ..StoreOptions::default()
    };
    assert!(matches!(
        Store::open("postgres://127.0.0.1/x", &schema).await,
        Err(StoreError::InvalidUrl { .. })
    ));
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/normal.db", dir.path().display());
    let options = StoreOptions {
        durability: Durability::Normal,
        ..StoreOptions::default()
    };
    let store = Store::open(&url, &options).await.unwrap();
    assert_eq!(store.backend_name(), "sqlite");
    store.append(1, vec![1]).await.unwrap();
}

#[tokio::test]
async fn a_reader_that_holds_the_wal_back_cannot_grow_it_without_bound() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wal.db");
    let options = StoreOptions {
        wal_frames_behind_max: 64,
        ..StoreOptions::default()
    };
    let store = Store::open(&format!("sqlite://{}", path.display()), &options)
        .await
        .unwrap();
    let every = store::limits::CHECKPOINT_EVERY_APPENDS;
    let payload = vec![7u8; 16 * 1024];

    // A reader holding an old snapshot open keeps passive checkpoints from copying the log.
    let reader = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let mut snapshot = reader.begin().await.unwrap();
    sqlx::query("SELECT count(*) FROM journal")
        .fetch_one(&mut *snapshot)
        .await
        .unwrap();
    for _ in 0..every {
        store.append(1, payload.clone()).await.unwrap();
    }
    // The background checkpoint reports the backlog it could not copy.
    let mut waited_ms = 0;
    while store.wal_frames_behind() <= 64 {
        assert!(
            waited_ms < 10_000,
            "the checkpoint never reported its backlog"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        waited_ms += 10;
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    snapshot.rollback().await.unwrap();

    // Over the bound, the next checkpoint runs inside the append and empties the backlog
    // before the append returns.
    for _ in 0..every {
        store.append(1, payload.clone()).await.unwrap();
    }
    assert_eq!(store.wal_frames_behind(), 0);
    assert_eq!(store.verify_journal().await.unwrap().batches, 2 * every);
    reader.close().await;
}

#[tokio::test]
async fn sqlite_read_models_have_their_own_file_and_do_not_hold_appends_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agora.db");
    let store = Store::open(
        &format!("sqlite://{}", path.display()),
        &StoreOptions::default(),
    )
    .await
    .unwrap();
    store.append(2, vec![1, 2]).await.unwrap();
    let batch = store::ProjectionBatch {
        first_seq: 1,
        last_seq: 2,
        ..store::ProjectionBatch::default()
    };
    store.write_projection("read-models", &batch).await.unwrap();

    let read_models = store::sqlite_read_models_path(path.to_str().unwrap());
    assert_eq!(read_models, dir.path().join("agora.read.db"));
    assert_eq!(
        store::sqlite_read_models_path("/data/journal"),
        std::path::Path::new("/data/journal.read")
    );
    let tables = "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name";
    let main = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let main_tables: Vec<String> = sqlx::query_scalar(tables).fetch_all(&main).await.unwrap();
    assert!(
        main_tables.contains(&"journal".to_string()),
        "{main_tables:?}"
    );
    for table in [
        "orders",
        "trades",
        "balance_changes",
        "audit",
        "withdrawals",
        "projection_offsets",
    ] {
        assert!(
            !main_tables.contains(&table.to_string()),
            "{table} in {main_tables:?}"
        );
    }
    let read = sqlx::SqlitePool::connect(&format!("sqlite://{}", read_models.display()))
        .await
        .unwrap();
    let offset: i64 =
        sqlx::query_scalar("SELECT seq FROM projection_offsets WHERE name = 'read-models'")
            .fetch_one(&read)
            .await
            .unwrap();
    assert_eq!(offset, 2);

    // A transaction writing the read models (the projector's, say) holds their file's write
    // lock; the journal's appends go on beside it.
    let mut projecting = read.begin().await.unwrap();
    sqlx::query("INSERT INTO projection_offsets (name, seq) VALUES ('other', 0)")
        .execute(&mut *projecting)
        .await
        .unwrap();
    let appended =
        tokio::time::timeout(std::time::Duration::from_secs(2), store.append(1, vec![3]))
            .await
            .expect("an append waited for the read models' lock")
            .unwrap();
    assert_eq!(appended.first_seq, 3);
    projecting.rollback().await.unwrap();
    main.close().await;
    read.close().await;
    store.close().await;
}

/// Runs the migrations up to and including `last` of one backend's folder, as a build from
/// before the later ones would have, on the store `target` names (which must not be open).
async fn migrate_as_an_older_build(target: &Target, last: i64) {
    let (folder, sqlite_path) = match target.url.strip_prefix("sqlite://") {
        Some(path) => ("sqlite_read", Some(store::sqlite_read_models_path(path))),
        None => ("postgres", None),
    };
    let all = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(folder);
    let older = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&all).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        let version: i64 = name.split('_').next().unwrap().parse().unwrap();
        if version <= last {
            std::fs::copy(entry.path(), older.path().join(&name)).unwrap();
        }
    }
    let migrator = sqlx::migrate::Migrator::new(older.path()).await.unwrap();
    match sqlite_path {
        Some(path) => {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let options = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true);
            let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
            migrator.run(&pool).await.unwrap();
            pool.close().await;
        }
        None => {
            let schema = target.options.pg_schema.as_deref().unwrap();
            let pool = sqlx::PgPool::connect(&target.url).await.unwrap();
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
            let options: sqlx::postgres::PgConnectOptions = target.url.parse().unwrap();
            let pool = sqlx::PgPool::connect_with(options.options([("search_path", schema)]))
                .await
                .unwrap();
            migrator.run(&pool).await.unwrap();
            pool.close().await;
        }
    }
}

#[tokio::test]
async fn read_models_written_before_the_leaner_schema_keep_every_row() {
    for target in targets("leaner") {
        // The read models as the build before the leaner schema wrote them: orders keyed by
        // market, id and accepting command (an id used twice), audit entries that repeat
        // the previous entry's hash.
        let sqlite = target.url.starts_with("sqlite://");
        migrate_as_an_older_build(&target, if sqlite { 1 } else { 9 }).await;
        let blob = |bytes: &[u8; 32]| {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            match sqlite {
                true => format!("X'{hex}'"),
                false => format!("'\\x{hex}'::bytea"),
            }
        };
        let digest = [7u8; 32];
        let first = store::audit_hash(&[0; 32], 1, "place", "order 5", &digest);
        let second = store::audit_hash(&first, 2, "place", "order 5 again", &digest);
        target
            .tamper_read_models(&format!(
                "INSERT INTO orders (market, order_id, accepted_seq, user_id, side, order_type, qty, filled, open_qty, status, updated_seq, price) VALUES \
                 (0, 5, 1, 9, 'buy', 'limit', 10, 10, 0, 'filled', 2, 100), \
                 (0, 5, 2, 9, 'sell', 'limit', 4, 0, 4, 'open', 2, 120); \
                 INSERT INTO trades (seq, n, market, maker, taker, maker_user, taker_user, taker_side, price, qty) VALUES \
                 (2, 0, 0, 5, 6, 9, 8, 'sell', 100, 10); \
                 INSERT INTO balance_changes (seq, n, owner, asset, bucket, delta) VALUES \
                 (1, 0, 'user:9', 2, 'available', '-1000'), (1, 1, 'user:9', 2, 'held', '1500'); \
                 INSERT INTO audit (seq, kind, detail, command_digest, prev_hash, hash) VALUES \
                 (1, 'place', 'order 5', {digest}, {zero}, {first}), \
                 (2, 'place', 'order 5 again', {digest}, {first}, {second}); \
                 INSERT INTO projection_offsets (name, seq) VALUES ('read_models', 2)",
                digest = blob(&digest),
                zero = blob(&[0; 32]),
                first = blob(&first),
                second = blob(&second),
            ))
            .await;

        let store = target.open().await;
        let name = store.backend_name();
        let orders = store.orders_of_user(9, None, None, None, 10).await.unwrap();
        assert_eq!(
            orders
                .iter()
                .map(|o| (o.order_id, o.accepted_seq, o.status, o.open_qty, o.price))
                .collect::<Vec<_>>(),
            [(5, 2, "open", 4, Some(120)), (5, 1, "filled", 0, Some(100))],
            "{name}"
        );
        assert_eq!(
            store.order_by_id(5).await.unwrap().map(|o| o.accepted_seq),
            Some(2),
            "{name}"
        );
        let trades = store.trades_of_user(8, None, 10).await.unwrap();
        assert_eq!(trades.len(), 1, "{name}");
        assert_eq!(
            (trades[0].maker, trades[0].taker, trades[0].qty),
            (5, 6, 10)
        );
        let balances = store.projected_balances().await.unwrap();
        assert_eq!(
            balances.get(&("user:9".to_string(), 2)),
            Some(&500),
            "{name}"
        );
        let audit = store.verify_audit(None).await.unwrap();
        assert_eq!(
            (audit.entries, audit.head, audit.problem),
            (2, second, None),
            "{name}"
        );
        assert_eq!(store.audit_head().await.unwrap(), second, "{name}");

        // Projecting goes on where it stopped: the open order changes by its accepting
        // command, and the chain grows from the stored head.
        let mut order = orders[0].clone();
        order.open_qty = 0;
        order.status = "cancelled";
        order.updated_seq = 3;
        let third = store::audit_hash(&second, 3, "cancel", "order 5", &digest);
        let batch = store::ProjectionBatch {
            first_seq: 3,
            last_seq: 3,
            orders: vec![order],
            audit: vec![store::AuditRow {
                seq: 3,
                kind: "cancel".into(),
                detail: "order 5".into(),
                command_digest: digest,
                hash: third,
            }],
            ..store::ProjectionBatch::default()
        };
        store.write_projection("read_models", &batch).await.unwrap();
        let orders = store.orders_of_user(9, None, None, None, 10).await.unwrap();
        assert_eq!(
            orders
                .iter()
                .map(|o| (o.accepted_seq, o.status))
                .collect::<Vec<_>>(),
            [(2, "cancelled"), (1, "filled")],
            "{name}"
        );
        let audit = store.verify_audit(None).await.unwrap();
        assert_eq!(
            (audit.entries, audit.head, audit.problem),
            (3, third, None),
            "{name}"
        );
        store.close().await;
    }
}
