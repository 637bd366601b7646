//! `agora login` and `agora admin …` against a server started in the test on 127.0.0.1:0:
//! the real binary's output, and the effects checked through the API itself.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};

const ADMIN_PASSWORD: &str = "admin-test-password";

/// A running server and a plain HTTP client of it, for setting up and checking effects.
struct Running {
    server: server::Server,
    base: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn start() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let mut config = server::Config {
        listen: "127.0.0.1:0".into(),
        data_dir: dir.path().join("agora-data"),
        durability: "normal".into(),
        ..server::Config::default()
    };
    config.auth.admin_password = Some(ADMIN_PASSWORD.into());
    let server = server::Server::start(config).await.unwrap();
    let base = format!("http://{}", server.addr);
    Running {
        server,
        base,
        http: reqwest::Client::new(),
        _dir: dir,
    }
}

impl Running {
    /// The API's answer to one request, with its status.
    async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}/api/v1{path}", self.base))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap()
        };
        (status, value)
    }

    /// Runs `agora` with `AGORA_SERVER` pointing at this server, the token (if any) in
    /// `AGORA_TOKEN`, and `stdin` written to its standard input. Nothing of the test's own
    /// environment reaches it.
    async fn agora(&self, token: Option<&str>, args: &[&str], stdin: &str) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_agora"));
        command
            .args(args)
            .env_remove("AGORA_TOKEN")
            .env_remove("AGORA_PASSWORD")
            .env("AGORA_SERVER", &self.base)
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(token) = token {
            command.env("AGORA_TOKEN", token);
        }
        let stdin = stdin.to_string();
        // The binary blocks on the server, which runs on this runtime: wait beside it.
        tokio::task::spawn_blocking(move || {
            let mut child = command.spawn().expect("agora starts");
            child
                .stdin
                .take()
                .unwrap()
                .write_all(stdin.as_bytes())
                .unwrap();
            child.wait_with_output().unwrap()
        })
        .await
        .unwrap()
    }

    /// `agora …` that must succeed; its one line of JSON output.
    async fn ok(&self, token: &str, args: &[&str]) -> Value {
        let output = self.agora(Some(token), args, "").await;
        assert!(
            output.status.success(),
            "agora {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8(output.stdout).unwrap();
        assert_eq!(stdout.lines().count(), 1, "one line of JSON: {stdout}");
        serde_json::from_str(&stdout).unwrap()
    }

    /// `agora …` that must fail; its standard error, after checking it printed nothing.
    async fn refused(&self, token: Option<&str>, args: &[&str]) -> String {
        let output = self.agora(token, args, "").await;
        assert!(!output.status.success(), "agora {args:?} succeeded");
        assert!(output.stdout.is_empty(), "a refusal prints no answer");
        String::from_utf8(output.stderr).unwrap()
    }

    /// `agora login` with the password on standard input: the token it prints.
    async fn login(&self, username: &str, password: &str) -> String {
        let output = self
            .agora(
                None,
                &["login", "--username", username],
                &format!("{password}\n"),
            )
            .await;
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8(output.stdout).unwrap();
        assert_eq!(stdout.lines().count(), 1, "the token alone: {stdout}");
        stdout.trim_end().to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_subcommands_set_up_a_server_and_report_its_queues() {
    let running = start().await;
    let get = reqwest::Method::GET;

    // Login: the token alone on stdout, good for AGORA_TOKEN.
    let admin = running.login("admin", ADMIN_PASSWORD).await;
    let (status, me) = running.api(get.clone(), "/me", &admin, None).await;
    assert_eq!((status, &me["role"]), (200, &json!("admin")));
    // The password may come from AGORA_PASSWORD, and --server overrides AGORA_SERVER.
    let mut command = Command::new(env!("CARGO_BIN_EXE_agora"));
    command
        .args(["login", "--username", "admin", "--server", &running.base])
        .env("AGORA_SERVER", "http://127.0.0.1:9")
        .env("AGORA_PASSWORD", ADMIN_PASSWORD)
        .stdin(Stdio::null());
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    assert!(output.status.success());
    assert!(String::from_utf8(output.stdout).unwrap().len() > 20);

    // Users, one with its password on the command line, one from standard input.
    let alice = running
        .ok(
            &admin,
            &[
                "admin",
                "user",
                "create",
                "--username",
                "alice",
                "--password",
                "alice-password",
            ],
        )
        .await;
    assert_eq!(
        (&alice["username"], &alice["role"]),
        (&json!("alice"), &json!("user"))
    );
    let alice_id = alice["id"].as_u64().unwrap();
    let output = running
        .agora(
            Some(&admin),
            &[
                "admin",
                "user",
                "create",
                "--username",
                "olga",
                "--role",
                "operator",
            ],
            "olga-password\n",
        )
        .await;
    assert!(output.status.success());
    let olga: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(olga["role"], "operator");
    let users = running.ok(&admin, &["admin", "user", "list"]).await;
    let names: Vec<&str> = users
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["username"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["admin", "alice", "olga"]);

    // Assets and a market with fees.
    for (symbol, decimals) in [("BTC", "8"), ("USDT", "6")] {
        let asset = running
            .ok(
                &admin,
                &[
                    "admin",
                    "asset",
                    "create",
                    "--symbol",
                    symbol,
                    "--decimals",
                    decimals,
                ],
            )
            .await;
        assert_eq!(asset["symbol"], symbol);
    }
    let market = running
        .ok(
            &admin,
            &[
                "admin",
                "market",
                "create",
                "--symbol",
                "BTC-USDT",
                "--tick",
                "0.01",
                "--lot",
                "0.0001",
                "--maker-fee-bps",
                "10",
                "--taker-fee-bps",
                "20",
                "--min-qty",
                "0.001",
            ],
        )
        .await;
    assert_eq!(market["symbol"], "BTC-USDT");
    let (status, listed) = running
        .api(get.clone(), "/markets/BTC-USDT", &admin, None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (
            &listed["base"],
            &listed["quote"],
            &listed["tick"],
            &listed["lot"],
            &listed["maker_fee_bps"],
            &listed["taker_fee_bps"],
            &listed["settlement"],
        ),
        (
            &json!("BTC"),
            &json!("USDT"),
            &json!("0.01"),
            &json!("0.0001"),
            &json!(10),
            &json!(20),
            &json!("instant"),
        )
    );

    // Deposits, by id and by name; the decimal strings reach the ledger exactly.
    let id = alice_id.to_string();
    let deposited = running
        .ok(
            &admin,
            &[
                "admin", "deposit", "--user", &id, "--asset", "BTC", "--amount", "1.5",
            ],
        )
        .await;
    assert_eq!(deposited["available"], "1.50000000");
    running
        .ok(
            &admin,
            &[
                "admin",
                "deposit",
                "--username",
                "alice",
                "--asset",
                "USDT",
                "--amount",
                "250.000001",
            ],
        )
        .await;
    let alice_token = running.login("alice", "alice-password").await;
    let (_, balances) = running
        .api(get.clone(), "/balances", &alice_token, None)
        .await;
    assert_eq!(
        balances,
        json!([
            {"asset": "BTC", "available": "1.50000000", "held": "0.00000000"},
            {"asset": "USDT", "available": "250.000001", "held": "0.000000"},
        ])
    );

    // An API key for the caller, with its secret once; listed without it.
    let key = running
        .ok(
            &alice_token,
            &["admin", "api-key", "create", "--label", "bot"],
        )
        .await;
    let key_id = key["key_id"].as_str().unwrap();
    assert!(key_id.starts_with("ak_"));
    assert_eq!(key["secret"].as_str().unwrap().len(), 64);
    assert_eq!(key["label"], "bot");
    let keys = running
        .ok(&alice_token, &["admin", "api-key", "list"])
        .await;
    assert_eq!(keys[0]["key_id"], key_id);
    assert_eq!(keys[0]["revoked"], false);
    assert!(keys[0].get("secret").is_none());

    // A queue with one dead job: added with one attempt, claimed, failed.
    let post = reqwest::Method::POST;
    let (status, _) = running
        .api(reqwest::Method::PUT, "/queues/payouts", &admin, None)
        .await;
    assert_eq!(status, 204);
    let (status, added) = running
        .api(
            post.clone(),
            "/queues/payouts/jobs",
            &admin,
            Some(json!({"type": "send", "payload": {"to": "alice"}, "attempts": 1})),
        )
        .await;
    assert_eq!(status, 201);
    let job_id = added["id"].as_i64().unwrap();
    let (_, fetched) = running
        .api(
            post.clone(),
            "/queues/payouts/fetch",
            &admin,
            Some(json!({})),
        )
        .await;
    let lease = &fetched["jobs"][0]["lease"];
    let (status, failed) = running
        .api(
            post,
            &format!("/jobs/{job_id}/fail"),
            &admin,
            Some(json!({"lease": lease, "category": "network", "message": "bank is down"})),
        )
        .await;
    assert_eq!((status, &failed["will_retry"]), (200, &json!(false)));
    // An operator may read the queues.
    let olga_token = running.login("olga", "olga-password").await;
    let queues = running.ok(&olga_token, &["admin", "queues"]).await;
    let payouts = queues
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "payouts")
        .expect("the declared queue is listed");
    assert_eq!(payouts["counts"]["dead"], 1);
    assert_eq!(payouts["counts"]["waiting"], 0);
    let dead = running
        .ok(&olga_token, &["admin", "dead-jobs", "--queue", "payouts"])
        .await;
    assert_eq!(dead.as_array().unwrap().len(), 1);
    assert_eq!(
        (&dead[0]["id"], &dead[0]["state"], &dead[0]["error"]),
        (&json!(job_id), &json!("dead"), &json!("bank is down"))
    );
    // Without --queue, every queue's dead jobs: here the same one.
    let everywhere = running
        .ok(&olga_token, &["admin", "dead-jobs", "--limit", "10"])
        .await;
    assert_eq!(everywhere, dead);
    let filtered = running
        .ok(
            &olga_token,
            &[
                "admin",
                "dead-jobs",
                "--queue",
                "payouts",
                "--category",
                "timeout",
            ],
        )
        .await;
    assert_eq!(filtered, json!([]));

    running.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_subcommands_report_the_servers_refusals_and_exit_non_zero() {
    let running = start().await;
    let admin = running.login("admin", ADMIN_PASSWORD).await;
    for args in [
        [
            "admin",
            "asset",
            "create",
            "--symbol",
            "BTC",
            "--decimals",
            "8",
        ],
        [
            "admin",
            "user",
            "create",
            "--username",
            "bob",
            "--password",
            "bob-password",
        ],
    ] {
        running.ok(&admin, &args).await;
    }
    let deposit = |amount: &'static str| {
        [
            "admin", "deposit", "--user", "2", "--asset", "BTC", "--amount", amount,
        ]
    };

    // A wrong password, a wrong token (by flag, over the environment's good one), no token.
    let output = running
        .agora(
            None,
            &["login", "--username", "admin"],
            "not-the-password\n",
        )
        .await;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("UNAUTHORIZED"));
    let mut args = vec!["admin", "--token", "not-a-token"];
    args.extend(&deposit("1")[1..]);
    let stderr = running.refused(Some(&admin), &args).await;
    assert!(
        stderr.contains("UNAUTHORIZED: invalid session token"),
        "{stderr}"
    );
    assert!(stderr.contains("HTTP 401"), "{stderr}");
    let stderr = running.refused(None, &["admin", "queues"]).await;
    assert!(stderr.contains("no session token"), "{stderr}");

    // Bad amounts are the server's validation errors, with the field.
    let cases = [
        ("1.5.0", "INVALID_DECIMAL"),
        ("0.000000001", "INVALID_AMOUNT"),
        ("0", "INVALID_AMOUNT"),
        ("-1", "INVALID_DECIMAL"),
    ];
    for (amount, code) in cases {
        let stderr = running.refused(Some(&admin), &deposit(amount)).await;
        assert!(stderr.contains(&format!("{code}: ")), "{amount}: {stderr}");
        assert!(stderr.contains("field amount"), "{amount}: {stderr}");
    }
    // Other refusals keep their codes: an unknown user, asset, queue; a taken name.
    let stderr = running
        .refused(
            Some(&admin),
            &[
                "admin", "deposit", "--user", "99", "--asset", "BTC", "--amount", "1",
            ],
        )
        .await;
    assert!(stderr.contains("UNKNOWN_USER"), "{stderr}");
    let stderr = running
        .refused(
            Some(&admin),
            &[
                "admin",
                "deposit",
                "--username",
                "nobody",
                "--asset",
                "BTC",
                "--amount",
                "1",
            ],
        )
        .await;
    assert!(stderr.contains("UNKNOWN_USER"), "{stderr}");
    let stderr = running
        .refused(
            Some(&admin),
            &[
                "admin", "deposit", "--user", "2", "--asset", "ETH", "--amount", "1",
            ],
        )
        .await;
    assert!(stderr.contains("UNKNOWN_ASSET"), "{stderr}");
    let stderr = running
        .refused(Some(&admin), &["admin", "dead-jobs", "--queue", "nope"])
        .await;
    assert!(stderr.contains("UNKNOWN_QUEUE"), "{stderr}");
    let stderr = running
        .refused(
            Some(&admin),
            &[
                "admin",
                "user",
                "create",
                "--username",
                "bob",
                "--password",
                "bob-password",
            ],
        )
        .await;
    assert!(stderr.contains("USERNAME_TAKEN"), "{stderr}");
    let stderr = running
        .refused(
            Some(&admin),
            &[
                "admin", "market", "create", "--symbol", "BTC-EUR", "--tick", "0.01", "--lot", "1",
            ],
        )
        .await;
    assert!(stderr.contains("UNKNOWN_ASSET"), "{stderr}");
    // A user is not an admin.
    let bob = running.login("bob", "bob-password").await;
    let stderr = running.refused(Some(&bob), &deposit("1")).await;
    assert!(stderr.contains("FORBIDDEN"), "{stderr}");
    let stderr = running.refused(Some(&bob), &["admin", "queues"]).await;
    assert!(stderr.contains("FORBIDDEN"), "{stderr}");

    // Nothing refused was credited.
    let (_, balances) = running
        .api(reqwest::Method::GET, "/balances", &bob, None)
        .await;
    assert_eq!(balances[0]["available"], "0.00000000");
    running.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_subcommands_halt_markets_change_fees_and_settle_withdrawals() {
    let running = start().await;
    let admin = running.login("admin", ADMIN_PASSWORD).await;
    for args in [
        &[
            "admin",
            "asset",
            "create",
            "--symbol",
            "BTC",
            "--decimals",
            "8",
        ][..],
        &[
            "admin",
            "asset",
            "create",
            "--symbol",
            "USDT",
            "--decimals",
            "6",
        ],
        &[
            "admin", "market", "create", "--symbol", "BTC-USDT", "--tick", "0.01", "--lot",
            "0.0001",
        ],
        &[
            "admin",
            "user",
            "create",
            "--username",
            "carol",
            "--password",
            "carol-password",
        ],
        &[
            "admin",
            "deposit",
            "--username",
            "carol",
            "--asset",
            "BTC",
            "--amount",
            "2",
        ],
    ] {
        running.ok(&admin, args).await;
    }

    let halted = running
        .ok(&admin, &["admin", "market", "halt", "BTC-USDT"])
        .await;
    assert_eq!(halted["status"], "halted", "{halted}");
    let fees = running
        .ok(
            &admin,
            &[
                "admin",
                "market",
                "fees",
                "BTC-USDT",
                "--taker-fee-bps",
                "25",
            ],
        )
        .await;
    assert_eq!(
        (&fees["maker_fee_bps"], &fees["taker_fee_bps"]),
        (&json!(0), &json!(25))
    );
    let resumed = running
        .ok(&admin, &["admin", "market", "resume", "BTC-USDT"])
        .await;
    assert_eq!(resumed["status"], "active");
    let stderr = running
        .refused(Some(&admin), &["admin", "market", "halt", "ETH-USDT"])
        .await;
    assert!(stderr.contains("HTTP 404"), "{stderr}");

    // Carol asks for two withdrawals over the API; the admin pays one and cancels the other.
    let carol = running.login("carol", "carol-password").await;
    let mut ids = Vec::new();
    for amount in ["0.5", "0.25"] {
        let (status, withdrawal) = running
            .api(
                reqwest::Method::POST,
                "/withdrawals",
                &carol,
                Some(json!({"asset": "BTC", "amount": amount, "destination": "bc1q-carol"})),
            )
            .await;
        assert_eq!(status, 201, "{withdrawal}");
        ids.push(withdrawal["id"].as_u64().unwrap().to_string());
    }
    let pending = running
        .ok(
            &admin,
            &["admin", "withdrawal", "list", "--status", "pending"],
        )
        .await;
    assert_eq!(pending.as_array().map(Vec::len), Some(2), "{pending}");
    let paid = running
        .ok(&admin, &["admin", "withdrawal", "complete", &ids[0]])
        .await;
    assert_eq!(paid["status"], "completed");
    let cancelled = running
        .ok(&admin, &["admin", "withdrawal", "cancel", &ids[1]])
        .await;
    assert_eq!(cancelled["status"], "cancelled");
    let stderr = running
        .refused(Some(&admin), &["admin", "withdrawal", "cancel", &ids[1]])
        .await;
    assert!(stderr.contains("WITHDRAWAL_NOT_PENDING"), "{stderr}");
    let (_, balances) = running
        .api(reqwest::Method::GET, "/balances", &carol, None)
        .await;
    let btc = balances
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["asset"] == "BTC")
        .cloned()
        .unwrap();
    assert_eq!(
        (&btc["available"], &btc["held"]),
        (&json!("1.50000000"), &json!("0.00000000"))
    );
    running.server.shutdown().await.unwrap();
}
