//! Agora's storage: one interface over SQLite (the embedded default) and PostgreSQL.
//!
//! The store keeps the journal (batches of encoded commands, each chained to the previous one
//! by a SHA-256 checksum), snapshots of the whole state, and projection offsets. It knows SQL
//! and nothing of what the bytes mean: the core encodes commands and state. The backend is
//! chosen by the URL: `sqlite://PATH` (a file, created with its directory when missing) or
//! `postgres://…`. Both run the same versioned migrations, written once per dialect.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Row};

pub use accounts::{ApiKeyRow, UserRow};
pub use idempotency::{IdempotencyBegin, IdempotencyRow};
pub use queue::{
    Added, ClaimedJob, DeadFilter, Ended, Failure, FailureBucket, FailureRow, JOB_STATES,
    JOBS_CHANNEL, JobListener, JobRow, NewJob, PARENT_CHAIN_MAX, ParentChange, ParentRef,
    QueueKeep, ScheduleRow, Settled, StateCount, Tx,
};
pub use withdrawals::{WITHDRAWAL_STATUSES, WithdrawalFilter, WithdrawalRow};

/// Named bounds.
pub mod limits {
    /// Connections in a pool.
    pub const POOL_CONNECTIONS_MAX: u32 = 8;
    /// Bytes in one journal batch payload.
    pub const BATCH_PAYLOAD_BYTES_MAX: usize = 64 * 1024 * 1024;
    /// Commands in one journal batch.
    pub const BATCH_COMMANDS_MAX: u64 = 1_000_000;
    /// Batches one read returns.
    pub const READ_BATCHES_MAX: usize = 10_000;
    /// How long a connection waits for a locked SQLite database before failing.
    pub const SQLITE_BUSY_TIMEOUT_MS: u64 = 5_000;
    /// SQLite: journal appends between two background WAL checkpoints.
    pub const CHECKPOINT_EVERY_APPENDS: u64 = 64;
    /// SQLite: the default of [`StoreOptions::wal_frames_behind_max`]: 65,536 frames are
    /// about 256 MiB of log at SQLite's default 4 KiB pages.
    pub const WAL_FRAMES_BEHIND_MAX: u64 = 65_536;
    /// How long acquiring a pooled connection may take.
    pub const ACQUIRE_TIMEOUT_MS: u64 = 10_000;
    /// Rows one page of a listing returns (users, orders, trades, a user's API keys).
    pub const PAGE_ROWS_MAX: usize = 1_000;
}

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
/// The read models' own file on SQLite (see [`sqlite_read_models_path`]).
static SQLITE_READ_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite_read");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL names no supported backend, or cannot be parsed.
    #[error("invalid database URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The database refused or failed an operation (I/O, constraint, connection).
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Running the migrations failed.
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// A batch does not continue the journal: it must follow the last batch without a gap.
    #[error(
        "batch {batch} with first sequence {first_seq} does not follow the journal's tail ({expected_batch}, {expected_seq})"
    )]
    OutOfOrder {
        /// The batch number given.
        batch: u64,
        /// Its first sequence number.
        first_seq: u64,
        /// The batch number expected.
        expected_batch: u64,
        /// The first sequence number expected.
        expected_seq: u64,
    },
    /// A failure injected by a test (see [`Store::inject_append_failure_after`]).
    #[error("injected append failure")]
    Injected,
    /// A batch is empty or over a limit.
    #[error("invalid batch: {0}")]
    InvalidBatch(&'static str),
    /// A job names a queue that was never declared.
    #[error("unknown queue {0:?}")]
    UnknownQueue(String),
    /// A row would take a unique name or key that is already taken: `what` says which
    /// (`username`, `api key`).
    #[error("{what} is already taken")]
    Duplicate {
        /// What is taken.
        what: &'static str,
    },
    /// An API key names a user that does not exist.
    #[error("unknown user {0}")]
    UnknownUser(u64),
    /// A child job names a parent that is not waiting for children.
    #[error("job {0} is not waiting for children")]
    ParentNotWaiting(i64),
    /// Stored data fails its checksum or its chain.
    #[error("corrupt {what} at {position}: {problem}")]
    Corrupt {
        /// `journal batch` or `snapshot`.
        what: &'static str,
        /// Batch number or snapshot sequence.
        position: u64,
        /// What is wrong.
        problem: String,
    },
}

/// How hard SQLite works to keep a commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous=FULL`: every commit is fsynced; survives power loss.
    Full,
    /// `synchronous=NORMAL` in WAL mode: survives a killed process, not a power loss.
    Normal,
}

/// Options for opening a store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// SQLite only: how commits are made durable. PostgreSQL follows the server's settings.
    pub durability: Durability,
    /// Connections in the pool.
    pub connections: u32,
    /// PostgreSQL only: the schema to use (created when missing). Tests use one per test.
    pub pg_schema: Option<String>,
    /// SQLite only: WAL frames (pages) left uncopied into the database beyond which the next
    /// checkpoint runs inside an append, waiting for readers, instead of beside it.
    pub wal_frames_behind_max: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            durability: Durability::Full,
            connections: 4,
            pg_schema: None,
            wal_frames_behind_max: limits::WAL_FRAMES_BEHIND_MAX,
        }
    }
}

/// A journal batch as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalBatch {
    /// Batch number, from 1 without gaps.
    pub batch: u64,
    /// Sequence number of its first command, from 1 without gaps across batches.
    pub first_seq: u64,
    /// Number of commands.
    pub commands: u64,
    /// The encoded commands.
    pub payload: Vec<u8>,
    /// SHA-256 over the previous batch's checksum and this batch.
    pub checksum: [u8; 32],
}

impl JournalBatch {
    /// Sequence number of the last command in the batch.
    pub fn last_seq(&self) -> u64 {
        self.first_seq + self.commands - 1
    }
}

/// A stored snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The last command sequence number the snapshot includes.
    pub seq: u64,
    /// The state hash at that point.
    pub state_hash: [u8; 32],
    /// The encoded state.
    pub payload: Vec<u8>,
}

/// The journal's end: what the next batch must follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tail {
    /// Last batch number (0 for an empty journal).
    pub batch: u64,
    /// Last command sequence number (0 for an empty journal).
    pub seq: u64,
    /// Checksum of the last batch (zeros for an empty journal).
    pub checksum: [u8; 32],
}

