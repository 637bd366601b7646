//! Parent and child jobs: a parent waits for its children, and its policy decides what a
//! dead child does to it.

use std::sync::Arc;

use queue::{
    Added, ChildFailure, ErrorCategory, Flow, JobError, JobOptions, JobSpec, ManualClock, Queue,
    QueueError, limits,
};
use serde_json::json;

use crate::{field_of, targets, total_jobs};

const T0: i64 = 1_700_000_000_000;

async fn queue_on(target: &crate::Target) -> Queue {
    let queue = Queue::with_clock(target.open().await, Arc::new(ManualClock::new(T0)));
    queue.declare("build").await.unwrap();
    queue
}

fn job(kind: &str) -> JobSpec {
    JobSpec::new("build", kind, json!({ "step": kind }))
}

async fn state(queue: &Queue, id: i64) -> String {
    queue.job(id).await.unwrap().state
}

/// Claims everything ready and returns the job types, sorted.
async fn claim_kinds(queue: &Queue) -> Vec<(String, queue::Job)> {
    let mut jobs: Vec<_> = queue
        .claim("build", 100, "w", 60_000)
        .await
        .unwrap()
        .into_iter()
        .map(|job| (job.kind.clone(), job))
        .collect();
    jobs.sort_by(|a, b| a.0.cmp(&b.0));
    jobs
}

#[tokio::test]
async fn a_parent_runs_only_after_all_its_children_and_theirs_completed() {
    for target in targets("flow_order") {
        let queue = queue_on(&target).await;
        let flow = Flow::new(job("release"))
            .child(Flow::new(job("compile")).child(job("fetch")))
            .child(job("lint"));
        let added = queue.add_flow(&flow).await.unwrap();
        let ids: Vec<i64> = added.iter().map(|a| a.id()).collect();
        let [release, compile, fetch, lint] = ids[..] else {
            panic!("four jobs: {added:?}")
        };
        assert_eq!(state(&queue, release).await, "waiting_children");
        assert_eq!(state(&queue, compile).await, "waiting_children");
        assert_eq!(queue.job(release).await.unwrap().children_pending, 2);
        assert_eq!(queue.job(fetch).await.unwrap().parent_id, Some(compile));

        // Only the leaves are ready.
        let ready = claim_kinds(&queue).await;
        let kinds: Vec<&str> = ready.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(kinds, ["fetch", "lint"]);
        let (_, fetch_job) = &ready[0];
        let (_, lint_job) = &ready[1];
        queue
            .complete(fetch_job.id, fetch_job.lease, Some(&json!({"fetched": 3})))
            .await
            .unwrap();
        assert_eq!(state(&queue, compile).await, "waiting");
        let ready = claim_kinds(&queue).await;
        assert_eq!(ready.len(), 1, "compile is ready once fetch completed");
        let (_, compile_job) = &ready[0];
        queue
            .complete(compile_job.id, compile_job.lease, None)
            .await
            .unwrap();
        // lint is still running: the parent waits.
        assert_eq!(state(&queue, release).await, "waiting_children");
        assert!(claim_kinds(&queue).await.is_empty());
        queue
            .complete(lint_job.id, lint_job.lease, Some(&json!("clean")))
            .await
            .unwrap();
        assert_eq!(state(&queue, release).await, "waiting");
        let ready = claim_kinds(&queue).await;
        assert_eq!(ready[0].0, "release");
        // The parent's handler reads its children's results.
        let children = queue.children(release).await.unwrap();
        let results: Vec<Option<&str>> = children.iter().map(|c| c.result.as_deref()).collect();
        assert_eq!(
            children.iter().map(|c| c.id).collect::<Vec<_>>(),
            [compile, lint]
        );
        assert_eq!(results, [None, Some("\"clean\"")]);

        // A parent that no longer waits takes no more children.
        let late = job("late").with(JobOptions {
            parent: Some(release),
            ..JobOptions::default()
        });
        let before = total_jobs(&queue, "build").await;
        assert_eq!(field_of(&queue.add(late).await.unwrap_err()), "parent");
        assert_eq!(total_jobs(&queue, "build").await, before);
    }
}

#[tokio::test]
async fn a_child_can_join_a_parent_that_still_waits() {
    for target in targets("flow_join") {
        let queue = queue_on(&target).await;
        let added = queue
            .add_flow(&Flow::new(job("report")).child(job("part-1")))
            .await
            .unwrap();
        let parent = added[0].id();
        let extra = job("part-2").with(JobOptions {
            parent: Some(parent),
            ..JobOptions::default()
        });
        queue.add(extra).await.unwrap();
        assert_eq!(queue.job(parent).await.unwrap().children_pending, 2);
        for (_, job) in claim_kinds(&queue).await {
            queue.complete(job.id, job.lease, None).await.unwrap();
        }
        assert_eq!(state(&queue, parent).await, "waiting");
        // A parent whose only child is a duplicate of an existing job runs at once.
        let dedup = queue::Dedup {
            key: "only".into(),
            ttl_ms: 60_000,
        };
        let with_key = || {
            job("keyed").with(JobOptions {
                dedup: Some(dedup.clone()),
                ..JobOptions::default()
            })
        };
        queue.add(with_key()).await.unwrap();
        let added = queue
            .add_flow(&Flow::new(job("lonely")).child(with_key()))
            .await
            .unwrap();
        assert!(matches!(added[1], Added::Duplicate(_)));
        assert_eq!(state(&queue, added[0].id()).await, "waiting");
    }
}

