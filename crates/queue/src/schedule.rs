//! Cron and interval schedules: a job template enqueued at every tick.
//!
//! A schedule is a stored row with its next tick. Firing it is one transaction that moves
//! the next tick forward *only if it still is the tick this scheduler read*, and adds the
//! tick's job; a second scheduler that read the same tick finds it moved and adds nothing.
//! The job also carries the schedule's name and tick under a unique index, so one tick can
//! never hold two jobs whatever runs. Ticks missed while no scheduler ran are coalesced: the
//! next firing enqueues one job (for the oldest missed tick) and moves on to the first tick
//! after now.
//!
//! Cron expressions are the standard five fields (minute, hour, day of month, month, day of
//! week), read in UTC, parsed by the `croner` crate. Intervals tick at whole multiples of the
//! interval since the Unix epoch, so every scheduler computes the same ticks.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use croner::Cron;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{JobOptions, JobSpec, Queue, QueueError, ScheduleRow, invalid, limits, validate};

/// The queue of Agora's own maintenance jobs.
pub const MAINTENANCE_QUEUE: &str = "agora.maintenance";
/// The job type (and schedule name) of the retention clean-up.
pub const RETENTION_KIND: &str = "agora.retention";
/// How often the clean-up runs unless told otherwise.
pub const RETENTION_EVERY_MS: u64 = 60_000;

/// When a schedule ticks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Every {
    /// A five-field crontab expression, in UTC.
    Cron(String),
    /// A fixed interval, ticking at whole multiples of it since the epoch.
    Interval {
        /// The interval.
        every_ms: u64,
    },
}

/// A schedule to create or replace.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleSpec {
    /// Its unique name.
    pub name: String,
    /// When it ticks.
    pub every: Every,
    /// The job enqueued at every tick. Its delay, run-at, deduplication and parent options
    /// must be unset: the tick sets the time and is the deduplication.
    pub job: JobSpec,
}

fn parse_cron(expression: &str) -> Result<Cron, QueueError> {
    if expression.len() > limits::CRON_BYTES_MAX {
        return Err(invalid(
            "cron",
            format!("must be at most {} bytes", limits::CRON_BYTES_MAX),
        ));
    }
    if expression.split_whitespace().count() != 5 {
        return Err(invalid(
            "cron",
            "must have five fields: minute hour day-of-month month day-of-week",
        ));
    }
    Cron::from_str(expression).map_err(|error| invalid("cron", error.to_string()))
}

/// The first tick strictly after `after_ms`.
fn next_tick(cron: Option<&Cron>, every_ms: Option<u64>, after_ms: i64) -> Result<i64, QueueError> {
    match (cron, every_ms) {
        (Some(cron), _) => {
            let after = DateTime::<Utc>::from_timestamp_millis(after_ms)
                .ok_or_else(|| invalid("cron", "the time is out of range"))?;
            let next = cron
                .find_next_occurrence(&after, false)
                .map_err(|error| invalid("cron", format!("has no next time: {error}")))?;
            Ok(next.timestamp_millis())
        }
        (None, Some(every)) => {
            let every = every.max(1) as i64;
            Ok((after_ms.div_euclid(every) + 1) * every)
        }
        (None, None) => Err(invalid(
            "every",
            "a schedule needs a cron expression or an interval",
        )),
    }
}

impl Queue {
    /// Creates or replaces a schedule. Replacing one with the same timing keeps its next
    /// tick, so every process can declare its schedules when it starts.
    pub async fn upsert_schedule(&self, spec: &ScheduleSpec) -> Result<(), QueueError> {
        crate::check_name("name", &spec.name, limits::QUEUE_NAME_BYTES_MAX)?;
        let options = &spec.job.options;
        if options.delay_ms != 0 || options.run_at_ms.is_some() {
            return Err(invalid(
                "delay_ms",
                "a scheduled job runs at its tick: no delay or run_at_ms",
            ));
        }
        if options.dedup.is_some() {
            return Err(invalid(
                "dedup",
                "a scheduled job is deduplicated by its tick",
            ));
        }
        if options.parent.is_some() {
            return Err(invalid("parent", "a scheduled job cannot be a child"));
        }
        let now = self.now_ms();
        let job = validate(&spec.job, now)?;
        let (cron, every_ms) = match &spec.every {
            Every::Cron(expression) => (Some(expression.trim().to_string()), None),
            Every::Interval { every_ms } => {
                if !(limits::INTERVAL_MS_MIN..=limits::INTERVAL_MS_MAX).contains(every_ms) {
                    return Err(invalid(
                        "every_ms",
                        format!(
                            "must be {} to {} (366 days)",
                            limits::INTERVAL_MS_MIN,
                            limits::INTERVAL_MS_MAX
                        ),
                    ));
                }
                (None, Some(*every_ms))
            }
        };
        let parsed = cron.as_deref().map(parse_cron).transpose()?;
        let next_tick_ms = next_tick(parsed.as_ref(), every_ms, now)?;
        let existing = self.store.schedules().await?;
        if existing.len() >= limits::SCHEDULES_MAX && !existing.iter().any(|s| s.name == spec.name)
        {
            return Err(invalid(
                "name",
                format!("at most {} schedules", limits::SCHEDULES_MAX),
            ));
        }
        let row = ScheduleRow {
            name: spec.name.clone(),
            cron,
            every_ms,
            next_tick_ms,
            job,
        };
        Ok(self.store.upsert_schedule(&row, now).await?)
    }

    /// Removes a schedule (jobs it already enqueued stay).
    pub async fn remove_schedule(&self, name: &str) -> Result<(), QueueError> {
        if self.store.remove_schedule(name).await? {
            Ok(())
        } else {
            Err(QueueError::UnknownSchedule(name.to_string()))
        }
    }

