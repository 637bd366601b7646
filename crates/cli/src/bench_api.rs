//! `agora bench api`: orders placed and cancelled over REST by many keep-alive connections
//! against `agora serve` in a child process (as `agora bench ws` runs it: a fresh SQLite store,
//! rate limits off), with the latency of each request.
//!
//! The load generator speaks HTTP/1.1 itself over plain sockets: a request is one prepared
//! write and an answer is read by its `content-length`, so the two cores the client shares
//! with the server go mostly to the server (a general HTTP client spent about as much CPU as
//! the server it measured). The server's CPU comes from `/proc/<pid>/stat`, the generator's
//! from `/proc/self/stat`.
//!
//! Two ways to load it:
//! - **closed loop** (the default): each connection sends its next request as soon as the
//!   last is answered: the most the server answers with that many requests in flight, and
//!   then latency mirrors throughput (connections / rate).
//! - **open loop** (`--rate N`): requests are due on a fixed schedule, N a second spread over
//!   the connections, whatever the answers; a request's latency runs from when it was due,
//!   so a late answer also counts against the requests queued behind it.
//!
//! Besides the run's percentiles it prints the p99 of each second, which shows whether a
//! tail comes from the start or from stalls along the way.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::bench_ws::{self, Rest, ServerProcess};

/// What to run.
pub struct ApiBenchOptions {
    /// Concurrent keep-alive connections, each placing then cancelling in a loop.
    pub connections: usize,
    /// How long to run.
    pub duration: Duration,
    /// SQLite durability: `full` or `normal`.
    pub durability: String,
    /// Open loop: requests per second offered over all connections (`None`: closed loop).
    pub rate: Option<u64>,
}

/// Connections per trader: each trader's resting orders stay far below the per-user limit.
const CONNECTIONS_PER_TRADER: usize = 16;
/// The largest answer the load generator reads.
const ANSWER_BYTES_MAX: usize = 64 * 1024;

/// One keep-alive HTTP/1.1 connection to the server.
struct Connection {
    stream: TcpStream,
    host: String,
    token: String,
    buffer: Vec<u8>,
}

impl Connection {
    async fn open(addr: &str, token: &str) -> anyhow::Result<Connection> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Connection {
            stream,
            host: addr.to_string(),
            token: token.to_string(),
            buffer: Vec::with_capacity(4096),
        })
    }

    /// Sends one request and reads its answer: the status and the body.
    async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<(u16, &[u8])> {
        let body = body.unwrap_or("");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            self.host,
            self.token,
            body.len()
        );
        self.stream.write_all(request.as_bytes()).await?;
        self.buffer.clear();
        let (head_end, status, length) = loop {
            if let Some(end) = find(&self.buffer, b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buffer[..end])?;
                let status = head
                    .get(9..12)
                    .and_then(|s| s.parse::<u16>().ok())
                    .ok_or_else(|| anyhow::anyhow!("not an HTTP answer: {head:?}"))?;
                let length = head
                    .lines()
                    .find_map(|line| {
                        let (name, value) = line.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse::<usize>().ok())?
                    })
                    .ok_or_else(|| anyhow::anyhow!("an answer without content-length: {head:?}"))?;
                break (end + 4, status, length);
            }
            self.read_more().await?;
        };
        anyhow::ensure!(length <= ANSWER_BYTES_MAX, "answer of {length} bytes");
        while self.buffer.len() < head_end + length {
            self.read_more().await?;
        }
        Ok((status, &self.buffer[head_end..head_end + length]))
    }

    async fn read_more(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.buffer.len() < ANSWER_BYTES_MAX + 8192,
            "answer too long"
        );
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "the server closed the connection");
        self.buffer.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The order id in a placement's answer (`{"order":{"id":N,…`).
