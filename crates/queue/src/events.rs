//! What happens to jobs, as a stream of events and as Prometheus metrics.
//!
//! Every [`Queue`](crate::Queue) operation that changes a job publishes a [`JobEvent`] on the
//! queue's broadcast channel ([`Queue::subscribe`](crate::Queue::subscribe)) once its
//! transaction has committed, and counts it in the metrics below through the `metrics` crate
//! (whatever recorder the process installs renders them; the server exposes them at
//! `/metrics`). The stream is in-process: it carries what this process did, not what other
//! processes sharing a PostgreSQL database did. A subscriber that falls more than
//! [`EVENTS_BUFFER`] events behind loses the oldest (tokio's `Lagged`), never slows the queue.

use std::time::Duration;

/// Events kept for a slow subscriber before the oldest are dropped.
pub const EVENTS_BUFFER: usize = 4_096;

/// Metric names.
pub mod names {
    /// Counter: jobs by `queue`, `type` and `status` (`added`, `started`, `completed`,
    /// `failed`, `retried`, `stalled`, `dead`, `discarded`, `redriven`).
    pub const JOBS: &str = "agora_queue_jobs_total";
    /// Histogram: seconds from an attempt's start to its completion or failure, by `queue`,
    /// `type` and `status` (`completed` or `failed`).
    pub const PROCESSING_SECONDS: &str = "agora_queue_processing_seconds";
    /// Gauge: jobs by `queue`, `state` (`waiting`, `delayed`, `waiting_children`, `active`,
    /// `completed`, `dead`, `discarded`) and `priority`, as of the last
    /// [`Queue::record_depth`](crate::Queue::record_depth).
    pub const DEPTH: &str = "agora_queue_depth";
    /// Gauge: dead jobs (the dead-letter queue) by `queue`, as of the last sample.
    pub const DEAD: &str = "agora_queue_dead_jobs";
    /// Gauge: jobs running in this process's workers, by `queue`.
    pub const ACTIVE: &str = "agora_queue_active_jobs";
}

/// Something that happened to a job.
#[derive(Clone, Debug, PartialEq)]
pub struct JobEvent {
    /// The job.
    pub job_id: i64,
    /// Its queue.
    pub queue: String,
    /// Its type.
    pub kind: String,
    /// When (the queue's clock).
    pub at_ms: i64,
    /// What.
    pub event: EventKind,
}

/// What happened.
#[derive(Clone, Debug, PartialEq)]
pub enum EventKind {
    /// Added (or re-driven, or released by its last child): runs from `run_at_ms`.
    Waiting {
        /// Not before.
        run_at_ms: i64,
    },
    /// Added as a parent: waits for its children first.
    WaitingChildren,
    /// Claimed by a worker.
    Active {
        /// The attempt, from 1.
        attempt: u32,
    },
    /// The handler reported progress.
    Progress(serde_json::Value),
    /// Completed.
    Completed,
    /// An attempt failed.
    Failed {
        /// The error category.
        category: &'static str,
        /// The message.
        message: String,
    },
    /// The failed job will run again.
    Retried {
        /// Not before.
        run_at_ms: i64,
    },
    /// Its lease ran out: its worker died or hung.
    Stalled,
    /// Moved to the dead-letter queue.
    Dead {
        /// The error category.
        category: String,
    },
    /// Discarded by an operator.
    Discarded,
}

pub(crate) fn count(queue: &str, kind: &str, status: &'static str, jobs: u64) {
    metrics::counter!(names::JOBS, "queue" => queue.to_string(), "type" => kind.to_string(), "status" => status)
        .increment(jobs);
}

pub(crate) fn processing_time(
    queue: &str,
    kind: &str,
    status: &'static str,
    started_ms: Option<i64>,
    now_ms: i64,
) {
    if let Some(started) = started_ms {
        let elapsed = Duration::from_millis(now_ms.saturating_sub(started).max(0) as u64);
        metrics::histogram!(names::PROCESSING_SECONDS, "queue" => queue.to_string(), "type" => kind.to_string(), "status" => status)
            .record(elapsed.as_secs_f64());
    }
}

/// Counts jobs given as `(queue, type)` in runs of equal labels, so that a batch of one queue
/// and type costs one counter update, not one per job.
pub(crate) fn count_runs<'a>(jobs: impl Iterator<Item = (&'a str, &'a str)>, status: &'static str) {
    let mut run: Option<((&str, &str), u64)> = None;
    for labels in jobs {
        match &mut run {
            Some((current, n)) if *current == labels => *n += 1,
            _ => {
                if let Some(((queue, kind), n)) = run.take() {
                    count(queue, kind, status, n);
                }
                run = Some((labels, 1));
            }
        }
    }
    if let Some(((queue, kind), n)) = run {
        count(queue, kind, status, n);
    }
}

/// Records processing times of jobs given as `(queue, type, started)`, one histogram handle
/// per run of equal labels.
pub(crate) fn processing_times<'a>(
    jobs: impl Iterator<Item = (&'a str, &'a str, Option<i64>)>,
    status: &'static str,
    now_ms: i64,
) {
    let mut current: Option<((&str, &str), metrics::Histogram)> = None;
    for (queue, kind, started) in jobs {
        let Some(started) = started else { continue };
        let handle = match &current {
            Some((labels, handle)) if *labels == (queue, kind) => handle,
            _ => {
                let handle = metrics::histogram!(names::PROCESSING_SECONDS, "queue" => queue.to_string(), "type" => kind.to_string(), "status" => status);
                &current.insert(((queue, kind), handle)).1
            }
        };
        let elapsed = Duration::from_millis(now_ms.saturating_sub(started).max(0) as u64);
        handle.record(elapsed.as_secs_f64());
    }
}
