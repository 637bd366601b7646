//! The job queue over HTTP: queues and their jobs for operators, and the external-worker
//! protocol (fetch with a lease, heartbeat, progress, complete, fail, release), each route one
//! call of `queue::Queue`. Every route needs the operator role.
//!
//! The queue validates every option and names the field it refuses; the body extractor
//! checks only types (a negative `attempts` is refused there, a `priority` of two million by
//! the queue). A queue's refusal keeps its own code: `UNKNOWN_QUEUE` and `UNKNOWN_JOB` are
//! 404, `INVALID_FIELD` 422 with the field, `LEASE_LOST` 409. A body over
//! `limits.body_bytes_max` (64 KiB by default) is 413 before anything reads it; the queue's
//! own payload bound (256 KiB encoded) is 422 `payload` and is reached only when the body limit
//! is raised above it.
//!
//! A failure report carries only the job's id and lease; `Queue::fail_leased` reads the claim
//! back from the store, so any server can record it, before or after a restart. Fetching also
//! sweeps for stalled jobs now and then
//! (`Queue::recover_stalled`), since a remote worker that dies leaves its jobs active and no
//! in-process worker may be running to recover them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use queue::{
    Backoff, DeadFilter, Dedup, ErrorCategory, JobError, JobOptions, JobRetention, JobRow, JobSpec,
    QueueError, Strategy,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::App;
use crate::auth::{Caller, Role};
use crate::error::{ApiError, Body, ErrorBody};

/// Jobs listed by one page unless told otherwise.
pub const JOBS_PAGE_DEFAULT: usize = 100;
/// Jobs listed by one page at most.
pub const JOBS_PAGE_MAX: usize = queue::limits::LIST_JOBS_MAX;
/// Longest text searched for in the dead-letter queue, in bytes.
pub const DEAD_SEARCH_TEXT_BYTES_MAX: usize = 256;
/// How far back the failure summary looks unless told otherwise: 24 hours.
pub const SUMMARY_SINCE_MS_DEFAULT: i64 = 24 * 3600 * 1000;
/// The failure summary's window unless told otherwise: 1 hour.
pub const SUMMARY_WINDOW_MS_DEFAULT: i64 = 3600 * 1000;
/// Jobs one fetch claims unless told otherwise.
pub const FETCH_JOBS_DEFAULT: usize = 1;
/// A lease's length unless a fetch or heartbeat says otherwise: 30 s.
pub const LEASE_MS_DEFAULT: u64 = 30_000;
/// How often fetching sweeps for stalled jobs at most.
pub const STALLED_CHECK_MS: i64 = 1_000;

pub(super) fn routes() -> OpenApiRouter<Arc<App>> {
    OpenApiRouter::new()
        .routes(routes!(list_queues))
        .routes(routes!(declare_queue))
        .routes(routes!(list_jobs, add_job))
        .routes(routes!(dead_jobs))
        .routes(routes!(failure_summary))
        .routes(routes!(pause))
        .routes(routes!(resume))
        .routes(routes!(fetch))
        .routes(routes!(job))
        .routes(routes!(retry))
        .routes(routes!(discard))
        .routes(routes!(heartbeat))
        .routes(routes!(progress))
        .routes(routes!(complete))
        .routes(routes!(fail))
        .routes(routes!(release))
        // One sweep clock per router, so per server.
        .layer(Extension(Arc::new(Sweep::default())))
}

/// The HTTP form of a queue refusal: the queue's own code, and the field it names.
fn queue_error(error: QueueError) -> ApiError {
    let code = error.code();
    let message = error.to_string();
    match error {
        QueueError::Invalid { field, .. } => ApiError::invalid(code, field, message),
        QueueError::UnknownQueue(_) => ApiError::not_found(code, message).field("queue"),
        QueueError::UnknownJob(_) => ApiError::not_found(code, message).field("id"),
        QueueError::UnknownSchedule(_) => ApiError::not_found(code, message).field("schedule"),
        QueueError::LeaseLost(_) => ApiError::conflict(code, message).field("lease"),
        QueueError::Store(error) => ApiError::internal(error),
    }
}

/// A refused report: the queue says `LEASE_LOST` for a job that does not exist too, so that
/// case is told apart here (404) from a stale lease (409).
async fn refused(app: &App, id: i64, error: QueueError) -> ApiError {
    match error {
        QueueError::LeaseLost(_) => match app.queue.job(id).await {
            Ok(_) => queue_error(error),
            Err(missing) => queue_error(missing),
        },
        other => queue_error(other),
    }
}

/// Whether a declared queue is paused; 404 when it is not declared.
async fn queue_paused(app: &App, name: &str) -> Result<bool, ApiError> {
    app.queue
        .queues()
        .await
        .map_err(queue_error)?
        .into_iter()
        .find(|(queue, _)| queue == name)
        .map(|(_, paused)| paused)
        .ok_or_else(|| queue_error(QueueError::UnknownQueue(name.to_string())))
}

