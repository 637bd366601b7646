//! The job queue's tables: declared queues, jobs and their failed attempts.
//!
//! The store runs the SQL and knows nothing of what the columns mean beyond what the SQL needs:
//! `crates/queue` validates options, decides retries and backoff, and names the states. Every
//! time is a millisecond timestamp given by the caller, so tests drive the clock.
//!
//! Claiming takes the next ready jobs of a queue (priority, then due time, then id) and marks
//! them active under a new lease token in one transaction: on SQLite's single writer, a read
//! of the jobs and then an update by their ids (an `UPDATE … RETURNING` costs SQLite a fifth
//! more work per job: docs/performance.md); on PostgreSQL, one `UPDATE … RETURNING` over rows
//! taken `FOR UPDATE SKIP LOCKED`, so that concurrent claimers never wait for each other's
//! rows. The token (a per-job counter raised at every claim) fences every later report: a
//! heartbeat, progress, completion or failure under an older token changes nothing.

use std::collections::BTreeSet;

use sqlx::{QueryBuilder, Row};

use crate::{Backend, Store, StoreError};

/// The channel PostgreSQL notifications about new jobs go to; the payload is the queue name.
pub const JOBS_CHANNEL: &str = "agora_jobs";

/// Jobs inserted by one multi-row statement (SQLite allows 32,766 bound values per statement;
/// a job binds 20).
const INSERT_JOBS_MAX: usize = 1_000;

/// Completions written by one statement (a completion binds 3 values).
const COMPLETE_ROWS_MAX: usize = 1_000;
/// Priorities of a queue's waiting jobs that the due-time query skips through one by one;
/// beyond them it reads the queue's whole ready index.
const DUE_PRIORITIES_SKIPPED_MAX: i64 = 64;

/// How far up a chain of parents one child's end is followed (a safety bound: the queue
/// refuses deeper flows before they are written).
pub const PARENT_CHAIN_MAX: usize = 32;

/// Bytes kept of the message a parent dies with when a child dies.
const PARENT_ERROR_BYTES_MAX: usize = 4096;

/// The parent of a job being added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParentRef {
    /// A stored job that is waiting for children.
    Job(i64),
    /// An earlier job of the same add (its index), added as a parent.
    Earlier(usize),
}

/// A job to add, already validated by the queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewJob {
    /// A declared queue.
    pub queue: String,
    /// The job type.
    pub kind: String,
    /// JSON text.
    pub payload: String,
    /// Lower runs first.
    pub priority: i32,
    /// Not claimed before this time.
    pub run_at_ms: i64,
    /// Claims allowed in all.
    pub attempts_max: u32,
    /// `fixed` or `exponential`.
    pub backoff: &'static str,
    /// The first retry's delay.
    pub backoff_ms: u64,
    /// No retry waits longer.
    pub backoff_max_ms: u64,
    /// How much of a backoff is random, in percent.
    pub jitter_pct: u8,
    /// How long one attempt may run.
    pub timeout_ms: u64,
    /// A deduplication key and the time until which it holds.
    pub dedup: Option<(String, i64)>,
    /// The parent this job is a child of.
    pub parent: Option<ParentRef>,
    /// Parents: the job first waits for its children, and this says what a dead child does
    /// to it: `fail_parent`, `ignore` or `wait`.
    pub on_child_failure: Option<&'static str>,
    /// How long to keep the job once it completed.
    pub keep_completed_ms: Option<u64>,
    /// How long to keep the job once it died or was discarded.
    pub keep_failed_ms: Option<u64>,
    /// The schedule and the tick that enqueue it.
    pub schedule: Option<(String, i64)>,
}

/// What adding one job did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Added {
    /// A new job with this id.
    New(i64),
    /// Nothing: a job holding the same deduplication key exists, with this id.
    Duplicate(i64),
}

impl Added {
    /// The new or the existing job's id.
    pub fn id(self) -> i64 {
        match self {
            Added::New(id) | Added::Duplicate(id) => id,
        }
    }
}

/// A claimed job, as a worker receives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimedJob {
    /// Its id.
    pub id: i64,
    /// Its queue.
    pub queue: String,
    /// Its type.
    pub kind: String,
    /// JSON text.
    pub payload: String,
    /// Its priority.
    pub priority: i32,
    /// When it became due.
    pub run_at_ms: i64,
    /// Claims so far, this one included.
    pub attempts: u32,
    /// Claims allowed in all.
    pub attempts_max: u32,
    /// `fixed` or `exponential`.
    pub backoff: String,
    /// The first retry's delay.
    pub backoff_ms: u64,
    /// No retry waits longer.
    pub backoff_max_ms: u64,
    /// Random share of a backoff, in percent.
    pub jitter_pct: u8,
    /// How long this attempt may run.
    pub timeout_ms: u64,
    /// The lease token every report must carry.
    pub lease: i64,
    /// When the lease ends unless a heartbeat extends it.
    pub lease_until_ms: i64,
}

/// A stored job, as the operator sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobRow {
    /// Its id.
    pub id: i64,
    /// Its queue.
    pub queue: String,
    /// Its type.
    pub kind: String,
    /// JSON text.
    pub payload: String,
    /// Its priority.
    pub priority: i32,
    /// `waiting`, `active`, `completed`, `dead` or `discarded`.
    pub state: String,
    /// Not claimed before.
    pub run_at_ms: i64,
    /// Claims so far.
    pub attempts: u32,
    /// Claims allowed.
    pub attempts_max: u32,
    /// The current lease token.
    pub lease: i64,
    /// When the current lease ends (active jobs).
    pub lease_until_ms: Option<i64>,
    /// The worker holding it (active jobs) or that last held it.
    pub worker: Option<String>,
    /// Its deduplication key, while it holds.
    pub dedup_key: Option<String>,
    /// The handler's last progress report (JSON).
    pub progress: Option<String>,
    /// The completion's result (JSON).
    pub result: Option<String>,
    /// The last failure's category.
    pub error_category: Option<String>,
    /// The last failure's message.
    pub error: Option<String>,
    /// Dead jobs: what to do about it.
    pub strategy: Option<String>,
    /// When it was added.
    pub created_ms: i64,
    /// When its last attempt started.
    pub started_ms: Option<i64>,
    /// When it completed or died.
    pub finished_ms: Option<i64>,
    /// The parent it is a child of.
    pub parent_id: Option<i64>,
    /// Parents: children not yet ended.
    pub children_pending: u32,
    /// The schedule that enqueued it.
    pub schedule: Option<String>,
    /// The schedule's tick it was enqueued for.
    pub schedule_tick_ms: Option<i64>,
}

/// A job that ended by a report, with what metrics and events need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ended {
    /// Its queue.
    pub queue: String,
    /// Its type.
    pub kind: String,
    /// Claims so far.
    pub attempts: u32,
    /// When the attempt that ended started.
    pub started_ms: Option<i64>,
}

/// A parent whose state a child's end changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentChange {
    /// The parent.
    pub id: i64,
    /// Its queue.
    pub queue: String,
    /// Its type.
    pub kind: String,
    /// `waiting` (its last child ended: it runs now) or `dead` (a child died and the parent's
    /// policy is `fail_parent`).
    pub state: &'static str,
}

/// What a batch of completions did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// Per completion, in order: the ended job, or `None` under a stale lease.
    pub jobs: Vec<Option<Ended>>,
    /// Parents released or failed by these ends.
    pub parents: Vec<ParentChange>,
}

/// A queue's retention rules; `None` keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueKeep {
    /// Keep at most this many completed jobs (the newest).
    pub completed_last: Option<u64>,
    /// Keep completed jobs this long after they completed.
    pub completed_ms: Option<u64>,
    /// Keep at most this many dead or discarded jobs (the newest).
    pub failed_last: Option<u64>,
    /// Keep dead or discarded jobs this long after they ended.
    pub failed_ms: Option<u64>,
}

/// A stored schedule: a job template enqueued at every tick.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduleRow {
    /// Its unique name.
    pub name: String,
    /// A five-field crontab expression (UTC); `None` with an interval.
    pub cron: Option<String>,
    /// A fixed interval; `None` with a cron expression.
    pub every_ms: Option<u64>,
    /// The next tick to enqueue.
    pub next_tick_ms: i64,
    /// The job each tick enqueues. Stored: its queue, type, payload, priority, attempts,
    /// backoff, timeout and retention; a firing sets its due time and its tick.
    pub job: NewJob,
}

/// One failed attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailureRow {
    /// The attempt's number.
    pub attempt: u32,
    /// When it failed.
    pub at_ms: i64,
    /// Its category.
    pub category: String,
    /// Its message.
    pub message: String,
}

/// How a failed attempt ends, decided by the queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Its category.
    pub category: &'static str,
    /// Its message.
    pub message: String,
    /// Retry at this time, or (`None`) move the job to the dead-letter queue.
    pub retry_at_ms: Option<i64>,
    /// Dead jobs: the recovery strategy.
    pub strategy: &'static str,
}

/// Jobs of a queue per state (`delayed`: waiting, not yet due) and priority.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateCount {
    /// The state, or `delayed`.
    pub state: String,
    /// The priority.
    pub priority: i32,
    /// How many.
    pub jobs: u64,
}

/// Which dead jobs to list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeadFilter {
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this error category.
    pub category: Option<String>,
    /// Only jobs whose last error message or type contains this text.
    pub text: Option<String>,
    /// Only jobs that died at or after this time.
    pub since_ms: Option<i64>,
}

/// Failures of one category (and message) within one time window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailureBucket {
    /// The window's start.
    pub window_start_ms: i64,
    /// The category.
    pub category: String,
    /// The message.
    pub message: String,
    /// Failed attempts with that message in that window.
    pub failures: u64,
}

const JOB_COLUMNS: &str = "id, queue, kind, payload, priority, state, run_at_ms, attempts, attempts_max, lease, lease_until_ms, worker, dedup_key, progress, result, error_category, error, strategy, created_ms, started_ms, finished_ms, parent_id, children_pending, schedule, schedule_tick_ms";
const SCHEDULE_COLUMNS: &str = "name, queue, kind, payload, cron, every_ms, next_tick_ms, priority, attempts_max, backoff, backoff_ms, backoff_max_ms, jitter_pct, timeout_ms, keep_completed_ms, keep_failed_ms";

/// Every state a job can be in.
pub const JOB_STATES: [&str; 6] = [
    "waiting",
    "waiting_children",
    "active",
    "completed",
    "dead",
    "discarded",
];

/// The states jobs rest in (waiting for children, or ended), as the predicate of the
/// `jobs_by_state` index (migration 0011): a query names it word for word so that SQLite, too,
/// sees that the index applies. Comparisons, not an IN list: SQLite tests a partial index's
/// predicate on every row it writes, and an IN list there costs a temporary table per row.
macro_rules! at_rest {
    () => {
        "state <> 'waiting' AND state <> 'active'"
    };
}
const AT_REST: &str = at_rest!();

/// Ended jobs (completed, dead or discarded), as the predicate of the `jobs_finished` index
/// (migration 0011), named word for word as [`at_rest!`] is.
macro_rules! ended {
    () => {
        concat!(at_rest!(), " AND state <> 'waiting_children'")
    };
}

/// The condition selecting one state's jobs, in the form that lets the planner use the
/// partial index holding them; `None` for a state no job is ever in.
fn state_filter(state: &str) -> Option<&'static str> {
    Some(match state {
        "waiting" => "state = 'waiting'",
        "active" => "state = 'active'",
        "waiting_children" => concat!("state = 'waiting_children' AND ", at_rest!()),
        "completed" => concat!("state = 'completed' AND ", at_rest!()),
        "dead" => concat!("state = 'dead' AND ", at_rest!()),
        "discarded" => concat!("state = 'discarded' AND ", at_rest!()),
        _ => return None,
    })
}

/// The earliest due time of a queue's waiting jobs, skipping through the ready index from
/// one priority to the next (binds: queue, most priorities to skip through); also how many
/// priorities it went through. Each step is an ordered read of one index entry (`ORDER BY …
/// LIMIT 1` rather than `MIN`, which PostgreSQL may answer by reading the whole range).
const NEXT_DUE_SKIPPING_SQL: &str = "WITH RECURSIVE p (priority, n) AS ( \
       SELECT (SELECT priority FROM jobs WHERE queue = $1 AND state = 'waiting' ORDER BY priority LIMIT 1), 1 \
       UNION ALL \
       SELECT (SELECT priority FROM jobs WHERE queue = $1 AND state = 'waiting' AND priority > p.priority ORDER BY priority LIMIT 1), p.n + 1 \
       FROM p WHERE p.priority IS NOT NULL AND p.n < $2) \
     SELECT MIN((SELECT run_at_ms FROM jobs WHERE queue = $1 AND state = 'waiting' AND priority = p.priority ORDER BY run_at_ms LIMIT 1)) AS due, \
       COUNT(p.priority) AS priorities \
     FROM p WHERE p.priority IS NOT NULL";
/// The same, reading the queue's whole ready index (binds: queue).
const NEXT_DUE_WHOLE_SQL: &str =
    "SELECT MIN(run_at_ms) AS due FROM jobs WHERE queue = $1 AND state = 'waiting'";

