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
