//! The job queue over HTTP: operators' routes, the external-worker protocol (fetch, heartbeat,
//! progress, complete, fail, release) with its lease fencing, pausing, the dead-letter queue,
//! and every refusal with its status, code and field.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::{Harness, harnesses};

/// Creates an operator and returns their token.
async fn operator(h: &Harness, admin: &str, name: &str) -> String {
    let password = format!("{name}-password");
    let user = h
        .expect(
            StatusCode::CREATED,
            Method::POST,
            "/api/v1/admin/users",
            Some(admin),
            Some(json!({"username": name, "password": password, "role": "operator"})),
        )
        .await;
    assert_eq!(user["role"], "operator");
    h.login(name, &password).await
}

async fn declare(h: &Harness, token: &str, queue: &str) {
    h.expect(
        StatusCode::NO_CONTENT,
        Method::PUT,
        &format!("/api/v1/queues/{queue}"),
        Some(token),
        None,
    )
    .await;
}

/// Adds a job and returns its id.
async fn add(h: &Harness, token: &str, queue: &str, job: Value) -> i64 {
    let added = h
        .expect(
            StatusCode::CREATED,
            Method::POST,
            &format!("/api/v1/queues/{queue}/jobs"),
            Some(token),
            Some(job),
        )
        .await;
    assert_eq!(added["duplicate"], false);
    added["id"].as_i64().unwrap()
}

/// Fetches and returns the claimed jobs.
async fn fetch(h: &Harness, token: &str, queue: &str, request: Value) -> Vec<Value> {
    let fetched = h
        .expect(
            StatusCode::OK,
            Method::POST,
            &format!("/api/v1/queues/{queue}/fetch"),
            Some(token),
            Some(request),
        )
        .await;
    fetched["jobs"].as_array().unwrap().clone()
}

/// Sends a report on a job (`heartbeat`, `progress`, `complete`, `fail`, `release`).
async fn report(h: &Harness, token: &str, id: i64, what: &str, body: Value) -> (StatusCode, Value) {
    h.call(
        Method::POST,
        &format!("/api/v1/jobs/{id}/{what}"),
        Some(token),
        Some(body),
    )
    .await
}

async fn job(h: &Harness, token: &str, id: i64) -> Value {
    h.expect(
        StatusCode::OK,
        Method::GET,
        &format!("/api/v1/jobs/{id}"),
        Some(token),
        None,
    )
    .await
}

/// Asserts a queue's counts: the states named have these counts, every other state none.
async fn assert_counts(h: &Harness, token: &str, queue: &str, expected: &[(&str, u64)]) {
    let queues = h
        .expect(
            StatusCode::OK,
            Method::GET,
            "/api/v1/queues",
            Some(token),
            None,
        )
        .await;
    let entry = queues
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == queue)
        .unwrap_or_else(|| panic!("no queue {queue} in {queues}"));
    let counts = entry["counts"].as_object().unwrap();
    let states = [
        "waiting",
        "delayed",
        "waiting_children",
        "active",
        "completed",
        "dead",
        "discarded",
    ];
    assert_eq!(counts.len(), states.len(), "{entry}");
    for state in states {
        let want = expected
            .iter()
            .find(|(s, _)| *s == state)
            .map_or(0, |(_, n)| *n);
        assert_eq!(counts[state], want, "{} {state}: {entry}", h.backend);
    }
}

/// The ids of a list of jobs.
fn ids(jobs: &Value) -> Vec<i64> {
    jobs.as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_i64().unwrap())
        .collect()
}

