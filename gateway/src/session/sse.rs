//! The Server-Sent Events transport (docs/REFERENCE.md §9): a session's frames as the events
//! of a `text/event-stream` response, the client's frames from an inbox that the `POST
//! /sse/{session}` handler (or the relay, for a POST that reached another node) fills.
//!
//! - Each frame is one event, `data: <frame>`, preceded by `id: <resume token>` once the
//!   session has delivered an offset: the token is the session's latest offset per history
//!   channel in the syntax of `since` (`alerts@<offset>,chat:lobby@<offset>`), so a browser's
//!   automatic reconnect sends it back as `Last-Event-ID` and resumes exactly there.
//! - The heartbeat is a comment line (`: ping`); the client cannot answer it, so a ping that
//!   was written counts as proof of life, and a client that stops reading reaches the
//!   heartbeat timeout like a silent WebSocket client.
//! - The end is `event: close` with `data: {"code":…,"reason":…}` (the close codes of §2).
//!
//! The body is fed through a channel of one chunk: a batch of frames becomes one chunk (one
//! `write()` by hyper), and a client that stops reading blocks the session's guarded write,
//! exactly where a WebSocket's would block.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::transport::{End, Inbound, Transport};
use crate::metrics::reason;
use crate::outbox::{Frame, Outbox};
use crate::protocol;
use crate::relay::Registration;

/// A fed batch larger than this is handed to the body before the flush, so one burst never
/// holds more than this beyond the outbox.
const CHUNK: usize = 64 * 1024;

/// One SSE session's stream.
pub struct Sse {
    /// The session's queue (the session writes its frames as events).
    outbox: Arc<Outbox>,
    /// Chunks of the response body; closed when the client went away.
    out: mpsc::Sender<Bytes>,
    /// Client frames POSTed for this session; None for a refused stream.
    inbox: Option<(Registration, mpsc::Receiver<String>)>,
    /// Events fed and not flushed yet (allocated per batch, so an idle session holds none).
    buf: BytesMut,
    /// The resume positions; None (one word) until the session has any.
    positions: Option<Box<Positions>>,
    /// At most this many channels in the resume token (the session's channel limit).
    max_positions: usize,
}

/// The latest offset per history channel, oldest update first, and the token they make.
#[derive(Default)]
struct Positions {
    entries: Vec<(Box<str>, Box<str>)>,
    /// `channel@offset,…`, rebuilt when an entry changed.
    token: String,
    stale: bool,
}

impl Positions {
    fn set(&mut self, channel: &str, offset: &str, max: usize) {
        match self.entries.iter().position(|(c, _)| &**c == channel) {
            Some(i) => {
                let mut entry = self.entries.remove(i);
                if *entry.1 != *offset {
                    entry.1 = offset.into();
                }
                self.entries.push(entry);
            }
            None => {
                if self.entries.len() >= max.max(1) {
                    self.entries.remove(0);
                }
                self.entries.push((channel.into(), offset.into()));
            }
        }
        self.stale = true;
    }

    fn forget(&mut self, channel: &str) {
        let before = self.entries.len();
        self.entries.retain(|(c, _)| &**c != channel);
        self.stale |= self.entries.len() != before;
    }

    fn token(&mut self) -> &str {
        if self.stale {
            self.token.clear();
            for (i, (channel, offset)) in self.entries.iter().enumerate() {
                if i > 0 {
                    self.token.push(',');
                }
                self.token.push_str(channel);
                self.token.push('@');
                self.token.push_str(offset);
            }
            self.stale = false;
        }
        &self.token
    }
}

/// A new stream: the transport its session writes into, and the response body that carries
/// it. `inbox` is the session's registration and its client frames (None for a stream that
/// only says why it was refused); `since` (the `since` parameter or `Last-Event-ID` the
/// session resumes from) seeds the resume token, so that a reconnect before any new message
/// resumes from the same place.
pub fn stream(
    inbox: Option<(Registration, mpsc::Receiver<String>)>,
    since: Option<&str>,
    max_positions: usize,
    queue_limit: usize,
) -> (Sse, Body) {
    let (tx, mut rx) = mpsc::channel::<Bytes>(1);
    let body = Body::from_stream(futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|chunk| chunk.map(Ok::<_, Infallible>))
    }));
    let mut sse = Sse {
        outbox: Arc::new(Outbox::new(queue_limit)),
        out: tx,
        inbox,
        buf: BytesMut::new(),
        positions: None,
        max_positions,
    };
    for (channel, offset) in since
        .map(protocol::parse_since_param)
        .unwrap_or_default()
        .into_iter()
        .flatten()
    {
        let offset = format!("{}:{}", offset.epoch, offset.stream_id());
        sse.positions
            .get_or_insert_with(Default::default)
            .set(&channel, &offset, max_positions);
    }
    (sse, body)
}

/// Append one event carrying `data` to `buf`, with `id` when given. A line break inside the
/// data (a published payload's own JSON whitespace) continues it on a new `data:` line, which
/// the client joins back with `\n`.
fn put_event(buf: &mut BytesMut, id: Option<&str>, event: Option<&str>, data: &str) {
    buf.reserve(data.len() + id.map_or(0, str::len) + 16);
    if let Some(id) = id {
        buf.put_slice(b"id: ");
        buf.put_slice(id.as_bytes());
        buf.put_u8(b'\n');
    }
    if let Some(event) = event {
        buf.put_slice(b"event: ");
        buf.put_slice(event.as_bytes());
        buf.put_u8(b'\n');
    }
    for line in data.split(['\n', '\r']) {
        buf.put_slice(b"data: ");
        buf.put_slice(line.as_bytes());
        buf.put_u8(b'\n');
    }
    buf.put_u8(b'\n');
}

