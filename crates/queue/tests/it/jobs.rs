//! The stored queue driven directly, on a manual clock: options, ordering, retries, leases,
//! stalls, deduplication, pausing, transactions and the dead-letter queue.

use std::sync::Arc;

use queue::{
    Added, Backoff, Clock, DeadFilter, Dedup, ErrorCategory, JobError, JobOptions, JobSpec,
    ManualClock, Queue, QueueError, backoff_ms, limits,
};
use serde_json::json;

use crate::{field_of, targets, total_jobs};

const T0: i64 = 1_700_000_000_000;

async fn queue_on(target: &crate::Target) -> (Queue, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(T0));
    let queue = Queue::with_clock(target.open().await, clock.clone());
    queue.declare("mail").await.unwrap();
    (queue, clock)
}

fn job(kind: &str) -> JobSpec {
    JobSpec::new("mail", kind, json!({"to": "a@example.com"}))
}

fn opts(change: impl FnOnce(&mut JobOptions)) -> JobOptions {
    let mut options = JobOptions::default();
    change(&mut options);
    options
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_adds_nothing() {
    for target in targets("bad_input") {
        let (queue, _) = queue_on(&target).await;
        let big = "x".repeat(limits::PAYLOAD_BYTES_MAX);
        let cases: Vec<(JobSpec, &str)> = vec![
            (
                JobSpec::new("nowhere", "send", json!({})),
                "queue (unknown)",
            ),
            (JobSpec::new("", "send", json!({})), "queue"),
            (JobSpec::new("mail", "bad type!", json!({})), "type"),
            (
                JobSpec::new("mail", "send", json!({ "body": big })),
                "payload",
            ),
            (job("send").with(opts(|o| o.priority = -1)), "priority"),
            (
                job("send").with(opts(|o| o.priority = limits::PRIORITY_MAX + 1)),
                "priority",
            ),
            (job("send").with(opts(|o| o.delay_ms = -5)), "delay_ms"),
            (
                job("send").with(opts(|o| o.delay_ms = limits::DELAY_MS_MAX + 1)),
                "delay_ms",
            ),
            (
                job("send").with(opts(|o| o.run_at_ms = Some(-1))),
                "run_at_ms",
            ),
            (job("send").with(opts(|o| o.attempts = 0)), "attempts"),
            (
                job("send").with(opts(|o| o.attempts = limits::ATTEMPTS_MAX + 1)),
                "attempts",
            ),
            (job("send").with(opts(|o| o.jitter_pct = 101)), "jitter_pct"),
            (job("send").with(opts(|o| o.timeout_ms = 0)), "timeout_ms"),
            (
                job("send").with(opts(|o| {
                    o.backoff = Backoff::Exponential {
                        base_ms: 10,
                        max_ms: 5,
                    }
                })),
                "backoff.max_ms",
            ),
            (
                job("send").with(opts(|o| {
                    o.backoff = Backoff::Fixed {
                        delay_ms: limits::BACKOFF_MS_MAX + 1,
                    }
                })),
                "backoff",
            ),
            (
                job("send").with(opts(|o| {
                    o.dedup = Some(Dedup {
                        key: String::new(),
                        ttl_ms: 10,
                    })
                })),
                "dedup.key",
            ),
            (
                job("send").with(opts(|o| {
                    o.dedup = Some(Dedup {
                        key: "k".into(),
                        ttl_ms: 0,
                    })
                })),
                "dedup.ttl_ms",
            ),
        ];
        for (spec, field) in cases {
            let error = queue.add(spec.clone()).await.expect_err(field);
            assert_eq!(field_of(&error), field, "{spec:?}: {error}");
            // In a bulk add, one bad job refuses them all.
            let error = queue.add_bulk(&[job("ok"), spec]).await.expect_err(field);
            assert_eq!(field_of(&error), field);
        }
        assert_eq!(total_jobs(&queue, "mail").await, 0);
        let too_many = vec![job("send"); limits::BULK_JOBS_MAX + 1];
        assert_eq!(
            field_of(&queue.add_bulk(&too_many).await.unwrap_err()),
            "jobs"
        );
        let error = queue.claim("mail", 0, "w", 1_000).await.unwrap_err();
        assert_eq!(field_of(&error), "limit");
        let error = queue.claim("mail", 1, "w", 1).await.unwrap_err();
        assert_eq!(field_of(&error), "lease_ms");
        assert!(matches!(
            queue.pause("nowhere").await,
            Err(QueueError::UnknownQueue(_))
        ));
        assert_eq!(total_jobs(&queue, "mail").await, 0);
    }
}

#[tokio::test]
async fn jobs_run_by_priority_then_due_time_and_not_before_their_delay() {
    for target in targets("order") {
        let (queue, clock) = queue_on(&target).await;
        let specs = [
            job("low").with(opts(|o| o.priority = 5)),
            job("late").with(opts(|o| o.delay_ms = 1_000)),
            job("first"),
            job("urgent").with(opts(|o| o.priority = 0)),
            job("scheduled").with(opts(|o| o.run_at_ms = Some(T0 + 500))),
        ];
        let added = queue.add_bulk(&specs).await.unwrap();
        let ids: Vec<i64> = added.iter().map(|a| a.id()).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "ids follow the order given: {ids:?}"
        );
        let counts = queue.counts("mail").await.unwrap();
        let delayed: u64 = counts
            .iter()
            .filter(|c| c.state == "delayed")
            .map(|c| c.jobs)
            .sum();
        assert_eq!(delayed, 2);

        let kinds = |jobs: Vec<queue::Job>| jobs.into_iter().map(|j| j.kind).collect::<Vec<_>>();
        assert_eq!(
            kinds(queue.claim("mail", 10, "w", 1_000).await.unwrap()),
            ["first", "urgent", "low"]
        );
        clock.advance(499);
        assert!(
            queue
                .claim("mail", 10, "w", 1_000)
                .await
                .unwrap()
                .is_empty()
        );
        clock.advance(1);
        assert_eq!(
            kinds(queue.claim("mail", 10, "w", 1_000).await.unwrap()),
            ["scheduled"]
        );
        clock.advance(500);
        assert_eq!(
            kinds(queue.claim("mail", 10, "w", 1_000).await.unwrap()),
            ["late"]
        );
    }
}

