//! The event stream and the Prometheus metrics.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusBuilder;
use queue::events::names;
use queue::{
    Backoff, ErrorCategory, EventKind, JobError, JobEvent, JobOptions, JobSpec, ManualClock, Queue,
};
use serde_json::json;
use tokio::sync::broadcast::Receiver;

use crate::targets;

const T0: i64 = 1_700_000_000_000;

fn drain(events: &mut Receiver<JobEvent>) -> Vec<(i64, EventKind)> {
    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        seen.push((event.job_id, event.event));
    }
    seen
}

#[tokio::test]
async fn every_change_of_a_job_is_an_event() {
    for target in targets("events") {
        let clock = Arc::new(ManualClock::new(T0));
        let queue = Queue::with_clock(target.open().await, clock.clone());
        queue.declare("mail").await.unwrap();
        let mut events = queue.subscribe();
        let options = JobOptions {
            attempts: 2,
            backoff: Backoff::Fixed { delay_ms: 1_000 },
            ..JobOptions::default()
        };
        let id = queue
            .add(JobSpec::new("mail", "send", json!({})).with(options))
            .await
            .unwrap()
            .id();
        let job = queue.claim("mail", 1, "w", 1_000).await.unwrap().remove(0);
        queue
            .progress(id, job.lease, &json!({"sent": 1}))
            .await
            .unwrap();
        let error = JobError::new(ErrorCategory::Network, "smtp down");
        assert!(queue.fail(&job, error).await.unwrap());
        clock.advance(1_000);
        // The second attempt stalls: its lease runs out, and it was the last.
        queue.claim("mail", 1, "w", 1_000).await.unwrap();
        clock.advance(1_001);
        assert_eq!(queue.recover_stalled().await.unwrap(), 1);
        let second = queue
            .add(JobSpec::new("mail", "send", json!({})))
            .await
            .unwrap()
            .id();
        let job = queue.claim("mail", 1, "w", 1_000).await.unwrap().remove(0);
        queue.complete(job.id, job.lease, None).await.unwrap();
        assert_eq!(queue.redrive(&[id, second]).await.unwrap(), [id]);
        queue.discard(id).await.unwrap();

        let seen = drain(&mut events);
        let network = "network";
        let expected = vec![
            (id, EventKind::Waiting { run_at_ms: T0 }),
            (id, EventKind::Active { attempt: 1 }),
            (id, EventKind::Progress(json!({"sent": 1}))),
            (
                id,
                EventKind::Failed {
                    category: network,
                    message: "smtp down".into(),
                },
            ),
            (
                id,
                EventKind::Retried {
                    run_at_ms: T0 + 1_000,
                },
            ),
            (id, EventKind::Active { attempt: 2 }),
            (id, EventKind::Stalled),
            (
                id,
                EventKind::Failed {
                    category: "timeout",
                    message: "stalled: the lease of attempt 2 expired".into(),
                },
            ),
            (
                id,
                EventKind::Dead {
                    category: "timeout".into(),
                },
            ),
            (
                second,
                EventKind::Waiting {
                    run_at_ms: T0 + 2_001,
                },
            ),
            (second, EventKind::Active { attempt: 1 }),
            (second, EventKind::Completed),
            (
                id,
                EventKind::Waiting {
                    run_at_ms: T0 + 2_001,
                },
            ),
            (id, EventKind::Discarded),
        ];
        assert_eq!(seen, expected);
    }
}

/// Runs `test` on a single-threaded runtime with a Prometheus recorder installed for this
/// thread only, and returns the rendered metrics.
fn with_prometheus(test: impl std::future::Future<Output = ()>) -> String {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || runtime.block_on(test));
    handle.render()
}

fn value(rendered: &str, series: &str) -> Option<f64> {
    rendered
        .lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn the_queue_reports_prometheus_metrics() {
    for target in targets("metrics") {
        let rendered = with_prometheus(async {
            let clock = Arc::new(ManualClock::new(T0));
            let queue = Queue::with_clock(target.open().await, clock.clone());
            queue.declare("mail").await.unwrap();
            let specs: Vec<JobSpec> = (0..4)
                .map(|n| {
                    let mut spec = JobSpec::new("mail", "send", json!({ "n": n }));
                    spec.options.priority = n % 2;
                    spec.options.attempts = 1;
                    spec
                })
                .collect();
            queue.add_bulk(&specs).await.unwrap();
            let jobs = queue.claim("mail", 3, "w", 60_000).await.unwrap();
            clock.advance(250);
            queue
                .complete(jobs[0].id, jobs[0].lease, None)
                .await
                .unwrap();
            queue
                .complete(jobs[1].id, jobs[1].lease, None)
                .await
                .unwrap();
            let error = JobError::new(ErrorCategory::Validation, "bad");
            queue.fail(&jobs[2], error).await.unwrap();
            queue.record_depth().await.unwrap();
        });
        let jobs = |status: &str| {
            value(
                &rendered,
                &format!(
                    r#"{}{{queue="mail",type="send",status="{status}"}}"#,
                    names::JOBS
                ),
            )
        };
        assert_eq!(jobs("added"), Some(4.0), "{rendered}");
        assert_eq!(jobs("started"), Some(3.0));
        assert_eq!(jobs("completed"), Some(2.0));
        assert_eq!(jobs("failed"), Some(1.0));
        assert_eq!(jobs("dead"), Some(1.0));
        let depth = |state: &str, priority: i32| {
            value(
                &rendered,
                &format!(
                    r#"{}{{queue="mail",state="{state}",priority="{priority}"}}"#,
                    names::DEPTH
                ),
            )
        };
        // Claimed first: both priority-0 jobs, then one of priority 1.
        assert_eq!(depth("waiting", 1), Some(1.0), "{rendered}");
        assert_eq!(depth("completed", 0), Some(2.0));
        assert_eq!(depth("dead", 1), Some(1.0));
        assert_eq!(
            value(&rendered, &format!(r#"{}{{queue="mail"}}"#, names::DEAD)),
            Some(1.0)
        );
        let time = format!(
            r#"{}_count{{queue="mail",type="send",status="completed"}}"#,
            names::PROCESSING_SECONDS
        );
        assert_eq!(value(&rendered, &time), Some(2.0), "{rendered}");
    }
}
