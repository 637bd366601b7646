//! Agora's durable job queue: named queues of jobs with priorities, delays, retries with
//! backoff and jitter, timeouts, deduplication, leases and a dead-letter queue, stored on
//! SQLite or PostgreSQL through `store`.
//!
//! [`Queue`] is the whole interface of the stored queue; its operations map one to one onto the
//! external-worker protocol (fetch with lease, heartbeat, progress, complete, fail). Every
//! option is validated here, before anything is written, and a refusal names its field and
//! rule. [`worker`] runs in-process handlers on top of it.
//!
//! A job is claimed under a lease token; a report under an older token is refused
//! ([`QueueError::LeaseLost`]), so a job whose lease expired and was claimed again cannot be
//! completed twice. An expired lease (a worker that stopped reporting) is found by
//! [`Queue::recover_stalled`] and counts as a failed attempt of category `timeout`.

use std::collections::BTreeSet;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

pub use store::{
    Added, DeadFilter, FailureBucket, FailureRow, JobRow, ScheduleRow, StateCount, Tx,
};
use store::{
    ClaimedJob, Ended, Failure, NewJob, ParentChange, ParentRef, QueueKeep, Settled, Store,
    StoreError,
};
use tokio::sync::broadcast;

pub use events::{EventKind, JobEvent};
pub use schedule::{Every, ScheduleSpec, Scheduler, SchedulerOptions};

pub mod events;
pub mod schedule;
pub mod worker;

/// Named bounds.
pub mod limits {
    /// Bytes in a job's JSON payload.
    pub const PAYLOAD_BYTES_MAX: usize = 256 * 1024;
    /// Bytes in a result or progress report (JSON).
    pub const RESULT_BYTES_MAX: usize = 64 * 1024;
    /// Bytes in a queue name.
    pub const QUEUE_NAME_BYTES_MAX: usize = 64;
    /// Bytes in a job type.
    pub const KIND_BYTES_MAX: usize = 128;
    /// Bytes in a deduplication key.
    pub const DEDUP_KEY_BYTES_MAX: usize = 256;
    /// Bytes kept of a failure message.
    pub const ERROR_MESSAGE_BYTES_MAX: usize = 4096;
    /// The lowest priority (priorities run from 0, the first to run, to this).
    pub const PRIORITY_MAX: i32 = 1_000_000;
    /// Claims of one job in all.
    pub const ATTEMPTS_MAX: u32 = 1_000;
    /// How far ahead a job may be scheduled: 366 days.
    pub const DELAY_MS_MAX: i64 = 366 * 24 * 3600 * 1000;
    /// The longest backoff: 7 days.
    pub const BACKOFF_MS_MAX: u64 = 7 * 24 * 3600 * 1000;
    /// The longest attempt: 24 hours.
    pub const TIMEOUT_MS_MAX: u64 = 24 * 3600 * 1000;
    /// The longest deduplication: 30 days.
    pub const DEDUP_TTL_MS_MAX: u64 = 30 * 24 * 3600 * 1000;
    /// Jobs in one bulk add.
    pub const BULK_JOBS_MAX: usize = 10_000;
    /// Jobs one claim may take.
    pub const CLAIM_JOBS_MAX: usize = 1_000;
    /// Lease lengths: from 100 ms to 10 minutes.
    pub const LEASE_MS_MIN: u64 = 100;
    /// See [`LEASE_MS_MIN`].
    pub const LEASE_MS_MAX: u64 = 10 * 60 * 1000;
    /// Jobs listed by one query.
    pub const LIST_JOBS_MAX: usize = 1_000;
    /// Stalled jobs recovered by one sweep.
    pub const STALLED_SWEEP_MAX: usize = 1_000;
    /// Levels of a flow: a parent, its children, their children, …
    pub const FLOW_DEPTH_MAX: usize = 8;
    /// Children listed by one query.
    pub const CHILDREN_LIST_MAX: usize = 10_000;
    /// The longest a finished job can be kept by age: 366 days.
    pub const KEEP_MS_MAX: u64 = 366 * 24 * 3600 * 1000;
    /// Jobs deleted by one clean-up statement.
    pub const PURGE_BATCH_MAX: u64 = 1_000;
    /// Statements one clean-up runs at most (the next run goes on).
    pub const PURGE_ROUNDS_MAX: usize = 100;
    /// Schedules stored in all.
    pub const SCHEDULES_MAX: usize = 10_000;
    /// Schedules fired by one pass of a scheduler.
    pub const SCHEDULES_FIRED_MAX: usize = 1_000;
    /// The shortest interval of a schedule.
    pub const INTERVAL_MS_MIN: u64 = 100;
    /// The longest interval of a schedule: 366 days.
    pub const INTERVAL_MS_MAX: u64 = 366 * 24 * 3600 * 1000;
    /// Bytes in a cron expression.
    pub const CRON_BYTES_MAX: usize = 256;
}

/// Defaults of [`JobOptions`].
pub mod defaults {
    /// Claims of a job unless told otherwise.
    pub const ATTEMPTS: u32 = 3;
    /// How long an attempt may run unless told otherwise.
    pub const TIMEOUT_MS: u64 = 30_000;
    /// The first retry's delay unless told otherwise.
    pub const BACKOFF_MS: u64 = 1_000;
}

/// Why an operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// An input breaks a rule; nothing was written.
    #[error("{field}: {rule}")]
    Invalid {
        /// The field, as the API names it.
        field: &'static str,
        /// The rule it breaks.
        rule: String,
    },
    /// The queue was never declared; nothing was written.
    #[error("unknown queue {0:?}")]
    UnknownQueue(String),
    /// The job is not active under this lease token any more (its lease expired and it was
    /// recovered or claimed again, or it already ended); the report changed nothing.
    #[error("job {0} is not held under this lease")]
    LeaseLost(i64),
    /// No job has this id.
    #[error("no job {0}")]
    UnknownJob(i64),
    /// No schedule has this name.
    #[error("no schedule {0:?}")]
    UnknownSchedule(String),
    /// The store failed.
    #[error(transparent)]
    Store(StoreError),
}

