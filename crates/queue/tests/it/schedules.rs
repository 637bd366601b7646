//! Cron and interval schedules (exactly one job per tick, however many schedulers run), and
//! retention with its scheduled clean-up.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use queue::schedule::{MAINTENANCE_QUEUE, RETENTION_KIND};
use queue::worker::{Worker, WorkerOptions};
use queue::{
    Dedup, ErrorCategory, EventKind, Every, Flow, JobError, JobOptions, JobRetention, JobSpec,
    Keep, ManualClock, Queue, QueueError, Retention, ScheduleSpec, Scheduler, SchedulerOptions,
};
use serde_json::json;

use crate::{field_of, targets, total_jobs};

/// 2023-11-14T22:13:20Z.
const T0: i64 = 1_700_000_000_000;

fn every(name: &str, every_ms: u64) -> ScheduleSpec {
    ScheduleSpec {
        name: name.into(),
        every: Every::Interval { every_ms },
        job: JobSpec::new("cron", "tick", json!({ "schedule": name })),
    }
}

async fn ticks(queue: &Queue, name: &str) -> Vec<i64> {
    let mut ticks = Vec::new();
    let mut after = 0;
    loop {
        let page = queue.jobs("cron", "waiting", after, 1000).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.id;
        ticks.extend(
            page.iter()
                .filter(|job| job.schedule.as_deref() == Some(name))
                .map(|job| job.schedule_tick_ms.expect("a scheduled job has its tick")),
        );
    }
    ticks
}

#[tokio::test]
async fn two_schedulers_enqueue_each_tick_exactly_once() {
    for target in targets("sched_two") {
        let clock = Arc::new(ManualClock::new(T0));
        let a = Queue::with_clock(target.open().await, clock.clone());
        let b = Queue::with_clock(target.open().await, clock.clone());
        a.declare("cron").await.unwrap();
        // Both processes declare the schedule at start; the second keeps the first's tick.
        a.upsert_schedule(&every("beat", 1_000)).await.unwrap();
        clock.advance(400);
        b.upsert_schedule(&every("beat", 1_000)).await.unwrap();
        assert_eq!(a.schedules().await.unwrap()[0].next_tick_ms, T0 + 1_000);

        for _ in 0..30 {
            clock.advance(1_000);
            let (fired_a, fired_b) = tokio::join!(a.fire_schedules(), b.fire_schedules());
            assert_eq!(fired_a.unwrap() + fired_b.unwrap(), 1, "one job per tick");
        }
        let seen = ticks(&a, "beat").await;
        let expected: Vec<i64> = (1..=30).map(|n| T0 + n * 1_000).collect();
        assert_eq!(seen, expected);

        // Ticks missed while no scheduler ran are coalesced into one job.
        clock.advance(10_000);
        assert_eq!(a.fire_schedules().await.unwrap(), 1);
        assert_eq!(b.fire_schedules().await.unwrap(), 0);
        assert_eq!(ticks(&a, "beat").await.len(), 31);
        assert!(a.schedules().await.unwrap()[0].next_tick_ms > a.now_ms());
    }
}

#[tokio::test]
async fn running_schedulers_on_the_real_clock_never_enqueue_a_tick_twice() {
    for target in targets("sched_real") {
        let a = Queue::new(target.open().await);
        let b = Queue::new(target.open().await);
        a.declare("cron").await.unwrap();
        a.upsert_schedule(&every("fast", 100)).await.unwrap();
        let options = SchedulerOptions {
            poll_ms: 20,
            depth_sample_ms: 0,
        };
        let first = Scheduler::start(a.clone(), options.clone()).unwrap();
        let second = Scheduler::start(b.clone(), options).unwrap();
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        first.shutdown().await.unwrap();
        second.shutdown().await.unwrap();
        let seen = ticks(&a, "fast").await;
        assert!(seen.len() >= 5, "the schedulers fired: {seen:?}");
        let unique: BTreeSet<i64> = seen.iter().copied().collect();
        assert_eq!(unique.len(), seen.len(), "a tick enqueued twice: {seen:?}");
        assert!(seen.iter().all(|tick| tick % 100 == 0));
    }
}

#[tokio::test]
async fn a_cron_schedule_ticks_at_its_times_in_utc() {
    for target in targets("sched_cron") {
        let clock = Arc::new(ManualClock::new(T0));
        let queue = Queue::with_clock(target.open().await, clock.clone());
        queue.declare("cron").await.unwrap();
        let spec = ScheduleSpec {
            name: "five".into(),
            every: Every::Cron("*/5 * * * *".into()),
            job: JobSpec::new("cron", "report", json!({})),
        };
        queue.upsert_schedule(&spec).await.unwrap();
        // 22:13:20 → the next tick is 22:15:00.
        clock.advance(99_000);
        assert_eq!(queue.fire_schedules().await.unwrap(), 0);
        clock.advance(1_000);
        assert_eq!(queue.fire_schedules().await.unwrap(), 1);
        clock.advance(5 * 60_000);
        assert_eq!(queue.fire_schedules().await.unwrap(), 1);
        assert_eq!(ticks(&queue, "five").await, [T0 + 100_000, T0 + 400_000]);

        queue.remove_schedule("five").await.unwrap();
        clock.advance(3_600_000);
        assert_eq!(queue.fire_schedules().await.unwrap(), 0);
        assert!(matches!(
            queue.remove_schedule("five").await,
            Err(QueueError::UnknownSchedule(_))
        ));
    }
}

