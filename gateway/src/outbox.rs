//! A session's outbound path: the queue the hub's fan-out fills, bounded in bytes, and, for a
//! WebSocket session, the socket's write side itself. It also carries the node's signals to
//! the session (shutdown, heartbeat), so a session waits on nothing shared with other
//! sessions.
//!
//! Overflow is a decision, not backpressure: the queue is emptied, marked overflowed, and the
//! session closes with 4000 (docs/REFERENCE.md §2). The hub never waits on a session.
//!
//! The hot path (a WebSocket session in its steady state, nothing queued): the hub's
//! [`Outbox::push`] owes the message's pre-built wire bytes (one WebSocket frame, framed once
//! per message and shared by every subscriber, [`Frame`]) to the socket, and when the fan-out
//! ends [`write_all`] writes every owed socket with non-blocking sends (batched through
//! io_uring, `outbox/batch.rs`), waking nothing. Only what cannot be written at once (a full
//! socket, a partial write) is left to the session, which is woken once per batch to write
//! the backlog with vectored writes when the socket is writable. Every write to the socket
//! happens under the outbox's lock and starts at the head of what is owed (`wire`), so frames
//! never interleave, whoever writes them.
//!
//! The session turns direct writes off ([`Outbox::set_direct`]) whenever it does anything
//! itself (answers a client frame, waits for a channel to be live, recovers, pings, closes):
//! then frames queue and the session writes them in the order the protocol needs.
//!
//! Wake-ups: exactly one task (the session) consumes an outbox, so waking it is an
//! `AtomicWaker` plus flag bits, lock-free. The writer is woken only when the queue goes from
//! empty to non-empty, so a burst of N frames costs one wake-up and one batch, however many
//! frames arrive meanwhile.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::task::Poll;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use tokio::net::TcpStream;

mod batch;
#[cfg(test)]
pub use batch::testing::uses_ring as batched_on_this_thread;
pub use batch::{configure as configure_batched_writes, write_all};

/// One outgoing text frame, built once and shared (refcounted) by every session it goes to:
/// the WebSocket frame as it goes on the wire (an unmasked server frame: the same bytes for
/// every subscriber), whose tail is the frame's JSON text (what SSE and the session's
/// filters read).
#[derive(Clone, Debug)]
pub struct Frame {
    wire: Bytes,
    /// Length of the WebSocket header in front of the text (2, 4 or 10 bytes).
    header: u8,
    /// When the message was published (or reached the node), for the latency histogram.
    pub born: Instant,
}

impl Frame {
    /// Frame `text` as a final WebSocket text frame (RFC 6455 §5.2: FIN + opcode 1, no mask).
    pub fn new(text: String, born: Instant) -> Frame {
        let len = text.len();
        let mut wire = BytesMut::with_capacity(len + 10);
        wire.put_u8(0x81);
        if len < 126 {
            wire.put_u8(len as u8);
        } else if len <= usize::from(u16::MAX) {
            wire.put_u8(126);
            wire.put_u16(len as u16);
        } else {
            wire.put_u8(127);
            wire.put_u64(len as u64);
        }
        let header = wire.len() as u8;
        wire.put_slice(text.as_bytes());
        Frame {
            wire: wire.freeze(),
            header,
            born,
        }
    }

    /// The frame's JSON text.
    pub fn text(&self) -> &str {
        // Built from a `String` in `new`, so always valid UTF-8.
        std::str::from_utf8(&self.wire[usize::from(self.header)..]).unwrap_or_default()
    }

    /// The whole WebSocket frame, header included.
    pub fn wire(&self) -> &Bytes {
        &self.wire
    }

    /// What the frame costs the session's byte budget.
    pub fn len(&self) -> usize {
        self.wire.len()
    }

    pub fn is_empty(&self) -> bool {
        self.wire.is_empty()
    }
}

