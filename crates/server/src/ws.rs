//! The WebSocket API at `/api/v1/ws`: subscriptions to books (a snapshot, then throttled
//! deltas), trades, tickers, the caller's orders, fills and balances, and (operators) queue
//! events; and order commands with request ids, answered like their REST twins.
//!
//! Every connection is bounded: at most [`limits::MESSAGES_PER_MINUTE`] messages in, at most
//! [`limits::SUBSCRIPTIONS_MAX`] subscriptions, at most [`limits::COMMANDS_IN_FLIGHT_MAX`]
//! order commands running at once (then it reads nothing more until one is answered), and a
//! send buffer of `ws_send_buffer_messages`; a consumer too slow to empty it is disconnected
//! with close code 1008 and the reason `slow consumer`, so it can never grow the server's
//! memory. A connection that sends nothing (not even a pong) for [`limits::IDLE_MS`] is
//! closed.
//!
//! Events come from the projector, in journal order and only once durable, each with its
//! `seq`; a book snapshot carries the `seq` of the state it shows, and its deltas only follow
//! commands after it.
//!
//! A connection is woken only by what it follows. Each durable command's events go out on one
//! broadcast channel that only connections following trades, orders, fills or balances
//! listen to. Book deltas and tickers are built once per market by [`fan_out`], at most every
//! [`limits::BOOK_THROTTLE_MS`], serialized once and shared by every subscriber of that
//! market, so ten thousand subscribers to one book cost one serialization, not ten thousand.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use book::{Event, MarketId, MarketSpec, Side};
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio::time::Instant;

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
    /// Book deltas, tickers and balances are sent at most this often.
    pub const BOOK_THROTTLE_MS: u64 = 100;
    /// Levels per side in a book snapshot.
    pub const SNAPSHOT_LEVELS: usize = 100;
    /// Durable event batches buffered for the connections that follow trades, orders, fills
    /// or balances; a connection that falls this far behind is a slow consumer.
    pub const FEED_BATCHES: usize = 8_192;
    /// Shared book deltas and tickers buffered for their subscribers (at most one of each per
    /// market every [`BOOK_THROTTLE_MS`]); a connection this far behind is a slow consumer.
    pub const FAN_OUT_MESSAGES: usize = 4_096;
    /// Order commands (place, cancel, modify) of one connection running at once. A
    /// connection with this many in flight reads no further message until one is answered:
    /// backpressure through the socket, not an error.
    pub const COMMANDS_IN_FLIGHT_MAX: usize = 64;
    /// The socket's read buffer, in bytes. tungstenite zero-fills the whole buffer before
    /// every read attempt and a connection attempts a read each time it wakes, so its default
    /// of 128 KiB cost half the server's CPU in `memset` and was most of each connection's
    /// memory. Client messages are a few hundred bytes; a larger one (up to
    /// [`MESSAGE_BYTES_MAX`]) is read in several pieces.
    pub const READ_BUFFER_BYTES: usize = 4 * 1024;
    /// Frames gathered before they are written to the socket; the writer also writes what it
    /// has whenever its queue runs empty, so this bounds the buffer, not the delay.
    pub const WRITE_BUFFER_BYTES: usize = 8 * 1024;
    /// The most a connection's write buffer may hold, in bytes: it grows past
    /// [`WRITE_BUFFER_BYTES`] only while writes to the socket fail, and then the connection
    /// ends instead of buffering without bound. Far above the largest message the server
    /// sends (a 100-level snapshot is about 12 KiB).
    pub const WRITE_BUFFER_BYTES_MAX: usize = 4 * 1024 * 1024;
    /// Messages the writer gathers before it writes them to the socket in one go.
    pub const WRITE_BATCH_MESSAGES: usize = 64;
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

/// The feed the projector publishes into, shared by every WebSocket connection: each durable
/// command's events, for the connections that follow trades or their own channels, and the
/// changes [`fan_out`] turns into shared book deltas and tickers. Clones share one feed.
#[derive(Clone)]
pub struct Feed(Arc<FeedInner>);

