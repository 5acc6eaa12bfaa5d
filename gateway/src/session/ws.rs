//! The WebSocket transport: a session's frames as WebSocket text frames, the heartbeat as
//! WebSocket pings, the end as a close frame with the code (docs/REFERENCE.md §2).
//!
//! The session owns its raw `TcpStream` (the upgrade is done on hyper directly,
//! `crate::upgrade`), shared by two sides:
//! - writes go through the session's [`Outbox`], the socket's only writer: text frames are
//!   the pre-built wire bytes of [`Frame`] (framed once per message, never by tungstenite),
//!   and tungstenite's own writes (pings, close frames, replies to the client's pings and
//!   close) are owed to the outbox in order with them ([`WsIo`]'s `Write`);
//! - reads go through tungstenite, which parses and validates the client's frames (its
//!   synchronous `WebSocket` over the non-blocking socket; this transport waits for
//!   readiness).
//!
//! tungstenite's read and write errors map to the close codes of the protocol.

use std::future::{poll_fn, Future};
use std::io;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message, WebSocket};

use super::transport::{End, Inbound, Transport};
use crate::metrics::reason;
use crate::outbox::{Frame, Outbox, Wrote};
use crate::protocol::close;

/// The socket as tungstenite sees it: non-blocking reads from the `TcpStream` (WouldBlock
/// when nothing is there: [`Ws::read`] then waits for readiness), writes owed to the outbox
/// in order with everything else owed to the socket.
pub struct WsIo {
    /// Owns the socket (`Outbox::socket`): one allocation per session, not two.
    outbox: Arc<Outbox>,
}

impl WsIo {
    fn socket(&self) -> io::Result<&TcpStream> {
        // `Ws::new` always builds the outbox with the socket.
        self.outbox
            .socket()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl io::Read for WsIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.socket()?.try_read(buf)
    }
}

impl io::Write for WsIo {
    /// Accepts everything at once (tungstenite writes only control frames, a few bytes),
    /// written at once when the socket takes it, or by the next flush.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.outbox.owe(Bytes::copy_from_slice(buf));
        self.outbox.write_wire()?;
        Ok(buf.len())
    }

    /// Never blocks: what the socket does not take stays owed ([`Ws::flush_wire`] waits).
    fn flush(&mut self) -> io::Result<()> {
        self.outbox.write_wire().map(|_| ())
    }
}

/// An upgraded WebSocket carrying one session: tungstenite's synchronous `WebSocket` over the
/// non-blocking socket, driven by this transport's readiness waits (one task, so none of
/// tokio-tungstenite's waker plumbing per connection).
pub struct Ws {
    /// Boxed, one pointer: the transport is moved through several layers of async functions,
    /// and each keeps its own copy of its arguments in its future.
    inner: Box<Inner>,
}

struct Inner {
    /// tungstenite over the socket; its `WsIo` holds the outbox.
    ws: WebSocket<WsIo>,
    /// A read failed (a frame too large, a protocol error): tungstenite must not be read
    /// again (it keeps the refused frame's header), so the close does not wait for a reply.
    failed: bool,
}

impl Ws {
    /// The transport of a session on `socket`, whose upgrade request left `read` unparsed
    /// (bytes the client sent right behind it), with tungstenite's `config` for reading and
    /// an outbox bounded to `queue_limit` bytes.
    pub fn new(
        socket: TcpStream,
        read: Vec<u8>,
        config: WebSocketConfig,
        queue_limit: usize,
    ) -> Ws {
        let outbox = Arc::new(Outbox::with_socket(queue_limit, Some(socket)));
        let io = WsIo { outbox };
        let ws = WebSocket::from_partially_read(io, read, Role::Server, Some(config));
        Ws {
            inner: Box::new(Inner { ws, failed: false }),
        }
    }

    async fn flush_wire(&mut self) -> Result<(), End> {
        self.outbox()
            .flush_wire()
            .await
            .map_err(|_| End::Gone(reason::IO_ERROR))
    }

    /// The client's next message. Cancel-safe: tungstenite keeps a partly read frame. A
    /// plain closure future (no `async fn` layers): an idle session holds it.
    fn read(&mut self) -> impl Future<Output = Result<Message, tungstenite::Error>> + Send + '_ {
        let inner = &mut *self.inner;
        poll_fn(move |cx| loop {
            if inner.failed {
                return Poll::Ready(Err(tungstenite::Error::AlreadyClosed));
            }
            let ws = &mut inner.ws;
            match ws.read() {
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    // A reply tungstenite owes (a pong) that the socket did not take: be
                    // woken when it can, to write it.
                    let io = ws.get_ref();
                    let socket = match io.socket() {
                        Ok(socket) => socket,
                        Err(e) => {
                            inner.failed = true;
                            return Poll::Ready(Err(e.into()));
                        }
                    };
                    if let Ok(Wrote::Blocked) = io.outbox.write_wire() {
                        let _ = socket.poll_write_ready(cx);
                    }
                    match socket.poll_read_ready(cx) {
                        Poll::Ready(Ok(())) => continue,
                        Poll::Ready(Err(e)) => {
                            inner.failed = true;
                            return Poll::Ready(Err(e.into()));
                        }
                        Poll::Pending => return Poll::Pending,
                    }
                }
                other => {
                    inner.failed = other.is_err();
                    return Poll::Ready(other);
                }
            }
        })
    }

    /// Hand a control message to tungstenite, then write it out.
    async fn send(&mut self, message: Message) -> Result<(), End> {
        self.inner.ws.send(message).map_err(classify_error)?;
        self.flush_wire().await
    }
}

impl Transport for Ws {
    const KIND: &'static str = crate::metrics::transport::WS;
    const PING_PROVES_LIFE: bool = false;

    fn outbox(&self) -> &Arc<Outbox> {
        &self.inner.ws.get_ref().outbox
    }

    async fn feed(&mut self, frame: Frame) -> Result<(), End> {
        self.outbox().owe(frame.wire().clone());
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), End> {
        self.flush_wire().await
    }

    fn recv(&mut self) -> impl Future<Output = Inbound> + Send {
        let read = self.read();
        async move {
            match read.await {
                Err(e) => Inbound::Lost(classify_error(e)),
                Ok(Message::Text(text)) => Inbound::Text(text),
                Ok(Message::Binary(_)) => {
                    Inbound::Refused(End::Close(close::UNSUPPORTED_DATA, reason::BINARY_FRAME))
                }
                Ok(Message::Ping(_) | Message::Pong(_)) => Inbound::Seen,
                Ok(Message::Close(_)) => Inbound::Refused(End::Gone(reason::CLIENT_CLOSE)),
                // Raw frames are never returned when reading.
                Ok(Message::Frame(_)) => Inbound::Seen,
            }
        }
    }

    async fn ping(&mut self) -> Result<(), End> {
        self.send(Message::Ping(Default::default())).await
    }

    async fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        };
        if self.send(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        // Then read until the client answers or goes away.
        while let Ok(msg) = self.read().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
        let _ = self.flush_wire().await;
    }

    async fn gone(&mut self) {
        // Write a close reply tungstenite may owe for the client's close frame.
        let _ = self.inner.ws.flush();
        let _ = timeout(Duration::from_secs(1), self.flush_wire()).await;
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