/// When fetching last started the stalled-job sweep.
#[derive(Default)]
struct Sweep {
    /// When the last sweep started, ms since the epoch.
    swept_ms: AtomicI64,
    /// A sweep is running.
    sweeping: AtomicBool,
}

impl Sweep {
    /// Starts a sweep for stalled jobs when none ran for [`STALLED_CHECK_MS`]. It runs beside
    /// the request, so a fetch never waits for it.
    fn sweep_if_due(self: &Arc<Self>, queue: &queue::Queue) {
        let now = queue.now_ms();
        if now - self.swept_ms.load(Ordering::Relaxed) < STALLED_CHECK_MS
            || self.sweeping.swap(true, Ordering::AcqRel)
        {
            return;
        }
        self.swept_ms.store(now, Ordering::Relaxed);
        let (sweep, queue) = (self.clone(), queue.clone());
        tokio::spawn(async move {
            match queue.recover_stalled().await {
                Ok(0) => {}
                Ok(recovered) => tracing::info!(recovered, "stalled jobs recovered"),
                Err(error) => tracing::warn!(%error, "recovering stalled jobs failed"),
            }
            sweep.sweeping.store(false, Ordering::Release);
        });
    }
}

// Views.

/// A queue's jobs by state.
#[derive(Serialize, ToSchema, Default)]
pub struct StateCounts {
    /// Ready to be claimed.
    pub waiting: u64,
    /// Waiting, not yet due (a delay or a retry's backoff).
    pub delayed: u64,
    /// Parents waiting for their children.
    pub waiting_children: u64,
    /// Claimed under a lease.
    pub active: u64,
    /// Completed.
    pub completed: u64,
    /// In the dead-letter queue.
    pub dead: u64,
    /// Discarded by an operator.
    pub discarded: u64,
}

impl StateCounts {
    fn from_counts(counts: Vec<queue::StateCount>) -> StateCounts {
        let mut sums = StateCounts::default();
        for count in counts {
            let slot = match count.state.as_str() {
                "waiting" => &mut sums.waiting,
                "delayed" => &mut sums.delayed,
                "waiting_children" => &mut sums.waiting_children,
                "active" => &mut sums.active,
                "completed" => &mut sums.completed,
                "dead" => &mut sums.dead,
                "discarded" => &mut sums.discarded,
                // A state added to the queue later is not shown until it is named here.
                _ => continue,
            };
            *slot += count.jobs;
        }
        sums
    }
}

/// A declared queue.
#[derive(Serialize, ToSchema)]
pub struct QueueView {
    /// Name.
    pub name: String,
    /// A paused queue gives no jobs to fetches and workers.
    pub paused: bool,
    /// Its jobs by state.
    pub counts: StateCounts,
}

/// A job as an operator sees it (without its lease token, which only its worker holds).
#[derive(Serialize, ToSchema)]
pub struct JobView {
    /// Id.
    pub id: i64,
    /// Queue.
    pub queue: String,
    /// Job type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Payload.
    pub payload: Value,
    /// 0 runs first.
    pub priority: i32,
    /// `waiting`, `waiting_children`, `active`, `completed`, `dead` or `discarded`.
    pub state: String,
    /// Not claimed before this time, ms since the epoch.
    pub run_at_ms: i64,
    /// Claims so far.
    pub attempts: u32,
    /// Claims allowed in all.
    pub attempts_max: u32,
    /// Active jobs: when the lease ends unless a heartbeat extends it.
    pub lease_until_ms: Option<i64>,
    /// The worker holding it, or that last held it.
    pub worker: Option<String>,
    /// Its deduplication key, while it holds.
    pub dedup_key: Option<String>,
    /// The last progress report.
    pub progress: Option<Value>,
    /// The completion's result.
    pub result: Option<Value>,
    /// The last failure's category.
    pub error_category: Option<String>,
    /// The last failure's message.
    pub error: Option<String>,
    /// Dead jobs: `retry_later`, `manual_review` or `discard`.
    pub strategy: Option<String>,
    /// When it was added, ms since the epoch.
    pub created_ms: i64,
    /// When its last attempt started.
    pub started_ms: Option<i64>,
    /// When it completed, died or was discarded.
    pub finished_ms: Option<i64>,
    /// The parent it is a child of.
    pub parent_id: Option<i64>,
    /// Parents: children not yet ended.
    pub children_pending: u32,
    /// The schedule that added it.
    pub schedule: Option<String>,
    /// The schedule's tick it was added for.
    pub schedule_tick_ms: Option<i64>,
}