    /// Every schedule, by name.
    pub async fn schedules(&self) -> Result<Vec<ScheduleRow>, QueueError> {
        Ok(self.store.schedules().await?)
    }

    /// Fires every schedule whose tick has come: one job per schedule (missed ticks are
    /// coalesced), unless another scheduler fired that tick first. Returns the jobs added.
    pub async fn fire_schedules(&self) -> Result<usize, QueueError> {
        let now = self.now_ms();
        let due = self
            .store
            .due_schedules(now, limits::SCHEDULES_FIRED_MAX)
            .await?;
        let mut fired = 0;
        for schedule in due {
            let parsed = schedule.cron.as_deref().map(parse_cron).transpose();
            let next = parsed.and_then(|cron| {
                next_tick(
                    cron.as_ref(),
                    schedule.every_ms,
                    now.max(schedule.next_tick_ms),
                )
            });
            let next = match next {
                Ok(next) => next,
                // A stored expression that stopped parsing (it was valid when stored) must
                // not stop the others: it is pushed a day ahead.
                Err(_) => now + 24 * 3600 * 1000,
            };
            let mut job = schedule.job.clone();
            job.run_at_ms = now;
            job.schedule = Some((schedule.name.clone(), schedule.next_tick_ms));
            let mut tx = self.store.begin().await?;
            if !tx
                .advance_schedule(&schedule.name, schedule.next_tick_ms, next)
                .await?
            {
                tx.rollback().await?;
                continue;
            }
            let added = tx.add_jobs(std::slice::from_ref(&job), now).await?;
            tx.commit().await?;
            self.publish_added(std::slice::from_ref(&job), &added);
            fired += 1;
        }
        Ok(fired)
    }

    /// Declares the maintenance queue and the retention clean-up's schedule (every
    /// `every_ms`). A worker on [`MAINTENANCE_QUEUE`] with [`retention_handler`] runs it.
    pub async fn install_maintenance(&self, every_ms: u64) -> Result<(), QueueError> {
        self.declare(MAINTENANCE_QUEUE).await?;
        let job = JobSpec::new(MAINTENANCE_QUEUE, RETENTION_KIND, serde_json::json!({})).with(
            JobOptions {
                attempts: 3,
                timeout_ms: 5 * 60 * 1000,
                ..JobOptions::default()
            },
        );
        self.upsert_schedule(&ScheduleSpec {
            name: RETENTION_KIND.to_string(),
            every: Every::Interval { every_ms },
            job,
        })
        .await
    }
}

/// The handler of [`RETENTION_KIND`] jobs: runs [`Queue::purge`] and returns how many jobs it
/// deleted.
pub async fn retention_handler(queue: Queue) -> crate::worker::HandlerResult {
    match queue.purge().await {
        Ok(deleted) => Ok(Some(serde_json::json!({ "deleted": deleted }))),
        Err(error) => Err(crate::JobError::new(
            crate::ErrorCategory::Resource,
            format!("clean-up failed: {error}"),
        )),
    }
}

/// How a scheduler runs.
#[derive(Clone, Debug)]
pub struct SchedulerOptions {
    /// The longest sleep between two looks at the schedules (a schedule added by another
    /// process is seen within this).
    pub poll_ms: u64,
    /// How often queue depths are sampled into the metrics (0: never).
    pub depth_sample_ms: u64,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        SchedulerOptions {
            poll_ms: 1_000,
            depth_sample_ms: 5_000,
        }
    }
}

/// A running scheduler: fires due schedules, sleeping until the next tick.
pub struct Scheduler {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), QueueError>>,
}

/// Store errors in a row after which a scheduler stops.
pub const SCHEDULER_ERRORS_MAX: u32 = 10;

impl Scheduler {
    /// Starts a scheduler over `queue`. Any number may run, in one process or many.
    pub fn start(queue: Queue, options: SchedulerOptions) -> Result<Scheduler, QueueError> {
        if options.poll_ms == 0 {
            return Err(invalid("poll_ms", "must be positive"));
        }
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut errors = 0;
            let mut next_sample = queue.now_ms();
            while !*stopped.borrow() {
                let pass = async {
                    queue.fire_schedules().await?;
                    if options.depth_sample_ms > 0 && queue.now_ms() >= next_sample {
                        next_sample = queue.now_ms() + options.depth_sample_ms as i64;
                        queue.record_depth().await?;
                    }
                    queue
                        .store
                        .next_schedule_tick_ms()
                        .await
                        .map_err(QueueError::from)
                };
                let mut sleep_ms = options.poll_ms;
                match pass.await {
                    Ok(next) => {
                        errors = 0;
                        if let Some(next) = next {
                            let wait = next.saturating_sub(queue.now_ms()).max(1) as u64;
                            sleep_ms = sleep_ms.min(wait);
                        }
                    }
                    Err(error) => {
                        errors += 1;
                        if errors >= SCHEDULER_ERRORS_MAX {
                            return Err(error);
                        }
                        // Back off: 50 ms, 100 ms, … at most the poll.
                        sleep_ms = sleep_ms.min(50u64 << errors.min(10));
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(sleep_ms)) => {}
                    _ = stopped.changed() => break,
                }
            }
            Ok(())
        });
        Ok(Scheduler { stop, task })
    }

    /// Stops it; returns the error that stopped it earlier, if any.
    pub async fn shutdown(self) -> Result<(), QueueError> {
        let _ = self.stop.send(true);
        match self.task.await {
            Ok(result) => result,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(_) => Ok(()),
        }
    }
}
