//! End-to-end tests: a real server on 127.0.0.1:0 over a real store (a SQLite file always;
//! PostgreSQL too, in a schema of its own, when `AGORA_TEST_POSTGRES_URL` is set), driven by a
//! real HTTP client.

use std::sync::atomic::{AtomicU32, Ordering};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use server::{Config, Server};

mod auth;
mod errors;
mod openapi;
mod queue;
mod trading;
mod withdrawals;
mod ws;

/// The session-signing secret of every test server, so that tests can forge tokens.
pub const JWT_SECRET: &str = "a-session-secret-for-tests-only-0123456789";

/// The administrator's password in every test server.
pub const ADMIN_PASSWORD: &str = "admin-password-for-tests";

/// A server under test and a client for it.
pub struct Harness {
    /// The server, until stopped.
    pub server: Option<Server>,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// A client with keep-alive connections.
    pub client: reqwest::Client,
    /// `sqlite` or `postgres`.
    pub backend: &'static str,
    _dir: tempfile::TempDir,
}

static NEXT_SCHEMA: AtomicU32 = AtomicU32::new(0);

/// One harness per backend this run can test.
pub async fn harnesses(test: &str) -> Vec<Harness> {
    let mut configs = vec![("sqlite", None, None)];
    if let Ok(url) = std::env::var("AGORA_TEST_POSTGRES_URL") {
        let schema = format!(
            "s_{test}_{}_{}",
            std::process::id(),
            NEXT_SCHEMA.fetch_add(1, Ordering::Relaxed)
        );
        configs.push(("postgres", Some(url), Some(schema)));
    }
    let mut harnesses = Vec::new();
    for (backend, url, schema) in configs {
        harnesses.push(Harness::start(backend, url, schema, |_| {}).await);
    }
    harnesses
}

impl Harness {
    /// Starts a server; `adjust` may change its configuration.
    pub async fn start(
        backend: &'static str,
        url: Option<String>,
        schema: Option<String>,
        adjust: impl FnOnce(&mut Config),
    ) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            listen: "127.0.0.1:0".into(),
            data_dir: dir.path().join("agora-data"),
            database: url,
            database_schema: schema,
            durability: "normal".into(),
            ..Config::default()
        };
        config.auth.admin_password = Some(ADMIN_PASSWORD.into());
        config.auth.jwt_secret = Some(JWT_SECRET.into());
        config.clock_tick_ms = 50;
        adjust(&mut config);
        let server = Server::start(config).await.expect("server starts");
        let base = format!("http://{}", server.addr);
        Harness {
            server: Some(server),
            base,
            client: reqwest::Client::new(),
            backend,
            _dir: dir,
        }
    }

    /// Sends a request with an optional bearer token and JSON body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("the server answers");
        let status = response.status();
        let text = response.text().await.unwrap();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    /// Like [`Harness::call`], failing the test unless the status is `expected`.
    pub async fn expect(
        &self,
        expected: StatusCode,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Value {
        let (status, value) = self.call(method.clone(), path, token, body).await;
        assert_eq!(
            status, expected,
            "{} {method} {path}: {value}",
            self.backend
        );
        value
    }

    /// The server's Prometheus text from `/metrics`.
    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("the server answers")
            .text()
            .await
            .unwrap()
    }

    /// A session token.
    pub async fn login(&self, username: &str, password: &str) -> String {
        let session = self
            .expect(
                StatusCode::OK,
                Method::POST,
                "/api/v1/auth/login",
                None,
                Some(json!({"username": username, "password": password})),
            )
            .await;
        session["token"].as_str().unwrap().to_string()
    }

    /// The administrator's token.
    pub async fn admin(&self) -> String {
        self.login("admin", ADMIN_PASSWORD).await
    }

    /// Creates a user and returns (id, token).
    pub async fn user(&self, admin: &str, name: &str) -> (u64, String) {
        let password = format!("{name}-password");
        let user = self
            .expect(
                StatusCode::CREATED,
                Method::POST,
                "/api/v1/admin/users",
                Some(admin),
                Some(json!({"username": name, "password": password})),
            )
            .await;
        let id = user["id"].as_u64().unwrap();
        (id, self.login(name, &password).await)
    }

    /// BTC (8 places) and USDT (6 places), and the instant market BTC-USDT with tick 0.01 and
    /// lot 0.0001, fees 10 and 20 bps.
    pub async fn market(&self, admin: &str) {
        for (symbol, decimals) in [("BTC", 8), ("USDT", 6)] {
            self.expect(
                StatusCode::CREATED,
                Method::POST,
                "/api/v1/admin/assets",
                Some(admin),
                Some(json!({"symbol": symbol, "decimals": decimals})),
            )
            .await;
        }
        self.expect(
            StatusCode::CREATED,
            Method::POST,
            "/api/v1/admin/markets",
            Some(admin),
            Some(
                json!({"symbol": "BTC-USDT", "tick": "0.01", "lot": "0.0001",
                        "maker_fee_bps": 10, "taker_fee_bps": 20}),
            ),
        )
        .await;
    }

    /// Credits a deposit.
    pub async fn deposit(&self, admin: &str, user: u64, asset: &str, amount: &str) {
        self.expect(
            StatusCode::CREATED,
            Method::POST,
            "/api/v1/admin/deposits",
            Some(admin),
            Some(json!({"user_id": user, "asset": asset, "amount": amount})),
        )
        .await;
    }

    /// Stops the server gracefully.
    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await.expect("clean shutdown");
        }
    }
}

/// A user's balance of one asset: (available, held).
pub async fn balance(h: &Harness, token: &str, asset: &str) -> (String, String) {
    let balances = h
        .expect(
            StatusCode::OK,
            Method::GET,
            "/api/v1/balances",
            Some(token),
            None,
        )
        .await;
    let entry = balances
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["asset"] == asset)
        .cloned()
        .unwrap_or_else(|| panic!("no {asset} balance in {balances}"));
    (
        entry["available"].as_str().unwrap().to_string(),
        entry["held"].as_str().unwrap().to_string(),
    )
}
