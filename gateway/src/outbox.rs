//! A session's outbound queue and wake-up point: bounded in bytes, filled by the hub's
//! fan-out, drained by the session's writer in batches; it also carries the node's signals to
//! the session (shutdown, heartbeat), so a session waits on nothing shared with other sessions.
//!
//! Overflow is a decision, not backpressure: the queue is emptied, marked overflowed, and the
//! session closes with 4000 (docs/REFERENCE.md §2). The hub never waits on a session.
//!
//! Wake-ups: exactly one task (the session) consumes an outbox, so waking it is an
//! `AtomicWaker` plus flag bits, lock-free. The writer is woken only when the queue goes from
//! empty to non-empty, so a burst of N frames costs one wake-up and one batch, however many
//! frames arrive meanwhile.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::task::Poll;
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use futures_util::task::AtomicWaker;

/// One outgoing text frame. `text` is shared (refcounted) by every session it goes to.
#[derive(Clone, Debug)]
pub struct Frame {
    pub text: Utf8Bytes,
    /// When the message was published (or reached the node), for the latency histogram.
    pub born: Instant,
}

impl Frame {
    pub fn new(text: String, born: Instant) -> Frame {
        Frame {
            text: Utf8Bytes::from(text),
            born,
        }
    }
}

/// What happened to a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
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

#[derive(Default)]
struct State {
    frames: VecDeque<Frame>,
    bytes: usize,
    closed: bool,
    overflowed: bool,
}

/// The queue. Shared between the hub and the node (producers) and one session (consumer).
pub struct Outbox {
    /// std Mutex: held only for a push or a swap, never across `.await`.
    state: Mutex<State>,
    /// The session task's waker.
    waker: AtomicWaker,
    /// READY / ABORT bits, set by producers, cleared by the session.
    wake: AtomicU8,
    /// `signal::*` bits not yet seen by the session.
    signals: AtomicU8,
    limit: usize,
}

impl Outbox {
    pub fn new(limit: usize) -> Outbox {
        Outbox {
            state: Mutex::new(State::default()),
            waker: AtomicWaker::new(),
            wake: AtomicU8::new(0),
            signals: AtomicU8::new(0),
            limit,
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

    /// Queue a frame. Never blocks beyond the short lock.
    pub fn push(&self, frame: Frame) -> Push {
        let len = frame.text.len();
        let mut state = self.lock();
        if state.closed {
            return Push::Closed;
        }
        if state.bytes + len > self.limit {
            let dropped = state.frames.len() + 1;
            state.frames = VecDeque::new();
            state.bytes = 0;
            state.closed = true;
            state.overflowed = true;
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
    async fn wait(&self, bit: u8) {
        poll_fn(|cx| {
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
        .await
    }

    /// Wait until there is something to take, a signal, or an overflow. Cancel-safe.
    pub async fn ready(&self) {
        self.wait(READY).await
    }

    /// Wait until a write in progress must be interrupted: overflow or a signal. Cancel-safe.
    pub async fn interrupted(&self) {
        self.wait(ABORT).await
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
    /// dropped.
    pub fn close(&self) -> usize {
        let mut state = self.lock();
        state.closed = true;
        let dropped = state.frames.len();
        state.frames = VecDeque::new();
        state.bytes = 0;
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn frame(s: &str) -> Frame {
        Frame::new(s.to_owned(), Instant::now())
    }

    #[test]
    fn overflow_drops_and_closes() {
        let q = Outbox::new(10);
        assert_eq!(q.push(frame("12345")), Push::Queued);
        assert_eq!(q.push(frame("12345")), Push::Queued);
        assert_eq!(q.push(frame("1")), Push::Overflowed { dropped: 3 });
        assert_eq!(q.push(frame("1")), Push::Closed);
        let mut batch = VecDeque::new();
        assert!(!q.take(&mut batch));
        assert!(batch.is_empty());
        assert!(q.overflowed());
    }

    #[test]
    fn take_drains_and_frees_budget() {
        let q = Outbox::new(10);
        q.push(frame("12345"));
        q.push(frame("12345"));
        let mut batch = VecDeque::new();
        assert!(q.take(&mut batch));
        assert_eq!(batch.len(), 2);
        assert_eq!(q.push(frame("1234567890")), Push::Queued);
    }

    #[tokio::test]
    async fn one_wakeup_per_batch() {
        let q = Outbox::new(1000);
        q.push(frame("a"));
        q.push(frame("b"));
        // The bit set by the first push completes this at once.
        tokio::time::timeout(Duration::from_secs(1), q.ready())
            .await
            .unwrap();
        let mut batch = VecDeque::new();
        q.take(&mut batch);
        assert_eq!(batch.len(), 2);
        // The second push (queue not empty) set nothing.
        assert!(tokio::time::timeout(Duration::from_millis(50), q.ready())
            .await
            .is_err());
        // A plain push does not interrupt writes; overflow and signals do.
        q.push(frame("c"));
        assert!(
            tokio::time::timeout(Duration::from_millis(50), q.interrupted())
                .await
                .is_err()
        );
        q.signal(signal::BEAT);
        tokio::time::timeout(Duration::from_secs(1), q.interrupted())
            .await
            .unwrap();
        assert_eq!(q.take_signals(), signal::BEAT);
        assert_eq!(q.take_signals(), 0);
    }

    #[tokio::test]
    async fn wakes_a_waiting_task() {
        let q = std::sync::Arc::new(Outbox::new(1000));
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.ready().await }
        });
        tokio::task::yield_now().await;
        q.push(frame("x"));
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
