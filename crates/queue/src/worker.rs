//! In-process workers: Rust handlers registered by job type, run with a bounded concurrency
//! and an optional rate limit, under leases kept alive by heartbeats.
//!
//! One worker serves one queue with three kinds of task. The *fetcher* claims as many jobs as
//! there are free slots (and the rate limit allows) in one statement, and when there are none
//! it sleeps until the store signals new jobs for its queue (an add in this process, or on
//! PostgreSQL a notification from any process) or the next delayed job falls due, with a
//! bounded poll as the fallback. Each job
//! runs in its own task with its timeout and heartbeat. The *completer* writes the outcomes:
//! every completion waiting at that moment in one transaction, so a busy worker pays one
//! commit for many jobs. Shutdown stops claiming, lets running jobs finish for a grace period,
//! then releases the rest (their attempt not counted) and writes every outcome before it
//! returns.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

use crate::{ErrorCategory, Job, JobError, Queue, QueueError, limits};

/// What a handler returns: a result to store with the completion, or the failure.
pub type HandlerResult = Result<Option<serde_json::Value>, JobError>;
/// A handler's future.
pub type HandlerFuture = Pin<Box<dyn Future<Output = HandlerResult> + Send>>;
/// A job handler.
pub type Handler = Arc<dyn Fn(JobContext) -> HandlerFuture + Send + Sync>;

/// Bounds of workers.
pub mod worker_limits {
    /// Jobs one worker runs at once.
    pub const CONCURRENCY_MAX: usize = 1_000;
    /// Claimed jobs a worker holds ready beyond its running ones.
    pub const PREFETCH_MAX: usize = 1_000;
    /// Completions written in one transaction.
    pub const COMPLETIONS_PER_COMMIT_MAX: usize = 1_000;
    /// Store errors in a row after which a worker stops (it retries the ones before, backing
    /// off from 50 ms up to its poll interval).
    pub const STORE_ERRORS_MAX: u32 = 10;
}

/// At most `jobs` jobs started per `window_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Jobs per window.
    pub jobs: u32,
    /// The window.
    pub window_ms: u64,
}

/// How a worker runs.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// Its name, recorded on the jobs it claims.
    pub name: String,
    /// Jobs run at once.
    pub concurrency: usize,
    /// Jobs started per window, if limited.
    pub rate: Option<RateLimit>,
    /// A claimed job's lease; a heartbeat renews it every third of it.
    pub lease_ms: u64,
    /// Claimed jobs held ready beyond the running ones, so that one claim feeds many jobs
    /// (at most [`worker_limits::PREFETCH_MAX`]; not used with a rate limit). Their leases
    /// run from the claim: a job that waited for half of it is renewed before it starts.
    pub prefetch: usize,
    /// The longest sleep between two claims when no wake-up comes.
    pub poll_ms: u64,
    /// How often this worker looks for stalled jobs of any worker.
    pub stalled_check_ms: u64,
    /// How long shutdown waits for running jobs before releasing them.
    pub shutdown_grace_ms: u64,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            name: "worker".into(),
            concurrency: 10,
            rate: None,
            prefetch: 50,
            lease_ms: 30_000,
            poll_ms: 1_000,
            stalled_check_ms: 5_000,
            shutdown_grace_ms: 10_000,
        }
    }
}

/// What a handler gets: the job, and a way to report progress.
pub struct JobContext {
    /// The claimed job.
    pub job: Job,
    queue: Queue,
}

impl JobContext {
    /// Records progress (any JSON value); fails when the lease was lost.
    pub async fn progress(&self, progress: serde_json::Value) -> Result<(), QueueError> {
        self.queue
            .progress(self.job.id, self.job.lease, &progress)
            .await
    }
}

/// A worker being set up: register handlers, then [`Worker::start`].
pub struct Worker {
    queue: Queue,
    queue_name: String,
    options: WorkerOptions,
    handlers: HashMap<String, Handler>,
}

