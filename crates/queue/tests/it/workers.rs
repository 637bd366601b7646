//! In-process workers against a real store and the real clock. Every wait has a generous
//! deadline and asserts what happened, never how fast.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use queue::worker::{JobContext, RateLimit, Worker, WorkerOptions};
use queue::{Backoff, ErrorCategory, JobError, JobOptions, JobSpec, Queue};
use serde_json::json;

use crate::targets;

const DEADLINE: Duration = Duration::from_secs(20);

/// Options for a worker that, left alone, would not look again for a minute: anything it does
/// sooner was caused by a wake-up.
fn patient(concurrency: usize) -> WorkerOptions {
    WorkerOptions {
        concurrency,
        poll_ms: 60_000,
        stalled_check_ms: 60_000,
        lease_ms: 5_000,
        shutdown_grace_ms: 5_000,
        ..WorkerOptions::default()
    }
}

async fn wait_for_state(queue: &Queue, id: i64, state: &str) -> queue::JobRow {
    let started = tokio::time::Instant::now();
    loop {
        let job = queue.job(id).await.unwrap();
        if job.state == state {
            return job;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "job {id} stayed {} instead of {state}",
            job.state
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn spec(kind: &str, change: impl FnOnce(&mut JobOptions)) -> JobSpec {
    let mut options = JobOptions::default();
    change(&mut options);
    JobSpec::new("work", kind, json!({"n": 1})).with(options)
}

#[tokio::test]
async fn idle_workers_wake_on_an_add_not_at_the_next_poll() {
    for target in targets("wake") {
        let queue = Queue::new(target.open().await);
        queue.declare("work").await.unwrap();
        let worker = Worker::new(queue.clone(), "work", patient(2))
            .handle("echo", |ctx: JobContext| async move {
                Ok(Some(ctx.job.payload))
            })
            .start()
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await; // idle now
        let id = queue.add(spec("echo", |_| {})).await.unwrap().id();
        let row = wait_for_state(&queue, id, "completed").await;
        assert_eq!(row.result.as_deref(), Some(r#"{"n":1}"#));
        // A delayed job wakes its idle worker when it falls due.
        let id = queue
            .add(spec("echo", |o| o.delay_ms = 200))
            .await
            .unwrap()
            .id();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(queue.job(id).await.unwrap().state, "waiting");
        wait_for_state(&queue, id, "completed").await;

        // Added through another connection pool, as another process would: on PostgreSQL the
        // notification wakes the worker; SQLite has one process by design.
        if queue.store().backend_name() == "postgres" {
            let other = Queue::new(target.open().await);
            tokio::time::sleep(Duration::from_millis(100)).await;
            let id = other.add(spec("echo", |_| {})).await.unwrap().id();
            wait_for_state(&queue, id, "completed").await;
            // Once the queue is known, a single add is one statement carrying its NOTIFY.
            other.declare("work").await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            let id = other.add(spec("echo", |_| {})).await.unwrap().id();
            wait_for_state(&queue, id, "completed").await;
        }
        worker.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn concurrency_and_rate_limits_hold() {
    for target in targets("limits") {
        let queue = Queue::new(target.open().await);
        queue.declare("work").await.unwrap();
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (r, m) = (running.clone(), most.clone());
        let worker = Worker::new(queue.clone(), "work", patient(4))
            .handle("slow", move |_ctx: JobContext| {
                let (running, most) = (r.clone(), m.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    Ok(None)
                }
            })
            .start()
            .await
            .unwrap();
        let added = queue
            .add_bulk(&vec![spec("slow", |_| {}); 30])
            .await
            .unwrap();
        for job in &added {
            wait_for_state(&queue, job.id(), "completed").await;
        }
        assert_eq!(
            most.load(Ordering::SeqCst),
            4,
            "at most the concurrency, and all of it used"
        );
        worker.shutdown().await.unwrap();

        // Three jobs per 10 s window: of ten ready jobs, three start and the rest wait.
        let started = Arc::new(AtomicUsize::new(0));
        let s = started.clone();
        let options = WorkerOptions {
            rate: Some(RateLimit {
                jobs: 3,
                window_ms: 10_000,
            }),
            ..patient(8)
        };
        let worker = Worker::new(queue.clone(), "work", options)
            .handle("count", move |_ctx: JobContext| {
                let started = s.clone();
                async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    Ok(None)
                }
            })
            .start()
            .await
            .unwrap();
        let added = queue
            .add_bulk(&vec![spec("count", |_| {}); 10])
            .await
            .unwrap();
        for job in &added[..3] {
            wait_for_state(&queue, job.id(), "completed").await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(started.load(Ordering::SeqCst), 3);
        worker.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn failures_timeouts_and_unknown_types_end_as_their_category() {
    for target in targets("failures") {
        let queue = Queue::new(target.open().await);
        queue.declare("work").await.unwrap();
        let worker = Worker::new(queue.clone(), "work", patient(4))
            .handle("flaky", |_ctx: JobContext| async move {
                Err(JobError::new(ErrorCategory::Network, "gateway unreachable"))
            })
            .handle("hang", |_ctx: JobContext| async move {
                tokio::time::sleep(Duration::from_secs(3_600)).await;
                Ok(None)
            })
            .handle("report", |ctx: JobContext| async move {
                ctx.progress(json!({"step": 1}))
                    .await
                    .map_err(|e| JobError::new(ErrorCategory::Unknown, e.to_string()))?;
                Ok(None)
            })
            .start()
            .await
            .unwrap();
        let flaky = queue
            .add(spec("flaky", |o| {
                o.attempts = 2;
                o.backoff = Backoff::Fixed { delay_ms: 10 };
            }))
            .await
            .unwrap()
            .id();
        let hang = queue
            .add(spec("hang", |o| {
                o.attempts = 1;
                o.timeout_ms = 100;
            }))
            .await
            .unwrap()
            .id();
        let unknown = queue.add(spec("mystery", |_| {})).await.unwrap().id();
        let report = queue.add(spec("report", |_| {})).await.unwrap().id();

        let row = wait_for_state(&queue, flaky, "dead").await;
        assert_eq!(
            (row.attempts, row.error_category.as_deref()),
            (2, Some("network"))
        );
        assert_eq!(queue.failures(flaky).await.unwrap().len(), 2);
        let row = wait_for_state(&queue, hang, "dead").await;
        assert_eq!(row.error_category.as_deref(), Some("timeout"));
        let row = wait_for_state(&queue, unknown, "dead").await;
        assert_eq!(row.error_category.as_deref(), Some("validation"));
        assert!(row.error.unwrap().contains("mystery"));
        let row = wait_for_state(&queue, report, "completed").await;
        assert_eq!(row.progress.as_deref(), Some(r#"{"step":1}"#));
        worker.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn shutdown_finishes_running_jobs_within_its_grace_and_releases_the_rest() {
    for target in targets("shutdown") {
        let queue = Queue::new(target.open().await);
        queue.declare("work").await.unwrap();
        let options = WorkerOptions {
            shutdown_grace_ms: 300,
            ..patient(4)
        };
        let worker = Worker::new(queue.clone(), "work", options)
            .handle("quick", |_ctx: JobContext| async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(None)
            })
            .handle("endless", |_ctx: JobContext| async move {
                std::future::pending::<()>().await;
                Ok(None)
            })
            .start()
            .await
            .unwrap();
        let quick = queue.add(spec("quick", |_| {})).await.unwrap().id();
        let endless = queue.add(spec("endless", |_| {})).await.unwrap().id();
        wait_for_state(&queue, endless, "active").await;
        worker.shutdown().await.unwrap();
        assert_eq!(queue.job(quick).await.unwrap().state, "completed");
        let row = queue.job(endless).await.unwrap();
        assert_eq!(
            (row.state.as_str(), row.attempts),
            ("waiting", 0),
            "released, attempt not counted"
        );
    }
}

#[tokio::test]
async fn a_worker_needs_a_declared_queue_and_sane_options() {
    for target in targets("worker_options") {
        let queue = Queue::new(target.open().await);
        assert!(matches!(
            Worker::new(queue.clone(), "nowhere", patient(1))
                .start()
                .await,
            Err(queue::QueueError::UnknownQueue(_))
        ));
        queue.declare("work").await.unwrap();
        for (options, field) in [
            (patient(0), "concurrency"),
            (
                WorkerOptions {
                    lease_ms: 1,
                    ..patient(1)
                },
                "lease_ms",
            ),
            (
                WorkerOptions {
                    rate: Some(RateLimit {
                        jobs: 0,
                        window_ms: 10,
                    }),
                    ..patient(1)
                },
                "rate",
            ),
        ] {
            match Worker::new(queue.clone(), "work", options).start().await {
                Err(queue::QueueError::Invalid { field: named, .. }) => assert_eq!(named, field),
                other => panic!("{field}: {:?}", other.err()),
            }
        }
    }
}

#[tokio::test]
async fn prefetched_jobs_keep_their_leases_and_go_back_unstarted_at_shutdown() {
    for target in targets("prefetch") {
        let queue = Queue::new(target.open().await);
        queue.declare("work").await.unwrap();
        let specs: Vec<JobSpec> = (0..8).map(|_| spec("slow", |_| {})).collect();
        let ids: Vec<i64> = queue
            .add_bulk(&specs)
            .await
            .unwrap()
            .iter()
            .map(|a| a.id())
            .collect();
        // One job at a time, 150 ms each, with everything else claimed ahead on a 300 ms
        // lease and stalled jobs looked for every 50 ms: a buffered job outlives its first
        // lease, so only renewing the buffer keeps it from being recovered as stalled.
        let options = WorkerOptions {
            concurrency: 1,
            prefetch: 10,
            lease_ms: 300,
            stalled_check_ms: 50,
            poll_ms: 50,
            ..patient(1)
        };
        let worker = Worker::new(queue.clone(), "work", options.clone())
            .handle("slow", |_ctx: JobContext| async move {
                tokio::time::sleep(Duration::from_millis(150)).await;
                Ok(None)
            })
            .start()
            .await
            .unwrap();
        for id in &ids[..6] {
            wait_for_state(&queue, *id, "completed").await;
        }
        worker.shutdown().await.unwrap();
        for id in &ids[..6] {
            let job = queue.job(*id).await.unwrap();
            assert_eq!(job.attempts, 1, "job {id} ran once: {job:?}");
            assert!(queue.failures(*id).await.unwrap().is_empty(), "job {id}");
        }
        // What was still buffered went back waiting, its attempt not counted.
        let waiting = queue.jobs("work", "waiting", 0, 100).await.unwrap();
        let active = queue.jobs("work", "active", 0, 100).await.unwrap();
        assert!(active.is_empty(), "{active:?}");
        for job in &waiting {
            assert_eq!(job.attempts, 0, "{job:?}");
        }
        let completed = queue.jobs("work", "completed", 0, 100).await.unwrap();
        assert_eq!(completed.len() + waiting.len(), ids.len());
    }
}

/// A handler's result larger than the queue keeps fails that job alone (as a validation
/// error, so it is not retried); the jobs whose completions would have been written in the
/// same batch complete. Before, the whole batch was refused and every job in it stayed
/// active until its lease ran out.
#[tokio::test]
async fn an_oversized_result_fails_its_job_and_not_its_batch() {
    for target in targets("oversized") {
        let queue = Queue::new(target.open().await);
        queue.declare("work").await.unwrap();
        let big = queue
            .add(JobSpec::new("work", "big", json!({})))
            .await
            .unwrap()
            .id();
        let small: Vec<JobSpec> = (0..20)
            .map(|_| JobSpec::new("work", "small", json!({})))
            .collect();
        let small: Vec<i64> = queue
            .add_bulk(&small)
            .await
            .unwrap()
            .iter()
            .map(|added| added.id())
            .collect();
        // All 21 handlers end together, so their outcomes share one completion batch.
        let together = Arc::new(tokio::sync::Barrier::new(21));
        let (for_big, for_small) = (together.clone(), together.clone());
        let too_long = "x".repeat(queue::limits::RESULT_BYTES_MAX + 1);
        let worker = Worker::new(queue.clone(), "work", patient(30))
            .handle("big", move |_context: JobContext| {
                let together = for_big.clone();
                let result = json!(too_long);
                async move {
                    together.wait().await;
                    Ok(Some(result))
                }
            })
            .handle("small", move |_context: JobContext| {
                let together = for_small.clone();
                async move {
                    together.wait().await;
                    Ok(Some(json!("done")))
                }
            })
            .start()
            .await
            .unwrap();
        let dead = wait_for_state(&queue, big, "dead").await;
        assert_eq!(dead.attempts, 1);
        let failures = queue.failures(big).await.unwrap();
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].category, "validation");
        assert!(failures[0].message.contains("result"), "{failures:?}");
        for id in small {
            wait_for_state(&queue, id, "completed").await;
        }
        worker.shutdown().await.unwrap();
    }
}

/// Jobs claimed ahead wait in the worker's buffer while a handler runs longer than the
/// lease: the worker renews their leases as it waits for a free slot, so another worker's
/// sweep for stalled jobs (here, the test's) takes none of them. Before, their leases were
/// renewed only on the way to starting a job, and they lapsed.
#[tokio::test]
async fn jobs_waiting_in_the_buffer_keep_their_leases_while_a_long_job_runs() {
    const LEASE_MS: u64 = 300;
    const HANDLER_MS: u64 = 700;
    for target in targets("buffer_leases") {
        let queue = Queue::new(target.open().await);
        queue.declare("work").await.unwrap();
        let specs: Vec<JobSpec> = (0..4)
            .map(|_| JobSpec::new("work", "slow", json!({})))
            .collect();
        let ids: Vec<i64> = queue
            .add_bulk(&specs)
            .await
            .unwrap()
            .iter()
            .map(|added| added.id())
            .collect();
        let options = WorkerOptions {
            prefetch: 10,
            lease_ms: LEASE_MS,
            ..patient(1)
        };
        let worker = Worker::new(queue.clone(), "work", options)
            .handle("slow", |_context: JobContext| async move {
                tokio::time::sleep(Duration::from_millis(HANDLER_MS)).await;
                Ok(None)
            })
            .start()
            .await
            .unwrap();
        // Another worker's sweep, every 50 ms, until every job has completed.
        let mut swept = 0;
        for id in &ids {
            loop {
                swept += queue.recover_stalled().await.unwrap();
                if queue.job(*id).await.unwrap().state == "completed" {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        worker.shutdown().await.unwrap();
        assert_eq!(swept, 0, "jobs taken as stalled");
        for id in ids {
            let job = queue.job(id).await.unwrap();
            assert_eq!((job.state.as_str(), job.attempts), ("completed", 1), "{id}");
            assert!(queue.failures(id).await.unwrap().is_empty(), "{id}");
        }
    }
}