impl Sse {
    async fn write(&mut self, chunk: Bytes) -> Result<(), End> {
        self.out
            .send(chunk)
            .await
            .map_err(|_| End::Gone(reason::CLIENT_CLOSE))
    }
}

impl Transport for Sse {
    const KIND: &'static str = crate::metrics::transport::SSE;
    const PING_PROVES_LIFE: bool = true;

    fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    async fn feed(&mut self, frame: Frame) -> Result<(), End> {
        let text = frame.text();
        if let Some((channel, offset)) = protocol::message_identity(text) {
            self.positions.get_or_insert_with(Default::default).set(
                channel,
                offset,
                self.max_positions,
            );
        }
        // Once the session has had a position, every event says where it is, even nowhere
        // (an empty `id:` after its last channel was forgotten clears the browser's
        // `Last-Event-ID`, which would otherwise resume from a stale position).
        let id = self.positions.as_deref_mut().map(Positions::token);
        put_event(&mut self.buf, id, None, text);
        if self.buf.len() >= CHUNK {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), End> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::take(&mut self.buf).freeze();
        self.write(chunk).await
    }

    async fn recv(&mut self) -> Inbound {
        let Some((_, inbox)) = self.inbox.as_mut() else {
            self.out.closed().await;
            return Inbound::Lost(End::Gone(reason::CLIENT_CLOSE));
        };
        tokio::select! {
            biased;
            _ = self.out.closed() => Inbound::Lost(End::Gone(reason::CLIENT_CLOSE)),
            frame = inbox.recv() => match frame {
                Some(text) => Inbound::Text(Utf8Bytes::from(text)),
                None => Inbound::Lost(End::Gone(reason::CLIENT_CLOSE)),
            },
        }
    }

    async fn ping(&mut self) -> Result<(), End> {
        self.flush().await?;
        self.write(Bytes::from_static(b": ping\n\n")).await
    }

    async fn close(&mut self, code: u16, reason: &str) {
        let data = serde_json::json!({ "code": code, "reason": reason }).to_string();
        let mut buf = std::mem::take(&mut self.buf);
        put_event(&mut buf, None, Some("close"), &data);
        let _ = self.write(buf.freeze()).await;
    }

    async fn gone(&mut self) {}

    fn forget(&mut self, channel: &str) {
        if let Some(positions) = self.positions.as_deref_mut() {
            positions.forget(channel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_carry_the_resume_token_and_split_lines() {
        let mut buf = BytesMut::new();
        put_event(&mut buf, Some("a@e:1-0"), None, "{\"x\":\n1}");
        assert_eq!(&buf[..], b"id: a@e:1-0\ndata: {\"x\":\ndata: 1}\n\n");
        let mut buf = BytesMut::new();
        put_event(&mut buf, None, Some("close"), "{\"code\":4000}");
        assert_eq!(&buf[..], b"event: close\ndata: {\"code\":4000}\n\n");
    }

    #[test]
    fn the_token_is_a_since_value_of_the_latest_offsets() {
        let mut p = Positions::default();
        p.set("alerts", "e:1-0", 3);
        p.set("chat:lobby", "e:5-0", 3);
        p.set("alerts", "e:2-0", 3);
        assert_eq!(p.token(), "chat:lobby@e:5-0,alerts@e:2-0");
        let parsed = protocol::parse_since_param(p.token());
        assert!(parsed.iter().all(Result::is_ok));
        p.forget("chat:lobby");
        assert_eq!(p.token(), "alerts@e:2-0");
        // Bounded: the oldest update gives way.
        p.set("b", "e:1-0", 2);
        p.set("c", "e:1-0", 2);
        assert_eq!(p.token(), "b@e:1-0,c@e:1-0");
    }

    #[tokio::test]
    async fn a_batch_is_one_chunk_and_close_ends_the_body() {
        let (mut sse, body) = stream(None, Some("alerts@e:1-0"), 10, 1 << 20);
        let frame = protocol::message_frame("alerts", b"{\"a\":1}", Some("e:2-0"));
        let reader =
            tokio::spawn(async move { axum::body::to_bytes(body, usize::MAX).await.unwrap() });
        let now = std::time::Instant::now();
        sse.feed(Frame::new(frame.clone(), now)).await.unwrap();
        sse.feed(Frame::new("{\"type\":\"pong\"}".to_owned(), now))
            .await
            .unwrap();
        sse.flush().await.unwrap();
        sse.close(4000, "slow").await;
        drop(sse);
        let text = String::from_utf8(reader.await.unwrap().to_vec()).unwrap();
        assert_eq!(
            text,
            format!(
                "id: alerts@e:2-0\ndata: {frame}\n\nid: alerts@e:2-0\ndata: {{\"type\":\"pong\"}}\n\n\
                 event: close\ndata: {{\"code\":4000,\"reason\":\"slow\"}}\n\n"
            )
        );
    }
}