impl QueueError {
    /// A stable code for the API's error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            QueueError::Invalid { .. } => "INVALID_FIELD",
            QueueError::UnknownQueue(_) => "UNKNOWN_QUEUE",
            QueueError::LeaseLost(_) => "LEASE_LOST",
            QueueError::UnknownJob(_) => "UNKNOWN_JOB",
            QueueError::UnknownSchedule(_) => "UNKNOWN_SCHEDULE",
            QueueError::Store(_) => "STORE_FAILED",
        }
    }
}

impl From<StoreError> for QueueError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::UnknownQueue(name) => QueueError::UnknownQueue(name),
            StoreError::ParentNotWaiting(id) => QueueError::Invalid {
                field: "parent",
                rule: format!("job {id} is not waiting for children"),
            },
            other => QueueError::Store(other),
        }
    }
}

fn invalid(field: &'static str, rule: impl Into<String>) -> QueueError {
    QueueError::Invalid {
        field,
        rule: rule.into(),
    }
}

/// How long a failed job waits before its next attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backoff {
    /// The same delay before every retry.
    Fixed {
        /// The delay.
        delay_ms: u64,
    },
    /// `base_ms`, then twice that, four times, …, at most `max_ms`.
    Exponential {
        /// The first retry's delay.
        base_ms: u64,
        /// No retry waits longer.
        max_ms: u64,
    },
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::Exponential {
            base_ms: defaults::BACKOFF_MS,
            max_ms: 3_600_000,
        }
    }
}

/// A deduplication key: while it holds, adding another job with the same key to the same
/// queue adds nothing and returns the holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dedup {
    /// The key.
    pub key: String,
    /// How long the key holds from the add.
    pub ttl_ms: u64,
}

/// Options of one job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobOptions {
    /// 0 runs first; at most [`limits::PRIORITY_MAX`].
    pub priority: i32,
    /// Not before this long from now (0: at once). Negative is refused.
    pub delay_ms: i64,
    /// Not before this time (milliseconds since the epoch); overrides `delay_ms`.
    pub run_at_ms: Option<i64>,
    /// Claims allowed in all, 1 to [`limits::ATTEMPTS_MAX`].
    pub attempts: u32,
    /// Delay between attempts.
    pub backoff: Backoff,
    /// Share of each backoff that is random, 0 to 100 percent: spreads retries of jobs that
    /// failed together.
    pub jitter_pct: u8,
    /// How long one attempt may run before it fails as a timeout.
    pub timeout_ms: u64,
    /// Deduplication.
    pub dedup: Option<Dedup>,
    /// A parent job still waiting for children: this job becomes one more of them. (A whole
    /// tree is added at once with [`Queue::add_flow`].)
    pub parent: Option<i64>,
    /// How long to keep this job once it ends (besides its queue's rules).
    pub retention: JobRetention,
}

/// How long one job is kept once it ends; `None` leaves it to its queue's rules.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JobRetention {
    /// Deleted this long after it completed.
    pub completed_for_ms: Option<u64>,
    /// Deleted this long after it died or was discarded.
    pub failed_for_ms: Option<u64>,
}

/// What to keep of one kind of ended job.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Keep {
    /// The newest this many.
    pub last: Option<u64>,
    /// Those that ended within this long.
    pub for_ms: Option<u64>,
}

/// A queue's retention: what its clean-up keeps of its completed and its failed (dead or
/// discarded) jobs. Both rules of a kind apply: a job is deleted when either drops it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Completed jobs.
    pub completed: Keep,
    /// Dead and discarded jobs.
    pub failed: Keep,
}

/// What a dead child does to its parent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ChildFailure {
    /// The parent dies too, naming the child (its other children run on).
    #[default]
    FailParent,
    /// The child counts as ended: the parent runs once every child has ended.
    Ignore,
    /// The parent waits until the child is re-driven and completes, or is discarded.
    Wait,
}

impl ChildFailure {
    fn name(self) -> &'static str {
        match self {
            ChildFailure::FailParent => "fail_parent",
            ChildFailure::Ignore => "ignore",
            ChildFailure::Wait => "wait",
        }
    }
}

/// A job and the children it waits for, each of which may be a flow itself.
#[derive(Clone, Debug, PartialEq)]
pub struct Flow {
    /// The job; with children, it runs only once they have ended.
    pub job: JobSpec,
    /// Its children.
    pub children: Vec<Flow>,
    /// What a dead child does to it.
    pub on_child_failure: ChildFailure,
}

impl Flow {
    /// A flow of one job and no children yet.
    pub fn new(job: JobSpec) -> Flow {
        Flow {
            job,
            children: Vec::new(),
            on_child_failure: ChildFailure::default(),
        }
    }

    /// The same flow with one more child.
    pub fn child(mut self, child: impl Into<Flow>) -> Flow {
        self.children.push(child.into());
        self
    }

    /// The same flow with another child-failure policy.
    pub fn on_child_failure(mut self, policy: ChildFailure) -> Flow {
        self.on_child_failure = policy;
        self
    }
}

impl From<JobSpec> for Flow {
    fn from(job: JobSpec) -> Flow {
        Flow::new(job)
    }
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            priority: 0,
            delay_ms: 0,
            run_at_ms: None,
            attempts: defaults::ATTEMPTS,
            backoff: Backoff::default(),
            jitter_pct: 0,
            timeout_ms: defaults::TIMEOUT_MS,
            dedup: None,
            parent: None,
            retention: JobRetention::default(),
        }
    }
}

