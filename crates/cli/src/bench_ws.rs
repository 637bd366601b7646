//! `agora bench ws`: the WebSocket API under load. The server runs as a child process
//! (`agora serve` from this same binary) on a fresh SQLite store in a temporary directory, so
//! that its memory and CPU are its own and not the load generator's. Two runs, each on its own
//! fresh server:
//!
//! - **orders**: many signed-in connections, each keeping several place/cancel commands in
//!   flight, told apart by their request ids; latency runs from sending a command to reading
//!   the response with its id.
//! - **subscribers**: thousands of clients subscribed to one book channel while a driver
//!   places, crosses and cancels orders over REST at a steady rate; each book delta's delivery
//!   lag is its receive time minus the time the driver had the acknowledgement of a command
//!   the delta covers (deltas carry the journal `seq` they reach, answers the `seq` of their
//!   command), and the server's resident memory is read from `/proc/<pid>/status`.
//!
//! No server outlives the benchmark: each is killed when its run ends or fails, when the
//! benchmark panics (the release profile aborts on panic, running no destructors, so a panic
//! hook kills them) and on SIGINT or SIGTERM.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// What to run.
pub struct WsBenchOptions {
    /// Orders run: signed-in connections.
    pub connections: usize,
    /// Orders run: commands each connection keeps in flight.
    pub in_flight: usize,
    /// Subscribers run: clients on the book channel.
    pub subscribers: usize,
    /// Subscribers run: the driver's commands per second.
    pub driver_rate: u64,
    /// How long each run's load lasts.
    pub duration: Duration,
    /// SQLite durability: `full` or `normal`.
    pub durability: String,
    /// Run the orders part.
    pub orders: bool,
    /// Run the subscribers part.
    pub subscribers_run: bool,
}

const ADMIN_PASSWORD: &str = "bench-admin-password";
const TRADER_PASSWORD: &str = "trader-password";
const MARKET: &str = "BTC-USDT";
/// Subscribers opening their socket at once (the listen backlog is 1,024).
const CONNECTING_AT_ONCE: usize = 256;
/// How long after the driver stops the subscribers keep reading (deltas are throttled to
/// 100 ms, so anything the driver caused has arrived by then unless the server is behind).
const GRACE: Duration = Duration::from_secs(2);

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The clients' socket settings: tungstenite zero-fills its whole read buffer (128 KiB by
/// default) on every read attempt, and ten thousand clients would spend the load generator's
/// CPU and memory on that; the server's messages are far smaller.
fn client_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(8 * 1024)
}

/// The servers this process started and has not stopped yet, so that a panic or a signal can
/// still stop them.
static SERVERS: Mutex<Vec<Child>> = Mutex::new(Vec::new());

/// Kills and reaps the server with this pid, if it is still running.
fn stop_server(pid: u32) {
    let mut servers = SERVERS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(at) = servers.iter().position(|c| c.id() == pid) {
        let mut child = servers.swap_remove(at);
        drop(servers);
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Kills every server still running. It never waits for the lock: a panic hook may run while
/// this thread holds it, and then the servers are left to the destructors.
pub(crate) fn kill_all_servers() {
    let mut servers = match SERVERS.try_lock() {
        Ok(servers) => servers,
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(TryLockError::WouldBlock) => return,
    };
    for mut child in servers.drain(..) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Makes a panic kill the servers before the process aborts.
pub(crate) fn kill_servers_on_panic() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            kill_all_servers();
            previous(info);
        }));
    });
}

/// Completes on SIGINT or SIGTERM, with the signal's name.
pub(crate) async fn interrupted() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut terminate) = signal(SignalKind::terminate()) {
            return tokio::select! {
                _ = tokio::signal::ctrl_c() => "SIGINT",
                _ = terminate.recv() => "SIGTERM",
            };
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    "SIGINT"
}

/// `agora serve` in a child process, killed when dropped (and by [`kill_all_servers`]).
pub(crate) struct ServerProcess {
    pid: u32,
    pub(crate) http: String,
    ws: String,
    _dir: tempfile::TempDir,
}

