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

        // The watcher saw the trade and, throttled, the level change after its snapshot. The
        // two come by different paths (the trade with the command's events, the delta from the
        // fan-out, whose first change after a quiet spell goes at once), in either order.
        let seen = collect_until(&mut watcher, |seen| {
            ["trade", "book"]
                .iter()
                .all(|kind| seen.iter().any(|m| m["type"] == *kind))
        })
        .await;
        let of = |kind: &str| seen.iter().find(|m| m["type"] == kind).unwrap().clone();
        let trade = of("trade");
        assert_eq!(
            (trade["price"].as_str(), trade["taker_side"].as_str()),
            (Some("50000.00"), Some("buy"))
        );
        let delta = of("book");
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
    let metrics = h.metrics().await;
    assert!(
        metrics.contains("agora_ws_slow_consumer_disconnects_total"),
        "{metrics}"
    );
    h.stop().await;
}

/// Signs a new socket in as `token`.
async fn signed_in(h: &Harness, token: &str) -> Socket {
    let mut socket = connect(h).await;
    send(&mut socket, json!({"op": "auth", "token": token})).await;
    next_of(&mut socket, "authenticated").await;
    socket
}

/// A resting buy order over the socket, far from any sell.
fn resting_buy(id: &str) -> Value {
    json!({"op": "place", "id": id, "args":
        {"market": "BTC-USDT", "side": "buy", "price": "40000", "qty": "0.001"}})
}

