//! What a session needs from whatever carries it (a WebSocket, an SSE stream): write frames in
//! batches, read the client's next frame, keep the connection warm, say goodbye with a close
//! code. The session's life (subscriptions, recovery, watermarks, pending waits, heartbeat,
//! limits) is the same for every transport; a transport only moves frames.

use std::future::Future;
use std::sync::Arc;

use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::outbox::{Frame, Outbox};

/// How a session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Send this close code, count this reason.
    Close(u16, &'static str),
    /// The connection is already gone (client closed, I/O error): nothing to send.
    Gone(&'static str),
}

/// What the client sent, as the session sees it.
pub enum Inbound {
    /// A text frame to handle.
    Text(Utf8Bytes),
    /// Proof of life without a frame to handle (a WebSocket ping or pong).
    Seen,
    /// Something that ends the session once its arrival is accounted for (a close frame, a
    /// binary frame): the client was seen, and the token's expiry is checked first.
    Refused(End),
    /// The connection failed or ended without a frame.
    Lost(End),
}

/// One way to carry a session's frames. Every method's future must be cancel-safe where the
/// session selects over it (`recv`), and every write may be interrupted (dropped) by the
/// session's overflow, heartbeat and shutdown guard.
pub trait Transport: Send {
    /// The value of the `transport` metric label.
    const KIND: &'static str;
    /// Whether a completed ping write proves the client is there: true where the client
    /// cannot answer pings (SSE), so that a stream it keeps reading stays alive and one it
    /// stopped reading reaches the heartbeat timeout.
    const PING_PROVES_LIFE: bool;

    /// The session's outbox: the hub fills it, and a transport that owns a socket writes
    /// through it (a WebSocket's pre-framed bytes, straight from the fan-out when nothing is
    /// queued).
    fn outbox(&self) -> &Arc<Outbox>;

    /// Buffer one frame for the next `flush` (it may be written before, when buffers fill).
    /// Each transport writes the frame its own way: the WebSocket its pre-built wire bytes,
    /// SSE an event around its text.
    fn feed(&mut self, frame: Frame) -> impl Future<Output = Result<(), End>> + Send;

    /// Write everything fed so far.
    fn flush(&mut self) -> impl Future<Output = Result<(), End>> + Send;

    /// Feed and flush one frame.
    fn send(&mut self, frame: Frame) -> impl Future<Output = Result<(), End>> + Send {
        async move {
            self.feed(frame).await?;
            self.flush().await
        }
    }

    /// The client's next frame or event. Cancel-safe.
    fn recv(&mut self) -> impl Future<Output = Inbound> + Send;

    /// The heartbeat's keep-alive (a WebSocket ping, an SSE comment).
    fn ping(&mut self) -> impl Future<Output = Result<(), End>> + Send;

    /// Tell the client the session ends with `code` (and `reason`), then let the connection
    /// go. Bounded by the caller.
    fn close(&mut self, code: u16, reason: &str) -> impl Future<Output = ()> + Send;

    /// The connection is gone: write out whatever is still owed (a reply to a close frame).
    /// Bounded by the caller.
    fn gone(&mut self) -> impl Future<Output = ()> + Send;

    /// The session will deliver nothing more of `channel` that a resume could start from
    /// (unsubscribed, or its history is gone). Transports that keep resume positions forget
    /// it; others ignore this.
    fn forget(&mut self, _channel: &str) {}
}
