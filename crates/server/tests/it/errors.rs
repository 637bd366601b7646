//! Every error path answers with the error body and the right status, and changes nothing.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::{Harness, balance, harnesses};

async fn raw(
    h: &Harness,
    path: &str,
    token: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let mut request = h
        .client
        .post(format!("{}{path}", h.base))
        .bearer_auth(token)
        .body(body);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_4xx_with_the_field_named() {
    for h in harnesses("errors").await {
        let admin = h.admin().await;
        h.market(&admin).await;
        let (alice, token) = h.user(&admin, "alice").await;
        h.deposit(&admin, alice, "BTC", "1").await;
        let order = |extra: Value| {
            let mut body =
                json!({"market": "BTC-USDT", "side": "sell", "price": "100", "qty": "0.5"});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            body
        };
        // (body, status, code, field)
        let cases: Vec<(Value, StatusCode, &str, Option<&str>)> = vec![
            (
                order(json!({"colour": "red"})),
                StatusCode::UNPROCESSABLE_ENTITY,
                "INVALID_FIELD",
                None,
            ),
            (
                order(json!({"side": "up"})),
                StatusCode::UNPROCESSABLE_ENTITY,
                "INVALID_FIELD",
                Some("side"),
            ),
            (
                order(json!({"qty": 5})),
                StatusCode::UNPROCESSABLE_ENTITY,
                "INVALID_FIELD",
                Some("qty"),
            ),
            (
                order(json!({"qty": "-1"})),
                StatusCode::UNPROCESSABLE_ENTITY,
                "INVALID_DECIMAL",
                Some("qty"),
            ),
            (
                order(json!({"qty": "0.00001"})),
                StatusCode::UNPROCESSABLE_ENTITY,
                "BAD_LOT",
                Some("qty"),
            ),
            (
                order(json!({"price": "1.001"})),
                StatusCode::UNPROCESSABLE_ENTITY,
                "BAD_TICK",
                Some("price"),
            ),
            (
                order(json!({"price": "99999999999999999999"})),
                StatusCode::UNPROCESSABLE_ENTITY,
                "INVALID_PRICE",
                Some("price"),
            ),
            (
                order(json!({"min_reputation": -1})),
                StatusCode::UNPROCESSABLE_ENTITY,
                "INVALID_FIELD",
                Some("min_reputation"),
            ),
            (
                order(json!({"min_reputation": 1e40})),
                StatusCode::UNPROCESSABLE_ENTITY,
                "INVALID_FIELD",
                Some("min_reputation"),
            ),
            (
                order(json!({"qty": "5"})),
                StatusCode::UNPROCESSABLE_ENTITY,
                "INSUFFICIENT_FUNDS",
                None,
            ),
            (
                order(json!({"market": "ETH-USDT"})),
                StatusCode::NOT_FOUND,
                "UNKNOWN_MARKET",
                Some("market"),
            ),
            (
                order(json!({"qty": "0"})),
                StatusCode::UNPROCESSABLE_ENTITY,
                "INVALID_QUANTITY",
                Some("qty"),
            ),
        ];
        for (body, status, code, field) in cases {
            let (got, answer) = h
                .call(
                    Method::POST,
                    "/api/v1/orders",
                    Some(&token),
                    Some(body.clone()),
                )
                .await;
            assert_eq!(got, status, "{} {body}: {answer}", h.backend);
            assert_eq!(answer["error"]["code"], code, "{body}: {answer}");
            if let Some(field) = field {
                assert_eq!(answer["error"]["field"], field, "{body}: {answer}");
            }
            assert!(
                answer["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
            );
        }
        // Nothing was held by any of them.
        assert_eq!(
            balance(&h, &token, "BTC").await,
            ("1.00000000".into(), "0.00000000".into())
        );

        let (status, answer) = raw(
            &h,
            "/api/v1/orders",
            &token,
            Some("application/json"),
            b"{\"market\":".to_vec(),
        )
        .await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("MALFORMED_JSON"))
        );
        let (status, answer) = raw(
            &h,
            "/api/v1/orders",
            &token,
            Some("application/json"),
            b"[1,2]".to_vec(),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
        let (status, answer) = raw(&h, "/api/v1/orders", &token, None, b"{}".to_vec()).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                Some("UNSUPPORTED_MEDIA_TYPE")
            )
        );
        let huge = format!("{{\"market\":\"{}\"}}", "x".repeat(200_000));
        let (status, answer) = raw(
            &h,
            "/api/v1/orders",
            &token,
            Some("application/json"),
            huge.clone().into_bytes(),
        )
        .await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (StatusCode::PAYLOAD_TOO_LARGE, Some("PAYLOAD_TOO_LARGE"))
        );
        // The rest of such a body is never read, so the answer closes the connection; a
        // client that reused it would lose its next request's answer.
        let response = h
            .client
            .post(format!("{}/api/v1/orders", h.base))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(huge)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            response.headers().get("connection").map(|v| v.as_bytes()),
            Some(&b"close"[..])
        );

        // 401, 403, 404, 409.
        let (status, answer) = h.call(Method::GET, "/api/v1/balances", None, None).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("UNAUTHORIZED"))
        );
        let (status, answer) = h
            .call(
                Method::POST,
                "/api/v1/admin/assets",
                Some(&token),
                Some(json!({"symbol": "ETH", "decimals": 8})),
            )
            .await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (StatusCode::FORBIDDEN, Some("FORBIDDEN"))
        );
        let (status, _) = h
            .call(Method::GET, "/api/v1/orders/987654", Some(&token), None)
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, answer) = h.call(Method::GET, "/api/v1/nowhere", None, None).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("NOT_FOUND"))
        );
        let (status, answer) = h
            .call(
                Method::POST,
                "/api/v1/admin/users",
                Some(&admin),
                Some(json!({"username": "alice", "password": "another-password"})),
            )
            .await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (StatusCode::CONFLICT, Some("USERNAME_TAKEN"))
        );
        let (status, answer) = h
            .call(
                Method::POST,
                "/api/v1/admin/assets",
                Some(&admin),
                Some(json!({"symbol": "BTC", "decimals": 8})),
            )
            .await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (StatusCode::CONFLICT, Some("ASSET_EXISTS"))
        );
        let (status, answer) = h
            .call(
                Method::GET,
                "/api/v1/markets/BTC-USDT/depth?levels=0",
                None,
                None,
            )
            .await;
        assert_eq!(
            (status, answer["error"]["field"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("levels"))
        );
        // The framework's own refusals get the error body too.
        for (method, path) in [
            (Method::GET, "/api/v1/markets/BTC-USDT/depth?levels=abc"),
            (Method::GET, "/api/v1/orders/not-a-number"),
            (Method::PUT, "/api/v1/orders"),
        ] {
            let (status, answer) = h.call(method.clone(), path, Some(&token), None).await;
            assert!(
                status.is_client_error(),
                "{method} {path}: {status} {answer}"
            );
            assert!(
                answer["error"]["code"].is_string(),
                "{method} {path}: {answer}"
            );
        }
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_answer() {
    for h in harnesses("health").await {
        let live = h
            .expect(StatusCode::OK, Method::GET, "/health/live", None, None)
            .await;
        assert_eq!(live["status"], "ok");
        let ready = h
            .expect(StatusCode::OK, Method::GET, "/health/ready", None, None)
            .await;
        assert_eq!(ready["components"]["sequencer"], "ok", "{ready}");
        assert_eq!(ready["components"]["store"], "ok");
        let response = h
            .client
            .get(format!("{}/metrics", h.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let text = response.text().await.unwrap();
        assert!(text.contains("agora_http_requests_total"), "{text}");
        assert!(text.contains("route=\"/health/ready\""), "{text}");
        // A request id is echoed, or made up when absent.
        let response = h
            .client
            .get(format!("{}/health/live", h.base))
            .header("x-request-id", "test-123")
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["x-request-id"], "test-123");
        // Every request is counted under its route, method and status; a method made up by
        // the client is counted as `other`, so it cannot add series. (The metrics are the
        // process's: the counts are compared before and after, as another harness of this
        // test may have run in the same process.)
        let count = |text: &str, method: &str| {
            text.lines()
                .filter(|l| l.starts_with("agora_http_requests_total{"))
                .filter(|l| l.contains("route=\"/health/live\"") && l.contains(method))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        };
        let before = h.metrics().await;
        let brew = Method::from_bytes(b"BREW").unwrap();
        for _ in 0..3 {
            let response = h
                .client
                .request(brew.clone(), format!("{}/health/live", h.base))
                .send()
                .await
                .unwrap();
            assert!(response.status().is_client_error(), "{}", response.status());
            h.expect(StatusCode::OK, Method::GET, "/health/live", None, None)
                .await;
        }
        let text = h.metrics().await;
        for method in ["method=\"GET\"", "method=\"other\""] {
            assert_eq!(
                count(&text, method) - count(&before, method),
                3.0,
                "{method}: {text}"
            );
        }
        assert!(!text.contains("BREW"), "{text}");
        h.stop().await;
    }
}

/// The value of one series (name and labels exactly as rendered) in Prometheus text.
fn series(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(name) && line[name.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_include_the_cores() {
    // One server at a time: the process has one recorder, so two servers' gauges would mix.
    let h = Harness::start("sqlite", None, None, |_| {}).await;
    let admin = h.admin().await;
    h.market(&admin).await;
    let (_, alice) = h.user(&admin, "alice").await;
    let (status, answer) = h
        .call(
            Method::POST,
            "/api/v1/orders",
            Some(&alice),
            Some(json!({"market": "BTC-USDT", "side": "sell", "price": "100", "qty": "1"})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(answer["error"]["code"], "INSUFFICIENT_FUNDS");
    // The projector writes after the acknowledgement: wait (boundedly) for its first batch.
    let mut text = h.metrics().await;
    for _ in 0..200 {
        if series(&text, "agora_core_projected_seq").is_some_and(|seq| seq > 0.0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        text = h.metrics().await;
    }
    // Three admin commands at least (two assets, a market) were journaled.
    let accepted = series(&text, "agora_core_commands_accepted_total").unwrap_or(0.0);
    assert!(accepted >= 3.0, "{text}");
    let journal_seq = series(&text, "agora_core_journal_seq").unwrap_or(0.0);
    assert!(journal_seq >= 3.0, "{text}");
    assert!(
        series(&text, "agora_core_projected_seq")
            .is_some_and(|seq| seq > 0.0 && seq <= journal_seq),
        "{text}"
    );
    assert_eq!(
        series(
            &text,
            r#"agora_core_commands_rejected_total{code="INSUFFICIENT_FUNDS"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        series(&text, "agora_core_batch_commands_count").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(
        text.contains(r#"agora_core_batch_commands_bucket{le="1"}"#),
        "{text}"
    );
    assert!(
        series(&text, "agora_core_append_seconds_count").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(
        series(&text, "agora_core_projection_write_seconds_count").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert_eq!(series(&text, "agora_core_stopped"), Some(0.0), "{text}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_with_503_not_queued() {
    let h = Harness::start("sqlite", None, None, |config| {
        config.limits.requests_in_flight_max = 1;
    })
    .await;
    // Logins hash a password on purpose (tens of milliseconds at least), so twelve sent at once
    // overlap and all but the first in flight find the server at capacity.
    let body = json!({"username": "admin", "password": crate::ADMIN_PASSWORD});
    let sends = (0..12).map(|_| {
        h.client
            .post(format!("{}/api/v1/auth/login", h.base))
            .json(&body)
            .send()
    });
    let mut served = 0;
    let mut shed = 0;
    for response in futures_join(sends).await {
        let response = response.unwrap();
        match response.status() {
            StatusCode::OK => served += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(response.headers()["retry-after"], "1");
                let answer: Value = response.json().await.unwrap();
                assert_eq!(answer["error"]["code"], "OVERLOADED", "{answer}");
                shed += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(served >= 1 && shed >= 1, "served {served}, shed {shed}");
    // Once the load is gone the server answers again.
    h.login("admin", crate::ADMIN_PASSWORD).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_its_time_gets_503_and_frees_its_place() {
    use tokio::io::AsyncReadExt;
    // Long enough for a login, whose password hash is slow on purpose.
    let h = Harness::start("sqlite", None, None, |config| {
        config.limits.request_timeout_ms = 3_000;
    })
    .await;
    let admin = h.admin().await;
    let mut socket = stalled_placement(&h, &admin).await;
    let mut answer = vec![0; 4096];
    let read = tokio::time::timeout(std::time::Duration::from_secs(30), socket.read(&mut answer))
        .await
        .expect("the server answers a request that ran out of time")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..read]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("\"TIMEOUT\""), "{answer}");
    assert!(answer.contains("x-request-id: "), "{answer}");
    assert_eq!(in_flight(&h).await, 0);
    h.stop().await;
}

/// A placement whose body never finishes arriving: it stays in flight (admitted, its handler
/// waiting for the body) until the socket is dropped.
async fn stalled_placement(h: &Harness, token: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let address = h.base.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST /api/v1/orders HTTP/1.1\r\nhost: {address}\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"market\""
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket
}

/// Adds one stalled placement and waits until the server counts it in flight. The probe that
/// reads the count is itself a request and may reach the server before the placement's head
/// does; at the placement's own limit the two together exceed it and the placement is shed.
/// Such a placement is sent again, a bounded number of times; any other outcome fails the test.
async fn stall_one_more(h: &Harness, token: &str, stalled: &mut Vec<tokio::net::TcpStream>) {
    use tokio::io::AsyncReadExt;
    const ATTEMPTS: usize = 20;
    let before = stalled.len() as i64;
    for _ in 0..ATTEMPTS {
        let mut socket = stalled_placement(h, token).await;
        let mut seen = 0;
        let mut shed = false;
        for _ in 0..500 {
            seen = in_flight(h).await;
            if seen > before {
                stalled.push(socket);
                return;
            }
            let mut answer = vec![0; 1024];
            let read = tokio::time::timeout(
                std::time::Duration::from_millis(10),
                socket.read(&mut answer),
            )
            .await;
            if let Ok(read) = read {
                let answer = String::from_utf8_lossy(&answer[..read.unwrap()]).into_owned();
                assert!(
                    answer.starts_with("HTTP/1.1 503") && answer.contains("OVERLOADED"),
                    "placement {} answered instead of stalling: {answer}",
                    before + 1
                );
                shed = true;
                break;
            }
        }
        assert!(
            shed,
            "placement {} neither counted nor answered",
            before + 1
        );
        assert_eq!(
            seen,
            before,
            "the count moved while placement {} was shed",
            before + 1
        );
    }
    panic!("placement {} was shed {ATTEMPTS} times", before + 1);
}

/// The requests in flight besides the one asking: the server's
/// `agora_http_requests_in_flight` gauge, less one.
async fn in_flight(h: &Harness) -> i64 {
    let text = h.metrics().await;
    series(&text, "agora_http_requests_in_flight").map_or(0, |v| v as i64 - 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_the_lowest_priority_classes_are_shed_first() {
    let h = Harness::start("sqlite", None, None, |config| {
        config.limits.requests_in_flight_max = 20;
        config.limits.request_timeout_ms = 60_000;
    })
    .await;
    let admin = h.admin().await;
    h.market(&admin).await;
    let status = |method: Method, path: &'static str, body: Option<Value>| {
        let h = &h;
        let admin = admin.clone();
        async move {
            let (status, answer) = h.call(method, path, Some(&admin), body).await;
            if status == StatusCode::SERVICE_UNAVAILABLE {
                assert_eq!(answer["error"]["code"], "OVERLOADED", "{answer}");
            }
            status
        }
    };
    let low = || status(Method::GET, "/api/v1/admin/users", None);
    let normal = || status(Method::GET, "/api/v1/markets", None);
    // Refused by validation when admitted: it changes nothing either way.
    let high = || {
        status(
            Method::POST,
            "/api/v1/orders",
            Some(json!({"market": "BTC-USDT"})),
        )
    };
    let critical = || status(Method::DELETE, "/api/v1/orders/999", None);
    let shed = StatusCode::SERVICE_UNAVAILABLE;

    // Capacity 20: low requests are admitted below 10 in flight, normal below 15, high below
    // 18, cancels (and health, and metrics) up to 20.
    let mut stalled = Vec::new();
    for (target, admitted, refused) in [
        (10, &[1usize, 2, 3][..], &[0usize][..]),
        (15, &[2, 3], &[0, 1]),
        (18, &[3], &[0, 1, 2]),
    ] {
        while stalled.len() < target {
            stall_one_more(&h, &admin, &mut stalled).await;
        }
        assert_eq!(in_flight(&h).await, target as i64);
        for &class in admitted {
            let got = match class {
                1 => normal().await,
                2 => high().await,
                _ => critical().await,
            };
            assert_ne!(got, shed, "class {class} at {target} in flight");
        }
        for &class in refused {
            let got = match class {
                0 => low().await,
                1 => normal().await,
                _ => high().await,
            };
            assert_eq!(got, shed, "class {class} at {target} in flight");
        }
    }
    let (status_now, _) = h.call(Method::GET, "/health/live", None, None).await;
    assert_eq!(status_now, StatusCode::OK);

    // The stalled requests end with their sockets; every class is admitted again.
    drop(stalled);
    for _ in 0..200 {
        if in_flight(&h).await == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(low().await, StatusCode::OK);
    h.stop().await;
}

/// Runs the futures at once and collects their outputs in order.
async fn futures_join<F: std::future::Future + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut outputs = Vec::new();
    for handle in handles {
        outputs.push(handle.await.unwrap());
    }
    outputs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_per_user_and_per_address_answer_429() {
    let h = Harness::start("sqlite", None, None, |config| {
        config.limits.user_requests_per_s = 1;
        config.limits.user_burst = 5;
    })
    .await;
    let admin = h.admin().await;
    let (_, alice) = h.user(&admin, "alice").await;
    let (_, bob) = h.user(&admin, "bob").await;
    let mut statuses = Vec::new();
    for _ in 0..7 {
        let response = h
            .client
            .get(format!("{}/api/v1/balances", h.base))
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap();
        let status = response.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            let wait: u64 = response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=2).contains(&wait), "retry after {wait}");
            let answer: Value = response.json().await.unwrap();
            assert_eq!(answer["error"]["code"], "RATE_LIMITED");
        }
        statuses.push(status);
    }
    // A burst of five, then refusals (one more token may have dripped in meanwhile).
    assert!(
        statuses[..5].iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(statuses[6], StatusCode::TOO_MANY_REQUESTS, "{statuses:?}");
    // Bob has his own bucket, and probes are never limited.
    h.expect(
        StatusCode::OK,
        Method::GET,
        "/api/v1/balances",
        Some(&bob),
        None,
    )
    .await;
    for _ in 0..10 {
        h.expect(StatusCode::OK, Method::GET, "/health/live", None, None)
            .await;
    }
    h.stop().await;

    let h = Harness::start("sqlite", None, None, |config| {
        config.limits.ip_requests_per_s = 1;
        config.limits.ip_burst = 3;
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(h.call(Method::GET, "/api/v1/markets", None, None).await.0);
    }
    assert!(
        statuses[..3].iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(statuses[4], StatusCode::TOO_MANY_REQUESTS, "{statuses:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_counts_only_behind_a_trusted_proxy() {
    // Each answer's status when `forwarded` claims to be the client, five times in a row.
    async fn statuses(h: &Harness, forwarded: &str) -> Vec<StatusCode> {
        let mut statuses = Vec::new();
        for _ in 0..5 {
            let response = h
                .client
                .get(format!("{}/api/v1/markets", h.base))
                .header("x-forwarded-for", forwarded)
                .send()
                .await
                .unwrap();
            statuses.push(response.status());
        }
        statuses
    }
    let limited = |statuses: &[StatusCode]| statuses[4] == StatusCode::TOO_MANY_REQUESTS;
    for trusted in [false, true] {
        let h = Harness::start("sqlite", None, None, |config| {
            config.limits.ip_requests_per_s = 1;
            config.limits.ip_burst = 3;
            if trusted {
                config.limits.trusted_proxies = vec!["127.0.0.0/8".into()];
            }
        })
        .await;
        let first = statuses(&h, "198.51.100.1").await;
        assert!(limited(&first), "{first:?}");
        // Another claimed client: its own bucket behind a trusted proxy; otherwise the
        // header is ignored and the peer's bucket is empty already.
        let second = statuses(&h, "203.0.113.7, 198.51.100.2").await;
        assert_eq!(
            second[0],
            if trusted {
                StatusCode::OK
            } else {
                StatusCode::TOO_MANY_REQUESTS
            },
            "trusted {trusted}: {second:?}"
        );
        assert!(limited(&second), "{second:?}");
        h.stop().await;
    }
    // A proxy entry that is not an address or a network is refused, by name; the
    // environment's list is split at commas.
    let env = |value: &str| [("AGORA_TRUSTED_PROXIES".to_string(), value.to_string())];
    let error = server::Config::load(None, env("10.0.0.1, proxy.internal")).expect_err("refused");
    assert!(
        error.to_string().contains("limits.trusted_proxies")
            && error.to_string().contains("proxy.internal"),
        "{error}"
    );
    let config = server::Config::load(None, env("10.0.0.1, fd00::/8")).unwrap();
    assert_eq!(config.limits.trusted_proxies, ["10.0.0.1", "fd00::/8"]);
}