impl Tail {
    const EMPTY: Tail = Tail {
        batch: 0,
        seq: 0,
        checksum: [0; 32],
    };
}

/// An order's row in the `orders` read model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderRow {
    /// Market.
    pub market: u32,
    /// Order id.
    pub order_id: u64,
    /// Sequence number of the command that accepted it.
    pub accepted_seq: u64,
    /// Owner.
    pub user: u64,
    /// `buy` or `sell`.
    pub side: &'static str,
    /// Order type name.
    pub order_type: &'static str,
    /// Limit or protection price in the market's units, when it has one.
    pub price: Option<i64>,
    /// Quantity committed.
    pub qty: u64,
    /// Quantity filled.
    pub filled: u64,
    /// Quantity still open.
    pub open_qty: u64,
    /// `open`, `filled`, `cancelled` or `expired`.
    pub status: &'static str,
    /// Sequence number of the last command that changed it.
    pub updated_seq: u64,
}

/// A trade's row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TradeRow {
    /// The command that caused it.
    pub seq: u64,
    /// Its position among that command's trades.
    pub n: u32,
    /// Market.
    pub market: u32,
    /// Resting order.
    pub maker: u64,
    /// Incoming order.
    pub taker: u64,
    /// Resting order's owner.
    pub maker_user: u64,
    /// Incoming order's owner.
    pub taker_user: u64,
    /// `buy` or `sell`.
    pub taker_side: &'static str,
    /// Price in the market's units.
    pub price: i64,
    /// Quantity in the market's units.
    pub qty: u64,
}

/// A ledger posting's row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalanceRow {
    /// The command that caused it.
    pub seq: u64,
    /// Its position among that command's postings.
    pub n: u32,
    /// `user:<id>` or `fees`.
    pub owner: String,
    /// Asset.
    pub asset: u32,
    /// `available`, `held` or `external`.
    pub bucket: &'static str,
    /// Signed change in minor units.
    pub delta: i128,
}

/// An audit entry: one per journaled command, chained by hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRow {
    /// The command's sequence number.
    pub seq: u64,
    /// The command's kind.
    pub kind: String,
    /// A short description.
    pub detail: String,
    /// SHA-256 of the encoded command as journaled.
    pub command_digest: [u8; 32],
    /// [`audit_hash`] of this entry, over the previous entry's hash (zeros for the first).
    pub hash: [u8; 32],
}

/// The hash that chains audit entries.
pub fn audit_hash(
    prev_hash: &[u8; 32],
    seq: u64,
    kind: &str,
    detail: &str,
    command_digest: &[u8; 32],
) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(prev_hash);
    hasher.update(seq.to_le_bytes());
    hasher.update((kind.len() as u64).to_le_bytes());
    hasher.update(kind.as_bytes());
    hasher.update((detail.len() as u64).to_le_bytes());
    hasher.update(detail.as_bytes());
    hasher.update(command_digest);
    hasher.finalize().into()
}

/// Rows for the read models from a run of journaled commands ending at `last_seq`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProjectionBatch {
    /// The first command covered.
    pub first_seq: u64,
    /// The last command covered: the projection's new offset.
    pub last_seq: u64,
    /// Orders created or changed (upserted).
    pub orders: Vec<OrderRow>,
    /// New trades.
    pub trades: Vec<TradeRow>,
    /// New postings.
    pub balances: Vec<BalanceRow>,
    /// New audit entries.
    pub audit: Vec<AuditRow>,
    /// Withdrawals requested or changed (upserted).
    pub withdrawals: Vec<WithdrawalRow>,
}

/// The outcome of checking the audit chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditReport {
    /// Entries that passed.
    pub entries: u64,
    /// The last entry's hash.
    pub head: [u8; 32],
    /// The first problem, if any, by sequence number.
    pub problem: Option<(u64, String)>,
}

/// Rows per multi-row insert statement (well below both backends' parameter limits).
const INSERT_ROWS_MAX: usize = 500;

/// Prepared statements each connection keeps (sqlx's default is 100).
///
/// Every bound LIMIT and OFFSET in this crate is written `CAST($n AS BIGINT)`. SQLite reads a
/// bare bound LIMIT while it plans the statement and then marks the statement to be prepared
/// again whenever that parameter is bound anew, which sqlx does at every execution: a claim of
/// jobs spent about a million instructions preparing itself again each time. The multi-row
/// statements come in a few shapes per table (see [`statement_chunks`]), and the projection
/// and the queue share the SQLite writer's connection.
const STATEMENT_CACHE_CAPACITY: usize = 256;

/// Splits `rows` for multi-row statements. On SQLite: chunks of `max` rows, then, for the
/// rest, of the powers of two below `max` that it needs (300 rows: 256, 32, 8 and 4). A
/// statement's text follows its row count, and a connection prepares each text once and then
/// finds it in its statement cache; with these lengths a table has at most a dozen texts,
/// where any row count would give most writes a text of their own, parsed again in the
/// writer's thread. On PostgreSQL every statement is a round trip, so the rest goes in one:
/// chunks of `max` rows and one of what remains.
pub(crate) fn statement_chunks<T>(
    rows: &[T],
    max: usize,
    sqlite: bool,
) -> impl Iterator<Item = &[T]> {
    let max = max.max(1);
    let mut rest = rows;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let take = match rest.len() {
            n if n >= max => max,
            n if sqlite => 1 << n.ilog2(),
            n => n,
        };
        let (chunk, tail) = rest.split_at(take);
        rest = tail;
        Some(chunk)
    })
}

/// Options shared by the SQLite pools. A pooled SQLite connection is a library handle in this
/// process, not a socket that the other end may have closed: testing it before each use (sqlx's
/// default, a `ping` sent to the connection's worker thread and answered from it) only adds a
/// round trip between threads to every acquire, such as one per journal append.
fn sqlite_pool() -> SqlitePoolOptions {
    SqlitePoolOptions::new().test_before_acquire(false)
}

/// The outcome of checking the whole journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalReport {
    /// Batches that passed.
    pub batches: u64,
    /// Commands in them.
    pub commands: u64,
    /// The first problem, if any: everything from there on is not trustworthy.
    pub problem: Option<(u64, String)>,
}