/// Holds the core's single writer inside a read until the returned sender is used or
/// dropped, so that every command behind it waits: a command still in flight, on purpose.
async fn stall_core(h: &Harness) -> (std::sync::mpsc::Sender<()>, tokio::task::JoinHandle<()>) {
    let app = h.server.as_ref().unwrap().app().clone();
    let (entered, inside) = tokio::sync::oneshot::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let stalled = tokio::spawn(async move {
        app.read(move |_| {
            let _ = entered.send(());
            tokio::task::block_in_place(|| {
                let _ = released.recv();
            });
        })
        .await
        .unwrap();
    });
    inside.await.expect("the core runs the read");
    (release, stalled)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_is_answered_while_an_earlier_one_is_still_running() {
    for h in harnesses("ws_pipeline").await {
        let admin = h.admin().await;
        h.market(&admin).await;
        let (bob, bob_token) = h.user(&admin, "bob").await;
        h.deposit(&admin, bob, "USDT", "100000").await;
        let mut socket = signed_in(&h, &bob_token).await;
        // A first place, so that the market is known and a refused one needs no core.
        send(&mut socket, resting_buy("warm")).await;
        assert_eq!(next_of(&mut socket, "response").await["status"], 201);

        let (release, stalled) = stall_core(&h).await;
        send(&mut socket, resting_buy("slow")).await;
        send(
            &mut socket,
            json!({"op": "place", "id": "refused", "args":
            {"market": "BTC-USDT", "side": "buy", "price": "40000", "qty": "0.00001"}}),
        )
        .await;
        send(&mut socket, json!({"op": "ping", "id": "p"})).await;
        // The later command and the ping are answered while the first waits for the core.
        let seen = collect_until(&mut socket, |seen| {
            seen.iter().any(|m| m["type"] == "pong" && m["id"] == "p")
                && seen.iter().any(|m| m["id"] == "refused")
        })
        .await;
        let refused = seen.iter().find(|m| m["id"] == "refused").unwrap();
        assert_eq!(
            (
                refused["status"].as_u64(),
                refused["body"]["error"]["field"].as_str()
            ),
            (Some(422), Some("qty")),
            "{}: {refused}",
            h.backend
        );
        assert!(
            !seen.iter().any(|m| m["id"] == "slow"),
            "answered while the core was held: {seen:?}"
        );
        release.send(()).unwrap();
        stalled.await.unwrap();
        let slow = next_of(&mut socket, "response").await;
        assert_eq!(
            (slow["id"].as_str(), slow["status"].as_u64()),
            (Some("slow"), Some(201)),
            "{slow}"
        );
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_with_the_most_commands_in_flight_reads_nothing_more_until_one_ends() {
    let h = Harness::start("sqlite", None, None, |_| {}).await;
    let admin = h.admin().await;
    h.market(&admin).await;
    let (bob, bob_token) = h.user(&admin, "bob").await;
    h.deposit(&admin, bob, "USDT", "100000").await;
    let mut socket = signed_in(&h, &bob_token).await;
    let (release, stalled) = stall_core(&h).await;
    let most = server::ws::limits::COMMANDS_IN_FLIGHT_MAX;
    for n in 0..most {
        send(&mut socket, resting_buy(&format!("o-{n}"))).await;
    }
    send(&mut socket, json!({"op": "ping", "id": "p"})).await;
    // The ping waits unread behind the full set of commands: nothing comes back, and the
    // socket stays open (backpressure, not an error).
    let early = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => break Some(text),
                // The server's own pings.
                Some(Ok(_)) => continue,
                _ => break None,
            }
        }
    })
    .await;
    assert!(early.is_err(), "{early:?}");
    release.send(()).unwrap();
    stalled.await.unwrap();
    let seen = collect_until(&mut socket, |seen| {
        seen.iter().filter(|m| m["type"] == "response").count() == most
            && seen.iter().any(|m| m["type"] == "pong")
    })
    .await;
    let mut answered: Vec<String> = seen
        .iter()
        .filter(|m| m["type"] == "response")
        .inspect(|m| assert_eq!(m["status"], 201, "{m}"))
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    answered.sort();
    let mut sent: Vec<String> = (0..most).map(|n| format!("o-{n}")).collect();
    sent.sort();
    assert_eq!(answered, sent);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_listens_only_to_the_feeds_its_subscriptions_need() {
    let h = Harness::start("sqlite", None, None, |_| {}).await;
    let admin = h.admin().await;
    h.market(&admin).await;
    let feed = h.server.as_ref().unwrap().app().feed.clone();
    let listening = |commands, shared| server::ws::FeedReceivers { commands, shared };
    let mut socket = connect(&h).await;
    send(&mut socket, json!({"op": "ping"})).await;
    next_of(&mut socket, "pong").await;
    // Subscribed to nothing: no durable command and no book change wakes it.
    assert_eq!(feed.receivers(), listening(0, 0));
    let steps = [
        ("subscribe", "book.BTC-USDT", "snapshot", listening(0, 1)),
        (
            "subscribe",
            "trades.BTC-USDT",
            "subscribed",
            listening(1, 1),
        ),
        (
            "unsubscribe",
            "book.BTC-USDT",
            "unsubscribed",
            listening(1, 0),
        ),
        (
            "unsubscribe",
            "trades.BTC-USDT",
            "unsubscribed",
            listening(0, 0),
        ),
    ];
    for (op, channel, answer, expected) in steps {
        send(&mut socket, json!({"op": op, "channel": channel})).await;
        next_of(&mut socket, answer).await;
        assert_eq!(feed.receivers(), expected, "after {op} {channel}");
    }
    drop(socket);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn book_subscribers_share_each_delta_and_skip_what_their_snapshot_shows() {
    for h in harnesses("ws_fan_out").await {
        let admin = h.admin().await;
        h.market(&admin).await;
        let (alice, alice_token) = h.user(&admin, "alice").await;
        h.deposit(&admin, alice, "BTC", "1").await;
        let sell = |price: &str, qty: &str| json!({"market": "BTC-USDT", "side": "sell", "price": price, "qty": qty});
        let subscribe = json!({"op": "subscribe", "channel": "book.BTC-USDT"});
        let mut early = connect(&h).await;
        send(&mut early, subscribe.clone()).await;
        next_of(&mut early, "snapshot").await;
        h.expect(
            StatusCode::CREATED,
            Method::POST,
            "/api/v1/orders",
            Some(&alice_token),
            Some(sell("50000", "0.5")),
        )
        .await;
        // The late subscriber's snapshot already shows the first order.
        let mut late = connect(&h).await;
        send(&mut late, subscribe).await;
        let snapshot = next_of(&mut late, "snapshot").await;
        assert_eq!(
            snapshot["asks"],
            json!([{"price": "50000.00", "qty": "0.5000", "orders": 1}])
        );
        let second = h
            .expect(
                StatusCode::CREATED,
                Method::POST,
                "/api/v1/orders",
                Some(&alice_token),
                Some(sell("50001", "0.1")),
            )
            .await;
        let second_seq = second["seq"].as_u64().unwrap();
        let mut last_deltas = Vec::new();
        let late_from = snapshot["seq"].as_u64().unwrap();
        for (socket, from) in [(&mut early, 0), (&mut late, late_from)] {
            let seen = collect_until(socket, |seen| {
                seen.iter()
                    .any(|m| m["type"] == "book" && m["seq"].as_u64() >= Some(second_seq))
            })
            .await;
            let deltas: Vec<&Value> = seen.iter().filter(|m| m["type"] == "book").collect();
            for delta in &deltas {
                assert!(
                    delta["seq"].as_u64().unwrap() > from,
                    "{delta} after {from}"
                );
            }
            last_deltas.push(deltas.last().copied().cloned().unwrap());
        }
        // Every subscriber gets the same delta (one serialization shared by all).
        assert_eq!(last_deltas[0], last_deltas[1], "{}", h.backend);
        assert_eq!(last_deltas[0]["seq"].as_u64(), Some(second_seq));
        assert!(
            last_deltas[0]["changes"].as_array().unwrap().contains(
                &json!({"side": "sell", "price": "50001.00", "qty": "0.1000", "orders": 1})
            ),
            "{}",
            last_deltas[0]
        );
        h.stop().await;
    }
}

/// Sends one order command and reads its answer.
async fn command(socket: &mut Socket, message: Value) -> Value {
    send(socket, message).await;
    next_of(socket, "response").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_commands_share_idempotency_keys_with_rest() {
    for h in harnesses("ws_idempotency").await {
        let admin = h.admin().await;
        h.market(&admin).await;
        let (bob, bob_token) = h.user(&admin, "bob").await;
        h.deposit(&admin, bob, "USDT", "100000").await;
        let mut socket = signed_in(&h, &bob_token).await;
        let args = json!({"market": "BTC-USDT", "side": "buy", "price": "40000", "qty": "0.001"});
        let place = |id: &str, key: &str| json!({"op": "place", "id": id, "idempotency_key": key, "args": args});

        let first = command(&mut socket, place("a", "k-1")).await;
        assert_eq!(
            (first["status"].as_u64(), first.get("replayed")),
            (Some(201), None),
            "{}: {first}",
            h.backend
        );
        let again = command(&mut socket, place("b", "k-1")).await;
        assert_eq!(
            (again["id"].as_str(), again["replayed"].as_bool()),
            (Some("b"), Some(true))
        );
        assert_eq!(again["body"], first["body"], "the stored answer");
        // The same key over REST, for the same request, is the same command.
        let body = serde_json::to_string(&args).unwrap();
        let (status, replayed, rest) =
            crate::trading::keyed(&h, &bob_token, Some("k-1"), &body).await;
        assert_eq!(
            (status, replayed.as_deref(), &rest),
            (StatusCode::CREATED, Some("true"), &first["body"])
        );
        // Another command under the key is refused.
        let mut other = place("c", "k-1");
        other["args"]["qty"] = json!("0.002");
        let refused = command(&mut socket, other).await;
        assert_eq!(
            (
                refused["status"].as_u64(),
                refused["body"]["error"]["code"].as_str()
            ),
            (Some(409), Some("IDEMPOTENCY_KEY_REUSED"))
        );

        // A cancel given again answers as the first did, not "no such live order".
        let order = first["body"]["order"]["id"].as_u64().unwrap();
        let cancel =
            json!({"op": "cancel", "id": "x", "idempotency_key": "c-1", "args": {"id": order}});
        let cancelled = command(&mut socket, cancel.clone()).await;
        assert_eq!(cancelled["status"], 200, "{cancelled}");
        let again = command(&mut socket, cancel).await;
        assert_eq!(
            (again["status"].as_u64(), again["replayed"].as_bool()),
            (Some(200), Some(true)),
            "{again}"
        );
        assert_eq!(again["body"], cancelled["body"]);
        let unkeyed = command(
            &mut socket,
            json!({"op": "cancel", "id": "y", "args": {"id": order}}),
        )
        .await;
        assert_eq!(unkeyed["status"], 404, "without a key it runs again");

        // A placement's client order id is its key, over the socket as over REST.
        let mut with_id = args.clone();
        with_id["client_order_id"] = json!("bot-1");
        let by_id = json!({"op": "place", "id": "d", "args": with_id});
        let placed = command(&mut socket, by_id.clone()).await;
        let again = command(&mut socket, by_id).await;
        assert_eq!(
            (again["replayed"].as_bool(), &again["body"]),
            (Some(true), &placed["body"])
        );

        // A malformed key is refused by field, and nothing is placed.
        for bad in [json!(5), json!(""), json!("a b")] {
            let mut message = place("e", "unused");
            message["idempotency_key"] = bad;
            let refused = command(&mut socket, message).await;
            assert_eq!(
                (
                    refused["status"].as_u64(),
                    refused["body"]["error"]["field"].as_str()
                ),
                (Some(422), Some("idempotency_key")),
                "{refused}"
            );
        }
        let open = h
            .expect(
                StatusCode::OK,
                Method::GET,
                "/api/v1/orders?status=open",
                Some(&bob_token),
                None,
            )
            .await;
        let ids: Vec<u64> = open
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, [placed["body"]["order"]["id"].as_u64().unwrap()]);
        h.stop().await;
    }
}

/// Messages are read field by field: a message that is no object is malformed, a field of
/// the wrong type is its operation's error, and an order command's answer carries the
/// request id exactly as the client wrote it, even one no 64-bit number holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_messages_are_read_field_by_field_and_ids_echo_as_written() {
    for h in harnesses("ws_fields").await {
        let admin = h.admin().await;
        h.market(&admin).await;
        let (bob, bob_token) = h.user(&admin, "bob").await;
        h.deposit(&admin, bob, "USDT", "100000").await;
        let mut socket = signed_in(&h, &bob_token).await;

        let id = "123456789012345678901234567890";
        let text = format!(
            r#"{{"op":"place","id":{id},"args":{{"market":"BTC-USDT","side":"buy","price":"40000","qty":"0.001"}}}}"#
        );
        socket.send(Message::Text(text.into())).await.unwrap();
        let answer = loop {
            let message = tokio::time::timeout(Duration::from_secs(5), socket.next())
                .await
                .expect("an answer within 5 s")
                .expect("the socket is open")
                .unwrap();
            if let Message::Text(text) = message
                && text.contains(r#""type":"response""#)
            {
                break text;
            }
        };
        assert!(
            answer.contains(&format!(r#""id":{id},"#)),
            "{}: {answer}",
            h.backend
        );
        let answer: Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(answer["status"], 201, "{answer}");

        // Not an object: malformed, whatever it holds.
        for text in ["[]", "[\"place\"]", "5", "not json"] {
            socket.send(Message::Text(text.into())).await.unwrap();
            let error = next_of(&mut socket, "error").await;
            assert_eq!(error["code"], "MALFORMED_JSON", "{text}: {error}");
        }
        // A field of the wrong type: that operation's error, with the id echoed.
        for (message, code) in [
            (json!({"op": 5, "id": "a"}), "UNKNOWN_OP"),
            (
                json!({"op": "subscribe", "channel": 5, "id": "b"}),
                "INVALID_FIELD",
            ),
            (
                json!({"op": "auth", "token": ["x"], "id": "c"}),
                "INVALID_FIELD",
            ),
        ] {
            let expected_id = message["id"].clone();
            send(&mut socket, message).await;
            let error = next_of(&mut socket, "error").await;
            assert_eq!((&error["code"], &error["id"]), (&json!(code), &expected_id));
        }
        // A command whose args are no object is refused; one without a target names `id`.
        for (message, field) in [
            (json!({"op": "place", "id": "d", "args": 5}), Value::Null),
            (
                json!({"op": "cancel", "id": "e", "args": {"id": "x"}}),
                json!("id"),
            ),
            (json!({"op": "cancel", "id": "f"}), json!("id")),
        ] {
            let refused = command(&mut socket, message).await;
            assert_eq!(refused["status"], 422, "{refused}");
            assert_eq!(refused["body"]["error"]["field"], field, "{refused}");
        }
        h.stop().await;
    }
}
