//! Kill -9 during processing. A child process (this test binary, re-run in child mode) runs
//! two workers and a plain-API consumer on a queue of jobs whose handler sometimes sleeps and
//! sometimes fails with a retryable error; the plain consumer prints every completion the store
//! acknowledged. The parent kills the child with SIGKILL at a random moment, round after round,
//! then runs a worker itself until every job has ended (jobs the killed children held come back
//! through stalled recovery), and checks:
//! - every job ended `completed` or `dead`, none is missing and there is no other job;
//! - every acknowledged completion is `completed`, with its own result, and was acknowledged
//!   once;
//! - every completed job's result names the job, so a result cannot belong to another;
//! - attempts stay within 1..=attempts_max, a dead job used all of them, and the failure
//!   history holds one entry per failed attempt.
//!
//! Rounds per backend come from `AGORA_QUEUE_CRASH_ROUNDS` (default 10; a soak runs hundreds).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use queue::worker::{JobContext, Worker, WorkerOptions};
use queue::{Backoff, ErrorCategory, Job, JobError, JobOptions, JobSpec, Queue};
use serde_json::json;
use store::{Store, StoreOptions};

use crate::targets;

const CHILD_URL: &str = "AGORA_QUEUE_CRASH_CHILD_URL";
const CHILD_SCHEMA: &str = "AGORA_QUEUE_CRASH_CHILD_SCHEMA";
const CHILD_ROUND: &str = "AGORA_QUEUE_CRASH_CHILD_ROUND";
const ROUNDS_DEFAULT: u64 = 10;
const QUEUE: &str = "crash";
const JOBS: i64 = 400;
/// Attempts of a job run from 1 to this, so that some die and some survive several kills.
const ATTEMPTS_MAX: u32 = 5;
const TIMEOUT_MS: u64 = 2_000;
const LEASE_MS: u64 = 500;
const STALLED_CHECK_MS: u64 = 200;
/// Jobs the plain-API consumer claims at once.
const PLAIN_BATCH: usize = 2;
/// How long the final worker may take to end every job.
const FINISH_DEADLINE: Duration = Duration::from_secs(40);

/// What attempt `attempt` of job `n` does: a deterministic mix, so that every process agrees.
/// `Err` fails it (retryably); `Ok` sleeps that long, then completes it.
fn outcome(n: i64, attempt: u32) -> Result<u64, JobError> {
    let mut mixed = (n as u64)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(u64::from(attempt).wrapping_mul(0xBF58_476D_1CE4_E5B9));
    mixed ^= mixed >> 31;
    let roll = mixed % 100;
    if roll < 15 {
        return Err(JobError::new(
            ErrorCategory::Network,
            format!("job {n}: attempt {attempt} could not reach the service"),
        ));
    }
    // Most attempts take a little while, so that a kill finds jobs in flight.
    Ok(if roll < 75 { 20 + 2 * roll } else { 0 })
}

fn payload_n(job: &Job) -> i64 {
    job.payload["n"].as_i64().expect("every payload has n")
}

/// The result of job `n`: it names the job.
fn result_of(n: i64) -> serde_json::Value {
    json!({ "id": n })
}

fn worker_options(name: String) -> WorkerOptions {
    WorkerOptions {
        name,
        concurrency: 2,
        lease_ms: LEASE_MS,
        poll_ms: 50,
        stalled_check_ms: STALLED_CHECK_MS,
        shutdown_grace_ms: 1_000,
        ..WorkerOptions::default()
    }
}

fn worker(queue: Queue, name: String) -> Worker {
    Worker::new(queue, QUEUE, worker_options(name)).handle("work", |ctx: JobContext| async move {
        let n = payload_n(&ctx.job);
        let sleep_ms = outcome(n, ctx.job.attempt)?;
        tokio::time::sleep(Duration::from_millis(sleep_ms)).await;
        Ok(Some(result_of(n)))
    })
}