enum Backend {
    /// SQLite allows one writer at a time per file. Every write to the database file goes
    /// through `writer`, a pool of one connection, so writers queue for it in order instead of
    /// sleeping in SQLite's busy handler; reads use `readers`, which WAL mode lets run beside
    /// the writer. The read models live in a second file with its own pair of pools, so that
    /// projecting them runs beside the journal's appends instead of between them.
    Sqlite {
        readers: SqlitePool,
        writer: SqlitePool,
        read_models: SqlitePool,
        read_models_writer: SqlitePool,
    },
    Postgres(PgPool),
}

/// Runs the same query code against whichever pool the store reads from.
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.backend {
            Backend::Sqlite { readers: $pool, .. } => $body,
            Backend::Postgres($pool) => $body,
        }
    };
}

/// Runs the same query code against whichever pool reads the read models (the tables the
/// projector writes: orders, trades, balance changes, audit, withdrawals, offsets).
macro_rules! on_read_models {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.backend {
            Backend::Sqlite {
                read_models: $pool, ..
            } => $body,
            Backend::Postgres($pool) => $body,
        }
    };
}

/// Runs the same query code against whichever pool writes the read models.
macro_rules! on_read_models_writer {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.backend {
            Backend::Sqlite {
                read_models_writer: $pool,
                ..
            } => $body,
            Backend::Postgres($pool) => $body,
        }
    };
}

/// Runs the same query code against whichever pool the store writes with.
macro_rules! on_writer {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.backend {
            Backend::Sqlite { writer: $pool, .. } => $body,
            Backend::Postgres($pool) => $body,
        }
    };
}

// After the macros, which they use.
mod accounts;
mod idempotency;
mod queue;
mod withdrawals;

/// The store. Cheap to share behind an `Arc`; appends must come from one writer at a time.
pub struct Store {
    backend: Backend,
    tail: Mutex<Tail>,
    /// Appends left before an injected failure (`u64::MAX`: never).
    appends_until_failure: AtomicU64,
    /// Projection writes still to fail (test support).
    projection_failures: AtomicU64,
    /// SQLite: appends since the last WAL checkpoint was started.
    appends_since_checkpoint: AtomicU64,
    /// SQLite: a checkpoint is running.
    checkpointing: Arc<AtomicBool>,
    /// SQLite: WAL frames not yet checkpointed, as the last checkpoint reported.
    wal_frames_behind: Arc<AtomicU64>,
    wal_frames_behind_max: u64,
    /// Per queue, a counter raised whenever jobs may have become ready, for this process's
    /// idle workers to wake on.
    wakeups: Mutex<std::collections::HashMap<String, tokio::sync::watch::Sender<u64>>>,
    /// Queues known to be declared (a queue is never removed), so that adds skip the check.
    declared_queues: Mutex<std::collections::HashSet<String>>,
}

/// The last of the rows that share a key, in the order of those last rows.
fn last_per_key<T, K: Eq + std::hash::Hash>(rows: &[T], key: impl Fn(&T) -> K) -> Vec<&T> {
    let mut seen = std::collections::HashSet::with_capacity(rows.len());
    let mut kept: Vec<&T> = rows
        .iter()
        .rev()
        .filter(|row| seen.insert(key(row)))
        .collect();
    kept.reverse();
    kept
}

fn batch_checksum(
    previous: &[u8; 32],
    batch: u64,
    first_seq: u64,
    commands: u64,
    payload: &[u8],
) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(previous);
    hasher.update(batch.to_le_bytes());
    hasher.update(first_seq.to_le_bytes());
    hasher.update(commands.to_le_bytes());
    hasher.update((payload.len() as u64).to_le_bytes());
    hasher.update(payload);
    hasher.finalize().into()
}

fn snapshot_checksum(seq: u64, state_hash: &[u8; 32], payload: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(seq.to_le_bytes());
    hasher.update(state_hash);
    hasher.update((payload.len() as u64).to_le_bytes());
    hasher.update(payload);
    hasher.finalize().into()
}

/// The file of a SQLite store's read models, beside its database file: the database file's
/// name with `.read` before its extension (`agora.db` → `agora.read.db`), or after the name
/// when it has none (`journal` → `journal.read`).
pub fn sqlite_read_models_path(database: &str) -> PathBuf {
    let path = Path::new(database);
    let name = match (path.file_stem(), path.extension()) {
        (Some(stem), Some(extension)) => {
            let mut name = stem.to_os_string();
            name.push(".read.");
            name.push(extension);
            name
        }
        _ => {
            let mut name = path.file_name().unwrap_or_default().to_os_string();
            name.push(".read");
            name
        }
    };
    path.with_file_name(name)
}

fn to_db(value: u64) -> i64 {
    i64::try_from(value).expect("sequence numbers stay below 2^63")
}

fn from_db(value: i64, what: &'static str, position: u64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt {
        what,
        position,
        problem: format!("negative number {value}"),
    })
}

fn hash32(bytes: Vec<u8>, what: &'static str, position: u64) -> Result<[u8; 32], StoreError> {
    bytes.try_into().map_err(|_| StoreError::Corrupt {
        what,
        position,
        problem: "checksum is not 32 bytes".into(),
    })
}

