//! End-to-end tests of the `agora` binary: the replay format, streaming through a pipe, and
//! malformed input.

mod admin;
mod journal;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use serde_json::Value;

fn agora() -> Command {
    Command::new(env!("CARGO_BIN_EXE_agora"))
}

/// Runs the command, checks that it succeeded, and returns what it printed.
fn succeeds(command: &mut Command) -> String {
    let output = command.output().unwrap();
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    report
}

fn replay(input: &str) -> Vec<Value> {
    let mut child = agora()
        .args(["book", "replay"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("agora starts");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every output line is JSON"))
        .collect()
}

/// The binary runs without transparent huge pages (see `cli::without_transparent_huge_pages`):
/// the kernel reports the process's setting in `/proc/<pid>/status`.
#[cfg(target_os = "linux")]
#[test]
fn the_binary_runs_without_transparent_huge_pages() {
    let mut child = agora()
        .args(["book", "replay"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("agora starts");
    let status = format!("/proc/{}/status", child.id());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut last = String::new();
    while std::time::Instant::now() < deadline {
        last = std::fs::read_to_string(&status)
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("THP_enabled:"))
            .unwrap_or_default()
            .to_string();
        if last.ends_with('0') {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    assert!(last.ends_with('0'), "{status}: {last:?}");
}

const MARKET: &str = r#"{"cmd":"market","market":"BTC-USDT","tick":"0.01","lot":"0.001"}"#;

#[test]
fn streams_events_per_command_through_a_pipe() {
    let mut child = agora()
        .args(["book", "replay"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut read_until_done = || {
        let mut events = Vec::new();
        loop {
            let mut line = String::new();
            assert!(
                stdout.read_line(&mut line).unwrap() > 0,
                "output ended early"
            );
            let value: Value = serde_json::from_str(&line).unwrap();
            if value["event"] == "done" {
                return (events, value["seq"].as_u64().unwrap());
            }
            events.push(value);
        }
    };
    // Each command's events arrive before the next command is written: stdin stays open.
    writeln!(stdin, "{MARKET}").unwrap();
    let (events, seq) = read_until_done();
    assert_eq!(
        (events[0]["event"].as_str(), seq),
        (Some("market_created"), 1)
    );
    writeln!(
        stdin,
        r#"{{"cmd":"place","market":"BTC-USDT","id":1,"user":1,"side":"sell","price":"100.50","qty":"2"}}"#
    )
    .unwrap();
    let (events, seq) = read_until_done();
    assert_eq!(seq, 2);
    assert_eq!(events[0]["event"], "accepted");
    assert_eq!(events[1]["event"], "book");
    assert_eq!(events[1]["qty"], "2.000");
    writeln!(
        stdin,
        r#"{{"cmd":"place","market":"BTC-USDT","id":2,"user":2,"side":"buy","price":"101","qty":"0.5"}}"#
    )
    .unwrap();
    let (events, _) = read_until_done();
    let trade = &events[1];
    assert_eq!(trade["event"], "trade");
    assert_eq!(
        (
            &trade["maker"],
            &trade["taker"],
            &trade["price"],
            &trade["qty"]
        ),
        (
            &Value::from(1),
            &Value::from(2),
            &Value::from("100.50"),
            &Value::from("0.500")
        )
    );
    drop(stdin);
    assert!(child.wait().unwrap().success());
}

#[test]
fn malformed_lines_are_rejected_with_line_and_field_and_processing_goes_on() {
    let input = [
        MARKET,
        "not json",
        "[1,2]",
        r#"{"market":"BTC-USDT"}"#,
        r#"{"cmd":"launch"}"#,
        r#"{"cmd":"place","market":"BTC-USDT","id":1,"user":1,"side":"sell","price":100,"qty":"1"}"#,
        r#"{"cmd":"place","market":"BTC-USDT","id":1,"user":1,"side":"sell","price":"1e5","qty":"1"}"#,
        r#"{"cmd":"place","market":"BTC-USDT","id":1,"user":1,"side":"up","price":"1","qty":"1"}"#,
        r#"{"cmd":"place","market":"BTC-USDT","id":-1,"user":1,"side":"sell","price":"1","qty":"1"}"#,
        r#"{"cmd":"place","market":"BTC-USDT","id":1,"user":1,"side":"sell","price":"1","qty":"1","colour":"red"}"#,
        r#"{"cmd":"place","market":"BTC-USDT","id":1,"user":1,"side":"sell","price":"1.001","qty":"1"}"#,
        r#"{"cmd":"place","market":"BTC-USDT","id":1,"user":1,"side":"sell","price":"1","qty":"0.0001"}"#,
        r#"{"cmd":"place","market":"BTC-USDT","id":1,"user":1,"side":"sell","price":"1","qty":"-1"}"#,
        r#"{"cmd":"place","market":"BTC-USDT","id":1,"user":1,"side":"sell","price":"99999999999999999999","qty":"1"}"#,
        r#"{"cmd":"place","market":"ETH-USDT","id":1,"user":1,"side":"sell","price":"1","qty":"1"}"#,
        r#"{"cmd":"market","market":"ETH-USDT","tick":"0","lot":"1"}"#,
        r#"{"cmd":"place","market":"BTC-USDT","id":1,"user":1,"side":"sell","price":"1","qty":"1"}"#,
    ]
    .join("\n");
    let events = replay(&input);
    let rejected: Vec<(u64, String, Option<String>)> = events
        .iter()
        .filter(|e| e["event"] == "rejected")
        .map(|e| {
            (
                e["line"].as_u64().unwrap(),
                e["reason"].as_str().unwrap().to_string(),
                e["field"].as_str().map(String::from),
            )
        })
        .collect();
    let expected = [
        (2, "MALFORMED_JSON", None),
        (3, "MALFORMED_JSON", None),
        (4, "MISSING_FIELD", Some("cmd")),
        (5, "UNKNOWN_COMMAND", Some("cmd")),
        (6, "INVALID_FIELD", Some("price")),
        (7, "INVALID_DECIMAL", Some("price")),
        (8, "INVALID_FIELD", Some("side")),
        (9, "INVALID_FIELD", Some("id")),
        (10, "UNKNOWN_FIELD", Some("colour")),
        (11, "BAD_TICK", Some("price")),
        (12, "BAD_LOT", Some("qty")),
        (13, "INVALID_QUANTITY", Some("qty")),
        (14, "INVALID_PRICE", Some("price")),
        (15, "UNKNOWN_MARKET", Some("market")),
        (16, "INVALID_MARKET", Some("tick")),
    ];
    let expected: Vec<(u64, String, Option<String>)> = expected
        .iter()
        .map(|(l, r, f)| (*l, r.to_string(), f.map(String::from)))
        .collect();
    assert_eq!(rejected, expected);
    // The last, valid line still works, and every line got its done.
    let accepted = events.iter().filter(|e| e["event"] == "accepted").count();
    assert_eq!(accepted, 1);
    let done: Vec<u64> = events
        .iter()
        .filter(|e| e["event"] == "done")
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(done, (1..=17).collect::<Vec<_>>());
}

#[test]
fn oversized_and_non_utf8_lines_are_rejected() {
    let mut input = Vec::new();
    input.extend_from_slice(MARKET.as_bytes());
    input.push(b'\n');
    input.extend(std::iter::repeat_n(b' ', cli::replay::LINE_BYTES_MAX + 10));
    input.push(b'\n');
    input.extend_from_slice(&[0xff, 0xfe, b'\n']);
    input.extend_from_slice(br#"{"cmd":"hash"}"#);
    let mut output = Vec::new();
    cli::replay::run(&input[..], &mut output).unwrap();
    let events: Vec<Value> = String::from_utf8(output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let reasons: Vec<&str> = events.iter().filter_map(|e| e["reason"].as_str()).collect();
    assert_eq!(reasons, ["LINE_TOO_LONG", "MALFORMED_JSON"]);
    assert_eq!(events.last().unwrap()["seq"], 4);
    assert_eq!(events[events.len() - 2]["event"], "hash");
}

#[test]
fn the_bundled_example_replays_the_same_way_twice() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/replay/basic.jsonl"
    );
    let run = || {
        let output = agora()
            .args(["book", "replay", "--input", path])
            .output()
            .unwrap();
        assert!(output.status.success());
        String::from_utf8(output.stdout).unwrap()
    };
    let first = run();
    assert_eq!(first, run());
    assert!(first.contains(r#""event":"trade""#));
    assert!(first.contains(r#""event":"hash""#));
}

#[test]
fn market_data_queries_answer_in_decimals() {
    let input = [
        MARKET,
        r#"{"cmd":"time","now":60000}"#,
        r#"{"cmd":"place","market":"BTC-USDT","id":1,"user":1,"side":"sell","price":"100","qty":"1"}"#,
        r#"{"cmd":"place","market":"BTC-USDT","id":2,"user":1,"side":"sell","price":"110","qty":"1"}"#,
        r#"{"cmd":"place","market":"BTC-USDT","id":3,"user":2,"side":"buy","price":"100","qty":"0.5"}"#,
        r#"{"cmd":"place","market":"BTC-USDT","id":4,"user":2,"side":"buy","price":"90","qty":"1"}"#,
        r#"{"cmd":"candles","market":"BTC-USDT","interval":"1m"}"#,
        r#"{"cmd":"impact","market":"BTC-USDT","side":"buy","notional":"105"}"#,
        r#"{"cmd":"stats","market":"BTC-USDT"}"#,
    ]
    .join("\n");
    let events = replay(&input);
    let find = |name: &str| events.iter().find(|e| e["event"] == name).unwrap().clone();
    let candles = find("candles");
    assert_eq!(candles["candles"][0]["open_time"], 60000);
    assert_eq!(candles["candles"][0]["volume"], "0.500");
    let impact = find("impact");
    // 0.5 at 100 costs 50; the remaining 55 buys 0.5 at 110.
    assert_eq!(impact["filled_qty"], "1.000");
    assert_eq!(impact["filled_notional"], "105.00000");
    assert_eq!(impact["worst_price"], "110.00");
    assert_eq!(impact["impact_bps"], "500");
    let stats = find("stats");
    assert_eq!(stats["last_price"], "100.00");
    assert_eq!(stats["trades_24h"], 1);
    assert_eq!(stats["best_bid"]["price"], "90.00");
    // Mid is 95; within 10% (85.5 to 104.5) lie the bid at 90 and the ask at 100.
    assert_eq!(stats["liquidity"][2]["ask_qty"], "0.500");
}

#[test]
fn the_example_in_docs_replay_md_is_what_agora_prints() {
    let doc = include_str!("../../../../docs/replay.md");
    let example = doc
        .split("## Example")
        .nth(1)
        .expect("docs/replay.md has an example");
    let block = example
        .split("```")
        .nth(1)
        .expect("the example is a code block");
    let lines: Vec<&str> = block.lines().filter(|l| l.starts_with('{')).collect();
    let input: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with(r#"{"cmd""#))
        .collect();
    let expected: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| !l.starts_with(r#"{"cmd""#))
        .collect();
    let mut output = Vec::new();
    cli::replay::run(input.join("\n").as_bytes(), &mut output).unwrap();
    let output = String::from_utf8(output).unwrap();
    assert_eq!(output.lines().collect::<Vec<_>>(), expected);
}

#[test]
fn the_core_benchmark_runs_end_to_end_on_a_small_load() {
    let report = succeeds(
        agora()
            .args([
                "bench",
                "core",
                "--commands",
                "2000",
                "--submitters",
                "64",
                "--offered",
                "2000",
                "--latency-seconds",
                "1",
                "--snapshot-orders",
                "2000",
            ])
            .env_remove("AGORA_BENCH_POSTGRES_URL"),
    );
    assert!(report.contains("| sqlite (synchronous=FULL) |"), "{report}");
    assert!(
        report.contains("snapshot of 2000 resting orders"),
        "{report}"
    );
}

#[test]
fn the_websocket_orders_benchmark_counts_answers_and_no_errors() {
    let report = succeeds(agora().args([
        "bench",
        "ws",
        "--only",
        "orders",
        "--connections",
        "2",
        "--in-flight",
        "3",
        "--seconds",
        "1",
        "--durability",
        "normal",
    ]));
    // | store | connections x in flight | commands/s | p50 | p99 | p99.9 | errors | …
    let row = report
        .lines()
        .find(|l| l.starts_with("| SQLite `synchronous=NORMAL` | 2 x 3 |"))
        .unwrap_or_else(|| panic!("no result row in {report}"));
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    let per_second: f64 = cells[3].parse().unwrap();
    assert!(per_second > 0.0, "{report}");
    assert_eq!(cells[7], "0", "errors: {report}");
    assert!(!report.contains("unanswered"), "{report}");
}

#[test]
fn the_rest_orders_benchmark_reports_each_seconds_p99() {
    let report = succeeds(agora().args([
        "bench",
        "api",
        "--connections",
        "4",
        "--seconds",
        "2",
        "--rate",
        "200",
        "--durability",
        "normal",
    ]));
    assert!(report.contains(", 0 errors;"), "{report}");
    let seconds = report
        .lines()
        .find_map(|l| l.strip_prefix("p99 by second of the run: "))
        .unwrap_or_else(|| panic!("no p99 by second in {report}"));
    let seconds: Vec<f64> = seconds
        .trim_end_matches(" ms")
        .split(' ')
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(seconds.len(), 2, "{report}");
    assert!(seconds.iter().all(|p99| *p99 > 0.0), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_a_books_snapshot_from_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = server::Config {
        listen: "127.0.0.1:0".into(),
        data_dir: dir.path().join("agora-data"),
        durability: "normal".into(),
        ..server::Config::default()
    };
    config.auth.admin_password = Some("watch-test-password".into());
    let running = server::Server::start(config).await.unwrap();
    let base = format!("http://{}", running.addr);
    let client = reqwest::Client::new();
    let login: Value = client
        .post(format!("{base}/api/v1/auth/login"))
        .json(&serde_json::json!({"username": "admin", "password": "watch-test-password"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = login["token"].as_str().unwrap();
    for (path, body) in [
        (
            "assets",
            serde_json::json!({"symbol": "BTC", "decimals": 8}),
        ),
        (
            "assets",
            serde_json::json!({"symbol": "USDT", "decimals": 6}),
        ),
        (
            "markets",
            serde_json::json!({"symbol": "BTC-USDT", "tick": "0.01", "lot": "0.0001"}),
        ),
    ] {
        let response = client
            .post(format!("{base}/api/v1/admin/{path}"))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
    }
    let mut out = Vec::new();
    let printed = cli::watch::run(
        cli::watch::WatchOptions {
            server: base,
            token: None,
            channels: vec!["book.BTC-USDT".into()],
            count: 2,
        },
        &mut out,
    )
    .await
    .unwrap();
    assert_eq!(printed, 2);
    let lines: Vec<Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["type"], "subscribed");
    assert_eq!(lines[1]["type"], "snapshot");
    assert_eq!(lines[1]["channel"], "book.BTC-USDT");
    running.shutdown().await.unwrap();
}
