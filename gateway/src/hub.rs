//! The hub: channel → local subscribers, and fan-out of one message to all of them.
//!
//! The hub never touches sockets or Redis. It answers "was this the first local subscriber /
//! the last one gone?" so the caller can tell the bus, and for every message it builds the
//! frame once (the WebSocket frame's wire bytes, [`Frame`]) and pushes a refcounted clone
//! into each subscriber's [`Outbox`], which owes it to a waiting WebSocket session's socket
//! or queues it; the owed sockets are written together when the fan-out ends.
//!
//! The map is split into shards, each behind a std `RwLock` that is never held across
//! `.await`: fan-out takes a read lock on one shard, so subscribes on channels of other
//! shards (and fan-outs on the same one) are not stalled. Every fan-out runs under a cork
//! ([`corked`]): under the read lock the frame is only owed to each waiting session's socket
//! (or queued), and the sockets are written after the lock is released, all together
//! (`outbox::write_all`). A session that unsubscribes takes the write lock, so a message owed
//! to it before is still owed before its `unsubscribed`, and none is owed after.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use crate::metrics::{reason, Metrics};
use crate::outbox::{Frame, Outbox, Push};
use crate::protocol;

/// A session's identity inside the node (cheaper to hash and compare than its UUID).
pub type SessionId = u64;

const SHARDS: usize = 32;

/// A batch of fan-outs whose socket writes are held back and done together ([`corked`]).
#[derive(Default)]
struct Cork {
    /// Outboxes owed frames in this batch, each once.
    dirty: Vec<Arc<Outbox>>,
    /// Per message: when it was born, to how many sessions it is owed, and the histogram to
    /// observe that in once written.
    owed: Vec<(Instant, usize, prometheus::Histogram)>,
    /// Where the batch goes when it is lifted, if its hub delays writes (`write_delay_ms`):
    /// the hub's pending writes, written by [`Hub::flush_delayed`].
    delayed: Option<Arc<Mutex<Cork>>>,
    /// A socket was owed a second frame while its first waited: the held writes already
    /// batch, so waiting longer only adds latency; they are written when this cork lifts.
    full: bool,
}

impl Cork {
    fn append(&mut self, other: Cork) {
        self.dirty.extend(other.dirty);
        self.owed.extend(other.owed);
    }
}

thread_local! {
    /// The cork of the fan-out running on this thread, if any. Thread-local because a cork
    /// lives within one synchronous stretch of one task ([`corked`] takes a closure, which
    /// cannot await), so no other task's fan-out is ever held back by it.
    static CORK: RefCell<Option<Cork>> = const { RefCell::new(None) };
}

/// Run `f`, which fans out several messages (everything Redis delivered in one read), with
/// the socket writes corked: each WebSocket session in its steady state gets the frames of
/// all those messages in one (vectored) write when `f` returns, instead of one write per
/// message, as uWebSockets corks a loop turn's writes, and all those sockets are written
/// together (`outbox::write_all`: one kernel entry per 64 sockets where io_uring is
/// allowed). Each message is still framed once; nothing is woken per socket; a socket that
/// cannot take everything is finished by its own session, which is woken for that.
/// [`Hub::publish`] outside a cork corks itself.
pub fn corked<R>(f: impl FnOnce() -> R) -> R {
    /// Lifts the cork when `f` returns or unwinds, so a panic never leaves frames owed.
    struct Lift;
    impl Drop for Lift {
        fn drop(&mut self) {
            if let Some(cork) = CORK.with_borrow_mut(Option::take) {
                uncork(cork);
            }
        }
    }
    if CORK.with_borrow(Option::is_some) {
        // Already corked further up: the outer cork lifts everything.
        return f();
    }
    CORK.with_borrow_mut(|c| *c = Some(Cork::default()));
    let _lift = Lift;
    f()
}

fn uncork(mut cork: Cork) {
    if let Some(delayed) = cork.delayed.take() {
        let mut held = delayed.lock().unwrap_or_else(|e| e.into_inner());
        let full = cork.full;
        held.append(cork);
        if !full {
            return;
        }
        cork = std::mem::take(&mut *held);
        drop(held);
    }
    crate::outbox::write_all(&cork.dirty);
    let now = Instant::now();
    for (born, n, histogram) in &cork.owed {
        let latency = now.saturating_duration_since(*born).as_secs_f64();
        for _ in 0..*n {
            histogram.observe(latency);
        }
    }
}

/// A channel's local subscribers. A Vec rather than a map: fan-out iterates it (contiguous is
/// fastest), most channels have one subscriber (personal channels), and removal is a scan
/// plus `swap_remove`, a few µs even for 10,000 subscribers.
type Subscribers = Vec<(SessionId, Arc<Outbox>)>;
/// Keyed by the channel's name as the session holds it (shared, not copied).
type Shard = HashMap<Arc<str>, Subscribers>;