impl Store {
    /// Opens (and creates or migrates) the store at `url`.
    pub async fn open(url: &str, options: &StoreOptions) -> Result<Store, StoreError> {
        let invalid = |reason: String| StoreError::InvalidUrl {
            url: url.to_string(),
            reason,
        };
        let connections = options.connections.clamp(1, limits::POOL_CONNECTIONS_MAX);
        let acquire = Duration::from_millis(limits::ACQUIRE_TIMEOUT_MS);
        let backend = if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(invalid("no file path after sqlite://".into()));
            }
            if let Some(dir) = Path::new(path)
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
            {
                std::fs::create_dir_all(dir)
                    .map_err(|e| invalid(format!("cannot create {}: {e}", dir.display())))?;
            }
            let connect = SqliteConnectOptions::new()
                .filename(path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(match options.durability {
                    Durability::Full => SqliteSynchronous::Full,
                    Durability::Normal => SqliteSynchronous::Normal,
                })
                .busy_timeout(Duration::from_millis(limits::SQLITE_BUSY_TIMEOUT_MS))
                .foreign_keys(true)
                // Checkpoints run beside the writer (see `append`), not inside its commits.
                .pragma("wal_autocheckpoint", "0")
                .statement_cache_capacity(STATEMENT_CACHE_CAPACITY)
                .disable_statement_logging();
            let writer = sqlite_pool()
                .max_connections(1)
                .acquire_timeout(acquire)
                .connect_with(connect.clone())
                .await?;
            SQLITE_MIGRATIONS.run(&writer).await?;
            let readers = sqlite_pool()
                .max_connections(connections)
                .acquire_timeout(acquire)
                .connect_with(connect.clone())
                .await?;
            // The read models are rebuilt from the journal whenever they fall behind it, so
            // their commits need no fsync of their own (`synchronous=NORMAL`: a killed process
            // loses nothing, a power loss at most the newest projection transactions, which
            // the projector writes again from its stored offset); SQLite checkpoints their log
            // itself, inside the projector's commits, which nothing waits for.
            let read_connect = connect
                .filename(sqlite_read_models_path(path))
                .synchronous(SqliteSynchronous::Normal)
                .pragma("wal_autocheckpoint", "1000");
            let read_models_writer = sqlite_pool()
                .max_connections(1)
                .acquire_timeout(acquire)
                // A projection's multi-row INSERTs each keep a statement journal (the pages
                // they change, to undo the statement alone if it fails); in memory, instead of
                // a temporary file per transaction written page by page.
                .connect_with(read_connect.clone().pragma("temp_store", "MEMORY"))
                .await?;
            SQLITE_READ_MIGRATIONS.run(&read_models_writer).await?;
            let read_models = sqlite_pool()
                .max_connections(connections)
                .acquire_timeout(acquire)
                .connect_with(read_connect)
                .await?;
            Backend::Sqlite {
                readers,
                writer,
                read_models,
                read_models_writer,
            }
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let mut connect =
                PgConnectOptions::from_str(url).map_err(|e| invalid(e.to_string()))?;
            connect = connect
                .statement_cache_capacity(STATEMENT_CACHE_CAPACITY)
                .disable_statement_logging();
            if let Some(schema) = &options.pg_schema {
                let valid = !schema.is_empty()
                    && schema.len() <= 63
                    && schema
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                if !valid {
                    return Err(invalid(format!(
                        "schema name {schema:?} must be lower-case letters, digits and _"
                    )));
                }
                // Create the schema once, then make every pooled connection use it.
                let mut admin = connect.clone().connect().await?;
                // The name was checked above to be a plain identifier.
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "CREATE SCHEMA IF NOT EXISTS {schema}"
                )))
                .execute(&mut admin)
                .await?;
                connect = connect.options([("search_path", schema.as_str())]);
            }
            let pool = PgPoolOptions::new()
                .max_connections(connections)
                .acquire_timeout(acquire)
                .connect_with(connect)
                .await?;
            POSTGRES_MIGRATIONS.run(&pool).await?;
            Backend::Postgres(pool)
        } else {
            return Err(invalid("expected sqlite://PATH or postgres://…".into()));
        };
        let store = Store {
            backend,
            tail: Mutex::new(Tail::EMPTY),
            appends_until_failure: AtomicU64::new(u64::MAX),
            projection_failures: AtomicU64::new(0),
            appends_since_checkpoint: AtomicU64::new(0),
            checkpointing: Arc::new(AtomicBool::new(false)),
            wal_frames_behind: Arc::new(AtomicU64::new(0)),
            wal_frames_behind_max: options.wal_frames_behind_max,
            wakeups: Mutex::new(std::collections::HashMap::new()),
            declared_queues: Mutex::new(std::collections::HashSet::new()),
        };
        let tail = store.load_tail().await?;
        *store.tail.lock().expect("tail lock") = tail;
        Ok(store)
    }

    fn is_sqlite(&self) -> bool {
        matches!(self.backend, Backend::Sqlite { .. })
    }

    /// `sqlite` or `postgres`.
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite { .. } => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// The journal's end as last appended or loaded.
    pub fn tail(&self) -> Tail {
        *self.tail.lock().expect("tail lock")
    }

    /// The sequence number of the journal's last command as the database holds it now (the
    /// store's [`Store::tail`] is as this process last appended or loaded it; another process
    /// may have appended since).
    pub async fn journal_end(&self) -> Result<u64, StoreError> {
        Ok(self.load_tail().await?.seq)
    }

    async fn load_tail(&self) -> Result<Tail, StoreError> {
        let sql =
            "SELECT batch, first_seq, commands, checksum FROM journal ORDER BY batch DESC LIMIT 1";
        let tail = on_pool!(self, pool => {
            match sqlx::query(sql).fetch_optional(pool).await? {
                None => Tail::EMPTY,
                Some(row) => {
                    let batch = from_db(row.try_get("batch")?, "journal batch", 0)?;
                    let first_seq = from_db(row.try_get("first_seq")?, "journal batch", batch)?;
                    let commands = from_db(row.try_get("commands")?, "journal batch", batch)?;
                    Tail {
                        batch,
                        seq: first_seq + commands.saturating_sub(1),
                        checksum: hash32(row.try_get("checksum")?, "journal batch", batch)?,
                    }
                }
            }
        });
        Ok(tail)
    }

    /// Appends the next batch of `commands` encoded commands in one transaction and returns it
    /// as stored. The commit is durable when this returns (per the store's durability).
    pub async fn append(
        &self,
        commands: u64,
        payload: Vec<u8>,
    ) -> Result<JournalBatch, StoreError> {
        if commands == 0 || commands > limits::BATCH_COMMANDS_MAX {
            return Err(StoreError::InvalidBatch(
                "a batch holds 1 to 1,000,000 commands",
            ));
        }
        if payload.len() > limits::BATCH_PAYLOAD_BYTES_MAX {
            return Err(StoreError::InvalidBatch(
                "a batch payload is at most 64 MiB",
            ));
        }
        let left = self.appends_until_failure.load(Ordering::Relaxed);
        if left != u64::MAX {
            if left == 0 {
                return Err(StoreError::Injected);
            }
            self.appends_until_failure
                .store(left - 1, Ordering::Relaxed);
        }
        let tail = self.tail();
        let batch = JournalBatch {
            batch: tail.batch + 1,
            first_seq: tail.seq + 1,
            commands,
            checksum: batch_checksum(
                &tail.checksum,
                tail.batch + 1,
                tail.seq + 1,
                commands,
                &payload,
            ),
            payload,
        };
        let sql = "INSERT INTO journal (batch, first_seq, commands, payload, checksum) VALUES ($1, $2, $3, $4, $5)";
        on_writer!(self, pool => {
            sqlx::query(sql)
                .bind(to_db(batch.batch))
                .bind(to_db(batch.first_seq))
                .bind(to_db(batch.commands))
                .bind(&batch.payload)
                .bind(&batch.checksum[..])
                .execute(pool)
                .await?
                .rows_affected()
        });
        *self.tail.lock().expect("tail lock") = Tail {
            batch: batch.batch,
            seq: batch.last_seq(),
            checksum: batch.checksum,
        };
        self.maybe_checkpoint().await;
        Ok(batch)
    }

    /// SQLite: every [`limits::CHECKPOINT_EVERY_APPENDS`] appends, starts a passive WAL
    /// checkpoint on another pooled connection, so that copying the log into the database
    /// never runs inside (and delays) a journal commit. Durability does not depend on it: a
    /// commit is durable once its log frames are synced.
    ///
    /// A passive checkpoint cannot copy frames that an open reader may still need, so a
    /// long-lived reader lets the log grow. Once the last checkpoint left more than
    /// [`StoreOptions::wal_frames_behind_max`] frames behind, the checkpoint runs here instead, as
    /// `RESTART` (it waits up to the busy timeout for readers to finish), which delays this
    /// append but bounds the log. [`Store::wal_frames_behind`] reports the backlog.
    async fn maybe_checkpoint(&self) {
        let Backend::Sqlite { readers: pool, .. } = &self.backend else {
            return;
        };
        if self
            .appends_since_checkpoint
            .fetch_add(1, Ordering::Relaxed)
            + 1
            < limits::CHECKPOINT_EVERY_APPENDS
        {
            return;
        }
        if self.checkpointing.swap(true, Ordering::AcqRel) {
            return;
        }
        self.appends_since_checkpoint.store(0, Ordering::Relaxed);
        let pool = pool.clone();
        let running = self.checkpointing.clone();
        let behind = self.wal_frames_behind.clone();
        if behind.load(Ordering::Relaxed) > self.wal_frames_behind_max {
            checkpoint(&pool, "PRAGMA wal_checkpoint(RESTART)", &behind).await;
            running.store(false, Ordering::Release);
            return;
        }
        tokio::spawn(async move {
            checkpoint(&pool, "PRAGMA wal_checkpoint(PASSIVE)", &behind).await;
            running.store(false, Ordering::Release);
        });
    }

    /// SQLite: WAL frames that the last checkpoint could not copy into the database (0 for
    /// PostgreSQL). It stays small unless a reader holds an old snapshot open.
    pub fn wal_frames_behind(&self) -> u64 {
        self.wal_frames_behind.load(Ordering::Relaxed)
    }

    /// Up to `limit` batches from batch number `from` on, in order, each checked against its
    /// checksum chain (the batch before `from` supplies the first link).
    pub async fn read(&self, from: u64, limit: usize) -> Result<Vec<JournalBatch>, StoreError> {
        let limit = limit.clamp(1, limits::READ_BATCHES_MAX);
        let start = from.max(1);
        // Past the first batch, the batch before `start` is read too: its checksum is the
        // first link of the chain.
        let with_link = start > 1;
        let sql = "SELECT batch, first_seq, commands, payload, checksum FROM journal WHERE batch >= $1 ORDER BY batch LIMIT CAST($2 AS BIGINT)";
        let rows: Vec<JournalBatch> = on_pool!(self, pool => {
            sqlx::query(sql)
                .bind(to_db(start - u64::from(with_link)))
                .bind((limit + usize::from(with_link)) as i64)
                .fetch_all(pool)
                .await?
                .iter()
                .map(decode_batch)
                .collect::<Result<_, _>>()?
        });
        let mut rows = rows.into_iter();
        let (mut link, mut expected_batch, mut expected_seq) = if with_link {
            let Some(before) = rows.next() else {
                return Ok(Vec::new());
            };
            if before.batch != start - 1 {
                return Err(StoreError::Corrupt {
                    what: "journal batch",
                    position: start - 1,
                    problem: "missing".into(),
                });
            }
            (before.checksum, start, before.last_seq() + 1)
        } else {
            ([0; 32], 1, 1)
        };
        let mut batches = Vec::with_capacity(rows.len());
        for batch in rows {
            check_batch(&batch, &link, expected_batch, expected_seq)?;
            link = batch.checksum;
            expected_batch = batch.batch + 1;
            expected_seq = batch.last_seq() + 1;
            batches.push(batch);
        }
        Ok(batches)
    }

    /// Walks the whole journal checking numbering and the checksum chain; reports the first
    /// problem with its position instead of failing.
    pub async fn verify_journal(&self) -> Result<JournalReport, StoreError> {
        let mut report = JournalReport {
            batches: 0,
            commands: 0,
            problem: None,
        };
        let mut link = [0u8; 32];
        let mut expected_batch = 1;
        let mut expected_seq = 1;
        let sql = "SELECT batch, first_seq, commands, payload, checksum FROM journal WHERE batch >= $1 ORDER BY batch LIMIT CAST($2 AS BIGINT)";
        loop {
            let rows: Vec<Result<JournalBatch, StoreError>> = on_pool!(self, pool => {
                sqlx::query(sql)
                    .bind(to_db(expected_batch))
                    .bind(256i64)
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(decode_batch)
                    .collect()
            });
            if rows.is_empty() {
                return Ok(report);
            }
            for row in rows {
                let batch = match row {
                    Ok(batch) => batch,
                    Err(error) => {
                        report.problem = Some((expected_batch, error.to_string()));
                        return Ok(report);
                    }
                };
                if let Err(error) = check_batch(&batch, &link, expected_batch, expected_seq) {
                    report.problem = Some((expected_batch, error.to_string()));
                    return Ok(report);
                }
                report.batches += 1;
                report.commands += batch.commands;
                link = batch.checksum;
                expected_batch = batch.batch + 1;
                expected_seq = batch.last_seq() + 1;
            }
        }
    }

    /// Stores a snapshot of the state after command `seq`.
    pub async fn put_snapshot(
        &self,
        snapshot: &Snapshot,
        created_at_ms: i64,
    ) -> Result<(), StoreError> {
        let checksum = snapshot_checksum(snapshot.seq, &snapshot.state_hash, &snapshot.payload);
        let sql = "INSERT INTO snapshots (seq, state_hash, payload, checksum, created_at_ms) VALUES ($1, $2, $3, $4, $5)";
        on_writer!(self, pool => {
            sqlx::query(sql)
                .bind(to_db(snapshot.seq))
                .bind(&snapshot.state_hash[..])
                .bind(&snapshot.payload)
                .bind(&checksum[..])
                .bind(created_at_ms)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(())
    }

    /// The newest snapshot whose checksum holds, and the positions of newer ones that failed
    /// it (reported, never used).
    pub async fn latest_valid_snapshot(
        &self,
    ) -> Result<(Option<Snapshot>, Vec<(u64, String)>), StoreError> {
        let mut rejected = Vec::new();
        let seqs_sql = "SELECT seq FROM snapshots ORDER BY seq DESC";
        let seqs: Vec<i64> = on_pool!(self, pool => {
            sqlx::query(seqs_sql)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| row.try_get::<i64, _>("seq"))
                .collect::<Result<_, _>>()?
        });
        let sql = "SELECT seq, state_hash, payload, checksum FROM snapshots WHERE seq = $1";
        for seq in seqs {
            let decoded = on_pool!(self, pool => {
                decode_snapshot(&sqlx::query(sql).bind(seq).fetch_one(pool).await?)
            });
            match decoded {
                Ok(snapshot) => return Ok((Some(snapshot), rejected)),
                Err(error) => rejected.push((seq as u64, error.to_string())),
            }
        }
        Ok((None, rejected))
    }

    /// Deletes snapshots older than the newest `keep`.
    pub async fn prune_snapshots(&self, keep: u64) -> Result<u64, StoreError> {
        let sql = "DELETE FROM snapshots WHERE seq NOT IN (SELECT seq FROM snapshots ORDER BY seq DESC LIMIT CAST($1 AS BIGINT))";
        let done = on_writer!(self, pool => sqlx::query(sql).bind(to_db(keep)).execute(pool).await?.rows_affected());
        Ok(done)
    }

    /// The number of the batch holding command `seq`, if the journal has it.
    pub async fn batch_containing(&self, seq: u64) -> Result<Option<u64>, StoreError> {
        let sql = "SELECT batch FROM journal WHERE first_seq <= $1 AND first_seq + commands > $1 ORDER BY batch DESC LIMIT 1";
        let batch: Option<i64> = on_pool!(self, pool => {
            match sqlx::query(sql).bind(to_db(seq)).fetch_optional(pool).await? {
                Some(row) => Some(row.try_get("batch")?),
                None => None,
            }
        });
        batch.map(|b| from_db(b, "journal batch", seq)).transpose()
    }

    /// Test support: after `appends` more successful appends, every append fails with
    /// [`StoreError::Injected`] (as a failed commit or fsync would), so callers' failure paths
    /// can be tested.
    #[doc(hidden)]
    pub fn inject_append_failure_after(&self, appends: u64) {
        self.appends_until_failure.store(appends, Ordering::Relaxed);
    }

    /// Test support: the next `writes` projection writes fail with [`StoreError::Injected`]
    /// and change nothing, as a failed commit would.
    #[doc(hidden)]
    pub fn inject_projection_failures(&self, writes: u64) {
        self.projection_failures.store(writes, Ordering::Relaxed);
    }

    /// How far the named projection has applied the journal (0: nothing yet).
    pub async fn projection_offset(&self, name: &str) -> Result<u64, StoreError> {
        let sql = "SELECT seq FROM projection_offsets WHERE name = $1";
        let seq: Option<i64> = on_read_models!(self, pool => {
            match sqlx::query(sql).bind(name).fetch_optional(pool).await? {
                Some(row) => Some(row.try_get("seq")?),
                None => None,
            }
        });
        seq.map_or(Ok(0), |s| from_db(s, "projection offset", 0))
    }

    /// Writes a projection batch and moves the named projection's offset to its last command,
    /// in one transaction. Refused unless the batch starts right after the stored offset, so a
    /// batch is never projected twice.
    pub async fn write_projection(
        &self,
        name: &str,
        batch: &ProjectionBatch,
    ) -> Result<(), StoreError> {
        if self
            .projection_failures
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(StoreError::Injected);
        }
        on_read_models_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            let stored: Option<i64> = sqlx::query("SELECT seq FROM projection_offsets WHERE name = $1")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?
                .map(|row| row.try_get("seq"))
                .transpose()?;
            let expected = stored.unwrap_or(0) as u64 + 1;
            if batch.first_seq != expected || batch.last_seq < batch.first_seq {
                return Err(StoreError::OutOfOrder {
                    batch: batch.first_seq,
                    first_seq: batch.last_seq,
                    expected_batch: expected,
                    expected_seq: expected,
                });
            }
            // An upsert statement may not change one row twice (PostgreSQL refuses it), and a
            // batch may change an order several times: its last row is its state. An order is
            // keyed by the command that accepted it (a command accepts at most one).
            let orders = last_per_key(&batch.orders, |o| o.accepted_seq);
            for chunk in statement_chunks(&orders, INSERT_ROWS_MAX, self.is_sqlite()) {
                let mut query = sqlx::QueryBuilder::new(
                    "INSERT INTO orders (market, order_id, accepted_seq, user_id, side, order_type, price, qty, filled, open_qty, status, updated_seq) ",
                );
                query.push_values(chunk, |mut row, order| {
                    row.push_bind(i64::from(order.market))
                        .push_bind(order.order_id as i64)
                        .push_bind(to_db(order.accepted_seq))
                        .push_bind(order.user as i64)
                        .push_bind(order.side)
                        .push_bind(order.order_type)
                        .push_bind(order.price)
                        .push_bind(order.qty as i64)
                        .push_bind(order.filled as i64)
                        .push_bind(order.open_qty as i64)
                        .push_bind(order.status)
                        .push_bind(to_db(order.updated_seq));
                });
                query.push(
                    " ON CONFLICT (accepted_seq) DO UPDATE SET price = excluded.price, qty = excluded.qty, filled = excluded.filled, open_qty = excluded.open_qty, status = excluded.status, updated_seq = excluded.updated_seq",
                );
                query.build().execute(&mut *tx).await?;
            }
            for chunk in statement_chunks(&batch.trades, INSERT_ROWS_MAX, self.is_sqlite()) {
                let mut query = sqlx::QueryBuilder::new(
                    "INSERT INTO trades (seq, n, market, maker, taker, maker_user, taker_user, taker_side, price, qty) ",
                );
                query.push_values(chunk, |mut row, trade| {
                    row.push_bind(to_db(trade.seq))
                        .push_bind(i64::from(trade.n))
                        .push_bind(i64::from(trade.market))
                        .push_bind(trade.maker as i64)
                        .push_bind(trade.taker as i64)
                        .push_bind(trade.maker_user as i64)
                        .push_bind(trade.taker_user as i64)
                        .push_bind(trade.taker_side)
                        .push_bind(trade.price)
                        .push_bind(trade.qty as i64);
                });
                query.build().execute(&mut *tx).await?;
            }
            for chunk in statement_chunks(&batch.balances, INSERT_ROWS_MAX, self.is_sqlite()) {
                let mut query = sqlx::QueryBuilder::new(
                    "INSERT INTO balance_changes (seq, n, owner, asset, bucket, delta) ",
                );
                query.push_values(chunk, |mut row, change| {
                    row.push_bind(to_db(change.seq))
                        .push_bind(i64::from(change.n))
                        .push_bind(change.owner.clone())
                        .push_bind(i64::from(change.asset))
                        .push_bind(change.bucket)
                        .push_bind(change.delta.to_string());
                });
                query.build().execute(&mut *tx).await?;
            }
            for chunk in statement_chunks(&batch.audit, INSERT_ROWS_MAX, self.is_sqlite()) {
                let mut query = sqlx::QueryBuilder::new(
                    "INSERT INTO audit (seq, kind, detail, command_digest, hash) ",
                );
                query.push_values(chunk, |mut row, entry| {
                    row.push_bind(to_db(entry.seq))
                        .push_bind(entry.kind.clone())
                        .push_bind(entry.detail.clone())
                        .push_bind(entry.command_digest.to_vec())
                        .push_bind(entry.hash.to_vec());
                });
                query.build().execute(&mut *tx).await?;
            }
            let withdrawals = last_per_key(&batch.withdrawals, |w| w.id);
            for chunk in statement_chunks(&withdrawals, INSERT_ROWS_MAX, self.is_sqlite()) {
                let mut query = sqlx::QueryBuilder::new(
                    "INSERT INTO withdrawals (id, user_id, asset, amount, destination, status, requested_seq, updated_seq) ",
                );
                query.push_values(chunk, |mut row, withdrawal| {
                    row.push_bind(withdrawal.id as i64)
                        .push_bind(withdrawal.user as i64)
                        .push_bind(i64::from(withdrawal.asset))
                        .push_bind(withdrawal.amount.to_string())
                        .push_bind(withdrawal.destination.clone())
                        .push_bind(withdrawal.status)
                        .push_bind(to_db(withdrawal.requested_seq))
                        .push_bind(to_db(withdrawal.updated_seq));
                });
                query.push(
                    // The server never uses an id twice, but the core only needs it unique among
                    // pending withdrawals: a reused id's row describes its latest use.
                    " ON CONFLICT (id) DO UPDATE SET user_id = excluded.user_id, asset = excluded.asset, amount = excluded.amount, destination = excluded.destination, status = excluded.status, requested_seq = excluded.requested_seq, updated_seq = excluded.updated_seq",
                );
                query.build().execute(&mut *tx).await?;
            }
            sqlx::query("INSERT INTO projection_offsets (name, seq) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET seq = excluded.seq")
                .bind(name)
                .bind(to_db(batch.last_seq))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Empties the read models and the named offset, so they can be rebuilt from the journal.
    pub async fn reset_projection(&self, name: &str) -> Result<(), StoreError> {
        on_read_models_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            for sql in ["DELETE FROM orders", "DELETE FROM trades", "DELETE FROM balance_changes", "DELETE FROM audit", "DELETE FROM withdrawals"] {
                sqlx::query(sql).execute(&mut *tx).await?;
            }
            sqlx::query("DELETE FROM projection_offsets WHERE name = $1").bind(name).execute(&mut *tx).await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Rows in each read model: orders, trades, balance changes, audit entries.
    pub async fn projection_counts(&self) -> Result<[u64; 4], StoreError> {
        let mut counts = [0; 4];
        for (slot, table) in ["orders", "trades", "balance_changes", "audit"]
            .iter()
            .enumerate()
        {
            let sql = format!("SELECT COUNT(*) AS n FROM {table}");
            let n: i64 = on_read_models!(self, pool => {
                sqlx::query(sqlx::AssertSqlSafe(sql.clone())).fetch_one(pool).await?.try_get("n")?
            });
            counts[slot] = n as u64;
        }
        Ok(counts)
    }

    /// Per owner and asset, the sum of the projected balance changes to available and held
    /// funds: equal to the ledger's balances when the projection is complete.
    pub async fn projected_balances(&self) -> Result<BTreeMap<(String, u32), i128>, StoreError> {
        let sql = "SELECT owner, asset, delta FROM balance_changes WHERE bucket <> 'external'";
        let rows: Vec<(String, i64, String)> = on_read_models!(self, pool => {
            sqlx::query(sql)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| Ok::<_, sqlx::Error>((row.try_get("owner")?, row.try_get("asset")?, row.try_get("delta")?)))
                .collect::<Result<_, _>>()?
        });
        let mut sums = BTreeMap::new();
        for (owner, asset, delta) in rows {
            let delta: i128 = delta.parse().map_err(|_| StoreError::Corrupt {
                what: "balance change",
                position: 0,
                problem: format!("delta {delta:?} is not an integer"),
            })?;
            *sums.entry((owner, asset as u32)).or_insert(0) += delta;
        }
        sums.retain(|_, sum| *sum != 0);
        Ok(sums)
    }

    /// How many projected orders have each status.
    pub async fn order_statuses(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let sql = "SELECT status, COUNT(*) AS n FROM orders GROUP BY status";
        let rows: Vec<(String, i64)> = on_read_models!(self, pool => {
            sqlx::query(sql)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| Ok::<_, sqlx::Error>((row.try_get("status")?, row.try_get("n")?)))
                .collect::<Result<_, _>>()?
        });
        Ok(rows
            .into_iter()
            .map(|(status, n)| (status, n as u64))
            .collect())
    }

    /// The hash of the last audit entry (zeros when there is none).
    pub async fn audit_head(&self) -> Result<[u8; 32], StoreError> {
        let sql = "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1";
        let head = on_read_models!(self, pool => {
            match sqlx::query(sql).fetch_optional(pool).await? {
                None => [0; 32],
                Some(row) => {
                    let seq = from_db(row.try_get("seq")?, "audit entry", 0)?;
                    hash32(row.try_get("hash")?, "audit entry", seq)?
                }
            }
        });
        Ok(head)
    }

    /// Walks the audit trail checking numbering and the hash chain, and that each entry's
    /// command digest matches the journaled command (`digests[seq - 1]`, when given).
    pub async fn verify_audit(
        &self,
        digests: Option<&[[u8; 32]]>,
    ) -> Result<AuditReport, StoreError> {
        let mut report = AuditReport {
            entries: 0,
            head: [0; 32],
            problem: None,
        };
        let sql = "SELECT seq, kind, detail, command_digest, hash FROM audit WHERE seq >= $1 ORDER BY seq LIMIT 1000";
        loop {
            let rows: Vec<AuditRow> = on_read_models!(self, pool => {
                sqlx::query(sql)
                    .bind(to_db(report.entries + 1))
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(|row| {
                        let seq = from_db(row.try_get("seq")?, "audit entry", 0)?;
                        Ok::<_, StoreError>(AuditRow {
                            seq,
                            kind: row.try_get("kind")?,
                            detail: row.try_get("detail")?,
                            command_digest: hash32(row.try_get("command_digest")?, "audit entry", seq)?,
                            hash: hash32(row.try_get("hash")?, "audit entry", seq)?,
                        })
                    })
                    .collect::<Result<_, _>>()?
            });
            if rows.is_empty() {
                return Ok(report);
            }
            for row in rows {
                let expected = report.entries + 1;
                let problem = if row.seq != expected {
                    Some("an entry is missing")
                } else if audit_hash(
                    &report.head,
                    expected,
                    &row.kind,
                    &row.detail,
                    &row.command_digest,
                ) != row.hash
                {
                    Some("its hash does not match its contents")
                } else if digests
                    .is_some_and(|d| d.get(expected as usize - 1) != Some(&row.command_digest))
                {
                    Some("it does not match the journaled command")
                } else {
                    None
                };
                if let Some(problem) = problem {
                    report.problem = Some((expected, problem.to_string()));
                    return Ok(report);
                }
                report.head = row.hash;
                report.entries += 1;
            }
        }
    }

    /// Closes the pool, waiting for connections to finish.
    pub async fn close(&self) {
        match &self.backend {
            Backend::Sqlite {
                readers,
                writer,
                read_models,
                read_models_writer,
            } => {
                readers.close().await;
                writer.close().await;
                read_models.close().await;
                read_models_writer.close().await;
            }
            Backend::Postgres(pool) => pool.close().await,
        }
    }
}

