//! The WebSocket API at `/api/v1/ws`: subscriptions to books (a snapshot, then throttled
//! deltas), trades, tickers, the caller's orders, fills and balances, and (operators) queue
//! events; and order commands with request ids, answered like their REST twins.
//!
//! Every connection is bounded: at most [`limits::MESSAGES_PER_MINUTE`] messages in, at most
//! [`limits::SUBSCRIPTIONS_MAX`] subscriptions, and a send buffer of
//! `ws_send_buffer_messages`; a consumer too slow to empty it is disconnected with close code
//! 1008 and the reason `slow consumer`, so it can never grow the server's memory. A connection
//! that sends nothing (not even a pong) for [`limits::IDLE_MS`] is closed.
//!
//! Events come from the projector, in journal order and only once durable, each with its
//! `seq`; a book snapshot carries the `seq` of the state it shows, and its deltas only follow
//! commands after it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use book::{Event, MarketId, MarketSpec, Side};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use crate::app::App;
use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::wire::{price_text, qty_text};

/// Named bounds.
pub mod limits {
    /// Messages a client may send in a minute before it is disconnected.
    pub const MESSAGES_PER_MINUTE: u32 = 300;
    /// Subscriptions of one connection.
    pub const SUBSCRIPTIONS_MAX: usize = 64;
    /// Largest message accepted, in bytes.
    pub const MESSAGE_BYTES_MAX: usize = 64 * 1024;
    /// A connection silent this long is closed.
    pub const IDLE_MS: u64 = 60_000;
    /// The server pings this often.
    pub const PING_EVERY_MS: u64 = 20_000;
    /// Book deltas are sent at most this often.
    pub const BOOK_THROTTLE_MS: u64 = 100;
    /// Levels per side in a book snapshot.
    pub const SNAPSHOT_LEVELS: usize = 100;
    /// Durable event batches buffered for all connections; a connection that falls this far
    /// behind is a slow consumer.
    pub const FEED_BATCHES: usize = 8_192;
}

/// What one journaled command did, as the WebSocket feed sees it.
#[derive(Debug)]
pub struct Published {
    /// Its journal sequence number.
    pub seq: u64,
    /// The engine's events.
    pub events: Vec<Event>,
    /// Users whose balances changed.
    pub balance_users: Vec<u64>,
}

/// The feed the projector publishes into.
pub type Feed = broadcast::Sender<Arc<Published>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Topic {
    Book(MarketId),
    Trades(MarketId),
    Ticker(MarketId),
    Orders,
    Fills,
    Balances,
}

/// The upgrade handler.
#[utoipa::path(get, path = "/api/v1/ws", tag = "websocket",
    summary = "Upgrade to the WebSocket API (messages: docs/api.md)",
    responses(
        (status = 101, description = "Switching protocols"),
        (status = 400, description = "Not a WebSocket upgrade request", body = crate::error::ErrorBody),
    ))]
pub async fn upgrade(
    State(app): State<Arc<App>>,
    caller: Option<axum::Extension<Caller>>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    use axum::response::IntoResponse;
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => {
            return ApiError::bad_request("NOT_A_WEBSOCKET", rejection.body_text()).into_response();
        }
    };
    let caller = caller.map(|axum::Extension(c)| c);
    upgrade
        .max_message_size(limits::MESSAGE_BYTES_MAX)
        .on_upgrade(move |socket| connection(app, caller, socket))
}

struct Connection {
    app: Arc<App>,
    caller: Option<Caller>,
    out: mpsc::Sender<Message>,
    topics: HashSet<Topic>,
    queues: HashSet<String>,
    specs: HashMap<MarketId, MarketSpec>,
    /// Book changes since the last flush: (market, side, price) → (qty, orders).
    pending_book: BTreeMap<(MarketId, u8, i64), (u64, u32)>,
    /// The seq of each subscribed book's snapshot: deltas at or before it are skipped.
    book_from: HashMap<MarketId, u64>,
    dirty_tickers: HashSet<MarketId>,
    dirty_balances: bool,
    last_seq: u64,
}

