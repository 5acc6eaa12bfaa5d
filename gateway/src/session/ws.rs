//! The WebSocket transport: a session's frames as WebSocket text frames, the heartbeat as
//! WebSocket pings, the end as a close frame with the code (docs/REFERENCE.md §2).
//!
//! The session owns its raw `TcpStream` (the upgrade is done on hyper directly,
//! `crate::upgrade`), shared by two sides:
//! - writes go through the session's [`Outbox`], the socket's only writer: text frames are
//!   the pre-built wire bytes of [`Frame`] (framed once per message, never by tungstenite),
//!   and tungstenite's own writes (pings, close frames, replies to the client's pings and
//!   close) are owed to the outbox in order with them ([`WsIo`]'s `AsyncWrite`);
//! - reads go through tokio-tungstenite, which parses and validates the client's frames.
//!
//! tungstenite's read and write errors map to the close codes of the protocol.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use super::transport::{End, Inbound, Transport};
use crate::metrics::reason;
use crate::outbox::{Frame, Outbox};
use crate::protocol::close;

/// The socket as tungstenite sees it: reads from the `TcpStream`, writes owed to the outbox.
pub struct WsIo {
    socket: Arc<TcpStream>,
    outbox: Arc<Outbox>,
}

impl AsyncRead for WsIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            std::task::ready!(self.socket.poll_read_ready(cx))?;
            match self.socket.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for WsIo {
    /// Accepts everything at once (tungstenite's writes are control frames, a few bytes), in
    /// order after what the session owes already; written at once when the socket takes it.
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.outbox.owe(Bytes::copy_from_slice(buf));
        self.outbox.write_wire()?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.outbox.poll_flush_wire(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The socket closes when the session drops it; here only what is owed goes out.
        self.outbox.poll_flush_wire(cx)
    }
}

/// An upgraded WebSocket carrying one session.
pub struct Ws {
    /// Boxed: the transport is moved through several layers of async functions, and each
    /// keeps its own copy of its arguments in its future (about 300 bytes of tungstenite
    /// state, per layer, per idle session, if it were inline).
    ws: Box<WebSocketStream<WsIo>>,
    outbox: Arc<Outbox>,
}

impl Ws {
    /// The transport of a session on `socket`, whose upgrade request left `read` unparsed
    /// (bytes the client sent right behind it), with tungstenite's `config` for reading and
    /// an outbox bounded to `queue_limit` bytes.
    pub async fn new(
        socket: TcpStream,
        read: Vec<u8>,
        config: WebSocketConfig,
        queue_limit: usize,
    ) -> Ws {
        let socket = Arc::new(socket);
        let outbox = Arc::new(Outbox::with_socket(queue_limit, Some(socket.clone())));
        let io = WsIo {
            socket,
            outbox: outbox.clone(),
        };
        let ws = WebSocketStream::from_partially_read(io, read, Role::Server, Some(config)).await;
        Ws {
            ws: Box::new(ws),
            outbox,
        }
    }

    async fn flush_wire(&mut self) -> Result<(), End> {
        self.outbox
            .flush_wire()
            .await
            .map_err(|_| End::Gone(reason::IO_ERROR))
    }
}

impl Transport for Ws {
    const KIND: &'static str = crate::metrics::transport::WS;
    const PING_PROVES_LIFE: bool = false;

    fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    async fn feed(&mut self, frame: Frame) -> Result<(), End> {
        self.outbox.owe(frame.wire().clone());
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), End> {
        self.flush_wire().await
    }

    async fn recv(&mut self) -> Inbound {
        match self.ws.next().await {
            None => Inbound::Lost(End::Gone(reason::CLIENT_CLOSE)),
            Some(Err(e)) => Inbound::Lost(classify_error(e)),
            Some(Ok(Message::Text(text))) => Inbound::Text(text),
            Some(Ok(Message::Binary(_))) => {
                Inbound::Refused(End::Close(close::UNSUPPORTED_DATA, reason::BINARY_FRAME))
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => Inbound::Seen,
            Some(Ok(Message::Close(_))) => Inbound::Refused(End::Gone(reason::CLIENT_CLOSE)),
            // Raw frames are never returned when reading.
            Some(Ok(Message::Frame(_))) => Inbound::Seen,
        }
    }

    async fn ping(&mut self) -> Result<(), End> {
        self.ws
            .send(Message::Ping(Default::default()))
            .await
            .map_err(classify_error)
    }

    async fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        };
        if self.ws.send(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        // Then read until the client answers or goes away.
        while let Some(Ok(msg)) = self.ws.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    }

    async fn gone(&mut self) {
        // Flush a close reply tungstenite may have queued for the client's close frame.
        let _ = timeout(Duration::from_secs(1), async {
            let _ = self.ws.flush().await;
            let _ = self.flush_wire().await;
        })
        .await;
    }
}

/// Map a WebSocket read/write error to how the session ends.
fn classify_error(e: tungstenite::Error) -> End {
    match e {
        tungstenite::Error::Capacity(_) => {
            End::Close(close::MESSAGE_TOO_BIG, reason::MESSAGE_TOO_BIG)
        }
        tungstenite::Error::Utf8(_) => End::Close(close::INVALID_PAYLOAD, reason::INVALID_UTF8),
        tungstenite::Error::Protocol(_) => {
            End::Close(close::PROTOCOL_ERROR, reason::PROTOCOL_ERROR)
        }
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            End::Gone(reason::CLIENT_CLOSE)
        }
        _ => End::Gone(reason::IO_ERROR),
    }
}