/// A job to add.
#[derive(Clone, Debug, PartialEq)]
pub struct JobSpec {
    /// A declared queue.
    pub queue: String,
    /// The job type, which picks the handler.
    pub kind: String,
    /// Any JSON value, at most [`limits::PAYLOAD_BYTES_MAX`] bytes encoded.
    pub payload: serde_json::Value,
    /// Options.
    pub options: JobOptions,
}

impl JobSpec {
    /// A job with default options.
    pub fn new(queue: &str, kind: &str, payload: serde_json::Value) -> JobSpec {
        JobSpec {
            queue: queue.to_string(),
            kind: kind.to_string(),
            payload,
            options: JobOptions::default(),
        }
    }

    /// The same job with other options.
    pub fn with(mut self, options: JobOptions) -> JobSpec {
        self.options = options;
        self
    }
}

/// What kind of failure a handler reports; it decides the dead job's recovery strategy and
/// whether retrying can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorCategory {
    /// The attempt ran out of time (or its worker stopped reporting).
    Timeout,
    /// A remote service could not be reached.
    Network,
    /// The job's input is wrong: retrying cannot help.
    Validation,
    /// Credentials were refused: retrying cannot help.
    Authorization,
    /// A remote service asked us to slow down.
    RateLimit,
    /// A resource (disk, memory, a pool) ran out.
    Resource,
    /// Anything else.
    Unknown,
}

impl ErrorCategory {
    /// Every category.
    pub const ALL: [ErrorCategory; 7] = [
        ErrorCategory::Timeout,
        ErrorCategory::Network,
        ErrorCategory::Validation,
        ErrorCategory::Authorization,
        ErrorCategory::RateLimit,
        ErrorCategory::Resource,
        ErrorCategory::Unknown,
    ];

    /// Its name in the store and the API.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCategory::Timeout => "timeout",
            ErrorCategory::Network => "network",
            ErrorCategory::Validation => "validation",
            ErrorCategory::Authorization => "authorization",
            ErrorCategory::RateLimit => "rate_limit",
            ErrorCategory::Resource => "resource",
            ErrorCategory::Unknown => "unknown",
        }
    }

    /// The category of a name.
    pub fn from_name(name: &str) -> Option<ErrorCategory> {
        ErrorCategory::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Whether another attempt can succeed where this one failed.
    pub fn retryable(self) -> bool {
        !matches!(
            self,
            ErrorCategory::Validation | ErrorCategory::Authorization
        )
    }

    /// What an operator should do with a job that died of it.
    pub fn strategy(self) -> Strategy {
        match self {
            ErrorCategory::Timeout
            | ErrorCategory::Network
            | ErrorCategory::RateLimit
            | ErrorCategory::Resource => Strategy::RetryLater,
            ErrorCategory::Validation | ErrorCategory::Authorization | ErrorCategory::Unknown => {
                Strategy::ManualReview
            }
        }
    }
}

/// What to do with a dead job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// The cause is likely passing: re-drive it later.
    RetryLater,
    /// Someone must look at it.
    ManualReview,
    /// It is not worth keeping.
    Discard,
}

impl Strategy {
    /// Its name in the store and the API.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::RetryLater => "retry_later",
            Strategy::ManualReview => "manual_review",
            Strategy::Discard => "discard",
        }
    }
}

/// A failed attempt, as a handler reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobError {
    /// Its category.
    pub category: ErrorCategory,
    /// What happened.
    pub message: String,
    /// Overrides the category's own strategy if the job dies of it.
    pub strategy: Option<Strategy>,
}

impl JobError {
    /// A failure of a category.
    pub fn new(category: ErrorCategory, message: impl Into<String>) -> JobError {
        JobError {
            category,
            message: message.into(),
            strategy: None,
        }
    }
}

/// A claimed job.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    /// Its id.
    pub id: i64,
    /// Its queue.
    pub queue: String,
    /// Its type.
    pub kind: String,
    /// Its payload.
    pub payload: serde_json::Value,
    /// Its priority.
    pub priority: i32,
    /// This attempt's number, from 1.
    pub attempt: u32,
    /// Claims allowed in all.
    pub attempts_max: u32,
    /// How long this attempt may run.
    pub timeout_ms: u64,
    /// The lease token every report must carry.
    pub lease: i64,
    /// When the lease ends unless a heartbeat extends it.
    pub lease_until_ms: i64,
    backoff: Backoff,
    jitter_pct: u8,
}

/// Where the queue reads the time; tests drive a [`ManualClock`].
pub trait Clock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The system's clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    }
}

/// A clock that moves only when told.
#[derive(Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// A clock showing `now_ms`.
    pub fn new(now_ms: i64) -> ManualClock {
        ManualClock(AtomicI64::new(now_ms))
    }
    /// Moves it forward.
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The stored queue. Cheap to clone; clones share one event stream.
#[derive(Clone)]
pub struct Queue {
    store: Arc<Store>,
    clock: Arc<dyn Clock>,
    events: broadcast::Sender<JobEvent>,
    /// The depth gauges last set, so that a state that emptied is set back to zero.
    depth_series: Arc<Mutex<BTreeSet<(String, String, i32)>>>,
}

