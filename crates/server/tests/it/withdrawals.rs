//! Withdrawals over HTTP: requested by a user (funds held), completed or cancelled by an admin,
//! cancelled by their owner; never seen or changed by another user.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::{Harness, balance, harnesses};

/// A harness with BTC and USDT, alice holding 1 BTC and bob nothing; (admin, alice, bob).
async fn funded(h: &Harness) -> (String, String, String) {
    let admin = h.admin().await;
    h.market(&admin).await;
    let (alice, alice_token) = h.user(&admin, "alice").await;
    let (_, bob_token) = h.user(&admin, "bob").await;
    h.deposit(&admin, alice, "BTC", "1").await;
    (admin, alice_token, bob_token)
}

async fn refused(
    h: &Harness,
    method: Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let (status, body) = h.call(method.clone(), path, Some(token), body).await;
    assert!(
        status.is_client_error(),
        "{} {method} {path}: {status} {body}",
        h.backend
    );
    (status, body["error"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawal_holds_funds_until_completed_or_cancelled() {
    for h in harnesses("withdrawals").await {
        let (admin, alice, bob) = funded(&h).await;
        let request = |amount: &str, destination: &str| json!({"asset": "BTC", "amount": amount, "destination": destination});
        let first = h
            .expect(
                StatusCode::CREATED,
                Method::POST,
                "/api/v1/withdrawals",
                Some(&alice),
                Some(request("0.3", "bc1q-alice")),
            )
            .await;
        assert_eq!(
            (
                &first["asset"],
                &first["amount"],
                &first["destination"],
                &first["status"]
            ),
            (
                &json!("BTC"),
                &json!("0.30000000"),
                &json!("bc1q-alice"),
                &json!("pending")
            ),
            "{first}"
        );
        let first_id = first["id"].as_u64().unwrap();
        assert_eq!(
            balance(&h, &alice, "BTC").await,
            ("0.70000000".into(), "0.30000000".into())
        );
        let second = h
            .expect(
                StatusCode::CREATED,
                Method::POST,
                "/api/v1/withdrawals",
                Some(&alice),
                Some(request("0.2", "DE89 3704 0044 0532 0130 00")),
            )
            .await;
        let second_id = second["id"].as_u64().unwrap();
        assert!(second_id > first_id);
        assert_eq!(
            balance(&h, &alice, "BTC").await,
            ("0.50000000".into(), "0.50000000".into())
        );

        // The owner reads them, newest first; the view after a request is what a read shows.
        let listed = h
            .expect(
                StatusCode::OK,
                Method::GET,
                "/api/v1/withdrawals",
                Some(&alice),
                None,
            )
            .await;
        assert_eq!(listed, json!([second.clone(), first.clone()]));
        let one = h
            .expect(
                StatusCode::OK,
                Method::GET,
                &format!("/api/v1/withdrawals/{first_id}"),
                Some(&alice),
                None,
            )
            .await;
        assert_eq!(one, first);
        let page = h
            .expect(
                StatusCode::OK,
                Method::GET,
                &format!("/api/v1/withdrawals?before_id={second_id}&limit=5"),
                Some(&alice),
                None,
            )
            .await;
        assert_eq!(page, json!([first.clone()]));

        // The admin pays the first out: its held funds leave; the owner cancels the second:
        // its funds return.
        let done = h
            .expect(
                StatusCode::OK,
                Method::POST,
                &format!("/api/v1/admin/withdrawals/{first_id}/complete"),
                Some(&admin),
                None,
            )
            .await;
        assert_eq!(done["status"], "completed", "{done}");
        assert!(done["updated_seq"].as_u64() > first["updated_seq"].as_u64());
        let cancelled = h
            .expect(
                StatusCode::OK,
                Method::DELETE,
                &format!("/api/v1/withdrawals/{second_id}"),
                Some(&alice),
                None,
            )
            .await;
        assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
        assert_eq!(
            balance(&h, &alice, "BTC").await,
            ("0.70000000".into(), "0.00000000".into())
        );

        // Ended withdrawals cannot be ended again.
        for (method, path, token) in [
            (
                Method::POST,
                format!("/api/v1/admin/withdrawals/{first_id}/complete"),
                &admin,
            ),
            (
                Method::POST,
                format!("/api/v1/admin/withdrawals/{first_id}/cancel"),
                &admin,
            ),
            (
                Method::POST,
                format!("/api/v1/admin/withdrawals/{second_id}/complete"),
                &admin,
            ),
            (
                Method::DELETE,
                format!("/api/v1/withdrawals/{second_id}"),
                &alice,
            ),
        ] {
            let (status, error) = refused(&h, method, &path, token, None).await;
            assert_eq!(
                (status, &error["code"]),
                (StatusCode::CONFLICT, &json!("WITHDRAWAL_NOT_PENDING")),
                "{path}: {error}"
            );
        }
        assert_eq!(
            balance(&h, &alice, "BTC").await,
            ("0.70000000".into(), "0.00000000".into())
        );

        // The admins' listing, filtered by status and by user.
        let third = h
            .expect(
                StatusCode::CREATED,
                Method::POST,
                "/api/v1/withdrawals",
                Some(&alice),
                Some(request("0.1", "bc1q-alice")),
            )
            .await;
        let pending = h
            .expect(
                StatusCode::OK,
                Method::GET,
                "/api/v1/admin/withdrawals?status=pending",
                Some(&admin),
                None,
            )
            .await;
        assert_eq!(pending, json!([third.clone()]));
        let alices = h
            .expect(
                StatusCode::OK,
                Method::GET,
                &format!("/api/v1/admin/withdrawals?user_id={}", first["user_id"]),
                Some(&admin),
                None,
            )
            .await;
        assert_eq!(alices.as_array().unwrap().len(), 3, "{alices}");
        let cancelled = h
            .expect(
                StatusCode::OK,
                Method::POST,
                &format!("/api/v1/admin/withdrawals/{}/cancel", third["id"]),
                Some(&admin),
                None,
            )
            .await;
        assert_eq!(cancelled["status"], "cancelled");
        assert_eq!(
            balance(&h, &alice, "BTC").await,
            ("0.70000000".into(), "0.00000000".into())
        );

        // Users reach none of the admin routes.
        for (method, path) in [
            (Method::GET, "/api/v1/admin/withdrawals".to_string()),
            (
                Method::POST,
                format!("/api/v1/admin/withdrawals/{first_id}/complete"),
            ),
            (
                Method::POST,
                format!("/api/v1/admin/withdrawals/{first_id}/cancel"),
            ),
        ] {
            let (status, _) = refused(&h, method, &path, &bob, None).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
        }
        let (status, error) = refused(
            &h,
            Method::POST,
            "/api/v1/admin/withdrawals/999/complete",
            &admin,
            None,
        )
        .await;
        assert_eq!(
            (status, &error["code"]),
            (StatusCode::NOT_FOUND, &json!("UNKNOWN_WITHDRAWAL"))
        );
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_withdrawals_are_unknown_to_them() {
    for h in harnesses("withdrawals_owner").await {
        let (_, alice, bob) = funded(&h).await;
        let mine = h
            .expect(
                StatusCode::CREATED,
                Method::POST,
                "/api/v1/withdrawals",
                Some(&alice),
                Some(json!({"asset": "BTC", "amount": "0.5", "destination": "bc1q-alice"})),
            )
            .await;
        let id = mine["id"].as_u64().unwrap();
        for (method, path) in [
            (Method::GET, format!("/api/v1/withdrawals/{id}")),
            (Method::DELETE, format!("/api/v1/withdrawals/{id}")),
        ] {
            let (status, error) = refused(&h, method, &path, &bob, None).await;
            assert_eq!(
                (status, &error["code"]),
                (StatusCode::NOT_FOUND, &json!("UNKNOWN_WITHDRAWAL")),
                "{path}"
            );
        }
        let theirs = h
            .expect(
                StatusCode::OK,
                Method::GET,
                "/api/v1/withdrawals",
                Some(&bob),
                None,
            )
            .await;
        assert_eq!(theirs, json!([]));
        // Still pending, still held.
        let again = h
            .expect(
                StatusCode::OK,
                Method::GET,
                &format!("/api/v1/withdrawals/{id}"),
                Some(&alice),
                None,
            )
            .await;
        assert_eq!(again["status"], "pending");
        assert_eq!(
            balance(&h, &alice, "BTC").await,
            ("0.50000000".into(), "0.50000000".into())
        );
        // Unauthenticated: 401.
        let (status, _) = h.call(Method::GET, "/api/v1/withdrawals", None, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_withdrawal_requests_name_the_field_and_hold_nothing() {
    for h in harnesses("withdrawals_invalid").await {
        let (_, alice, bob) = funded(&h).await;
        let long = "x".repeat(257);
        let cases = [
            (
                json!({"asset": "BTC", "amount": "0.1", "destination": ""}),
                "INVALID_DESTINATION",
                "destination",
            ),
            (
                json!({"asset": "BTC", "amount": "0.1", "destination": "   "}),
                "INVALID_DESTINATION",
                "destination",
            ),
            (
                json!({"asset": "BTC", "amount": "0.1", "destination": long}),
                "INVALID_DESTINATION",
                "destination",
            ),
            (
                json!({"asset": "BTC", "amount": "0.1", "destination": "a\nb"}),
                "INVALID_DESTINATION",
                "destination",
            ),
            (
                json!({"asset": "DOGE", "amount": "0.1", "destination": "d"}),
                "UNKNOWN_ASSET",
                "asset",
            ),
            (
                json!({"asset": "BTC", "amount": "0", "destination": "d"}),
                "INVALID_AMOUNT",
                "amount",
            ),
            (
                json!({"asset": "BTC", "amount": "0.000000001", "destination": "d"}),
                "INVALID_AMOUNT",
                "amount",
            ),
            (
                json!({"asset": "BTC", "amount": "-1", "destination": "d"}),
                "INVALID_DECIMAL",
                "amount",
            ),
            (
                json!({"asset": "BTC", "amount": 1, "destination": "d"}),
                "INVALID_FIELD",
                "amount",
            ),
            (
                json!({"asset": "BTC", "amount": "0.1", "destination": "d", "memo": "x"}),
                "INVALID_FIELD",
                "memo",
            ),
        ];
        for (body, code, field) in cases {
            let (status, error) = refused(
                &h,
                Method::POST,
                "/api/v1/withdrawals",
                &alice,
                Some(body.clone()),
            )
            .await;
            assert_eq!(
                (status, &error["code"], &error["field"]),
                (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &json!(code),
                    &json!(field)
                ),
                "{body}: {error}"
            );
        }
        // More than the available balance: the ledger's refusal, nothing held.
        let (status, error) = refused(
            &h,
            Method::POST,
            "/api/v1/withdrawals",
            &alice,
            Some(json!({"asset": "BTC", "amount": "1.5", "destination": "d"})),
        )
        .await;
        assert_eq!(
            (status, &error["code"]),
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                &json!("INSUFFICIENT_FUNDS")
            ),
            "{error}"
        );
        let (status, _) = refused(
            &h,
            Method::POST,
            "/api/v1/withdrawals",
            &bob,
            Some(json!({"asset": "BTC", "amount": "0.1", "destination": "d"})),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            balance(&h, &alice, "BTC").await,
            ("1.00000000".into(), "0.00000000".into())
        );
        let listed = h
            .expect(
                StatusCode::OK,
                Method::GET,
                "/api/v1/withdrawals",
                Some(&alice),
                None,
            )
            .await;
        assert_eq!(listed, json!([]));
        for query in ["status=paid", "limit=0", "limit=1001"] {
            let (status, error) = refused(
                &h,
                Method::GET,
                &format!("/api/v1/withdrawals?{query}"),
                &alice,
                None,
            )
            .await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{query}: {error}");
        }
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_withdrawal_is_requested_once() {
    for h in harnesses("withdrawals_keyed").await {
        let (_, alice, _) = funded(&h).await;
        let body = json!({"asset": "BTC", "amount": "0.25", "destination": "bc1q-alice"});
        let mut answers = Vec::new();
        for _ in 0..2 {
            let response = h
                .client
                .post(format!("{}/api/v1/withdrawals", h.base))
                .bearer_auth(&alice)
                .header("idempotency-key", "payout-2026-12-04")
                .json(&body)
                .send()
                .await
                .unwrap();
            let replayed = response.headers().contains_key("idempotent-replayed");
            answers.push((
                response.status(),
                replayed,
                response.json::<Value>().await.unwrap(),
            ));
        }
        assert_eq!((answers[0].0, answers[0].1), (StatusCode::CREATED, false));
        assert_eq!((answers[1].0, answers[1].1), (StatusCode::CREATED, true));
        assert_eq!(answers[0].2, answers[1].2);
        assert_eq!(
            balance(&h, &alice, "BTC").await,
            ("0.75000000".into(), "0.25000000".into())
        );
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawals_and_their_ids_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("agora-data");
    let start = |data: std::path::PathBuf| async move {
        Harness::start("sqlite", None, None, move |config| config.data_dir = data).await
    };
    let h = start(data.clone()).await;
    let (_, alice, _) = funded(&h).await;
    let first = h
        .expect(
            StatusCode::CREATED,
            Method::POST,
            "/api/v1/withdrawals",
            Some(&alice),
            Some(json!({"asset": "BTC", "amount": "0.4", "destination": "bc1q-alice"})),
        )
        .await;
    h.stop().await;

    let h = start(data).await;
    let listed = h
        .expect(
            StatusCode::OK,
            Method::GET,
            "/api/v1/withdrawals",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(listed, json!([first.clone()]));
    assert_eq!(
        balance(&h, &alice, "BTC").await,
        ("0.60000000".into(), "0.40000000".into())
    );
    let next = h
        .expect(
            StatusCode::CREATED,
            Method::POST,
            "/api/v1/withdrawals",
            Some(&alice),
            Some(json!({"asset": "BTC", "amount": "0.1", "destination": "bc1q-alice"})),
        )
        .await;
    assert!(
        next["id"].as_u64() > first["id"].as_u64(),
        "ids are never reused: {next}"
    );
    // The withdrawal requested before the restart can still be cancelled.
    let cancelled = h
        .expect(
            StatusCode::OK,
            Method::DELETE,
            &format!("/api/v1/withdrawals/{}", first["id"]),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(
        balance(&h, &alice, "BTC").await,
        ("0.90000000".into(), "0.10000000".into())
    );
    h.stop().await;
}