struct FeedInner {
    /// Each durable command's events, in journal order.
    commands: broadcast::Sender<Arc<Published>>,
    /// Book deltas and tickers, each serialized once for all its subscribers.
    shared: broadcast::Sender<Arc<Shared>>,
    /// The markets someone follows, with their changes since the last fan-out.
    watched: Mutex<HashMap<MarketId, Watched>>,
    /// Wakes [`fan_out`] when a change to a followed market arrives.
    changed: Notify,
}

/// One followed market: who follows it, and what changed since the last fan-out.
#[derive(Default)]
struct Watched {
    book_subscribers: usize,
    ticker_subscribers: usize,
    /// Book levels changed since the last fan-out: (side, price) → (qty, orders).
    levels: BTreeMap<(u8, i64), (u64, u32)>,
    /// The seq of the last command that changed the book's levels.
    seq: u64,
    /// The best prices or the last price may have changed.
    ticker_dirty: bool,
}

/// A message for every subscriber of one market's book or ticker, serialized once.
struct Shared {
    market: MarketId,
    kind: SharedKind,
    text: Utf8Bytes,
}

#[derive(Clone, Copy)]
enum SharedKind {
    /// A book delta reaching this seq: only for subscribers whose snapshot is older.
    Book {
        seq: u64,
    },
    Ticker,
}

/// How many connections hold each of the feed's receivers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeedReceivers {
    /// Connections following trades, orders, fills or balances.
    pub commands: usize,
    /// Connections following a book or a ticker.
    pub shared: usize,
}

impl Default for Feed {
    fn default() -> Self {
        Feed::new()
    }
}

impl Feed {
    /// An empty feed.
    pub fn new() -> Feed {
        Feed(Arc::new(FeedInner {
            commands: broadcast::channel(limits::FEED_BATCHES).0,
            shared: broadcast::channel(limits::FAN_OUT_MESSAGES).0,
            watched: Mutex::new(HashMap::new()),
            changed: Notify::new(),
        }))
    }

    /// Takes in one durable command, in journal order.
    pub fn publish(&self, seq: u64, output: &agora_core::Output) {
        let feed = &self.0;
        if feed.commands.receiver_count() > 0 {
            let mut balance_users: Vec<u64> = output
                .postings
                .iter()
                .filter_map(|p| match p.owner {
                    ledger::Owner::User(user) => Some(user),
                    ledger::Owner::Fees => None,
                })
                .collect();
            balance_users.sort_unstable();
            balance_users.dedup();
            let _ = feed.commands.send(Arc::new(Published {
                seq,
                events: output.events.clone(),
                balance_users,
            }));
        }
        let touches_markets = output
            .events
            .iter()
            .any(|e| matches!(e, Event::Book { .. } | Event::Trade { .. }));
        if !touches_markets {
            return;
        }
        let mut changed = false;
        let mut watched = self.watched();
        for event in &output.events {
            match *event {
                Event::Book {
                    market,
                    side,
                    price,
                    qty,
                    orders,
                } => {
                    let Some(market) = watched.get_mut(&market) else {
                        continue;
                    };
                    if market.book_subscribers > 0 {
                        let side = if side == Side::Buy { 0 } else { 1 };
                        market.levels.insert((side, price.0), (qty.0, orders));
                        market.seq = seq;
                        changed = true;
                    }
                    if market.ticker_subscribers > 0 {
                        market.ticker_dirty = true;
                        changed = true;
                    }
                }
                Event::Trade { market, .. } => {
                    if let Some(market) = watched.get_mut(&market)
                        && market.ticker_subscribers > 0
                    {
                        market.ticker_dirty = true;
                        changed = true;
                    }
                }
                _ => {}
            }
        }
        drop(watched);
        if changed {
            feed.changed.notify_one();
        }
    }

    /// How many connections listen to each part of the feed now.
    pub fn receivers(&self) -> FeedReceivers {
        FeedReceivers {
            commands: self.0.commands.receiver_count(),
            shared: self.0.shared.receiver_count(),
        }
    }