/// Result of [`Hub::subscribe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscribed {
    /// The first local subscriber: the bus must subscribe the channel.
    First,
    Added,
    /// The session was already subscribed.
    Already,
}

/// Result of [`Hub::unsubscribe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsubscribed {
    /// The last local subscriber left: the bus may unsubscribe the channel.
    Last,
    Removed,
    NotSubscribed,
}

pub struct Hub {
    shards: Box<[RwLock<Shard>]>,
    hasher: RandomState,
    metrics: Metrics,
    /// With `write_delay_ms`: socket writes owed by fan-outs, held until the next
    /// [`Hub::flush_delayed`], so that a socket gets every message of the interval in one
    /// write. std Mutex: held to append a batch or take them all, never across `.await`.
    delayed: Option<Arc<Mutex<Cork>>>,
}

impl Hub {
    pub fn new(metrics: Metrics) -> Hub {
        Hub::with_write_delay(metrics, false)
    }

    /// A hub whose fan-outs hold their socket writes until [`Hub::flush_delayed`] (`delay`:
    /// the node runs a task that calls it every `write_delay_ms`).
    pub fn with_write_delay(metrics: Metrics, delay: bool) -> Hub {
        Hub {
            shards: (0..SHARDS).map(|_| RwLock::new(Shard::new())).collect(),
            hasher: RandomState::new(),
            metrics,
            delayed: delay.then(|| Arc::new(Mutex::new(Cork::default()))),
        }
    }

    /// Write everything fan-outs owed since the last call (one write per socket for all of
    /// it). Only needed with a write delay; a no-op otherwise.
    pub fn flush_delayed(&self) {
        let Some(delayed) = &self.delayed else {
            return;
        };
        let cork = std::mem::take(&mut *delayed.lock().unwrap_or_else(|e| e.into_inner()));
        if !cork.dirty.is_empty() || !cork.owed.is_empty() {
            uncork(cork);
        }
    }

    fn shard(&self, channel: &str) -> &RwLock<Shard> {
        &self.shards[self.hasher.hash_one(channel) as usize % SHARDS]
    }

    // A poisoned lock means a panic in a short critical section that only inserts or removes
    // one entry; the map is still consistent, so keep serving.
    fn read(lock: &RwLock<Shard>) -> RwLockReadGuard<'_, Shard> {
        lock.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(lock: &RwLock<Shard>) -> RwLockWriteGuard<'_, Shard> {
        lock.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn subscribe(
        &self,
        channel: &Arc<str>,
        session: SessionId,
        outbox: &Arc<Outbox>,
    ) -> Subscribed {
        let mut shard = Self::write(self.shard(channel));
        let result = match shard.get_mut(&**channel) {
            Some(subs) if subs.iter().any(|(id, _)| *id == session) => Subscribed::Already,
            Some(subs) => {
                subs.push((session, outbox.clone()));
                Subscribed::Added
            }
            None => {
                shard.insert(channel.clone(), vec![(session, outbox.clone())]);
                Subscribed::First
            }
        };
        if result != Subscribed::Already {
            self.metrics.subscriptions.inc();
        }
        result
    }

    pub fn unsubscribe(&self, channel: &str, session: SessionId) -> Unsubscribed {
        let mut shard = Self::write(self.shard(channel));
        let Some(subs) = shard.get_mut(channel) else {
            return Unsubscribed::NotSubscribed;
        };
        let Some(i) = subs.iter().position(|(id, _)| *id == session) else {
            return Unsubscribed::NotSubscribed;
        };
        subs.swap_remove(i);
        self.metrics.subscriptions.dec();
        if subs.is_empty() {
            shard.remove(channel);
            Unsubscribed::Last
        } else {
            Unsubscribed::Removed
        }
    }

    pub fn has_subscribers(&self, channel: &str) -> bool {
        Self::read(self.shard(channel)).contains_key(channel)
    }

    /// The local subscribers of `channel` (e.g. a personal channel: every session of one
    /// client on this node).
    pub fn subscribers(&self, channel: &str) -> Vec<(SessionId, Arc<Outbox>)> {
        Self::read(self.shard(channel))
            .get(channel)
            .cloned()
            .unwrap_or_default()
    }