/// What a statement deleting jobs returns of each: its id if it ever failed (so has a failure
/// history to delete with it, see [`forget_failures!`]), else NULL.
macro_rules! deleted_failed {
    () => {
        " RETURNING CASE WHEN error IS NOT NULL THEN id END AS failed"
    };
}

// Each purge states its conditions twice: in the subquery that picks the jobs, and on the
// deleted row itself. On PostgreSQL the subquery's ids come from the statement's snapshot; a
// row that a transaction the purge waited for has changed meanwhile (a dead job re-driven to
// waiting, say) is checked again against the outer conditions only, so without them the
// purge would delete a job that is no longer ended.

/// The purge of ended jobs past their own `purge_at_ms` (binds: now, limit).
const PURGE_OWN_SQL: &str = concat!(
    "DELETE FROM jobs WHERE purge_at_ms <= $1 AND ",
    ended!(),
    " AND id IN (SELECT id FROM jobs WHERE purge_at_ms <= $1 AND ",
    ended!(),
    " ORDER BY purge_at_ms LIMIT CAST($2 AS BIGINT))",
    deleted_failed!()
);
/// The purge of a queue's ended jobs in two states that ended before a time (binds: queue,
/// the states, the time, limit). Naming `jobs_finished`'s predicate lets both databases use
/// that partial index, here and in [`PURGE_BY_COUNT_SQL`].
const PURGE_BY_AGE_SQL: &str = concat!(
    "DELETE FROM jobs WHERE queue = $1 AND ",
    ended!(),
    " AND state IN ($2, $3) AND finished_ms < $4",
    " AND id IN (SELECT id FROM jobs WHERE queue = $1 AND ",
    ended!(),
    " AND state IN ($2, $3) AND finished_ms < $4 ORDER BY finished_ms LIMIT CAST($5 AS BIGINT))",
    deleted_failed!()
);
/// The purge of a queue's ended jobs in two states beyond the newest ones kept (binds:
/// queue, the states, limit, how many are kept).
const PURGE_BY_COUNT_SQL: &str = concat!(
    "DELETE FROM jobs WHERE queue = $1 AND ",
    ended!(),
    " AND state IN ($2, $3) AND id IN (SELECT id FROM jobs WHERE queue = $1 AND ",
    ended!(),
    " AND state IN ($2, $3) ORDER BY finished_ms DESC, id DESC LIMIT CAST($4 AS BIGINT) OFFSET CAST($5 AS BIGINT))",
    deleted_failed!()
);

/// Sends one dead job back to waiting, due at once (binds: now, id).
const REDRIVE_SQL: &str = "UPDATE jobs SET state = 'waiting', attempts = 0, run_at_ms = $1, strategy = NULL, finished_ms = NULL, purge_at_ms = NULL \
                           WHERE id = $2 AND state = 'dead' RETURNING queue, kind";

/// Completed jobs that are deleted at once instead of kept: added with
/// `keep_completed_ms` 0 and without a parent (whose bookkeeping marks the child's row).
const DROPPED_ON_COMPLETION: &str =
    "COALESCE(jobs.keep_completed_ms, -1) = 0 AND jobs.parent_id IS NULL";

/// What a PostgreSQL completion returns of each job it ends.
const PG_ENDED_COLUMNS: &str =
    "jobs.id, jobs.lease, jobs.queue, jobs.kind, jobs.attempts, jobs.started_ms, jobs.parent_id";
/// The same columns by name.
const PG_ENDED_NAMES: &str = "id, lease, queue, kind, attempts, started_ms, parent_id";

/// A PostgreSQL completion of a chunk of jobs (binds: ids, leases and results as arrays, the
/// time): jobs kept for no time are deleted with their failure history (see
/// [`forget_failures!`]), the others marked completed, each under its lease.
static PG_COMPLETE_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH v (id, lease, result) AS (SELECT * FROM unnest($1::BIGINT[], $2::BIGINT[], $3::TEXT[])), \
                     gone AS (DELETE FROM jobs USING v WHERE jobs.id = v.id AND jobs.lease = v.lease AND jobs.state = 'active' AND {DROPPED_ON_COMPLETION} \
                       RETURNING {PG_ENDED_COLUMNS}, jobs.error IS NOT NULL AS failed), \
                     history AS (DELETE FROM job_failures WHERE job_id = ANY(ARRAY(SELECT id FROM gone WHERE failed))), \
                     kept AS (UPDATE jobs SET state = 'completed', result = v.result, lease_until_ms = NULL, finished_ms = $4, purge_at_ms = $4 + keep_completed_ms \
                     FROM v WHERE jobs.id = v.id AND jobs.lease = v.lease AND jobs.state = 'active' AND NOT ({DROPPED_ON_COMPLETION}) RETURNING {PG_ENDED_COLUMNS}) \
                     SELECT {PG_ENDED_NAMES} FROM gone UNION ALL SELECT {PG_ENDED_NAMES} FROM kept"
    )
});

/// Pushes the `(id, lease, result)` rows of a SQLite completion statement's VALUES list.
macro_rules! push_completions {
    ($statement:expr, $chunk:expr) => {
        for (n, (id, lease, result)) in $chunk.iter().enumerate() {
            if n > 0 {
                $statement.push(", ");
            }
            $statement.push("(").push_bind(*id).push(", ");
            $statement.push_bind(*lease).push(", ");
            $statement.push_bind(result.as_deref()).push(")");
        }
    };
}

/// Pushes the update that marks the jobs of the VALUES list `v` completed, under their
/// current lease.
macro_rules! push_completed_update {
    ($statement:expr, $now_ms:expr) => {
        $statement.push("UPDATE jobs SET state = 'completed', result = v.result, lease_until_ms = NULL, finished_ms = ");
        $statement.push_bind($now_ms).push(", purge_at_ms = ").push_bind($now_ms);
        $statement.push(" + keep_completed_ms FROM v WHERE jobs.id = v.id AND jobs.lease = v.lease AND jobs.state = 'active'");
    };
}

/// A queue's jobs in one state after an id, by id (binds: queue, after id, limit).
///
/// Waiting and active jobs are found through their partial indexes (not ordered by id) and
/// sorted: `+id` keeps the planner from walking the primary key from the cursor instead,
/// which passes every job in every state. SQLite, knowing nothing of the table's contents,
/// would rather scan it than the few active jobs, so it is told which index to use.
fn jobs_in_state_sql(state: &str, sqlite: bool) -> Option<String> {
    let in_state = state_filter(state)?;
    let id = if matches!(state, "waiting" | "active") {
        "+id"
    } else {
        "id"
    };
    let table = if sqlite && state == "active" {
        "jobs INDEXED BY jobs_active"
    } else {
        "jobs"
    };
    Some(format!(
        "SELECT {JOB_COLUMNS} FROM {table} WHERE queue = $1 AND {in_state} AND {id} > $2 ORDER BY id LIMIT CAST($3 AS BIGINT)"
    ))
}

/// A queue's jobs counted by state and priority (binds: now, queue). One part per partial
/// index: waiting jobs (jobs_ready), active ones (jobs_active), and the states jobs rest in
/// (jobs_by_state).
fn job_counts_sql() -> String {
    format!(
        "SELECT CASE WHEN run_at_ms > $1 THEN 'delayed' ELSE 'waiting' END AS s, priority, COUNT(*) AS n \
           FROM jobs WHERE queue = $2 AND state = 'waiting' GROUP BY s, priority \
         UNION ALL SELECT CAST('active' AS TEXT) AS s, priority, COUNT(*) AS n \
           FROM jobs WHERE queue = $2 AND state = 'active' GROUP BY priority \
         UNION ALL SELECT state AS s, priority, COUNT(*) AS n \
           FROM jobs WHERE queue = $2 AND {AT_REST} GROUP BY state, priority \
         ORDER BY s, priority"
    )
}

const CLAIMED_COLUMNS: &str = "id, queue, kind, payload, priority, run_at_ms, attempts, attempts_max, backoff, backoff_ms, backoff_max_ms, jitter_pct, timeout_ms, lease, lease_until_ms";

/// The claim: up to `$5` ready jobs of queue `$4`, in order of priority, due time and id,
/// marked active for worker `$2` under a new lease token that ends at `$1` (`$3` is now).
/// Both read the ready index (`jobs_ready`) in its order, the only index over waiting jobs
/// (migration 0013).
///
/// SQLite reads the jobs with this statement (binds: queue, now, limit) and marks them with
/// [`push_claim_mark!`], in one transaction of its single writer, so that no other claim
/// can interleave. An `UPDATE … RETURNING` would make SQLite load every column of each old
/// row for the returned values and pass the rows through a temporary table: a sixth of a
/// claim's work (callgrind, per claimed job, on the writer's thread: 40.9K instructions
/// against 34.1K).
fn claim_sql(sqlite: bool) -> String {
    if sqlite {
        format!(
            "SELECT {CLAIMED_COLUMNS} FROM jobs WHERE queue = $1 AND state = 'waiting' AND run_at_ms <= $2 \
             AND NOT EXISTS (SELECT 1 FROM queues WHERE name = $1 AND paused <> 0) \
             ORDER BY priority, run_at_ms, id LIMIT CAST($3 AS BIGINT)"
        )
    } else {
        // The locked rows are updated by their physical address (a TID scan), not looked up
        // again by id: about a sixth fewer page touches per claimed job. The lock taken by
        // the inner select keeps each row where it was until the update; the update checks
        // the state again all the same.
        format!(
            "UPDATE jobs SET state = 'active', attempts = attempts + 1, lease = lease + 1, lease_until_ms = $1, worker = $2, started_ms = $3 \
             WHERE state = 'waiting' AND ctid = ANY(ARRAY(SELECT ctid FROM jobs WHERE queue = $4 AND state = 'waiting' AND run_at_ms <= $3 \
               AND NOT EXISTS (SELECT 1 FROM queues WHERE name = $4 AND paused <> 0) \
               ORDER BY priority, run_at_ms, id LIMIT CAST($5 AS BIGINT) FOR UPDATE SKIP LOCKED)) \
             RETURNING {CLAIMED_COLUMNS}"
        )
    }
}

/// SQLite: marks the jobs a claim read, by id, under the new lease; the claim adds the same
/// one to the attempts and leases it read.
macro_rules! push_claim_mark {
    ($statement:expr, $lease_until_ms:expr, $worker:expr, $now_ms:expr, $jobs:expr) => {
        $statement.push("UPDATE jobs SET state = 'active', attempts = attempts + 1, lease = lease + 1, lease_until_ms = ");
        $statement.push_bind($lease_until_ms).push(", worker = ").push_bind($worker);
        $statement.push(", started_ms = ").push_bind($now_ms);
        $statement.push(" WHERE state = 'waiting' AND id IN (");
        let mut ids = $statement.separated(", ");
        for job in $jobs {
            ids.push_bind(job.id);
        }
        $statement.push(")");
    };
}

/// A statement that changed other rows than it was meant to: the store's own view of the
/// rows it holds locked is wrong, and the transaction is rolled back.
fn unexpected_rows(what: &str, changed: u64, expected: usize) -> StoreError {
    StoreError::Database(sqlx::Error::Protocol(format!(
        "{what} changed {changed} rows where {expected} were read in the same transaction"
    )))
}

fn unsigned(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn decode_claimed<R: Row>(row: &R) -> Result<ClaimedJob, sqlx::Error>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    Ok(ClaimedJob {
        id: row.try_get("id")?,
        queue: row.try_get("queue")?,
        kind: row.try_get("kind")?,
        payload: row.try_get("payload")?,
        priority: row.try_get::<i64, _>("priority")? as i32,
        run_at_ms: row.try_get("run_at_ms")?,
        attempts: row.try_get::<i64, _>("attempts")? as u32,
        attempts_max: row.try_get::<i64, _>("attempts_max")? as u32,
        backoff: row.try_get("backoff")?,
        backoff_ms: unsigned(row.try_get("backoff_ms")?),
        backoff_max_ms: unsigned(row.try_get("backoff_max_ms")?),
        jitter_pct: row.try_get::<i64, _>("jitter_pct")?.clamp(0, 100) as u8,
        timeout_ms: unsigned(row.try_get("timeout_ms")?),
        lease: row.try_get("lease")?,
        lease_until_ms: row.try_get("lease_until_ms")?,
    })
}

fn decode_job<R: Row>(row: &R) -> Result<JobRow, sqlx::Error>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    Ok(JobRow {
        id: row.try_get("id")?,
        queue: row.try_get("queue")?,
        kind: row.try_get("kind")?,
        payload: row.try_get("payload")?,
        priority: row.try_get::<i64, _>("priority")? as i32,
        state: row.try_get("state")?,
        run_at_ms: row.try_get("run_at_ms")?,
        attempts: row.try_get::<i64, _>("attempts")? as u32,
        attempts_max: row.try_get::<i64, _>("attempts_max")? as u32,
        lease: row.try_get("lease")?,
        lease_until_ms: row.try_get("lease_until_ms")?,
        worker: row.try_get("worker")?,
        dedup_key: row.try_get("dedup_key")?,
        progress: row.try_get("progress")?,
        result: row.try_get("result")?,
        error_category: row.try_get("error_category")?,
        error: row.try_get("error")?,
        strategy: row.try_get("strategy")?,
        created_ms: row.try_get("created_ms")?,
        started_ms: row.try_get("started_ms")?,
        finished_ms: row.try_get("finished_ms")?,
        parent_id: row.try_get("parent_id")?,
        children_pending: unsigned(row.try_get("children_pending")?) as u32,
        schedule: row.try_get("schedule")?,
        schedule_tick_ms: row.try_get("schedule_tick_ms")?,
    })
}