    fn watched(&self) -> MutexGuard<'_, HashMap<MarketId, Watched>> {
        // The lock guards plain data that every holder leaves consistent: a panic elsewhere
        // while holding it leaves nothing half-done.
        self.0
            .watched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a connection's interest in a market's book or ticker, before its snapshot is
    /// read: a change that is not recorded was projected before, so the snapshot shows it.
    fn follow(&self, topic: Topic) {
        let mut watched = self.watched();
        match topic {
            Topic::Book(market) => watched.entry(market).or_default().book_subscribers += 1,
            Topic::Ticker(market) => watched.entry(market).or_default().ticker_subscribers += 1,
            _ => {}
        }
    }

    /// Undoes [`Feed::follow`]; a market nobody follows any more is forgotten.
    fn unfollow(&self, topic: Topic) {
        let mut watched = self.watched();
        let market = match topic {
            Topic::Book(market) | Topic::Ticker(market) => market,
            _ => return,
        };
        let Some(entry) = watched.get_mut(&market) else {
            return;
        };
        match topic {
            Topic::Book(_) => {
                entry.book_subscribers = entry.book_subscribers.saturating_sub(1);
                if entry.book_subscribers == 0 {
                    entry.levels.clear();
                }
            }
            _ => entry.ticker_subscribers = entry.ticker_subscribers.saturating_sub(1),
        }
        if entry.book_subscribers == 0 && entry.ticker_subscribers == 0 {
            watched.remove(&market);
        }
    }

    /// Takes the changes gathered since the last fan-out.
    fn take_changes(&self) -> Vec<Changes> {
        self.watched()
            .iter_mut()
            .filter(|(_, m)| !m.levels.is_empty() || m.ticker_dirty)
            .map(|(&market, m)| Changes {
                market,
                seq: m.seq,
                levels: std::mem::take(&mut m.levels),
                ticker: std::mem::take(&mut m.ticker_dirty),
            })
            .collect()
    }
}

/// One market's changes since the last fan-out.
struct Changes {
    market: MarketId,
    seq: u64,
    levels: BTreeMap<(u8, i64), (u64, u32)>,
    ticker: bool,
}

/// Sends each followed market's book delta and ticker to all its subscribers, at most every
/// [`limits::BOOK_THROTTLE_MS`], each serialized once; runs until `stopped`. It sleeps while
/// nothing followed changes.
pub async fn fan_out(app: Arc<App>, mut stopped: watch::Receiver<bool>) {
    let feed = app.feed.clone();
    let throttle = Duration::from_millis(limits::BOOK_THROTTLE_MS);
    // Specs never change once created.
    let mut specs: HashMap<MarketId, MarketSpec> = HashMap::new();
    let mut last: Option<Instant> = None;
    loop {
        if *stopped.borrow_and_update() {
            return;
        }
        tokio::select! {
            _ = feed.0.changed.notified() => {}
            _ = stopped.changed() => return,
        }
        // The first change after a quiet spell goes out at once, later ones at most every
        // throttle period.
        if let Some(last) = last {
            tokio::select! {
                _ = tokio::time::sleep_until(last + throttle) => {}
                _ = stopped.changed() => return,
            }
        }
        let changes = feed.take_changes();
        if changes.is_empty() {
            continue;
        }
        last = Some(Instant::now());
        for change in changes {
            let spec = match specs.entry(change.market) {
                std::collections::hash_map::Entry::Occupied(known) => known.into_mut(),
                std::collections::hash_map::Entry::Vacant(unknown) => {
                    match app.market_spec(change.market).await {
                        Ok(spec) => unknown.insert(spec),
                        // A market is followed only after its spec was found.
                        Err(_) => continue,
                    }
                }
            };
            let spec = &*spec;
            if !change.levels.is_empty() {
                let changes: Vec<Value> = change
                    .levels
                    .iter()
                    .map(|(&(side, price), &(qty, orders))| {
                        json!({
                            "side": if side == 0 { "buy" } else { "sell" },
                            "price": price_text(spec, book::Price(price)),
                            "qty": qty_text(spec, book::Qty(qty)),
                            "orders": orders,
                        })
                    })
                    .collect();
                let message = json!({"type": "book", "channel": format!("book.{}", spec.symbol),
                    "seq": change.seq, "changes": changes});
                let _ = feed.0.shared.send(Arc::new(Shared {
                    market: change.market,
                    kind: SharedKind::Book { seq: change.seq },
                    text: message.to_string().into(),
                }));
            }
            if change.ticker
                && let Some(message) = ticker_message(&app, change.market, spec).await
            {
                let _ = feed.0.shared.send(Arc::new(Shared {
                    market: change.market,
                    kind: SharedKind::Ticker,
                    text: message.to_string().into(),
                }));
            }
        }
    }
}