/// Why the connection ends.
enum End {
    Closed,
    Shutdown,
    Slow,
    Limit(&'static str),
}

async fn connection(app: Arc<App>, caller: Option<Caller>, socket: WebSocket) {
    metrics::gauge!("agora_ws_connections").increment(1.0);
    let (out, mut queued) = mpsc::channel::<Message>(app.config.limits.ws_send_buffer_messages);
    let (mut sink, mut stream) = socket.split();
    // The writer: sends what is queued, in order; a close frame queued last ends it.
    let writer = tokio::spawn(async move {
        while let Some(message) = queued.recv().await {
            let closing = matches!(message, Message::Close(_));
            if sink.send(message).await.is_err() || closing {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let mut feed = app.feed.subscribe();
    let mut queue_events = app.queue.subscribe();
    let mut conn = Connection {
        app: app.clone(),
        caller,
        out: out.clone(),
        topics: HashSet::new(),
        queues: HashSet::new(),
        specs: HashMap::new(),
        pending_book: BTreeMap::new(),
        book_from: HashMap::new(),
        dirty_tickers: HashSet::new(),
        dirty_balances: false,
        last_seq: 0,
    };
    let mut throttle = tokio::time::interval(Duration::from_millis(limits::BOOK_THROTTLE_MS));
    let mut ping = tokio::time::interval(Duration::from_millis(limits::PING_EVERY_MS));
    let mut last_heard = Instant::now();
    let mut window_start = Instant::now();
    let mut window_messages = 0u32;
    let mut closing = app.closing.subscribe();
    let end = loop {
        if *closing.borrow_and_update() {
            break End::Shutdown;
        }
        tokio::select! {
            _ = closing.changed() => break End::Shutdown,
            incoming = stream.next() => {
                let Some(Ok(message)) = incoming else { break End::Closed };
                last_heard = Instant::now();
                let text = match message {
                    Message::Text(text) => Some(text),
                    Message::Binary(_) => None,
                    Message::Close(_) => break End::Closed,
                    // Pings are answered by the library; pongs only prove life.
                    Message::Ping(_) | Message::Pong(_) => continue,
                };
                // Control frames do not count; every data message does.
                if window_start.elapsed() >= Duration::from_secs(60) {
                    window_start = Instant::now();
                    window_messages = 0;
                }
                window_messages += 1;
                if window_messages > app.config.limits.ws_messages_per_minute {
                    break End::Limit("message limit exceeded");
                }
                let Some(text) = text else {
                    if !conn.send(json!({"type": "error", "code": "UNSUPPORTED_MESSAGE", "message": "send JSON text messages"})) {
                        break End::Slow;
                    }
                    continue;
                };
                if !conn.handle(text.as_str()).await {
                    break End::Slow;
                }
            }
            published = feed.recv() => match published {
                Ok(published) => if !conn.publish(&published).await { break End::Slow },
                Err(broadcast::error::RecvError::Lagged(_)) => break End::Slow,
                Err(broadcast::error::RecvError::Closed) => break End::Closed,
            },
            event = queue_events.recv() => match event {
                Ok(event) => {
                    if conn.queues.contains(&event.queue) {
                        let message = json!({"type": "queue", "channel": format!("queue.{}", event.queue),
                            "job": event.job_id, "kind": event.kind, "event": queue_event_name(&event.event)});
                        if !conn.send(message) { break End::Slow }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) if conn.queues.is_empty() => {}
                Err(broadcast::error::RecvError::Lagged(_)) => break End::Slow,
                Err(broadcast::error::RecvError::Closed) => {}
            },
            _ = throttle.tick() => if !conn.flush().await { break End::Slow },
            _ = ping.tick() => {
                if last_heard.elapsed() >= Duration::from_millis(limits::IDLE_MS) {
                    break End::Limit("idle timeout");
                }
                if conn.out.try_send(Message::Ping(Default::default())).is_err() { break End::Slow }
            }
        }
    };
    let close = |code: u16, reason: &'static str| {
        Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        }))
    };
    match end {
        End::Closed => {
            let _ = out.try_send(close(1000, "bye"));
        }
        End::Shutdown => {
            let _ = out.try_send(close(1001, "server shutting down"));
        }
        End::Slow => {
            metrics::counter!("agora_ws_slow_consumer_disconnects_total").increment(1);
            // The buffer is full: the close frame waits for room, as long as the writer lives.
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                out.send(close(1008, "slow consumer")),
            )
            .await;
        }
        End::Limit(reason) => {
            let _ = out.try_send(close(1008, reason));
        }
    }
    drop(conn);
    drop(out);
    // Read (and drop) what the client still sends while the close frame goes out: closing a
    // socket with unread data would reset it before the client reads the reason.
    let drain = async { while let Some(Ok(_)) = stream.next().await {} };
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::select! {
            _ = writer => {}
            _ = drain => {}
        }
    })
    .await;
    metrics::gauge!("agora_ws_connections").decrement(1.0);
}

