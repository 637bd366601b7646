//! The stored queue against a deliberately naive model. Random sequences of adds, claims,
//! completions, failures, heartbeats, releases, reports under stale leases, clock advances,
//! stalled sweeps, re-drives and discards run on a manual clock; after every step every job
//! must be exactly where the model says: none lost, none extra, none completed twice, attempts
//! within bounds, claims in (priority, run_at, id) order and never early, retries after their
//! backoff, deaths when out of attempts or not retryable, one history entry per failed attempt.
//! Two fixed cases below pin the smallest disagreements the model has found.
//!
//! Cases per run come from `AGORA_PROPTEST_CASES` (default 64: each case opens a fresh store on
//! every backend, and PostgreSQL commits cost milliseconds).

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use proptest::sample::Index;
use queue::{
    Added, Backoff, ErrorCategory, Job, JobError, JobOptions, JobRow, JobSpec, ManualClock, Queue,
    QueueError,
};
use serde_json::json;

use crate::targets;

const T0: i64 = 1_700_000_000_000;
const QUEUE: &str = "model";
const CASES_DEFAULT: u32 = 64;
const STEPS_MAX: usize = 40;

/// One job of an add, as generated.
#[derive(Clone, Debug)]
struct NewJob {
    priority: i32,
    delay_ms: i64,
    attempts: u32,
    backoff_ms: u64,
}

/// A job picked by a report: one held under its current lease, or a handle whose lease is no
/// longer current (the job was recovered, claimed again, or it ended).
#[derive(Clone, Debug)]
struct Pick {
    stale: bool,
    index: Index,
}

#[derive(Clone, Copy, Debug)]
enum StaleReport {
    Complete,
    Fail(ErrorCategory),
    Heartbeat,
    Release,
}

#[derive(Clone, Debug)]
enum Op {
    Add(Vec<NewJob>),
    Claim {
        limit: usize,
        lease_ms: u64,
    },
    /// One `complete_many`; the same job may appear twice, and stale handles mix in.
    Complete(Vec<Pick>),
    Fail {
        index: Index,
        category: ErrorCategory,
    },
    Heartbeat {
        index: Index,
        lease_ms: u64,
    },
    Release(Index),
    Stale {
        index: Index,
        report: StaleReport,
    },
    Advance(i64),
    RecoverStalled,
    /// Re-drives jobs picked among the dead ones (`dead`) or among all.
    Redrive(Vec<(bool, Index)>),
    /// Discards a job picked among the waiting and dead ones (`discardable`) or among all.
    Discard {
        discardable: bool,
        index: Index,
    },
}

fn category() -> impl Strategy<Value = ErrorCategory> {
    prop::sample::select(ErrorCategory::ALL.to_vec())
}

fn new_job() -> impl Strategy<Value = NewJob> {
    (
        0i32..3,
        0i64..5_000,
        1u32..4,
        prop_oneof![Just(0u64), 1u64..1_500],
    )
        .prop_map(|(priority, delay_ms, attempts, backoff_ms)| NewJob {
            priority,
            // Half the jobs are due at once.
            delay_ms: if delay_ms % 2 == 0 { 0 } else { delay_ms },
            attempts,
            backoff_ms,
        })
}

fn op() -> impl Strategy<Value = Op> {
    let pick = (any::<bool>(), any::<Index>()).prop_map(|(stale, index)| Pick { stale, index });
    let stale_report = prop_oneof![
        Just(StaleReport::Complete),
        category().prop_map(StaleReport::Fail),
        Just(StaleReport::Heartbeat),
        Just(StaleReport::Release),
    ];
    prop_oneof![
        3 => prop::collection::vec(new_job(), 1..=3).prop_map(Op::Add),
        4 => (1usize..5, 100u64..5_000).prop_map(|(limit, lease_ms)| Op::Claim { limit, lease_ms }),
        2 => prop::collection::vec(pick, 1..=3).prop_map(Op::Complete),
        2 => (any::<Index>(), category()).prop_map(|(index, category)| Op::Fail { index, category }),
        1 => (any::<Index>(), 100u64..5_000).prop_map(|(index, lease_ms)| Op::Heartbeat { index, lease_ms }),
        1 => any::<Index>().prop_map(Op::Release),
        2 => (any::<Index>(), stale_report).prop_map(|(index, report)| Op::Stale { index, report }),
        3 => prop_oneof![0i64..1_000, 1_000i64..6_000].prop_map(Op::Advance),
        2 => Just(Op::RecoverStalled),
        1 => prop::collection::vec((any::<bool>(), any::<Index>()), 1..=2).prop_map(Op::Redrive),
        1 => (any::<bool>(), any::<Index>()).prop_map(|(discardable, index)| Op::Discard { discardable, index }),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Waiting,
    Active,
    Completed,
    Dead,
    Discarded,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Waiting => "waiting",
            State::Active => "active",
            State::Completed => "completed",
            State::Dead => "dead",
            State::Discarded => "discarded",
        }
    }
}