fn order_id(body: &[u8]) -> Option<u64> {
    let at = find(body, b"\"id\":")? + 5;
    let digits = body[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&body[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// What one connection measured.
#[derive(Default)]
struct Tally {
    /// Each request's latency, with the second of the run it was due (or sent) in.
    latencies: Vec<(u32, Duration)>,
    /// The placements' and the cancels' latencies apart (a cancel first reads the core's state
    /// to find the caller's order, then submits: two passes through the sequencer to a
    /// placement's one).
    places: Vec<Duration>,
    cancels: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn error(&mut self, what: String) {
        self.errors += 1;
        self.first_error.get_or_insert(what);
    }
}

/// Why a request failed.
enum Failure {
    /// The server answered with another status (or an answer without an order id).
    Refused(String),
    /// The connection failed (closed, reset, or an answer that is not HTTP).
    Broken(String),
}

/// One connection's loop: place a resting order, cancel it, again, until `deadline`. With an
/// `interval`, each request is due `interval` after the previous one was due and latency
/// counts from then; without, the next request goes as soon as the last is answered.
async fn drive(
    mut connection: Connection,
    run_started: Instant,
    deadline: Instant,
    interval: Option<Duration>,
    phase: Duration,
) -> Tally {
    let mut tally = Tally::default();
    let mut due = Instant::now() + phase;
    let mut n = 0u64;
    let mut resting: Option<u64> = None;
    loop {
        if interval.is_some() {
            if due >= deadline {
                break;
            }
            tokio::time::sleep_until(due.into()).await;
        }
        let started = if interval.is_some() {
            due
        } else {
            Instant::now()
        };
        if started >= deadline {
            break;
        }
        let cancel = resting.is_some();
        let answer = match resting.take() {
            Some(id) => {
                let path = format!("/api/v1/orders/{id}");
                match connection.call("DELETE", &path, None).await {
                    Ok((200, _)) => Ok(()),
                    Ok((status, body)) => Err(Failure::Refused(format!(
                        "cancel: {status} {}",
                        String::from_utf8_lossy(body)
                    ))),
                    Err(error) => Err(Failure::Broken(format!("cancel: {error}"))),
                }
            }
            None => {
                n += 1;
                // Buys below and sells above the middle never cross: every order rests, then
                // is cancelled.
                let (side, price) = if n.is_multiple_of(2) {
                    ("buy", 40_000 + n % 500)
                } else {
                    ("sell", 60_000 + n % 500)
                };
                let body = format!(
                    r#"{{"market":"BTC-USDT","side":"{side}","price":"{price}","qty":"0.001"}}"#
                );
                match connection.call("POST", "/api/v1/orders", Some(&body)).await {
                    Ok((201, body)) => match order_id(body) {
                        Some(id) => {
                            resting = Some(id);
                            Ok(())
                        }
                        None => Err(Failure::Refused(
                            "place: no order id in the answer".to_string(),
                        )),
                    },
                    Ok((status, body)) => Err(Failure::Refused(format!(
                        "place: {status} {}",
                        String::from_utf8_lossy(body)
                    ))),
                    Err(error) => Err(Failure::Broken(format!("place: {error}"))),
                }
            }
        };
        let second = started.saturating_duration_since(run_started).as_secs() as u32;
        tally.latencies.push((second, started.elapsed()));
        match cancel {
            true => tally.cancels.push(started.elapsed()),
            false => tally.places.push(started.elapsed()),
        }
        match answer {
            Ok(()) => {}
            Err(Failure::Refused(error)) => tally.error(error),
            // The connection cannot be used again: this connection's run ends.
            Err(Failure::Broken(error)) => {
                tally.error(error);
                break;
            }
        }
        if let Some(interval) = interval {
            due += interval;
        }
    }
    tally
}

/// Runs the benchmark and prints its line.
pub async fn run(bench: ApiBenchOptions) -> anyhow::Result<()> {
    bench_ws::kill_servers_on_panic();
    tokio::select! {
        result = measure(&bench) => result,
        signal = bench_ws::interrupted() => {
            bench_ws::kill_all_servers();
            anyhow::bail!("interrupted by {signal}; the server was stopped")
        }
    }
}

async fn measure(bench: &ApiBenchOptions) -> anyhow::Result<()> {
    let server = bench_ws::start_server(&bench.durability).await?;
    let rest = Rest::connect(&server.http).await?;
    let tokens = rest
        .market_and_traders(bench.connections.div_ceil(CONNECTIONS_PER_TRADER).max(1))
        .await?;
    let addr = server_addr(&server)?;
    let mut connections = Vec::with_capacity(bench.connections);
    for c in 0..bench.connections {
        connections.push(Connection::open(&addr, &tokens[c % tokens.len()]).await?);
    }
    // Each connection's share of the offered rate, and a phase that spreads their sends.
    let interval = bench
        .rate
        .map(|rate| Duration::from_secs_f64(bench.connections as f64 / rate.max(1) as f64));
    let server_cpu = server.cpu();
    let own_cpu = bench_ws::cpu_time("/proc/self/stat");
    let started = Instant::now();
    let deadline = started + bench.duration;
    let tasks: Vec<_> = connections
        .into_iter()
        .enumerate()
        .map(|(c, connection)| {
            let phase = interval.map_or(Duration::ZERO, |i| {
                i.mul_f64(c as f64 / bench.connections as f64)
            });
            tokio::spawn(drive(connection, started, deadline, interval, phase))
        })
        .collect();
    let mut samples = Vec::new();
    let mut places = Vec::new();
    let mut cancels = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for task in tasks {
        let mut tally = task.await?;
        samples.append(&mut tally.latencies);
        places.append(&mut tally.places);
        cancels.append(&mut tally.cancels);
        errors += tally.errors;
        first_error = first_error.or(tally.first_error);
    }
    let elapsed = started.elapsed();
    let server_cpu = server.cpu().saturating_sub(server_cpu);
    let own_cpu = bench_ws::cpu_time("/proc/self/stat").saturating_sub(own_cpu);
    let mut latencies: Vec<Duration> = samples.iter().map(|(_, latency)| *latency).collect();
    latencies.sort_unstable();
    let load = match bench.rate {
        Some(rate) => format!("open loop, {rate} requests/s offered"),
        None => "closed loop".to_string(),
    };
    println!(
        "REST, SQLite synchronous={}, {} connections, {load}, {:.1} s: {} requests, {:.0} order requests/s, {errors} errors; latency p50 {}, p99 {}, p99.9 {}; CPU: server {:.0}%, load generator {:.0}%",
        bench.durability,
        bench.connections,
        elapsed.as_secs_f64(),
        latencies.len(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        bench_ws::ms(bench_ws::at(&latencies, 0.50)),
        bench_ws::ms(bench_ws::at(&latencies, 0.99)),
        bench_ws::ms(bench_ws::at(&latencies, 0.999)),
        server_cpu.as_secs_f64() / elapsed.as_secs_f64() * 100.0,
        own_cpu.as_secs_f64() / elapsed.as_secs_f64() * 100.0,
    );
    places.sort_unstable();
    cancels.sort_unstable();
    println!(
        "placements p50 {}, p99 {}; cancels p50 {}, p99 {}",
        bench_ws::ms(bench_ws::at(&places, 0.50)),
        bench_ws::ms(bench_ws::at(&places, 0.99)),
        bench_ws::ms(bench_ws::at(&cancels, 0.50)),
        bench_ws::ms(bench_ws::at(&cancels, 0.99)),
    );
    println!("p99 by second of the run: {}", p99_by_second(samples));
    if let Some(error) = first_error {
        println!("first error: {error}");
    }
    Ok(())
}

/// The p99 of each second's requests, in order: where a run's tail comes from (a start-up,
/// a stall) shows there, which the run's percentiles alone hide.
fn p99_by_second(mut samples: Vec<(u32, Duration)>) -> String {
    samples.sort_unstable();
    samples
        .chunk_by(|a, b| a.0 == b.0)
        .map(|second| {
            let latencies: Vec<Duration> = second.iter().map(|(_, latency)| *latency).collect();
            format!("{:.1}", bench_ws::at(&latencies, 0.99).as_secs_f64() * 1e3)
        })
        .collect::<Vec<_>>()
        .join(" ")
        + " ms"
}

/// `HOST:PORT` of the server's API.
fn server_addr(server: &ServerProcess) -> anyhow::Result<String> {
    server
        .http
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("unexpected server address {}", server.http))
}
