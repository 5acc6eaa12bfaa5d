//! A session's outbound queue: bounded in bytes, filled by the hub's fan-out, drained by the
//! session's writer in batches.
//!
//! Overflow is a decision, not backpressure: the queue is emptied, marked overflowed, and the
//! session closes with 4000 (SPEC §2). The hub never waits on a session.
//!
//! Wake-ups: the writer is notified only when the queue goes from empty to non-empty, so a
//! burst of N frames costs one wake-up and one batch, however many frames arrive meanwhile.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::Notify;

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

#[derive(Default)]
struct State {
    frames: VecDeque<Frame>,
    bytes: usize,
    closed: bool,
    overflowed: bool,
}

/// The queue. Shared between the hub (producers) and one session (consumer).
pub struct Outbox {
    /// std Mutex: held only for a push or a swap, never across `.await`.
    state: Mutex<State>,
    /// Wakes the writer: queue became non-empty, or overflowed.
    ready: Notify,
    /// Interrupts a write in progress: the queue overflowed.
    abort: Notify,
    limit: usize,
}

impl Outbox {
    pub fn new(limit: usize) -> Outbox {
        Outbox {
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            abort: Notify::new(),
            limit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock means a panic while pushing; the state is still consistent (every
        // mutation is a single field update), so keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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
            self.ready.notify_one();
            self.abort.notify_one();
            return Push::Overflowed { dropped };
        }
        let was_empty = state.frames.is_empty();
        state.frames.push_back(frame);
        state.bytes += len;
        drop(state);
        if was_empty {
            self.ready.notify_one();
        }
        Push::Queued
    }

    /// Wait until there is something to take (or the queue overflowed). Cancel-safe.
    pub async fn ready(&self) {
        self.ready.notified().await
    }

    /// Completes when the queue has overflowed (at once if it already has). Cancel-safe.
    pub async fn overflow(&self) {
        self.abort.notified().await
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
        // The permit stored by the first push completes this at once.
        tokio::time::timeout(std::time::Duration::from_secs(1), q.ready())
            .await
            .unwrap();
        let mut batch = VecDeque::new();
        q.take(&mut batch);
        assert_eq!(batch.len(), 2);
        // No second permit was stored for the second push.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), q.ready())
                .await
                .is_err()
        );
    }
}