/// One line to the parent, in one write: a kill cannot leave half of it.
fn say(line: &str) {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(format!("{line}\n").as_bytes()).unwrap();
    stdout.flush().unwrap();
}

/// The child: run workers and a plain-API consumer until killed.
#[test]
fn queue_crash_child() {
    let Ok(url) = std::env::var(CHILD_URL) else {
        return; // Only runs when the parent starts this binary in child mode.
    };
    let round: u64 = std::env::var(CHILD_ROUND).unwrap().parse().unwrap();
    let options = StoreOptions {
        pg_schema: std::env::var(CHILD_SCHEMA).ok(),
        ..StoreOptions::default()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async move {
        let store = Arc::new(Store::open(&url, &options).await.unwrap());
        let queue = Queue::new(store);
        let mut workers = Vec::new();
        for name in ["a", "b"] {
            let started = worker(queue.clone(), format!("{name}-{round}"))
                .start()
                .await
                .unwrap();
            workers.push(started);
        }
        // Tells the parent that start-up is done, so the time before the kill is all work
        // however slowly the process started.
        say("ready");
        let name = format!("plain-{round}");
        loop {
            let jobs = queue
                .claim(QUEUE, PLAIN_BATCH, &name, LEASE_MS)
                .await
                .unwrap();
            if jobs.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            let mut completions = Vec::new();
            let mut longest_ms = 0;
            for job in &jobs {
                let n = payload_n(job);
                match outcome(n, job.attempt) {
                    Ok(sleep_ms) => {
                        longest_ms = longest_ms.max(sleep_ms);
                        completions.push((job.id, job.lease, Some(result_of(n))));
                    }
                    Err(error) => {
                        let _ = queue.fail(job, error).await.unwrap_or(false);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(longest_ms)).await;
            if completions.is_empty() {
                continue;
            }
            let done = queue.complete_many(&completions).await.unwrap();
            for ((id, ..), answer) in completions.iter().zip(done) {
                if answer.is_ok() {
                    say(&format!("ack {id}"));
                }
            }
        }
    });
}

/// A small deterministic generator for kill times.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// A killed client's PostgreSQL sessions live on until the server notices the closed socket,
/// and a statement the child sent just before the kill may still commit (a claim, or a
/// completion never acknowledged, which the contract allows). Listing the jobs state by state
/// while that happens could see a job in two states, so wait until the counts have stopped
/// changing. SQLite has no such sessions: a killed process's transaction is simply gone.
async fn wait_for_orphaned_writes(queue: &Queue) {
    if queue.store().backend_name() != "postgres" {
        return;
    }
    // Jobs by state, `delayed` counted as `waiting`: a delayed job falling due is not a write.
    let look = || async {
        let mut jobs: BTreeMap<String, u64> = BTreeMap::new();
        for count in queue.counts(QUEUE).await.unwrap() {
            let state = if count.state == "delayed" {
                "waiting".to_string()
            } else {
                count.state
            };
            *jobs.entry(state).or_default() += count.jobs;
        }
        jobs
    };
    let quiet = Duration::from_millis(200);
    let mut last = look().await;
    for _ in 0..50 {
        tokio::time::sleep(quiet).await;
        let now = look().await;
        if now == last {
            return;
        }
        last = now;
    }
    panic!("the killed child's writes never stopped");
}

/// Every job of the queue by id, in any state.
async fn all_jobs(queue: &Queue) -> BTreeMap<i64, queue::JobRow> {
    let mut rows = BTreeMap::new();
    for state in ["waiting", "active", "completed", "dead", "discarded"] {
        let mut after = 0;
        loop {
            let page = queue.jobs(QUEUE, state, after, 1_000).await.unwrap();
            let Some(last) = page.last() else { break };
            after = last.id;
            for row in page {
                let id = row.id;
                assert!(rows.insert(id, row).is_none(), "job {id} listed twice");
            }
        }
    }
    rows
}

/// What must hold at any moment, killed child or not: the added jobs and no others, attempts
/// within bounds, every acknowledged completion completed with its own result, every result
/// naming its job.
fn check_jobs(
    rows: &BTreeMap<i64, queue::JobRow>,
    numbers: &BTreeMap<i64, i64>,
    acked: &HashMap<i64, u64>,
    when: &str,
) {
    let stored: BTreeSet<i64> = rows.keys().copied().collect();
    let added: BTreeSet<i64> = numbers.keys().copied().collect();
    assert_eq!(stored, added, "{when}: the stored jobs are the added jobs");
    for (id, row) in rows {
        let n = numbers[id];
        assert!(
            row.attempts <= row.attempts_max,
            "{when}: job {id} ran {} attempts of {}",
            row.attempts,
            row.attempts_max
        );
        if row.state == "completed" {
            assert!(row.attempts >= 1, "{when}: job {id} completed unclaimed");
            assert_eq!(
                row.result.as_deref(),
                Some(result_of(n).to_string().as_str()),
                "{when}: the result of job {id} (payload n = {n})"
            );
        }
    }
    for (id, round) in acked {
        let row = &rows[id];
        assert_eq!(
            row.state, "completed",
            "{when}: job {id}, acknowledged as completed in round {round}, is {row:?}"
        );
    }
}

#[tokio::test]
async fn kill_minus_9_during_processing_loses_and_repeats_no_job() {
    let rounds: u64 = std::env::var("AGORA_QUEUE_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ROUNDS_DEFAULT);
    let mut random = 0x2545_F491_4F6C_DD1Du64;
    for target in targets("crash") {
        let began = std::time::Instant::now();
        let store = target.open().await;
        let backend = store.backend_name();
        let queue = Queue::new(store.clone());
        queue.declare(QUEUE).await.unwrap();
        let specs: Vec<JobSpec> = (0..JOBS)
            .map(|n| {
                JobSpec::new(QUEUE, "work", json!({ "n": n })).with(JobOptions {
                    attempts: 1 + (n as u32) % ATTEMPTS_MAX,
                    timeout_ms: TIMEOUT_MS,
                    backoff: Backoff::Fixed { delay_ms: 50 },
                    jitter_pct: 50,
                    ..JobOptions::default()
                })
            })
            .collect();
        // Job id → its payload's n.
        let numbers: BTreeMap<i64, i64> = queue
            .add_bulk(&specs)
            .await
            .unwrap()
            .into_iter()
            .zip(0..)
            .map(|(added, n)| (added.id(), n))
            .collect();
        assert_eq!(numbers.len() as i64, JOBS);

        // Acknowledged completions: job id → the round that acknowledged it.
        let mut acked: HashMap<i64, u64> = HashMap::new();
        let mut ended_by_children = 0;
        for round in 0..rounds {
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "crash::queue_crash_child",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_URL, &target.url)
                .env(CHILD_ROUND, round.to_string())
                .envs(
                    target
                        .options
                        .pg_schema
                        .as_ref()
                        .map(|s| (CHILD_SCHEMA, s.clone())),
                )
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("the child starts");
            let stdout = child.stdout.take().unwrap();
            let mut stderr = child.stderr.take().unwrap();
            let (ready_tx, ready) = std::sync::mpsc::channel();
            let reader = std::thread::spawn(move || {
                let mut lines = Vec::new();
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    // The test harness may print its own text before ours on the same line.
                    if line.ends_with("ready") {
                        let _ = ready_tx.send(());
                    }
                    lines.push(line);
                }
                lines
            });
            let errors = std::thread::spawn(move || {
                let mut text = String::new();
                let _ = stderr.read_to_string(&mut text);
                text
            });
            let started = ready.recv_timeout(Duration::from_secs(60));
            if started.is_ok() {
                // Let it work for a random while, then kill it without warning.
                let work_ms = 100 + next_random(&mut random) % 600;
                tokio::time::sleep(Duration::from_millis(work_ms)).await;
            }
            let exited = child.try_wait().unwrap();
            child.kill().expect("SIGKILL");
            child.wait().unwrap();
            let lines = reader.join().unwrap();
            let errors = errors.join().unwrap();
            assert!(
                started.is_ok() && exited.is_none(),
                "{backend}, round {round}: the child stopped on its own ({exited:?}) or never \
                 started: {errors}"
            );
            for line in &lines {
                let Some((_, id)) = line.split_once("ack ") else {
                    continue;
                };
                let id: i64 = id
                    .parse()
                    .unwrap_or_else(|_| panic!("a bad line: {line:?}"));
                if let Some(earlier) = acked.insert(id, round) {
                    panic!(
                        "{backend}: job {id} was acknowledged as completed in rounds {earlier} \
                         and {round}"
                    );
                }
            }
            let when = format!("{backend}, after kill {round}");
            wait_for_orphaned_writes(&queue).await;
            let rows = all_jobs(&queue).await;
            check_jobs(&rows, &numbers, &acked, &when);
            ended_by_children = rows
                .values()
                .filter(|row| matches!(row.state.as_str(), "completed" | "dead"))
                .count();
        }

        // Finish: a worker here runs until every job has ended; it recovers the jobs the
        // killed children held once their leases run out.
        let finisher = worker(queue.clone(), "finisher".into())
            .start()
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        loop {
            let unfinished: u64 = queue
                .counts(QUEUE)
                .await
                .unwrap()
                .iter()
                .filter(|count| matches!(count.state.as_str(), "waiting" | "delayed" | "active"))
                .map(|count| count.jobs)
                .sum();
            if unfinished == 0 {
                break;
            }
            assert!(
                started.elapsed() < FINISH_DEADLINE,
                "{backend}: {unfinished} jobs never ended"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        finisher.shutdown().await.unwrap();

        let rows = all_jobs(&queue).await;
        check_jobs(&rows, &numbers, &acked, &format!("{backend}, at the end"));
        let (mut dead, mut stalled) = (0, 0);
        for (id, row) in &rows {
            assert!(
                matches!(row.state.as_str(), "completed" | "dead"),
                "{backend}: job {id} ended {}",
                row.state
            );
            assert!(
                (1..=row.attempts_max).contains(&row.attempts),
                "{backend}: job {id}: {row:?}"
            );
            let history = queue.failures(*id).await.unwrap();
            let attempts: Vec<u32> = history.iter().map(|failure| failure.attempt).collect();
            stalled += history
                .iter()
                .filter(|failure| failure.message.starts_with("stalled"))
                .count();
            // Every failure here is retryable, so a job dies only when out of attempts; every
            // attempt that did not complete failed once, by its handler or by a stall.
            let failed = if row.state == "dead" {
                dead += 1;
                assert_eq!(
                    row.attempts, row.attempts_max,
                    "{backend}: job {id} died early"
                );
                row.attempts
            } else {
                row.attempts - 1
            };
            assert_eq!(
                attempts,
                (1..=failed).collect::<Vec<_>>(),
                "{backend}: failure history of job {id} ({} after {} attempts)",
                row.state,
                row.attempts
            );
            assert!(
                history
                    .iter()
                    .all(|failure| matches!(failure.category.as_str(), "network" | "timeout")),
                "{backend}: job {id}: {history:?}"
            );
        }
        eprintln!(
            "{backend}: {rounds} kills, {ended_by_children} of {JOBS} jobs ended by the killed \
             children, {} acknowledged completions, {dead} dead, {stalled} stalled attempts \
             recovered, in {:.1} s",
            acked.len(),
            began.elapsed().as_secs_f64()
        );
        assert!(
            rounds == 0 || !acked.is_empty(),
            "{backend}: the children acknowledged nothing"
        );
        store.close().await;
    }
}