/// What happened to a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Owed to the socket, to be written with the fan-out's other frames by whoever ends it
    /// ([`write_all`]); `first` when nothing was owed before, i.e. that writer must write
    /// this outbox.
    Owed {
        first: bool,
    },
    Queued,
    /// The queue overflowed with this frame: it and everything queued were dropped.
    Overflowed {
        dropped: usize,
    },
    /// The session already overflowed or is closing; the frame was dropped.
    Closed,
}

/// Signals the node sends to a session through its outbox.
pub mod signal {
    /// The node is draining: close with 1001.
    pub const SHUTDOWN: u8 = 1 << 0;
    /// Heartbeat tick: ping the client, or close with 4001 if it has been silent too long.
    pub const BEAT: u8 = 1 << 1;
    /// The node queued commands for the session (`Node::take_commands`): a disconnect or an
    /// unsubscribe from the server API.
    pub const COMMAND: u8 = 1 << 2;
}

/// Flag bits in `Outbox::wake`: why the session was woken.
const READY: u8 = 1 << 0;
/// Something that must interrupt a write in progress (overflow or a signal).
const ABORT: u8 = 1 << 1;

/// At most this many frames per vectored write (well under any `IOV_MAX`).
const MAX_IOV: usize = 64;

/// Bytes owed to a socket, in order. The first is kept inline: in the steady state a
/// socket is owed one frame at a time (the fan-out's, written at once), which then costs no
/// allocation, and an idle session keeps no buffer (a `VecDeque` keeps its capacity).
#[derive(Default)]
struct Owed {
    head: Option<Bytes>,
    rest: VecDeque<Bytes>,
}

impl Owed {
    fn is_empty(&self) -> bool {
        self.head.is_none()
    }

    fn len(&self) -> usize {
        usize::from(self.head.is_some()) + self.rest.len()
    }

    fn push_back(&mut self, bytes: Bytes) {
        if self.head.is_none() {
            self.head = Some(bytes);
        } else {
            self.rest.push_back(bytes);
        }
    }

    fn front(&self) -> Option<&Bytes> {
        self.head.as_ref()
    }

    fn pop_front(&mut self) {
        self.head = self.rest.pop_front();
        if self.rest.is_empty() && self.rest.capacity() > 0 {
            // A backlog is over: give its buffer back.
            self.rest = VecDeque::new();
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Bytes> {
        self.head.iter().chain(self.rest.iter())
    }
}

#[derive(Default)]
struct State {
    /// Frames the hub queued that the session has not taken yet.
    frames: VecDeque<Frame>,
    bytes: usize,
    /// WebSocket sessions: bytes owed to the socket, in order (frames the fan-out owed or
    /// the session fed, tungstenite's control frames). The head may be partly
    /// written already (`written` bytes of it).
    wire: Owed,
    written: usize,
    closed: bool,
    overflowed: bool,
    /// The session is in its steady state: the hub may owe frames to the socket itself when
    /// nothing is queued.
    direct: bool,
}

impl State {
    /// Up to `MAX_IOV` slices of what is owed, from the first unwritten byte, into `out`.
    fn owed_slices<'a>(&'a self, out: &mut Vec<IoSlice<'a>>) {
        for (i, bytes) in self.wire.iter().take(MAX_IOV).enumerate() {
            let from = if i == 0 { self.written } else { 0 };
            out.push(IoSlice::new(&bytes[from..]));
        }
    }

    /// The socket took `wrote` more bytes of what is owed.
    fn advance(&mut self, mut wrote: usize) {
        while wrote > 0 {
            let Some(head) = self.wire.front() else {
                return;
            };
            let left = head.len() - self.written;
            if wrote >= left {
                wrote -= left;
                self.wire.pop_front();
                self.written = 0;
            } else {
                self.written += wrote;
                wrote = 0;
            }
        }
    }
}

/// How far [`Outbox::write_wire`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wrote {
    /// Everything owed is written.
    All,
    /// The socket is full: wait until it is writable, then write again.
    Blocked,
}

