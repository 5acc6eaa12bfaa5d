//! Steady publishing through the real publisher's HTTP API (`POST /publish`, so every message
//! has history), one task per channel, one message at a time, over a keep-alive connection.
//! Each payload is `{"n":N,"pad":"…"}`; the [`Ledger`] records what started, what was
//! acknowledged and what failed.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::ledger::Ledger;
use crate::report::Report;

/// A minimal HTTP/1.1 client on one keep-alive connection (reconnects after any error).
pub struct Http {
    addr: String,
    conn: Option<BufReader<TcpStream>>,
}

impl Http {
    pub fn new(addr: &str) -> Http {
        Http {
            addr: addr.to_owned(),
            conn: None,
        }
    }

    /// `POST path` with a JSON body: (status, body). Any I/O error or a 5 s silence drops the
    /// connection and is an Err.
    pub async fn post(&mut self, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
        let result = tokio::time::timeout(Duration::from_secs(5), self.exchange(path, body)).await;
        match result {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => {
                self.conn = None;
                Err(e)
            }
            Err(_) => {
                self.conn = None;
                anyhow::bail!("no answer within 5 s")
            }
        }
    }

    async fn exchange(&mut self, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
        if self.conn.is_none() {
            self.conn = Some(BufReader::new(TcpStream::connect(&self.addr).await?));
        }
        let conn = self.conn.as_mut().expect("just connected");
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        conn.get_mut().write_all(request.as_bytes()).await?;
        let mut status_line = String::new();
        anyhow::ensure!(conn.read_line(&mut status_line).await? > 0, "closed");
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("bad status line {status_line:?}"))?;
        let (mut length, mut close) = (0usize, false);
        loop {
            let mut line = String::new();
            anyhow::ensure!(conn.read_line(&mut line).await? > 0, "closed in the head");
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap_or((line, ""));
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse()?,
                "connection" => close = value.trim().eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        conn.read_exact(&mut body).await?;
        if close {
            self.conn = None;
        }
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// Publish on `channel` at `per_second` with `pad` bytes of padding until `stop`.
pub async fn run(
    publisher: String,
    channel: String,
    per_second: f64,
    pad: usize,
    ledger: Arc<Ledger>,
    report: Arc<Report>,
    stop: CancellationToken,
) {
    let record = ledger.channel(&channel);
    let mut http = Http::new(&publisher);
    let padding = "x".repeat(pad);
    let mut every = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        n += 1;
        record.start(n);
        let body = json!({"channel": channel, "data": {"n": n, "pad": padding}}).to_string();
        match http.post("/publish", &body).await {
            Ok((200, _)) => {
                record.ack(n);
                report.count("published");
            }
            Ok((status, reply)) => {
                record.unknown(n);
                report.count("publish_failed");
                if status != 503 {
                    report.fail(format!("publish {channel} {n}: {status} {reply}"));
                }
            }
            Err(_) => {
                record.unknown(n);
                report.count("publish_failed");
            }
        }
    }
}