/// Runs one WAL checkpoint and records how many log frames it left behind. A failed
/// checkpoint changes nothing durable; it leaves the backlog as it was, to be retried.
async fn checkpoint(pool: &SqlitePool, pragma: &'static str, behind: &AtomicU64) {
    // The pragma answers (busy, frames in the log, frames checkpointed); -1 when not in WAL.
    if let Ok(row) = sqlx::query(pragma).fetch_one(pool).await {
        let log: i64 = row.try_get(1).unwrap_or(0);
        let done: i64 = row.try_get(2).unwrap_or(0);
        behind.store(u64::try_from(log - done).unwrap_or(0), Ordering::Relaxed);
    }
}

fn decode_batch<R: Row>(row: &R) -> Result<JournalBatch, StoreError>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    let batch = from_db(row.try_get("batch")?, "journal batch", 0)?;
    Ok(JournalBatch {
        batch,
        first_seq: from_db(row.try_get("first_seq")?, "journal batch", batch)?,
        commands: from_db(row.try_get("commands")?, "journal batch", batch)?,
        payload: row.try_get("payload")?,
        checksum: hash32(row.try_get("checksum")?, "journal batch", batch)?,
    })
}

fn check_batch(
    batch: &JournalBatch,
    link: &[u8; 32],
    expected_batch: u64,
    expected_seq: u64,
) -> Result<(), StoreError> {
    let corrupt = |problem: String| StoreError::Corrupt {
        what: "journal batch",
        position: batch.batch,
        problem,
    };
    if batch.batch != expected_batch {
        return Err(corrupt(format!(
            "expected batch {expected_batch}: a batch is missing"
        )));
    }
    if batch.first_seq != expected_seq || batch.commands == 0 {
        return Err(corrupt(format!(
            "sequence {} with {} commands does not follow {}",
            batch.first_seq,
            batch.commands,
            expected_seq - 1
        )));
    }
    let computed = batch_checksum(
        link,
        batch.batch,
        batch.first_seq,
        batch.commands,
        &batch.payload,
    );
    if computed != batch.checksum {
        return Err(corrupt(
            "checksum does not match its contents and the chain".into(),
        ));
    }
    Ok(())
}