impl Connection {
    /// Queues a message; false when the buffer is full (a slow consumer).
    fn send(&self, value: Value) -> bool {
        self.out
            .try_send(Message::Text(value.to_string().into()))
            .is_ok()
    }

    fn error(&self, id: &Value, code: &str, message: &str) -> bool {
        self.send(json!({"type": "error", "id": id, "code": code, "message": message}))
    }

    async fn handle(&mut self, text: &str) -> bool {
        let Ok(Value::Object(message)) = serde_json::from_str::<Value>(text) else {
            return self.error(
                &Value::Null,
                "MALFORMED_JSON",
                "each message must be a JSON object",
            );
        };
        let id = message.get("id").cloned().unwrap_or(Value::Null);
        let op = message.get("op").and_then(Value::as_str).unwrap_or("");
        match op {
            "ping" => self.send(json!({"type": "pong", "id": id})),
            "auth" => {
                let Some(token) = message.get("token").and_then(Value::as_str) else {
                    return self.error(&id, "INVALID_FIELD", "auth needs token");
                };
                match self.app.auth.verify_token(token) {
                    Ok(caller) => {
                        self.caller = Some(caller);
                        self.send(json!({"type": "authenticated", "id": id, "user": caller.user}))
                    }
                    Err(e) => self.error(&id, "UNAUTHORIZED", &e.message),
                }
            }
            "subscribe" | "unsubscribe" => {
                let Some(channel) = message.get("channel").and_then(Value::as_str) else {
                    return self.error(&id, "INVALID_FIELD", "name a channel");
                };
                self.subscription(op == "subscribe", channel, &id).await
            }
            "place" | "cancel" | "modify" => self.command(op, &message, &id).await,
            _ => self.error(
                &id,
                "UNKNOWN_OP",
                "op must be auth, ping, subscribe, unsubscribe, place, cancel or modify",
            ),
        }
    }

    async fn market(&mut self, symbol: &str) -> Result<MarketId, ApiError> {
        let (id, spec) = crate::api::find_market(&self.app, symbol).await?;
        self.specs.insert(id, spec);
        Ok(id)
    }

    async fn subscription(&mut self, subscribe: bool, channel: &str, id: &Value) -> bool {
        let topic = match channel.split_once('.') {
            Some(("book", m)) => self.market(m).await.map(Topic::Book),
            Some(("trades", m)) => self.market(m).await.map(Topic::Trades),
            Some(("ticker", m)) => self.market(m).await.map(Topic::Ticker),
            Some(("queue", name)) => {
                let allowed = self.caller.is_some_and(|c| c.role >= Role::Operator);
                if !allowed {
                    return self.error(id, "FORBIDDEN", "queue channels need the operator role");
                }
                if subscribe {
                    if self.queues.len() + self.topics.len() >= limits::SUBSCRIPTIONS_MAX {
                        return self.error(id, "TOO_MANY_SUBSCRIPTIONS", "unsubscribe first");
                    }
                    self.queues.insert(name.to_string());
                } else {
                    self.queues.remove(name);
                }
                return self.send(json!({"type": if subscribe {"subscribed"} else {"unsubscribed"}, "id": id, "channel": channel}));
            }
            None if matches!(channel, "orders" | "fills" | "balances") => {
                if self.caller.is_none() {
                    return self.error(
                        id,
                        "UNAUTHORIZED",
                        "authenticate first: send {\"op\":\"auth\",\"token\":…}",
                    );
                }
                Ok(match channel {
                    "orders" => Topic::Orders,
                    "fills" => Topic::Fills,
                    _ => Topic::Balances,
                })
            }
            _ => {
                return self.error(
                    id,
                    "UNKNOWN_CHANNEL",
                    "channels: book.M, trades.M, ticker.M, orders, fills, balances, queue.NAME",
                );
            }
        };
        let topic = match topic {
            Ok(topic) => topic,
            Err(e) => return self.error(id, e.code, &e.message),
        };
        if !subscribe {
            self.topics.remove(&topic);
            return self.send(json!({"type": "unsubscribed", "id": id, "channel": channel}));
        }
        if self.topics.len() + self.queues.len() >= limits::SUBSCRIPTIONS_MAX {
            return self.error(id, "TOO_MANY_SUBSCRIPTIONS", "unsubscribe first");
        }
        self.topics.insert(topic);
        if !self.send(json!({"type": "subscribed", "id": id, "channel": channel})) {
            return false;
        }
        match topic {
            Topic::Book(market) => self.book_snapshot(market, channel).await,
            Topic::Ticker(market) => {
                self.dirty_tickers.insert(market);
                true
            }
            Topic::Balances => {
                self.dirty_balances = true;
                true
            }
            _ => true,
        }
    }