/// Stored JSON text as a value; text the store holds that is not JSON (it holds only what
/// the queue encoded) is shown as a string rather than lost.
fn json_of(text: String) -> Value {
    serde_json::from_str(&text).unwrap_or(Value::String(text))
}

impl From<JobRow> for JobView {
    fn from(row: JobRow) -> JobView {
        JobView {
            id: row.id,
            queue: row.queue,
            kind: row.kind,
            payload: json_of(row.payload),
            priority: row.priority,
            state: row.state,
            run_at_ms: row.run_at_ms,
            attempts: row.attempts,
            attempts_max: row.attempts_max,
            lease_until_ms: row.lease_until_ms,
            worker: row.worker,
            dedup_key: row.dedup_key,
            progress: row.progress.map(json_of),
            result: row.result.map(json_of),
            error_category: row.error_category,
            error: row.error,
            strategy: row.strategy,
            created_ms: row.created_ms,
            started_ms: row.started_ms,
            finished_ms: row.finished_ms,
            parent_id: row.parent_id,
            children_pending: row.children_pending,
            schedule: row.schedule,
            schedule_tick_ms: row.schedule_tick_ms,
        }
    }
}

/// One failed attempt.
#[derive(Serialize, ToSchema)]
pub struct FailureView {
    /// The attempt's number (from 1; a re-drive starts again at 1).
    pub attempt: u32,
    /// When it failed, ms since the epoch.
    pub at_ms: i64,
    /// Its category.
    pub category: String,
    /// Its message.
    pub message: String,
}

/// A job with its failure history.
#[derive(Serialize, ToSchema)]
pub struct JobDetail {
    /// The job.
    pub job: JobView,
    /// Its failed attempts, oldest first, across re-drives.
    pub failures: Vec<FailureView>,
}

/// Failed attempts of one category and message within one window.
#[derive(Serialize, ToSchema)]
pub struct FailureBucketView {
    /// The window's start, ms since the epoch.
    pub window_start_ms: i64,
    /// Category.
    pub category: String,
    /// Message.
    pub message: String,
    /// Failed attempts.
    pub failures: u64,
}

fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(JOBS_PAGE_DEFAULT);
    if !(1..=JOBS_PAGE_MAX).contains(&limit) {
        return Err(ApiError::invalid(
            "INVALID_FIELD",
            "limit",
            format!("limit must be 1 to {JOBS_PAGE_MAX}"),
        ));
    }
    Ok(limit)
}

// Operators: queues and jobs.

#[utoipa::path(get, path = "/api/v1/queues", tag = "queue", summary = "Every queue with its jobs counted by state",
    security(("session" = []), ("api_key" = [])),
    responses(
        (status = 200, description = "Queues by name", body = Vec<QueueView>),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an operator", body = ErrorBody),
    ))]
async fn list_queues(
    State(app): State<Arc<App>>,
    caller: Caller,
) -> Result<Json<Vec<QueueView>>, ApiError> {
    caller.require(Role::Operator)?;
    let mut views = Vec::new();
    for (name, paused) in app.queue.queues().await.map_err(queue_error)? {
        let counts = app.queue.counts(&name).await.map_err(queue_error)?;
        views.push(QueueView {
            name,
            paused,
            counts: StateCounts::from_counts(counts),
        });
    }
    Ok(Json(views))
}

#[utoipa::path(put, path = "/api/v1/queues/{queue}", tag = "queue", summary = "Declare a queue (again: nothing changes)",
    security(("session" = []), ("api_key" = [])),
    params(("queue" = String, Path, description = "Name: letters, digits, _ - . :, at most 64 bytes")),
    responses(
        (status = 204, description = "Declared"),
        (status = 400, description = "A parameter does not parse", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an operator", body = ErrorBody),
        (status = 422, description = "The name breaks its rule", body = ErrorBody),
    ))]
async fn declare_queue(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(queue): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Operator)?;
    app.queue.declare(&queue).await.map_err(queue_error)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Which jobs of a queue to list.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct JobsQuery {
    /// `waiting` (default; delayed jobs included), `waiting_children`, `active`, `completed`,
    /// `dead` or `discarded`.
    pub state: Option<String>,
    /// Jobs with a larger id than this.
    pub after: Option<i64>,
    /// At most this many, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

#[utoipa::path(get, path = "/api/v1/queues/{queue}/jobs", tag = "queue", summary = "A queue's jobs in one state, by id",
    security(("session" = []), ("api_key" = [])),
    params(("queue" = String, Path, description = "Queue"), JobsQuery),
    responses(
        (status = 200, description = "Jobs", body = Vec<JobView>),
        (status = 400, description = "A parameter does not parse", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an operator", body = ErrorBody),
        (status = 404, description = "No such queue", body = ErrorBody),
        (status = 422, description = "A filter breaks its rule", body = ErrorBody),
    ))]