async fn list(h: &Harness, token: &str, path: &str) -> Value {
    h.expect(StatusCode::OK, Method::GET, path, Some(token), None)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_gets_403_on_every_queue_route() {
    for h in harnesses("queue_roles").await {
        let admin = h.admin().await;
        let op = operator(&h, &admin, "olga").await;
        declare(&h, &op, "mail").await;
        let id = add(&h, &op, "mail", json!({"type": "send"})).await;
        let (_, user) = h.user(&admin, "ursula").await;
        let lease = json!({"lease": 1});
        let routes: Vec<(Method, String, Option<Value>)> = vec![
            (Method::GET, "/api/v1/queues".into(), None),
            (Method::PUT, "/api/v1/queues/mail".into(), None),
            (Method::GET, "/api/v1/queues/mail/jobs".into(), None),
            (
                Method::POST,
                "/api/v1/queues/mail/jobs".into(),
                Some(json!({"type": "send"})),
            ),
            (Method::GET, "/api/v1/queues/mail/dead".into(), None),
            (Method::GET, "/api/v1/failures/summary".into(), None),
            (Method::POST, "/api/v1/queues/mail/pause".into(), None),
            (Method::POST, "/api/v1/queues/mail/resume".into(), None),
            (
                Method::POST,
                "/api/v1/queues/mail/fetch".into(),
                Some(json!({})),
            ),
            (Method::GET, format!("/api/v1/jobs/{id}"), None),
            (Method::POST, format!("/api/v1/jobs/{id}/retry"), None),
            (Method::POST, format!("/api/v1/jobs/{id}/discard"), None),
            (
                Method::POST,
                format!("/api/v1/jobs/{id}/heartbeat"),
                Some(lease.clone()),
            ),
            (
                Method::POST,
                format!("/api/v1/jobs/{id}/progress"),
                Some(json!({"lease": 1, "progress": 1})),
            ),
            (
                Method::POST,
                format!("/api/v1/jobs/{id}/complete"),
                Some(lease.clone()),
            ),
            (
                Method::POST,
                format!("/api/v1/jobs/{id}/fail"),
                Some(json!({"lease": 1, "category": "network", "message": "x"})),
            ),
            (
                Method::POST,
                format!("/api/v1/jobs/{id}/release"),
                Some(lease.clone()),
            ),
        ];
        for (method, path, body) in &routes {
            let (status, answer) = h
                .call(method.clone(), path, Some(&user), body.clone())
                .await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {answer}");
            assert_eq!(answer["error"]["code"], "FORBIDDEN", "{method} {path}");
            let (status, _) = h.call(method.clone(), path, None, body.clone()).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
        }
        // None of them changed anything: the job still waits in a running queue.
        assert_counts(&h, &op, "mail", &[("waiting", 1)]).await;
        let queues = list(&h, &op, "/api/v1/queues").await;
        assert_eq!(queues[0]["paused"], false);
        // The admin may do what an operator may.
        assert_counts(&h, &admin, "mail", &[("waiting", 1)]).await;
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_runs_jobs_through_the_worker_protocol() {
    for h in harnesses("queue_protocol").await {
        let admin = h.admin().await;
        let op = operator(&h, &admin, "olga").await;
        let me = h
            .expect(StatusCode::OK, Method::GET, "/api/v1/me", Some(&op), None)
            .await;
        declare(&h, &op, "mail").await;
        assert_counts(&h, &op, "mail", &[]).await;
        let a = add(
            &h,
            &op,
            "mail",
            json!({"type": "send", "payload": {"to": "a"}, "priority": 1}),
        )
        .await;
        let b = add(
            &h,
            &op,
            "mail",
            json!({"type": "send", "payload": {"to": "b"}, "priority": 2, "attempts": 1}),
        )
        .await;
        let c = add(
            &h,
            &op,
            "mail",
            json!({"type": "send", "payload": {"to": "c"}, "priority": 3,
                   "backoff": {"type": "fixed", "delay_ms": 60_000}}),
        )
        .await;
        assert_counts(&h, &op, "mail", &[("waiting", 3)]).await;

        // Fetch one: the first by priority, with everything a worker needs.
        let claimed = fetch(&h, &op, "mail", json!({"max_jobs": 1, "lease_ms": 30_000})).await;
        assert_eq!(claimed.len(), 1);
        let first = &claimed[0];
        assert_eq!(first["id"], a);
        assert_eq!(first["type"], "send");
        assert_eq!(first["payload"], json!({"to": "a"}));
        assert_eq!(first["attempt"], 1);
        assert_eq!(first["attempts_max"], 3);
        assert_eq!(first["timeout_ms"], 30_000);
        let lease_a = first["lease"].as_i64().unwrap();
        let until = first["lease_until_ms"].as_i64().unwrap();
        assert_counts(&h, &op, "mail", &[("waiting", 2), ("active", 1)]).await;

        // Heartbeat and progress.
        let (status, answer) = report(
            &h,
            &op,
            a,
            "heartbeat",
            json!({"lease": lease_a, "lease_ms": 60_000}),
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{answer}");
        let (status, answer) = report(
            &h,
            &op,
            a,
            "progress",
            json!({"lease": lease_a, "progress": {"pct": 50}}),
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{answer}");
        let seen = job(&h, &op, a).await;
        assert_eq!(seen["job"]["state"], "active");
        assert_eq!(seen["job"]["progress"], json!({"pct": 50}));
        assert_eq!(seen["job"]["worker"], format!("user:{}", me["id"]));
        assert!(seen["job"]["lease_until_ms"].as_i64().unwrap() > until);
        assert!(seen["job"].get("lease").is_none(), "{seen}");

        // Complete it with a result.
        let (status, answer) = report(
            &h,
            &op,
            a,
            "complete",
            json!({"lease": lease_a, "result": {"sent": true}}),
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{answer}");
        assert_counts(&h, &op, "mail", &[("waiting", 2), ("completed", 1)]).await;
        let seen = job(&h, &op, a).await;
        assert_eq!(seen["job"]["state"], "completed");
        assert_eq!(seen["job"]["result"], json!({"sent": true}));
        assert_eq!(seen["failures"], json!([]));

        // Fetch the other two, in priority order, and fail both.
        let claimed = fetch(&h, &op, "mail", json!({"max_jobs": 5})).await;
        assert_eq!(
            claimed
                .iter()
                .map(|j| j["id"].as_i64().unwrap())
                .collect::<Vec<_>>(),
            vec![b, c]
        );
        let lease_b = claimed[0]["lease"].as_i64().unwrap();
        let lease_c = claimed[1]["lease"].as_i64().unwrap();
        assert_counts(&h, &op, "mail", &[("active", 2), ("completed", 1)]).await;
        let network =
            |lease: i64| json!({"lease": lease, "category": "network", "message": "smtp down"});
        let (status, answer) = report(&h, &op, c, "fail", network(lease_c)).await;
        assert_eq!(
            (status, &answer),
            (StatusCode::OK, &json!({"will_retry": true}))
        );
        // C waits out its backoff of a minute.
        assert_counts(
            &h,
            &op,
            "mail",
            &[("active", 1), ("delayed", 1), ("completed", 1)],
        )
        .await;
        // B had one attempt: it dies.
        let (status, answer) = report(&h, &op, b, "fail", network(lease_b)).await;
        assert_eq!(
            (status, &answer),
            (StatusCode::OK, &json!({"will_retry": false}))
        );
        assert_counts(
            &h,
            &op,
            "mail",
            &[("delayed", 1), ("completed", 1), ("dead", 1)],
        )
        .await;

        // The dead-letter queue, searched by what the filter supports.
        let dead = list(&h, &op, "/api/v1/queues/mail/dead").await;
        assert_eq!(ids(&dead), vec![b]);
        assert_eq!(dead[0]["state"], "dead");
        assert_eq!(dead[0]["error_category"], "network");
        assert_eq!(dead[0]["error"], "smtp down");
        assert_eq!(dead[0]["strategy"], "retry_later");
        let future = dead[0]["finished_ms"].as_i64().unwrap() + 1;
        for (query, expected) in [
            ("?category=network", vec![b]),
            ("?category=validation", vec![]),
            ("?text=smtp", vec![b]),
            ("?text=send", vec![b]),
            ("?text=nothing", vec![]),
            (&format!("?since_ms={future}") as &str, vec![]),
            ("?limit=1", vec![b]),
        ] {
            let found = list(&h, &op, &format!("/api/v1/queues/mail/dead{query}")).await;
            assert_eq!(ids(&found), expected, "{query}");
        }
        // The summary counts both failed attempts (C's retried one too).
        let summary = list(&h, &op, "/api/v1/failures/summary").await;
        let failures: u64 = summary
            .as_array()
            .unwrap()
            .iter()
            .filter(|bucket| bucket["category"] == "network" && bucket["message"] == "smtp down")
            .map(|bucket| bucket["failures"].as_u64().unwrap())
            .sum();
        assert_eq!(failures, 2, "{summary}");
        let seen = job(&h, &op, b).await;
        assert_eq!(seen["job"]["state"], "dead");
        assert_eq!(
            seen["failures"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| (
                    f["attempt"].clone(),
                    f["category"].clone(),
                    f["message"].clone()
                ))
                .collect::<Vec<_>>(),
            vec![(json!(1), json!("network"), json!("smtp down"))]
        );

        // Re-drive B: waiting again with fresh attempts, then fetched again.
        h.expect(
            StatusCode::NO_CONTENT,
            Method::POST,
            &format!("/api/v1/jobs/{b}/retry"),
            Some(&op),
            None,
        )
        .await;
        assert_counts(
            &h,
            &op,
            "mail",
            &[("waiting", 1), ("delayed", 1), ("completed", 1)],
        )
        .await;
        assert_eq!(job(&h, &op, b).await["job"]["attempts"], 0);
        let claimed = fetch(&h, &op, "mail", json!({"max_jobs": 5})).await;
        assert_eq!(ids(&Value::Array(claimed.clone())), vec![b]);
        assert_eq!(claimed[0]["attempt"], 1);
        let lease_b2 = claimed[0]["lease"].as_i64().unwrap();
        assert!(lease_b2 > lease_b);
        assert_counts(
            &h,
            &op,
            "mail",
            &[("active", 1), ("delayed", 1), ("completed", 1)],
        )
        .await;
        // It fails again, as validation this time, and is discarded.
        let (status, answer) = report(
            &h,
            &op,
            b,
            "fail",
            json!({"lease": lease_b2, "category": "validation", "message": "bad address"}),
        )
        .await;
        assert_eq!(
            (status, &answer),
            (StatusCode::OK, &json!({"will_retry": false}))
        );
        let seen = job(&h, &op, b).await;
        assert_eq!(seen["job"]["strategy"], "manual_review");
        assert_eq!(seen["failures"].as_array().unwrap().len(), 2);
        assert_eq!(seen["failures"][1]["category"], "validation");
        h.expect(
            StatusCode::NO_CONTENT,
            Method::POST,
            &format!("/api/v1/jobs/{b}/discard"),
            Some(&op),
            None,
        )
        .await;
        assert_counts(
            &h,
            &op,
            "mail",
            &[("delayed", 1), ("completed", 1), ("discarded", 1)],
        )
        .await;
        assert_eq!(
            ids(&list(&h, &op, "/api/v1/queues/mail/dead").await),
            Vec::<i64>::new()
        );

        // Jobs by state.
        for (state, expected) in [
            ("", vec![c]),
            ("?state=waiting", vec![c]),
            ("?state=completed", vec![a]),
            ("?state=discarded", vec![b]),
            ("?state=active", vec![]),
        ] {
            let found = list(&h, &op, &format!("/api/v1/queues/mail/jobs{state}")).await;
            assert_eq!(ids(&found), expected, "{state}");
        }
        let page = list(
            &h,
            &op,
            &format!("/api/v1/queues/mail/jobs?state=completed&after={a}"),
        )
        .await;
        assert_eq!(ids(&page), Vec::<i64>::new());

        // Re-driving or discarding a job in the wrong state (422, the queue's form for a
        // discard), or one that does not exist (404).
        let wrong_state = [(b, "discard"), (a, "retry"), (a, "discard")];
        for (id, what) in wrong_state {
            let path = format!("/api/v1/jobs/{id}/{what}");
            let answer = h.call(Method::POST, &path, Some(&op), None).await;
            let invalid = StatusCode::UNPROCESSABLE_ENTITY;
            assert_refused(&answer, invalid, "INVALID_FIELD", Some("id"), &path);
        }
        for what in ["retry", "discard"] {
            let path = format!("/api/v1/jobs/999999/{what}");
            let answer = h.call(Method::POST, &path, Some(&op), None).await;
            let missing = StatusCode::NOT_FOUND;
            assert_refused(&answer, missing, "UNKNOWN_JOB", Some("id"), &path);
        }
        let (status, answer) = h
            .call(Method::GET, "/api/v1/jobs/999999", Some(&op), None)
            .await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("UNKNOWN_JOB"))
        );
        assert_counts(
            &h,
            &op,
            "mail",
            &[("delayed", 1), ("completed", 1), ("discarded", 1)],
        )
        .await;
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_under_a_stale_lease_is_refused_and_changes_nothing() {
    for h in harnesses("queue_stale").await {
        let admin = h.admin().await;
        let op = operator(&h, &admin, "olga").await;
        declare(&h, &op, "mail").await;
        let id = add(&h, &op, "mail", json!({"type": "send"})).await;
        let first = fetch(&h, &op, "mail", json!({})).await;
        let stale = first[0]["lease"].as_i64().unwrap();
        // Given back, the job is claimed again under a new lease; the release did not count
        // the attempt.
        let (status, answer) = report(&h, &op, id, "release", json!({"lease": stale})).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{answer}");
        assert_counts(&h, &op, "mail", &[("waiting", 1)]).await;
        let second = fetch(&h, &op, "mail", json!({})).await;
        let lease = second[0]["lease"].as_i64().unwrap();
        assert_ne!(lease, stale);
        assert_eq!(second[0]["attempt"], 1);
        let before = job(&h, &op, id).await;

        for (what, body) in [
            ("heartbeat", json!({"lease": stale})),
            ("progress", json!({"lease": stale, "progress": "late"})),
            ("complete", json!({"lease": stale, "result": "late"})),
            (
                "fail",
                json!({"lease": stale, "category": "unknown", "message": "late"}),
            ),
            ("release", json!({"lease": stale})),
        ] {
            let (status, answer) = report(&h, &op, id, what, body).await;
            assert_eq!(status, StatusCode::CONFLICT, "{what}: {answer}");
            assert_eq!(answer["error"]["code"], "LEASE_LOST", "{what}");
            assert_eq!(answer["error"]["field"], "lease", "{what}");
        }
        // Nothing changed: still active under the new lease, no progress, no failure.
        assert_eq!(job(&h, &op, id).await, before);
        assert_eq!(before["job"]["state"], "active");
        assert_eq!(before["job"]["progress"], Value::Null);
        assert_eq!(before["failures"], json!([]));
        assert_counts(&h, &op, "mail", &[("active", 1)]).await;

        // The current lease completes it, once.
        let (status, _) = report(
            &h,
            &op,
            id,
            "complete",
            json!({"lease": lease, "result": 1}),
        )
        .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        for (what, body) in [
            ("complete", json!({"lease": lease, "result": 2})),
            (
                "fail",
                json!({"lease": lease, "category": "unknown", "message": "late"}),
            ),
        ] {
            let (status, answer) = report(&h, &op, id, what, body).await;
            assert_eq!(
                (status, answer["error"]["code"].as_str()),
                (StatusCode::CONFLICT, Some("LEASE_LOST")),
                "{what}: {answer}"
            );
        }
        let done = job(&h, &op, id).await;
        assert_eq!(done["job"]["state"], "completed");
        assert_eq!(done["job"]["result"], 1);
        assert_eq!(done["failures"], json!([]));
        assert_counts(&h, &op, "mail", &[("completed", 1)]).await;

        // Reports on a job that does not exist.
        for (what, body) in [
            ("heartbeat", json!({"lease": 1})),
            ("progress", json!({"lease": 1, "progress": 1})),
            ("complete", json!({"lease": 1})),
            (
                "fail",
                json!({"lease": 1, "category": "network", "message": "x"}),
            ),
            ("release", json!({"lease": 1})),
        ] {
            let (status, answer) = report(&h, &op, 999_999, what, body).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{what}: {answer}");
            assert_eq!(answer["error"]["code"], "UNKNOWN_JOB", "{what}");
        }
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_stops_fetch_from_giving_jobs_and_resume_restores_it() {
    for h in harnesses("queue_pause").await {
        let admin = h.admin().await;
        let op = operator(&h, &admin, "olga").await;
        declare(&h, &op, "mail").await;
        for _ in 0..2 {
            add(&h, &op, "mail", json!({"type": "send"})).await;
        }
        h.expect(
            StatusCode::NO_CONTENT,
            Method::POST,
            "/api/v1/queues/mail/pause",
            Some(&op),
            None,
        )
        .await;
        let queues = list(&h, &op, "/api/v1/queues").await;
        assert_eq!(queues[0]["paused"], true, "{queues}");
        let fetched = h
            .expect(
                StatusCode::OK,
                Method::POST,
                "/api/v1/queues/mail/fetch",
                Some(&op),
                Some(json!({"max_jobs": 5})),
            )
            .await;
        assert_eq!(fetched, json!({"jobs": [], "paused": true}));
        assert_counts(&h, &op, "mail", &[("waiting", 2)]).await;
        // Adding to a paused queue still works.
        add(&h, &op, "mail", json!({"type": "send"})).await;
        assert_counts(&h, &op, "mail", &[("waiting", 3)]).await;

        h.expect(
            StatusCode::NO_CONTENT,
            Method::POST,
            "/api/v1/queues/mail/resume",
            Some(&op),
            None,
        )
        .await;
        assert_eq!(list(&h, &op, "/api/v1/queues").await[0]["paused"], false);
        let fetched = h
            .expect(
                StatusCode::OK,
                Method::POST,
                "/api/v1/queues/mail/fetch",
                Some(&op),
                Some(json!({"max_jobs": 5})),
            )
            .await;
        assert_eq!(fetched["jobs"].as_array().unwrap().len(), 3);
        assert_eq!(fetched["paused"], false);
        assert_counts(&h, &op, "mail", &[("active", 3)]).await;
        // An empty, running queue answers no jobs and not paused.
        let fetched = h
            .expect(
                StatusCode::OK,
                Method::POST,
                "/api/v1/queues/mail/fetch",
                Some(&op),
                Some(json!({})),
            )
            .await;
        assert_eq!(fetched, json!({"jobs": [], "paused": false}));

        for what in ["pause", "resume"] {
            let (status, answer) = h
                .call(
                    Method::POST,
                    &format!("/api/v1/queues/nowhere/{what}"),
                    Some(&op),
                    None,
                )
                .await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{what}: {answer}");
            assert_eq!(answer["error"]["code"], "UNKNOWN_QUEUE");
            assert_eq!(answer["error"]["field"], "queue");
        }
        h.stop().await;
    }
}

/// Asserts an error answer's status, code and field.
fn assert_refused(
    answer: &(StatusCode, Value),
    status: StatusCode,
    code: &str,
    field: Option<&str>,
    what: &str,
) {
    let (got, body) = answer;
    assert_eq!(*got, status, "{what}: {body}");
    assert_eq!(body["error"]["code"], code, "{what}: {body}");
    assert_eq!(body["error"]["field"].as_str(), field, "{what}: {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_4xx_with_the_field_named_and_adds_nothing() {
    const DAY_MS: i64 = 86_400_000;
    for h in harnesses("queue_bad_input").await {
        let admin = h.admin().await;
        let op = operator(&h, &admin, "olga").await;
        declare(&h, &op, "mail").await;
        let send = |extra: Value| {
            let mut body = json!({"type": "send", "payload": {"to": "a"}});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            body
        };
        let add_to = |queue: &str, body: Value| {
            let path = format!("/api/v1/queues/{queue}/jobs");
            let h = &h;
            let op = &op;
            async move { h.call(Method::POST, &path, Some(op), Some(body)).await }
        };
        let answer = add_to("nowhere", send(json!({}))).await;
        assert_refused(
            &answer,
            StatusCode::NOT_FOUND,
            "UNKNOWN_QUEUE",
            Some("queue"),
            "unknown queue",
        );

        // Options out of their range are refused by the queue, values of the wrong type by the
        // body extractor; both 422 with the field, as is an unknown field.
        let cases: Vec<(Value, Option<&str>)> = vec![
            (json!({"priority": -1}), Some("priority")),
            (json!({"priority": 1_000_001}), Some("priority")),
            (json!({"priority": 1e12}), Some("priority")),
            (json!({"delay_ms": -5}), Some("delay_ms")),
            (json!({"delay_ms": 400 * DAY_MS}), Some("delay_ms")),
            (json!({"run_at_ms": -1}), Some("run_at_ms")),
            (json!({"attempts": 0}), Some("attempts")),
            (json!({"attempts": -1}), Some("attempts")),
            (json!({"attempts": 1001}), Some("attempts")),
            (json!({"timeout_ms": 0}), Some("timeout_ms")),
            (json!({"jitter_pct": 101}), Some("jitter_pct")),
            (
                json!({"backoff": {"type": "exponential", "base_ms": 10, "max_ms": 5}}),
                Some("backoff.max_ms"),
            ),
            (
                json!({"backoff": {"type": "fixed", "delay_ms": 8 * DAY_MS}}),
                Some("backoff"),
            ),
            (json!({"backoff": {"type": "linear"}}), Some("backoff.type")),
            (
                json!({"dedup": {"key": "", "ttl_ms": 1000}}),
                Some("dedup.key"),
            ),
            (
                json!({"dedup": {"key": "k", "ttl_ms": 0}}),
                Some("dedup.ttl_ms"),
            ),
            (
                json!({"dedup": {"key": "k", "ttl_ms": 1, "colour": 1}}),
                Some("dedup.colour"),
            ),
            (
                json!({"retention": {"completed_for_ms": 400 * DAY_MS}}),
                Some("retention.completed_for_ms"),
            ),
            (json!({"parent": 999_999}), Some("parent")),
            (json!({"type": "bad type!"}), Some("type")),
            (json!({"type": 5}), Some("type")),
            (json!({"colour": "red"}), Some("colour")),
        ];
        for (extra, field) in cases {
            let answer = add_to("mail", send(extra.clone())).await;
            let what = format!("{} {extra}", h.backend);
            assert_refused(
                &answer,
                StatusCode::UNPROCESSABLE_ENTITY,
                "INVALID_FIELD",
                field,
                &what,
            );
        }
        // A missing field is named in the message only: the body extractor names no field
        // for the body as a whole.
        let answer = add_to("mail", json!({"payload": 1})).await;
        let invalid = StatusCode::UNPROCESSABLE_ENTITY;
        assert_refused(&answer, invalid, "INVALID_FIELD", None, "no type");
        assert!(
            answer.1["error"]["message"]
                .as_str()
                .unwrap()
                .contains("type"),
            "{}",
            answer.1
        );
        // A body over the server's limit (64 KiB) is refused before it is read.
        let answer = add_to("mail", send(json!({"payload": "x".repeat(100_000)}))).await;
        assert_refused(
            &answer,
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            None,
            "payload",
        );

        // The other routes' parameters, each refused with 422 and its field.
        let answer = h
            .call(Method::PUT, "/api/v1/queues/bad%20name!", Some(&op), None)
            .await;
        assert_refused(&answer, invalid, "INVALID_FIELD", Some("queue"), "declare");
        let fetches: Vec<(Value, &str)> = vec![
            (json!({"max_jobs": 0}), "max_jobs"),
            (json!({"max_jobs": 1001}), "max_jobs"),
            (json!({"lease_ms": 10}), "lease_ms"),
            (json!({"lease_ms": -1}), "lease_ms"),
            (json!({"worker": "bad worker!"}), "worker"),
        ];
        for (body, field) in fetches {
            let path = "/api/v1/queues/mail/fetch";
            let answer = h
                .call(Method::POST, path, Some(&op), Some(body.clone()))
                .await;
            let what = format!("{} fetch {body}", h.backend);
            assert_refused(&answer, invalid, "INVALID_FIELD", Some(field), &what);
        }
        let reports: Vec<(&str, Value, &str)> = vec![
            ("heartbeat", json!({"lease": 1, "lease_ms": 10}), "lease_ms"),
            ("heartbeat", json!({"lease": "one"}), "lease"),
            (
                "fail",
                json!({"lease": 1, "category": "meteor", "message": "x"}),
                "category",
            ),
            (
                "fail",
                json!({"lease": 1, "category": "network", "message": "x", "strategy": "pray"}),
                "strategy",
            ),
        ];
        for (what, body, field) in reports {
            let answer = report(&h, &op, 1, what, body.clone()).await;
            let what = format!("{} {what} {body}", h.backend);
            assert_refused(&answer, invalid, "INVALID_FIELD", Some(field), &what);
        }
        let long_text = format!("/api/v1/queues/mail/dead?text={}", "x".repeat(300));
        let reads: Vec<(&str, &str)> = vec![
            ("/api/v1/queues/mail/jobs?state=lost", "state"),
            ("/api/v1/queues/mail/jobs?limit=0", "limit"),
            ("/api/v1/queues/mail/dead?category=meteor", "category"),
            ("/api/v1/queues/mail/dead?limit=1001", "limit"),
            (&long_text, "text"),
            ("/api/v1/failures/summary?window_ms=0", "window_ms"),
        ];
        for (path, field) in reads {
            let answer = h.call(Method::GET, path, Some(&op), None).await;
            let what = format!("{} {path}", h.backend);
            assert_refused(&answer, invalid, "INVALID_FIELD", Some(field), &what);
        }
        let unknown = ["/api/v1/queues/nowhere/jobs", "/api/v1/queues/nowhere/dead"];
        for path in unknown {
            let answer = h.call(Method::GET, path, Some(&op), None).await;
            assert_refused(
                &answer,
                StatusCode::NOT_FOUND,
                "UNKNOWN_QUEUE",
                Some("queue"),
                path,
            );
        }
        let path = "/api/v1/queues/nowhere/fetch";
        let answer = h.call(Method::POST, path, Some(&op), Some(json!({}))).await;
        assert_refused(
            &answer,
            StatusCode::NOT_FOUND,
            "UNKNOWN_QUEUE",
            Some("queue"),
            path,
        );
        // Nothing was added, declared or claimed by any of them.
        assert_counts(&h, &op, "mail", &[]).await;
        let queues = list(&h, &op, "/api/v1/queues").await;
        assert_eq!(queues.as_array().unwrap().len(), 1, "{queues}");
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queues_own_payload_bound_is_422_when_the_body_limit_is_above_it() {
    let h = Harness::start("sqlite", None, None, |config| {
        config.limits.body_bytes_max = 1 << 20;
    })
    .await;
    let admin = h.admin().await;
    let op = operator(&h, &admin, "olga").await;
    declare(&h, &op, "mail").await;
    // Over the default body limit but within the queue's 256 KiB: added.
    add(
        &h,
        &op,
        "mail",
        json!({"type": "send", "payload": "x".repeat(200_000)}),
    )
    .await;
    let (status, answer) = h
        .call(
            Method::POST,
            "/api/v1/queues/mail/jobs",
            Some(&op),
            Some(json!({"type": "send", "payload": "x".repeat(300_000)})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["error"]["code"], "INVALID_FIELD");
    assert_eq!(answer["error"]["field"], "payload");
    assert_counts(&h, &op, "mail", &[("waiting", 1)]).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_add_answers_the_holder_with_200() {
    for h in harnesses("queue_dedup").await {
        let admin = h.admin().await;
        let op = operator(&h, &admin, "olga").await;
        declare(&h, &op, "mail").await;
        let body = json!({"type": "send", "dedup": {"key": "order-1", "ttl_ms": 60_000}});
        let id = add(&h, &op, "mail", body.clone()).await;
        let again = h
            .expect(
                StatusCode::OK,
                Method::POST,
                "/api/v1/queues/mail/jobs",
                Some(&op),
                Some(body),
            )
            .await;
        assert_eq!(again, json!({"id": id, "duplicate": true}));
        assert_counts(&h, &op, "mail", &[("waiting", 1)]).await;
        assert_eq!(job(&h, &op, id).await["job"]["dedup_key"], "order-1");
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_worker_stopped_reporting_is_recovered_by_a_later_fetch() {
    for h in harnesses("queue_stalled").await {
        let admin = h.admin().await;
        let op = operator(&h, &admin, "olga").await;
        declare(&h, &op, "mail").await;
        let id = add(&h, &op, "mail", json!({"type": "send", "attempts": 1})).await;
        let claimed = fetch(&h, &op, "mail", json!({"lease_ms": 100})).await;
        let lease = claimed[0]["lease"].as_i64().unwrap();
        // The worker goes silent past its lease and the sweep's interval.
        tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
        assert!(fetch(&h, &op, "mail", json!({})).await.is_empty());
        // The sweep runs beside the fetch.
        let mut seen = job(&h, &op, id).await;
        for _ in 0..50 {
            if seen["job"]["state"] == "dead" {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            seen = job(&h, &op, id).await;
        }
        assert_eq!(seen["job"]["state"], "dead", "{seen}");
        assert_eq!(seen["failures"][0]["category"], "timeout");
        assert_counts(&h, &op, "mail", &[("dead", 1)]).await;
        // The silent worker's late report changes nothing.
        let (status, answer) = report(&h, &op, id, "complete", json!({"lease": lease})).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (StatusCode::CONFLICT, Some("LEASE_LOST"))
        );
        assert_counts(&h, &op, "mail", &[("dead", 1)]).await;
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_under_a_lease_from_before_a_restart_is_recorded() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_path_buf();
    let start = || {
        let dir = dir.clone();
        Harness::start("sqlite", None, None, move |config| {
            config.data_dir = dir;
        })
    };
    let h = start().await;
    let admin = h.admin().await;
    let op = operator(&h, &admin, "olga").await;
    declare(&h, &op, "mail").await;
    let id = add(&h, &op, "mail", json!({"type": "send"})).await;
    let lease = fetch(&h, &op, "mail", json!({})).await[0]["lease"]
        .as_i64()
        .unwrap();
    h.stop().await;

    let h = start().await;
    let op = h.login("olga", "olga-password").await;
    let (status, answer) = report(
        &h,
        &op,
        id,
        "fail",
        json!({"lease": lease, "category": "network", "message": "x"}),
    )
    .await;
    // The claim is read back from the store: the new server records the failure.
    assert_eq!(status, StatusCode::OK, "{answer}");
    let seen = job(&h, &op, id).await;
    assert_eq!(seen["failures"].as_array().unwrap().len(), 1, "{seen}");
    assert_eq!(seen["failures"][0]["category"], "network");
    // The lease is spent: a second report under it is refused.
    let (status, answer) = report(&h, &op, id, "complete", json!({"lease": lease})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert_eq!(answer["error"]["code"], "LEASE_LOST");
    h.stop().await;
}

/// A request signed with an API key, as a worker in another language sends it.
async fn signed(
    h: &Harness,
    path: &str,
    key: &str,
    secret: &str,
    body: Value,
) -> (StatusCode, Value) {
    let bytes = body.to_string();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string();
    let signature = server::auth::sign(secret, &stamp, "POST", path, bytes.as_bytes());
    let response = h
        .client
        .post(format!("{}{path}", h.base))
        .header("x-agora-key", key)
        .header("x-agora-timestamp", &stamp)
        .header("x-agora-signature", signature)
        .header("content-type", "application/json")
        .body(bytes)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_signing_with_an_api_key_fetches_and_reports() {
    for h in harnesses("queue_signed").await {
        let admin = h.admin().await;
        let op = operator(&h, &admin, "olga").await;
        declare(&h, &op, "mail").await;
        let id = add(&h, &op, "mail", json!({"type": "send", "payload": [1, 2]})).await;
        let key = h
            .expect(
                StatusCode::CREATED,
                Method::POST,
                "/api/v1/api-keys",
                Some(&op),
                Some(json!({"label": "worker"})),
            )
            .await;
        let (key_id, secret) = (
            key["key_id"].as_str().unwrap(),
            key["secret"].as_str().unwrap(),
        );
        let (status, fetched) = signed(
            &h,
            "/api/v1/queues/mail/fetch",
            key_id,
            secret,
            json!({"max_jobs": 10, "worker": "py-worker-1"}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{fetched}");
        assert_eq!(fetched["jobs"][0]["id"], id);
        assert_eq!(fetched["jobs"][0]["payload"], json!([1, 2]));
        let lease = fetched["jobs"][0]["lease"].as_i64().unwrap();
        assert_eq!(job(&h, &op, id).await["job"]["worker"], "py-worker-1");
        let (status, answer) = signed(
            &h,
            &format!("/api/v1/jobs/{id}/fail"),
            key_id,
            secret,
            json!({"lease": lease, "category": "rate_limit", "message": "429 from upstream"}),
        )
        .await;
        assert_eq!(
            (status, &answer),
            (StatusCode::OK, &json!({"will_retry": true}))
        );
        // Retried after the default backoff of a second.
        assert_counts(&h, &op, "mail", &[("delayed", 1)]).await;
        h.stop().await;
    }
}
