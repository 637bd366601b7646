//! `agora watch`: subscribes to WebSocket channels of a running server and prints each
//! message as one JSON line, for operators and for the README's tour.

use std::io::Write;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// What to watch.
pub struct WatchOptions {
    /// The server, `http://HOST:PORT`.
    pub server: String,
    /// A session token, for the private channels.
    pub token: Option<String>,
    /// Channels such as `book.BTC-USDT`.
    pub channels: Vec<String>,
    /// Stop after this many messages (0: run until the server closes).
    pub count: u64,
}

/// Prints the channels' messages to `out` until `count` are printed or the socket closes.
pub async fn run(options: WatchOptions, mut out: impl Write) -> anyhow::Result<u64> {
    let base = options
        .server
        .trim_end_matches('/')
        .replacen("http://", "ws://", 1)
        .replacen("https://", "wss://", 1);
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("{base}/api/v1/ws"))
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the WebSocket at {base}/api/v1/ws: {e}"))?;
    if let Some(token) = options.token {
        let auth = json!({"op": "auth", "token": token}).to_string();
        socket.send(Message::Text(auth.into())).await?;
    }
    for (n, channel) in options.channels.iter().enumerate() {
        let subscribe = json!({"op": "subscribe", "channel": channel, "id": n + 1}).to_string();
        socket.send(Message::Text(subscribe.into())).await?;
    }
    let mut printed = 0;
    while let Some(message) = socket.next().await {
        match message? {
            Message::Text(text) => {
                writeln!(out, "{text}")?;
                out.flush()?;
                printed += 1;
                if options.count > 0 && printed >= options.count {
                    break;
                }
            }
            Message::Close(frame) => {
                if let Some(frame) = frame {
                    eprintln!(
                        "closed by the server: {} {}",
                        u16::from(frame.code),
                        frame.reason
                    );
                }
                break;
            }
            _ => {}
        }
    }
    Ok(printed)
}
