//! What was published and what each reader must therefore have received.
//!
//! Every history channel is published by one task, one message at a time, each carrying `n`,
//! its number on that channel (1, 2, 3 …). The [`Ledger`] records, per channel, the highest
//! `n` whose publish *started*, the highest one the publisher *acknowledged* (it answered an
//! offset), and the numbers whose outcome is unknown (the request failed: during a Redis
//! restart a command can run and its answer still be lost), which a reader may or may not see.
//!
//! A [`Track`] follows one reader's view of one channel, across reconnects and resubscribes:
//! after a fresh subscription it must receive every message whose publish started after the
//! subscription was confirmed; after that, and after a resume with `since`, each message is
//! the next one, except over numbers of unknown outcome. A `history_gone` is the product
//! saying "what you missed cannot be replayed": from then on the reader is judged as if it had
//! subscribed afresh. Anything else is a [`Violation`].

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The publish record of one channel.
#[derive(Default)]
pub struct ChannelLedger {
    started: AtomicU64,
    acked: AtomicU64,
    /// std Mutex: never held across .await.
    unknown: Mutex<BTreeSet<u64>>,
}

impl ChannelLedger {
    /// The publisher is about to send `n` (one at a time, in order).
    pub fn start(&self, n: u64) {
        self.started.store(n, Ordering::SeqCst);
    }

    pub fn ack(&self, n: u64) {
        self.acked.store(n, Ordering::SeqCst);
    }

    /// `n`'s request failed: it may or may not have been published.
    pub fn unknown(&self, n: u64) {
        self.unknown.lock().unwrap().insert(n);
    }

    pub fn started(&self) -> u64 {
        self.started.load(Ordering::SeqCst)
    }

    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    /// The first number in `from..to` that was surely published (so a reader that skips it
    /// lost it).
    fn first_certain(&self, from: u64, to: u64) -> Option<u64> {
        let unknown = self.unknown.lock().unwrap();
        (from..to).find(|n| !unknown.contains(n))
    }
}

/// Every published channel's record, by name.
pub struct Ledger {
    channels: HashMap<String, ChannelLedger>,
}

impl Ledger {
    pub fn new(names: &[String]) -> Ledger {
        Ledger {
            channels: names
                .iter()
                .map(|n| (n.clone(), ChannelLedger::default()))
                .collect(),
        }
    }

    pub fn channel(&self, name: &str) -> &ChannelLedger {
        self.channels
            .get(name)
            .unwrap_or_else(|| panic!("{name} is not a published channel"))
    }

    pub fn has(&self, name: &str) -> bool {
        self.channels.contains_key(name)
    }
}

/// A broken promise of the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// `n` was surely published and the reader, which had to get it, never did.
    Lost { n: u64, received: u64 },
    /// `n` arrived again, or after a later one.
    Repeated { n: u64, after: u64 },
}

/// One reader's view of one channel.
#[derive(Debug, Default, Clone)]
pub struct Track {
    /// The last `n` received and its offset; None before the first.
    pub last: Option<(u64, String)>,
    /// With no `last`: the first `n` the reader may receive at the latest (every later one
    /// must follow it). None: nothing is owed yet.
    owed_from: Option<u64>,
}

impl Track {
    /// Subscribed afresh (no `since`), confirmed while the channel's `started` was `started`:
    /// every message after it is owed. Forgets any earlier position.
    pub fn fresh(&mut self, started: u64) {
        self.last = None;
        self.owed_from = Some(started + 1);
    }

    /// Nothing received, nothing owed (until [`Track::fresh`]).
    pub fn forget(&mut self) {
        *self = Track::default();
    }

    /// `history_gone` while the channel's `started` was `started`: judged as a fresh
    /// subscription from here.
    pub fn gone(&mut self, started: u64) {
        self.fresh(started);
    }

    /// The offset to resume from with `since`, if any message was received.
    pub fn since(&self) -> Option<&str> {
        self.last.as_ref().map(|(_, offset)| offset.as_str())
    }

    /// Message `n` with `offset` arrived on `channel`.
    pub fn message(
        &mut self,
        channel: &ChannelLedger,
        n: u64,
        offset: &str,
    ) -> Result<(), Violation> {
        let next = match &self.last {
            Some((last, _)) if n <= *last => {
                return Err(Violation::Repeated { n, after: *last });
            }
            Some((last, _)) => Some(last + 1),
            None => self.owed_from,
        };
        self.last = Some((n, offset.to_owned()));
        self.owed_from = None;
        match next {
            Some(next) if n > next => match channel.first_certain(next, n) {
                Some(lost) => Err(Violation::Lost {
                    n: lost,
                    received: n,
                }),
                None => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// The reader has everything acknowledged on `channel` (for the end of the run).
    pub fn complete(&self, channel: &ChannelLedger) -> bool {
        let acked = channel.acked();
        match &self.last {
            Some((last, _)) => {
                *last >= acked || channel.first_certain(last + 1, acked + 1).is_none()
            }
            None => match self.owed_from {
                Some(from) => channel.first_certain(from, acked + 1).is_none(),
                None => true,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn published(up_to: u64, unknown: &[u64]) -> ChannelLedger {
        let ledger = ChannelLedger::default();
        for n in 1..=up_to {
            ledger.start(n);
            if unknown.contains(&n) {
                ledger.unknown(n);
            } else {
                ledger.ack(n);
            }
        }
        ledger
    }

    #[test]
    fn a_fresh_reader_owes_what_started_after_it_subscribed() {
        let channel = published(10, &[]);
        let mut track = Track::default();
        track.fresh(3);
        // 3 started before the subscription: it may arrive or not.
        assert_eq!(track.message(&channel, 3, "o3"), Ok(()));
        assert_eq!(track.message(&channel, 4, "o4"), Ok(()));
        let mut late = Track::default();
        late.fresh(3);
        assert_eq!(
            late.message(&channel, 6, "o6"),
            Err(Violation::Lost { n: 4, received: 6 })
        );
    }

    #[test]
    fn gaps_are_lost_unless_their_outcome_is_unknown() {
        let channel = published(10, &[5, 6]);
        let mut track = Track::default();
        track.fresh(0);
        for n in 1..=4 {
            track.message(&channel, n, "o").unwrap();
        }
        assert_eq!(track.message(&channel, 7, "o7"), Ok(()));
        assert_eq!(
            track.message(&channel, 9, "o9"),
            Err(Violation::Lost { n: 8, received: 9 })
        );
        assert_eq!(
            track.message(&channel, 9, "o9"),
            Err(Violation::Repeated { n: 9, after: 9 })
        );
        assert_eq!(
            track.message(&channel, 2, "o2"),
            Err(Violation::Repeated { n: 2, after: 9 })
        );
    }

    #[test]
    fn history_gone_starts_over_and_completion_counts_only_what_was_surely_published() {
        let channel = published(10, &[10]);
        let mut track = Track::default();
        track.fresh(0);
        track.message(&channel, 1, "o1").unwrap();
        track.gone(7);
        assert_eq!(track.since(), None);
        assert!(!track.complete(&channel));
        track.message(&channel, 8, "o8").unwrap();
        assert!(!track.complete(&channel));
        track.message(&channel, 9, "o9").unwrap();
        // 10's outcome is unknown: not owed.
        assert!(track.complete(&channel));
        assert_eq!(track.since(), Some("o9"));
    }
}