#[tokio::test]
async fn a_dead_child_fails_releases_or_holds_its_parent_by_policy() {
    for target in targets("flow_policy") {
        let queue = queue_on(&target).await;
        let mut parents = Vec::new();
        for policy in [
            ChildFailure::FailParent,
            ChildFailure::Ignore,
            ChildFailure::Wait,
        ] {
            let flow = Flow::new(job(&format!("parent-{policy:?}")))
                .on_child_failure(policy)
                .child(job(&format!("bad-{policy:?}")))
                .child(job(&format!("good-{policy:?}")));
            let added = queue.add_flow(&flow).await.unwrap();
            parents.push((policy, added[0].id(), added[1].id()));
        }
        for (kind, job) in claim_kinds(&queue).await {
            if kind.starts_with("bad") {
                let error = JobError::new(ErrorCategory::Validation, "no such commit");
                assert!(!queue.fail(&job, error).await.unwrap(), "it dies at once");
            } else {
                queue.complete(job.id, job.lease, None).await.unwrap();
            }
        }
        let (_, failed, _) = parents[0];
        let row = queue.job(failed).await.unwrap();
        assert_eq!(row.state, "dead");
        assert_eq!(row.error_category.as_deref(), Some("validation"));
        assert!(
            row.error.as_deref().unwrap().contains("no such commit"),
            "{row:?}"
        );
        assert_eq!(row.strategy.as_deref(), Some("manual_review"));

        let (_, ignoring, bad_ignored) = parents[1];
        assert_eq!(state(&queue, ignoring).await, "waiting");

        let (_, waiting, bad_waited) = parents[2];
        assert_eq!(state(&queue, waiting).await, "waiting_children");
        // The dead child re-driven and completed releases the waiting parent; the ignored
        // one re-driven and completed is not counted twice.
        queue.redrive(&[bad_waited, bad_ignored]).await.unwrap();
        let ready = claim_kinds(&queue).await;
        let mut parent_ran = false;
        for (kind, job) in ready {
            if kind.starts_with("parent") {
                parent_ran = true;
                queue.release(job.id, job.lease).await.unwrap();
            } else {
                queue.complete(job.id, job.lease, None).await.unwrap();
            }
        }
        assert!(parent_ran, "the ignoring parent was ready");
        assert_eq!(state(&queue, waiting).await, "waiting");
        let ignoring_row = queue.job(ignoring).await.unwrap();
        assert_eq!(
            (ignoring_row.state.as_str(), ignoring_row.children_pending),
            ("waiting", 0)
        );

        // A discarded child counts as ended, whatever the policy.
        let added = queue
            .add_flow(
                &Flow::new(job("holder"))
                    .on_child_failure(ChildFailure::Wait)
                    .child(job("dropped")),
            )
            .await
            .unwrap();
        queue.discard(added[1].id()).await.unwrap();
        assert_eq!(state(&queue, added[0].id()).await, "waiting");
    }
}

#[tokio::test]
async fn a_bad_flow_gets_a_clear_error_and_adds_nothing() {
    for target in targets("flow_bad") {
        let queue = queue_on(&target).await;
        let mut deep = Flow::new(job("leaf"));
        for level in 0..limits::FLOW_DEPTH_MAX {
            deep = Flow::new(job(&format!("level-{level}"))).child(deep);
        }
        assert_eq!(
            field_of(&queue.add_flow(&deep).await.unwrap_err()),
            "children"
        );
        let own_parent = Flow::new(job("top")).child(job("child").with(JobOptions {
            parent: Some(1),
            ..JobOptions::default()
        }));
        assert_eq!(
            field_of(&queue.add_flow(&own_parent).await.unwrap_err()),
            "parent"
        );
        let bad_child = Flow::new(job("top")).child(job("child").with(JobOptions {
            priority: -1,
            ..JobOptions::default()
        }));
        assert_eq!(
            field_of(&queue.add_flow(&bad_child).await.unwrap_err()),
            "priority"
        );
        // A child of a job that is not a parent.
        let plain = queue.add(job("plain")).await.unwrap().id();
        let orphan = job("orphan").with(JobOptions {
            parent: Some(plain),
            ..JobOptions::default()
        });
        let error = queue.add(orphan).await.unwrap_err();
        assert!(
            matches!(
                error,
                QueueError::Invalid {
                    field: "parent",
                    ..
                }
            ),
            "{error}"
        );
        assert_eq!(total_jobs(&queue, "build").await, 1);
    }
}