fn check_name(field: &'static str, value: &str, max: usize) -> Result<(), QueueError> {
    if value.is_empty() || value.len() > max {
        return Err(invalid(field, format!("must be 1 to {max} bytes")));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
    {
        return Err(invalid(field, "may hold only letters, digits and _ - . :"));
    }
    Ok(())
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

pub(crate) fn encode_json(
    field: &'static str,
    value: &serde_json::Value,
    max: usize,
) -> Result<String, QueueError> {
    let text = value.to_string();
    if text.len() > max {
        return Err(invalid(
            field,
            format!("is {} bytes encoded; at most {max}", text.len()),
        ));
    }
    Ok(text)
}

/// Validates a job and turns it into the store's row.
fn validate(spec: &JobSpec, now_ms: i64) -> Result<NewJob, QueueError> {
    check_name("queue", &spec.queue, limits::QUEUE_NAME_BYTES_MAX)?;
    check_name("type", &spec.kind, limits::KIND_BYTES_MAX)?;
    let payload = encode_json("payload", &spec.payload, limits::PAYLOAD_BYTES_MAX)?;
    let options = &spec.options;
    if !(0..=limits::PRIORITY_MAX).contains(&options.priority) {
        return Err(invalid(
            "priority",
            format!("must be 0 to {}", limits::PRIORITY_MAX),
        ));
    }
    if options.delay_ms < 0 {
        return Err(invalid("delay_ms", "must not be negative"));
    }
    if options.delay_ms > limits::DELAY_MS_MAX {
        return Err(invalid(
            "delay_ms",
            format!("must be at most {} (366 days)", limits::DELAY_MS_MAX),
        ));
    }
    let run_at_ms = match options.run_at_ms {
        Some(at) if at > now_ms.saturating_add(limits::DELAY_MS_MAX) => {
            return Err(invalid("run_at_ms", "must be within 366 days from now"));
        }
        Some(at) if at < 0 => return Err(invalid("run_at_ms", "must not be negative")),
        Some(at) => at,
        None => now_ms + options.delay_ms,
    };
    if !(1..=limits::ATTEMPTS_MAX).contains(&options.attempts) {
        return Err(invalid(
            "attempts",
            format!("must be 1 to {}", limits::ATTEMPTS_MAX),
        ));
    }
    let (backoff, backoff_ms, backoff_max_ms) = match options.backoff {
        Backoff::Fixed { delay_ms } => ("fixed", delay_ms, delay_ms),
        Backoff::Exponential { base_ms, max_ms } => {
            if max_ms < base_ms {
                return Err(invalid(
                    "backoff.max_ms",
                    "must be at least backoff.base_ms",
                ));
            }
            ("exponential", base_ms, max_ms)
        }
    };
    if backoff_max_ms > limits::BACKOFF_MS_MAX {
        return Err(invalid(
            "backoff",
            format!(
                "delays must be at most {} ms (7 days)",
                limits::BACKOFF_MS_MAX
            ),
        ));
    }
    if options.jitter_pct > 100 {
        return Err(invalid("jitter_pct", "must be 0 to 100"));
    }
    if !(1..=limits::TIMEOUT_MS_MAX).contains(&options.timeout_ms) {
        return Err(invalid(
            "timeout_ms",
            format!("must be 1 to {} (24 hours)", limits::TIMEOUT_MS_MAX),
        ));
    }
    let dedup = match &options.dedup {
        None => None,
        Some(dedup) => {
            if dedup.key.is_empty() || dedup.key.len() > limits::DEDUP_KEY_BYTES_MAX {
                return Err(invalid(
                    "dedup.key",
                    format!("must be 1 to {} bytes", limits::DEDUP_KEY_BYTES_MAX),
                ));
            }
            if !(1..=limits::DEDUP_TTL_MS_MAX).contains(&dedup.ttl_ms) {
                return Err(invalid(
                    "dedup.ttl_ms",
                    format!("must be 1 to {} (30 days)", limits::DEDUP_TTL_MS_MAX),
                ));
            }
            Some((dedup.key.clone(), now_ms + dedup.ttl_ms as i64))
        }
    };
    Ok(NewJob {
        queue: spec.queue.clone(),
        kind: spec.kind.clone(),
        payload,
        priority: options.priority,
        run_at_ms,
        attempts_max: options.attempts,
        backoff,
        backoff_ms,
        backoff_max_ms,
        jitter_pct: options.jitter_pct,
        timeout_ms: options.timeout_ms,
        dedup,
        parent: options.parent.map(ParentRef::Job),
        on_child_failure: None,
        keep_completed_ms: check_keep(
            "retention.completed_for_ms",
            options.retention.completed_for_ms,
        )?,
        keep_failed_ms: check_keep("retention.failed_for_ms", options.retention.failed_for_ms)?,
        schedule: None,
    })
}

fn check_keep(field: &'static str, ms: Option<u64>) -> Result<Option<u64>, QueueError> {
    match ms {
        Some(ms) if ms > limits::KEEP_MS_MAX => Err(invalid(
            field,
            format!("must be at most {} (366 days)", limits::KEEP_MS_MAX),
        )),
        other => Ok(other),
    }
}

/// Flattens a flow depth first, parents before their children.
fn flatten_flow(
    flow: &Flow,
    parent: Option<usize>,
    depth: usize,
    now_ms: i64,
    jobs: &mut Vec<NewJob>,
) -> Result<(), QueueError> {
    if depth > limits::FLOW_DEPTH_MAX {
        return Err(invalid(
            "children",
            format!("a flow is at most {} levels deep", limits::FLOW_DEPTH_MAX),
        ));
    }
    if jobs.len() >= limits::BULK_JOBS_MAX {
        return Err(invalid(
            "children",
            format!("a flow has at most {} jobs", limits::BULK_JOBS_MAX),
        ));
    }
    if flow.job.options.parent.is_some() {
        return Err(invalid("parent", "is set by the flow itself"));
    }
    let mut job = validate(&flow.job, now_ms)?;
    job.parent = parent.map(ParentRef::Earlier);
    if !flow.children.is_empty() {
        job.on_child_failure = Some(flow.on_child_failure.name());
    }
    let index = jobs.len();
    jobs.push(job);
    for child in &flow.children {
        flatten_flow(child, Some(index), depth + 1, now_ms, jobs)?;
    }
    Ok(())
}

fn validate_all(specs: &[JobSpec], now_ms: i64) -> Result<Vec<NewJob>, QueueError> {
    if specs.len() > limits::BULK_JOBS_MAX {
        return Err(invalid(
            "jobs",
            format!("at most {} jobs in one add", limits::BULK_JOBS_MAX),
        ));
    }
    let jobs: Vec<NewJob> = specs
        .iter()
        .map(|spec| validate(spec, now_ms))
        .collect::<Result<_, _>>()?;
    // Within one add, a key can only go to one job: which one would be arbitrary.
    let mut keys = std::collections::BTreeSet::new();
    for job in &jobs {
        if let Some((key, _)) = &job.dedup
            && !keys.insert((job.queue.as_str(), key.as_str()))
        {
            return Err(invalid(
                "dedup.key",
                format!("{key:?} appears twice in one add to queue {:?}", job.queue),
            ));
        }
    }
    Ok(jobs)
}

/// The delay before attempt `attempt + 1` after attempt `attempt` failed, with its jitter.
pub fn backoff_ms(backoff: Backoff, jitter_pct: u8, attempt: u32, random: u64) -> u64 {
    let delay = match backoff {
        Backoff::Fixed { delay_ms } => delay_ms,
        Backoff::Exponential { base_ms, max_ms } => {
            let doublings = attempt.saturating_sub(1).min(62);
            base_ms.saturating_mul(1u64 << doublings).min(max_ms)
        }
    };
    // Jitter takes a random part of the delay away: the delay is never longer than asked.
    let spread = delay / 100 * u64::from(jitter_pct.min(100));
    if spread == 0 {
        return delay;
    }
    delay - random % (spread + 1)
}

fn random() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(SystemClock.now_ms() as u64);
    hasher.finish()
}

fn to_job(claimed: ClaimedJob) -> Job {
    let backoff = match claimed.backoff.as_str() {
        "fixed" => Backoff::Fixed {
            delay_ms: claimed.backoff_ms,
        },
        _ => Backoff::Exponential {
            base_ms: claimed.backoff_ms,
            max_ms: claimed.backoff_max_ms,
        },
    };
    Job {
        id: claimed.id,
        queue: claimed.queue,
        kind: claimed.kind,
        // The store holds what `validate` encoded; an unreadable payload reaches the handler
        // as a JSON string of the raw text rather than being lost.
        payload: serde_json::from_str(&claimed.payload)
            .unwrap_or(serde_json::Value::String(claimed.payload)),
        priority: claimed.priority,
        attempt: claimed.attempts,
        attempts_max: claimed.attempts_max,
        timeout_ms: claimed.timeout_ms,
        lease: claimed.lease,
        lease_until_ms: claimed.lease_until_ms,
        backoff,
        jitter_pct: claimed.jitter_pct,
    }
}

fn check_lease_ms(lease_ms: u64) -> Result<(), QueueError> {
    if !(limits::LEASE_MS_MIN..=limits::LEASE_MS_MAX).contains(&lease_ms) {
        return Err(invalid(
            "lease_ms",
            format!(
                "must be {} to {}",
                limits::LEASE_MS_MIN,
                limits::LEASE_MS_MAX
            ),
        ));
    }
    Ok(())
}

impl Queue {
    /// A queue over `store` on the system clock.
    pub fn new(store: Arc<Store>) -> Queue {
        Queue::with_clock(store, Arc::new(SystemClock))
    }

    /// A queue over `store` reading `clock`.
    pub fn with_clock(store: Arc<Store>, clock: Arc<dyn Clock>) -> Queue {
        Queue {
            store,
            clock,
            events: broadcast::channel(events::EVENTS_BUFFER).0,
            depth_series: Arc::default(),
        }
    }

    /// The event stream of this queue (and its clones) from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.events.subscribe()
    }

    fn publish(&self, job_id: i64, queue: &str, kind: &str, event: EventKind) {
        if self.events.receiver_count() == 0 {
            return;
        }
        let _ = self.events.send(JobEvent {
            job_id,
            queue: queue.to_string(),
            kind: kind.to_string(),
            at_ms: self.now_ms(),
            event,
        });
    }

    fn publish_added(&self, jobs: &[NewJob], added: &[Added]) {
        for (job, added) in jobs.iter().zip(added) {
            let Added::New(id) = *added else { continue };
            events::count(&job.queue, &job.kind, "added", 1);
            let event = if job.on_child_failure.is_some() {
                EventKind::WaitingChildren
            } else {
                EventKind::Waiting {
                    run_at_ms: job.run_at_ms,
                }
            };
            self.publish(id, &job.queue, &job.kind, event);
        }
    }

    fn publish_parents(&self, parents: &[ParentChange]) {
        for parent in parents {
            let event = if parent.state == "dead" {
                events::count(&parent.queue, &parent.kind, "dead", 1);
                EventKind::Dead {
                    category: "child".into(),
                }
            } else {
                EventKind::Waiting {
                    run_at_ms: self.now_ms(),
                }
            };
            self.publish(parent.id, &parent.queue, &parent.kind, event);
        }
    }

    /// The store underneath.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The time now, as the queue sees it.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Declares a queue so that jobs can be added to it (declaring again changes nothing).
    pub async fn declare(&self, name: &str) -> Result<(), QueueError> {
        check_name("queue", name, limits::QUEUE_NAME_BYTES_MAX)?;
        Ok(self.store.declare_queue(name).await?)
    }

    /// Adds one job.
    pub async fn add(&self, spec: JobSpec) -> Result<Added, QueueError> {
        let mut added = self.add_bulk(std::slice::from_ref(&spec)).await?;
        Ok(added.remove(0))
    }

    /// Adds jobs in one transaction: all of them, or (on any invalid job) none.
    pub async fn add_bulk(&self, specs: &[JobSpec]) -> Result<Vec<Added>, QueueError> {
        let now = self.now_ms();
        let jobs = validate_all(specs, now)?;
        let added = self.store.add_jobs(&jobs, now).await?;
        self.publish_added(&jobs, &added);
        Ok(added)
    }

    /// Adds a flow in one transaction: every job of it, parents before children, in depth
    /// first order; a parent runs only once its children have ended. Returns what each add
    /// did in that order (the flow's own job first).
    pub async fn add_flow(&self, flow: &Flow) -> Result<Vec<Added>, QueueError> {
        let now = self.now_ms();
        let mut jobs = Vec::new();
        flatten_flow(flow, None, 1, now, &mut jobs)?;
        let added = self.store.add_jobs(&jobs, now).await?;
        self.publish_added(&jobs, &added);
        Ok(added)
    }

    /// The children of a parent, by id.
    pub async fn children(&self, parent: i64) -> Result<Vec<JobRow>, QueueError> {
        Ok(self
            .store
            .child_jobs(parent, limits::CHILDREN_LIST_MAX)
            .await?)
    }

    /// Adds jobs inside the caller's transaction, so that they exist only if it commits. (No
    /// `waiting` event is published for them: the transaction may still roll back.)
    pub async fn add_in(
        &self,
        tx: &mut Tx<'_>,
        specs: &[JobSpec],
    ) -> Result<Vec<Added>, QueueError> {
        let now = self.now_ms();
        let jobs = validate_all(specs, now)?;
        Ok(tx.add_jobs(&jobs, now).await?)
    }

    /// Claims up to `limit` ready jobs of `queue` for `worker`, leased for `lease_ms`.
    pub async fn claim(
        &self,
        queue: &str,
        limit: usize,
        worker: &str,
        lease_ms: u64,
    ) -> Result<Vec<Job>, QueueError> {
        check_name("queue", queue, limits::QUEUE_NAME_BYTES_MAX)?;
        check_name("worker", worker, limits::QUEUE_NAME_BYTES_MAX)?;
        check_lease_ms(lease_ms)?;
        if !(1..=limits::CLAIM_JOBS_MAX).contains(&limit) {
            return Err(invalid(
                "limit",
                format!("must be 1 to {}", limits::CLAIM_JOBS_MAX),
            ));
        }
        let claimed = self
            .store
            .claim_jobs(queue, limit, self.now_ms(), lease_ms, worker)
            .await?;
        let jobs: Vec<Job> = claimed.into_iter().map(to_job).collect();
        events::count_runs(
            jobs.iter()
                .map(|job| (job.queue.as_str(), job.kind.as_str())),
            "started",
        );
        for job in &jobs {
            self.publish(
                job.id,
                &job.queue,
                &job.kind,
                EventKind::Active {
                    attempt: job.attempt,
                },
            );
        }
        Ok(jobs)
    }

    /// The earliest time a waiting job of `queue` becomes due, if any.
    pub async fn next_due_ms(&self, queue: &str) -> Result<Option<i64>, QueueError> {
        Ok(self.store.next_due_ms(queue).await?)
    }

    /// Extends a job's lease by `lease_ms` from now.
    pub async fn heartbeat(&self, id: i64, lease: i64, lease_ms: u64) -> Result<(), QueueError> {
        check_lease_ms(lease_ms)?;
        if self
            .store
            .heartbeat_job(id, lease, self.now_ms(), lease_ms)
            .await?
        {
            Ok(())
        } else {
            Err(QueueError::LeaseLost(id))
        }
    }

    /// Extends many jobs' leases by `lease_ms` from now in one statement; for each, whether
    /// its lease held.
    pub async fn heartbeat_many(
        &self,
        jobs: &[(i64, i64)],
        lease_ms: u64,
    ) -> Result<Vec<bool>, QueueError> {
        check_lease_ms(lease_ms)?;
        Ok(self
            .store
            .heartbeat_jobs(jobs, self.now_ms(), lease_ms)
            .await?)
    }

    /// Records a job's progress (any JSON value).
    pub async fn progress(
        &self,
        id: i64,
        lease: i64,
        progress: &serde_json::Value,
    ) -> Result<(), QueueError> {
        let text = encode_json("progress", progress, limits::RESULT_BYTES_MAX)?;
        if let Some((queue, kind)) = self.store.job_progress(id, lease, &text).await? {
            self.publish(id, &queue, &kind, EventKind::Progress(progress.clone()));
            Ok(())
        } else {
            Err(QueueError::LeaseLost(id))
        }
    }

    /// Completes a job with an optional result.
    pub async fn complete(
        &self,
        id: i64,
        lease: i64,
        result: Option<&serde_json::Value>,
    ) -> Result<(), QueueError> {
        let done = self.complete_many(&[(id, lease, result.cloned())]).await?;
        done[0].as_ref().map_err(|_| QueueError::LeaseLost(id))?;
        Ok(())
    }

    /// Completes many jobs in one transaction; each answer says whether its lease held.
    pub async fn complete_many(
        &self,
        completions: &[(i64, i64, Option<serde_json::Value>)],
    ) -> Result<Vec<Result<(), i64>>, QueueError> {
        let mut rows = Vec::with_capacity(completions.len());
        for (id, lease, result) in completions {
            let text = result
                .as_ref()
                .map(|r| encode_json("result", r, limits::RESULT_BYTES_MAX))
                .transpose()?;
            rows.push((*id, *lease, text));
        }
        let now = self.now_ms();
        let Settled { jobs, parents } = self.store.complete_jobs(&rows, now).await?;
        let ended: Vec<&Ended> = jobs.iter().flatten().collect();
        events::count_runs(
            ended.iter().map(|e| (e.queue.as_str(), e.kind.as_str())),
            "completed",
        );
        events::processing_times(
            ended
                .iter()
                .map(|e| (e.queue.as_str(), e.kind.as_str(), e.started_ms)),
            "completed",
            now,
        );
        let answers = jobs
            .iter()
            .zip(completions)
            .map(|(ended, (id, ..))| match ended {
                Some(ended) => {
                    self.publish(*id, &ended.queue, &ended.kind, EventKind::Completed);
                    Ok(())
                }
                None => Err(*id),
            })
            .collect();
        self.publish_parents(&parents);
        Ok(answers)
    }

    /// Reports a failed attempt of a claimed job: it is retried after its backoff while it
    /// has attempts left and the category is retryable, and dies otherwise. Returns whether
    /// it will be retried.
    pub async fn fail(&self, job: &Job, error: JobError) -> Result<bool, QueueError> {
        self.fail_attempt(
            job.id,
            job.lease,
            job.attempt,
            job.attempts_max,
            job.backoff,
            job.jitter_pct,
            error,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn fail_attempt(
        &self,
        id: i64,
        lease: i64,
        attempt: u32,
        attempts_max: u32,
        backoff: Backoff,
        jitter_pct: u8,
        error: JobError,
    ) -> Result<bool, QueueError> {
        let now = self.now_ms();
        let retry = error.category.retryable() && attempt < attempts_max;
        let failure = Failure {
            category: error.category.name(),
            message: truncate(error.message, limits::ERROR_MESSAGE_BYTES_MAX),
            retry_at_ms: retry
                .then(|| now + backoff_ms(backoff, jitter_pct, attempt, random()) as i64),
            strategy: error.strategy.unwrap_or(error.category.strategy()).name(),
        };
        let Some((ended, parents)) = self.store.fail_job(id, lease, &failure, now).await? else {
            return Err(QueueError::LeaseLost(id));
        };
        let (queue, kind) = (&ended.queue, &ended.kind);
        events::count(queue, kind, "failed", 1);
        events::processing_time(queue, kind, "failed", ended.started_ms, now);
        self.publish(
            id,
            queue,
            kind,
            EventKind::Failed {
                category: failure.category,
                message: failure.message.clone(),
            },
        );
        match failure.retry_at_ms {
            Some(run_at_ms) => {
                events::count(queue, kind, "retried", 1);
                self.publish(id, queue, kind, EventKind::Retried { run_at_ms });
            }
            None => {
                events::count(queue, kind, "dead", 1);
                let category = failure.category.to_string();
                self.publish(id, queue, kind, EventKind::Dead { category });
            }
        }
        self.publish_parents(&parents);
        Ok(retry)
    }

    /// Like [`Queue::fail`], for a worker that holds only the job's id and lease (a worker in
    /// another process): the claim is read back from the store. Refused with
    /// [`QueueError::LeaseLost`] unless the job is active under `lease`.
    pub async fn fail_leased(
        &self,
        id: i64,
        lease: i64,
        error: JobError,
    ) -> Result<bool, QueueError> {
        let claimed = self
            .store
            .leased_job(id, lease)
            .await?
            .ok_or(QueueError::LeaseLost(id))?;
        self.fail(&to_job(claimed), error).await
    }

    /// Gives a claimed job back unfinished, its attempt not counted (a worker shutting down).
    pub async fn release(&self, id: i64, lease: i64) -> Result<(), QueueError> {
        if self.store.release_job(id, lease, self.now_ms()).await? {
            Ok(())
        } else {
            Err(QueueError::LeaseLost(id))
        }
    }

    /// Fails every active job whose lease has ended (its worker died or hung) as a `timeout`
    /// attempt: retried after its backoff, or dead when out of attempts. Returns how many.
    pub async fn recover_stalled(&self) -> Result<usize, QueueError> {
        let expired = self
            .store
            .expired_leases(self.now_ms(), limits::STALLED_SWEEP_MAX)
            .await?;
        let mut recovered = 0;
        for claimed in expired {
            let job = to_job(claimed);
            events::count(&job.queue, &job.kind, "stalled", 1);
            self.publish(job.id, &job.queue, &job.kind, EventKind::Stalled);
            let error = JobError::new(
                ErrorCategory::Timeout,
                format!("stalled: the lease of attempt {} expired", job.attempt),
            );
            // A worker that reports at the last moment wins the race; that is not an error.
            match self.fail(&job, error).await {
                Ok(_) => recovered += 1,
                Err(QueueError::LeaseLost(_)) => {}
                Err(other) => return Err(other),
            }
        }
        Ok(recovered)
    }

    /// Pauses a queue: its jobs stay, none is claimed.
    pub async fn pause(&self, queue: &str) -> Result<(), QueueError> {
        self.set_paused(queue, true).await
    }

    /// Resumes a paused queue.
    pub async fn resume(&self, queue: &str) -> Result<(), QueueError> {
        self.set_paused(queue, false).await
    }

    async fn set_paused(&self, queue: &str, paused: bool) -> Result<(), QueueError> {
        if self.store.set_queue_paused(queue, paused).await? {
            Ok(())
        } else {
            Err(QueueError::UnknownQueue(queue.to_string()))
        }
    }

    /// Declared queues with whether each is paused.
    pub async fn queues(&self) -> Result<Vec<(String, bool)>, QueueError> {
        Ok(self.store.queues().await?)
    }

    /// A queue's jobs counted by state (`delayed` for waiting jobs not yet due) and priority.
    pub async fn counts(&self, queue: &str) -> Result<Vec<StateCount>, QueueError> {
        Ok(self.store.job_counts(queue, self.now_ms()).await?)
    }

    /// One job.
    pub async fn job(&self, id: i64) -> Result<JobRow, QueueError> {
        self.store.job(id).await?.ok_or(QueueError::UnknownJob(id))
    }

    /// A job's failed attempts.
    pub async fn failures(&self, id: i64) -> Result<Vec<FailureRow>, QueueError> {
        Ok(self.store.job_failures(id).await?)
    }

    /// Jobs of a queue in a state, by id after `after_id`.
    pub async fn jobs(
        &self,
        queue: &str,
        state: &str,
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<JobRow>, QueueError> {
        if !store::JOB_STATES.contains(&state) {
            return Err(invalid(
                "state",
                format!("must be one of {}", store::JOB_STATES.join(", ")),
            ));
        }
        let limit = limit.clamp(1, limits::LIST_JOBS_MAX);
        Ok(self
            .store
            .jobs_in_state(queue, state, after_id, limit)
            .await?)
    }

    /// The dead-letter queue, searched.
    pub async fn dead(&self, filter: &DeadFilter, limit: usize) -> Result<Vec<JobRow>, QueueError> {
        if let Some(category) = &filter.category
            && ErrorCategory::from_name(category).is_none()
        {
            return Err(invalid("category", "must be an error category"));
        }
        let limit = limit.clamp(1, limits::LIST_JOBS_MAX);
        Ok(self.store.dead_jobs(filter, limit).await?)
    }

    /// Sends dead jobs back to their queues with fresh attempts; returns those that were dead.
    pub async fn redrive(&self, ids: &[i64]) -> Result<Vec<i64>, QueueError> {
        if ids.len() > limits::BULK_JOBS_MAX {
            return Err(invalid(
                "ids",
                format!("at most {} in one call", limits::BULK_JOBS_MAX),
            ));
        }
        let now = self.now_ms();
        let redriven = self.store.redrive_jobs(ids, now).await?;
        for (id, queue, kind) in &redriven {
            events::count(queue, kind, "redriven", 1);
            self.publish(*id, queue, kind, EventKind::Waiting { run_at_ms: now });
        }
        Ok(redriven.into_iter().map(|(id, ..)| id).collect())
    }

    /// Discards a waiting, children-waiting or dead job (a parent waiting for it counts it
    /// as ended).
    pub async fn discard(&self, id: i64) -> Result<(), QueueError> {
        if let Some((queue, kind, parents)) = self.store.discard_job(id, self.now_ms()).await? {
            events::count(&queue, &kind, "discarded", 1);
            self.publish(id, &queue, &kind, EventKind::Discarded);
            self.publish_parents(&parents);
            Ok(())
        } else {
            match self.store.job(id).await? {
                None => Err(QueueError::UnknownJob(id)),
                Some(job) => Err(invalid(
                    "id",
                    format!(
                        "job {id} is {}; only waiting, children-waiting or dead jobs can be discarded",
                        job.state
                    ),
                )),
            }
        }
    }

    /// Recurring failures since `since_ms`, per window of `window_ms`: each window's counts by
    /// category and message, most frequent first.
    pub async fn failure_summary(
        &self,
        since_ms: i64,
        window_ms: i64,
    ) -> Result<Vec<FailureBucket>, QueueError> {
        if window_ms < 1 {
            return Err(invalid("window_ms", "must be positive"));
        }
        Ok(self
            .store
            .failure_buckets(since_ms, window_ms, limits::LIST_JOBS_MAX)
            .await?)
    }

    /// Sets a queue's retention rules, which its clean-up ([`Queue::purge`]) applies.
    pub async fn set_retention(&self, queue: &str, retention: Retention) -> Result<(), QueueError> {
        check_name("queue", queue, limits::QUEUE_NAME_BYTES_MAX)?;
        let completed_ms = check_keep("retention.completed.for_ms", retention.completed.for_ms)?;
        let failed_ms = check_keep("retention.failed.for_ms", retention.failed.for_ms)?;
        let keep = QueueKeep {
            completed_last: retention.completed.last,
            completed_ms,
            failed_last: retention.failed.last,
            failed_ms,
        };
        if self.store.set_queue_keep(queue, &keep).await? {
            Ok(())
        } else {
            Err(QueueError::UnknownQueue(queue.to_string()))
        }
    }

    /// A queue's retention rules.
    pub async fn retention(&self, queue: &str) -> Result<Retention, QueueError> {
        let keep = self
            .store
            .queue_keep(queue)
            .await?
            .ok_or_else(|| QueueError::UnknownQueue(queue.to_string()))?;
        Ok(Retention {
            completed: Keep {
                last: keep.completed_last,
                for_ms: keep.completed_ms,
            },
            failed: Keep {
                last: keep.failed_last,
                for_ms: keep.failed_ms,
            },
        })
    }

    /// The clean-up: deletes the ended jobs that neither their own retention nor their
    /// queue's keeps, in bounded batches; returns how many. It runs as the scheduled job
    /// [`schedule::RETENTION_KIND`] (see [`schedule::install_maintenance`]).
    pub async fn purge(&self) -> Result<u64, QueueError> {
        let mut deleted = 0;
        for _ in 0..limits::PURGE_ROUNDS_MAX {
            let n = self
                .store
                .purge_jobs(self.now_ms(), limits::PURGE_BATCH_MAX)
                .await?;
            deleted += n;
            if n < limits::PURGE_BATCH_MAX {
                break;
            }
        }
        Ok(deleted)
    }

    /// Samples every queue's depth into the metrics [`events::names::DEPTH`] (by state and
    /// priority) and [`events::names::DEAD`].
    pub async fn record_depth(&self) -> Result<(), QueueError> {
        let mut seen = BTreeSet::new();
        for (name, _) in self.queues().await? {
            let mut dead = 0;
            for count in self.counts(&name).await? {
                if count.state == "dead" {
                    dead += count.jobs;
                }
                metrics::gauge!(events::names::DEPTH, "queue" => name.clone(), "state" => count.state.clone(), "priority" => count.priority.to_string())
                    .set(count.jobs as f64);
                seen.insert((name.clone(), count.state, count.priority));
            }
            metrics::gauge!(events::names::DEAD, "queue" => name.clone()).set(dead as f64);
        }
        let mut series = self.depth_series.lock().expect("depth series lock");
        for (queue, state, priority) in series.difference(&seen) {
            metrics::gauge!(events::names::DEPTH, "queue" => queue.clone(), "state" => state.clone(), "priority" => priority.to_string())
                .set(0.0);
        }
        *series = seen;
        Ok(())
    }
}