/// What the model knows of one job.
#[derive(Clone, Debug)]
struct ModelJob {
    priority: i32,
    attempts_max: u32,
    backoff_ms: u64,
    state: State,
    attempts: u32,
    run_at_ms: i64,
    /// The last lease token handed out (0 before the first claim).
    lease: i64,
    lease_until_ms: Option<i64>,
    result: Option<String>,
    error_category: Option<&'static str>,
    strategy: Option<&'static str>,
    finished_ms: Option<i64>,
    /// Every failed attempt, re-driven or not: (attempt, category).
    failures: Vec<(u32, &'static str)>,
    /// Failed attempts since the last re-drive.
    failures_this_run: u32,
}

/// The model of the whole queue, and the handles the test holds.
#[derive(Default)]
struct Model {
    jobs: BTreeMap<i64, ModelJob>,
    /// Every job handle any claim returned, oldest first.
    handles: Vec<Job>,
}

impl Model {
    /// The handles under which a report must be accepted: active jobs under their current
    /// lease, by id.
    fn held(&self) -> Vec<Job> {
        let mut held: BTreeMap<i64, Job> = BTreeMap::new();
        for handle in &self.handles {
            if self.holds(handle) {
                held.insert(handle.id, handle.clone());
            }
        }
        held.into_values().collect()
    }

    /// Handles under which every report must be refused.
    fn stale(&self) -> Vec<Job> {
        self.handles
            .iter()
            .filter(|handle| !self.holds(handle))
            .cloned()
            .collect()
    }

    fn holds(&self, handle: &Job) -> bool {
        let job = &self.jobs[&handle.id];
        job.state == State::Active && job.lease == handle.lease
    }

    /// A failed attempt of an active job, as the queue must decide it; returns whether it is
    /// retried.
    fn fail(&mut self, id: i64, category: ErrorCategory, now_ms: i64) -> bool {
        let job = self.jobs.get_mut(&id).unwrap();
        assert_eq!(job.state, State::Active);
        let retry = category.retryable() && job.attempts < job.attempts_max;
        job.failures.push((job.attempts, category.name()));
        job.failures_this_run += 1;
        job.error_category = Some(category.name());
        job.lease_until_ms = None;
        if retry {
            job.state = State::Waiting;
            job.run_at_ms = now_ms + job.backoff_ms as i64;
        } else {
            job.state = State::Dead;
            job.finished_ms = Some(now_ms);
            job.strategy = Some(category.strategy().name());
        }
        retry
    }

    fn ids_in(&self, state: State) -> Vec<i64> {
        self.jobs
            .iter()
            .filter(|(_, job)| job.state == state)
            .map(|(&id, _)| id)
            .collect()
    }