#[tokio::test]
async fn a_bad_schedule_gets_a_clear_error_and_stores_nothing() {
    for target in targets("sched_bad") {
        let queue = Queue::new(target.open().await);
        queue.declare("cron").await.unwrap();
        let cron = |expression: &str| ScheduleSpec {
            every: Every::Cron(expression.into()),
            ..every("bad", 1_000)
        };
        let with = |change: fn(&mut JobOptions)| {
            let mut spec = every("bad", 1_000);
            change(&mut spec.job.options);
            spec
        };
        let cases = [
            (cron("61 * * * *"), "cron"),
            (cron("* * *"), "cron"),
            (cron("* * * * * *"), "cron"),
            (cron("not a cron"), "cron"),
            (every("bad", 10), "every_ms"),
            (with(|o| o.delay_ms = 5), "delay_ms"),
            (with(|o| o.delay_ms = -5), "delay_ms"),
            (
                with(|o| {
                    o.dedup = Some(Dedup {
                        key: "k".into(),
                        ttl_ms: 1,
                    })
                }),
                "dedup",
            ),
            (with(|o| o.priority = -1), "priority"),
            (every("bad name!", 1_000), "name"),
        ];
        for (spec, field) in cases {
            let error = queue.upsert_schedule(&spec).await.unwrap_err();
            assert_eq!(field_of(&error), field, "{spec:?}: {error}");
        }
        let mut unknown = every("lost", 1_000);
        unknown.job.queue = "nowhere".into();
        assert!(matches!(
            queue.upsert_schedule(&unknown).await,
            Err(QueueError::UnknownQueue(_))
        ));
        assert!(queue.schedules().await.unwrap().is_empty());
    }
}

async fn finish(queue: &Queue, clock: &ManualClock, jobs: usize, fail: bool) -> Vec<i64> {
    let mut ids = Vec::new();
    for _ in 0..jobs {
        clock.advance(1_000);
        let claimed = queue.claim("mail", 1, "w", 60_000).await.unwrap();
        let job = &claimed[0];
        if fail {
            let error = JobError::new(ErrorCategory::Validation, "bad address");
            queue.fail(job, error).await.unwrap();
        } else {
            queue.complete(job.id, job.lease, None).await.unwrap();
        }
        ids.push(job.id);
    }
    ids
}

#[tokio::test]
async fn retention_keeps_the_last_n_and_the_last_t_of_ended_jobs() {
    for target in targets("retention") {
        let clock = Arc::new(ManualClock::new(T0));
        let queue = Queue::with_clock(target.open().await, clock.clone());
        queue.declare("mail").await.unwrap();
        let rules = Retention {
            completed: Keep {
                last: Some(3),
                for_ms: None,
            },
            failed: Keep {
                last: None,
                for_ms: Some(10_000),
            },
        };
        queue.set_retention("mail", rules).await.unwrap();
        assert_eq!(queue.retention("mail").await.unwrap(), rules);
        let specs: Vec<JobSpec> = (0..7)
            .map(|n| JobSpec::new("mail", "send", json!({ "n": n })))
            .collect();
        queue.add_bulk(&specs).await.unwrap();
        let completed = finish(&queue, &clock, 5, false).await;
        let dead = finish(&queue, &clock, 2, true).await;
        assert_eq!(queue.failures(dead[0]).await.unwrap().len(), 1);

        assert_eq!(
            queue.purge().await.unwrap(),
            2,
            "the two oldest completions"
        );
        for (n, id) in completed.iter().enumerate() {
            let kept = queue.job(*id).await.is_ok();
            assert_eq!(kept, n >= 2, "completed job {n}");
        }
        clock.advance(10_001);
        assert_eq!(
            queue.purge().await.unwrap(),
            2,
            "the dead jobs, older than 10 s"
        );
        assert!(matches!(
            queue.job(dead[0]).await,
            Err(QueueError::UnknownJob(_))
        ));
        assert!(
            queue.failures(dead[0]).await.unwrap().is_empty(),
            "history goes too"
        );
        assert_eq!(total_jobs(&queue, "mail").await, 3);

        // A job's own rule.
        let short = JobSpec::new("mail", "send", json!({})).with(JobOptions {
            retention: JobRetention {
                completed_for_ms: Some(1_000),
                failed_for_ms: None,
            },
            ..JobOptions::default()
        });
        queue
            .set_retention("mail", Retention::default())
            .await
            .unwrap();
        let id = queue.add(short).await.unwrap().id();
        let job = queue.claim("mail", 1, "w", 60_000).await.unwrap().remove(0);
        queue.complete(job.id, job.lease, None).await.unwrap();
        clock.advance(500);
        assert_eq!(queue.purge().await.unwrap(), 0);
        clock.advance(501);
        assert_eq!(queue.purge().await.unwrap(), 1);
        assert!(queue.job(id).await.is_err());

        let bad = Retention {
            completed: Keep {
                last: None,
                for_ms: Some(queue::limits::KEEP_MS_MAX + 1),
            },
            failed: Keep::default(),
        };
        let error = queue.set_retention("mail", bad).await.unwrap_err();
        assert_eq!(field_of(&error), "retention.completed.for_ms");
        assert!(matches!(
            queue.set_retention("nowhere", Retention::default()).await,
            Err(QueueError::UnknownQueue(_))
        ));
    }
}