#[tokio::test]
async fn failures_retry_after_backoff_then_land_in_the_dead_letter_queue() {
    for target in targets("retry") {
        let (queue, clock) = queue_on(&target).await;
        let spec = job("send").with(opts(|o| {
            o.attempts = 3;
            o.backoff = Backoff::Exponential {
                base_ms: 100,
                max_ms: 150,
            };
        }));
        let id = queue.add(spec).await.unwrap().id();
        let mut waits = Vec::new();
        for attempt in 1..=3u32 {
            let claimed = queue.claim("mail", 1, "w", 1_000).await.unwrap();
            assert_eq!(claimed.len(), 1, "attempt {attempt}");
            assert_eq!(claimed[0].attempt, attempt);
            let retried = queue
                .fail(
                    &claimed[0],
                    JobError::new(ErrorCategory::Network, format!("refused {attempt}")),
                )
                .await
                .unwrap();
            assert_eq!(retried, attempt < 3);
            if retried {
                let row = queue.job(id).await.unwrap();
                assert_eq!(row.state, "waiting");
                let wait = row.run_at_ms - clock.now_ms();
                assert!(
                    queue.claim("mail", 1, "w", 1_000).await.unwrap().is_empty(),
                    "not before its backoff"
                );
                waits.push(wait);
                clock.advance(wait);
            }
        }
        assert_eq!(waits, [100, 150], "exponential, capped at max_ms");
        let row = queue.job(id).await.unwrap();
        assert_eq!(row.state, "dead");
        assert_eq!(row.error_category.as_deref(), Some("network"));
        assert_eq!(row.strategy.as_deref(), Some("retry_later"));
        let history = queue.failures(id).await.unwrap();
        let messages: Vec<&str> = history.iter().map(|f| f.message.as_str()).collect();
        assert_eq!(messages, ["refused 1", "refused 2", "refused 3"]);

        // A validation error cannot get better by retrying: dead at once, for a person to look at.
        let id = queue.add(job("parse")).await.unwrap().id();
        let claimed = queue.claim("mail", 1, "w", 1_000).await.unwrap();
        let retried = queue
            .fail(
                &claimed[0],
                JobError::new(ErrorCategory::Validation, "no recipient"),
            )
            .await
            .unwrap();
        assert!(!retried);
        let row = queue.job(id).await.unwrap();
        assert_eq!(
            (row.state.as_str(), row.strategy.as_deref()),
            ("dead", Some("manual_review"))
        );
    }
}