async fn list_jobs(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(queue): Path<String>,
    Query(query): Query<JobsQuery>,
) -> Result<Json<Vec<JobView>>, ApiError> {
    caller.require(Role::Operator)?;
    let limit = page_limit(query.limit)?;
    queue_paused(&app, &queue).await?;
    let state = query.state.as_deref().unwrap_or("waiting");
    let rows = app
        .queue
        .jobs(&queue, state, query.after.unwrap_or(0), limit)
        .await
        .map_err(queue_error)?;
    Ok(Json(rows.into_iter().map(JobView::from).collect()))
}

/// Delays between attempts.
#[derive(Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum BackoffSpec {
    /// The same delay before every retry.
    Fixed {
        /// The delay, ms.
        delay_ms: u64,
    },
    /// `base_ms`, then twice that, four times, …, at most `max_ms`.
    Exponential {
        /// The first retry's delay, ms.
        base_ms: u64,
        /// No retry waits longer, ms.
        max_ms: u64,
    },
}

/// A deduplication key.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DedupSpec {
    /// The key, 1 to 256 bytes: while it holds, adding another job with it to the same queue
    /// adds nothing and answers the holder.
    pub key: String,
    /// How long it holds from the add, 1 ms to 30 days.
    pub ttl_ms: u64,
}

/// How long the job is kept once it ends (besides its queue's rules).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetentionSpec {
    /// Deleted this long after it completed, at most 366 days.
    pub completed_for_ms: Option<u64>,
    /// Deleted this long after it died or was discarded, at most 366 days.
    pub failed_for_ms: Option<u64>,
}

/// A job to add. Omitted options take the queue's defaults (`docs/queue.md`); the queue
/// checks every rule.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewJob {
    /// Job type, which picks the handler: letters, digits, _ - . :, at most 128 bytes.
    #[serde(rename = "type")]
    pub kind: String,
    /// Any JSON value, at most 256 KiB encoded (default null).
    #[serde(default)]
    pub payload: Value,
    /// 0 (default) to 1,000,000; lower runs first.
    pub priority: Option<i32>,
    /// Not before this long from now, 0 (default) to 366 days.
    pub delay_ms: Option<i64>,
    /// Not before this time, ms since the epoch, within 366 days; overrides `delay_ms`.
    pub run_at_ms: Option<i64>,
    /// Claims allowed in all, 1 to 1,000 (default 3).
    pub attempts: Option<u32>,
    /// Delays between attempts (default exponential from 1 s to 1 h), at most 7 days.
    pub backoff: Option<BackoffSpec>,
    /// Share of each backoff that is random, 0 (default) to 100 percent.
    pub jitter_pct: Option<u8>,
    /// How long one attempt may run, 1 ms to 24 h (default 30 s).
    pub timeout_ms: Option<u64>,
    /// Deduplication.
    pub dedup: Option<DedupSpec>,
    /// A parent job still waiting for children: this job becomes one more of them.
    pub parent: Option<i64>,
    /// How long to keep the job once it ends.
    pub retention: Option<RetentionSpec>,
}

impl NewJob {
    fn into_spec(self, queue: String) -> JobSpec {
        let mut options = JobOptions::default();
        if let Some(priority) = self.priority {
            options.priority = priority;
        }
        if let Some(delay_ms) = self.delay_ms {
            options.delay_ms = delay_ms;
        }
        options.run_at_ms = self.run_at_ms;
        if let Some(attempts) = self.attempts {
            options.attempts = attempts;
        }
        if let Some(backoff) = self.backoff {
            options.backoff = match backoff {
                BackoffSpec::Fixed { delay_ms } => Backoff::Fixed { delay_ms },
                BackoffSpec::Exponential { base_ms, max_ms } => {
                    Backoff::Exponential { base_ms, max_ms }
                }
            };
        }
        if let Some(jitter_pct) = self.jitter_pct {
            options.jitter_pct = jitter_pct;
        }
        if let Some(timeout_ms) = self.timeout_ms {
            options.timeout_ms = timeout_ms;
        }
        options.dedup = self.dedup.map(|d| Dedup {
            key: d.key,
            ttl_ms: d.ttl_ms,
        });
        options.parent = self.parent;
        if let Some(retention) = self.retention {
            options.retention = JobRetention {
                completed_for_ms: retention.completed_for_ms,
                failed_for_ms: retention.failed_for_ms,
            };
        }
        JobSpec {
            queue,
            kind: self.kind,
            payload: self.payload,
            options,
        }
    }
}

/// What an add did.
#[derive(Serialize, ToSchema)]
pub struct AddedJob {
    /// The new job's id, or the id of the job holding the deduplication key.
    pub id: i64,
    /// Whether a job holding the key was found, and nothing was added.
    pub duplicate: bool,
}

