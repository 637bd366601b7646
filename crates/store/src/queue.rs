//! The job queue's tables: declared queues, jobs and their failed attempts.
//!
//! The store runs the SQL and knows nothing of what the columns mean beyond what the SQL needs:
//! `crates/queue` validates options, decides retries and backoff, and names the states. Every
//! time is a millisecond timestamp given by the caller, so tests drive the clock.
//!
//! Claiming takes the next ready jobs of a queue (priority, then due time, then id) and marks
//! them active under a new lease token in one statement: `UPDATE … RETURNING` through SQLite's
//! single writer, `FOR UPDATE SKIP LOCKED` on PostgreSQL so that concurrent claimers never wait
//! for each other's rows. The token (a per-job counter raised at every claim) fences every
//! later report: a heartbeat, progress, completion or failure under an older token changes
//! nothing.

use std::collections::BTreeSet;

use sqlx::{QueryBuilder, Row};

use crate::{Backend, Store, StoreError};

/// The channel PostgreSQL notifications about new jobs go to; the payload is the queue name.
pub const JOBS_CHANNEL: &str = "agora_jobs";

/// Jobs inserted by one multi-row statement (SQLite allows 32,766 bound values per statement;
/// a job binds 13).
const INSERT_JOBS_MAX: usize = 1_000;

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

const JOB_COLUMNS: &str = "id, queue, kind, payload, priority, state, run_at_ms, attempts, attempts_max, lease, lease_until_ms, worker, dedup_key, progress, result, error_category, error, strategy, created_ms, started_ms, finished_ms";
const CLAIMED_COLUMNS: &str = "id, queue, kind, payload, priority, attempts, attempts_max, backoff, backoff_ms, backoff_max_ms, jitter_pct, timeout_ms, lease, lease_until_ms";

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
    })
}