/// A running worker.
pub struct WorkerHandle {
    stop: watch::Sender<bool>,
    fetcher: JoinHandle<Result<(), QueueError>>,
}

impl WorkerHandle {
    /// Stops claiming, waits for running jobs up to the grace period, releases the rest, and
    /// returns once every outcome is written (or the error that stopped the worker).
    pub async fn shutdown(self) -> Result<(), QueueError> {
        let _ = self.stop.send(true);
        match self.fetcher.await {
            Ok(result) => result,
            // A panic in the worker is a bug: surface it rather than dress it as an error.
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(_) => Ok(()),
        }
    }
}

enum Outcome {
    Done(i64, i64, Option<serde_json::Value>),
    Failed(Job, JobError),
    Release(i64, i64),
}

impl Worker {
    /// A worker for `queue_name`.
    pub fn new(queue: Queue, queue_name: &str, options: WorkerOptions) -> Worker {
        Worker {
            queue,
            queue_name: queue_name.to_string(),
            options,
            handlers: HashMap::new(),
        }
    }

    /// Registers the handler of a job type.
    pub fn handle<F, Fut>(mut self, kind: &str, handler: F) -> Worker
    where
        F: Fn(JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |ctx| Box::pin(handler(ctx)));
        self.handlers.insert(kind.to_string(), handler);
        self
    }

    /// Registers the retention clean-up's handler ([`crate::schedule::RETENTION_KIND`]), for a
    /// worker on [`crate::schedule::MAINTENANCE_QUEUE`].
    pub fn with_maintenance(self) -> Worker {
        let queue = self.queue.clone();
        self.handle(crate::schedule::RETENTION_KIND, move |_ctx| {
            crate::schedule::retention_handler(queue.clone())
        })
    }

    /// Checks the options and starts the worker.
    pub async fn start(self) -> Result<WorkerHandle, QueueError> {
        let options = &self.options;
        if !(1..=worker_limits::CONCURRENCY_MAX).contains(&options.concurrency) {
            return Err(QueueError::Invalid {
                field: "concurrency",
                rule: format!("must be 1 to {}", worker_limits::CONCURRENCY_MAX),
            });
        }
        if options.prefetch > worker_limits::PREFETCH_MAX {
            return Err(QueueError::Invalid {
                field: "prefetch",
                rule: format!("must be at most {}", worker_limits::PREFETCH_MAX),
            });
        }
        if !(limits::LEASE_MS_MIN..=limits::LEASE_MS_MAX).contains(&options.lease_ms) {
            return Err(QueueError::Invalid {
                field: "lease_ms",
                rule: format!(
                    "must be {} to {}",
                    limits::LEASE_MS_MIN,
                    limits::LEASE_MS_MAX
                ),
            });
        }
        if let Some(rate) = options.rate
            && (rate.jobs == 0 || rate.window_ms == 0)
        {
            return Err(QueueError::Invalid {
                field: "rate",
                rule: "needs at least one job per window of at least 1 ms".into(),
            });
        }
        if options.poll_ms == 0 || options.stalled_check_ms == 0 {
            return Err(QueueError::Invalid {
                field: "poll_ms",
                rule: "poll and stalled-check intervals must be positive".into(),
            });
        }
        if !self
            .queue
            .queues()
            .await?
            .iter()
            .any(|(name, _)| *name == self.queue_name)
        {
            return Err(QueueError::UnknownQueue(self.queue_name.clone()));
        }
        let (stop, stopped) = watch::channel(false);
        let fetcher = tokio::spawn(self.run(stopped));
        Ok(WorkerHandle { stop, fetcher })
    }

    async fn run(self, mut stopped: watch::Receiver<bool>) -> Result<(), QueueError> {
        let Worker {
            queue,
            queue_name,
            options,
            handlers,
        } = self;
        let handlers = Arc::new(handlers);
        let slots = Arc::new(Semaphore::new(options.concurrency));
        // Room for a full commit's worth of outcomes, so that finished jobs free their slots
        // while the previous commit is still on its way to disk.
        let (outcomes, outcome_rx) =
            mpsc::channel((options.concurrency * 2).max(worker_limits::COMPLETIONS_PER_COMMIT_MAX));
        let completer = tokio::spawn(complete_loop(queue.clone(), outcome_rx));
        let (release, _) = watch::channel(false);
        let release = Arc::new(release);
        let mut wakeups = queue.store().wakeups(&queue_name);
        let forwarder = spawn_listener(&queue).await;
        let mut started_in_window: Vec<i64> = Vec::new();
        let mut next_stalled_check = queue.now_ms();
        let mut failure = None;
        let mut store_errors = 0u32;
        let mut buffer: VecDeque<Job> = VecDeque::new();
        let renewal = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(renewal);
        let mut renewal_due: Option<i64> = None;
        let active = metrics::gauge!(crate::events::names::ACTIVE, "queue" => queue_name.clone());
        // A store error is retried after a pause; only a run of them stops the worker.
        macro_rules! store_error {
            ($error:expr) => {{
                store_errors += 1;
                if store_errors >= worker_limits::STORE_ERRORS_MAX {
                    failure = Some($error);
                    break;
                }
                let pause = options.poll_ms.min(50u64 << store_errors.min(10));
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(pause)) => {}
                    _ = stopped.changed() => break,
                }
                continue;
            }};
        }

        while !*stopped.borrow() {
            if queue.now_ms() >= next_stalled_check {
                next_stalled_check = queue.now_ms() + options.stalled_check_ms as i64;
                if let Err(error) = queue.recover_stalled().await {
                    store_error!(error);
                }
            }
            // Wait for a free slot, then take every free one. Jobs waiting in the buffer keep
            // their leases meanwhile, however long the running ones take: one timer, moved
            // only when the renewal's due time changes (a slot free at once needs none).
            let first = match slots.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    let due = renewal_due_ms(&buffer, options.lease_ms);
                    if due != renewal_due {
                        renewal_due = due;
                        if let Some(due) = due {
                            let wait = due.saturating_sub(queue.now_ms()).max(0) as u64;
                            renewal
                                .as_mut()
                                .reset(tokio::time::Instant::now() + Duration::from_millis(wait));
                        }
                    }
                    tokio::select! {
                        permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                        () = &mut renewal, if renewal_due.is_some() => {
                            // Set again from the renewed leases (or after an error) next time.
                            renewal_due = None;
                            if let Err(error) = renew_buffer(&queue, &mut buffer, options.lease_ms).await {
                                store_error!(error);
                            }
                            continue;
                        }
                        _ = stopped.changed() => break,
                    }
                }
            };
            let mut permits = vec![first];
            while permits.len() < limits::CLAIM_JOBS_MAX {
                match slots.clone().try_acquire_owned() {
                    Ok(permit) => permits.push(permit),
                    Err(_) => break,
                }
            }
            if buffer.len() < permits.len() {
                // Claim for the free slots and, without a rate limit, as many again as the
                // prefetch allows, so that one statement feeds many jobs.
                let mut wanted = permits.len() - buffer.len();
                if let Some(rate) = options.rate {
                    let now = queue.now_ms();
                    started_in_window.retain(|&at| at > now - rate.window_ms as i64);
                    let room = (rate.jobs as usize).saturating_sub(started_in_window.len());
                    if room == 0 && buffer.is_empty() {
                        let wait = started_in_window[0] + rate.window_ms as i64 - now;
                        drop(permits);
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(wait.max(1) as u64)) => {}
                            _ = stopped.changed() => break,
                        }
                        continue;
                    }
                    wanted = wanted.min(room);
                } else {
                    wanted += options.prefetch;
                }
                let wanted = wanted.min(limits::CLAIM_JOBS_MAX);
                if wanted > 0 {
                    match queue
                        .claim(&queue_name, wanted, &options.name, options.lease_ms)
                        .await
                    {
                        Ok(jobs) => buffer.extend(jobs),
                        Err(error) => {
                            drop(permits);
                            store_error!(error);
                        }
                    }
                    store_errors = 0;
                }
            }
            if buffer.is_empty() {
                drop(permits);
                // Sleep until a wake-up, the next delayed job's due time, or the poll.
                let now = queue.now_ms();
                let mut sleep_ms = options.poll_ms;
                match queue.next_due_ms(&queue_name).await {
                    Ok(Some(due)) => sleep_ms = sleep_ms.min(due.saturating_sub(now).max(0) as u64),
                    Ok(None) => {}
                    Err(error) => store_error!(error),
                }
                if sleep_ms == 0 {
                    // Due but not claimed: paused, or taken by another worker. Do not spin.
                    sleep_ms = options.poll_ms.min(50);
                }
                tokio::select! {
                    _ = wakeups.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(sleep_ms)) => {}
                    _ = stopped.changed() => break,
                }
                continue;
            }
            let now = queue.now_ms();
            if renewal_due_ms(&buffer, options.lease_ms).is_some_and(|due| due <= now)
                && let Err(error) = renew_buffer(&queue, &mut buffer, options.lease_ms).await
            {
                drop(permits);
                store_error!(error);
            }
            for permit in permits {
                let Some(job) = buffer.pop_front() else { break };
                if options.rate.is_some() {
                    started_in_window.push(now);
                }
                let handler = handlers.get(&job.kind).cloned();
                let queue = queue.clone();
                let outcomes = outcomes.clone();
                let released = release.subscribe();
                let lease_ms = options.lease_ms;
                let active = active.clone();
                active.increment(1.0);
                tokio::spawn(async move {
                    let outcome = run_job(queue, job, handler, lease_ms, released).await;
                    let _ = outcomes.send(outcome).await;
                    active.decrement(1.0);
                    drop(permit);
                });
            }
        }

        // Claimed jobs that never started go back at once, their attempt not counted.
        for job in buffer.drain(..) {
            let _ = outcomes.send(Outcome::Release(job.id, job.lease)).await;
        }
        // Shutdown: no more claims. Running jobs get the grace period, then are released.
        let everyone = options.concurrency as u32;
        let grace = Duration::from_millis(options.shutdown_grace_ms);
        let all_done = tokio::time::timeout(grace, slots.acquire_many(everyone)).await;
        if all_done.is_err() {
            let _ = release.send(true);
            let _ = slots.acquire_many(everyone).await;
        }
        drop(outcomes);
        let written = completer.await.unwrap_or(Ok(()));
        if let Some(forwarder) = forwarder {
            forwarder.abort();
        }
        match failure {
            Some(error) => Err(error),
            None => written,
        }
    }
}