    async fn book_snapshot(&mut self, market: MarketId, channel: &str) -> bool {
        let Ok((seq, depth)) = self
            .app
            .sequencer
            .read_at(move |seq, state| (seq, state.engine().depth(market, limits::SNAPSHOT_LEVELS)))
            .await
        else {
            return self.error(&Value::Null, "SEQUENCER_STOPPED", "the core is not running");
        };
        let depth = depth.unwrap_or_default();
        let spec = &self.specs[&market];
        let levels = |levels: &[book::LevelView]| -> Vec<Value> {
            levels
                .iter()
                .map(|l| json!({"price": price_text(spec, l.price), "qty": qty_text(spec, l.qty), "orders": l.orders}))
                .collect()
        };
        let message = json!({"type": "snapshot", "channel": channel, "seq": seq,
            "bids": levels(&depth.bids), "asks": levels(&depth.asks)});
        self.book_from.insert(market, seq);
        self.pending_book.retain(|(m, _, _), _| *m != market);
        self.send(message)
    }

    /// Learns the specs of markets it has not seen (a fill in a market never subscribed to).
    async fn learn_markets(&mut self, events: &[Event]) {
        let unknown: Vec<MarketId> = events
            .iter()
            .filter_map(|e| match *e {
                Event::Trade { market, .. } => Some(market),
                _ => None,
            })
            .filter(|m| !self.specs.contains_key(m))
            .collect();
        for market in unknown {
            if let Ok(spec) = self.app.market_spec(market).await {
                self.specs.insert(market, spec);
            }
        }
    }

    /// Takes in one durable command's events.
    async fn publish(&mut self, published: &Published) -> bool {
        self.learn_markets(&published.events).await;
        self.last_seq = published.seq;
        let user = self.caller.map(|c| c.user);
        for event in &published.events {
            match *event {
                Event::Book {
                    market,
                    side,
                    price,
                    qty,
                    orders,
                } => {
                    let after = self
                        .book_from
                        .get(&market)
                        .is_some_and(|from| published.seq > *from);
                    if self.topics.contains(&Topic::Book(market)) && after {
                        let side = if side == Side::Buy { 0 } else { 1 };
                        self.pending_book
                            .insert((market, side, price.0), (qty.0, orders));
                    }
                    if self.topics.contains(&Topic::Ticker(market)) {
                        self.dirty_tickers.insert(market);
                    }
                }
                Event::Trade {
                    market,
                    maker,
                    taker,
                    maker_user,
                    taker_user,
                    taker_side,
                    price,
                    qty,
                } => {
                    if self.topics.contains(&Topic::Ticker(market)) {
                        self.dirty_tickers.insert(market);
                    }
                    let Some(spec) = self.specs.get(&market) else {
                        continue;
                    };
                    let (price, qty) = (price_text(spec, price), qty_text(spec, qty));
                    if self.topics.contains(&Topic::Trades(market)) {
                        let message = json!({"type": "trade", "channel": format!("trades.{}", spec.symbol),
                            "seq": published.seq, "price": price, "qty": qty, "taker_side": taker_side.as_str()});
                        if !self.send(message) {
                            return false;
                        }
                    }
                    if self.topics.contains(&Topic::Fills) {
                        for (mine, order, maker_side) in
                            [(maker_user, maker, true), (taker_user, taker, false)]
                        {
                            if Some(mine) == user {
                                let side = if maker_side == (taker_side == Side::Buy) {
                                    "sell"
                                } else {
                                    "buy"
                                };
                                let message = json!({"type": "fill", "channel": "fills", "seq": published.seq,
                                    "market": spec.symbol, "order": order, "side": side, "maker": maker_side,
                                    "price": price, "qty": qty});
                                if !self.send(message) {
                                    return false;
                                }
                            }
                        }
                    }
                }
                Event::Accepted {
                    user: owner,
                    id,
                    market,
                    ..
                }
                | Event::Cancelled {
                    user: owner,
                    id,
                    market,
                    ..
                }
                | Event::Expired {
                    user: owner,
                    id,
                    market,
                    ..
                }
                | Event::Triggered {
                    user: owner,
                    id,
                    market,
                    ..
                }
                | Event::Modified {
                    user: owner,
                    id,
                    market,
                    ..
                } if self.topics.contains(&Topic::Orders) && Some(owner) == user => {
                    let kind = match event {
                        Event::Accepted { .. } => "accepted",
                        Event::Cancelled { .. } => "cancelled",
                        Event::Expired { .. } => "expired",
                        Event::Triggered { .. } => "triggered",
                        _ => "modified",
                    };
                    let message = json!({"type": "order", "channel": "orders", "seq": published.seq,
                            "event": kind, "order": id, "market": market.0});
                    if !self.send(message) {
                        return false;
                    }
                }
                _ => {}
            }
        }
        if user.is_some_and(|u| published.balance_users.contains(&u))
            && self.topics.contains(&Topic::Balances)
        {
            self.dirty_balances = true;
        }
        true
    }