fn decode_schedule<R: Row>(row: &R) -> Result<ScheduleRow, sqlx::Error>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    let optional = |value: Option<i64>| value.map(unsigned);
    let backoff: String = row.try_get("backoff")?;
    Ok(ScheduleRow {
        name: row.try_get("name")?,
        cron: row.try_get("cron")?,
        every_ms: optional(row.try_get("every_ms")?),
        next_tick_ms: row.try_get("next_tick_ms")?,
        job: NewJob {
            queue: row.try_get("queue")?,
            kind: row.try_get("kind")?,
            payload: row.try_get("payload")?,
            priority: row.try_get::<i64, _>("priority")? as i32,
            run_at_ms: 0,
            attempts_max: row.try_get::<i64, _>("attempts_max")? as u32,
            backoff: if backoff == "fixed" {
                "fixed"
            } else {
                "exponential"
            },
            backoff_ms: unsigned(row.try_get("backoff_ms")?),
            backoff_max_ms: unsigned(row.try_get("backoff_max_ms")?),
            jitter_pct: row.try_get::<i64, _>("jitter_pct")?.clamp(0, 100) as u8,
            timeout_ms: unsigned(row.try_get("timeout_ms")?),
            dedup: None,
            parent: None,
            on_child_failure: None,
            keep_completed_ms: optional(row.try_get("keep_completed_ms")?),
            keep_failed_ms: optional(row.try_get("keep_failed_ms")?),
            schedule: None,
        },
    })
}

fn decode_ended<R: Row>(row: &R) -> Result<(Ended, Option<i64>), sqlx::Error>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    Ok((
        Ended {
            queue: row.try_get("queue")?,
            kind: row.try_get("kind")?,
            attempts: row.try_get::<i64, _>("attempts")? as u32,
            started_ms: row.try_get("started_ms")?,
        },
        row.try_get("parent_id")?,
    ))
}

/// The `failed` column of a row that [`deleted_failed!`] returns.
fn decode_failed<R: Row>(row: &R) -> Result<Option<i64>, sqlx::Error>
where
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    row.try_get("failed")
}

fn clip(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// Deletes the failure history of deleted jobs, given the ids of those that ever failed, on
/// an open transaction of either backend (`$conn` is `&mut *tx`). The jobs tables have no
/// foreign keys (migration 0012): every statement that deletes jobs calls this in its
/// transaction. A job has a history only if it failed, and every failure sets its `error`,
/// which nothing clears ([`deleted_failed!`]). Expands to a `Result<(), StoreError>`.
macro_rules! forget_failures {
    ($conn:expr, $failed:expr) => {{
        let failed: &[i64] = $failed;
        for chunk in crate::statement_chunks(failed, COMPLETE_ROWS_MAX, true) {
            let mut statement = QueryBuilder::new("DELETE FROM job_failures WHERE job_id IN (");
            let mut ids = statement.separated(", ");
            for id in chunk {
                ids.push_bind(*id);
            }
            statement.push(")");
            statement.build().execute(&mut *$conn).await?;
        }
        Ok::<(), StoreError>(())
    }};
}

/// A child ended (completed, died, or was discarded) on an open transaction of either
/// backend: its parent, if waiting for it, counts it, or dies of it under `fail_parent` (and
/// then its own parent reacts, and so on). `$dead` is the child's `(category, message)` when
/// it died. Expands to a `Result<(), StoreError>`; changes are pushed on `$changes`.
macro_rules! child_ended {
    ($conn:expr, $child:expr, $parent:expr, $dead:expr, $now_ms:expr, $changes:expr) => {{
        let mut child: i64 = $child;
        let mut parent: Option<i64> = $parent;
        let mut dead: Option<(String, String)> = $dead;
        let now_ms: i64 = $now_ms;
        let changes: &mut Vec<ParentChange> = $changes;
        for _ in 0..PARENT_CHAIN_MAX {
            let Some(id) = parent.take() else { break };
            let policy = sqlx::query(
                "SELECT on_child_failure FROM jobs WHERE id = $1 AND state = 'waiting_children'",
            )
            .bind(id)
            .fetch_optional(&mut *$conn)
            .await?
            .map(|row| row.try_get::<Option<String>, _>("on_child_failure"))
            .transpose()?
            .flatten();
            let Some(policy) = policy else { break };
            if dead.is_some() && policy == "wait" {
                // The parent waits until this child is re-driven and completes (or discarded).
                break;
            }
            let counted = sqlx::query(
                "UPDATE jobs SET parent_counted = 1 WHERE id = $1 AND parent_counted = 0",
            )
            .bind(child)
            .execute(&mut *$conn)
            .await?
            .rows_affected();
            if counted == 0 {
                break;
            }
            match dead.take() {
                Some((category, message)) if policy == "fail_parent" => {
                    let message = clip(
                        format!("child job {child} died: {message}"),
                        PARENT_ERROR_BYTES_MAX,
                    );
                    let row = sqlx::query(
                        "UPDATE jobs SET state = 'dead', finished_ms = $1, strategy = 'manual_review', error_category = $2, error = $3, \
                         purge_at_ms = $1 + keep_failed_ms WHERE id = $4 AND state = 'waiting_children' RETURNING queue, kind, parent_id",
                    )
                    .bind(now_ms)
                    .bind(&category)
                    .bind(&message)
                    .bind(id)
                    .fetch_optional(&mut *$conn)
                    .await?;
                    let Some(row) = row else { break };
                    changes.push(ParentChange {
                        id,
                        queue: row.try_get("queue")?,
                        kind: row.try_get("kind")?,
                        state: "dead",
                    });
                    parent = row.try_get("parent_id")?;
                    child = id;
                    dead = Some((category, message));
                }
                _ => {
                    let row = sqlx::query(
                        "UPDATE jobs SET children_pending = children_pending - 1, \
                         state = CASE WHEN children_pending <= 1 THEN 'waiting' ELSE state END \
                         WHERE id = $1 AND state = 'waiting_children' RETURNING state, queue, kind",
                    )
                    .bind(id)
                    .fetch_optional(&mut *$conn)
                    .await?;
                    if let Some(row) = row
                        && row.try_get::<String, _>("state")? == "waiting"
                    {
                        changes.push(ParentChange {
                            id,
                            queue: row.try_get("queue")?,
                            kind: row.try_get("kind")?,
                            state: "waiting",
                        });
                    }
                }
            }
        }
        Ok::<(), StoreError>(())
    }};
}

/// Adds jobs on an open transaction of either backend: `$conn` is `&mut *tx`. Expands to a
/// `Result<Vec<Added>, StoreError>`.
macro_rules! add_jobs {
    ($conn:expr, $jobs:expr, $now_ms:expr, $postgres:expr, $unchecked:expr) => {{
        let jobs: &[NewJob] = $jobs;
        let now_ms: i64 = $now_ms;
        let mut added: Vec<Option<Added>> = vec![None; jobs.len()];
        // Every queue named must be declared (those not yet known to be are looked up).
        let queues: BTreeSet<&str> = jobs.iter().map(|job| job.queue.as_str()).collect();
        let unchecked: &BTreeSet<String> = $unchecked;
        for queue in unchecked {
            let found = sqlx::query("SELECT name FROM queues WHERE name = $1")
                .bind(queue.as_str())
                .fetch_optional(&mut *$conn)
                .await?;
            if found.is_none() {
                return Err(StoreError::UnknownQueue(queue.clone()));
            }
        }
        // Jobs with a deduplication key one by one: an existing holder of the key wins until
        // its time is up, then the key passes to the new job.
        let mut plain = Vec::new();
        for (index, job) in jobs.iter().enumerate() {
            let Some((key, _)) = &job.dedup else {
                plain.push(index);
                continue;
            };
            let holder = sqlx::query(
                "SELECT id, dedup_until_ms FROM jobs WHERE queue = $1 AND dedup_key = $2",
            )
            .bind(&job.queue)
            .bind(key)
            .fetch_optional(&mut *$conn)
            .await?;
            if let Some(row) = holder {
                let id: i64 = row.try_get("id")?;
                let until: Option<i64> = row.try_get("dedup_until_ms")?;
                if until.is_some_and(|until| until > now_ms) {
                    added[index] = Some(Added::Duplicate(id));
                    continue;
                }
                sqlx::query("UPDATE jobs SET dedup_key = NULL, dedup_until_ms = NULL WHERE id = $1")
                    .bind(id)
                    .execute(&mut *$conn)
                    .await?;
            }
            plain.push(index);
        }
        // The rest in multi-row inserts. Ids grow in insertion order, so the returned ids,
        // sorted, belong to the rows in the order they were given.
        for chunk in crate::statement_chunks(&plain, INSERT_JOBS_MAX, !$postgres) {
            let mut insert = QueryBuilder::new(
                "INSERT INTO jobs (queue, kind, payload, priority, state, run_at_ms, attempts_max, backoff, backoff_ms, backoff_max_ms, jitter_pct, timeout_ms, dedup_key, dedup_until_ms, created_ms, \
                 on_child_failure, keep_completed_ms, keep_failed_ms, schedule, schedule_tick_ms) ",
            );
            insert.push_values(chunk, |mut row, &index| {
                let job = &jobs[index];
                row.push_bind(job.queue.as_str())
                    .push_bind(job.kind.as_str())
                    .push_bind(job.payload.as_str())
                    .push_bind(i64::from(job.priority))
                    .push_bind(if job.on_child_failure.is_some() {
                        "waiting_children"
                    } else {
                        "waiting"
                    })
                    .push_bind(job.run_at_ms)
                    .push_bind(i64::from(job.attempts_max))
                    .push_bind(job.backoff)
                    .push_bind(job.backoff_ms as i64)
                    .push_bind(job.backoff_max_ms as i64)
                    .push_bind(i64::from(job.jitter_pct))
                    .push_bind(job.timeout_ms as i64)
                    .push_bind(job.dedup.as_ref().map(|(key, _)| key.as_str()))
                    .push_bind(job.dedup.as_ref().map(|(_, until)| *until))
                    .push_bind(now_ms)
                    .push_bind(job.on_child_failure)
                    .push_bind(job.keep_completed_ms.map(|ms| ms as i64))
                    .push_bind(job.keep_failed_ms.map(|ms| ms as i64))
                    .push_bind(job.schedule.as_ref().map(|(name, _)| name.as_str()))
                    .push_bind(job.schedule.as_ref().map(|(_, tick)| *tick));
            });
            insert.push(" RETURNING id");
            let mut ids: Vec<i64> = insert
                .build()
                .fetch_all(&mut *$conn)
                .await?
                .iter()
                .map(|row| row.try_get::<i64, _>("id"))
                .collect::<Result<_, _>>()?;
            ids.sort_unstable();
            for (&index, id) in chunk.iter().zip(ids) {
                added[index] = Some(Added::New(id));
            }
        }
        // Children: each new one is linked to its parent and counted there.
        let mut children: std::collections::BTreeMap<i64, Vec<i64>> = Default::default();
        let mut parents: BTreeSet<i64> = BTreeSet::new();
        for (index, job) in jobs.iter().enumerate() {
            if job.on_child_failure.is_some()
                && let Some(Added::New(id)) = added[index]
            {
                parents.insert(id);
            }
            let (Some(parent), Some(Added::New(child))) = (job.parent, added[index]) else {
                continue;
            };
            let parent = match parent {
                ParentRef::Job(id) => id,
                ParentRef::Earlier(earlier) => match added.get(earlier).copied().flatten() {
                    Some(added) if earlier < index => added.id(),
                    _ => {
                        return Err(StoreError::InvalidBatch(
                            "a child's parent must come before it in the add",
                        ))
                    }
                },
            };
            children.entry(parent).or_default().push(child);
        }
        for (parent, ids) in &children {
            let counted = sqlx::query(
                "UPDATE jobs SET children_pending = children_pending + $1 WHERE id = $2 AND state = 'waiting_children'",
            )
            .bind(ids.len() as i64)
            .bind(*parent)
            .execute(&mut *$conn)
            .await?
            .rows_affected();
            if counted != 1 {
                return Err(StoreError::ParentNotWaiting(*parent));
            }
            for chunk in crate::statement_chunks(ids, INSERT_JOBS_MAX, !$postgres) {
                let mut link = QueryBuilder::new("UPDATE jobs SET parent_id = ");
                link.push_bind(*parent).push(" WHERE id IN (");
                let mut list = link.separated(", ");
                for id in chunk {
                    list.push_bind(*id);
                }
                link.push(")");
                link.build().execute(&mut *$conn).await?;
            }
        }
        // A new parent with no child pending (none given, or all duplicates) runs at once.
        for parent in &parents {
            sqlx::query(
                "UPDATE jobs SET state = 'waiting' WHERE id = $1 AND state = 'waiting_children' AND children_pending = 0",
            )
            .bind(*parent)
            .execute(&mut *$conn)
            .await?;
        }
        if $postgres {
            for queue in &queues {
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(JOBS_CHANNEL)
                    .bind(*queue)
                    .execute(&mut *$conn)
                    .await?;
            }
        }
        let added: Vec<Added> = added
            .into_iter()
            .map(|a| a.expect("every job is inserted or found a duplicate"))
            .collect();
        Ok::<Vec<Added>, StoreError>(added)
    }};
}

/// A transaction on the store, for a business change and the jobs it causes to commit
/// together. Dropped without [`Tx::commit`], it rolls back.
pub struct Tx<'s> {
    store: &'s Store,
    inner: TxInner,
    queues: BTreeSet<String>,
}