#[tokio::test]
async fn a_job_kept_for_no_time_is_deleted_as_it_completes() {
    for target in targets("keep_none") {
        let clock = Arc::new(ManualClock::new(T0));
        let queue = Queue::with_clock(target.open().await, clock.clone());
        queue.declare("mail").await.unwrap();
        let gone_at_once = JobOptions {
            retention: JobRetention {
                completed_for_ms: Some(0),
                failed_for_ms: None,
            },
            ..JobOptions::default()
        };
        let mut events = queue.subscribe();
        let dropped = queue
            .add(JobSpec::new("mail", "send", json!({})).with(gone_at_once.clone()))
            .await
            .unwrap()
            .id();
        let kept = queue
            .add(JobSpec::new("mail", "send", json!({})))
            .await
            .unwrap()
            .id();
        // A child kept for no time stays until its parent has counted it.
        let flow = Flow::new(JobSpec::new("mail", "digest", json!({})))
            .child(JobSpec::new("mail", "send", json!({})).with(gone_at_once));
        let family: Vec<i64> = queue
            .add_flow(&flow)
            .await
            .unwrap()
            .iter()
            .map(|added| added.id())
            .collect();
        let claimed = queue.claim("mail", 10, "w", 60_000).await.unwrap();
        assert_eq!(claimed.len(), 3);
        let completions: Vec<_> = claimed
            .iter()
            .map(|job| (job.id, job.lease, None))
            .collect();
        let answers = queue.complete_many(&completions).await.unwrap();
        assert!(answers.iter().all(Result::is_ok), "{answers:?}");

        assert!(matches!(
            queue.job(dropped).await,
            Err(QueueError::UnknownJob(_))
        ));
        assert_eq!(queue.job(kept).await.unwrap().state, "completed");
        assert_eq!(queue.job(family[1]).await.unwrap().state, "completed");
        assert_eq!(queue.job(family[0]).await.unwrap().state, "waiting");
        let completed: BTreeSet<i64> = std::iter::from_fn(|| events.try_recv().ok())
            .filter(|event| matches!(event.event, EventKind::Completed))
            .map(|event| event.job_id)
            .collect();
        assert!(
            completed.contains(&dropped),
            "its completion is still an event"
        );
        // Its lease cannot complete it again.
        let job = claimed.iter().find(|job| job.id == dropped).unwrap();
        assert!(matches!(
            queue.complete(job.id, job.lease, None).await,
            Err(QueueError::LeaseLost(_))
        ));
        assert_eq!(queue.purge().await.unwrap(), 1, "the child, now counted");
    }
}

#[tokio::test]
async fn the_clean_up_runs_as_a_scheduled_job() {
    for target in targets("retention_job") {
        let clock = Arc::new(ManualClock::new(T0));
        let queue = Queue::with_clock(target.open().await, clock.clone());
        queue.declare("mail").await.unwrap();
        let keep_none = Retention {
            completed: Keep {
                last: Some(0),
                for_ms: None,
            },
            failed: Keep::default(),
        };
        queue.set_retention("mail", keep_none).await.unwrap();
        queue
            .add(JobSpec::new("mail", "send", json!({})))
            .await
            .unwrap();
        finish(&queue, &clock, 1, false).await;
        assert_eq!(total_jobs(&queue, "mail").await, 1);

        queue.install_maintenance(60_000).await.unwrap();
        queue.install_maintenance(60_000).await.unwrap();
        clock.advance(60_000);
        assert_eq!(queue.fire_schedules().await.unwrap(), 1);
        let worker = Worker::new(queue.clone(), MAINTENANCE_QUEUE, WorkerOptions::default())
            .with_maintenance()
            .start()
            .await
            .unwrap();
        let mut done = None;
        for _ in 0..500 {
            let completed = queue
                .jobs(MAINTENANCE_QUEUE, "completed", 0, 10)
                .await
                .unwrap();
            if let Some(job) = completed.first() {
                done = Some(job.clone());
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        worker.shutdown().await.unwrap();
        let done = done.expect("the clean-up job completed");
        assert_eq!(done.kind, RETENTION_KIND);
        assert_eq!(done.result.as_deref(), Some(r#"{"deleted":1}"#));
        assert_eq!(total_jobs(&queue, "mail").await, 0);
    }
}