    /// Sends the throttled updates: book deltas, tickers, balances.
    async fn flush(&mut self) -> bool {
        if !self.pending_book.is_empty() {
            let mut by_market: BTreeMap<MarketId, Vec<Value>> = BTreeMap::new();
            for ((market, side, price), (qty, orders)) in std::mem::take(&mut self.pending_book) {
                let spec = &self.specs[&market];
                by_market.entry(market).or_default().push(json!({
                    "side": if side == 0 { "buy" } else { "sell" },
                    "price": price_text(spec, book::Price(price)),
                    "qty": qty_text(spec, book::Qty(qty)),
                    "orders": orders,
                }));
            }
            for (market, changes) in by_market {
                let message = json!({"type": "book", "channel": format!("book.{}", self.specs[&market].symbol),
                    "seq": self.last_seq, "changes": changes});
                if !self.send(message) {
                    return false;
                }
            }
        }
        for market in std::mem::take(&mut self.dirty_tickers) {
            let Ok((best, last)) = self
                .app
                .read(move |state| {
                    (
                        state.engine().best_bid_ask(market),
                        state.engine().last_price(market),
                    )
                })
                .await
            else {
                continue;
            };
            let spec = &self.specs[&market];
            let (bid, ask) = best.unwrap_or((None, None));
            let message = json!({"type": "ticker", "channel": format!("ticker.{}", spec.symbol),
                "bid": bid.map(|l| price_text(spec, l.price)), "ask": ask.map(|l| price_text(spec, l.price)),
                "last": last.map(|p| price_text(spec, p))});
            if !self.send(message) {
                return false;
            }
        }
        if std::mem::take(&mut self.dirty_balances)
            && let Some(caller) = self.caller
        {
            let balances = crate::api::balances_of(&self.app, caller.user).await;
            if let Ok(balances) = balances
                && !self
                    .send(json!({"type": "balances", "channel": "balances", "balances": balances}))
            {
                return false;
            }
        }
        true
    }

    /// An order command, answered as its REST twin answers: status and body.
    async fn command(
        &mut self,
        op: &str,
        message: &serde_json::Map<String, Value>,
        id: &Value,
    ) -> bool {
        let Some(caller) = self.caller else {
            return self.error(id, "UNAUTHORIZED", "authenticate first");
        };
        let args = message
            .get("args")
            .cloned()
            .unwrap_or(Value::Object(Default::default()));
        let result = crate::api::ws_command(&self.app, caller, op, args).await;
        let (status, body) = match result {
            Ok(answer) => answer,
            Err(error) => (
                error.status.as_u16(),
                json!({"error": {"code": error.code, "message": error.message, "field": error.field}}),
            ),
        };
        self.send(json!({"type": "response", "id": id, "status": status, "body": body}))
    }
}

fn queue_event_name(event: &queue::EventKind) -> &'static str {
    use queue::EventKind::*;
    match event {
        Waiting { .. } => "waiting",
        WaitingChildren => "waiting_children",
        Active { .. } => "active",
        Progress(_) => "progress",
        Completed => "completed",
        Failed { .. } => "failed",
        Retried { .. } => "retried",
        Stalled => "stalled",
        Dead { .. } => "dead",
        Discarded => "discarded",
    }
}