/// The queue. Shared between the hub and the node (producers) and one session (consumer).
pub struct Outbox {
    /// std Mutex: held only for a push, a swap or non-blocking writes, never across
    /// `.await`.
    state: Mutex<State>,
    /// The session task's waker.
    waker: AtomicWaker,
    /// READY / ABORT bits, set by producers, cleared by the session.
    wake: AtomicU8,
    /// `signal::*` bits not yet seen by the session.
    signals: AtomicU8,
    limit: usize,
    /// A WebSocket session's socket (its transport reads it through [`Outbox::socket`]).
    /// Written only under `state`'s lock.
    socket: Option<TcpStream>,
}

impl Outbox {
    /// An outbox whose frames the session writes itself (SSE, the node's own consumers).
    pub fn new(limit: usize) -> Outbox {
        Outbox::with_socket(limit, None)
    }

    /// An outbox that owns the write side of a WebSocket session's `socket`.
    pub fn with_socket(limit: usize, socket: Option<TcpStream>) -> Outbox {
        Outbox {
            state: Mutex::new(State::default()),
            waker: AtomicWaker::new(),
            wake: AtomicU8::new(0),
            signals: AtomicU8::new(0),
            limit,
            socket,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock means a panic while pushing; the state is still consistent (every
        // mutation is a single field update), so keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self, bits: u8) {
        self.wake.fetch_or(bits, Ordering::AcqRel);
        self.waker.wake();
    }

    /// Deliver a frame: in the steady state it is owed to the socket, behind whatever is owed
    /// already, and written with the fan-out's other frames when the fan-out ends (one write
    /// for a batch of messages); queued for the session otherwise. Never blocks beyond the
    /// short lock.
    pub fn push(&self, frame: Frame) -> Push {
        let len = frame.len();
        let mut state = self.lock();
        if state.closed {
            return Push::Closed;
        }
        if self.socket.is_some()
            && state.direct
            && state.frames.is_empty()
            && state.wire.len() < MAX_IOV
        {
            let first = state.wire.is_empty();
            state.wire.push_back(frame.wire);
            return Push::Owed { first };
        }
        if state.bytes + len > self.limit {
            let dropped = state.frames.len() + 1;
            state.frames = VecDeque::new();
            state.bytes = 0;
            state.closed = true;
            state.overflowed = true;
            state.direct = false;
            drop(state);
            self.wake(READY | ABORT);
            return Push::Overflowed { dropped };
        }
        let was_empty = state.frames.is_empty();
        state.frames.push_back(frame);
        state.bytes += len;
        drop(state);
        if was_empty {
            self.wake(READY);
        }
        Push::Queued
    }

    /// Wake the session to write what is owed (the socket was full when a fan-out ended).
    pub fn wake_writer(&self) {
        self.wake(READY);
    }

    /// Let the hub write to the socket itself (`true`: the session is waiting with nothing
    /// to filter or order), or make it queue (`false`: the session is doing something
    /// itself). Only the session calls this.
    pub fn set_direct(&self, direct: bool) {
        if self.socket.is_some() {
            self.lock().direct = direct;
        }
    }

    /// Whether the hub may write to the socket itself (for tests and assertions).
    pub fn is_direct(&self) -> bool {
        self.lock().direct
    }

    /// The WebSocket session's socket, if this outbox writes one.
    pub fn socket(&self) -> Option<&TcpStream> {
        self.socket.as_ref()
    }

    /// Owe `bytes` to the socket, after everything owed already. Written by
    /// [`Outbox::write_wire`].
    pub fn owe(&self, bytes: Bytes) {
        if !bytes.is_empty() {
            self.lock().wire.push_back(bytes);
        }
    }

    /// Write what is owed to the socket, in vectored writes, until it is all written or the
    /// socket is full. Never waits.
    pub fn write_wire(&self) -> io::Result<Wrote> {
        let Some(socket) = self.socket.as_ref() else {
            return Ok(Wrote::All);
        };
        let mut state = self.lock();
        let state = &mut *state;
        while !state.wire.is_empty() {
            let result = {
                let mut slices = Vec::with_capacity(state.wire.len().min(MAX_IOV));
                state.owed_slices(&mut slices);
                socket.try_write_vectored(&slices)
            };
            match result {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(wrote) => state.advance(wrote),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Wrote::Blocked),
                Err(e) => return Err(e),
            }
        }
        Ok(Wrote::All)
    }

    /// Write everything owed, waiting for the socket as needed. Cancel-safe: what is not
    /// written stays owed.
    pub async fn flush_wire(&self) -> io::Result<()> {
        let Some(socket) = self.socket.as_ref() else {
            return Ok(());
        };
        while self.write_wire()? == Wrote::Blocked {
            socket.writable().await?;
        }
        Ok(())
    }

    /// [`Outbox::flush_wire`] for a poll-based writer (tungstenite's, through the transport).
    pub fn poll_flush_wire(&self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        let Some(socket) = self.socket.as_ref() else {
            return Poll::Ready(Ok(()));
        };
        loop {
            match self.write_wire() {
                Ok(Wrote::All) => return Poll::Ready(Ok(())),
                Ok(Wrote::Blocked) => {
                    if let Err(e) = std::task::ready!(socket.poll_write_ready(cx)) {
                        return Poll::Ready(Err(e));
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Deliver a node signal (`signal::*`) to the session, interrupting a write in progress.
    pub fn signal(&self, bits: u8) {
        self.signals.fetch_or(bits, Ordering::AcqRel);
        self.wake(READY | ABORT);
    }

    /// Give back signals taken but not acted on yet, without a wake-up: the session sees them
    /// at its next `take_signals` (the wake-up that delivered them is still pending).
    pub fn restore_signals(&self, bits: u8) {
        self.signals.fetch_or(bits, Ordering::AcqRel);
    }

    /// Take the signals delivered since the last call.
    pub fn take_signals(&self) -> u8 {
        self.signals.swap(0, Ordering::AcqRel)
    }

    /// Wait for the bit `bit` of `wake`, and clear it. Only the session task calls this.
    /// A plain closure future (no `async fn` layers): an idle session holds it.
    fn wait(&self, bit: u8) -> impl std::future::Future<Output = ()> + Send + '_ {
        poll_fn(move |cx| {
            if self.wake.fetch_and(!bit, Ordering::AcqRel) & bit != 0 {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            // A producer may have set the bit between the check and the registration.
            if self.wake.fetch_and(!bit, Ordering::AcqRel) & bit != 0 {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    /// Wait until there is something to take or write, a signal, or an overflow. Cancel-safe.
    pub fn ready(&self) -> impl std::future::Future<Output = ()> + Send + '_ {
        self.wait(READY)
    }

    /// Wait until a write in progress must be interrupted: overflow or a signal. Cancel-safe.
    pub fn interrupted(&self) -> impl std::future::Future<Output = ()> + Send + '_ {
        self.wait(ABORT)
    }

    /// Move every queued frame into `batch` (which should be empty). Returns false when the
    /// queue overflowed: the session must close with 4000.
    pub fn take(&self, batch: &mut VecDeque<Frame>) -> bool {
        let mut state = self.lock();
        if state.overflowed {
            return false;
        }
        std::mem::swap(&mut state.frames, batch);
        state.bytes = 0;
        true
    }

    /// Whether the queue overflowed.
    pub fn overflowed(&self) -> bool {
        self.lock().overflowed
    }

    /// Refuse further frames (the session is ending); returns how many queued frames were
    /// dropped. What is owed to the socket stays: a partly written frame is finished before
    /// the close frame.
    pub fn close(&self) -> usize {
        let mut state = self.lock();
        state.closed = true;
        state.direct = false;
        let dropped = state.frames.len();
        state.frames = VecDeque::new();
        state.bytes = 0;
        dropped
    }
}

#[cfg(test)]
mod tests;