#[utoipa::path(post, path = "/api/v1/queues/{queue}/jobs", tag = "queue", summary = "Add a job",
    security(("session" = []), ("api_key" = [])),
    params(("queue" = String, Path, description = "A declared queue")),
    request_body = NewJob,
    responses(
        (status = 201, description = "Added", body = AddedJob),
        (status = 200, description = "A job holding the deduplication key exists; nothing was added", body = AddedJob),
        (status = 400, description = "A parameter or the body does not parse", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an operator", body = ErrorBody),
        (status = 404, description = "No such queue", body = ErrorBody),
        (status = 413, description = "The body is over the server's limit", body = ErrorBody),
        (status = 422, description = "An option breaks its rule", body = ErrorBody),
    ))]
async fn add_job(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(queue): Path<String>,
    Body(new): Body<NewJob>,
) -> Result<Response, ApiError> {
    caller.require(Role::Operator)?;
    let added = app
        .queue
        .add(new.into_spec(queue))
        .await
        .map_err(queue_error)?;
    let (status, duplicate) = match added {
        queue::Added::New(_) => (StatusCode::CREATED, false),
        queue::Added::Duplicate(_) => (StatusCode::OK, true),
    };
    let answer = AddedJob {
        id: added.id(),
        duplicate,
    };
    Ok((status, Json(answer)).into_response())
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "queue", summary = "A job with its failure history",
    security(("session" = []), ("api_key" = [])),
    params(("id" = i64, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job", body = JobDetail),
        (status = 400, description = "A parameter does not parse", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an operator", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
    ))]
async fn job(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<i64>,
) -> Result<Json<JobDetail>, ApiError> {
    caller.require(Role::Operator)?;
    let row = app.queue.job(id).await.map_err(queue_error)?;
    let failures = app.queue.failures(id).await.map_err(queue_error)?;
    Ok(Json(JobDetail {
        job: row.into(),
        failures: failures
            .into_iter()
            .map(|f| FailureView {
                attempt: f.attempt,
                at_ms: f.at_ms,
                category: f.category,
                message: f.message,
            })
            .collect(),
    }))
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/retry", tag = "queue", summary = "Re-drive a dead job: waiting again, due now, with fresh attempts",
    security(("session" = []), ("api_key" = [])),
    params(("id" = i64, Path, description = "Job id")),
    responses(
        (status = 204, description = "Re-driven"),
        (status = 400, description = "A parameter does not parse", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an operator", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 422, description = "The job is not dead (field id)", body = ErrorBody),
    ))]
async fn retry(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<i64>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Operator)?;
    let redriven = app.queue.redrive(&[id]).await.map_err(queue_error)?;
    if redriven.contains(&id) {
        return Ok(StatusCode::NO_CONTENT);
    }
    // Nothing was re-driven: say why, in the form the queue uses for a discard in the wrong
    // state.
    let row = app.queue.job(id).await.map_err(queue_error)?;
    Err(queue_error(QueueError::Invalid {
        field: "id",
        rule: format!("job {id} is {}; only dead jobs can be re-driven", row.state),
    }))
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/discard", tag = "queue", summary = "Discard a waiting, children-waiting or dead job",
    security(("session" = []), ("api_key" = [])),
    params(("id" = i64, Path, description = "Job id")),
    responses(
        (status = 204, description = "Discarded"),
        (status = 400, description = "A parameter does not parse", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an operator", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 422, description = "The job is in another state (field id)", body = ErrorBody),
    ))]
async fn discard(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<i64>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Operator)?;
    app.queue.discard(id).await.map_err(queue_error)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Which dead jobs to list.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DeadQuery {
    /// Only this error category.
    pub category: Option<String>,
    /// Only jobs whose last error message or type contains this text (at most 256 bytes).
    pub text: Option<String>,
    /// Only jobs that died at or after this time, ms since the epoch.
    pub since_ms: Option<i64>,
    /// At most this many, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

#[utoipa::path(get, path = "/api/v1/queues/{queue}/dead", tag = "queue", summary = "A queue's dead-letter queue, newest death first",
    security(("session" = []), ("api_key" = [])),
    params(("queue" = String, Path, description = "Queue"), DeadQuery),
    responses(
        (status = 200, description = "Dead jobs", body = Vec<JobView>),
        (status = 400, description = "A parameter does not parse", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an operator", body = ErrorBody),
        (status = 404, description = "No such queue", body = ErrorBody),
        (status = 422, description = "A filter breaks its rule", body = ErrorBody),
    ))]
