//! A full trading flow over REST, and what each user may see of the other's.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::{balance, harnesses};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_cross_and_settle() {
    for h in harnesses("trading").await {
        let admin = h.admin().await;
        h.market(&admin).await;
        let (alice, alice_token) = h.user(&admin, "alice").await;
        let (bob, bob_token) = h.user(&admin, "bob").await;
        h.deposit(&admin, alice, "BTC", "1").await;
        h.deposit(&admin, bob, "USDT", "100000").await;

        let sell = h
            .expect(StatusCode::CREATED, Method::POST, "/api/v1/orders", Some(&alice_token),
                Some(json!({"market": "BTC-USDT", "side": "sell", "price": "50000.00", "qty": "0.5"})))
            .await;
        assert_eq!(sell["order"]["status"], "open", "{}", h.backend);
        let sell_id = sell["order"]["id"].as_u64().unwrap();
        assert_eq!(
            balance(&h, &alice_token, "BTC").await,
            ("0.50000000".into(), "0.50000000".into())
        );

        let buy = h
            .expect(StatusCode::CREATED, Method::POST, "/api/v1/orders", Some(&bob_token),
                Some(json!({"market": "BTC-USDT", "side": "buy", "price": "50100", "qty": "0.2", "tif": "IOC"})))
            .await;
        assert_eq!(buy["order"]["status"], "filled", "{buy}");
        assert_eq!(buy["fills"][0]["price"], "50000.00");
        assert_eq!(buy["fills"][0]["qty"], "0.2000");
        assert_eq!(buy["fills"][0]["maker_order"], sell_id);

        // Bob paid 10,000 USDT and received 0.2 BTC less the 20 bps taker fee; Alice received
        // 10,000 USDT less the 10 bps maker fee and still holds the unfilled 0.3 BTC.
        assert_eq!(
            balance(&h, &bob_token, "USDT").await,
            ("90000.000000".into(), "0.000000".into())
        );
        assert_eq!(balance(&h, &bob_token, "BTC").await.0, "0.19960000");
        assert_eq!(balance(&h, &alice_token, "USDT").await.0, "9990.000000");
        assert_eq!(
            balance(&h, &alice_token, "BTC").await,
            ("0.50000000".into(), "0.30000000".into())
        );

        let depth = h
            .expect(
                StatusCode::OK,
                Method::GET,
                "/api/v1/markets/BTC-USDT/depth",
                None,
                None,
            )
            .await;
        assert_eq!(
            depth["asks"],
            json!([{"price": "50000.00", "qty": "0.3000", "orders": 1}])
        );
        assert_eq!(depth["bids"], json!([]));
        let ticker = h
            .expect(
                StatusCode::OK,
                Method::GET,
                "/api/v1/markets/BTC-USDT/ticker",
                None,
                None,
            )
            .await;
        assert_eq!(ticker["ask"], "50000.00");
        assert_eq!(ticker["last"], "50000.00");
        assert_eq!(ticker["trades_24h"], 1);

        let order = h
            .expect(
                StatusCode::OK,
                Method::GET,
                &format!("/api/v1/orders/{sell_id}"),
                Some(&alice_token),
                None,
            )
            .await;
        assert_eq!(order["status"], "open");
        assert_eq!(order["filled"], "0.2000");
        assert_eq!(order["remaining"], "0.3000");
        assert_eq!(order["price"], "50000.00");

        let trades = h
            .expect(
                StatusCode::OK,
                Method::GET,
                "/api/v1/trades",
                Some(&alice_token),
                None,
            )
            .await;
        assert_eq!(trades.as_array().unwrap().len(), 1);
        assert_eq!(trades[0]["side"], "sell");
        assert_eq!(trades[0]["maker"], true);
        let public = h
            .expect(
                StatusCode::OK,
                Method::GET,
                "/api/v1/markets/BTC-USDT/trades",
                None,
                None,
            )
            .await;
        assert_eq!(public[0]["taker_side"], "buy");

        // Bob can neither see nor touch Alice's order: to him it does not exist.
        for method in [Method::GET, Method::DELETE] {
            let (status, body) = h
                .call(
                    method,
                    &format!("/api/v1/orders/{sell_id}"),
                    Some(&bob_token),
                    None,
                )
                .await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
            assert_eq!(body["error"]["code"], "UNKNOWN_ORDER");
        }
        let (status, _) = h
            .call(
                Method::PATCH,
                &format!("/api/v1/orders/{sell_id}"),
                Some(&bob_token),
                Some(json!({"qty": "0.1"})),
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let listed = h
            .expect(
                StatusCode::OK,
                Method::GET,
                "/api/v1/orders",
                Some(&bob_token),
                None,
            )
            .await;
        assert!(
            listed
                .as_array()
                .unwrap()
                .iter()
                .all(|o| o["id"] != sell_id),
            "{listed}"
        );

        // Alice reduces, then cancels: her base comes back.
        let modified = h
            .expect(
                StatusCode::OK,
                Method::PATCH,
                &format!("/api/v1/orders/{sell_id}"),
                Some(&alice_token),
                Some(json!({"qty": "0.1"})),
            )
            .await;
        assert_eq!(modified["priority_kept"], true);
        assert_eq!(
            balance(&h, &alice_token, "BTC").await,
            ("0.70000000".into(), "0.10000000".into())
        );
        let cancelled = h
            .expect(
                StatusCode::OK,
                Method::DELETE,
                &format!("/api/v1/orders/{sell_id}"),
                Some(&alice_token),
                None,
            )
            .await;
        assert_eq!(cancelled["cancelled"], json!([sell_id]));
        assert_eq!(
            balance(&h, &alice_token, "BTC").await,
            ("0.80000000".into(), "0.00000000".into())
        );
        let order = h
            .expect(
                StatusCode::OK,
                Method::GET,
                &format!("/api/v1/orders/{sell_id}"),
                Some(&alice_token),
                None,
            )
            .await;
        assert_eq!(order["status"], "cancelled");
        let open = h
            .expect(
                StatusCode::OK,
                Method::GET,
                "/api/v1/orders?status=open",
                Some(&alice_token),
                None,
            )
            .await;
        assert_eq!(open, json!([]));

        // Cancel-all over two fresh orders.
        for price in ["60000", "61000"] {
            h.expect(
                StatusCode::CREATED,
                Method::POST,
                "/api/v1/orders",
                Some(&alice_token),
                Some(json!({"market": "BTC-USDT", "side": "sell", "price": price, "qty": "0.1"})),
            )
            .await;
        }
        let all = h
            .expect(
                StatusCode::OK,
                Method::DELETE,
                "/api/v1/orders?market=BTC-USDT",
                Some(&alice_token),
                None,
            )
            .await;
        assert_eq!(all["cancelled"].as_array().unwrap().len(), 2);
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("agora-data");
    let start = |data: std::path::PathBuf| async move {
        crate::Harness::start("sqlite", None, None, move |config| config.data_dir = data).await
    };
    let h = start(data.clone()).await;
    let admin = h.admin().await;
    h.market(&admin).await;
    let (alice, alice_token) = h.user(&admin, "alice").await;
    h.deposit(&admin, alice, "BTC", "2").await;
    let placed = h
        .expect(
            StatusCode::CREATED,
            Method::POST,
            "/api/v1/orders",
            Some(&alice_token),
            Some(json!({"market": "BTC-USDT", "side": "sell", "price": "100", "qty": "1"})),
        )
        .await;
    let id = placed["order"]["id"].as_u64().unwrap();
    h.stop().await;

    let h = start(data).await;
    // The same session secret (kept in the data directory) and the same state.
    assert_eq!(
        balance(&h, &alice_token, "BTC").await,
        ("1.00000000".into(), "1.00000000".into())
    );
    let order = h
        .expect(
            StatusCode::OK,
            Method::GET,
            &format!("/api/v1/orders/{id}"),
            Some(&alice_token),
            None,
        )
        .await;
    assert_eq!(order["status"], "open");
    // Ids are never reused after a restart.
    let next = h
        .expect(
            StatusCode::CREATED,
            Method::POST,
            "/api/v1/orders",
            Some(&alice_token),
            Some(json!({"market": "BTC-USDT", "side": "sell", "price": "100", "qty": "0.5"})),
        )
        .await;
    assert!(next["order"]["id"].as_u64().unwrap() > id);
    h.stop().await;
}

pub(crate) async fn keyed(
    h: &crate::Harness,
    token: &str,
    key: Option<&str>,
    body: &str,
) -> (StatusCode, Option<String>, serde_json::Value) {
    let mut request = h
        .client
        .post(format!("{}/api/v1/orders", h.base))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let replayed = response
        .headers()
        .get("idempotent-replayed")
        .map(|v| v.to_str().unwrap().to_string());
    (status, replayed, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_give_one_answer_per_request() {
    for h in harnesses("idempotency").await {
        let admin = h.admin().await;
        h.market(&admin).await;
        let (alice, token) = h.user(&admin, "alice").await;
        h.deposit(&admin, alice, "BTC", "1").await;
        let body = r#"{"market":"BTC-USDT","side":"sell","price":"100","qty":"0.1"}"#;

        let (status, replayed, first) = keyed(&h, &token, Some("k-1"), body).await;
        assert_eq!((status, replayed), (StatusCode::CREATED, None), "{first}");
        let (status, replayed, again) = keyed(&h, &token, Some("k-1"), body).await;
        assert_eq!(
            (status, replayed.as_deref()),
            (StatusCode::CREATED, Some("true"))
        );
        assert_eq!(again, first, "the stored answer, byte for byte");
        // Another body under the same key is refused and places nothing.
        let other = r#"{"market":"BTC-USDT","side":"sell","price":"100","qty":"0.2"}"#;
        let (status, _, refused) = keyed(&h, &token, Some("k-1"), other).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(refused["error"]["code"], "IDEMPOTENCY_KEY_REUSED");
        // A refusal is an answer too: the same bad request gets the same 422 again.
        let bad = r#"{"market":"BTC-USDT","side":"sell","price":"100","qty":"7"}"#;
        let (status, _, first_bad) = keyed(&h, &token, Some("k-2"), bad).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        let (status, replayed, again_bad) = keyed(&h, &token, Some("k-2"), bad).await;
        assert_eq!(
            (status, replayed.as_deref(), &again_bad),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("true"), &first_bad)
        );
        // A client order id is a key of its own.
        let with_id = r#"{"market":"BTC-USDT","side":"sell","price":"100","qty":"0.1","client_order_id":"bot-7"}"#;
        let (_, _, placed) = keyed(&h, &token, None, with_id).await;
        assert_eq!(placed["client_order_id"], "bot-7");
        let (_, replayed, same) = keyed(&h, &token, None, with_id).await;
        assert_eq!((replayed.as_deref(), &same), (Some("true"), &placed));
        // Keys are per user: Bob's "k-1" is his own.
        let (bob, bob_token) = h.user(&admin, "bob").await;
        h.deposit(&admin, bob, "BTC", "1").await;
        let (status, replayed, bobs) = keyed(&h, &bob_token, Some("k-1"), body).await;
        assert_eq!((status, replayed), (StatusCode::CREATED, None));
        assert_ne!(bobs["order"]["id"], first["order"]["id"]);

        // Twelve copies at once: every answer is the one order (given or given again) or
        // "in flight", and exactly one order is placed.
        let concurrent = r#"{"market":"BTC-USDT","side":"sell","price":"101","qty":"0.1"}"#;
        let sends: Vec<_> = (0..12)
            .map(|_| {
                let request = h
                    .client
                    .post(format!("{}/api/v1/orders", h.base))
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .header("idempotency-key", "k-burst")
                    .body(concurrent);
                tokio::spawn(async move {
                    let response = request.send().await.unwrap();
                    let status = response.status();
                    (status, response.json::<serde_json::Value>().await.unwrap())
                })
            })
            .collect();
        let mut ids = std::collections::BTreeSet::new();
        for send in sends {
            let (status, answer) = send.await.unwrap();
            match status {
                StatusCode::CREATED => {
                    ids.insert(answer["order"]["id"].as_u64().unwrap());
                }
                StatusCode::CONFLICT => {
                    assert_eq!(answer["error"]["code"], "IDEMPOTENCY_KEY_IN_FLIGHT")
                }
                other => panic!("{other}: {answer}"),
            }
        }
        assert_eq!(ids.len(), 1, "{ids:?}");
        let orders = h
            .expect(
                StatusCode::OK,
                Method::GET,
                "/api/v1/orders?status=open",
                Some(&token),
                None,
            )
            .await;
        // k-1, bot-7 and k-burst: three orders, not fifteen.
        assert_eq!(orders.as_array().unwrap().len(), 3, "{orders}");
        assert_eq!(
            balance(&h, &token, "BTC").await,
            ("0.70000000".into(), "0.30000000".into())
        );
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_request_is_answered_again_as_it_was_first() {
    for h in harnesses("idempotency_replay").await {
        let admin = h.admin().await;
        // (method, path, status, given again from the store). A 204 came back labelled JSON,
        // and the framework's own refusals of a path or a method (whose first answer an outer
        // layer renders as the error body) came back as plain text or nothing, labelled JSON.
        let cases = [
            (
                "PUT",
                "/api/v1/queues/replayed",
                StatusCode::NO_CONTENT,
                true,
            ),
            ("DELETE", "/api/v1/orders/999", StatusCode::NOT_FOUND, true),
            // Refused before any handler ran: not kept, and refused the same way again.
            (
                "DELETE",
                "/api/v1/orders/abc",
                StatusCode::BAD_REQUEST,
                false,
            ),
            (
                "PUT",
                "/api/v1/orders/5",
                StatusCode::METHOD_NOT_ALLOWED,
                false,
            ),
        ];
        for (i, (method, path, status, kept)) in cases.into_iter().enumerate() {
            let key = format!("replay-{i}");
            let mut answers = Vec::new();
            for _ in 0..2 {
                let response = h
                    .client
                    .request(
                        Method::from_bytes(method.as_bytes()).unwrap(),
                        format!("{}{path}", h.base),
                    )
                    .bearer_auth(&admin)
                    .header("idempotency-key", &key)
                    .send()
                    .await
                    .unwrap();
                let header = |name: &str| {
                    response
                        .headers()
                        .get(name)
                        .map(|v| v.to_str().unwrap().to_string())
                };
                let (content_type, replayed) =
                    (header("content-type"), header("idempotent-replayed"));
                let code = response.status();
                let body = response.bytes().await.unwrap();
                answers.push((code, content_type, replayed, body));
            }
            let (first, again) = (&answers[0], &answers[1]);
            let context = format!("{} {method} {path}: {answers:?}", h.backend);
            assert_eq!((first.0, again.0), (status, status), "{context}");
            assert_eq!(first.2, None, "{context}");
            assert_eq!(again.2.is_some(), kept, "{context}");
            assert_eq!(again.1, first.1, "the same content type: {context}");
            assert_eq!(again.3, first.3, "the same body, byte for byte: {context}");
            if status == StatusCode::NO_CONTENT {
                assert_eq!((&first.1, first.3.is_empty()), (&None, true), "{context}");
            } else {
                let error: serde_json::Value = serde_json::from_slice(&again.3)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {context}"));
                assert!(error["error"]["code"].is_string(), "{context}");
            }
        }
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_placement_cut_short_by_a_crash_is_settled_on_retry() {
    use sha2::{Digest, Sha256};
    let h = crate::Harness::start("sqlite", None, None, |_| {}).await;
    let admin = h.admin().await;
    h.market(&admin).await;
    let (alice, token) = h.user(&admin, "alice").await;
    h.deposit(&admin, alice, "BTC", "1").await;
    let store = h.server.as_ref().unwrap().app().store.clone();
    let hash = |body: &str| -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(format!("POST\n/api/v1/orders\n{body}").as_bytes());
        hasher.finalize().into()
    };
    let now = 1_000;
    let far = i64::MAX / 2;

    // Journaled before the crash: the order exists; its key was left pending.
    let body = r#"{"market":"BTC-USDT","side":"sell","price":"100","qty":"0.1"}"#;
    let (_, _, placed) = keyed(&h, &token, None, body).await;
    let id = placed["order"]["id"].as_u64().unwrap();
    store
        .idempotency_begin(alice, "lost-answer", &hash(body), Some(id), now, far)
        .await
        .unwrap();
    let (status, replayed, recovered) = keyed(&h, &token, Some("lost-answer"), body).await;
    assert_eq!(
        (status, replayed.as_deref()),
        (StatusCode::CREATED, Some("true")),
        "{recovered}"
    );
    assert_eq!(recovered["order"]["id"], id);
    assert_eq!(recovered["recovered"], true);

    // Never journaled: the retry places it, under the id the key holds.
    let body2 = r#"{"market":"BTC-USDT","side":"sell","price":"100","qty":"0.2"}"#;
    let reserved = id + 1_000;
    store
        .idempotency_begin(
            alice,
            "never-sequenced",
            &hash(body2),
            Some(reserved),
            now,
            far,
        )
        .await
        .unwrap();
    let (status, replayed, placed2) = keyed(&h, &token, Some("never-sequenced"), body2).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, None), "{placed2}");
    assert_eq!(placed2["order"]["id"], reserved);

    // Any other command left pending cannot be settled: said so, nothing done.
    let path = format!("/api/v1/orders/{id}");
    let mut hasher = Sha256::new();
    hasher.update(format!("DELETE\n{path}\n").as_bytes());
    store
        .idempotency_begin(
            alice,
            "lost-cancel",
            &hasher.finalize().into(),
            None,
            now,
            far,
        )
        .await
        .unwrap();
    let response = h
        .client
        .delete(format!("{}{path}", h.base))
        .bearer_auth(&token)
        .header("idempotency-key", "lost-cancel")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(answer["error"]["code"], "IDEMPOTENCY_KEY_UNRESOLVED");
    // 0.1 and 0.2 held: two orders, not three.
    assert_eq!(
        balance(&h, &token, "BTC").await,
        ("0.70000000".into(), "0.30000000".into())
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_racing_on_one_order_are_answered_or_refused_with_409() {
    let h = crate::Harness::start("sqlite", None, None, |_| {}).await;
    let admin = h.admin().await;
    h.market(&admin).await;
    let (alice, token) = h.user(&admin, "alice").await;
    h.deposit(&admin, alice, "BTC", "1").await;
    let (_, _, placed) = keyed(
        &h,
        &token,
        None,
        r#"{"market":"BTC-USDT","side":"sell","price":"100","qty":"0.5"}"#,
    )
    .await;
    let id = placed["order"]["id"].as_u64().unwrap();
    let sends: Vec<_> = (0..10)
        .map(|i| {
            let request = h
                .client
                .patch(format!("{}/api/v1/orders/{id}", h.base))
                .bearer_auth(&token)
                .json(&json!({"qty": format!("0.{}", 1 + i % 4)}));
            tokio::spawn(async move {
                let response = request.send().await.unwrap();
                let status = response.status();
                (status, response.json::<serde_json::Value>().await.unwrap())
            })
        })
        .collect();
    for send in sends {
        let (status, answer) = send.await.unwrap();
        match status {
            StatusCode::OK => {}
            StatusCode::CONFLICT => assert_eq!(answer["error"]["code"], "CONFLICTING_COMMAND"),
            // A modify to the quantity an earlier one already set changes nothing: refused.
            StatusCode::UNPROCESSABLE_ENTITY => {
                assert_eq!(answer["error"]["code"], "INVALID_MODIFY")
            }
            other => panic!("{other}: {answer}"),
        }
    }
    // Whatever won, the hold matches the order's open quantity.
    let order = h
        .expect(
            StatusCode::OK,
            Method::GET,
            &format!("/api/v1/orders/{id}"),
            Some(&token),
            None,
        )
        .await;
    let held = balance(&h, &token, "BTC").await.1;
    assert_eq!(
        format!("{}0000", order["remaining"].as_str().unwrap()),
        held
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candles_liquidity_and_price_impact_describe_the_book() {
    for h in harnesses("market_data").await {
        let admin = h.admin().await;
        h.market(&admin).await;
        let (alice, alice_token) = h.user(&admin, "alice").await;
        let (bob, bob_token) = h.user(&admin, "bob").await;
        h.deposit(&admin, alice, "BTC", "1").await;
        h.deposit(&admin, bob, "USDT", "100000").await;
        for (token, side, price, qty, tif) in [
            (&alice_token, "sell", "50000.00", "0.5", "GTC"),
            (&alice_token, "sell", "50100.00", "0.5", "GTC"),
            (&bob_token, "buy", "49000.00", "0.1", "GTC"),
            (&bob_token, "buy", "50000.00", "0.2", "IOC"),
        ] {
            h.expect(
                StatusCode::CREATED,
                Method::POST,
                "/api/v1/orders",
                Some(token),
                Some(json!({"market": "BTC-USDT", "side": side, "price": price, "qty": qty, "tif": tif})),
            )
            .await;
        }
        let harness = &h;
        let get = |path: String| async move {
            harness
                .expect(StatusCode::OK, Method::GET, &path, None, None)
                .await
        };

        let candles = get("/api/v1/markets/BTC-USDT/candles?interval=1m".into()).await;
        assert_eq!(candles.as_array().unwrap().len(), 1, "{candles}");
        let candle = &candles[0];
        for field in ["open", "high", "low", "close"] {
            assert_eq!(candle[field], "50000.00", "{field}: {candle}");
        }
        assert_eq!(
            (
                &candle["volume"],
                &candle["quote_volume"],
                &candle["trades"]
            ),
            (&json!("0.2000"), &json!("10000.000000"), &json!(1))
        );
        assert_eq!(candle["open_time"].as_i64().unwrap() % 60_000, 0);
        let daily = get("/api/v1/markets/BTC-USDT/candles?interval=1d&limit=5".into()).await;
        assert_eq!(daily[0]["trades"], 1);

        // Mid 49,500: within 1% there is nothing (the best bid and ask are just outside),
        // within 5% there is everything.
        let narrow = get("/api/v1/markets/BTC-USDT/liquidity".into()).await;
        assert_eq!(
            narrow,
            json!({"market": "BTC-USDT", "band_bps": 100, "mid": "49500.000",
                   "bid_qty": "0.0000", "bid_notional": "0.000000",
                   "ask_qty": "0.0000", "ask_notional": "0.000000"})
        );
        let wide = get("/api/v1/markets/BTC-USDT/liquidity?band_bps=500".into()).await;
        assert_eq!(
            (&wide["bid_qty"], &wide["bid_notional"]),
            (&json!("0.1000"), &json!("4900.000000"))
        );
        assert_eq!(
            (&wide["ask_qty"], &wide["ask_notional"]),
            (&json!("0.8000"), &json!("40050.000000"))
        );

        // 20,000 USDT buys the 0.3 left at 50,000 and 998 lots at 50,100.
        let impact =
            get("/api/v1/markets/BTC-USDT/price-impact?side=buy&notional=20000".into()).await;
        assert_eq!(
            impact,
            json!({"market": "BTC-USDT", "side": "buy", "filled_qty": "0.3998",
                   "filled_notional": "19999.980000", "best_price": "50000.00",
                   "worst_price": "50100.00", "complete": true, "impact_bps": "4"})
        );
        let thin =
            get("/api/v1/markets/BTC-USDT/price-impact?side=sell&notional=1000000".into()).await;
        assert_eq!(
            (&thin["filled_qty"], &thin["complete"]),
            (&json!("0.1000"), &json!(false))
        );

        // Each parameter's rule, with its field; an unknown market is 404.
        for (path, field) in [
            ("/candles?interval=2m", "interval"),
            ("/candles?limit=0", "limit"),
            ("/candles?limit=1441", "limit"),
            ("/liquidity?band_bps=0", "band_bps"),
            ("/liquidity?band_bps=10001", "band_bps"),
            ("/price-impact?side=buy&notional=0", "notional"),
            ("/price-impact?side=buy&notional=-5", "notional"),
            ("/price-impact?side=buy&notional=1.0000001", "notional"),
        ] {
            let (status, body) = h
                .call(
                    Method::GET,
                    &format!("/api/v1/markets/BTC-USDT{path}"),
                    None,
                    None,
                )
                .await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{path}: {body}");
            assert_eq!(body["error"]["field"], field, "{path}: {body}");
        }
        let (status, _) = h
            .call(
                Method::GET,
                "/api/v1/markets/BTC-USDT/price-impact?side=up&notional=1",
                None,
                None,
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        for path in ["candles", "liquidity", "price-impact?side=buy&notional=1"] {
            let (status, body) = h
                .call(
                    Method::GET,
                    &format!("/api/v1/markets/NO-PE/{path}"),
                    None,
                    None,
                )
                .await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
            assert_eq!(body["error"]["code"], "UNKNOWN_MARKET");
        }
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halted_market_takes_cancels_but_no_orders_until_resumed() {
    for h in harnesses("halt_resume").await {
        let admin = h.admin().await;
        h.market(&admin).await;
        let (alice, alice_token) = h.user(&admin, "alice").await;
        let (bob, bob_token) = h.user(&admin, "bob").await;
        h.deposit(&admin, alice, "BTC", "1").await;
        h.deposit(&admin, bob, "USDT", "100000").await;
        h.expect(
            StatusCode::CREATED,
            Method::POST,
            "/api/v1/admin/users",
            Some(&admin),
            Some(json!({"username": "olga", "password": "olga-password", "role": "operator"})),
        )
        .await;
        let olga = h.login("olga", "olga-password").await;
        let sell = |price: &str| json!({"market": "BTC-USDT", "side": "sell", "price": price, "qty": "0.1"});
        let resting = h
            .expect(
                StatusCode::CREATED,
                Method::POST,
                "/api/v1/orders",
                Some(&alice_token),
                Some(sell("50000")),
            )
            .await["order"]["id"]
            .as_u64()
            .unwrap();
        let second = h
            .expect(
                StatusCode::CREATED,
                Method::POST,
                "/api/v1/orders",
                Some(&alice_token),
                Some(sell("50001")),
            )
            .await["order"]["id"]
            .as_u64()
            .unwrap();

        // Users cannot halt; unknown markets are 404; an operator can, twice over.
        let (status, body) = h
            .call(
                Method::POST,
                "/api/v1/admin/markets/BTC-USDT/halt",
                Some(&alice_token),
                None,
            )
            .await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (StatusCode::FORBIDDEN, &json!("FORBIDDEN")),
            "{body}"
        );
        let (status, body) = h
            .call(
                Method::POST,
                "/api/v1/admin/markets/ETH-USDT/halt",
                Some(&olga),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        for _ in 0..2 {
            let view = h
                .expect(
                    StatusCode::OK,
                    Method::POST,
                    "/api/v1/admin/markets/BTC-USDT/halt",
                    Some(&olga),
                    None,
                )
                .await;
            assert_eq!(view["status"], "halted", "{view}");
        }
        let listed = h
            .expect(
                StatusCode::OK,
                Method::GET,
                "/api/v1/markets/BTC-USDT",
                None,
                None,
            )
            .await;
        assert_eq!(listed["status"], "halted", "{}", h.backend);

        // Halted: placements and modifications are 409 MARKET_HALTED and hold nothing.
        let before = balance(&h, &bob_token, "USDT").await;
        let buy = json!({"market": "BTC-USDT", "side": "buy", "price": "50000", "qty": "0.1", "tif": "IOC"});
        let (status, body) = h
            .call(
                Method::POST,
                "/api/v1/orders",
                Some(&bob_token),
                Some(buy.clone()),
            )
            .await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (StatusCode::CONFLICT, &json!("MARKET_HALTED")),
            "{body}"
        );
        assert_eq!(balance(&h, &bob_token, "USDT").await, before);
        let (status, body) = h
            .call(
                Method::PATCH,
                &format!("/api/v1/orders/{resting}"),
                Some(&alice_token),
                Some(json!({"qty": "0.05"})),
            )
            .await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (StatusCode::CONFLICT, &json!("MARKET_HALTED")),
            "{body}"
        );
        // A cancel still goes through and releases its hold.
        h.expect(
            StatusCode::OK,
            Method::DELETE,
            &format!("/api/v1/orders/{second}"),
            Some(&alice_token),
            None,
        )
        .await;
        assert_eq!(
            balance(&h, &alice_token, "BTC").await,
            ("0.90000000".into(), "0.10000000".into())
        );

        // Fees change (admins only, bounded, field named), then the market resumes and the
        // next trade pays the new taker fee: 0.1 BTC less 50 bps.
        let fees = json!({"taker_fee_bps": 50});
        let (status, _) = h
            .call(
                Method::PATCH,
                "/api/v1/admin/markets/BTC-USDT",
                Some(&olga),
                Some(fees.clone()),
            )
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        for (body, field) in [
            (json!({"maker_fee_bps": 1_000_000}), "maker_fee_bps"),
            (json!({}), "maker_fee_bps"),
        ] {
            let (status, error) = h
                .call(
                    Method::PATCH,
                    "/api/v1/admin/markets/BTC-USDT",
                    Some(&admin),
                    Some(body),
                )
                .await;
            assert_eq!(
                (status, &error["error"]["field"]),
                (StatusCode::UNPROCESSABLE_ENTITY, &json!(field)),
                "{error}"
            );
        }
        let view = h
            .expect(
                StatusCode::OK,
                Method::PATCH,
                "/api/v1/admin/markets/BTC-USDT",
                Some(&admin),
                Some(fees),
            )
            .await;
        assert_eq!(
            (
                view["maker_fee_bps"].as_u64(),
                view["taker_fee_bps"].as_u64()
            ),
            (Some(10), Some(50)),
            "{view}"
        );
        let view = h
            .expect(
                StatusCode::OK,
                Method::POST,
                "/api/v1/admin/markets/BTC-USDT/resume",
                Some(&olga),
                None,
            )
            .await;
        assert_eq!(view["status"], "active");
        let bought = h
            .expect(
                StatusCode::CREATED,
                Method::POST,
                "/api/v1/orders",
                Some(&bob_token),
                Some(buy),
            )
            .await;
        assert_eq!(bought["order"]["status"], "filled", "{bought}");
        assert_eq!(balance(&h, &bob_token, "BTC").await.0, "0.09950000");
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_of_history_does_not_wait_out_the_projectors_pause() {
    // A pause far longer than a read waits for the read models (two seconds): each read
    // below gets its own writes only because it cuts the pause short.
    let h = crate::Harness::start("sqlite", None, None, |config| {
        config.projector_linger_ms = 60_000;
    })
    .await;
    let admin = h.admin().await;
    h.market(&admin).await;
    let (alice, token) = h.user(&admin, "alice").await;
    h.deposit(&admin, alice, "BTC", "1").await;
    for n in 1..=3 {
        let listed = place_then_list(&h, &token).await;
        assert_eq!(listed.len(), n, "{listed:?}");
    }
    h.stop().await;
}

/// Places a sell order and lists the user's orders at once, expecting it first; the list.
async fn place_then_list(h: &crate::Harness, token: &str) -> Vec<serde_json::Value> {
    let placed = h
        .expect(
            StatusCode::CREATED,
            Method::POST,
            "/api/v1/orders",
            Some(token),
            Some(json!({"market": "BTC-USDT", "side": "sell", "price": "50000", "qty": "0.1"})),
        )
        .await;
    let listed = h
        .expect(
            StatusCode::OK,
            Method::GET,
            "/api/v1/orders",
            Some(token),
            None,
        )
        .await;
    let listed = listed.as_array().unwrap().clone();
    assert_eq!(
        listed[0]["id"], placed["order"]["id"],
        "newest first: {listed:?}"
    );
    listed
}

/// A read that needs more of the journal than one projector step reads (64 batches) gets its
/// writes: the step its wake-up started stops short, and the projector goes on at once
/// instead of lingering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_behind_more_than_one_projector_step_gets_its_writes() {
    let h = crate::Harness::start("sqlite", None, None, |config| {
        config.projector_linger_ms = 60_000;
    })
    .await;
    let admin = h.admin().await;
    h.market(&admin).await;
    let (alice, token) = h.user(&admin, "alice").await;
    // One batch each (every deposit is awaited), while the projector lingers after its
    // first write.
    for _ in 0..100 {
        h.deposit(&admin, alice, "BTC", "0.01").await;
    }
    place_then_list(&h, &token).await;
    h.stop().await;
}

/// A market, a user and 120 deposits to them: more than 120 commands.
async fn one_hundred_twenty_commands(h: &crate::Harness) {
    let admin = h.admin().await;
    h.market(&admin).await;
    let (alice, _) = h.user(&admin, "alice").await;
    for _ in 0..120 {
        h.deposit(&admin, alice, "BTC", "0.001").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_follow_the_configured_interval() {
    // Every 100 commands: the deposits below write at least one snapshot.
    let h = crate::Harness::start("sqlite", None, None, |config| {
        config.snapshot_every_commands = 100;
    })
    .await;
    // The metrics are the process's: count from what they say now.
    let written = |metrics: &str| {
        metrics
            .lines()
            .find(|line| line.starts_with("agora_core_snapshot_write_seconds_count"))
            .and_then(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = written(&h.metrics().await);
    one_hundred_twenty_commands(&h).await;
    let mut snapshots = 0;
    for _ in 0..100 {
        snapshots = written(&h.metrics().await) - before;
        if snapshots > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(snapshots >= 1, "no snapshot after 120 deposits");
    h.stop().await;

    // The default waits for 100,000 commands: the same deposits write none.
    let h = crate::Harness::start("sqlite", None, None, |_| {}).await;
    let before = written(&h.metrics().await);
    one_hundred_twenty_commands(&h).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(written(&h.metrics().await), before);
    h.stop().await;

    // Fewer than 100 commands between snapshots is refused by name; 0 means never.
    let env = |value: &str| {
        [(
            "AGORA_SNAPSHOT_EVERY_COMMANDS".to_string(),
            value.to_string(),
        )]
    };
    let error = server::Config::load(None, env("10")).expect_err("refused");
    assert!(
        error.to_string().contains("snapshot_every_commands"),
        "{error}"
    );
    assert_eq!(
        server::Config::load(None, env("0"))
            .unwrap()
            .snapshot_every_commands,
        0
    );
}

/// A keyed request whose client stops waiting (here, a client timeout of a few milliseconds)
/// still runs to its end on the server and stores its answer: the retry with the same key
/// gets that answer, and no placement runs twice. Before, the dropped request left its key
/// pending and free, and the retry placed the order again (an IOC or filled order is no
/// longer live, so its id could be used again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_placement_whose_client_gave_up_runs_once() {
    const PLACEMENTS: u64 = 300;
    for h in harnesses("idempotency_gave_up").await {
        let admin = h.admin().await;
        h.market(&admin).await;
        let (alice, alice_token) = h.user(&admin, "alice").await;
        let (bob, bob_token) = h.user(&admin, "bob").await;
        h.deposit(&admin, alice, "BTC", "100").await;
        h.deposit(&admin, bob, "USDT", "100000000").await;
        h.expect(
            StatusCode::CREATED,
            Method::POST,
            "/api/v1/orders",
            Some(&alice_token),
            Some(json!({"market": "BTC-USDT", "side": "sell", "price": "100", "qty": "90"})),
        )
        .await;
        let body = r#"{"market":"BTC-USDT","side":"buy","price":"100","qty":"0.001","tif":"IOC"}"#;
        let place = |client: &reqwest::Client, key: &str| {
            client
                .post(format!("{}/api/v1/orders", h.base))
                .bearer_auth(&bob_token)
                .header("content-type", "application/json")
                .header("idempotency-key", key)
                .body(body)
                .send()
        };
        for n in 0..PLACEMENTS {
            let key = format!("gave-up-{n}");
            let impatient = reqwest::Client::builder()
                .timeout(std::time::Duration::from_micros(500 + (n % 20) * 400))
                .build()
                .unwrap();
            let _ = place(&impatient, &key).await;
            loop {
                let retry = place(&h.client, &key).await.unwrap();
                let status = retry.status();
                let text = retry.text().await.unwrap();
                if status == StatusCode::CONFLICT && text.contains("IN_FLIGHT") {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    continue;
                }
                assert_eq!(status, StatusCode::CREATED, "{key}: {text}");
                break;
            }
        }
        let trades = h
            .expect(
                StatusCode::OK,
                Method::GET,
                "/api/v1/trades?limit=1000",
                Some(&bob_token),
                None,
            )
            .await;
        let mut by_order = std::collections::BTreeMap::<u64, u32>::new();
        for trade in trades.as_array().unwrap() {
            *by_order
                .entry(trade["order"].as_u64().unwrap())
                .or_default() += 1;
        }
        let twice: Vec<_> = by_order.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "orders that traded twice: {twice:?}");
        assert_eq!(by_order.len() as u64, PLACEMENTS, "{trades}");
        h.stop().await;
    }
}

/// The query string is part of a keyed request: the same key with another market to cancel
/// in is another request (409), not the first one's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reused_with_another_query_is_refused() {
    for h in harnesses("idempotency_query").await {
        let admin = h.admin().await;
        h.market(&admin).await;
        let (alice, token) = h.user(&admin, "alice").await;
        h.deposit(&admin, alice, "BTC", "1").await;
        h.expect(
            StatusCode::CREATED,
            Method::POST,
            "/api/v1/orders",
            Some(&token),
            Some(json!({"market": "BTC-USDT", "side": "sell", "price": "100", "qty": "0.1"})),
        )
        .await;
        let cancel_all = |query: &'static str| {
            h.client
                .delete(format!("{}/api/v1/orders?{query}", h.base))
                .bearer_auth(&token)
                .header("idempotency-key", "cancel-all")
                .send()
        };
        let first = cancel_all("market=BTC-USDT").await.unwrap();
        assert_eq!(first.status(), StatusCode::OK);
        let again = cancel_all("market=BTC-USDT").await.unwrap();
        assert_eq!(again.status(), StatusCode::OK);
        assert!(again.headers().contains_key("idempotent-replayed"));
        let other = cancel_all("market=ETH-USDT").await.unwrap();
        assert_eq!(other.status(), StatusCode::CONFLICT);
        assert!(
            other
                .text()
                .await
                .unwrap()
                .contains("IDEMPOTENCY_KEY_REUSED"),
            "another query under the same key"
        );
        h.stop().await;
    }
}

/// A keyed command refused with 409 `CONFLICTING_COMMAND` (another command on the same order
/// was running) is asked to retry: that answer is not kept under its key, and the retry with
/// the same key runs the command instead of being given the 409 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_command_refused_as_conflicting_can_be_retried_with_its_key() {
    const ROUNDS_MAX: usize = 20;
    let h = crate::Harness::start("sqlite", None, None, |_| {}).await;
    let admin = h.admin().await;
    h.market(&admin).await;
    let (alice, token) = h.user(&admin, "alice").await;
    h.deposit(&admin, alice, "BTC", "10").await;
    let modify = |id: u64, key: String, qty: &str| {
        h.client
            .patch(format!("{}/api/v1/orders/{id}", h.base))
            .bearer_auth(&token)
            .header("idempotency-key", key)
            .json(&json!({ "qty": qty }))
            .send()
    };
    let mut refused = Vec::new();
    for round in 0..ROUNDS_MAX {
        let (_, _, placed) = keyed(
            &h,
            &token,
            None,
            r#"{"market":"BTC-USDT","side":"sell","price":"100","qty":"0.5"}"#,
        )
        .await;
        let id = placed["order"]["id"].as_u64().unwrap();
        let sends: Vec<_> = (0..8)
            .map(|n| {
                let send = modify(id, format!("conflict-{round}-{n}"), "0.4");
                async move { (n, send.await.unwrap()) }
            })
            .collect();
        for (n, response) in futures_util::future::join_all(sends).await {
            if response.status() == StatusCode::CONFLICT {
                let answer: serde_json::Value = response.json().await.unwrap();
                assert_eq!(answer["error"]["code"], "CONFLICTING_COMMAND");
                refused.push((id, format!("conflict-{round}-{n}")));
            }
        }
        if !refused.is_empty() {
            break;
        }
    }
    assert!(!refused.is_empty(), "no command was refused as conflicting");
    for (id, key) in refused {
        let retry = modify(id, key, "0.4").await.unwrap();
        assert!(
            !retry.headers().contains_key("idempotent-replayed"),
            "the 409 was kept under its key"
        );
        // The first modify to 0.4 won; this one changes nothing and is refused as such.
        assert_eq!(retry.status(), StatusCode::UNPROCESSABLE_ENTITY);
    }
    h.stop().await;
}