#[test]
fn backoff_is_fixed_or_doubling_and_jitter_only_shortens_it() {
    let exponential = Backoff::Exponential {
        base_ms: 100,
        max_ms: 1_000,
    };
    let waits: Vec<u64> = (1..=6).map(|a| backoff_ms(exponential, 0, a, 0)).collect();
    assert_eq!(waits, [100, 200, 400, 800, 1_000, 1_000]);
    assert_eq!(backoff_ms(Backoff::Fixed { delay_ms: 70 }, 0, 9, 0), 70);
    assert_eq!(
        backoff_ms(exponential, 50, 200, u64::MAX),
        500 + 500 - (u64::MAX % 501)
    );
    for random in [0, 1, 7, 499, 500, 501, u64::MAX] {
        let wait = backoff_ms(Backoff::Fixed { delay_ms: 1_000 }, 50, 1, random);
        assert!((500..=1_000).contains(&wait), "{wait}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claimers_never_claim_one_job_twice() {
    for target in targets("concurrent_claims") {
        let (queue, _clock) = queue_on(&target).await;
        const JOBS: usize = 600;
        let specs: Vec<JobSpec> = (0..JOBS).map(|_| job("send")).collect();
        queue.add_bulk(&specs).await.unwrap();
        let mut claimers = Vec::new();
        for n in 0..8 {
            let queue = queue.clone();
            claimers.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                loop {
                    let jobs = queue
                        .claim("mail", 7, &format!("w{n}"), 60_000)
                        .await
                        .unwrap();
                    if jobs.is_empty() {
                        return ids;
                    }
                    ids.extend(jobs.iter().map(|job| job.id));
                }
            }));
        }
        let mut claimed = Vec::new();
        for claimer in claimers {
            claimed.extend(claimer.await.unwrap());
        }
        let total = claimed.len();
        claimed.sort_unstable();
        claimed.dedup();
        assert_eq!(claimed.len(), total, "a job was claimed twice");
        assert_eq!(total, JOBS, "every job was claimed");
    }
}

