//! `agora bench api`: orders placed and cancelled over REST by many keep-alive connections
//! against a server on 127.0.0.1, on the embedded SQLite store, with the latency of each
//! request.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use server::{Config, Server};

/// What to run.
pub struct ApiBenchOptions {
    /// Concurrent keep-alive connections, each placing then cancelling in a loop.
    pub connections: usize,
    /// How long to run.
    pub duration: Duration,
    /// SQLite durability: `full` or `normal`.
    pub durability: String,
}

const ADMIN_PASSWORD: &str = "bench-admin-password";

async fn call(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: &str,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    let mut request = client.request(method, url).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let value = response.json().await.unwrap_or(Value::Null);
    Ok((status, value))
}

/// Runs the benchmark and prints its table.
pub async fn run(bench: ApiBenchOptions) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut config = Config {
        listen: "127.0.0.1:0".into(),
        data_dir: dir.path().join("agora-data"),
        durability: bench.durability.clone(),
        ..Config::default()
    };
    config.auth.admin_password = Some(ADMIN_PASSWORD.into());
    // The load comes from one address and a few users: the rate limits would measure
    // themselves.
    config.limits.ip_requests_per_s = 0;
    config.limits.user_requests_per_s = 0;
    config.limits.requests_in_flight_max = 100_000;
    let server = Server::start(config).await?;
    let base = format!("http://{}/api/v1", server.addr);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(bench.connections)
        .build()?;
    let login = |name: &str, password: &str| {
        let (client, base) = (client.clone(), base.clone());
        let body = json!({"username": name, "password": password});
        async move {
            let answer: Value = client
                .post(format!("{base}/auth/login"))
                .json(&body)
                .send()
                .await?
                .json()
                .await?;
            anyhow::Ok(answer["token"].as_str().unwrap_or_default().to_string())
        }
    };
    let admin = login("admin", ADMIN_PASSWORD).await?;
    let post = |path: &str, body: Value| {
        call(
            &client,
            reqwest::Method::POST,
            format!("{base}{path}"),
            &admin,
            Some(body),
        )
    };
    post("/admin/assets", json!({"symbol": "BTC", "decimals": 8})).await?;
    post("/admin/assets", json!({"symbol": "USDT", "decimals": 6})).await?;
    post(
        "/admin/markets",
        json!({"symbol": "BTC-USDT", "tick": "0.01", "lot": "0.0001"}),
    )
    .await?;
    // One user per 16 connections, each funded for all it can have open at once.
    let users = bench.connections.div_ceil(16).max(1);
    let mut tokens = Vec::new();
    for n in 0..users {
        let name = format!("trader{n}");
        let (_, user) = post(
            "/admin/users",
            json!({"username": name, "password": "trader-password"}),
        )
        .await?;
        let id = user["id"].as_u64().unwrap_or_default();
        post(
            "/admin/deposits",
            json!({"user_id": id, "asset": "BTC", "amount": "1000000"}),
        )
        .await?;
        post(
            "/admin/deposits",
            json!({"user_id": id, "asset": "USDT", "amount": "100000000000"}),
        )
        .await?;
        tokens.push(login(&name, "trader-password").await?);
    }
    let deadline = Instant::now() + bench.duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..bench.connections {
        let (client, base, token) = (client.clone(), base.clone(), tokens[c % users].clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                // Buys below and sells above the middle never cross: every order rests, then
                // is cancelled.
                let (side, price) = if n.is_multiple_of(2) { ("buy", 40_000 + (n % 500)) } else { ("sell", 60_000 + (n % 500)) };
                let body = json!({"market": "BTC-USDT", "side": side, "price": price.to_string(), "qty": "0.001"});
                let sent = Instant::now();
                let placed = call(&client, reqwest::Method::POST, format!("{base}/orders"), &token, Some(body)).await;
                latencies.push(sent.elapsed());
                let Ok((201, answer)) = placed else {
                    errors += 1;
                    continue;
                };
                let id = answer["order"]["id"].as_u64().unwrap_or_default();
                let sent = Instant::now();
                let cancelled = call(&client, reqwest::Method::DELETE, format!("{base}/orders/{id}"), &token, None).await;
                latencies.push(sent.elapsed());
                if !matches!(cancelled, Ok((200, _))) {
                    errors += 1;
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (mut l, e) = task.await?;
        latencies.append(&mut l);
        errors += e;
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    println!(
        "REST, SQLite synchronous={}, {} connections, {:.1} s: {} requests ({} place + cancel pairs), {:.0} orders/s (requests/s), {} errors; latency p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms",
        bench.durability,
        bench.connections,
        elapsed.as_secs_f64(),
        latencies.len(),
        latencies.len() / 2,
        latencies.len() as f64 / elapsed.as_secs_f64(),
        errors,
        at(0.50).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        at(0.999).as_secs_f64() * 1e3,
    );
    drop(client);
    server.shutdown().await?;
    Ok(())
}