fn decode_snapshot<R: Row>(row: &R) -> Result<Snapshot, StoreError>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    let seq = from_db(row.try_get("seq")?, "snapshot", 0)?;
    let snapshot = Snapshot {
        seq,
        state_hash: hash32(row.try_get("state_hash")?, "snapshot", seq)?,
        payload: row.try_get("payload")?,
    };
    let checksum = hash32(row.try_get("checksum")?, "snapshot", seq)?;
    if snapshot_checksum(seq, &snapshot.state_hash, &snapshot.payload) != checksum {
        return Err(StoreError::Corrupt {
            what: "snapshot",
            position: seq,
            problem: "checksum does not match its contents".into(),
        });
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::statement_chunks;

    #[test]
    fn statement_chunks_cover_the_rows_in_order_with_few_lengths() {
        let mut lengths = std::collections::BTreeSet::new();
        for n in 0..=2_100usize {
            let rows: Vec<usize> = (0..n).collect();
            let chunks: Vec<&[usize]> = statement_chunks(&rows, 500, true).collect();
            assert_eq!(chunks.concat(), rows, "{n} rows, in order, each once");
            for chunk in &chunks {
                assert!(!chunk.is_empty() && chunk.len() <= 500);
                lengths.insert(chunk.len());
            }
        }
        // 500 and the powers of two below it: ten statement texts per table, not 500.
        assert_eq!(
            lengths.into_iter().collect::<Vec<_>>(),
            [1, 2, 4, 8, 16, 32, 64, 128, 256, 500]
        );
        let three_hundred: Vec<usize> = statement_chunks(&[0u8; 300], 500, true)
            .map(<[u8]>::len)
            .collect();
        assert_eq!(three_hundred, [256, 32, 8, 4]);
    }
}