async fn dead_jobs(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(queue): Path<String>,
    Query(query): Query<DeadQuery>,
) -> Result<Json<Vec<JobView>>, ApiError> {
    caller.require(Role::Operator)?;
    let limit = page_limit(query.limit)?;
    if query
        .text
        .as_ref()
        .is_some_and(|t| t.len() > DEAD_SEARCH_TEXT_BYTES_MAX)
    {
        return Err(ApiError::invalid(
            "INVALID_FIELD",
            "text",
            format!("text must be at most {DEAD_SEARCH_TEXT_BYTES_MAX} bytes"),
        ));
    }
    queue_paused(&app, &queue).await?;
    let filter = DeadFilter {
        queue: Some(queue),
        category: query.category,
        text: query.text,
        since_ms: query.since_ms,
    };
    let rows = app.queue.dead(&filter, limit).await.map_err(queue_error)?;
    Ok(Json(rows.into_iter().map(JobView::from).collect()))
}

/// Which failures to summarize.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct SummaryQuery {
    /// From this time, ms since the epoch (default 24 hours ago).
    pub since_ms: Option<i64>,
    /// The window's length, ms, positive (default 1 hour).
    pub window_ms: Option<i64>,
}

#[utoipa::path(get, path = "/api/v1/failures/summary", tag = "queue", summary = "Failed attempts of every queue per window, category and message, most frequent first",
    security(("session" = []), ("api_key" = [])),
    params(SummaryQuery),
    responses(
        (status = 200, description = "At most 1000 buckets, by window", body = Vec<FailureBucketView>),
        (status = 400, description = "A parameter does not parse", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an operator", body = ErrorBody),
        (status = 422, description = "A parameter breaks its rule", body = ErrorBody),
    ))]
async fn failure_summary(
    State(app): State<Arc<App>>,
    caller: Caller,
    Query(query): Query<SummaryQuery>,
) -> Result<Json<Vec<FailureBucketView>>, ApiError> {
    caller.require(Role::Operator)?;
    let since_ms = query
        .since_ms
        .unwrap_or_else(|| app.queue.now_ms() - SUMMARY_SINCE_MS_DEFAULT);
    let window_ms = query.window_ms.unwrap_or(SUMMARY_WINDOW_MS_DEFAULT);
    let buckets = app
        .queue
        .failure_summary(since_ms, window_ms)
        .await
        .map_err(queue_error)?;
    Ok(Json(
        buckets
            .into_iter()
            .map(|b| FailureBucketView {
                window_start_ms: b.window_start_ms,
                category: b.category,
                message: b.message,
                failures: b.failures,
            })
            .collect(),
    ))
}

#[utoipa::path(post, path = "/api/v1/queues/{queue}/pause", tag = "queue", summary = "Pause a queue: its jobs stay, none is fetched",
    security(("session" = []), ("api_key" = [])),
    params(("queue" = String, Path, description = "Queue")),
    responses(
        (status = 204, description = "Paused"),
        (status = 400, description = "A parameter does not parse", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an operator", body = ErrorBody),
        (status = 404, description = "No such queue", body = ErrorBody),
    ))]
async fn pause(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(queue): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Operator)?;
    app.queue.pause(&queue).await.map_err(queue_error)?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/queues/{queue}/resume", tag = "queue", summary = "Resume a paused queue",
    security(("session" = []), ("api_key" = [])),
    params(("queue" = String, Path, description = "Queue")),
    responses(
        (status = 204, description = "Resumed"),
        (status = 400, description = "A parameter does not parse", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an operator", body = ErrorBody),
        (status = 404, description = "No such queue", body = ErrorBody),
    ))]
async fn resume(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(queue): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Operator)?;
    app.queue.resume(&queue).await.map_err(queue_error)?;
    Ok(StatusCode::NO_CONTENT)
}

// The external-worker protocol.

/// A claim.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FetchRequest {
    /// Jobs to claim at most, 1 to 1000 (default 1).
    pub max_jobs: Option<usize>,
    /// Each job's lease, 100 ms to 10 minutes (default 30 s); heartbeats extend it.
    pub lease_ms: Option<u64>,
    /// The worker's name, recorded on the jobs (default `user:<id>` of the caller).
    pub worker: Option<String>,
}

/// A claimed job.
#[derive(Serialize, ToSchema)]
pub struct FetchedJob {
    /// Id.
    pub id: i64,
    /// The lease token every report on this claim must carry.
    pub lease: i64,
    /// Job type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Payload.
    pub payload: Value,
    /// This attempt's number, from 1.
    pub attempt: u32,
    /// Claims allowed in all.
    pub attempts_max: u32,
    /// Priority.
    pub priority: i32,
    /// How long this attempt may run, ms.
    pub timeout_ms: u64,
    /// When the lease ends unless a heartbeat extends it, ms since the epoch.
    pub lease_until_ms: i64,
}

/// What a fetch claimed.
#[derive(Serialize, ToSchema)]
pub struct Fetched {
    /// The claimed jobs, in claiming order (priority, due time, id); empty when none is ready.
    pub jobs: Vec<FetchedJob>,
    /// Whether the queue is paused (then `jobs` is empty).
    pub paused: bool,
}

