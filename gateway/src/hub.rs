//! The hub: channel → local subscribers, and fan-out of one message to all of them.
//!
//! The hub never touches sockets or Redis. It answers "was this the first local subscriber /
//! the last one gone?" so the caller can tell the bus, and for every message it builds the
//! frame once and pushes a refcounted clone into each subscriber's [`Outbox`].
//!
//! The map is split into shards, each behind a std `RwLock` that is never held across
//! `.await`: fan-out takes a read lock on one shard, so subscribes on other channels (and
//! fan-outs on the same one) are not stalled.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use crate::metrics::{reason, Metrics};
use crate::outbox::{Frame, Outbox, Push};
use crate::protocol;

/// A session's identity inside the node (cheaper to hash and compare than its UUID).
pub type SessionId = u64;

const SHARDS: usize = 32;

/// A channel's local subscribers. A Vec rather than a map: fan-out iterates it (contiguous is
/// fastest), most channels have one subscriber (personal channels), and removal is a scan
/// plus `swap_remove`, a few µs even for 10,000 subscribers.
type Subscribers = Vec<(SessionId, Arc<Outbox>)>;
type Shard = HashMap<Box<str>, Subscribers>;

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
}

impl Hub {
    pub fn new(metrics: Metrics) -> Hub {
        Hub {
            shards: (0..SHARDS).map(|_| RwLock::new(Shard::new())).collect(),
            hasher: RandomState::new(),
            metrics,
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

    pub fn subscribe(&self, channel: &str, session: SessionId, outbox: &Arc<Outbox>) -> Subscribed {
        let mut shard = Self::write(self.shard(channel));
        let result = match shard.get_mut(channel) {
            Some(subs) if subs.iter().any(|(id, _)| *id == session) => Subscribed::Already,
            Some(subs) => {
                subs.push((session, outbox.clone()));
                Subscribed::Added
            }
            None => {
                shard.insert(channel.into(), vec![(session, outbox.clone())]);
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
    /// (only if someone listens) and shared. Returns the number of sessions it was queued to.
    pub fn publish(
        &self,
        channel: &str,
        payload: &[u8],
        offset: Option<&str>,
        born: Instant,
    ) -> usize {
        let shard = Self::read(self.shard(channel));
        let Some(subs) = shard.get(channel) else {
            return 0;
        };
        let frame = Frame::new(protocol::message_frame(channel, payload, offset), born);
        let (mut queued, mut dropped) = (0, 0);
        for (_, outbox) in subs {
            match outbox.push(frame.clone()) {
                Push::Queued => queued += 1,
                Push::Overflowed { dropped: n } => dropped += n,
                Push::Closed => dropped += 1,
            }
        }
        drop(shard);
        self.metrics.messages_delivered.inc_by(queued as u64);
        if dropped > 0 {
            self.metrics
                .messages_dropped
                .with_label_values(&[reason::SLOW_CONSUMER])
                .inc_by(dropped as u64);
        }
        queued
    }

    /// Queue a frame other than a message (e.g. a `history_gone` error) to every local
    /// subscriber of `channel`, in order with its messages.
    pub fn notify(&self, channel: &str, text: String) {
        let shard = Self::read(self.shard(channel));
        let Some(subs) = shard.get(channel) else {
            return;
        };
        let frame = Frame::new(text, Instant::now());
        for (_, outbox) in subs {
            // An overflowing session is closing with 4000 anyway.
            let _ = outbox.push(frame.clone());
        }
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
        assert_eq!(hub.subscribe("c", 1, &a), Subscribed::First);
        assert_eq!(hub.subscribe("c", 2, &b), Subscribed::Added);
        assert_eq!(hub.subscribe("c", 2, &b), Subscribed::Already);
        assert_eq!(hub.publish("c", b"{\"x\":1}", None, Instant::now()), 2);
        assert_eq!(hub.publish("other", b"1", None, Instant::now()), 0);
        let (mut fa, mut fb) = (VecDeque::new(), VecDeque::new());
        a.take(&mut fa);
        b.take(&mut fb);
        // Same allocation: the frame was serialized once.
        assert_eq!(fa[0].text.as_str().as_ptr(), fb[0].text.as_str().as_ptr());
        assert_eq!(hub.unsubscribe("c", 1), Unsubscribed::Removed);
        assert_eq!(hub.unsubscribe("c", 1), Unsubscribed::NotSubscribed);
        assert_eq!(hub.unsubscribe("c", 2), Unsubscribed::Last);
        assert!(!hub.has_subscribers("c"));
        assert!(hub.channels().is_empty());
    }
}