/// When the buffered jobs' leases are due for renewal, on the queue's clock; `None` with
/// nothing buffered. They are renewed together once the oldest, first in line, has half its
/// lease left.
fn renewal_due_ms(buffer: &VecDeque<Job>, lease_ms: u64) -> Option<i64> {
    let oldest = buffer.front()?;
    Some(oldest.lease_until_ms - (lease_ms / 2) as i64)
}

/// Renews the leases of the buffered jobs in one statement; a job whose lease was lost
/// belongs to someone else and leaves the buffer.
async fn renew_buffer(
    queue: &Queue,
    buffer: &mut VecDeque<Job>,
    lease_ms: u64,
) -> Result<(), QueueError> {
    let now = queue.now_ms();
    let held: Vec<(i64, i64)> = buffer.iter().map(|job| (job.id, job.lease)).collect();
    let still = queue.heartbeat_many(&held, lease_ms).await?;
    let until = now + lease_ms as i64;
    let mut still = still.into_iter();
    buffer.retain_mut(|job| {
        job.lease_until_ms = until;
        still.next().unwrap_or(false)
    });
    Ok(())
}

/// PostgreSQL: forwards notifications of new jobs from other processes to this process's
/// wake-ups. Reconnects after a lost connection; the poll covers the gap.
async fn spawn_listener(queue: &Queue) -> Option<JoinHandle<()>> {
    let store = queue.store().clone();
    let mut listener = store.job_listener().await.ok().flatten()?;
    Some(tokio::spawn(async move {
        loop {
            match listener.recv().await {
                Ok(name) => store.wake_workers(&name),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    match store.job_listener().await {
                        Ok(Some(again)) => listener = again,
                        _ => return,
                    }
                }
            }
        }
    }))
}