#[utoipa::path(post, path = "/api/v1/queues/{queue}/fetch", tag = "queue worker", summary = "Claim ready jobs under a lease",
    security(("session" = []), ("api_key" = [])),
    params(("queue" = String, Path, description = "Queue")),
    request_body = FetchRequest,
    responses(
        (status = 200, description = "Claimed jobs, maybe none", body = Fetched),
        (status = 400, description = "A parameter or the body does not parse", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an operator", body = ErrorBody),
        (status = 404, description = "No such queue", body = ErrorBody),
        (status = 422, description = "A field breaks its rule", body = ErrorBody),
    ))]
async fn fetch(
    State(app): State<Arc<App>>,
    Extension(sweep): Extension<Arc<Sweep>>,
    caller: Caller,
    Path(queue): Path<String>,
    Body(request): Body<FetchRequest>,
) -> Result<Json<Fetched>, ApiError> {
    caller.require(Role::Operator)?;
    sweep.sweep_if_due(&app.queue);
    let max_jobs = request.max_jobs.unwrap_or(FETCH_JOBS_DEFAULT);
    let lease_ms = request.lease_ms.unwrap_or(LEASE_MS_DEFAULT);
    let worker = request
        .worker
        .unwrap_or_else(|| format!("user:{}", caller.user));
    let claimed = app
        .queue
        .claim(&queue, max_jobs, &worker, lease_ms)
        .await
        .map_err(|error| match error {
            // The queue names its parameter; the request names it max_jobs.
            QueueError::Invalid {
                field: "limit",
                rule,
            } => queue_error(QueueError::Invalid {
                field: "max_jobs",
                rule,
            }),
            other => queue_error(other),
        })?;
    // An empty claim may be an unknown or a paused queue; only then is the queue looked up.
    let paused = if claimed.is_empty() {
        queue_paused(&app, &queue).await?
    } else {
        false
    };
    let mut jobs = Vec::with_capacity(claimed.len());
    for mut job in claimed {
        jobs.push(FetchedJob {
            id: job.id,
            lease: job.lease,
            kind: job.kind.clone(),
            payload: std::mem::take(&mut job.payload),
            attempt: job.attempt,
            attempts_max: job.attempts_max,
            priority: job.priority,
            timeout_ms: job.timeout_ms,
            lease_until_ms: job.lease_until_ms,
        });
    }
    Ok(Json(Fetched { jobs, paused }))
}

/// A lease renewal.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    /// The claim's lease token.
    pub lease: i64,
    /// The lease runs this long from now, 100 ms to 10 minutes (default 30 s).
    pub lease_ms: Option<u64>,
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/heartbeat", tag = "queue worker", summary = "Extend a claimed job's lease",
    security(("session" = []), ("api_key" = [])),
    params(("id" = i64, Path, description = "Job id")),
    request_body = HeartbeatRequest,
    responses(
        (status = 204, description = "Extended"),
        (status = 400, description = "A parameter or the body does not parse", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an operator", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job is not held under this lease (LEASE_LOST)", body = ErrorBody),
        (status = 422, description = "A field breaks its rule", body = ErrorBody),
    ))]
async fn heartbeat(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<i64>,
    Body(report): Body<HeartbeatRequest>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Operator)?;
    let lease_ms = report.lease_ms.unwrap_or(LEASE_MS_DEFAULT);
    match app.queue.heartbeat(id, report.lease, lease_ms).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(error) => Err(refused(&app, id, error).await),
    }
}

/// A progress report.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProgressRequest {
    /// The claim's lease token.
    pub lease: i64,
    /// Any JSON value, at most 64 KiB encoded; it replaces the last one.
    pub progress: Value,
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/progress", tag = "queue worker", summary = "Record a claimed job's progress",
    security(("session" = []), ("api_key" = [])),
    params(("id" = i64, Path, description = "Job id")),
    request_body = ProgressRequest,
    responses(
        (status = 204, description = "Recorded"),
        (status = 400, description = "A parameter or the body does not parse", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an operator", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job is not held under this lease (LEASE_LOST)", body = ErrorBody),
        (status = 422, description = "A field breaks its rule", body = ErrorBody),
    ))]
async fn progress(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<i64>,
    Body(report): Body<ProgressRequest>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Operator)?;
    match app.queue.progress(id, report.lease, &report.progress).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(error) => Err(refused(&app, id, error).await),
    }
}

/// A completion.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteRequest {
    /// The claim's lease token.
    pub lease: i64,
    /// The result, any JSON value, at most 64 KiB encoded (none by default).
    pub result: Option<Value>,
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/complete", tag = "queue worker", summary = "Complete a claimed job",
    security(("session" = []), ("api_key" = [])),
    params(("id" = i64, Path, description = "Job id")),
    request_body = CompleteRequest,
    responses(
        (status = 204, description = "Completed"),
        (status = 400, description = "A parameter or the body does not parse", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an operator", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job is not held under this lease (LEASE_LOST): nothing changed", body = ErrorBody),
        (status = 422, description = "A field breaks its rule", body = ErrorBody),
    ))]