#[tokio::test]
async fn a_stale_lease_is_refused_so_no_job_completes_twice() {
    for target in targets("lease") {
        let (queue, clock) = queue_on(&target).await;
        let spec = job("send").with(opts(|o| o.backoff = Backoff::Fixed { delay_ms: 0 }));
        let id = queue.add(spec).await.unwrap().id();
        let first = queue.claim("mail", 1, "a", 1_000).await.unwrap().remove(0);
        queue.heartbeat(id, first.lease, 1_000).await.unwrap();
        queue
            .progress(id, first.lease, &json!({"done": 0.5}))
            .await
            .unwrap();
        assert_eq!(
            queue.job(id).await.unwrap().progress.as_deref(),
            Some(r#"{"done":0.5}"#)
        );

        // Worker a stops reporting; its lease ends and the job is taken again by b.
        clock.advance(1_001);
        assert_eq!(queue.recover_stalled().await.unwrap(), 1);
        let row = queue.job(id).await.unwrap();
        assert_eq!(
            (row.state.as_str(), row.error_category.as_deref()),
            ("waiting", Some("timeout"))
        );
        let second = queue.claim("mail", 1, "b", 1_000).await.unwrap().remove(0);
        assert_eq!(second.attempt, 2, "the stalled attempt counts");
        assert_ne!(second.lease, first.lease);

        // a comes back: every report under its old lease is refused and changes nothing.
        assert!(matches!(
            queue.complete(id, first.lease, None).await,
            Err(QueueError::LeaseLost(_))
        ));
        assert!(matches!(
            queue.heartbeat(id, first.lease, 1_000).await,
            Err(QueueError::LeaseLost(_))
        ));
        assert!(matches!(
            queue
                .fail(&first, JobError::new(ErrorCategory::Unknown, "late"))
                .await,
            Err(QueueError::LeaseLost(_))
        ));
        assert_eq!(queue.job(id).await.unwrap().state, "active");
        queue
            .complete(id, second.lease, Some(&json!({"sent": true})))
            .await
            .unwrap();
        assert!(matches!(
            queue.complete(id, second.lease, None).await,
            Err(QueueError::LeaseLost(_))
        ));
        let row = queue.job(id).await.unwrap();
        assert_eq!(
            (row.state.as_str(), row.result.as_deref()),
            ("completed", Some(r#"{"sent":true}"#))
        );

        // A stall on the last attempt is a death by timeout.
        let spec = job("once").with(opts(|o| o.attempts = 1));
        let id = queue.add(spec).await.unwrap().id();
        queue.claim("mail", 1, "a", 1_000).await.unwrap();
        clock.advance(1_001);
        assert_eq!(queue.recover_stalled().await.unwrap(), 1);
        let row = queue.job(id).await.unwrap();
        assert_eq!(
            (row.state.as_str(), row.error_category.as_deref()),
            ("dead", Some("timeout"))
        );

        // A released job goes back without its attempt counted.
        let id = queue.add(job("again")).await.unwrap().id();
        let held = queue.claim("mail", 1, "a", 1_000).await.unwrap().remove(0);
        queue.release(id, held.lease).await.unwrap();
        assert_eq!(
            queue.claim("mail", 1, "a", 1_000).await.unwrap()[0].attempt,
            1
        );
    }
}

#[tokio::test]
async fn a_deduplication_key_holds_for_its_time_to_live() {
    for target in targets("dedup") {
        let (queue, clock) = queue_on(&target).await;
        let spec = || {
            job("report").with(opts(|o| {
                o.dedup = Some(Dedup {
                    key: "daily".into(),
                    ttl_ms: 1_000,
                })
            }))
        };
        let first = queue.add(spec()).await.unwrap();
        let Added::New(id) = first else {
            panic!("{first:?}")
        };
        assert_eq!(queue.add(spec()).await.unwrap(), Added::Duplicate(id));
        let bulk = queue.add_bulk(&[spec(), job("other")]).await.unwrap();
        assert_eq!(bulk[0], Added::Duplicate(id));
        assert!(matches!(bulk[1], Added::New(_)));
        // Another queue has its own keys.
        queue.declare("sms").await.unwrap();
        let mut elsewhere = spec();
        elsewhere.queue = "sms".into();
        assert!(matches!(queue.add(elsewhere).await.unwrap(), Added::New(_)));
        clock.advance(1_000);
        let later = queue.add(spec()).await.unwrap();
        assert!(matches!(later, Added::New(new) if new != id), "{later:?}");
        assert_eq!(total_jobs(&queue, "mail").await, 3);
        // One add cannot give a key to two jobs.
        let twice = [spec(), spec()];
        clock.advance(1_000);
        assert_eq!(
            field_of(&queue.add_bulk(&twice).await.unwrap_err()),
            "dedup.key"
        );
        assert_eq!(total_jobs(&queue, "mail").await, 3);
    }
}

#[tokio::test]
async fn a_paused_queue_keeps_its_jobs_and_gives_none() {
    for target in targets("pause") {
        let (queue, _) = queue_on(&target).await;
        queue.add(job("send")).await.unwrap();
        queue.pause("mail").await.unwrap();
        assert_eq!(queue.queues().await.unwrap(), [("mail".to_string(), true)]);
        assert!(queue.claim("mail", 5, "w", 1_000).await.unwrap().is_empty());
        queue.resume("mail").await.unwrap();
        assert_eq!(queue.claim("mail", 5, "w", 1_000).await.unwrap().len(), 1);
    }
}

#[tokio::test]
async fn jobs_added_in_a_transaction_exist_only_if_it_commits() {
    for target in targets("tx") {
        let (queue, _) = queue_on(&target).await;
        let store = queue.store().clone();
        let mut tx = store.begin().await.unwrap();
        queue.add_in(&mut tx, &[job("a"), job("b")]).await.unwrap();
        tx.rollback().await.unwrap();
        assert_eq!(total_jobs(&queue, "mail").await, 0);

        let mut tx = store.begin().await.unwrap();
        queue.add_in(&mut tx, &[job("a")]).await.unwrap();
        queue.add_in(&mut tx, &[job("b")]).await.unwrap();
        drop(tx); // dropped without commit: rolled back
        assert_eq!(total_jobs(&queue, "mail").await, 0);

        let mut tx = store.begin().await.unwrap();
        queue.add_in(&mut tx, &[job("a"), job("b")]).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(total_jobs(&queue, "mail").await, 2);
    }
}

#[tokio::test]
async fn the_dead_letter_queue_is_searched_summarised_and_redriven() {
    for target in targets("dlq") {
        let (queue, clock) = queue_on(&target).await;
        let once = || opts(|o| o.attempts = 1);
        let failures = [
            (
                "charge",
                ErrorCategory::Network,
                "connection refused by psp",
            ),
            (
                "charge",
                ErrorCategory::Network,
                "connection refused by psp",
            ),
            ("notify", ErrorCategory::Authorization, "bot token revoked"),
            ("export", ErrorCategory::Resource, "disk full 100%"),
        ];
        let mut ids = Vec::new();
        for (kind, category, message) in failures {
            let id = queue.add(job(kind).with(once())).await.unwrap().id();
            let claimed = queue.claim("mail", 1, "w", 1_000).await.unwrap().remove(0);
            queue
                .fail(&claimed, JobError::new(category, message))
                .await
                .unwrap();
            ids.push(id);
            clock.advance(10);
        }
        let all = queue.dead(&DeadFilter::default(), 100).await.unwrap();
        assert_eq!(all.len(), 4);
        assert_eq!(all[0].id, ids[3], "newest death first");
        let network = DeadFilter {
            category: Some("network".into()),
            ..DeadFilter::default()
        };
        assert_eq!(queue.dead(&network, 100).await.unwrap().len(), 2);
        let text = DeadFilter {
            text: Some("100%".into()),
            ..DeadFilter::default()
        };
        let found = queue.dead(&text, 100).await.unwrap();
        assert_eq!(
            found.iter().map(|j| j.id).collect::<Vec<_>>(),
            [ids[3]],
            "% is matched literally"
        );
        let by_kind = DeadFilter {
            text: Some("notify".into()),
            ..DeadFilter::default()
        };
        assert_eq!(queue.dead(&by_kind, 100).await.unwrap()[0].id, ids[2]);
        let bad = DeadFilter {
            category: Some("gremlins".into()),
            ..DeadFilter::default()
        };
        assert_eq!(
            field_of(&queue.dead(&bad, 10).await.unwrap_err()),
            "category"
        );

        let summary = queue.failure_summary(T0, 3_600_000).await.unwrap();
        assert_eq!(summary[0].message, "connection refused by psp");
        assert_eq!(
            summary[0].failures, 2,
            "recurring errors come first in their window"
        );

        // Re-drive two (one of them twice: the second time it is no longer dead).
        assert_eq!(
            queue.redrive(&[ids[0], ids[1], ids[0]]).await.unwrap(),
            [ids[0], ids[1]]
        );
        let again = queue.claim("mail", 10, "w", 1_000).await.unwrap();
        assert_eq!(again.len(), 2);
        assert!(again.iter().all(|j| j.attempt == 1), "fresh attempts");
        queue.discard(ids[2]).await.unwrap();
        assert_eq!(queue.job(ids[2]).await.unwrap().state, "discarded");
        assert_eq!(
            field_of(&queue.discard(again[0].id).await.unwrap_err()),
            "id"
        );
        assert!(matches!(
            queue.discard(999_999).await,
            Err(QueueError::UnknownJob(_))
        ));
        assert_eq!(
            queue.dead(&DeadFilter::default(), 100).await.unwrap().len(),
            1
        );
    }
}

#[tokio::test]
async fn a_claim_reads_the_ready_index_on_a_table_never_analysed() {
    for target in targets("claim_plan") {
        let (queue, _) = queue_on(&target).await;
        // Filled at once, as a burst of jobs arrives, before any statistics exist.
        let specs: Vec<JobSpec> = (0..limits::BULK_JOBS_MAX).map(|_| job("send")).collect();
        for _ in 0..5 {
            queue.add_bulk(&specs).await.unwrap();
        }
        let plan = queue.store().claim_plan("mail", 500, T0).await.unwrap();
        // Read in the ready index's order, a claim stops after the jobs it takes; through the
        // due-time index it would sort every waiting job first.
        assert!(plan.contains("jobs_ready"), "{plan}");
        assert!(!plan.contains("jobs_due"), "{plan}");
    }
}