    /// Every channel with at least one local subscriber (for resubscription after a reconnect).
    pub fn channels(&self) -> Vec<String> {
        self.shards
            .iter()
            .flat_map(|s| {
                Self::read(s)
                    .keys()
                    .map(|k| k.to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Fan one message out to every local subscriber of `channel`. The frame is built once
    /// (only if someone listens) and shared. Returns the number of sessions it was owed or
    /// queued to.
    pub fn publish(
        &self,
        channel: &str,
        payload: &[u8],
        offset: Option<&str>,
        born: Instant,
    ) -> usize {
        let (queued, dropped) = self.fan_out(channel, true, || {
            Frame::new(protocol::message_frame(channel, payload, offset), born)
        });
        self.metrics.messages_delivered.inc_by(queued as u64);
        if dropped > 0 {
            self.metrics
                .messages_dropped
                .with_label_values(&[reason::SLOW_CONSUMER])
                .inc_by(dropped as u64);
        }
        queued
    }

    /// Send a frame other than a message (e.g. a `history_gone` error, a `join`) to every
    /// local subscriber of `channel`, in order with its messages, the same way.
    pub fn notify(&self, channel: &str, text: String) {
        // An overflowing session is closing with 4000 anyway.
        self.fan_out(channel, false, || Frame::new(text, Instant::now()));
    }

    /// Push the frame `make` builds (only if someone listens) to every local subscriber of
    /// `channel`, under a cork (its own if none is on): owed to waiting sockets, queued for
    /// the others; a `message`'s deliveries are observed in the latency histogram once
    /// written. Returns (owed or queued, dropped).
    fn fan_out(
        &self,
        channel: &str,
        message: bool,
        make: impl FnOnce() -> Frame,
    ) -> (usize, usize) {
        if CORK.with_borrow(Option::is_none) {
            // A lone message is a batch of one: its socket writes go out together, after the
            // shard's lock is released.
            return corked(|| self.fan_out(channel, message, make));
        }
        let shard = Self::read(self.shard(channel));
        let Some(subs) = shard.get(channel) else {
            return (0, 0);
        };
        let frame = make();
        let (mut queued, mut dropped, mut owed) = (0, 0, 0);
        CORK.with_borrow_mut(|cork| {
            let Some(cork) = cork.as_mut() else {
                return;
            };
            if let Some(delayed) = &self.delayed {
                cork.delayed.get_or_insert_with(|| delayed.clone());
            }
            for (_, outbox) in subs {
                match outbox.push(frame.clone()) {
                    Push::Owed { first } => {
                        queued += 1;
                        owed += 1;
                        if first {
                            cork.dirty.push(outbox.clone());
                        } else {
                            cork.full = true;
                        }
                    }
                    Push::Queued => queued += 1,
                    Push::Overflowed { dropped: n } => dropped += n,
                    Push::Closed => dropped += 1,
                }
            }
            if message && owed > 0 {
                cork.owed
                    .push((frame.born, owed, self.metrics.delivery_latency.clone()));
            }
        });
        (queued, dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    #[test]
    fn ref_counts_channels_and_fans_out_one_shared_frame() {
        let hub = Hub::new(Metrics::new());
        let a = Arc::new(Outbox::new(1 << 20));
        let b = Arc::new(Outbox::new(1 << 20));
        assert_eq!(hub.subscribe(&"c".into(), 1, &a), Subscribed::First);
        assert_eq!(hub.subscribe(&"c".into(), 2, &b), Subscribed::Added);
        assert_eq!(hub.subscribe(&"c".into(), 2, &b), Subscribed::Already);
        assert_eq!(hub.publish("c", b"{\"x\":1}", None, Instant::now()), 2);
        assert_eq!(hub.publish("other", b"1", None, Instant::now()), 0);
        let (mut fa, mut fb) = (VecDeque::new(), VecDeque::new());
        a.take(&mut fa);
        b.take(&mut fb);
        // Same allocation: the frame was serialized and framed once.
        assert_eq!(fa[0].wire().as_ptr(), fb[0].wire().as_ptr());
        assert_eq!(
            fa[0].text(),
            r#"{"type":"message","channel":"c","data":{"x":1}}"#
        );
        assert_eq!(hub.unsubscribe("c", 1), Unsubscribed::Removed);
        assert_eq!(hub.unsubscribe("c", 1), Unsubscribed::NotSubscribed);
        assert_eq!(hub.unsubscribe("c", 2), Unsubscribed::Last);
        assert!(!hub.has_subscribers("c"));
        assert!(hub.channels().is_empty());
    }

    /// The hot path's shape, pinned: a message is framed once for all subscribers; a
    /// WebSocket session waiting in its steady state gets it written by the fan-out itself,
    /// without a wake-up; under a cork, several messages are held and written together when
    /// the cork is lifted, still without a wake-up.
    #[tokio::test]
    async fn fan_out_writes_shared_frames_and_corks_a_batch() {
        use crate::outbox::Wrote;
        use std::io::Read;
        use std::time::Duration;

        let frame = |n: u8| {
            let mut text = br#"{"type":"message","channel":"c","data":"#.to_vec();
            text.extend([n, b'}']);
            let mut wire = vec![0x81, text.len() as u8];
            wire.extend(text);
            wire
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hub = Hub::new(Metrics::new());
        let mut clients = Vec::new();
        let mut outboxes = Vec::new();
        for id in 0..2 {
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            client
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            clients.push(client);
            let socket = listener.accept().await.unwrap().0;
            // As a session's socket is long before its steady state: known to be writable.
            socket.writable().await.unwrap();
            let outbox = Arc::new(Outbox::with_socket(1 << 20, Some(socket)));
            outbox.set_direct(true);
            hub.subscribe(&"c".into(), id, &outbox);
            outboxes.push(outbox);
        }
        assert_eq!(hub.publish("c", b"1", None, Instant::now()), 2);
        // Where the kernel allows io_uring, the fan-out's writes went through this thread's
        // ring (one kernel entry for both sockets).
        if sendbatch::Ring::new(8).is_ok() {
            assert!(crate::outbox::batched_on_this_thread());
        }
        for client in &mut clients {
            let mut got = vec![0; frame(b'1').len()];
            client.read_exact(&mut got).unwrap();
            assert_eq!(got, frame(b'1'));
        }
        corked(|| {
            assert_eq!(hub.publish("c", b"2", None, Instant::now()), 2);
            assert_eq!(hub.publish("c", b"3", None, Instant::now()), 2);
            // Held back: nothing of the batch is on the wire yet.
            for client in &mut clients {
                client.set_nonblocking(true).unwrap();
                let e = client.read(&mut [0u8; 64]).unwrap_err();
                assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
                client.set_nonblocking(false).unwrap();
            }
        });
        for client in &mut clients {
            let mut got = vec![0; 2 * frame(b'2').len()];
            client.read_exact(&mut got).unwrap();
            assert_eq!(got, [frame(b'2'), frame(b'3')].concat());
        }
        for outbox in &outboxes {
            // Nobody was woken, and nothing is left owed.
            assert!(
                tokio::time::timeout(Duration::from_millis(20), outbox.ready())
                    .await
                    .is_err()
            );
            assert_eq!(outbox.write_wire().unwrap(), Wrote::All);
        }
    }

    /// With a write delay, a fan-out only owes its frame: nothing reaches the socket until
    /// the node's flush, or until the socket is owed a second frame (the held writes batch
    /// already: waiting longer would only add latency). Either way every frame owed goes out
    /// in one write, in order, and nobody is woken.
    #[tokio::test]
    async fn a_write_delay_holds_a_lone_frame_until_the_flush_or_a_second_one() {
        use std::io::Read;
        use std::time::Duration;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = Metrics::new();
        let hub = Hub::with_write_delay(metrics.clone(), true);
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let socket = listener.accept().await.unwrap().0;
        socket.writable().await.unwrap();
        let outbox = Arc::new(Outbox::with_socket(1 << 20, Some(socket)));
        outbox.set_direct(true);
        hub.subscribe(&"c".into(), 1, &outbox);
        let frame = |n: u8| {
            let text = format!(r#"{{"type":"message","channel":"c","data":{}}}"#, n as char);
            [vec![0x81, text.len() as u8], text.into_bytes()].concat()
        };
        let nothing_yet = |client: &mut std::net::TcpStream| {
            client.set_nonblocking(true).unwrap();
            let e = client.read(&mut [0u8; 64]).unwrap_err();
            assert_eq!(
                e.kind(),
                std::io::ErrorKind::WouldBlock,
                "written too early"
            );
            client.set_nonblocking(false).unwrap();
        };
        let expect = |client: &mut std::net::TcpStream, frames: &[u8]| {
            let expected: Vec<u8> = frames.iter().flat_map(|&n| frame(n)).collect();
            let mut got = vec![0; expected.len()];
            client.read_exact(&mut got).unwrap();
            assert_eq!(got, expected);
        };

        assert_eq!(hub.publish("c", b"1", None, Instant::now()), 1);
        nothing_yet(&mut client);
        assert_eq!(metrics.delivery_latency.get_sample_count(), 0);
        // A second frame for the same socket: both go now.
        assert_eq!(hub.publish("c", b"2", None, Instant::now()), 1);
        expect(&mut client, b"12");
        // A lone frame again: held until the flush.
        assert_eq!(hub.publish("c", b"3", None, Instant::now()), 1);
        nothing_yet(&mut client);
        hub.flush_delayed();
        expect(&mut client, b"3");
        assert_eq!(metrics.delivery_latency.get_sample_count(), 3);
        assert!(
            tokio::time::timeout(Duration::from_millis(20), outbox.ready())
                .await
                .is_err(),
            "the session was woken"
        );
    }
}