async fn run_job(
    queue: Queue,
    job: Job,
    handler: Option<Handler>,
    lease_ms: u64,
    mut released: watch::Receiver<bool>,
) -> Outcome {
    let Some(handler) = handler else {
        let error = JobError::new(
            ErrorCategory::Validation,
            format!("no handler for job type {:?}", job.kind),
        );
        return Outcome::Failed(job, error);
    };
    let (id, lease) = (job.id, job.lease);
    let timeout = Duration::from_millis(job.timeout_ms);
    let context = JobContext {
        job: job.clone(),
        queue: queue.clone(),
    };
    let work = tokio::time::timeout(timeout, handler(context));
    tokio::pin!(work);
    let beat = Duration::from_millis((lease_ms / 3).max(1));
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + beat, beat);
    loop {
        tokio::select! {
            finished = &mut work => {
                return match finished {
                    // A result the store would refuse fails this job alone, rather than the
                    // batch of completions it would be written with.
                    Ok(Ok(Some(result))) => {
                        match crate::encode_json("result", &result, limits::RESULT_BYTES_MAX) {
                            Ok(_) => Outcome::Done(id, lease, Some(result)),
                            Err(refused) => Outcome::Failed(
                                job,
                                JobError::new(ErrorCategory::Validation, refused.to_string()),
                            ),
                        }
                    }
                    Ok(Ok(None)) => Outcome::Done(id, lease, None),
                    Ok(Err(error)) => Outcome::Failed(job, error),
                    Err(_) => Outcome::Failed(job, JobError::new(
                        ErrorCategory::Timeout,
                        format!("the attempt ran longer than its timeout of {} ms", timeout.as_millis()),
                    )),
                };
            }
            _ = heartbeat.tick() => {
                // A lost lease means another worker may hold the job: stop working on it.
                if let Err(QueueError::LeaseLost(_)) = queue.heartbeat(id, lease, lease_ms).await {
                    return Outcome::Release(id, lease);
                }
            }
            _ = released.changed() => return Outcome::Release(id, lease),
        }
    }
}

/// Writes outcomes: every completion waiting at that moment in one transaction; failures and
/// releases one by one. A lost lease is not an error here: the job belongs to someone else.
async fn complete_loop(
    queue: Queue,
    mut outcomes: mpsc::Receiver<Outcome>,
) -> Result<(), QueueError> {
    let mut first_error = None;
    while let Some(first) = outcomes.recv().await {
        let mut batch = vec![first];
        while batch.len() < worker_limits::COMPLETIONS_PER_COMMIT_MAX {
            match outcomes.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let mut completions = Vec::new();
        for outcome in batch {
            let written = match outcome {
                Outcome::Done(id, lease, result) => {
                    completions.push((id, lease, result));
                    Ok(())
                }
                Outcome::Failed(job, error) => queue.fail(&job, error).await.map(drop),
                Outcome::Release(id, lease) => queue.release(id, lease).await,
            };
            if let Err(error) = written
                && !matches!(error, QueueError::LeaseLost(_))
            {
                first_error.get_or_insert(error);
            }
        }
        if !completions.is_empty()
            && let Err(error) = queue.complete_many(&completions).await
        {
            first_error.get_or_insert(error);
        }
    }
    first_error.map_or(Ok(()), Err)
}