enum TxInner {
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
}

impl Tx<'_> {
    /// Adds jobs inside this transaction; they exist (and wake workers) only once it commits.
    pub async fn add_jobs(
        &mut self,
        jobs: &[NewJob],
        now_ms: i64,
    ) -> Result<Vec<Added>, StoreError> {
        let unchecked: BTreeSet<String> = {
            let known = self
                .store
                .declared_queues
                .lock()
                .expect("declared queues lock");
            jobs.iter()
                .filter(|job| !known.contains(&job.queue))
                .map(|job| job.queue.clone())
                .collect()
        };
        let added = match &mut self.inner {
            TxInner::Sqlite(tx) => add_jobs!(&mut **tx, jobs, now_ms, false, &unchecked)?,
            TxInner::Postgres(tx) => add_jobs!(&mut **tx, jobs, now_ms, true, &unchecked)?,
        };
        if !unchecked.is_empty() {
            let mut known = self
                .store
                .declared_queues
                .lock()
                .expect("declared queues lock");
            known.extend(unchecked);
        }
        self.queues.extend(jobs.iter().map(|job| job.queue.clone()));
        Ok(added)
    }

    /// Moves schedule `name` from tick `tick_ms` to `next_tick_ms`; false when its next tick is
    /// not `tick_ms` any more (another scheduler fired it first) or it is gone.
    pub async fn advance_schedule(
        &mut self,
        name: &str,
        tick_ms: i64,
        next_tick_ms: i64,
    ) -> Result<bool, StoreError> {
        let sql =
            "UPDATE job_schedules SET next_tick_ms = $1 WHERE name = $2 AND next_tick_ms = $3";
        let changed = match &mut self.inner {
            TxInner::Sqlite(tx) => sqlx::query(sql)
                .bind(next_tick_ms)
                .bind(name)
                .bind(tick_ms)
                .execute(&mut **tx)
                .await?
                .rows_affected(),
            TxInner::Postgres(tx) => sqlx::query(sql)
                .bind(next_tick_ms)
                .bind(name)
                .bind(tick_ms)
                .execute(&mut **tx)
                .await?
                .rows_affected(),
        };
        Ok(changed == 1)
    }

    /// Commits, then wakes this process's workers of every queue that received jobs.
    pub async fn commit(self) -> Result<(), StoreError> {
        match self.inner {
            TxInner::Sqlite(tx) => tx.commit().await?,
            TxInner::Postgres(tx) => tx.commit().await?,
        }
        for queue in &self.queues {
            self.store.wake_workers(queue);
        }
        Ok(())
    }

    /// Rolls back: nothing done inside happened.
    pub async fn rollback(self) -> Result<(), StoreError> {
        match self.inner {
            TxInner::Sqlite(tx) => tx.rollback().await?,
            TxInner::Postgres(tx) => tx.rollback().await?,
        }
        Ok(())
    }
}