impl ServerProcess {
    /// Starts the server on a free port of 127.0.0.1 and waits until it listens.
    fn start(durability: &str) -> anyhow::Result<ServerProcess> {
        let dir = tempfile::tempdir()?;
        let mut command = Command::new(std::env::current_exe()?);
        command
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(dir.path().join("agora-data"));
        // Only the settings below: nothing from the caller's environment.
        for (name, _) in std::env::vars() {
            if name.starts_with("AGORA_") {
                command.env_remove(name);
            }
        }
        command
            .env("AGORA_DURABILITY", durability)
            .env("AGORA_ADMIN_PASSWORD", ADMIN_PASSWORD)
            // The load comes from one address and a few users: the rate limits would measure
            // themselves.
            .env("AGORA_IP_REQUESTS_PER_S", "0")
            .env("AGORA_USER_REQUESTS_PER_S", "0")
            .env("AGORA_REQUESTS_IN_FLIGHT_MAX", "100000")
            .env("AGORA_WS_MESSAGES_PER_MINUTE", u32::MAX.to_string())
            .env("AGORA_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command.spawn()?;
        let pid = child.id();
        let stdout = child.stdout.take();
        SERVERS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(child);
        let Some(stdout) = stdout else {
            stop_server(pid);
            anyhow::bail!("the server's output is not piped");
        };
        let mut lines = BufReader::new(stdout);
        let mut line = String::new();
        let addr = loop {
            line.clear();
            let read = lines.read_line(&mut line);
            if !read.as_ref().is_ok_and(|n| *n > 0) {
                stop_server(pid);
                read?;
                anyhow::bail!("the server exited before it listened");
            }
            if let Some(rest) = line.strip_prefix("agora listening on http://") {
                break rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
            }
        };
        // Keep reading its output so that the pipe never fills.
        std::thread::spawn(move || {
            let mut rest = String::new();
            while lines.read_line(&mut rest).is_ok_and(|n| n > 0) {
                rest.clear();
            }
        });
        Ok(ServerProcess {
            pid,
            http: format!("http://{addr}/api/v1"),
            ws: format!("ws://{addr}/api/v1/ws"),
            _dir: dir,
        })
    }

    /// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
    fn status_kib(&self, field: &str) -> u64 {
        status_kib(&format!("/proc/{}/status", self.pid), field)
    }

    /// User plus system CPU time the server has used so far.
    pub(crate) fn cpu(&self) -> Duration {
        cpu_time(&format!("/proc/{}/stat", self.pid))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        stop_server(self.pid);
    }
}

/// User plus system CPU time of a process, from its `/proc/…/stat`.
pub(crate) fn cpu_time(path: &str) -> Duration {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // The fields after the command name (which is in parentheses): utime and stime are the
    // 12th and 13th of them, in clock ticks (USER_HZ, 100 on Linux).
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let ticks: u64 = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

fn status_kib(path: &str, field: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|line| {
            let value = line.strip_prefix(field)?.strip_prefix(':')?;
            value.trim().trim_end_matches("kB").trim().parse().ok()
        })
        .unwrap_or(0)
}

fn mib(kib: u64) -> String {
    format!("{:.0} MiB", kib as f64 / 1024.0)
}

/// The soft limit on open files of this process (the child inherits it).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The REST side: setting up the market and users, and the subscribers run's driver.
#[derive(Clone)]
pub(crate) struct Rest {
    client: reqwest::Client,
    base: String,
    admin: String,
}

async fn call(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: Option<&str>,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    let mut request = client.request(method, url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let value = response.json().await.unwrap_or(Value::Null);
    Ok((status, value))
}

impl Rest {
    pub(crate) async fn connect(base: &str) -> anyhow::Result<Rest> {
        let mut rest = Rest {
            client: reqwest::Client::builder().build()?,
            base: base.to_string(),
            admin: String::new(),
        };
        rest.admin = rest.login("admin", ADMIN_PASSWORD).await?;
        Ok(rest)
    }

    async fn login(&self, name: &str, password: &str) -> anyhow::Result<String> {
        let body = json!({"username": name, "password": password});
        let url = format!("{}/auth/login", self.base);
        let (status, answer) =
            call(&self.client, reqwest::Method::POST, url, None, Some(body)).await?;
        anyhow::ensure!(status == 200, "login of {name}: {status} {answer}");
        Ok(answer["token"].as_str().unwrap_or_default().to_string())
    }

    async fn admin(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let (status, answer) = call(
            &self.client,
            reqwest::Method::POST,
            url,
            Some(&self.admin),
            Some(body),
        )
        .await?;
        anyhow::ensure!(
            (200..300).contains(&status),
            "POST {path}: {status} {answer}"
        );
        Ok(answer)
    }

    /// Creates the market and `traders` funded users; their session tokens.
    pub(crate) async fn market_and_traders(&self, traders: usize) -> anyhow::Result<Vec<String>> {
        self.admin("/admin/assets", json!({"symbol": "BTC", "decimals": 8}))
            .await?;
        self.admin("/admin/assets", json!({"symbol": "USDT", "decimals": 6}))
            .await?;
        self.admin(
            "/admin/markets",
            json!({"symbol": MARKET, "tick": "0.01", "lot": "0.0001"}),
        )
        .await?;
        let mut tokens = Vec::new();
        for n in 0..traders {
            let name = format!("trader{n}");
            let user = self
                .admin(
                    "/admin/users",
                    json!({"username": name, "password": TRADER_PASSWORD}),
                )
                .await?;
            let id = user["id"].as_u64().unwrap_or_default();
            for (asset, amount) in [("BTC", "1000000"), ("USDT", "100000000000")] {
                self.admin(
                    "/admin/deposits",
                    json!({"user_id": id, "asset": asset, "amount": amount}),
                )
                .await?;
            }
            tokens.push(self.login(&name, TRADER_PASSWORD).await?);
        }
        Ok(tokens)
    }

    async fn place(&self, token: &str, body: Value) -> anyhow::Result<(u16, Value)> {
        let url = format!("{}/orders", self.base);
        call(
            &self.client,
            reqwest::Method::POST,
            url,
            Some(token),
            Some(body),
        )
        .await
    }

    async fn cancel(&self, token: &str, id: u64) -> anyhow::Result<(u16, Value)> {
        let url = format!("{}/orders/{id}", self.base);
        call(
            &self.client,
            reqwest::Method::DELETE,
            url,
            Some(token),
            None,
        )
        .await
    }
}

/// The value at quantile `q` of sorted samples.
pub(crate) fn at<T: Copy + Default>(sorted: &[T], q: f64) -> T {
    sorted
        .get(((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn ms_us(us: i64) -> String {
    format!("{:.1} ms", us as f64 / 1e3)
}

/// Runs the benchmark and prints its tables.
pub async fn run(bench: WsBenchOptions) -> anyhow::Result<()> {
    kill_servers_on_panic();
    let runs = async {
        if bench.orders {
            orders(&bench).await?;
        }
        if bench.subscribers_run {
            subscribers(&bench).await?;
        }
        anyhow::Ok(())
    };
    tokio::select! {
        result = runs => result,
        signal = interrupted() => {
            // The runs were dropped, and their server with them; make sure of it.
            kill_all_servers();
            anyhow::bail!("interrupted by {signal}; the server was stopped")
        }
    }
}

pub(crate) async fn start_server(durability: &str) -> anyhow::Result<ServerProcess> {
    let durability = durability.to_string();
    tokio::task::spawn_blocking(move || ServerProcess::start(&durability)).await?
}

/// Opens a socket and signs it in.
async fn signed_in(url: &str, token: &str) -> anyhow::Result<Socket> {
    let (mut socket, _) =
        tokio_tungstenite::connect_async_with_config(url, Some(client_config()), true).await?;
    let auth = json!({"op": "auth", "token": token, "id": 0}).to_string();
    socket.send(Message::Text(auth.into())).await?;
    while let Some(message) = socket.next().await {
        if let Message::Text(text) = message? {
            let answer: Value = serde_json::from_str(text.as_str())?;
            match answer["type"].as_str() {
                Some("authenticated") => return Ok(socket),
                Some("error") => anyhow::bail!("auth refused: {answer}"),
                _ => {}
            }
        }
    }
    anyhow::bail!("the socket closed before it was signed in")
}

/// What one orders connection measured.
#[derive(Default)]
struct OrderLog {
    latencies: Vec<Duration>,
    /// Responses read before the deadline.
    answered_in_time: u64,
    /// Refusals and unexpected answers.
    errors: u64,
    first_error: Option<String>,
    /// Commands with no answer when the connection stopped waiting.
    unanswered: u64,
    closed: Option<String>,
    closed_at: Option<Instant>,
}

/// A close frame as `code reason` (empty when the server sent none).
fn close_reason(frame: Option<tokio_tungstenite::tungstenite::protocol::CloseFrame>) -> String {
    frame
        .map(|f| format!("{} {}", u16::from(f.code), f.reason))
        .unwrap_or_default()
}

/// A text message's text, `Ok(None)` for any other message, or why the socket ended (a close
/// frame's code and reason, an error, the end of the stream).
fn text_of(
    message: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
) -> Result<Option<tokio_tungstenite::tungstenite::Utf8Bytes>, String> {
    match message {
        Some(Ok(Message::Text(text))) => Ok(Some(text)),
        Some(Ok(Message::Close(frame))) => Err(close_reason(frame)),
        Some(Ok(_)) => Ok(None),
        Some(Err(e)) => Err(e.to_string()),
        None => Err("end of stream".into()),
    }
}

/// What the orders run reads of an answer: its request id, status and placed order's id. The
/// rest is skipped unparsed (serde ignores unknown fields), so that the load generator spends
/// little of the two cores it shares with the server.
#[derive(serde::Deserialize)]
struct Answer {
    id: Option<u64>,
    status: Option<u16>,
    body: Option<AnswerBody>,
}

#[derive(serde::Deserialize)]
struct AnswerBody {
    order: Option<AnswerOrder>,
}

#[derive(serde::Deserialize)]
struct AnswerOrder {
    id: Option<u64>,
}

/// One connection of the orders run: `in_flight` chains of place → cancel → place …, each
/// command sent as soon as the previous one of its chain is answered. The answers already
/// received are handled together and the commands they cause go out in one write.
async fn order_connection(
    mut socket: Socket,
    in_flight: usize,
    deadline: Instant,
    salt: u64,
) -> anyhow::Result<OrderLog> {
    let mut log = OrderLog::default();
    let mut pending: HashMap<u64, Instant> = HashMap::new();
    let mut next_id = 1u64;
    let mut n = salt;
    let mut place = |pending: &mut HashMap<u64, Instant>| {
        n += 1;
        // Buys below and sells above the middle never cross: every order rests, then is
        // cancelled.
        let (side, price) = if n.is_multiple_of(2) {
            ("buy", 40_000 + (n % 500))
        } else {
            ("sell", 60_000 + (n % 500))
        };
        let id = next_id;
        next_id += 1;
        pending.insert(id, Instant::now());
        format!(
            r#"{{"op":"place","id":{id},"args":{{"market":"{MARKET}","side":"{side}","price":"{price}","qty":"0.001"}}}}"#
        )
    };
    for _ in 0..in_flight {
        let text = place(&mut pending);
        socket.feed(Message::Text(text.into())).await?;
    }
    socket.flush().await?;
    let mut cancel_id = 1u64 << 40;
    // After the deadline nothing new is sent and the answers still due are awaited.
    let give_up = deadline + Duration::from_secs(10);
    while !pending.is_empty() {
        let Ok(mut message) = tokio::time::timeout_at(give_up.into(), socket.next()).await else {
            break;
        };
        let mut fed = false;
        loop {
            let text = match text_of(message) {
                Ok(text) => text.unwrap_or_default(),
                Err(reason) => {
                    log.closed = Some(reason);
                    break;
                }
            };
            let now = Instant::now();
            // Anything that is not an answer of this shape is no answer to a command.
            let answer: Option<Answer> = serde_json::from_str(text.as_str()).ok();
            if let Some(sent) = answer
                .as_ref()
                .and_then(|a| a.id)
                .and_then(|id| pending.remove(&id))
            {
                let answer = answer.expect("an answer with an id");
                log.latencies.push(now - sent);
                if now <= deadline {
                    log.answered_in_time += 1;
                }
                let placed = answer.body.and_then(|b| b.order).and_then(|o| o.id);
                let next = match (answer.status.unwrap_or(0), placed) {
                    (201, Some(order)) => {
                        // Cancel ids live in their own range so that they never meet a place's.
                        cancel_id += 1;
                        pending.insert(cancel_id, Instant::now());
                        format!(r#"{{"op":"cancel","id":{cancel_id},"args":{{"id":{order}}}}}"#)
                    }
                    (200, _) => place(&mut pending),
                    _ => {
                        log.errors += 1;
                        log.first_error.get_or_insert_with(|| text.to_string());
                        place(&mut pending)
                    }
                };
                if Instant::now() < deadline {
                    socket.feed(Message::Text(next.into())).await?;
                    fed = true;
                } else {
                    // Past the deadline: forget the command instead of sending it.
                    pending.retain(|_, at| *at < deadline);
                }
            }
            // The next answer if it is already here; otherwise write what was fed.
            match socket.next().now_or_never() {
                Some(next) => message = next,
                None => break,
            }
        }
        if log.closed.is_some() {
            break;
        }
        if fed {
            socket.flush().await?;
        }
    }
    log.unanswered = pending.len() as u64;
    if log.closed.is_some() {
        log.closed_at = Some(Instant::now());
    }
    let _ = socket.close(None).await;
    Ok(log)
}

async fn orders(bench: &WsBenchOptions) -> anyhow::Result<()> {
    let server = start_server(&bench.durability).await?;
    let rest = Rest::connect(&server.http).await?;
    // One user per 16 connections, each funded for all it can have open at once.
    let users = bench.connections.div_ceil(16).max(1);
    let tokens = rest.market_and_traders(users).await?;
    let mut sockets = Vec::new();
    for c in 0..bench.connections {
        sockets.push(signed_in(&server.ws, &tokens[c % users]).await?);
    }
    let rss_before = server.status_kib("VmRSS");
    let cpu_before = server.cpu();
    let own_cpu_before = cpu_time("/proc/self/stat");
    let started = Instant::now();
    let deadline = started + bench.duration;
    let mut tasks = Vec::new();
    for (c, socket) in sockets.into_iter().enumerate() {
        let in_flight = bench.in_flight;
        tasks.push(tokio::spawn(order_connection(
            socket,
            in_flight,
            deadline,
            c as u64 * 7,
        )));
    }
    let mut all = OrderLog::default();
    let mut closed = Vec::new();
    let mut failed = 0;
    for task in tasks {
        match task.await? {
            Ok(mut log) => {
                all.latencies.append(&mut log.latencies);
                all.answered_in_time += log.answered_in_time;
                all.errors += log.errors;
                all.unanswered += log.unanswered;
                if all.first_error.is_none() {
                    all.first_error = log.first_error;
                }
                if let (Some(reason), Some(at)) = (log.closed, log.closed_at) {
                    closed.push((at - started, reason));
                }
            }
            Err(e) => {
                failed += 1;
                eprintln!("an orders connection failed: {e}");
            }
        }
    }
    let elapsed = bench.duration.as_secs_f64();
    let cpu = server.cpu().saturating_sub(cpu_before);
    let own_cpu = cpu_time("/proc/self/stat").saturating_sub(own_cpu_before);
    let rss_after = server.status_kib("VmRSS");
    all.latencies.sort_unstable();
    let l = &all.latencies;
    println!(
        "WebSocket orders, SQLite synchronous={}: {} connections x {} commands in flight, {:.1} s; \
         places and cancels each count as one command",
        bench.durability, bench.connections, bench.in_flight, elapsed
    );
    println!(
        "| store | connections x in flight | commands/s | p50 | p99 | p99.9 | errors | server CPU | generator CPU | server RSS |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| SQLite `synchronous={}` | {} x {} | {:.0} | {} | {} | {} | {} | {:.0}% | {:.0}% | {} → {} |",
        bench.durability.to_uppercase(),
        bench.connections,
        bench.in_flight,
        all.answered_in_time as f64 / elapsed,
        ms(at(l, 0.50)),
        ms(at(l, 0.99)),
        ms(at(l, 0.999)),
        all.errors,
        cpu.as_secs_f64() / elapsed * 100.0,
        own_cpu.as_secs_f64() / elapsed * 100.0,
        mib(rss_before),
        mib(rss_after),
    );
    if let Some(error) = &all.first_error {
        println!("first refusal: {error}");
    }
    match server_timings(&server.http).await {
        Ok(lines) => lines.iter().for_each(|l| println!("server: {l}")),
        Err(e) => eprintln!("the server's metrics could not be read: {e}"),
    }
    if all.unanswered > 0 || failed > 0 || !closed.is_empty() {
        println!(
            "{} commands unanswered after the deadline + 10 s, {} connections failed, {} closed by the server \
             (between {:.1} s and {:.1} s into the run; first reason: {:?})",
            all.unanswered,
            failed,
            closed.len(),
            closed
                .iter()
                .map(|c| c.0)
                .min()
                .unwrap_or_default()
                .as_secs_f64(),
            closed
                .iter()
                .map(|c| c.0)
                .max()
                .unwrap_or_default()
                .as_secs_f64(),
            closed.first().map(|c| &c.1)
        );
    }
    Ok(())
}

/// The subscribers run's driver: what it sent and when each command was acknowledged.
struct DriverLog {
    /// (journal seq, acknowledgement time in µs since the run's epoch), of every command
    /// acknowledged.
    acks: Vec<(u64, u64)>,
    sent: u64,
    refused: u64,
    first_refusal: Option<String>,
    latencies: Vec<Duration>,
}

/// A small deterministic generator (xorshift64*), so that runs place the same orders.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Places resting orders (the maker), crosses the book with small IOC orders (the taker) and
/// cancels the oldest resting orders, `rate` commands a second on a fixed schedule whatever
/// the answers, each over its own REST request.
async fn drive(
    rest: Rest,
    maker: String,
    taker: String,
    rate: u64,
    duration: Duration,
    epoch: Instant,
) -> DriverLog {
    let live: Arc<Mutex<VecDeque<u64>>> = Arc::default();
    let acks: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let refused = Arc::new(AtomicU64::new(0));
    let first_refusal: Arc<Mutex<Option<String>>> = Arc::default();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut tasks = tokio::task::JoinSet::new();
    let start = tokio::time::Instant::now();
    let every = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let mut sent = 0u64;
    while start.elapsed() < duration {
        tokio::time::sleep_until(start + every * sent as u32).await;
        sent += 1;
        let r = rng.next();
        let live_now = live.lock().expect("not poisoned").len();
        enum Step {
            Rest(Value),
            Cross(Value),
            Cancel(u64),
        }
        let step = if r % 100 < 25 {
            let (side, price) = if (r >> 8).is_multiple_of(2) {
                ("sell", "49000")
            } else {
                ("buy", "51000")
            };
            Step::Cross(
                json!({"market": MARKET, "side": side, "price": price, "qty": "0.002", "tif": "IOC"}),
            )
        } else if (r % 100 < 50 && live_now > 50) || live_now > 400 {
            match live.lock().expect("not poisoned").pop_front() {
                Some(id) => Step::Cancel(id),
                None => continue,
            }
        } else {
            let level = (r >> 16) % 100;
            let (side, price) = if (r >> 8).is_multiple_of(2) {
                ("buy", 49_900 + level)
            } else {
                ("sell", 50_001 + level)
            };
            Step::Rest(
                json!({"market": MARKET, "side": side, "price": price.to_string(), "qty": "0.01"}),
            )
        };
        let (rest, maker, taker) = (rest.clone(), maker.clone(), taker.clone());
        let (live, acks, latencies, refused, first_refusal) = (
            live.clone(),
            acks.clone(),
            latencies.clone(),
            refused.clone(),
            first_refusal.clone(),
        );
        tasks.spawn(async move {
            let sent_at = Instant::now();
            let resting = matches!(step, Step::Rest(_));
            let answer = match step {
                Step::Rest(body) => rest.place(&maker, body).await,
                Step::Cross(body) => rest.place(&taker, body).await,
                Step::Cancel(id) => rest.cancel(&maker, id).await,
            };
            let now = Instant::now();
            match answer {
                Ok((200 | 201, body)) if body["seq"].is_u64() => {
                    let seq = body["seq"].as_u64().unwrap_or_default();
                    let t = now.duration_since(epoch).as_micros() as u64;
                    acks.lock().expect("not poisoned").push((seq, t));
                    latencies.lock().expect("not poisoned").push(now - sent_at);
                    if resting && let Some(id) = body["order"]["id"].as_u64() {
                        live.lock().expect("not poisoned").push_back(id);
                    }
                }
                other => {
                    refused.fetch_add(1, Ordering::Relaxed);
                    let text = match other {
                        Ok((status, body)) => format!("{status} {body}"),
                        Err(e) => e.to_string(),
                    };
                    first_refusal
                        .lock()
                        .expect("not poisoned")
                        .get_or_insert(text);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let mut acks = std::mem::take(&mut *acks.lock().expect("not poisoned"));
    acks.sort_unstable();
    let mut latencies = std::mem::take(&mut *latencies.lock().expect("not poisoned"));
    latencies.sort_unstable();
    DriverLog {
        acks,
        sent,
        refused: refused.load(Ordering::Relaxed),
        first_refusal: first_refusal.lock().expect("not poisoned").take(),
        latencies,
    }
}

/// What one subscriber read: each book delta as (its seq, the seq of the message before it
/// on this socket, receive time in µs since the epoch).
#[derive(Default)]
struct SubscriberLog {
    deltas: Vec<(u64, u64, u64)>,
    closed: Option<String>,
}

/// The top-level `"seq":N` of a message (the server's book messages have no other).
fn seq_of(text: &str) -> Option<u64> {
    let rest = &text[text.find("\"seq\":")? + 6..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

async fn subscriber(
    url: String,
    connecting: Arc<Semaphore>,
    ready: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    mut stop: watch::Receiver<bool>,
    epoch: Instant,
) -> SubscriberLog {
    let mut log = SubscriberLog::default();
    let permit = connecting.acquire_owned().await;
    let mut socket = None;
    for attempt in 0..5u64 {
        match tokio_tungstenite::connect_async_with_config(
            url.as_str(),
            Some(client_config()),
            false,
        )
        .await
        {
            Ok((s, _)) => {
                socket = Some(s);
                break;
            }
            Err(e) if attempt == 4 => {
                log.closed = Some(format!("connect: {e}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await,
        }
    }
    let Some(mut socket) = socket else {
        failed.fetch_add(1, Ordering::Relaxed);
        return log;
    };
    let subscribe = json!({"op": "subscribe", "channel": format!("book.{MARKET}"), "id": 1});
    if socket
        .send(Message::Text(subscribe.to_string().into()))
        .await
        .is_err()
    {
        failed.fetch_add(1, Ordering::Relaxed);
        return log;
    }
    let mut permit = Some(permit);
    let mut previous = None;
    loop {
        let message = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            message = socket.next() => message,
        };
        let text = match text_of(message) {
            Ok(Some(text)) => text,
            Ok(None) => continue,
            Err(reason) => {
                log.closed = Some(reason);
                break;
            }
        };
        let t = epoch.elapsed().as_micros() as u64;
        let text = text.as_str();
        if text.starts_with("{\"type\":\"book\"") {
            if let (Some(seq), Some(before)) = (seq_of(text), previous) {
                log.deltas.push((seq, before, t));
                previous = Some(seq);
            }
        } else if text.starts_with("{\"type\":\"snapshot\"") {
            previous = seq_of(text);
            if permit.take().is_some() {
                ready.fetch_add(1, Ordering::Relaxed);
            }
        } else if text.starts_with("{\"type\":\"error\"") {
            log.closed = Some(text.to_string());
            break;
        }
    }
    if permit.take().is_some() {
        failed.fetch_add(1, Ordering::Relaxed);
    }
    let _ = socket.close(None).await;
    log
}

async fn subscribers(bench: &WsBenchOptions) -> anyhow::Result<()> {
    let clients = bench.subscribers;
    if let Some(limit) = open_files_limit()
        && limit < clients as u64 + 256
    {
        anyhow::bail!(
            "{clients} subscribers need about {} open files in this process and in the server; \
             the limit is {limit} (raise it with ulimit -n)",
            clients + 256
        );
    }
    let server = start_server(&bench.durability).await?;
    let rest = Rest::connect(&server.http).await?;
    let tokens = rest.market_and_traders(2).await?;
    let (maker, taker) = (tokens[0].clone(), tokens[1].clone());
    // A book to look at: 100 bids and 100 asks around 50,000.
    for level in 0..100u64 {
        for (side, price) in [("buy", 49_900 + level), ("sell", 50_001 + level)] {
            let body =
                json!({"market": MARKET, "side": side, "price": price.to_string(), "qty": "0.01"});
            let (status, answer) = rest.place(&maker, body).await?;
            anyhow::ensure!(status == 201, "seeding the book: {status} {answer}");
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = server.status_kib("VmRSS");
    let epoch = Instant::now();
    let connecting = Arc::new(Semaphore::new(CONNECTING_AT_ONCE));
    let ready = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop) = watch::channel(false);
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        tasks.push(tokio::spawn(subscriber(
            server.ws.clone(),
            connecting.clone(),
            ready.clone(),
            failed.clone(),
            stop.clone(),
            epoch,
        )));
    }
    let connect_started = Instant::now();
    while ready.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < clients
        && connect_started.elapsed() < Duration::from_secs(300)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connect_time = connect_started.elapsed();
    let connected = ready.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_connected = server.status_kib("VmRSS");
    let cpu_before = server.cpu();
    let cpu_idle_started = Instant::now();
    // Idle subscribers still cost the server something (a throttle timer per connection).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_cpu = server.cpu().saturating_sub(cpu_before).as_secs_f64()
        / cpu_idle_started.elapsed().as_secs_f64();
    // The peak while orders flow, sampled every 100 ms.
    let peak = Arc::new(AtomicU64::new(rss_connected));
    let (sampling_tx, mut sampling) = watch::channel(true);
    let sampler = {
        let (peak, path) = (peak.clone(), format!("/proc/{}/status", server.pid));
        tokio::spawn(async move {
            let mut client_peak = 0;
            while *sampling.borrow_and_update() {
                peak.fetch_max(status_kib(&path, "VmRSS"), Ordering::Relaxed);
                client_peak = client_peak.max(status_kib("/proc/self/status", "VmRSS"));
                let _ = tokio::time::timeout(Duration::from_millis(100), sampling.changed()).await;
            }
            client_peak
        })
    };
    let cpu_before = server.cpu();
    let own_cpu_before = cpu_time("/proc/self/stat");
    let driven_from = Instant::now();
    let driver = drive(
        rest.clone(),
        maker,
        taker,
        bench.driver_rate,
        bench.duration,
        epoch,
    )
    .await;
    let driven = driven_from.elapsed();
    let cpu = server.cpu().saturating_sub(cpu_before).as_secs_f64() / driven.as_secs_f64();
    let own_cpu = cpu_time("/proc/self/stat")
        .saturating_sub(own_cpu_before)
        .as_secs_f64()
        / driven.as_secs_f64();
    tokio::time::sleep(GRACE).await;
    let _ = stop_tx.send(true);
    let mut logs = Vec::with_capacity(clients);
    for task in tasks {
        logs.push(task.await?);
    }
    let _ = sampling_tx.send(false);
    let client_peak = sampler.await?;
    let peak_rss = peak.load(Ordering::Relaxed);
    let hwm = server.status_kib("VmHWM");
    drop(server);

    // Each delta covers the commands after the previous message's seq up to its own: its
    // newest change is the latest acknowledged command at or before its seq, its oldest the
    // first after the previous message's.
    let acks = &driver.acks;
    let mut newest = Vec::new();
    let mut oldest = Vec::new();
    let mut unattributed = 0u64;
    let mut deltas = 0u64;
    let mut closed: HashMap<String, u64> = HashMap::new();
    for log in &logs {
        if let Some(reason) = &log.closed {
            let key: String = reason.chars().take(60).collect();
            *closed.entry(key).or_default() += 1;
        }
        for &(seq, before, t) in &log.deltas {
            deltas += 1;
            let upto = acks.partition_point(|a| a.0 <= seq);
            let after = acks.partition_point(|a| a.0 <= before);
            if upto == 0 || after >= upto {
                unattributed += 1;
                continue;
            }
            newest.push(t as i64 - acks[upto - 1].1 as i64);
            oldest.push(t as i64 - acks[after].1 as i64);
        }
    }
    newest.sort_unstable();
    oldest.sort_unstable();
    let early = newest.iter().filter(|&&l| l < 0).count();
    let secs = driven.as_secs_f64();
    println!(
        "WebSocket subscribers, SQLite synchronous={}: {} clients on book.{MARKET} \
         ({} connected in {:.1} s, {} failed), driver {} commands/s offered over REST for {:.1} s",
        bench.durability,
        clients,
        connected,
        connect_time.as_secs_f64(),
        failed.load(Ordering::Relaxed),
        bench.driver_rate,
        secs,
    );
    println!(
        "| subscribers | driver commands/s acked | deltas received | lag p50 | lag p99 | lag p99.9 | lag of oldest change p50 / p99 / p99.9 | server RSS: before / connected / peak (VmHWM) | server CPU idle / flowing |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {:.0} | {} | {} | {} | {} | {} / {} / {} | {} / {} / {} ({}) | {:.0}% / {:.0}% |",
        connected,
        acks.len() as f64 / secs,
        deltas,
        ms_us(at(&newest, 0.50)),
        ms_us(at(&newest, 0.99)),
        ms_us(at(&newest, 0.999)),
        ms_us(at(&oldest, 0.50)),
        ms_us(at(&oldest, 0.99)),
        ms_us(at(&oldest, 0.999)),
        mib(rss_before),
        mib(rss_connected),
        mib(peak_rss),
        mib(hwm),
        idle_cpu * 100.0,
        cpu * 100.0,
    );
    let per_client =
        rss_connected.saturating_sub(rss_before) as f64 * 1024.0 / connected.max(1) as f64;
    println!(
        "server memory per connected subscriber: {:.1} KiB; load generator peak RSS {}, CPU {:.0}%; \
         driver: {} sent, {} refused, ack p50 {}, p99 {}; {} deltas before the driver had the ack, \
         {} deltas with no driver command",
        per_client / 1024.0,
        mib(client_peak),
        own_cpu * 100.0,
        driver.sent,
        driver.refused,
        ms(at(&driver.latencies, 0.50)),
        ms(at(&driver.latencies, 0.99)),
        early,
        unattributed,
    );
    if let Some(refusal) = &driver.first_refusal {
        println!("first driver refusal: {refusal}");
    }
    if !closed.is_empty() {
        let mut closed: Vec<_> = closed.into_iter().collect();
        closed.sort();
        println!("subscribers closed before the end: {closed:?}");
    }
    Ok(())
}

/// The server's own view of a run, from its `/metrics`: for each of the core's timing
/// histograms, how many were recorded, their mean and the bucket bounds holding the median
/// and the 99th percentile, so that a client latency can be set beside the group commit's
/// and the projector's times.
async fn server_timings(http: &str) -> anyhow::Result<Vec<String>> {
    let root = http.trim_end_matches("/api/v1");
    let text = reqwest::get(format!("{root}/metrics"))
        .await?
        .text()
        .await?;
    let mut lines = Vec::new();
    for (name, unit, what) in [
        (agora_core::names::APPEND_SECONDS, 1e3, " ms"),
        (agora_core::names::PROJECTION_WRITE_SECONDS, 1e3, " ms"),
        (agora_core::names::BATCH_COMMANDS, 1.0, ""),
    ] {
        let value = |suffix: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}{suffix} ")))
                .and_then(|v| v.trim().parse::<f64>().ok())
        };
        let (Some(count), Some(sum)) = (value("_count"), value("_sum")) else {
            continue;
        };
        let buckets: Vec<(f64, f64)> = text
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{name}_bucket{{le=\"")))
            .filter_map(|rest| {
                let (le, n) = rest.split_once("\"} ")?;
                Some((le.parse().unwrap_or(f64::INFINITY), n.trim().parse().ok()?))
            })
            .collect();
        let bound = |q: f64| {
            buckets
                .iter()
                .find(|(_, n)| *n >= q * count)
                .map_or(f64::INFINITY, |b| b.0 * unit)
        };
        lines.push(format!(
            "{name}: {count:.0} recorded, mean {:.3}{what}, p50 <= {}{what}, p99 <= {}{what}",
            sum / count.max(1.0) * unit,
            bound(0.5),
            bound(0.99),
        ));
    }
    Ok(lines)
}