async fn complete(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<i64>,
    Body(report): Body<CompleteRequest>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Operator)?;
    match app
        .queue
        .complete(id, report.lease, report.result.as_ref())
        .await
    {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(error) => Err(refused(&app, id, error).await),
    }
}

/// An error category, as a worker reports it.
#[derive(Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CategoryName {
    /// The attempt ran out of time.
    Timeout,
    /// A remote service could not be reached.
    Network,
    /// The job's input is wrong: the job dies at once.
    Validation,
    /// Credentials were refused: the job dies at once.
    Authorization,
    /// A remote service asked to slow down.
    RateLimit,
    /// A resource ran out.
    Resource,
    /// Anything else.
    Unknown,
}

impl From<CategoryName> for ErrorCategory {
    fn from(name: CategoryName) -> ErrorCategory {
        match name {
            CategoryName::Timeout => ErrorCategory::Timeout,
            CategoryName::Network => ErrorCategory::Network,
            CategoryName::Validation => ErrorCategory::Validation,
            CategoryName::Authorization => ErrorCategory::Authorization,
            CategoryName::RateLimit => ErrorCategory::RateLimit,
            CategoryName::Resource => ErrorCategory::Resource,
            CategoryName::Unknown => ErrorCategory::Unknown,
        }
    }
}

/// What an operator should do with the job if it dies of this failure.
#[derive(Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StrategyName {
    /// The cause is likely passing: re-drive it later.
    RetryLater,
    /// Someone must look at it.
    ManualReview,
    /// It is not worth keeping.
    Discard,
}

impl From<StrategyName> for Strategy {
    fn from(name: StrategyName) -> Strategy {
        match name {
            StrategyName::RetryLater => Strategy::RetryLater,
            StrategyName::ManualReview => Strategy::ManualReview,
            StrategyName::Discard => Strategy::Discard,
        }
    }
}

/// A failed attempt.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailRequest {
    /// The claim's lease token.
    pub lease: i64,
    /// What kind of failure: `validation` and `authorization` are not retried.
    pub category: CategoryName,
    /// What happened (the first 4096 bytes are kept).
    pub message: String,
    /// Overrides the category's strategy if the job dies.
    pub strategy: Option<StrategyName>,
}

/// What a failure report did.
#[derive(Serialize, ToSchema)]
pub struct Failed {
    /// Whether the job will run again after its backoff; otherwise it is dead.
    pub will_retry: bool,
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/fail", tag = "queue worker", summary = "Report a failed attempt: retried after its backoff, or dead",
    security(("session" = []), ("api_key" = [])),
    params(("id" = i64, Path, description = "Job id")),
    request_body = FailRequest,
    responses(
        (status = 200, description = "Recorded", body = Failed),
        (status = 400, description = "A parameter or the body does not parse", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an operator", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job is not held under this lease (LEASE_LOST): nothing changed", body = ErrorBody),
        (status = 422, description = "A field breaks its rule", body = ErrorBody),
    ))]
async fn fail(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<i64>,
    Body(report): Body<FailRequest>,
) -> Result<Json<Failed>, ApiError> {
    caller.require(Role::Operator)?;
    let error = JobError {
        category: report.category.into(),
        message: report.message,
        strategy: report.strategy.map(Into::into),
    };
    match app.queue.fail_leased(id, report.lease, error).await {
        Ok(will_retry) => Ok(Json(Failed { will_retry })),
        Err(error) => Err(refused(&app, id, error).await),
    }
}

/// A claim given back.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    /// The claim's lease token.
    pub lease: i64,
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/release", tag = "queue worker", summary = "Give a claimed job back unfinished, its attempt not counted",
    security(("session" = []), ("api_key" = [])),
    params(("id" = i64, Path, description = "Job id")),
    request_body = ReleaseRequest,
    responses(
        (status = 204, description = "Waiting again"),
        (status = 400, description = "A parameter or the body does not parse", body = ErrorBody),
        (status = 401, description = "Not signed in", body = ErrorBody),
        (status = 403, description = "Not an operator", body = ErrorBody),
        (status = 404, description = "No such job", body = ErrorBody),
        (status = 409, description = "The job is not held under this lease (LEASE_LOST)", body = ErrorBody),
        (status = 422, description = "A field breaks its rule", body = ErrorBody),
    ))]
async fn release(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(id): Path<i64>,
    Body(report): Body<ReleaseRequest>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Operator)?;
    match app.queue.release(id, report.lease).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(error) => Err(refused(&app, id, error).await),
    }
}