    /// The jobs a claim of `limit` must take now, in order.
    fn ready(&self, now_ms: i64, limit: usize) -> Vec<i64> {
        let mut ready: Vec<(i32, i64, i64)> = self
            .jobs
            .iter()
            .filter(|(_, job)| job.state == State::Waiting && job.run_at_ms <= now_ms)
            .map(|(&id, job)| (job.priority, job.run_at_ms, id))
            .collect();
        ready.sort_unstable();
        ready.into_iter().take(limit).map(|(.., id)| id).collect()
    }
}

fn lease_lost(result: Result<impl std::fmt::Debug, QueueError>, id: i64, what: &str) {
    match result {
        Err(QueueError::LeaseLost(lost)) => assert_eq!(lost, id, "{what}"),
        other => panic!("{what}: job {id} under a stale lease gave {other:?}, not LeaseLost"),
    }
}

/// Applies one operation to the queue and the model, checking every answer.
async fn step(queue: &Queue, clock: &ManualClock, model: &mut Model, op: &Op) -> Vec<i64> {
    let now = queue.now_ms();
    let mut touched = Vec::new();
    match op {
        Op::Add(new_jobs) => {
            let specs: Vec<JobSpec> = new_jobs
                .iter()
                .map(|new| {
                    JobSpec::new(QUEUE, "work", json!({"priority": new.priority})).with(
                        JobOptions {
                            priority: new.priority,
                            delay_ms: new.delay_ms,
                            attempts: new.attempts,
                            backoff: Backoff::Fixed {
                                delay_ms: new.backoff_ms,
                            },
                            jitter_pct: 0,
                            ..JobOptions::default()
                        },
                    )
                })
                .collect();
            let added = queue.add_bulk(&specs).await.unwrap();
            assert_eq!(added.len(), new_jobs.len());
            for (added, new) in added.into_iter().zip(new_jobs) {
                let Added::New(id) = added else {
                    panic!("no deduplication key, yet {added:?}")
                };
                assert!(
                    !model.jobs.contains_key(&id),
                    "the new job {id} has the id of an earlier one"
                );
                model.jobs.insert(
                    id,
                    ModelJob {
                        priority: new.priority,
                        attempts_max: new.attempts,
                        backoff_ms: new.backoff_ms,
                        state: State::Waiting,
                        attempts: 0,
                        run_at_ms: now + new.delay_ms,
                        lease: 0,
                        lease_until_ms: None,
                        result: None,
                        error_category: None,
                        strategy: None,
                        finished_ms: None,
                        failures: Vec::new(),
                        failures_this_run: 0,
                    },
                );
            }
        }
        Op::Claim { limit, lease_ms } => {
            let expected = model.ready(now, *limit);
            let claimed = queue.claim(QUEUE, *limit, "w", *lease_ms).await.unwrap();
            for job in &claimed {
                let known = model
                    .jobs
                    .get(&job.id)
                    .unwrap_or_else(|| panic!("claimed job {} was never added", job.id));
                assert_eq!(
                    known.state,
                    State::Waiting,
                    "claimed job {} was not waiting",
                    job.id
                );
                assert!(
                    known.run_at_ms <= now,
                    "claimed job {} is due at {}, {} ms from now",
                    job.id,
                    known.run_at_ms,
                    known.run_at_ms - now
                );
            }
            let ids: Vec<i64> = claimed.iter().map(|job| job.id).collect();
            // First which jobs, then their order, so that a failure says which rule broke.
            let (mut taken, mut next) = (ids.clone(), expected.clone());
            taken.sort_unstable();
            next.sort_unstable();
            assert_eq!(
                taken, next,
                "a claim of {limit} takes the first ready jobs by (priority, run_at, id)"
            );
            assert_eq!(
                ids, expected,
                "a claim of {limit} returns its jobs in (priority, run_at, id) order"
            );
            for job in claimed {
                let known = model.jobs.get_mut(&job.id).unwrap();
                assert!(
                    job.lease > known.lease,
                    "job {}: a claim gives a new lease token ({} after {})",
                    job.id,
                    job.lease,
                    known.lease
                );
                known.state = State::Active;
                known.attempts += 1;
                known.lease = job.lease;
                known.lease_until_ms = Some(now + *lease_ms as i64);
                assert_eq!(
                    (
                        job.attempt,
                        job.attempts_max,
                        job.priority,
                        job.lease_until_ms
                    ),
                    (
                        known.attempts,
                        known.attempts_max,
                        known.priority,
                        now + *lease_ms as i64
                    ),
                    "job {}: the claimed job's attempt, attempts, priority and lease end",
                    job.id
                );
                touched.push(job.id);
                model.handles.push(job);
            }
        }
        Op::Complete(picks) => {
            let (held, stale) = (model.held(), model.stale());
            let mut completions = Vec::new();
            for pick in picks {
                let pool = if pick.stale { &stale } else { &held };
                if pool.is_empty() {
                    continue;
                }
                let handle = pick.index.get(pool);
                // The result names the job and the lease, so it cannot pass for another's.
                let result = json!({"id": handle.id, "lease": handle.lease});
                completions.push((handle.id, handle.lease, Some(result)));
            }
            if completions.is_empty() {
                return touched;
            }
            let done = queue.complete_many(&completions).await.unwrap();
            assert_eq!(done.len(), completions.len());
            // Entries apply in order: a job listed twice completes once.
            for ((id, lease, result), answer) in completions.iter().zip(done) {
                let job = model.jobs.get_mut(id).unwrap();
                let holds = job.state == State::Active && job.lease == *lease;
                if holds {
                    assert_eq!(answer, Ok(()), "job {id} completes under its lease {lease}");
                    job.state = State::Completed;
                    job.result = result.as_ref().map(|r| r.to_string());
                    job.finished_ms = Some(now);
                    job.lease_until_ms = None;
                } else {
                    assert_eq!(
                        answer,
                        Err(*id),
                        "job {id} ({:?}, lease {}) must refuse a completion under lease {lease}",
                        job.state,
                        job.lease
                    );
                }
                touched.push(*id);
            }
        }
        Op::Fail { index, category } => {
            let held = model.held();
            if held.is_empty() {
                return touched;
            }
            let handle = index.get(&held).clone();
            let message = format!("{} on attempt {}", category.name(), handle.attempt);
            let retried = queue
                .fail(&handle, JobError::new(*category, message))
                .await
                .unwrap();
            let expected = model.fail(handle.id, *category, now);
            assert_eq!(
                retried,
                expected,
                "job {}: attempt {} of {} failed with {}: retried?",
                handle.id,
                handle.attempt,
                handle.attempts_max,
                category.name()
            );
            touched.push(handle.id);
        }
        Op::Heartbeat { index, lease_ms } => {
            let held = model.held();
            if held.is_empty() {
                return touched;
            }
            let handle = index.get(&held);
            queue
                .heartbeat(handle.id, handle.lease, *lease_ms)
                .await
                .unwrap();
            model.jobs.get_mut(&handle.id).unwrap().lease_until_ms = Some(now + *lease_ms as i64);
            touched.push(handle.id);
        }
        Op::Release(index) => {
            let held = model.held();
            if held.is_empty() {
                return touched;
            }
            let handle = index.get(&held);
            queue.release(handle.id, handle.lease).await.unwrap();
            let job = model.jobs.get_mut(&handle.id).unwrap();
            job.state = State::Waiting;
            job.attempts -= 1;
            job.run_at_ms = now;
            job.lease_until_ms = None;
            touched.push(handle.id);
        }
        Op::Stale { index, report } => {
            let stale = model.stale();
            if stale.is_empty() {
                return touched;
            }
            let handle = index.get(&stale);
            let (id, lease) = (handle.id, handle.lease);
            let what = format!("{report:?} under stale lease {lease}");
            match report {
                StaleReport::Complete => lease_lost(
                    queue.complete(id, lease, Some(&json!("late"))).await,
                    id,
                    &what,
                ),
                StaleReport::Fail(category) => lease_lost(
                    queue.fail(handle, JobError::new(*category, "late")).await,
                    id,
                    &what,
                ),
                StaleReport::Heartbeat => {
                    lease_lost(queue.heartbeat(id, lease, 1_000).await, id, &what)
                }
                StaleReport::Release => lease_lost(queue.release(id, lease).await, id, &what),
            }
            touched.push(id);
        }
        Op::Advance(ms) => clock.advance(*ms),
        Op::RecoverStalled => {
            let expired: Vec<i64> = model
                .jobs
                .iter()
                .filter(|(_, job)| {
                    job.state == State::Active && job.lease_until_ms.is_some_and(|end| end < now)
                })
                .map(|(&id, _)| id)
                .collect();
            let recovered = queue.recover_stalled().await.unwrap();
            assert_eq!(
                recovered,
                expired.len(),
                "stalled sweep at {now}: jobs whose lease ended are {expired:?}"
            );
            for id in expired {
                model.fail(id, ErrorCategory::Timeout, now);
                touched.push(id);
            }
        }
        Op::Redrive(picks) => {
            let (all, dead): (Vec<i64>, Vec<i64>) = (
                model.jobs.keys().copied().collect(),
                model.ids_in(State::Dead),
            );
            let ids: Vec<i64> = picks
                .iter()
                .filter_map(|(dead_only, index)| {
                    let pool = if *dead_only { &dead } else { &all };
                    (!pool.is_empty()).then(|| *index.get(pool))
                })
                .collect();
            if ids.is_empty() {
                return touched;
            }
            let redriven = queue.redrive(&ids).await.unwrap();
            // In order: a job listed twice is dead only the first time.
            let mut expected = Vec::new();
            for id in &ids {
                let job = model.jobs.get_mut(id).unwrap();
                if job.state == State::Dead {
                    job.state = State::Waiting;
                    job.attempts = 0;
                    job.run_at_ms = now;
                    job.strategy = None;
                    job.finished_ms = None;
                    job.failures_this_run = 0;
                    expected.push(*id);
                }
                touched.push(*id);
            }
            assert_eq!(redriven, expected, "re-driving {ids:?}: the dead ones");
        }
        Op::Discard { discardable, index } => {
            let pool: Vec<i64> = if *discardable {
                let mut pool = model.ids_in(State::Waiting);
                pool.extend(model.ids_in(State::Dead));
                pool
            } else {
                model.jobs.keys().copied().collect()
            };
            if pool.is_empty() {
                return touched;
            }
            let id = *index.get(&pool);
            let answer = queue.discard(id).await;
            let job = model.jobs.get_mut(&id).unwrap();
            if matches!(job.state, State::Waiting | State::Dead) {
                answer
                    .unwrap_or_else(|error| panic!("discarding {:?} job {id}: {error}", job.state));
                job.state = State::Discarded;
                job.finished_ms = Some(now);
            } else {
                match answer {
                    Err(QueueError::Invalid { field: "id", .. }) => {}
                    other => panic!("discarding {:?} job {id} gave {other:?}", job.state),
                }
            }
            touched.push(id);
        }
    }
    touched
}

/// Every job in the store is where the model says, and nothing else is there.
async fn check(queue: &Queue, model: &Model, touched: &[i64], context: &str) {
    let mut rows: BTreeMap<i64, JobRow> = BTreeMap::new();
    for state in ["waiting", "active", "completed", "dead", "discarded"] {
        for row in queue.jobs(QUEUE, state, 0, 1_000).await.unwrap() {
            assert_eq!(row.state, state, "{context}: listed as {state}");
            let id = row.id;
            assert!(
                rows.insert(id, row).is_none(),
                "{context}: job {id} listed twice"
            );
        }
    }
    let stored: BTreeSet<i64> = rows.keys().copied().collect();
    let known: BTreeSet<i64> = model.jobs.keys().copied().collect();
    assert_eq!(
        stored, known,
        "{context}: the stored jobs are the added jobs"
    );
    for (id, job) in &model.jobs {
        let row = &rows[id];
        let what = format!("{context}: job {id} ({job:?}) stored as {row:?}");
        assert_eq!(row.state, job.state.name(), "{what}");
        assert_eq!(row.attempts, job.attempts, "attempts of {what}");
        assert_eq!(row.attempts_max, job.attempts_max, "{what}");
        assert_eq!(row.priority, job.priority, "{what}");
        assert_eq!(row.lease, job.lease, "lease token of {what}");
        assert_eq!(row.error_category.as_deref(), job.error_category, "{what}");
        match job.state {
            State::Waiting => {
                assert!(row.attempts < row.attempts_max, "{what}");
                assert_eq!(row.run_at_ms, job.run_at_ms, "due time of {what}");
                assert_eq!(row.lease_until_ms, None, "{what}");
            }
            State::Active => {
                assert!((1..=row.attempts_max).contains(&row.attempts), "{what}");
                assert_eq!(
                    row.lease_until_ms, job.lease_until_ms,
                    "lease end of {what}"
                );
            }
            State::Completed => {
                assert!((1..=row.attempts_max).contains(&row.attempts), "{what}");
                assert_eq!(row.result, job.result, "result of {what}");
                assert_eq!(row.finished_ms, job.finished_ms, "{what}");
            }
            State::Dead => {
                assert!((1..=row.attempts_max).contains(&row.attempts), "{what}");
                assert_eq!(row.finished_ms, job.finished_ms, "{what}");
                assert_eq!(row.strategy.as_deref(), job.strategy, "{what}");
            }
            State::Discarded => {
                assert!(row.attempts <= row.attempts_max, "{what}");
                assert_eq!(row.finished_ms, job.finished_ms, "{what}");
            }
        }
    }
    for id in touched {
        check_failures(queue, model, *id, context).await;
    }

    let now = queue.now_ms();
    let mut expected: BTreeMap<(String, i32), u64> = BTreeMap::new();
    for job in model.jobs.values() {
        let state = if job.state == State::Waiting && job.run_at_ms > now {
            "delayed"
        } else {
            job.state.name()
        };
        *expected
            .entry((state.to_string(), job.priority))
            .or_default() += 1;
    }
    let counted: BTreeMap<(String, i32), u64> = queue
        .counts(QUEUE)
        .await
        .unwrap()
        .into_iter()
        .map(|count| ((count.state, count.priority), count.jobs))
        .collect();
    assert_eq!(counted, expected, "{context}: counts by state and priority");
}

/// A job's failure history is the model's: one entry per failed attempt, in order.
async fn check_failures(queue: &Queue, model: &Model, id: i64, context: &str) {
    let job = &model.jobs[&id];
    let history: Vec<(u32, String)> = queue
        .failures(id)
        .await
        .unwrap()
        .into_iter()
        .map(|failure| (failure.attempt, failure.category))
        .collect();
    let expected: Vec<(u32, String)> = job
        .failures
        .iter()
        .map(|(attempt, category)| (*attempt, category.to_string()))
        .collect();
    assert_eq!(history, expected, "{context}: failure history of job {id}");
    assert!(
        job.failures_this_run <= job.attempts,
        "{context}: job {id} failed more often than it ran"
    );
}

async fn run_case(ops: &[Op]) {
    for target in targets("model") {
        let clock = std::sync::Arc::new(ManualClock::new(T0));
        let store = target.open().await;
        let backend = store.backend_name();
        let queue = Queue::with_clock(store.clone(), clock.clone());
        queue.declare(QUEUE).await.unwrap();
        let mut model = Model::default();
        for (number, op) in ops.iter().enumerate() {
            let touched = step(&queue, &clock, &mut model, op).await;
            let context = format!("{backend}, step {number} {op:?}");
            check(&queue, &model, &touched, &context).await;
        }
        for &id in model.jobs.keys() {
            check_failures(&queue, &model, id, &format!("{backend}, at the end")).await;
        }
        store.close().await;
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("AGORA_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(CASES_DEFAULT),
        // Every shrink step opens fresh stores: bound the search so that a failure reports
        // within minutes.
        max_shrink_iters: 1_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_queue_behaves_like_its_model(ops in prop::collection::vec(op(), 1..=STEPS_MAX)) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run_case(&ops));
    }
}

async fn model_queue(target: &crate::Target) -> (Queue, std::sync::Arc<ManualClock>) {
    let clock = std::sync::Arc::new(ManualClock::new(T0));
    let queue = Queue::with_clock(target.open().await, clock.clone());
    queue.declare(QUEUE).await.unwrap();
    (queue, clock)
}

fn delayed(delay_ms: i64, attempts: u32) -> JobSpec {
    JobSpec::new(QUEUE, "work", json!({})).with(JobOptions {
        delay_ms,
        attempts,
        ..JobOptions::default()
    })
}

/// The model's first finding, made small: of two ready jobs of one priority, the one due
/// first comes first, whatever their ids.
#[tokio::test]
async fn a_claim_returns_its_jobs_by_due_time_within_a_priority() {
    for target in targets("model_order") {
        let (queue, clock) = model_queue(&target).await;
        let later = queue.add(delayed(100, 1)).await.unwrap().id();
        let sooner = queue.add(delayed(0, 1)).await.unwrap().id();
        clock.advance(100);
        let claimed: Vec<i64> = queue
            .claim(QUEUE, 2, "w", 1_000)
            .await
            .unwrap()
            .iter()
            .map(|job| job.id)
            .collect();
        assert_eq!(claimed, [sooner, later], "(priority, run_at, id) order");
    }
}

/// The model's second finding, made small: a re-driven job's new failures join its history.
#[tokio::test]
async fn a_redriven_job_keeps_the_history_of_its_new_failures() {
    for target in targets("model_redrive") {
        let (queue, _) = model_queue(&target).await;
        let id = queue.add(delayed(0, 1)).await.unwrap().id();
        for run in ["first", "second"] {
            let job = queue.claim(QUEUE, 1, "w", 1_000).await.unwrap().remove(0);
            let error = JobError::new(ErrorCategory::Network, format!("{run} run"));
            assert!(!queue.fail(&job, error).await.unwrap());
            assert_eq!(queue.job(id).await.unwrap().state, "dead");
            if run == "first" {
                assert_eq!(queue.redrive(&[id]).await.unwrap(), [id]);
            }
        }
        let messages: Vec<String> = queue
            .failures(id)
            .await
            .unwrap()
            .into_iter()
            .map(|failure| failure.message)
            .collect();
        assert_eq!(messages, ["first run", "second run"]);
    }
}