/// Adds jobs on an open transaction of either backend: `$conn` is `&mut *tx`. Expands to a
/// `Result<Vec<Added>, StoreError>`.
macro_rules! add_jobs {
    ($conn:expr, $jobs:expr, $now_ms:expr, $postgres:expr) => {{
        let jobs: &[NewJob] = $jobs;
        let now_ms: i64 = $now_ms;
        let mut added: Vec<Option<Added>> = vec![None; jobs.len()];
        // Every queue named must be declared.
        let queues: BTreeSet<&str> = jobs.iter().map(|job| job.queue.as_str()).collect();
        for queue in &queues {
            let found = sqlx::query("SELECT name FROM queues WHERE name = $1")
                .bind(*queue)
                .fetch_optional(&mut *$conn)
                .await?;
            if found.is_none() {
                return Err(StoreError::UnknownQueue((*queue).to_string()));
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
        for chunk in plain.chunks(INSERT_JOBS_MAX) {
            let mut insert = QueryBuilder::new(
                "INSERT INTO jobs (queue, kind, payload, priority, state, run_at_ms, attempts_max, backoff, backoff_ms, backoff_max_ms, jitter_pct, timeout_ms, dedup_key, dedup_until_ms, created_ms) ",
            );
            insert.push_values(chunk, |mut row, &index| {
                let job = &jobs[index];
                row.push_bind(job.queue.as_str())
                    .push_bind(job.kind.as_str())
                    .push_bind(job.payload.as_str())
                    .push_bind(i64::from(job.priority))
                    .push_bind("waiting")
                    .push_bind(job.run_at_ms)
                    .push_bind(i64::from(job.attempts_max))
                    .push_bind(job.backoff)
                    .push_bind(job.backoff_ms as i64)
                    .push_bind(job.backoff_max_ms as i64)
                    .push_bind(i64::from(job.jitter_pct))
                    .push_bind(job.timeout_ms as i64)
                    .push_bind(job.dedup.as_ref().map(|(key, _)| key.as_str()))
                    .push_bind(job.dedup.as_ref().map(|(_, until)| *until))
                    .push_bind(now_ms);
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
        let added = match &mut self.inner {
            TxInner::Sqlite(tx) => add_jobs!(&mut **tx, jobs, now_ms, false)?,
            TxInner::Postgres(tx) => add_jobs!(&mut **tx, jobs, now_ms, true)?,
        };
        self.queues.extend(jobs.iter().map(|job| job.queue.clone()));
        Ok(added)
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
        let mut tx = self.begin().await?;
        let added = tx.add_jobs(jobs, now_ms).await?;
        tx.commit().await?;
        Ok(added)
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
        let mut jobs = match &self.backend {
            Backend::Sqlite { writer, .. } => {
                let sql = format!(
                    "UPDATE jobs SET state = 'active', attempts = attempts + 1, lease = lease + 1, lease_until_ms = $1, worker = $2, started_ms = $3 \
                     WHERE id IN (SELECT id FROM jobs WHERE queue = $4 AND state = 'waiting' AND run_at_ms <= $3 ORDER BY priority, run_at_ms, id LIMIT $5) \
                     AND NOT EXISTS (SELECT 1 FROM queues WHERE name = $4 AND paused <> 0) \
                     RETURNING {CLAIMED_COLUMNS}"
                );
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(lease_until_ms)
                    .bind(worker)
                    .bind(now_ms)
                    .bind(queue)
                    .bind(limit)
                    .fetch_all(writer)
                    .await?
                    .iter()
                    .map(decode_claimed)
                    .collect::<Result<Vec<_>, _>>()?
            }
            Backend::Postgres(pool) => {
                let columns = CLAIMED_COLUMNS
                    .split(", ")
                    .map(|c| format!("j.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let sql = format!(
                    "WITH next AS (SELECT id FROM jobs WHERE queue = $4 AND state = 'waiting' AND run_at_ms <= $3 \
                       AND NOT EXISTS (SELECT 1 FROM queues WHERE name = $4 AND paused <> 0) \
                       ORDER BY priority, run_at_ms, id LIMIT $5 FOR UPDATE SKIP LOCKED) \
                     UPDATE jobs j SET state = 'active', attempts = j.attempts + 1, lease = j.lease + 1, lease_until_ms = $1, worker = $2, started_ms = $3 \
                     FROM next WHERE j.id = next.id RETURNING {columns}"
                );
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(lease_until_ms)
                    .bind(worker)
                    .bind(now_ms)
                    .bind(queue)
                    .bind(limit)
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(decode_claimed)
                    .collect::<Result<Vec<_>, _>>()?
            }
        };
        jobs.sort_by_key(|job| (job.priority, job.id));
        Ok(jobs)
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

    /// Records an active job's progress (JSON); false under a stale token.
    pub async fn job_progress(
        &self,
        id: i64,
        lease: i64,
        progress: &str,
    ) -> Result<bool, StoreError> {
        let sql = "UPDATE jobs SET progress = $1 WHERE id = $2 AND state = 'active' AND lease = $3";
        let changed = on_writer!(self, pool => {
            sqlx::query(sql)
                .bind(progress)
                .bind(id)
                .bind(lease)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(changed == 1)
    }

    /// Completes active jobs, each `(id, lease, result JSON)`, in one transaction; for each,
    /// false when its token is stale (it changes nothing then).
    pub async fn complete_jobs(
        &self,
        completions: &[(i64, i64, Option<String>)],
        now_ms: i64,
    ) -> Result<Vec<bool>, StoreError> {
        let sql = "UPDATE jobs SET state = 'completed', result = $1, finished_ms = $2, lease_until_ms = NULL WHERE id = $3 AND state = 'active' AND lease = $4";
        let done = on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            let mut done = Vec::with_capacity(completions.len());
            for (id, lease, result) in completions {
                let changed = sqlx::query(sql)
                    .bind(result.as_deref())
                    .bind(now_ms)
                    .bind(*id)
                    .bind(*lease)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                done.push(changed == 1);
            }
            tx.commit().await?;
            done
        });
        Ok(done)
    }

    /// Records a failed attempt of an active job: back to waiting until `retry_at_ms`, or
    /// dead; false under a stale token (nothing changes).
    pub async fn fail_job(
        &self,
        id: i64,
        lease: i64,
        failure: &Failure,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let (state, run_at, finished, strategy) = match failure.retry_at_ms {
            Some(at) => ("waiting", Some(at), None, None),
            None => ("dead", None, Some(now_ms), Some(failure.strategy)),
        };
        let sql = "UPDATE jobs SET state = $1, run_at_ms = COALESCE($2, run_at_ms), finished_ms = $3, strategy = $4, error_category = $5, error = $6, lease_until_ms = NULL \
                   WHERE id = $7 AND state = 'active' AND lease = $8 RETURNING attempts, queue";
        let history = "INSERT INTO job_failures (job_id, attempt, at_ms, category, message) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (job_id, attempt) DO NOTHING";
        let done = on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            let attempt = sqlx::query(sql)
                .bind(state)
                .bind(run_at)
                .bind(finished)
                .bind(strategy)
                .bind(failure.category)
                .bind(&failure.message)
                .bind(id)
                .bind(lease)
                .fetch_optional(&mut *tx)
                .await?
                .map(|row| Ok::<_, sqlx::Error>((row.try_get::<i64, _>("attempts")?, row.try_get::<String, _>("queue")?)))
                .transpose()?;
            if let Some((attempt, _)) = &attempt {
                let attempt = *attempt;
                sqlx::query(history)
                    .bind(id)
                    .bind(attempt)
                    .bind(now_ms)
                    .bind(failure.category)
                    .bind(&failure.message)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            attempt.map(|(_, queue)| queue)
        });
        if let (Some(queue), Some(_)) = (&done, failure.retry_at_ms) {
            // A retry may be due at once.
            self.wake_workers(queue);
        }
        Ok(done.is_some())
    }

    /// Active jobs whose lease ended before `now_ms` (their worker stopped reporting).
    pub async fn expired_leases(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<ClaimedJob>, StoreError> {
        let sql = format!(
            "SELECT {CLAIMED_COLUMNS} FROM jobs WHERE state = 'active' AND lease_until_ms < $1 ORDER BY lease_until_ms LIMIT $2"
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
        let sql = "SELECT attempt, at_ms, category, message FROM job_failures WHERE job_id = $1 ORDER BY attempt";
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
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE queue = $1 AND state = $2 AND id > $3 ORDER BY id LIMIT $4"
        );
        let jobs = on_pool!(self, pool => {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(queue)
                .bind(state)
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
        let sql = "SELECT CASE WHEN state = 'waiting' AND run_at_ms > $1 THEN 'delayed' ELSE state END AS s, priority, COUNT(*) AS n \
                   FROM jobs WHERE queue = $2 GROUP BY s, priority ORDER BY s, priority";
        let counts = on_pool!(self, pool => {
            sqlx::query(sql)
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
             AND ($4 IS NULL OR finished_ms >= $4) ORDER BY finished_ms DESC, id DESC LIMIT $5"
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
    /// ids that were dead (others are left alone).
    pub async fn redrive_jobs(&self, ids: &[i64], now_ms: i64) -> Result<Vec<i64>, StoreError> {
        let sql = "UPDATE jobs SET state = 'waiting', attempts = 0, run_at_ms = $1, strategy = NULL, finished_ms = NULL WHERE id = $2 AND state = 'dead' RETURNING queue";
        let mut queues = BTreeSet::new();
        let redriven = on_writer!(self, pool => {
            let mut tx = pool.begin().await?;
            let mut redriven = Vec::new();
            for &id in ids {
                if let Some(row) = sqlx::query(sql).bind(now_ms).bind(id).fetch_optional(&mut *tx).await? {
                    queues.insert(row.try_get::<String, _>("queue")?);
                    redriven.push(id);
                }
            }
            tx.commit().await?;
            redriven
        });
        for queue in &queues {
            self.wake_workers(queue);
        }
        Ok(redriven)
    }

    /// Discards a waiting or dead job; false when it is in another state.
    pub async fn discard_job(&self, id: i64, now_ms: i64) -> Result<bool, StoreError> {
        let sql = "UPDATE jobs SET state = 'discarded', finished_ms = $1, dedup_key = NULL, dedup_until_ms = NULL WHERE id = $2 AND state IN ('waiting', 'dead')";
        let changed = on_writer!(self, pool => {
            sqlx::query(sql).bind(now_ms).bind(id).execute(pool).await?.rows_affected()
        });
        Ok(changed == 1)
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
                   GROUP BY w, category, message ORDER BY w, n DESC, category, message LIMIT $3";
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
    pub async fn next_due_ms(&self, queue: &str) -> Result<Option<i64>, StoreError> {
        let sql = "SELECT MIN(run_at_ms) AS due FROM jobs WHERE queue = $1 AND state = 'waiting'";
        let due = on_pool!(self, pool => {
            sqlx::query(sql).bind(queue).fetch_one(pool).await?.try_get::<Option<i64>, _>("due")?
        });
        Ok(due)
    }
}
