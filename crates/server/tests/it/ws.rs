//! The WebSocket API with a real client: subscriptions, throttled book deltas after a
//! snapshot, the caller's own channels, commands with request ids, and the limits.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::{Harness, harnesses};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(h: &Harness) -> Socket {
    let url = format!("{}/api/v1/ws", h.base.replace("http://", "ws://"));
    tokio_tungstenite::connect_async(url)
        .await
        .expect("upgrade")
        .0
}

async fn send(socket: &mut Socket, value: Value) {
    socket
        .send(Message::Text(value.to_string().into()))
        .await
        .unwrap();
}

/// The next JSON message whose type is `kind` (others are skipped), within 5 s.
async fn next_of(socket: &mut Socket, kind: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let message = tokio::time::timeout_at(deadline, socket.next())
            .await
            .unwrap_or_else(|_| panic!("no {kind} message within 5 s"))
            .expect("the socket is open")
            .unwrap();
        if let Message::Text(text) = message {
            let value: Value = serde_json::from_str(&text).unwrap();
            if value["type"] == kind {
                return value;
            }
        }
    }
}

/// Collects JSON messages until `done` holds for them, within 5 s.
async fn collect_until(socket: &mut Socket, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    while !done(&seen) {
        let message = tokio::time::timeout_at(deadline, socket.next())
            .await
            .unwrap_or_else(|_| panic!("incomplete after 5 s: {seen:?}"))
            .expect("the socket is open")
            .unwrap();
        if let Message::Text(text) = message {
            seen.push(serde_json::from_str(&text).unwrap());
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_see_the_book_trades_and_their_own_orders() {
    for h in harnesses("ws").await {
        let admin = h.admin().await;
        h.market(&admin).await;
        let (alice, alice_token) = h.user(&admin, "alice").await;
        let (bob, bob_token) = h.user(&admin, "bob").await;
        h.deposit(&admin, alice, "BTC", "1").await;
        h.deposit(&admin, bob, "USDT", "100000").await;
        h.expect(
            StatusCode::CREATED,
            Method::POST,
            "/api/v1/orders",
            Some(&alice_token),
            Some(json!({"market": "BTC-USDT", "side": "sell", "price": "50000", "qty": "0.5"})),
        )
        .await;

        // An anonymous watcher of the book and the trades.
        let mut watcher = connect(&h).await;
        send(
            &mut watcher,
            json!({"op": "subscribe", "channel": "book.BTC-USDT", "id": 1}),
        )
        .await;
        let snapshot = next_of(&mut watcher, "snapshot").await;
        assert_eq!(
            snapshot["asks"],
            json!([{"price": "50000.00", "qty": "0.5000", "orders": 1}]),
            "{}",
            h.backend
        );
        send(
            &mut watcher,
            json!({"op": "subscribe", "channel": "trades.BTC-USDT", "id": 2}),
        )
        .await;
        next_of(&mut watcher, "subscribed").await;
        // Private channels need authentication.
        send(
            &mut watcher,
            json!({"op": "subscribe", "channel": "orders", "id": 3}),
        )
        .await;
        let refused = next_of(&mut watcher, "error").await;
        assert_eq!(
            (refused["code"].as_str(), refused["id"].as_u64()),
            (Some("UNAUTHORIZED"), Some(3))
        );

        // Bob, signed in over the socket, places through it and follows his own channels.
        let mut bob_socket = connect(&h).await;
        send(&mut bob_socket, json!({"op": "auth", "token": bob_token})).await;
        assert_eq!(next_of(&mut bob_socket, "authenticated").await["user"], bob);
        for (n, channel) in ["orders", "fills", "balances"].iter().enumerate() {
            send(
                &mut bob_socket,
                json!({"op": "subscribe", "channel": channel, "id": 10 + n}),
            )
            .await;
        }
        next_of(&mut bob_socket, "balances").await;
        send(
            &mut bob_socket,
            json!({"op": "place", "id": "r-1", "args":
            {"market": "BTC-USDT", "side": "buy", "price": "50100", "qty": "0.2"}}),
        )
        .await;
        // The answer, the order's acceptance, its fill and the new balances arrive in an
        // order that depends on timing (the feed follows the journal, the answer the
        // acknowledgement): collect until each has come.
        let seen = collect_until(&mut bob_socket, |seen| {
            ["response", "order", "fill"]
                .iter()
                .all(|kind| seen.iter().any(|m| m["type"] == *kind))
                && seen.iter().any(|m| {
                    m["type"] == "balances"
                        && m["balances"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .any(|b| b["asset"] == "BTC" && b["available"] == "0.19960000")
                })
        })
        .await;
        let of = |kind: &str| seen.iter().find(|m| m["type"] == kind).unwrap().clone();
        let response = of("response");
        assert_eq!(
            (response["id"].as_str(), response["status"].as_u64()),
            (Some("r-1"), Some(201)),
            "{response}"
        );
        assert_eq!(response["body"]["order"]["status"], "filled");
        assert_eq!(of("order")["event"], "accepted");
        let fill = of("fill");
        assert_eq!(
            (
                fill["side"].as_str(),
                fill["qty"].as_str(),
                fill["maker"].as_bool()
            ),
            (Some("buy"), Some("0.2000"), Some(false))
        );
        // A bad command over the socket gets the REST answer: 422 with the field.
        send(
            &mut bob_socket,
            json!({"op": "place", "id": "r-2", "args":
            {"market": "BTC-USDT", "side": "buy", "price": "50100", "qty": "0.00001"}}),
        )
        .await;
        let response = next_of(&mut bob_socket, "response").await;
        assert_eq!(response["status"], 422);
        assert_eq!(response["body"]["error"]["field"], "qty");

        // The watcher saw the trade and, throttled, the level change after its snapshot.
        let trade = next_of(&mut watcher, "trade").await;
        assert_eq!(
            (trade["price"].as_str(), trade["taker_side"].as_str()),
            (Some("50000.00"), Some("buy"))
        );
        let delta = next_of(&mut watcher, "book").await;
        assert!(delta["seq"].as_u64().unwrap() > snapshot["seq"].as_u64().unwrap());
        assert_eq!(
            delta["changes"],
            json!([{"side": "sell", "price": "50000.00", "qty": "0.3000", "orders": 1}])
        );
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_message_limit_is_disconnected() {
    let h = Harness::start("sqlite", None, None, |config| {
        config.limits.ws_messages_per_minute = 5
    })
    .await;
    let mut socket = connect(&h).await;
    for _ in 0..5 {
        send(&mut socket, json!({"op": "ping"})).await;
        next_of(&mut socket, "pong").await;
    }
    send(&mut socket, json!({"op": "ping"})).await;
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Close(frame))) => break frame.unwrap(),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(close.reason.as_str(), "message limit exceeded");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_disconnected_instead_of_buffered() {
    let h = Harness::start("sqlite", None, None, |config| {
        config.limits.ws_messages_per_minute = 1_000_000;
        config.limits.ws_send_buffer_messages = 8;
    })
    .await;
    // A client that sends pings as fast as it can and does not read their answers while it
    // sends, over a socket with a small receive buffer.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket
        .connect(h.server.as_ref().unwrap().addr)
        .await
        .unwrap();
    let url = format!("{}/api/v1/ws", h.base.replace("http://", "ws://"));
    let (mut ws, _) =
        tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream))
            .await
            .unwrap();
    let ping = Message::Text(
        json!({"op": "ping", "id": "a-fairly-long-request-id-to-fill-buffers-faster"})
            .to_string()
            .into(),
    );
    let sent = 2_000;
    for _ in 0..sent {
        if ws.feed(ping.clone()).await.is_err() {
            break;
        }
    }
    let _ = ws.flush().await;
    // Then read: the answers stop short of what was sent. The close frame (1008, "slow
    // consumer") arrives unless the connection is reset first, which the client's own unread
    // pings can cause; the server's count says what it decided either way.
    let mut pongs = 0;
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        match message {
            Ok(Message::Text(_)) => pongs += 1,
            Ok(Message::Close(frame)) => {
                let frame = frame.expect("a close frame has a reason");
                assert_eq!(
                    (u16::from(frame.code), frame.reason.as_str()),
                    (1008, "slow consumer")
                );
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert!(pongs < sent, "{pongs} answers to {sent} pings");
    let metrics = h
        .client
        .get(format!("{}/metrics", h.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("agora_ws_slow_consumer_disconnects_total"),
        "{metrics}"
    );
    h.stop().await;
}