/// A market's `ticker` message: best bid, best ask and last price now.
async fn ticker_message(app: &App, market: MarketId, spec: &MarketSpec) -> Option<Value> {
    let (best, last) = app
        .read(move |state| {
            (
                state.engine().best_bid_ask(market),
                state.engine().last_price(market),
            )
        })
        .await
        .ok()?;
    let (bid, ask) = best.unwrap_or((None, None));
    Some(
        json!({"type": "ticker", "channel": format!("ticker.{}", spec.symbol),
        "bid": bid.map(|l| price_text(spec, l.price)), "ask": ask.map(|l| price_text(spec, l.price)),
        "last": last.map(|p| price_text(spec, p))}),
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Topic {
    Book(MarketId),
    Trades(MarketId),
    Ticker(MarketId),
    Orders,
    Fills,
    Balances,
}

impl Topic {
    /// Served from the shared fan-out (else from each command's events).
    fn shared(self) -> bool {
        matches!(self, Topic::Book(_) | Topic::Ticker(_))
    }
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
        .read_buffer_size(limits::READ_BUFFER_BYTES)
        .write_buffer_size(limits::WRITE_BUFFER_BYTES)
        .max_write_buffer_size(limits::WRITE_BUFFER_BYTES_MAX)
        .on_upgrade(move |socket| connection(app, caller, socket))
}

/// The order commands of one connection that are running, each resolving to its answer.
type InFlight = FuturesUnordered<BoxFuture<'static, String>>;

struct Connection {
    app: Arc<App>,
    caller: Option<Caller>,
    out: mpsc::Sender<Message>,
    topics: HashSet<Topic>,
    queues: HashSet<String>,
    specs: HashMap<MarketId, MarketSpec>,
    /// The seq of each subscribed book's snapshot: deltas at or before it are skipped.
    book_from: HashMap<MarketId, u64>,
    /// Each command's events, while a trades, orders, fills or balances topic is followed.
    commands: Option<broadcast::Receiver<Arc<Published>>>,
    /// Shared book deltas and tickers, while a book or ticker topic is followed.
    shared: Option<broadcast::Receiver<Arc<Shared>>>,
    /// Queue events, while a queue is followed.
    queue_events: Option<broadcast::Receiver<queue::JobEvent>>,
    dirty_balances: bool,
    /// When the pending balances go out; none while nothing is pending, so that an idle
    /// connection has no timer.
    flush_at: Option<Instant>,
    last_flush: Option<Instant>,
}

/// Why the connection ends.
enum End {
    Closed,
    Shutdown,
    Slow,
    Limit(&'static str),
}

/// The next message of a receiver the connection may not hold; never, when it holds none.
async fn next_from<T: Clone>(
    receiver: &mut Option<broadcast::Receiver<T>>,
) -> Result<T, broadcast::error::RecvError> {
    match receiver {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

/// Completes at `deadline`; never, without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn connection(app: Arc<App>, caller: Option<Caller>, socket: WebSocket) {
    metrics::gauge!("agora_ws_connections").increment(1.0);
    let (out, mut queued) = mpsc::channel::<Message>(app.config.limits.ws_send_buffer_messages);
    let (mut sink, mut stream) = socket.split();
    // The writer: sends what is queued, in order, gathering what is already waiting into one
    // write; a close frame queued last ends it.
    let writer = tokio::spawn(async move {
        'writing: while let Some(first) = queued.recv().await {
            let mut next = Some(first);
            let mut gathered = 0;
            while let Some(message) = next.take() {
                let closing = matches!(message, Message::Close(_));
                if sink.feed(message).await.is_err() {
                    break 'writing;
                }
                if closing {
                    let _ = sink.flush().await;
                    break 'writing;
                }
                gathered += 1;
                if gathered < limits::WRITE_BATCH_MESSAGES {
                    next = queued.try_recv().ok();
                }
            }
            if sink.flush().await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let mut conn = Connection {
        app: app.clone(),
        caller,
        out: out.clone(),
        topics: HashSet::new(),
        queues: HashSet::new(),
        specs: HashMap::new(),
        book_from: HashMap::new(),
        commands: None,
        shared: None,
        queue_events: None,
        dirty_balances: false,
        flush_at: None,
        last_flush: None,
    };
    let mut in_flight = InFlight::new();
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
            // With the most commands in flight the socket is not read: the client's messages
            // wait in its socket until one is answered.
            incoming = stream.next(), if in_flight.len() < limits::COMMANDS_IN_FLIGHT_MAX => {
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
                if !conn.handle(text.as_str(), &mut in_flight).await {
                    break End::Slow;
                }
            }
            Some(answer) = in_flight.next(), if !in_flight.is_empty() => {
                if !conn.send_text(answer) { break End::Slow }
            }
            published = next_from(&mut conn.commands) => match published {
                Ok(published) => if !conn.publish(&published).await { break End::Slow },
                Err(broadcast::error::RecvError::Lagged(_)) => break End::Slow,
                Err(broadcast::error::RecvError::Closed) => break End::Closed,
            },
            shared = next_from(&mut conn.shared) => match shared {
                Ok(shared) => if !conn.forward(&shared) { break End::Slow },
                // Deltas were missed: the client's book would be wrong.
                Err(broadcast::error::RecvError::Lagged(_)) => break End::Slow,
                Err(broadcast::error::RecvError::Closed) => break End::Closed,
            },
            event = next_from(&mut conn.queue_events) => match event {
                Ok(event) => {
                    if conn.queues.contains(&event.queue) {
                        let message = json!({"type": "queue", "channel": format!("queue.{}", event.queue),
                            "job": event.job_id, "kind": event.kind, "event": queue_event_name(&event.event)});
                        if !conn.send(message) { break End::Slow }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => break End::Slow,
                Err(broadcast::error::RecvError::Closed) => conn.queue_events = None,
            },
            _ = sleep_until(conn.flush_at) => if !conn.flush().await { break End::Slow },
            _ = ping.tick() => {
                if last_heard.elapsed() >= Duration::from_millis(limits::IDLE_MS) {
                    break End::Limit("idle timeout");
                }
                if conn.out.try_send(Message::Ping(Default::default())).is_err() { break End::Slow }
            }
        }
    };
    // Commands still running are dropped with the connection, as a REST request's are when
    // its client goes: one already sequenced is journaled all the same.
    drop(in_flight);
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

impl Drop for Connection {
    fn drop(&mut self) {
        for &topic in &self.topics {
            self.app.feed.unfollow(topic);
        }
    }
}

impl Connection {
    /// Queues a message; false when the buffer is full (a slow consumer).
    fn send(&self, value: Value) -> bool {
        self.send_text(value.to_string())
    }

    /// Queues a message already written as JSON; false when the buffer is full.
    fn send_text(&self, text: String) -> bool {
        self.out.try_send(Message::Text(text.into())).is_ok()
    }

    fn error(&self, id: &Value, code: &str, message: &str) -> bool {
        self.send(json!({"type": "error", "id": id, "code": code, "message": message}))
    }

    /// Handles one client message; order commands join `in_flight` and are answered when
    /// they finish. False when the client is a slow consumer.
    async fn handle(&mut self, text: &str, in_flight: &mut InFlight) -> bool {
        // Only an object is a message (a struct would also accept an array).
        let message = match text.trim_start().starts_with('{') {
            true => serde_json::from_str::<ClientMessage>(text).ok(),
            false => None,
        };
        let Some(message) = message else {
            return self.error(
                &Value::Null,
                "MALFORMED_JSON",
                "each message must be a JSON object",
            );
        };
        let op = message.text(message.op).unwrap_or_default();
        let id = || {
            message
                .id
                .and_then(|raw| serde_json::from_str(raw.get()).ok())
                .unwrap_or(Value::Null)
        };
        match &*op {
            "ping" => self.send(json!({"type": "pong", "id": id()})),
            "auth" => {
                let Some(token) = message.text(message.token) else {
                    return self.error(&id(), "INVALID_FIELD", "auth needs token");
                };
                match self.app.auth.verify_token(&token) {
                    Ok(caller) => {
                        self.caller = Some(caller);
                        self.send(json!({"type": "authenticated", "id": id(), "user": caller.user}))
                    }
                    Err(e) => self.error(&id(), "UNAUTHORIZED", &e.message),
                }
            }
            "subscribe" | "unsubscribe" => {
                let Some(channel) = message.text(message.channel) else {
                    return self.error(&id(), "INVALID_FIELD", "name a channel");
                };
                self.subscription(op == "subscribe", &channel, &id()).await
            }
            "place" | "cancel" | "modify" => {
                let Some(caller) = self.caller else {
                    return self.error(&id(), "UNAUTHORIZED", "authenticate first");
                };
                in_flight.push(Box::pin(command(
                    self.app.clone(),
                    caller,
                    op.into_owned(),
                    message
                        .args
                        .map_or_else(|| "{}".to_string(), |raw| raw.get().to_string()),
                    message.idempotency_key.map(ToOwned::to_owned),
                    message.id.unwrap_or(RawValue::NULL).to_owned(),
                )));
                true
            }
            _ => self.error(
                &id(),
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
                self.listen();
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
            if self.topics.remove(&topic) {
                self.app.feed.unfollow(topic);
            }
            if let Topic::Book(market) = topic {
                self.book_from.remove(&market);
            }
            self.listen();
            return self.send(json!({"type": "unsubscribed", "id": id, "channel": channel}));
        }
        if !self.topics.contains(&topic)
            && self.topics.len() + self.queues.len() >= limits::SUBSCRIPTIONS_MAX
        {
            return self.error(id, "TOO_MANY_SUBSCRIPTIONS", "unsubscribe first");
        }
        // Counted and listened to before the snapshot is read, so that no change after the
        // snapshot's seq is missed.
        if self.topics.insert(topic) {
            self.app.feed.follow(topic);
        }
        self.listen();
        if !self.send(json!({"type": "subscribed", "id": id, "channel": channel})) {
            return false;
        }
        match topic {
            Topic::Book(market) => self.book_snapshot(market, channel).await,
            Topic::Ticker(market) => {
                let spec = &self.specs[&market];
                match ticker_message(&self.app, market, spec).await {
                    Some(message) => self.send(message),
                    None => true,
                }
            }
            Topic::Balances => {
                self.balances_changed();
                true
            }
            _ => true,
        }
    }

    /// Holds the receivers of the feeds the subscriptions need, and only those: a connection
    /// that follows nothing is woken by nothing but its client and its ping timer.
    fn listen(&mut self) {
        let shared = self.topics.iter().any(|t| t.shared());
        let commands = self.topics.iter().any(|t| !t.shared());
        match (shared, &self.shared) {
            (true, None) => self.shared = Some(self.app.feed.0.shared.subscribe()),
            (false, Some(_)) => self.shared = None,
            _ => {}
        }
        match (commands, &self.commands) {
            (true, None) => self.commands = Some(self.app.feed.0.commands.subscribe()),
            (false, Some(_)) => self.commands = None,
            _ => {}
        }
        match (self.queues.is_empty(), &self.queue_events) {
            (false, None) => self.queue_events = Some(self.app.queue.subscribe()),
            (true, Some(_)) => self.queue_events = None,
            _ => {}
        }
        if !self.topics.contains(&Topic::Balances) {
            self.dirty_balances = false;
            self.flush_at = None;
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
        self.send(message)
    }

    /// Passes on a shared book delta or ticker if this connection follows it. A delta's
    /// levels are their state at its seq, so one reaching past the snapshot is right to
    /// apply even when some of its levels changed before the snapshot too.
    fn forward(&self, shared: &Shared) -> bool {
        let wanted = match shared.kind {
            SharedKind::Book { seq } => self
                .book_from
                .get(&shared.market)
                .is_some_and(|from| seq > *from),
            SharedKind::Ticker => self.topics.contains(&Topic::Ticker(shared.market)),
        };
        !wanted
            || self
                .out
                .try_send(Message::Text(shared.text.clone()))
                .is_ok()
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

    /// Takes in one durable command's events, for trades and the caller's own channels.
    async fn publish(&mut self, published: &Published) -> bool {
        self.learn_markets(&published.events).await;
        let user = self.caller.map(|c| c.user);
        for event in &published.events {
            match *event {
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
            self.balances_changed();
        }
        true
    }

    /// Schedules the caller's balances to go out, at most every throttle period.
    fn balances_changed(&mut self) {
        self.dirty_balances = true;
        if self.flush_at.is_none() {
            let throttle = Duration::from_millis(limits::BOOK_THROTTLE_MS);
            let now = Instant::now();
            self.flush_at = Some(
                self.last_flush
                    .map_or(now, |last| (last + throttle).max(now)),
            );
        }
    }

    /// Sends the throttled balances.
    async fn flush(&mut self) -> bool {
        self.flush_at = None;
        self.last_flush = Some(Instant::now());
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
}

/// A client message: each field is taken as the client wrote it and read when the operation
/// needs it, so a field of the wrong type is that operation's error, the request id is echoed
/// as sent, and a command's `args` reach its REST twin without being parsed and written again.
#[derive(Deserialize)]
struct ClientMessage<'a> {
    #[serde(default, borrow)]
    id: Option<&'a RawValue>,
    #[serde(default, borrow)]
    op: Option<&'a RawValue>,
    #[serde(default, borrow)]
    token: Option<&'a RawValue>,
    #[serde(default, borrow)]
    channel: Option<&'a RawValue>,
    #[serde(default, borrow)]
    args: Option<&'a RawValue>,
    #[serde(default, borrow)]
    idempotency_key: Option<&'a RawValue>,
}

impl<'a> ClientMessage<'a> {
    /// A field's text when it is a JSON string.
    fn text(&self, field: Option<&'a RawValue>) -> Option<Cow<'a, str>> {
        field.and_then(|raw| serde_json::from_str(raw.get()).ok())
    }
}

/// An order command, answered as its REST twin answers: status and body, with the request's
/// id as the client wrote it, and `"replayed": true` when it is the stored answer of an
/// earlier command with its idempotency key. It owns what it needs, so that several run at
/// once beside the connection's loop; the answer is written out here, the route's JSON body
/// spliced in as the route wrote it.
async fn command(
    app: Arc<App>,
    caller: Caller,
    op: String,
    args: String,
    key: Option<Box<RawValue>>,
    id: Box<RawValue>,
) -> String {
    let result = crate::api::ws_command(&app, caller, &op, &args, key.as_deref()).await;
    let (status, body, replayed) = match result {
        Ok(answer) => (answer.status, answer.body, answer.replayed),
        Err(error) => {
            let body = json!({"error": {"code": error.code, "message": error.message, "field": error.field}});
            let body = serde_json::value::to_raw_value(&body)
                .unwrap_or_else(|_| RawValue::NULL.to_owned());
            (error.status.as_u16(), body, false)
        }
    };
    let replayed = if replayed { r#","replayed":true"# } else { "" };
    format!(
        r#"{{"type":"response","id":{},"status":{status},"body":{}{replayed}}}"#,
        id.get(),
        body.get()
    )
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
