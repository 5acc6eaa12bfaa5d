//! A raw Server-Sent Events client for the tests: one HTTP/1.1 GET on a bare TCP stream, the
//! chunked body decoded by hand, the event stream parsed as a browser's EventSource would
//! (`id:`, `event:`, `data:` lines, comments), every wait bounded by [`TIMEOUT`].

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{HttpResponse, TIMEOUT};

/// One item of an event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseItem {
    /// A comment line (`: ping`), without the colon.
    Comment(String),
    /// An event: its `id:` (when it had one), `event:` type (when not the default), and data
    /// lines joined with `\n`.
    Event {
        id: Option<String>,
        event: Option<String>,
        data: String,
    },
}

/// An open event stream.
pub struct SseClient {
    pub stream: TcpStream,
    /// The response's status and headers (its body is the stream).
    pub head: HttpResponse,
    /// Bytes read and not yet decoded from the chunked body.
    raw: Vec<u8>,
    /// Decoded body text not yet parsed into items.
    text: String,
    /// The body ended (the zero-size chunk, or EOF).
    pub ended: bool,
    /// The last `id:` seen, as EventSource keeps it for `Last-Event-ID`.
    pub last_id: Option<String>,
    /// The `session` of the welcome, once read.
    pub session: Option<String>,
}

impl crate::Frames for SseClient {
    fn next_frame(&mut self) -> impl std::future::Future<Output = Value> + Send {
        self.frame()
    }
}

impl SseClient {
    /// `GET path_and_query` on 127.0.0.1:port with `headers`; returns once the response head
    /// is read (whatever its status: see `head`).
    pub async fn connect(port: u16, path_and_query: &str, headers: &[(&str, &str)]) -> SseClient {
        Self::connect_to("127.0.0.1", port, path_and_query, headers).await
    }

    pub async fn connect_to(
        host: &str,
        port: u16,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> SseClient {
        let mut stream = tokio::time::timeout(TIMEOUT, TcpStream::connect((host, port)))
            .await
            .expect("connect timed out")
            .expect("connect");
        let mut request = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n"
        );
        for (k, v) in headers {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            let n = tokio::time::timeout(TIMEOUT, stream.read(&mut chunk))
                .await
                .expect("response head timed out")
                .expect("read");
            assert!(n > 0, "closed before the response head");
            raw.extend_from_slice(&chunk[..n]);
        };
        let head_text = String::from_utf8_lossy(&raw[..end]).to_string();
        raw.drain(..end + 4);
        let mut lines = head_text.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .expect("status line");
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
        let mut client = SseClient {
            stream,
            head: HttpResponse {
                status,
                headers,
                body: String::new(),
            },
            raw,
            text: String::new(),
            ended: false,
            last_id: None,
            session: None,
        };
        if !chunked {
            // A plain body (an error answer): read it whole.
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(TIMEOUT, client.stream.read_to_end(&mut rest)).await;
            client.raw.extend_from_slice(&rest);
            client.head.body = String::from_utf8_lossy(&client.raw).to_string();
            client.raw.clear();
            client.ended = true;
        }
        client
    }

    /// Decode whole chunks from `raw` into `text`.
    fn decode(&mut self) {
        loop {
            let Some(line_end) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let size_text = String::from_utf8_lossy(&self.raw[..line_end]).to_string();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}"));
            if size == 0 {
                self.ended = true;
                self.raw.clear();
                return;
            }
            let start = line_end + 2;
            if self.raw.len() < start + size + 2 {
                return;
            }
            let data = self.raw[start..start + size].to_vec();
            self.raw.drain(..start + size + 2);
            self.text
                .push_str(std::str::from_utf8(&data).expect("UTF-8 event stream"));
        }
    }

    /// The next item already decoded, if a whole one is there.
    fn parse_one(&mut self) -> Option<SseItem> {
        let end = self.text.find("\n\n")?;
        let block: String = self.text.drain(..end + 2).collect();
        let (mut id, mut event, mut data, mut comment) = (None, None, Vec::new(), None);
        for line in block.trim_end_matches('\n').split('\n') {
            if let Some(c) = line.strip_prefix(':') {
                comment = Some(c.trim_start().to_owned());
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => id = Some(value.to_owned()),
                "event" => event = Some(value.to_owned()),
                "data" => data.push(value.to_owned()),
                _ => {}
            }
        }
        if data.is_empty() && id.is_none() && event.is_none() {
            return Some(SseItem::Comment(comment.unwrap_or_default()));
        }
        if let Some(id) = &id {
            self.last_id = Some(id.clone());
        }
        Some(SseItem::Event {
            id,
            event,
            data: data.join("\n"),
        })
    }

    /// The next item within `wait`; None when none came (or the stream ended).
    pub async fn next_within(&mut self, wait: Duration) -> Option<SseItem> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            self.decode();
            if let Some(item) = self.parse_one() {
                return Some(item);
            }
            if self.ended {
                return None;
            }
            let n = match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return None,
                Ok(Ok(n)) => n,
                Ok(Err(_)) => 0,
            };
            if n == 0 {
                self.ended = true;
                return None;
            }
            self.raw.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next item; panics after [`TIMEOUT`] or at the end of the stream.
    pub async fn next(&mut self) -> SseItem {
        self.next_within(TIMEOUT)
            .await
            .expect("no event within the timeout (or the stream ended)")
    }

    /// The next data event's frame (comments skipped); panics on `event: close`.
    pub async fn frame(&mut self) -> Value {
        loop {
            match self.next().await {
                SseItem::Comment(_) => continue,
                SseItem::Event {
                    event: Some(e),
                    data,
                    ..
                } if e == "close" => {
                    panic!("stream closed: {data}")
                }
                SseItem::Event { data, .. } => {
                    let frame: Value = serde_json::from_str(&data)
                        .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {data:?}"));
                    if frame["type"] == "welcome" {
                        self.session = frame["session"].as_str().map(str::to_owned);
                    }
                    return frame;
                }
            }
        }
    }

    /// Read until `event: close`: its `data` (`{"code":…,"reason":…}`), then the end of the
    /// stream. Panics if the stream ends without one.
    pub async fn expect_close(&mut self) -> Value {
        loop {
            match self.next_within(TIMEOUT).await {
                Some(SseItem::Event {
                    event: Some(e),
                    data,
                    ..
                }) if e == "close" => {
                    let close: Value = serde_json::from_str(&data).expect("close data is JSON");
                    assert!(
                        self.next_within(TIMEOUT).await.is_none(),
                        "events after close"
                    );
                    assert!(self.ended, "the stream goes on after its close event");
                    return close;
                }
                Some(_) => continue,
                None => panic!("the stream ended (or stalled) without an `event: close`"),
            }
        }
    }
}

/// `POST /sse/{session}` with one client frame: the response.
pub async fn sse_post(
    port: u16,
    session: &str,
    frame: &Value,
    headers: &[(&str, &str)],
) -> HttpResponse {
    let mut all = vec![("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    crate::http_exchange(
        port,
        "POST",
        &format!("/sse/{session}"),
        &all,
        &frame.to_string(),
    )
    .await
    .expect("POST answered")
}