impl Store {
    /// Begins a write transaction.
    pub async fn begin(&self) -> Result<Tx<'_>, StoreError> {
        let inner = match &self.backend {
            Backend::Sqlite { writer, .. } => TxInner::Sqlite(writer.begin().await?),
            Backend::Postgres(pool) => TxInner::Postgres(pool.begin().await?),
        };
        Ok(Tx {
            store: self,
            inner,
            queues: BTreeSet::new(),
        })
    }

    /// Declares a queue (again: nothing changes).
    pub async fn declare_queue(&self, name: &str) -> Result<(), StoreError> {
        let sql = "INSERT INTO queues (name, paused) VALUES ($1, 0) ON CONFLICT (name) DO NOTHING";
        on_writer!(self, pool => sqlx::query(sql).bind(name).execute(pool).await?.rows_affected());
        self.declared_queues
            .lock()
            .expect("declared queues lock")
            .insert(name.to_string());
        Ok(())
    }

    /// Every declared queue with whether it is paused.
    pub async fn queues(&self) -> Result<Vec<(String, bool)>, StoreError> {
        let sql = "SELECT name, paused FROM queues ORDER BY name";
        let rows = on_pool!(self, pool => {
            sqlx::query(sql)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| Ok((row.try_get("name")?, row.try_get::<i64, _>("paused")? != 0)))
                .collect::<Result<Vec<_>, sqlx::Error>>()?
        });
        Ok(rows)
    }

    /// Pauses or resumes a queue; false when it is not declared.
    pub async fn set_queue_paused(&self, name: &str, paused: bool) -> Result<bool, StoreError> {
        let sql = "UPDATE queues SET paused = $1 WHERE name = $2";
        let changed = on_writer!(self, pool => {
            sqlx::query(sql)
                .bind(i64::from(paused))
                .bind(name)
                .execute(pool)
                .await?
                .rows_affected()
        });
        if changed > 0 && !paused {
            self.wake_workers(name);
        }
        Ok(changed > 0)
    }

    /// Adds jobs in one transaction (all or none) and wakes the workers of their queues.
    pub async fn add_jobs(&self, jobs: &[NewJob], now_ms: i64) -> Result<Vec<Added>, StoreError> {
        if let [job] = jobs
            && job.dedup.is_none()
            && job.parent.is_none()
            && job.on_child_failure.is_none()
            && self
                .declared_queues
                .lock()
                .expect("declared queues lock")
                .contains(&job.queue)
        {
            // One plain job to a known queue: one statement, atomic by itself, instead of a
            // transaction of several.
            let id = self.insert_one_job(job, now_ms).await?;
            self.wake_workers(&job.queue);
            return Ok(vec![Added::New(id)]);
        }
        let mut tx = self.begin().await?;
        let added = tx.add_jobs(jobs, now_ms).await?;
        tx.commit().await?;
        Ok(added)
    }

    async fn insert_one_job(&self, job: &NewJob, now_ms: i64) -> Result<i64, StoreError> {
        const INSERT: &str = "INSERT INTO jobs (queue, kind, payload, priority, state, run_at_ms, attempts_max, backoff, backoff_ms, backoff_max_ms, jitter_pct, timeout_ms, \
                              created_ms, keep_completed_ms, keep_failed_ms, schedule, schedule_tick_ms) \
                              VALUES ($1, $2, $3, $4, 'waiting', $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) RETURNING id";
        // PostgreSQL: the notification for other processes' workers rides in the same
        // statement, so it is sent exactly when the insert commits.
        let sql = match &self.backend {
            Backend::Sqlite { .. } => INSERT.to_string(),
            Backend::Postgres(_) => format!(
                "WITH ins AS ({INSERT}), note AS (SELECT pg_notify('{JOBS_CHANNEL}', $1)) SELECT ins.id FROM ins, note"
            ),
        };
        let as_i64 = |value: Option<u64>| value.map(|v| v.min(i64::MAX as u64) as i64);
        let id = on_writer!(self, pool => {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(job.queue.as_str())
                .bind(job.kind.as_str())
                .bind(job.payload.as_str())
                .bind(i64::from(job.priority))
                .bind(job.run_at_ms)
                .bind(i64::from(job.attempts_max))
                .bind(job.backoff)
                .bind(job.backoff_ms as i64)
                .bind(job.backoff_max_ms as i64)
                .bind(i64::from(job.jitter_pct))
                .bind(job.timeout_ms as i64)
                .bind(now_ms)
                .bind(as_i64(job.keep_completed_ms))
                .bind(as_i64(job.keep_failed_ms))
                .bind(job.schedule.as_ref().map(|(name, _)| name.as_str()))
                .bind(job.schedule.as_ref().map(|(_, tick)| *tick))
                .fetch_one(pool)
                .await?
                .try_get::<i64, _>("id")?
        });
        Ok(id)
    }

    /// Claims up to `limit` ready jobs of `queue` for `worker`, each under a new lease token
    /// that ends at `now_ms + lease_ms`. A paused queue gives none.
    pub async fn claim_jobs(
        &self,
        queue: &str,
        limit: usize,
        now_ms: i64,
        lease_ms: u64,
        worker: &str,
    ) -> Result<Vec<ClaimedJob>, StoreError> {
        let limit = limit.max(1) as i64;
        let lease_until_ms = now_ms.saturating_add(lease_ms as i64);
        let sql = claim_sql(self.is_sqlite());
        let mut jobs = match &self.backend {
            Backend::Sqlite { writer: pool, .. } => {
                let mut tx = pool.begin().await?;
                let mut jobs = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(queue)
                    .bind(now_ms)
                    .bind(limit)
                    .fetch_all(&mut *tx)
                    .await?
                    .iter()
                    .map(decode_claimed)
                    .collect::<Result<Vec<_>, _>>()?;
                for chunk in crate::statement_chunks(&jobs, COMPLETE_ROWS_MAX, true) {
                    let mut mark = QueryBuilder::new("");
                    push_claim_mark!(mark, lease_until_ms, worker, now_ms, chunk);
                    let changed = mark.build().execute(&mut *tx).await?.rows_affected();
                    if changed != chunk.len() as u64 {
                        return Err(unexpected_rows("a claim", changed, chunk.len()));
                    }
                }
                tx.commit().await?;
                for job in &mut jobs {
                    job.attempts += 1;
                    job.lease += 1;
                    job.lease_until_ms = lease_until_ms;
                }
                jobs
            }
            Backend::Postgres(pool) => sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(lease_until_ms)
                .bind(worker)
                .bind(now_ms)
                .bind(queue)
                .bind(limit)
                .fetch_all(pool)
                .await?
                .iter()
                .map(decode_claimed)
                .collect::<Result<Vec<_>, _>>()?,
        };
        // The update returns rows in no particular order: give them in claiming order.
        jobs.sort_by_key(|job| (job.priority, job.run_at_ms, job.id));
        Ok(jobs)
    }

    /// Test support: the database's plan for a claim of `limit` jobs of `queue` at `now_ms`
    /// (`EXPLAIN QUERY PLAN` on SQLite, of the read that picks the jobs, which are then marked
    /// by id; `EXPLAIN` on PostgreSQL), a line per step, so that a test can check which index
    /// it reads. Claims nothing.
    #[doc(hidden)]
    pub async fn claim_plan(
        &self,
        queue: &str,
        limit: usize,
        now_ms: i64,
    ) -> Result<String, StoreError> {
        let limit = limit.max(1) as i64;
        let lines: Vec<String> = match &self.backend {
            Backend::Sqlite { writer: pool, .. } => sqlx::query(sqlx::AssertSqlSafe(format!(
                "EXPLAIN QUERY PLAN {}",
                claim_sql(true)
            )))
            .bind(queue)
            .bind(now_ms)
            .bind(limit)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|row| row.try_get::<String, _>("detail"))
            .collect::<Result<_, _>>()?,
            Backend::Postgres(pool) => {
                sqlx::query(sqlx::AssertSqlSafe(format!("EXPLAIN {}", claim_sql(false))))
                    .bind(now_ms)
                    .bind("plan")
                    .bind(now_ms)
                    .bind(queue)
                    .bind(limit)
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(|row| row.try_get::<String, _>("QUERY PLAN"))
                    .collect::<Result<_, _>>()?
            }
        };
        Ok(lines.join("\n"))
    }

    /// Extends an active job's lease to `now_ms + lease_ms`; false under a stale token.
    pub async fn heartbeat_job(
        &self,
        id: i64,
        lease: i64,
        now_ms: i64,
        lease_ms: u64,
    ) -> Result<bool, StoreError> {
        let sql =
            "UPDATE jobs SET lease_until_ms = $1 WHERE id = $2 AND state = 'active' AND lease = $3";
        let changed = on_writer!(self, pool => {
            sqlx::query(sql)
                .bind(now_ms.saturating_add(lease_ms as i64))
                .bind(id)
                .bind(lease)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(changed == 1)
    }

    /// Extends the leases of many active jobs, each `(id, lease)`, to `now_ms + lease_ms` in
    /// one statement; for each, false under a stale token.
    pub async fn heartbeat_jobs(
        &self,
        jobs: &[(i64, i64)],
        now_ms: i64,
        lease_ms: u64,
    ) -> Result<Vec<bool>, StoreError> {
        let postgres = matches!(self.backend, Backend::Postgres(_));
        let (bigint, returning) = if postgres {
            ("::BIGINT", "jobs.id, jobs.lease")
        } else {
            ("", "id, lease")
        };
        let until = now_ms.saturating_add(lease_ms as i64);
        let mut held = std::collections::HashSet::with_capacity(jobs.len());
        on_writer!(self, pool => for chunk in crate::statement_chunks(jobs, COMPLETE_ROWS_MAX, self.is_sqlite()) {
            let mut update = QueryBuilder::new("WITH v (id, lease) AS (VALUES ");
            for (n, (id, lease)) in chunk.iter().enumerate() {
                if n > 0 {
                    update.push(", ");
                }
                update.push("(").push_bind(*id).push(bigint).push(", ");
                update.push_bind(*lease).push(bigint).push(")");
            }
            update.push(") UPDATE jobs SET lease_until_ms = ").push_bind(until);
            update.push(" FROM v WHERE jobs.id = v.id AND jobs.lease = v.lease AND jobs.state = 'active' RETURNING ");
            update.push(returning);
            for row in update.build().fetch_all(pool).await? {
                held.insert((row.try_get::<i64, _>("id")?, row.try_get::<i64, _>("lease")?));
            }
        });
        Ok(jobs.iter().map(|job| held.contains(job)).collect())
    }

    /// Records an active job's progress (JSON); its `(queue, type)`, or `None` under a stale
    /// token.
    pub async fn job_progress(
        &self,
        id: i64,
        lease: i64,
        progress: &str,
    ) -> Result<Option<(String, String)>, StoreError> {
        let sql = "UPDATE jobs SET progress = $1 WHERE id = $2 AND state = 'active' AND lease = $3 RETURNING queue, kind";
        let job = on_writer!(self, pool => {
            sqlx::query(sql)
                .bind(progress)
                .bind(id)
                .bind(lease)
                .fetch_optional(pool)
                .await?
                .map(|row| Ok::<_, sqlx::Error>((row.try_get("queue")?, row.try_get("kind")?)))
                .transpose()?
        });
        Ok(job)
    }

    /// Completes active jobs, each `(id, lease, result JSON)`, in one transaction; for each,
    /// the ended job, or `None` when its token is stale (it changes nothing then). Parents
    /// waiting for these jobs count them.
    pub async fn complete_jobs(
        &self,
        completions: &[(i64, i64, Option<String>)],
        now_ms: i64,
    ) -> Result<Settled, StoreError> {
        // A completion named again in one call (the same id and lease) is the same job: the
        // first one's result is written and answered, the repeats are answered `None`. The
        // statements see each job once, so neither database picks between two results.
        let mut seen = std::collections::HashSet::with_capacity(completions.len());
        let repeated = completions
            .iter()
            .any(|(id, lease, _)| !seen.insert((*id, *lease)));
        let firsts: Vec<(i64, i64, Option<String>)>;
        let unique = if repeated {
            seen.clear();
            firsts = completions
                .iter()
                .filter(|(id, lease, _)| seen.insert((*id, *lease)))
                .cloned()
                .collect();
            firsts.as_slice()
        } else {
            completions
        };
        // Settles the jobs `$ended` holds (by id and lease) in the order given, reports the
        // stale ones as `None`, lets parents react, and commits `$tx`.
        macro_rules! settle {
            ($tx:expr, $ended:expr) => {{
                let mut tx = $tx;
                let mut ended = $ended;
                let mut settled = Settled {
                    jobs: Vec::with_capacity(completions.len()),
                    parents: Vec::new(),
                };
                for (id, lease, _) in completions {
                    let Some((job, parent)) = ended.remove(&(*id, *lease)) else {
                        settled.jobs.push(None);
                        continue;
                    };
                    if parent.is_some() {
                        child_ended!(&mut *tx, *id, parent, None, now_ms, &mut settled.parents)?;
                    }
                    settled.jobs.push(Some(job));
                }
                tx.commit().await?;
                settled
            }};
        }
        let mut ended = std::collections::HashMap::with_capacity(completions.len());
        let settled = match &self.backend {
            Backend::Postgres(pool) => {
                // One statement per chunk, its text the same whatever the chunk's length:
                // the completions arrive as three arrays, so PostgreSQL parses and plans it
                // once per connection instead of once per commit. The deletions and the
                // updates are two parts of it.
                let sql = PG_COMPLETE_SQL.as_str();
                let mut tx = pool.begin().await?;
                for chunk in unique.chunks(COMPLETE_ROWS_MAX) {
                    let ids: Vec<i64> = chunk.iter().map(|c| c.0).collect();
                    let leases: Vec<i64> = chunk.iter().map(|c| c.1).collect();
                    let results: Vec<Option<&str>> = chunk.iter().map(|c| c.2.as_deref()).collect();
                    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(ids)
                        .bind(leases)
                        .bind(results)
                        .bind(now_ms)
                        .fetch_all(&mut *tx)
                        .await?;
                    for row in rows {
                        let key: (i64, i64) = (row.try_get("id")?, row.try_get("lease")?);
                        ended.insert(key, decode_ended(&row)?);
                    }
                }
                settle!(tx, ended)
            }
            Backend::Sqlite { writer: pool, .. } => {
                // Per chunk, the jobs the completions still hold (active, under the lease
                // given) are read, then those kept for no time after completing (and not
                // counted by a parent) are deleted and the others marked completed, by id:
                // the purge would delete the former next. Reading first and writing without
                // `RETURNING` costs SQLite less than a delete that returns rows (see
                // `claim_sql`): 18.0K instructions per deleted job on the writer's thread
                // against 28.5K (callgrind).
                let mut failed = Vec::new();
                let mut tx = pool.begin().await?;
                for chunk in crate::statement_chunks(unique, COMPLETE_ROWS_MAX, true) {
                    let mut read = QueryBuilder::new("WITH v (id, lease) AS (VALUES ");
                    for (n, (id, lease, _)) in chunk.iter().enumerate() {
                        if n > 0 {
                            read.push(", ");
                        }
                        read.push("(")
                            .push_bind(*id)
                            .push(", ")
                            .push_bind(*lease)
                            .push(")");
                    }
                    read.push(") SELECT jobs.id, jobs.lease, jobs.queue, jobs.kind, jobs.attempts, jobs.started_ms, jobs.parent_id, ");
                    read.push(DROPPED_ON_COMPLETION).push(
                        " AS dropped, CASE WHEN jobs.error IS NOT NULL THEN jobs.id END AS failed",
                    );
                    read.push(" FROM v JOIN jobs ON jobs.id = v.id AND jobs.lease = v.lease WHERE jobs.state = 'active'");
                    let mut dropped = Vec::new();
                    let mut kept = std::collections::HashSet::new();
                    for row in read.build().fetch_all(&mut *tx).await? {
                        let key: (i64, i64) = (row.try_get("id")?, row.try_get("lease")?);
                        ended.insert(key, decode_ended(&row)?);
                        if row.try_get::<i64, _>("dropped")? != 0 {
                            dropped.push(key.0);
                            failed.extend(decode_failed(&row)?);
                        } else {
                            kept.insert(key);
                        }
                    }
                    if !dropped.is_empty() {
                        let mut delete = QueryBuilder::new("DELETE FROM jobs WHERE id IN (");
                        let mut ids = delete.separated(", ");
                        for id in &dropped {
                            ids.push_bind(*id);
                        }
                        delete.push(")");
                        let changed = delete.build().execute(&mut *tx).await?.rows_affected();
                        if changed != dropped.len() as u64 {
                            return Err(unexpected_rows("a completion", changed, dropped.len()));
                        }
                    }
                    if !kept.is_empty() {
                        let marked: Vec<_> = chunk
                            .iter()
                            .filter(|(id, lease, _)| kept.contains(&(*id, *lease)))
                            .cloned()
                            .collect();
                        let mut update =
                            QueryBuilder::new("WITH v (id, lease, result) AS (VALUES ");
                        push_completions!(update, marked);
                        update.push(") ");
                        push_completed_update!(update, now_ms);
                        let changed = update.build().execute(&mut *tx).await?.rows_affected();
                        if changed != kept.len() as u64 {
                            return Err(unexpected_rows("a completion", changed, kept.len()));
                        }
                    }
                }
                forget_failures!(&mut *tx, &failed)?;
                settle!(tx, ended)
            }
        };
        for parent in &settled.parents {
            if parent.state == "waiting" {
                self.wake_workers(&parent.queue);
            }
        }
        Ok(settled)
    }

    /// Records a failed attempt of an active job: back to waiting until `retry_at_ms`, or
    /// dead (and then its parent, if waiting for it, reacts by its policy); `None` under a
    /// stale token (nothing changes).
    pub async fn fail_job(
        &self,
        id: i64,
        lease: i64,
        failure: &Failure,
        now_ms: i64,
    ) -> Result<Option<(Ended, Vec<ParentChange>)>, StoreError> {
        let (state, run_at, finished, strategy) = match failure.retry_at_ms {
            Some(at) => ("waiting", Some(at), None, None),
            None => ("dead", None, Some(now_ms), Some(failure.strategy)),
        };
        let sql = "UPDATE jobs SET state = $1, run_at_ms = COALESCE($2, run_at_ms), finished_ms = $3, strategy = $4, error_category = $5, error = $6, lease_until_ms = NULL, \
                   purge_at_ms = $3 + keep_failed_ms WHERE id = $7 AND state = 'active' AND lease = $8 RETURNING queue, kind, attempts, started_ms, parent_id";
        let history = "INSERT INTO job_failures (job_id, attempt, at_ms, category, message) VALUES ($1, $2, $3, $4, $5)";
        let done = on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            let row = sqlx::query(sql)
                .bind(state)
                .bind(run_at)
                .bind(finished)
                .bind(strategy)
                .bind(failure.category)
                .bind(&failure.message)
                .bind(id)
                .bind(lease)
                .fetch_optional(&mut *tx)
                .await?;
            let mut changes = Vec::new();
            let done = match row {
                None => None,
                Some(row) => {
                    let (ended, parent) = decode_ended(&row)?;
                    sqlx::query(history)
                        .bind(id)
                        .bind(i64::from(ended.attempts))
                        .bind(now_ms)
                        .bind(failure.category)
                        .bind(&failure.message)
                        .execute(&mut *tx)
                        .await?;
                    if failure.retry_at_ms.is_none() && parent.is_some() {
                        let dead = Some((failure.category.to_string(), failure.message.clone()));
                        child_ended!(&mut *tx, id, parent, dead, now_ms, &mut changes)?;
                    }
                    Some(ended)
                }
            };
            tx.commit().await?;
            done.map(|ended| (ended, changes))
        });
        if let Some((ended, _)) = &done
            && failure.retry_at_ms.is_some()
        {
            // A retry may be due at once.
            self.wake_workers(&ended.queue);
        }
        Ok(done)
    }

    /// An active job as claimed under `lease`, if that is still its lease.
    pub async fn leased_job(&self, id: i64, lease: i64) -> Result<Option<ClaimedJob>, StoreError> {
        let sql = format!(
            "SELECT {CLAIMED_COLUMNS} FROM jobs WHERE id = $1 AND state = 'active' AND lease = $2"
        );
        let job = on_pool!(self, pool => {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(id)
                .bind(lease)
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(decode_claimed)
                .transpose()?
        });
        Ok(job)
    }

    /// Active jobs whose lease ended before `now_ms` (their worker stopped reporting).
    pub async fn expired_leases(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<ClaimedJob>, StoreError> {
        let sql = format!(
            "SELECT {CLAIMED_COLUMNS} FROM jobs WHERE state = 'active' AND lease_until_ms < $1 ORDER BY lease_until_ms LIMIT CAST($2 AS BIGINT)"
        );
        let jobs = on_pool!(self, pool => {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(now_ms)
                .bind(limit.max(1) as i64)
                .fetch_all(pool)
                .await?
                .iter()
                .map(decode_claimed)
                .collect::<Result<Vec<_>, _>>()?
        });
        Ok(jobs)
    }

    /// One job by id.
    pub async fn job(&self, id: i64) -> Result<Option<JobRow>, StoreError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
        let job = on_pool!(self, pool => {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(id)
                .fetch_optional(pool)
                .await?
                .as_ref()
                .map(decode_job)
                .transpose()?
        });
        Ok(job)
    }

    /// A job's failed attempts, oldest first.
    pub async fn job_failures(&self, id: i64) -> Result<Vec<FailureRow>, StoreError> {
        let sql = "SELECT attempt, at_ms, category, message FROM job_failures WHERE job_id = $1 ORDER BY id";
        let rows = on_pool!(self, pool => {
            sqlx::query(sql)
                .bind(id)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| {
                    Ok(FailureRow {
                        attempt: row.try_get::<i64, _>("attempt")? as u32,
                        at_ms: row.try_get("at_ms")?,
                        category: row.try_get("category")?,
                        message: row.try_get("message")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()?
        });
        Ok(rows)
    }

    /// Jobs of a queue in a state, by id from `after_id` on.
    pub async fn jobs_in_state(
        &self,
        queue: &str,
        state: &str,
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<JobRow>, StoreError> {
        // The state is written into the statement, from a fixed list, so that the planner can
        // pick the partial index that holds it (a bound state would hide which one applies).
        let sqlite = matches!(self.backend, Backend::Sqlite { .. });
        let Some(sql) = jobs_in_state_sql(state, sqlite) else {
            return Ok(Vec::new());
        };
        let jobs = on_pool!(self, pool => {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(queue)
                .bind(after_id)
                .bind(limit.max(1) as i64)
                .fetch_all(pool)
                .await?
                .iter()
                .map(decode_job)
                .collect::<Result<Vec<_>, _>>()?
        });
        Ok(jobs)
    }

    /// A queue's jobs counted by state and priority; waiting jobs not yet due at `now_ms`
    /// count as `delayed`.
    pub async fn job_counts(
        &self,
        queue: &str,
        now_ms: i64,
    ) -> Result<Vec<StateCount>, StoreError> {
        let sql = job_counts_sql();
        let counts = on_pool!(self, pool => {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(now_ms)
                .bind(queue)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| {
                    Ok(StateCount {
                        state: row.try_get("s")?,
                        priority: row.try_get::<i64, _>("priority")? as i32,
                        jobs: unsigned(row.try_get("n")?),
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()?
        });
        Ok(counts)
    }

    /// Dead jobs matching `filter`, newest death first.
    pub async fn dead_jobs(
        &self,
        filter: &DeadFilter,
        limit: usize,
    ) -> Result<Vec<JobRow>, StoreError> {
        // The search text is a bound LIKE pattern with its wildcards escaped.
        let text = filter.text.as_ref().map(|text| {
            let escaped = text
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            format!("%{escaped}%")
        });
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state = 'dead' \
             AND ($1 IS NULL OR queue = $1) AND ($2 IS NULL OR error_category = $2) \
             AND ($3 IS NULL OR error LIKE $3 ESCAPE '\\' OR kind LIKE $3 ESCAPE '\\') \
             AND ($4 IS NULL OR finished_ms >= $4) ORDER BY finished_ms DESC, id DESC LIMIT CAST($5 AS BIGINT)"
        );
        let jobs = on_pool!(self, pool => {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(filter.queue.as_deref())
                .bind(filter.category.as_deref())
                .bind(text.as_deref())
                .bind(filter.since_ms)
                .bind(limit.max(1) as i64)
                .fetch_all(pool)
                .await?
                .iter()
                .map(decode_job)
                .collect::<Result<Vec<_>, _>>()?
        });
        Ok(jobs)
    }

    /// Sends dead jobs back to waiting with their attempts reset, due at `now_ms`; returns the
    /// `(id, queue, type)` of those that were dead (others are left alone).
    pub async fn redrive_jobs(
        &self,
        ids: &[i64],
        now_ms: i64,
    ) -> Result<Vec<(i64, String, String)>, StoreError> {
        let redriven = on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            let mut redriven = Vec::new();
            for &id in ids {
                if let Some(row) = sqlx::query(REDRIVE_SQL).bind(now_ms).bind(id).fetch_optional(&mut *tx).await? {
                    redriven.push((id, row.try_get::<String, _>("queue")?, row.try_get::<String, _>("kind")?));
                }
            }
            tx.commit().await?;
            redriven
        });
        let queues: BTreeSet<&str> = redriven
            .iter()
            .map(|(_, queue, _)| queue.as_str())
            .collect();
        for queue in queues {
            self.wake_workers(queue);
        }
        Ok(redriven)
    }

    /// Discards a waiting, dead or children-waiting job (a parent waiting for it counts it
    /// as ended): its `(queue, type)` and the parents that changed; `None` when it is in
    /// another state.
    pub async fn discard_job(
        &self,
        id: i64,
        now_ms: i64,
    ) -> Result<Option<(String, String, Vec<ParentChange>)>, StoreError> {
        let sql = "UPDATE jobs SET state = 'discarded', finished_ms = $1, dedup_key = NULL, dedup_until_ms = NULL, purge_at_ms = $1 + keep_failed_ms \
                   WHERE id = $2 AND state IN ('waiting', 'dead', 'waiting_children') RETURNING parent_id, queue, kind";
        let changes = on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            let row = sqlx::query(sql).bind(now_ms).bind(id).fetch_optional(&mut *tx).await?;
            let mut changes = Vec::new();
            let done = match row {
                None => None,
                Some(row) => {
                    let parent: Option<i64> = row.try_get("parent_id")?;
                    if parent.is_some() {
                        child_ended!(&mut *tx, id, parent, None, now_ms, &mut changes)?;
                    }
                    Some((row.try_get::<String, _>("queue")?, row.try_get::<String, _>("kind")?))
                }
            };
            tx.commit().await?;
            done.map(|(queue, kind)| (queue, kind, changes))
        });
        for parent in changes.iter().flat_map(|(_, _, changes)| changes) {
            if parent.state == "waiting" {
                self.wake_workers(&parent.queue);
            }
        }
        Ok(changes)
    }

    /// The children of a parent, by id.
    pub async fn child_jobs(&self, parent: i64, limit: usize) -> Result<Vec<JobRow>, StoreError> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE parent_id = $1 ORDER BY id LIMIT CAST($2 AS BIGINT)"
        );
        let jobs = on_pool!(self, pool => {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(parent)
                .bind(limit.max(1) as i64)
                .fetch_all(pool)
                .await?
                .iter()
                .map(decode_job)
                .collect::<Result<Vec<_>, _>>()?
        });
        Ok(jobs)
    }

    /// Sets a queue's retention rules; false when it is not declared.
    pub async fn set_queue_keep(&self, name: &str, keep: &QueueKeep) -> Result<bool, StoreError> {
        let sql = "UPDATE queues SET keep_completed_last = $1, keep_completed_ms = $2, keep_failed_last = $3, keep_failed_ms = $4 WHERE name = $5";
        let as_i64 = |value: Option<u64>| value.map(|v| v.min(i64::MAX as u64) as i64);
        let changed = on_writer!(self, pool => {
            sqlx::query(sql)
                .bind(as_i64(keep.completed_last))
                .bind(as_i64(keep.completed_ms))
                .bind(as_i64(keep.failed_last))
                .bind(as_i64(keep.failed_ms))
                .bind(name)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(changed > 0)
    }

    /// A queue's retention rules, if it is declared.
    pub async fn queue_keep(&self, name: &str) -> Result<Option<QueueKeep>, StoreError> {
        let sql = "SELECT keep_completed_last, keep_completed_ms, keep_failed_last, keep_failed_ms FROM queues WHERE name = $1";
        let keep = on_pool!(self, pool => {
            sqlx::query(sql)
                .bind(name)
                .fetch_optional(pool)
                .await?
                .map(|row| {
                    let get = |column: &str| row.try_get::<Option<i64>, _>(column).map(|v| v.map(unsigned));
                    Ok::<_, sqlx::Error>(QueueKeep {
                        completed_last: get("keep_completed_last")?,
                        completed_ms: get("keep_completed_ms")?,
                        failed_last: get("keep_failed_last")?,
                        failed_ms: get("keep_failed_ms")?,
                    })
                })
                .transpose()?
        });
        Ok(keep)
    }

    /// Deletes at most `limit` ended jobs that their own rule or their queue's rules no longer
    /// keep, with their failure history; returns how many.
    pub async fn purge_jobs(&self, now_ms: i64, limit: u64) -> Result<u64, StoreError> {
        let mut left = limit.max(1) as i64;
        let mut deleted = 0u64;
        let rules = "SELECT name, keep_completed_last, keep_completed_ms, keep_failed_last, keep_failed_ms FROM queues \
                     WHERE keep_completed_last IS NOT NULL OR keep_completed_ms IS NOT NULL OR keep_failed_last IS NOT NULL OR keep_failed_ms IS NOT NULL";
        // Each statement returns a row per deleted job: the job's id if it failed, else NULL.
        let mut failed: Vec<i64> = Vec::new();
        macro_rules! count {
            ($rows:expr) => {{
                let rows = $rows;
                for row in &rows {
                    failed.extend(decode_failed(row)?);
                }
                deleted += rows.len() as u64;
                left -= rows.len() as i64;
            }};
        }
        on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            count!(sqlx::query(PURGE_OWN_SQL).bind(now_ms).bind(left).fetch_all(&mut *tx).await?);
            let queues = sqlx::query(rules).fetch_all(&mut *tx).await?;
            for row in &queues {
                let name: String = row.try_get("name")?;
                let groups = [
                    ("completed", "completed", row.try_get::<Option<i64>, _>("keep_completed_last")?, row.try_get::<Option<i64>, _>("keep_completed_ms")?),
                    ("dead", "discarded", row.try_get::<Option<i64>, _>("keep_failed_last")?, row.try_get::<Option<i64>, _>("keep_failed_ms")?),
                ];
                for (state, other, last, age) in groups {
                    if left <= 0 {
                        break;
                    }
                    if let Some(age) = age {
                        count!(sqlx::query(PURGE_BY_AGE_SQL)
                            .bind(&name).bind(state).bind(other)
                            .bind(now_ms.saturating_sub(age))
                            .bind(left)
                            .fetch_all(&mut *tx).await?);
                    }
                    if let Some(last) = last && left > 0 {
                        count!(sqlx::query(PURGE_BY_COUNT_SQL)
                            .bind(&name).bind(state).bind(other)
                            .bind(left)
                            .bind(last)
                            .fetch_all(&mut *tx).await?);
                    }
                }
            }
            forget_failures!(&mut *tx, &failed)?;
            tx.commit().await?;
        });
        Ok(deleted)
    }

    /// Failed attempts since `since_ms`, grouped by window of `window_ms`, category and
    /// message, most frequent first within each window.
    pub async fn failure_buckets(
        &self,
        since_ms: i64,
        window_ms: i64,
        limit: usize,
    ) -> Result<Vec<FailureBucket>, StoreError> {
        let window_ms = window_ms.max(1);
        let sql = "SELECT (at_ms / $1) * $1 AS w, category, message, COUNT(*) AS n FROM job_failures WHERE at_ms >= $2 \
                   GROUP BY w, category, message ORDER BY w, n DESC, category, message LIMIT CAST($3 AS BIGINT)";
        let buckets = on_pool!(self, pool => {
            sqlx::query(sql)
                .bind(window_ms)
                .bind(since_ms)
                .bind(limit.max(1) as i64)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|row| {
                    Ok(FailureBucket {
                        window_start_ms: row.try_get("w")?,
                        category: row.try_get("category")?,
                        message: row.try_get("message")?,
                        failures: unsigned(row.try_get("n")?),
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()?
        });
        Ok(buckets)
    }
}

/// PostgreSQL notifications of new jobs from every process sharing the database.
pub struct JobListener(sqlx::postgres::PgListener);

impl JobListener {
    /// The next queue that received jobs; an error when the connection is lost.
    pub async fn recv(&mut self) -> Result<String, StoreError> {
        Ok(self.0.recv().await?.payload().to_string())
    }
}

impl Store {
    /// Wakes this process's idle workers of `queue`.
    pub fn wake_workers(&self, queue: &str) {
        let wakeups = self.wakeups.lock().expect("wakeups lock");
        if let Some(sender) = wakeups.get(queue) {
            sender.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// A receiver that changes whenever jobs of `queue` may have become ready in this process
    /// (and, with [`Store::job_listener`] forwarding, in others).
    pub fn wakeups(&self, queue: &str) -> tokio::sync::watch::Receiver<u64> {
        let mut wakeups = self.wakeups.lock().expect("wakeups lock");
        wakeups
            .entry(queue.to_string())
            .or_insert_with(|| tokio::sync::watch::channel(0).0)
            .subscribe()
    }

    /// PostgreSQL: a listener for new jobs added by any process; `None` on SQLite, where the
    /// single process's own wake-ups are complete.
    pub async fn job_listener(&self) -> Result<Option<JobListener>, StoreError> {
        let Backend::Postgres(pool) = &self.backend else {
            return Ok(None);
        };
        let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
        listener.listen(JOBS_CHANNEL).await?;
        Ok(Some(JobListener(listener)))
    }
}

impl Store {
    /// Gives an active job back unfinished (a worker shutting down): waiting again, due at
    /// `now_ms`, with this attempt not counted; false under a stale token.
    pub async fn release_job(&self, id: i64, lease: i64, now_ms: i64) -> Result<bool, StoreError> {
        let sql = "UPDATE jobs SET state = 'waiting', attempts = attempts - 1, run_at_ms = $1, lease_until_ms = NULL WHERE id = $2 AND state = 'active' AND lease = $3 RETURNING queue";
        let queue = on_writer!(self, pool => {
            sqlx::query(sql)
                .bind(now_ms)
                .bind(id)
                .bind(lease)
                .fetch_optional(pool)
                .await?
                .map(|row| row.try_get::<String, _>("queue"))
                .transpose()?
        });
        if let Some(queue) = &queue {
            self.wake_workers(queue);
        }
        Ok(queue.is_some())
    }
}

impl Store {
    /// The earliest time a waiting job of `queue` becomes due, if it has any.
    ///
    /// The ready index orders a queue's waiting jobs by priority, then due time: the earliest
    /// due time is the least of each priority's first, and the query skips from one priority
    /// to the next, two index lookups per priority. A queue whose waiting jobs have more than
    /// [`DUE_PRIORITIES_SKIPPED_MAX`] priorities is read whole instead, through the same index.
    pub async fn next_due_ms(&self, queue: &str) -> Result<Option<i64>, StoreError> {
        let due = on_pool!(self, pool => {
            let row = sqlx::query(NEXT_DUE_SKIPPING_SQL)
                .bind(queue)
                .bind(DUE_PRIORITIES_SKIPPED_MAX)
                .fetch_one(pool)
                .await?;
            if row.try_get::<i64, _>("priorities")? < DUE_PRIORITIES_SKIPPED_MAX {
                row.try_get::<Option<i64>, _>("due")?
            } else {
                sqlx::query(NEXT_DUE_WHOLE_SQL).bind(queue).fetch_one(pool).await?.try_get::<Option<i64>, _>("due")?
            }
        });
        Ok(due)
    }
}

impl Store {
    /// Creates or replaces a schedule. Replacing keeps its next tick when the timing (cron
    /// expression or interval) is unchanged, so that every process can declare its schedules
    /// at start without moving them.
    pub async fn upsert_schedule(
        &self,
        schedule: &ScheduleRow,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO job_schedules ({SCHEDULE_COLUMNS}, created_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) \
             ON CONFLICT (name) DO UPDATE SET queue = excluded.queue, kind = excluded.kind, payload = excluded.payload, cron = excluded.cron, every_ms = excluded.every_ms, \
             next_tick_ms = CASE WHEN COALESCE(job_schedules.cron, '') = COALESCE(excluded.cron, '') AND COALESCE(job_schedules.every_ms, -1) = COALESCE(excluded.every_ms, -1) \
                            THEN job_schedules.next_tick_ms ELSE excluded.next_tick_ms END, \
             priority = excluded.priority, attempts_max = excluded.attempts_max, backoff = excluded.backoff, backoff_ms = excluded.backoff_ms, \
             backoff_max_ms = excluded.backoff_max_ms, jitter_pct = excluded.jitter_pct, timeout_ms = excluded.timeout_ms, \
             keep_completed_ms = excluded.keep_completed_ms, keep_failed_ms = excluded.keep_failed_ms"
        );
        let known = "SELECT name FROM queues WHERE name = $1";
        let as_i64 = |value: Option<u64>| value.map(|v| v.min(i64::MAX as u64) as i64);
        let job = &schedule.job;
        on_writer!(self, pool => {
            if sqlx::query(known).bind(&job.queue).fetch_optional(pool).await?.is_none() {
                return Err(StoreError::UnknownQueue(job.queue.clone()));
            }
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(&schedule.name)
                .bind(&job.queue)
                .bind(&job.kind)
                .bind(&job.payload)
                .bind(schedule.cron.as_deref())
                .bind(as_i64(schedule.every_ms))
                .bind(schedule.next_tick_ms)
                .bind(i64::from(job.priority))
                .bind(i64::from(job.attempts_max))
                .bind(job.backoff)
                .bind(job.backoff_ms as i64)
                .bind(job.backoff_max_ms as i64)
                .bind(i64::from(job.jitter_pct))
                .bind(job.timeout_ms as i64)
                .bind(as_i64(job.keep_completed_ms))
                .bind(as_i64(job.keep_failed_ms))
                .bind(now_ms)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Removes a schedule; false when there was none of that name.
    pub async fn remove_schedule(&self, name: &str) -> Result<bool, StoreError> {
        let sql = "DELETE FROM job_schedules WHERE name = $1";
        let changed = on_writer!(self, pool => {
            sqlx::query(sql).bind(name).execute(pool).await?.rows_affected()
        });
        Ok(changed > 0)
    }

    /// Every schedule, by name.
    pub async fn schedules(&self) -> Result<Vec<ScheduleRow>, StoreError> {
        let sql = format!("SELECT {SCHEDULE_COLUMNS} FROM job_schedules ORDER BY name");
        let rows = on_pool!(self, pool => {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .fetch_all(pool)
                .await?
                .iter()
                .map(decode_schedule)
                .collect::<Result<Vec<_>, _>>()?
        });
        Ok(rows)
    }

    /// Schedules whose next tick is at or before `now_ms`, earliest first.
    pub async fn due_schedules(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<ScheduleRow>, StoreError> {
        let sql = format!(
            "SELECT {SCHEDULE_COLUMNS} FROM job_schedules WHERE next_tick_ms <= $1 ORDER BY next_tick_ms, name LIMIT CAST($2 AS BIGINT)"
        );
        let rows = on_pool!(self, pool => {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(now_ms)
                .bind(limit.max(1) as i64)
                .fetch_all(pool)
                .await?
                .iter()
                .map(decode_schedule)
                .collect::<Result<Vec<_>, _>>()?
        });
        Ok(rows)
    }

    /// The earliest next tick of any schedule.
    pub async fn next_schedule_tick_ms(&self) -> Result<Option<i64>, StoreError> {
        let sql = "SELECT MIN(next_tick_ms) AS due FROM job_schedules";
        let due = on_pool!(self, pool => {
            sqlx::query(sql).fetch_one(pool).await?.try_get::<Option<i64>, _>("due")?
        });
        Ok(due)
    }
}

#[cfg(test)]
mod plans {
    //! The listing, counting and purging queries reach the jobs table only through indexes,
    //! on both backends: the partial indexes of migrations 0008 and 0011 leave no full index to
    //! fall back on, and a query uses one only if it names its predicate.

    use super::*;
    use crate::StoreOptions;

    pub(super) async fn stores() -> Vec<(Store, Option<tempfile::TempDir>)> {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/agora.db", dir.path().display());
        let mut stores = vec![(
            Store::open(&url, &StoreOptions::default()).await.unwrap(),
            Some(dir),
        )];
        if let Ok(url) = std::env::var("AGORA_TEST_POSTGRES_URL") {
            let options = StoreOptions {
                pg_schema: Some(format!("t_plans_{}", std::process::id())),
                ..StoreOptions::default()
            };
            stores.push((Store::open(&url, &options).await.unwrap(), None));
        }
        stores
    }

    /// The plan of `sql` with its binds, one line per step; PostgreSQL is told to avoid
    /// sequential scans, so that one still chosen means no index applies.
    pub(super) async fn plan(store: &Store, sql: &str, binds: &[Bind<'_>]) -> Vec<String> {
        match &store.backend {
            Backend::Sqlite { readers, .. } => {
                let explain = format!("EXPLAIN QUERY PLAN {sql}");
                let mut query = sqlx::query(sqlx::AssertSqlSafe(explain));
                for bind in binds {
                    query = match bind {
                        Bind::Int(n) => query.bind(*n),
                        Bind::Text(t) => query.bind(*t),
                    };
                }
                query
                    .fetch_all(readers)
                    .await
                    .unwrap()
                    .iter()
                    .map(|row| row.get::<String, _>("detail"))
                    .collect()
            }
            Backend::Postgres(pool) => {
                let mut tx = pool.begin().await.unwrap();
                sqlx::query("SET LOCAL enable_seqscan = off")
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                let explain = format!("EXPLAIN {sql}");
                let mut query = sqlx::query(sqlx::AssertSqlSafe(explain));
                for bind in binds {
                    query = match bind {
                        Bind::Int(n) => query.bind(*n),
                        Bind::Text(t) => query.bind(*t),
                    };
                }
                query
                    .fetch_all(&mut *tx)
                    .await
                    .unwrap()
                    .iter()
                    .map(|row| row.get::<String, _>(0))
                    .collect()
            }
        }
    }

    pub(super) enum Bind<'a> {
        Int(i64),
        Text(&'a str),
    }

    /// Steps that walk the whole table, or the primary key from a cursor (which passes the
    /// jobs of every state and queue).
    pub(super) fn full_scans(plan: &[String]) -> Vec<&String> {
        plan.iter()
            .filter(|step| {
                step.trim() == "SCAN jobs"
                    || step.starts_with("SCAN jobs ") && !step.contains("INDEX")
                    || step.contains("INTEGER PRIMARY KEY")
                    || step.contains("Seq Scan on jobs")
                    || step.contains("jobs_pkey")
            })
            .collect()
    }

    #[tokio::test]
    async fn listing_and_counting_jobs_use_indexes() {
        for (store, _dir) in stores().await {
            for state in JOB_STATES {
                let sqlite = matches!(store.backend, Backend::Sqlite { .. });
                let sql = jobs_in_state_sql(state, sqlite).expect("a known state");
                let steps = plan(
                    &store,
                    &sql,
                    &[Bind::Text("q"), Bind::Int(0), Bind::Int(100)],
                )
                .await;
                assert!(
                    full_scans(&steps).is_empty(),
                    "listing {state} jobs scans the table: {steps:#?}"
                );
            }
            let steps = plan(&store, &job_counts_sql(), &[Bind::Int(0), Bind::Text("q")]).await;
            assert!(
                full_scans(&steps).is_empty(),
                "counting jobs scans the table: {steps:#?}"
            );
            assert_eq!(jobs_in_state_sql("paused", false), None);
        }
    }

    #[tokio::test]
    async fn purges_find_ended_jobs_through_their_partial_indexes() {
        for (store, _dir) in stores().await {
            let purges = [
                (
                    PURGE_OWN_SQL,
                    "jobs_purge",
                    vec![Bind::Int(0), Bind::Int(100)],
                ),
                (
                    PURGE_BY_AGE_SQL,
                    "jobs_finished",
                    vec![
                        Bind::Text("q"),
                        Bind::Text("completed"),
                        Bind::Text("dead"),
                        Bind::Int(0),
                        Bind::Int(100),
                    ],
                ),
                (
                    PURGE_BY_COUNT_SQL,
                    "jobs_finished",
                    vec![
                        Bind::Text("q"),
                        Bind::Text("completed"),
                        Bind::Text("dead"),
                        Bind::Int(100),
                        Bind::Int(10),
                    ],
                ),
            ];
            for (sql, index, binds) in purges {
                let steps = plan(&store, sql, &binds).await;
                assert!(
                    steps.iter().any(|step| step.contains(index)),
                    "{sql} does not read {index}: {steps:#?}"
                );
                assert!(
                    !steps
                        .iter()
                        .any(|step| step.trim() == "SCAN jobs" || step.contains("Seq Scan on jobs")),
                    "{sql} scans the table: {steps:#?}"
                );
            }
        }
    }

    /// SQLite tests a partial index's predicate on the old and the new row of every job it
    /// writes, and tests an IN list there by building a temporary table for each row (four
    /// per claimed job with the predicates of migration 0008). The predicates are comparisons.
    #[tokio::test]
    async fn partial_indexes_over_jobs_have_no_lists_in_their_predicates() {
        for (store, _dir) in stores().await {
            let sql = match store.backend {
                Backend::Sqlite { .. } => {
                    "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'jobs' AND sql IS NOT NULL"
                }
                Backend::Postgres(_) => {
                    "SELECT indexname::TEXT, indexdef FROM pg_indexes WHERE tablename = 'jobs' AND schemaname = current_schema()"
                }
            };
            let indexes: Vec<(String, String)> = on_pool!(store, pool => {
                sqlx::query_as(sql).fetch_all(pool).await.unwrap()
            });
            assert!(
                indexes.iter().any(|(name, _)| name == "jobs_by_state"),
                "{indexes:#?}"
            );
            for (name, definition) in &indexes {
                let upper = definition.to_uppercase();
                assert!(
                    !upper.contains(" IN (") && !upper.contains("ANY ("),
                    "{name} tests a list: {definition}"
                );
            }
        }
    }
}

#[cfg(test)]
mod links {
    //! The jobs tables carry no foreign keys (migration 0012): the store itself deletes a
    //! job's failure history with the job, on every path that deletes jobs.

    use super::*;
    use crate::StoreOptions;

    pub(super) fn job(
        queue: &str,
        keep_completed_ms: Option<u64>,
        keep_failed_ms: Option<u64>,
    ) -> NewJob {
        NewJob {
            queue: queue.into(),
            kind: "k".into(),
            payload: "{}".into(),
            priority: 0,
            run_at_ms: 0,
            attempts_max: 5,
            backoff: "fixed",
            backoff_ms: 1,
            backoff_max_ms: 1,
            jitter_pct: 0,
            timeout_ms: 1_000,
            dedup: None,
            parent: None,
            on_child_failure: None,
            keep_completed_ms,
            keep_failed_ms,
            schedule: None,
        }
    }

    pub(super) async fn add(store: &Store, job: NewJob) -> i64 {
        store.add_jobs(&[job], 0).await.unwrap()[0].id()
    }

    /// Claims the queue's one ready job and fails it: retried at once, or dead.
    pub(super) async fn fail(store: &Store, queue: &str, now_ms: i64, retry: bool) -> i64 {
        let claimed = store
            .claim_jobs(queue, 1, now_ms, 1_000, "w")
            .await
            .unwrap();
        let [job] = claimed.as_slice() else {
            panic!("one job to claim in {queue}: {claimed:?}")
        };
        let failure = Failure {
            category: "network",
            message: "down".into(),
            retry_at_ms: retry.then_some(now_ms),
            strategy: "retry_later",
        };
        store
            .fail_job(job.id, job.lease, &failure, now_ms)
            .await
            .unwrap()
            .unwrap();
        job.id
    }

    async fn history_rows(store: &Store) -> i64 {
        on_writer!(store, pool => {
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM job_failures").fetch_one(pool).await.unwrap()
        })
    }

    #[tokio::test]
    async fn the_jobs_tables_have_no_foreign_keys() {
        for (store, _dir) in super::plans::stores().await {
            for table in ["jobs", "job_failures"] {
                let keys: i64 = on_writer!(store, pool => {
                    let sql = if store.is_sqlite() {
                        "SELECT COUNT(*) FROM pragma_foreign_key_list($1)"
                    } else {
                        "SELECT COUNT(*) FROM pg_constraint WHERE contype = 'f' AND conrelid = to_regclass($1)"
                    };
                    sqlx::query_scalar(sql).bind(table).fetch_one(pool).await.unwrap()
                });
                assert_eq!(keys, 0, "foreign keys on {table}");
            }
        }
    }

    #[tokio::test]
    async fn every_path_that_deletes_jobs_deletes_their_failure_history() {
        for (store, _dir) in super::plans::stores().await {
            for queue in ["done", "own", "aged", "counted"] {
                store.declare_queue(queue).await.unwrap();
            }
            let aged = QueueKeep {
                failed_ms: Some(10),
                ..QueueKeep::default()
            };
            let counted = QueueKeep {
                failed_last: Some(1),
                ..QueueKeep::default()
            };
            assert!(store.set_queue_keep("aged", &aged).await.unwrap());
            assert!(store.set_queue_keep("counted", &counted).await.unwrap());

            // Completed and deleted at once, after a failed attempt.
            let done = add(&store, job("done", Some(0), None)).await;
            assert_eq!(fail(&store, "done", 1, true).await, done);
            assert_eq!(store.job_failures(done).await.unwrap().len(), 1);
            let claimed = store.claim_jobs("done", 1, 2, 1_000, "w").await.unwrap();
            let settled = store
                .complete_jobs(&[(done, claimed[0].lease, None)], 3)
                .await
                .unwrap();
            assert!(settled.jobs[0].is_some());
            assert_eq!(store.job(done).await.unwrap(), None);
            assert!(
                store.job_failures(done).await.unwrap().is_empty(),
                "completion"
            );

            // Dead, then purged by its own rule, its queue's age rule, its queue's count rule.
            let own = add(&store, job("own", None, Some(0))).await;
            fail(&store, "own", 4, false).await;
            let aged = add(&store, job("aged", None, None)).await;
            fail(&store, "aged", 5, false).await;
            let older = add(&store, job("counted", None, None)).await;
            fail(&store, "counted", 6, false).await;
            let newer = add(&store, job("counted", None, None)).await;
            fail(&store, "counted", 7, false).await;
            assert_eq!(history_rows(&store).await, 4);

            assert_eq!(store.purge_jobs(100, 100).await.unwrap(), 3);
            for (id, rule) in [(own, "own"), (aged, "age"), (older, "count")] {
                assert_eq!(
                    store.job(id).await.unwrap(),
                    None,
                    "purged by its {rule} rule"
                );
                assert!(
                    store.job_failures(id).await.unwrap().is_empty(),
                    "{rule} rule"
                );
            }
            assert!(store.job(newer).await.unwrap().is_some());
            assert_eq!(
                store.job_failures(newer).await.unwrap().len(),
                1,
                "kept with its job"
            );
            assert_eq!(history_rows(&store).await, 1);
        }
    }

    /// Migration 0012 rebuilds both SQLite tables: their rows stay, and the id counters keep
    /// their place, so that an id deleted before the rebuild is not given again.
    #[tokio::test]
    async fn the_sqlite_rebuild_keeps_rows_and_id_counters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agora.db");
        {
            let options = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true)
                .foreign_keys(true);
            let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
            crate::SQLITE_MIGRATIONS.run_to(11, &pool).await.unwrap();
            for sql in [
                "INSERT INTO queues (name) VALUES ('q')",
                "INSERT INTO jobs (queue, kind, payload, priority, state, run_at_ms, attempts_max, backoff, backoff_ms, backoff_max_ms, jitter_pct, timeout_ms, created_ms) \
                 VALUES ('q', 'k', '{}', 0, 'waiting', 0, 3, 'fixed', 1, 1, 0, 1000, 0), ('q', 'k', '{}', 0, 'waiting', 0, 3, 'fixed', 1, 1, 0, 1000, 0), \
                        ('q', 'k', '{}', 0, 'waiting', 0, 3, 'fixed', 1, 1, 0, 1000, 0)",
                "INSERT INTO job_failures (job_id, attempt, at_ms, category, message) VALUES (1, 1, 0, 'network', 'a'), (3, 1, 0, 'network', 'b')",
                "DELETE FROM jobs WHERE id = 3",
            ] {
                sqlx::query(sql).execute(&pool).await.unwrap();
            }
            pool.close().await;
        }
        let url = format!("sqlite://{}", path.display());
        let store = Store::open(&url, &StoreOptions::default()).await.unwrap();
        assert!(store.job(1).await.unwrap().is_some());
        assert!(store.job(2).await.unwrap().is_some());
        assert_eq!(store.job_failures(1).await.unwrap().len(), 1);
        let id = add(&store, job("q", None, None)).await;
        assert_eq!(
            id, 4,
            "job 3 was deleted before the rebuild; its id stays used"
        );
        let failure_ids: Vec<i64> = on_writer!(store, pool => {
            sqlx::query_scalar("SELECT id FROM job_failures ORDER BY id").fetch_all(pool).await.unwrap()
        });
        assert_eq!(
            failure_ids,
            [1],
            "job 3's failure went with it, by the cascade then"
        );
        assert_eq!(fail(&store, "q", 1, true).await, 1);
        let failure_ids: Vec<i64> = on_writer!(store, pool => {
            sqlx::query_scalar("SELECT id FROM job_failures ORDER BY id").fetch_all(pool).await.unwrap()
        });
        assert_eq!(failure_ids, [1, 3], "failure 2's id stays used too");
    }
}

#[cfg(test)]
mod completions {
    //! SQLite reads the jobs a completion names before it deletes or marks them by id; the
    //! answers stay those of one statement over the list.

    use super::links::{add, job};

    #[tokio::test]
    async fn a_completion_named_twice_or_under_a_stale_lease_ends_its_job_once() {
        for (store, _dir) in super::plans::stores().await {
            store.declare_queue("q").await.unwrap();
            let dropped = add(&store, job("q", Some(0), None)).await;
            let kept = add(&store, job("q", None, None)).await;
            let stale = add(&store, job("q", Some(0), None)).await;
            let claimed = store.claim_jobs("q", 3, 1, 1_000, "w").await.unwrap();
            let lease = |id: i64| claimed.iter().find(|j| j.id == id).unwrap().lease;
            let settled = store
                .complete_jobs(
                    &[
                        (dropped, lease(dropped), None),
                        (kept, lease(kept), Some("1".into())),
                        (dropped, lease(dropped), None),
                        (kept, lease(kept), Some("2".into())),
                        (stale, lease(stale) + 1, None),
                    ],
                    2,
                )
                .await
                .unwrap();
            let ended: Vec<bool> = settled.jobs.iter().map(Option::is_some).collect();
            assert_eq!(ended, [true, true, false, false, false]);
            assert_eq!(store.job(dropped).await.unwrap(), None);
            let kept = store.job(kept).await.unwrap().unwrap();
            assert_eq!(
                (kept.state.as_str(), kept.result.as_deref()),
                ("completed", Some("1")),
                "the first completion's result, the one answered"
            );
            assert_eq!(store.job(stale).await.unwrap().unwrap().state, "active");

            // The same completion twice with different results, alone in the call.
            let again = add(&store, job("q", None, None)).await;
            let claimed = store.claim_jobs("q", 1, 3, 1_000, "w").await.unwrap();
            let settled = store
                .complete_jobs(
                    &[
                        (again, claimed[0].lease, Some("1".into())),
                        (again, claimed[0].lease, Some("2".into())),
                    ],
                    4,
                )
                .await
                .unwrap();
            let ended: Vec<bool> = settled.jobs.iter().map(Option::is_some).collect();
            assert_eq!(ended, [true, false]);
            let again = store.job(again).await.unwrap().unwrap();
            assert_eq!(again.result.as_deref(), Some("1"), "the answered result");
        }
    }
}

#[cfg(test)]
mod races {
    //! PostgreSQL runs a purge beside other writers; SQLite's single writer runs one
    //! statement at a time, so these races cannot happen there.

    use super::links::{add, fail, job};
    use super::*;
    use std::time::{Duration, Instant};

    /// How long a test waits for the purge to block on the held row.
    const BLOCKED_WAIT_MS: u64 = 10_000;

    #[tokio::test]
    async fn a_purge_that_waits_for_a_redrive_keeps_the_redriven_job() {
        for (store, _dir) in super::plans::stores().await {
            let store = std::sync::Arc::new(store);
            let Backend::Postgres(pool) = &store.backend else {
                continue;
            };
            let rules = [
                ("race_own", QueueKeep::default(), "own"),
                (
                    "race_aged",
                    QueueKeep {
                        failed_ms: Some(0),
                        ..QueueKeep::default()
                    },
                    "age",
                ),
                (
                    "race_counted",
                    QueueKeep {
                        failed_last: Some(0),
                        ..QueueKeep::default()
                    },
                    "count",
                ),
            ];
            for (queue, keep, rule) in rules {
                store.declare_queue(queue).await.unwrap();
                store.set_queue_keep(queue, &keep).await.unwrap();
                let keep_failed_ms = (rule == "own").then_some(0);
                let id = add(&store, job(queue, None, keep_failed_ms)).await;
                fail(&store, queue, 1, false).await;

                // Re-driven in a transaction held open, so that the purge, which found the
                // job dead in its snapshot, waits for the row.
                let mut redrive = pool.begin().await.unwrap();
                let holder: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                    .fetch_one(&mut *redrive)
                    .await
                    .unwrap();
                let redriven = sqlx::query(REDRIVE_SQL)
                    .bind(50i64)
                    .bind(id)
                    .execute(&mut *redrive)
                    .await
                    .unwrap();
                assert_eq!(redriven.rows_affected(), 1);
                let purging = {
                    let store = store.clone();
                    tokio::spawn(async move { store.purge_jobs(100, 100).await })
                };
                let started = Instant::now();
                loop {
                    let blocked: i64 = sqlx::query_scalar(
                        "SELECT COUNT(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                    )
                    .bind(holder)
                    .fetch_one(pool)
                    .await
                    .unwrap();
                    if blocked > 0 {
                        break;
                    }
                    assert!(
                        started.elapsed() < Duration::from_millis(BLOCKED_WAIT_MS),
                        "the purge by the {rule} rule never waited for the re-driven row"
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                redrive.commit().await.unwrap();

                assert_eq!(purging.await.unwrap().unwrap(), 0, "{rule} rule");
                let row = store.job(id).await.unwrap();
                assert_eq!(
                    row.map(|row| row.state),
                    Some("waiting".to_string()),
                    "the re-driven job outlives the purge by its {rule} rule"
                );
                assert_eq!(
                    store.job_failures(id).await.unwrap().len(),
                    1,
                    "{rule} rule"
                );
            }
        }
    }
}

#[cfg(test)]
mod due {
    //! When a queue's next waiting job falls due, read from the ready index (migration 0013).

    use super::links::{add, job};
    use super::plans::{Bind, full_scans, plan};
    use super::*;

    async fn add_due(store: &Store, queue: &str, priority: i32, run_at_ms: i64) {
        let mut new = job(queue, None, None);
        new.priority = priority;
        new.run_at_ms = run_at_ms;
        add(store, new).await;
    }

    #[tokio::test]
    async fn the_next_due_time_is_the_earliest_over_every_priority() {
        for (store, _dir) in super::plans::stores().await {
            for queue in ["few", "many", "empty"] {
                store.declare_queue(queue).await.unwrap();
            }
            assert_eq!(store.next_due_ms("empty").await.unwrap(), None);
            for (priority, due) in [(0, 500), (5, 100), (5, 900), (9, 300)] {
                add_due(&store, "few", priority, due).await;
            }
            assert_eq!(store.next_due_ms("few").await.unwrap(), Some(100));
            // A claimed job no longer counts.
            let claimed = store.claim_jobs("few", 1, 200, 1_000, "w").await.unwrap();
            assert_eq!(claimed[0].run_at_ms, 100);
            assert_eq!(store.next_due_ms("few").await.unwrap(), Some(300));

            // More priorities than the query skips through: the whole index is read.
            let priorities = DUE_PRIORITIES_SKIPPED_MAX as i32 + 6;
            for priority in 0..priorities {
                let due = if priority == priorities - 1 {
                    7
                } else {
                    1_000 + i64::from(priority)
                };
                add_due(&store, "many", priority, due).await;
            }
            assert_eq!(store.next_due_ms("many").await.unwrap(), Some(7));
        }
    }

    #[tokio::test]
    async fn the_next_due_time_is_read_from_the_ready_index() {
        for (store, _dir) in super::plans::stores().await {
            let queries = [
                (NEXT_DUE_SKIPPING_SQL, vec![Bind::Text("q"), Bind::Int(64)]),
                (NEXT_DUE_WHOLE_SQL, vec![Bind::Text("q")]),
            ];
            for (sql, binds) in queries {
                let steps = plan(&store, sql, &binds).await;
                assert!(
                    steps.iter().any(|step| step.contains("jobs_ready")),
                    "{sql} does not read jobs_ready: {steps:#?}"
                );
                assert!(full_scans(&steps).is_empty(), "{sql}: {steps:#?}");
            }
        }
    }
}
