//! The channels this node wants from Redis, each with its subscription phase and its position
//! in the channel's history: the state that makes a resubscribe lose nothing and repeat
//! nothing (docs/REFERENCE.md §5).
//!
//! A channel is *pending* until SUBSCRIBE is confirmed on the current connection, then *live*,
//! or first *catching up* when sessions were already told `subscribed` on an earlier
//! connection. Its position moves only with what this node delivered to the hub: live messages
//! (only while live, only on the current connection), replayed entries, and the baseline read
//! right after a first subscription, which counts only once a PING answered on the same
//! connection proves the subscription was alive while it was read. After any resubscribe the
//! channel is caught up from its position, whatever its traffic was; live messages wait
//! (`held`) until the missed ones are in the hub. What cannot be caught up reaches the
//! channel's sessions as `history_gone`.
//!
//! Sessions are told `subscribed` (through [`Channels::live`]) only once their channel is
//! live. A released channel is forgotten (and UNSUBSCRIBEd) after the delay if nobody wants it
//! again; a message still in flight for it finds no entry and changes nothing.
//!
//! Two kinds of traffic are not messages: presence events (`join`/`leave`, marked in the
//! envelope) go to the hub as plain frames while the channel is live and are otherwise
//! dropped, never held, never counted in a position; and the node's control channel
//! (`protocol::CONTROL_CHANNEL`, wanted like any channel, so it is resubscribed and counted
//! by readiness like any channel) goes to the control sink instead of the hub.
//!
//! One std `Mutex` over the map: every critical section is short and never awaits. Fan-out to
//! the hub happens under it, so that a channel's messages reach the hub in order whichever
//! task (the reader, or the history worker at the end of a catch-up) delivers them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use tokio::sync::{oneshot, Notify};

use super::history::{Outcome, Position, Read, ReadRequest};
use crate::bus::Live;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::protocol::{self, Offset};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not (yet) subscribed on the current connection.
    Pending,
    /// Subscribed again after sessions were told `subscribed`: being caught up from history;
    /// live messages are held.
    CatchingUp,
    /// Subscribed and caught up: live messages go straight to the hub.
    Live,
}

struct Chan {
    phase: Phase,
    /// SUBSCRIBE was sent for it on the current connection.
    sent: bool,
    /// It has been live: sessions were told `subscribed`, so a resubscribe must catch it up.
    told: bool,
    position: Position,
    /// The newest offset handed to the hub (live, replayed or held): a message at or before
    /// it in the same epoch is a second copy. Unlike `position`, never set from a baseline
    /// reading (a message published before a baseline can still arrive live after it).
    delivered: Position,
    /// When its last local subscriber left (UNSUBSCRIBE after the delay, unless wanted again).
    release_at: Option<Instant>,
    /// What only a channel in transition needs; None (one word) for a settled live channel.
    extra: Option<Box<Extra>>,
}

#[derive(Default)]
struct Extra {
    /// Sessions waiting for the channel to be live.
    waiters: Vec<oneshot::Sender<Live>>,
    /// Live messages that wait for a catch-up: `(offset, payload)`.
    held: Vec<(Option<String>, Vec<u8>)>,
    /// More arrived than `held` keeps: those with an offset will be read from history.
    overflow: bool,
    /// Subscribed again while catching up (a cluster resubscribed it): read once more after.
    again: bool,
    /// A baseline read while subscribed, and how many PINGs had been sent when it was read: it
    /// counts once a later PING is answered.
    provisional: Option<(Position, u64)>,
}

impl Chan {
    fn new() -> Chan {
        Chan {
            phase: Phase::Pending,
            sent: false,
            told: false,
            position: Position::Unknown,
            delivered: Position::Unknown,
            release_at: None,
            extra: None,
        }
    }

    fn extra(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Default::default)
    }

    /// Drop `extra` once it holds nothing.
    fn tidy(&mut self) {
        if let Some(e) = &self.extra {
            if e.waiters.is_empty()
                && e.held.is_empty()
                && !e.overflow
                && !e.again
                && e.provisional.is_none()
            {
                self.extra = None;
            }
        }
    }
}

struct State {
    /// The current connection's number; work for an older one is ignored.
    conn: u64,
    connected: bool,
    map: HashMap<Arc<str>, Chan>,
    /// Channels that may need a SUBSCRIBE on the current connection (checked when taken).
    unsent: Vec<Arc<str>>,
    /// Channels with a release time (checked when due).
    releasing: Vec<Arc<str>>,
    /// Channels with a provisional baseline.
    provisional: Vec<Arc<str>>,
    /// PINGs sent on the current connection; a baseline asks for one more to be answered.
    pings_sent: u64,
    /// A baseline waits for a PING: the subscriber should send one now.
    ping_wanted: bool,
    /// Channels subscribed on the current connection (for `gateway_channels`).
    subscribed: usize,
    /// Wanted channels not live: `/readyz` asks often, the map may be large.
    not_live: usize,
}

/// What the subscriber must read from history after a SUBSCRIBE was confirmed.
#[derive(Debug, Default)]
pub struct Reads {
    /// First subscriptions: where each stream ends.
    pub baselines: Vec<ReadRequest>,
    /// Resubscriptions: what each missed since its position.
    pub catch_ups: Vec<ReadRequest>,
}

/// Where the control channel's payloads go; must not block (it runs under the map's lock).
pub type ControlSink = Box<dyn Fn(&[u8]) + Send + Sync>;

pub struct Channels {
    state: Mutex<State>,
    /// Set once when the node starts its control task.
    control: OnceLock<ControlSink>,
    /// Wakes the subscriber task: a channel needs a SUBSCRIBE, or a baseline a PING.
    pub wake: Notify,
    hub: Arc<Hub>,
    metrics: Metrics,
    /// Live messages a catching-up channel holds at most (`history.max_replay`).
    max_held: usize,
}

impl Channels {
    pub fn new(hub: Arc<Hub>, metrics: Metrics, max_held: usize) -> Channels {
        Channels {
            state: Mutex::new(State {
                conn: 0,
                connected: false,
                map: HashMap::new(),
                unsent: Vec::new(),
                releasing: Vec::new(),
                provisional: Vec::new(),
                pings_sent: 0,
                ping_wanted: false,
                subscribed: 0,
                not_live: 0,
            }),
            control: OnceLock::new(),
            wake: Notify::new(),
            hub,
            metrics,
            max_held,
        }
    }

    /// Send the control channel's payloads to `sink` (once; later calls are ignored).
    pub fn on_control(&self, sink: ControlSink) {
        let _ = self.control.set(sink);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the map consistent between statements that could
        // panic, so a poisoned lock still holds usable state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    // --- sessions (through the hub's first/last subscriber) ---

    /// The hub has a first local subscriber for `channel` (its name is shared, not copied:
    /// a personal channel's name is one allocation for the session, the hub and the bus).
    pub fn want(&self, channel: &Arc<str>) {
        let mut state = self.lock();
        match state.map.get_mut(&**channel) {
            Some(chan) => chan.release_at = None,
            None => {
                state.map.insert(channel.clone(), Chan::new());
                state.not_live += 1;
                state.unsent.push(channel.clone());
                drop(state);
                self.wake.notify_one();
            }
        }
    }

    /// The hub's last local subscriber of `channel` left: forget it at `at` unless wanted again.
    pub fn release(&self, channel: &str, at: Instant) {
        let mut state = self.lock();
        let Some(chan) = state.map.get_mut(channel) else {
            return;
        };
        let first = chan.release_at.replace(at).is_none();
        if first {
            state.releasing.push(channel.into());
        }
    }

    /// None when `channel` is live; otherwise a receiver that completes when it is.
    pub fn live(&self, channel: &str) -> Option<oneshot::Receiver<Live>> {
        let mut state = self.lock();
        if !state.map.contains_key(channel) {
            // Released and forgotten between the caller's hub subscribe and now: want it again.
            state.map.insert(channel.into(), Chan::new());
            state.not_live += 1;
            state.unsent.push(channel.into());
            self.wake.notify_one();
        }
        let chan = state.map.get_mut(channel)?;
        if chan.phase == Phase::Live {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        chan.extra().waiters.push(tx);
        Some(rx)
    }

    /// How many channels the node wants.
    /// Channels confirmed subscribed on the current connection.
    pub fn subscribed(&self) -> usize {
        self.lock().subscribed
    }

    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Connected, and every wanted channel live.
    pub fn is_ready(&self) -> bool {
        let state = self.lock();
        debug_assert_eq!(
            state.not_live,
            state
                .map
                .values()
                .filter(|c| c.phase != Phase::Live)
                .count()
        );
        state.connected && state.not_live == 0
    }

    // --- the reader ---

    /// A message from connection `conn`'s subscription to `channel`.
    pub fn on_message(&self, conn: u64, channel: &str, offset: Option<&str>, payload: &[u8]) {
        let mut state = self.lock();
        if state.conn != conn {
            return;
        }
        if channel == protocol::CONTROL_CHANNEL {
            drop(state);
            if let Some(sink) = self.control.get() {
                sink(payload);
            }
            return;
        }
        let Some(chan) = state.map.get_mut(channel) else {
            // Not wanted (any more): no session was told it is subscribed.
            return;
        };
        if offset.is_none() {
            if let Some(frame) = super::envelope::event(payload) {
                // Live-only and best-effort: a presence event is neither held while the
                // channel catches up nor part of its position.
                if chan.phase == Phase::Live {
                    self.hub.notify(channel, frame.to_owned());
                }
                return;
            }
        }
        match chan.phase {
            Phase::Live => {
                if let Some(offset) = offset.and_then(Offset::parse) {
                    if chan.delivered.covers(&offset) {
                        // Delivered already: the same message on a second subscription (a
                        // cluster client can hold two connections to a node while it
                        // recovers), or replayed by a catch-up before it arrived live.
                        self.duplicate();
                        return;
                    }
                    chan.delivered.advance(offset.clone());
                    chan.position.advance(offset);
                }
                let born = offset.map_or_else(Instant::now, super::envelope::published_at);
                self.hub.publish(channel, payload, offset, born);
            }
            // Confirmed before the subscriber marked it, or catching up: wait for the missed.
            Phase::Pending | Phase::CatchingUp if chan.told => {
                let max = self.max_held;
                let extra = chan.extra();
                if extra.held.len() < max {
                    extra
                        .held
                        .push((offset.map(str::to_owned), payload.to_vec()));
                } else {
                    // Those with an offset come back from history in the next round.
                    extra.overflow = true;
                }
            }
            // A first subscription not yet confirmed: nobody was told `subscribed`.
            Phase::Pending | Phase::CatchingUp => {}
        }
    }

    fn duplicate(&self) {
        self.metrics
            .messages_dropped
            .with_label_values(&[crate::metrics::reason::DUPLICATE])
            .inc();
    }

    // --- the subscriber ---

    /// A new connection is up: every wanted channel needs a SUBSCRIBE on it. Returns its number.
    pub fn connected(&self) -> u64 {
        let mut state = self.lock();
        state.conn += 1;
        state.connected = true;
        state.pings_sent = 0;
        state.subscribed = 0;
        state.unsent = state.map.keys().cloned().collect();
        state.conn
    }

    /// The connection is gone (its reader already ended): every channel is pending again, and
    /// a baseline not yet proven by a PING is forgotten.
    pub fn lost(&self) {
        let mut state = self.lock();
        state.conn += 1;
        state.connected = false;
        state.subscribed = 0;
        state.unsent.clear();
        state.provisional.clear();
        state.not_live = state.map.len();
        for chan in state.map.values_mut() {
            chan.phase = Phase::Pending;
            chan.sent = false;
            if let Some(extra) = &mut chan.extra {
                extra.provisional = None;
            }
            chan.tidy();
        }
        self.metrics.channels.set(0);
    }

    /// Up to `max` channels to SUBSCRIBE on connection `conn`, marked as sent.
    pub fn take_unsent(&self, conn: u64, max: usize) -> Vec<String> {
        let mut state = self.lock();
        if state.conn != conn {
            return Vec::new();
        }
        let mut batch = Vec::new();
        while batch.len() < max {
            let Some(channel) = state.unsent.pop() else {
                break;
            };
            if let Some(chan) = state.map.get_mut(&channel) {
                if chan.phase == Phase::Pending && !chan.sent {
                    chan.sent = true;
                    batch.push(channel.to_string());
                }
            }
        }
        batch
    }

    /// SUBSCRIBE of `channels` was confirmed on connection `conn`. First subscriptions are
    /// live at once (their waiting sessions are told) and need a baseline; resubscriptions
    /// need a catch-up first.
    pub fn confirmed(&self, conn: u64, channels: &[String], max_replay: usize) -> Reads {
        let mut state = self.lock();
        let mut reads = Reads::default();
        if state.conn != conn {
            return reads;
        }
        let (mut confirmed, mut live) = (0, 0);
        for channel in channels {
            let Some(chan) = state.map.get_mut(channel.as_str()) else {
                continue;
            };
            if chan.phase != Phase::Pending || !chan.sent {
                continue;
            }
            confirmed += 1;
            if chan.told {
                chan.phase = Phase::CatchingUp;
                reads.catch_ups.push(ReadRequest {
                    channel: channel.clone(),
                    from: chan.position.clone(),
                    limit: max_replay,
                    budget: CATCH_UP_BUDGET,
                });
            } else {
                chan.phase = Phase::Live;
                chan.told = true;
                live += 1;
                if let Some(extra) = &mut chan.extra {
                    for waiter in extra.waiters.drain(..) {
                        let _ = waiter.send(Live(None));
                    }
                }
                chan.tidy();
                reads.baselines.push(ReadRequest {
                    channel: channel.clone(),
                    from: Position::Unknown,
                    limit: 0,
                    budget: 0,
                });
            }
        }
        state.subscribed += confirmed;
        state.not_live -= live;
        self.metrics.channels.set(state.subscribed as i64);
        reads
    }

    /// A baseline of `channel` was read: it counts once a PING sent from now on is answered.
    pub fn baseline(&self, conn: u64, channel: &str, read: Result<Read, String>) {
        let Ok(read) = read else {
            // Unreadable: the position stays unknown (a catch-up will say `history_gone` if
            // the channel has history by then).
            return;
        };
        let mut state = self.lock();
        if state.conn != conn {
            return;
        }
        let sent = state.pings_sent;
        let Some(chan) = state.map.get_mut(channel) else {
            return;
        };
        if chan.phase != Phase::Live {
            return;
        }
        chan.extra().provisional = Some((read.position, sent));
        state.provisional.push(channel.into());
        state.ping_wanted = true;
        drop(state);
        self.wake.notify_one();
    }

    /// Whether a baseline waits for a PING (and clear the wish).
    pub fn take_ping_wanted(&self) -> bool {
        std::mem::take(&mut self.lock().ping_wanted)
    }

    /// A PING is about to be sent on connection `conn`: its number.
    pub fn ping_sent(&self) -> u64 {
        let mut state = self.lock();
        state.pings_sent += 1;
        state.pings_sent
    }

    /// PING number `n` was answered on connection `conn`: the subscription was alive when
    /// every baseline read before it was taken, so those baselines now count.
    pub fn pong(&self, conn: u64, n: u64) {
        let mut state = self.lock();
        if state.conn != conn {
            return;
        }
        let names = std::mem::take(&mut state.provisional);
        let mut waiting = Vec::new();
        for name in names {
            let Some(chan) = state.map.get_mut(&name) else {
                continue;
            };
            let Some(extra) = &mut chan.extra else {
                continue;
            };
            match extra.provisional.take() {
                Some((baseline, before)) if before < n => {
                    chan.position.settle(baseline);
                    chan.tidy();
                }
                Some(p) => {
                    extra.provisional = Some(p);
                    waiting.push(name);
                }
                None => {}
            }
        }
        state.provisional = waiting;
    }

    /// A catch-up read of `channel` finished: deliver what it missed, then what was held, and
    /// make it live; or `history_gone` to its sessions when the missed cannot be replayed.
    /// Returns a new read when more arrived meanwhile than `held` could keep.
    pub fn caught_up(
        &self,
        conn: u64,
        channel: &str,
        read: Result<Read, String>,
        max_replay: usize,
    ) -> Option<ReadRequest> {
        let mut state = self.lock();
        if state.conn != conn {
            return None;
        }
        let state = &mut *state;
        let chan = state.map.get_mut(channel)?;
        if chan.phase != Phase::CatchingUp {
            return None;
        }
        let (outcome, position) = match read {
            Ok(Read { outcome, position }) => (outcome, position),
            Err(e) => (
                Outcome::Gone(format!("the channel's history cannot be read: {e}")),
                Position::Unknown,
            ),
        };
        let covered = match outcome {
            Outcome::Replay(entries) => {
                for (offset, payload) in &entries {
                    self.metrics.messages_received.inc();
                    let born = super::envelope::published_at(offset);
                    self.hub.publish(channel, payload, Some(offset), born);
                    if let Some(o) = Offset::parse(offset) {
                        chan.delivered.advance(o);
                    }
                }
                Some(position.clone())
            }
            Outcome::Gone(why) => {
                tracing::warn!(%channel, %why, "messages missed while resubscribing cannot be replayed; sessions get history_gone");
                let frame = protocol::error_frame("history_gone", &why, Some(channel), None);
                self.hub.notify(channel, frame);
                None
            }
        };
        chan.position = position;
        let extra = chan.extra.take().unwrap_or_default();
        let Extra {
            waiters,
            held,
            overflow,
            again,
            ..
        } = *extra;
        // Held messages the replay covered are dropped, and so is any delivered already.
        let covered = covered.unwrap_or(Position::Unknown);
        for (offset, payload) in held {
            let parsed = offset.as_deref().and_then(Offset::parse);
            if let Some(o) = &parsed {
                if covered.covers(o) {
                    continue;
                }
                if chan.delivered.covers(o) {
                    self.duplicate();
                    continue;
                }
                chan.delivered.advance(o.clone());
            }
            let born = offset
                .as_deref()
                .map_or_else(Instant::now, super::envelope::published_at);
            self.hub.publish(channel, &payload, offset.as_deref(), born);
            if let Some(o) = parsed {
                chan.position.advance(o);
            }
        }
        if overflow || again {
            // What did not fit was dropped, or the subscription was replaced meanwhile: read
            // from where the hub now stands.
            chan.extra().waiters = waiters;
            return Some(ReadRequest {
                channel: channel.to_owned(),
                from: chan.position.clone(),
                limit: max_replay,
                budget: CATCH_UP_BUDGET,
            });
        }
        chan.phase = Phase::Live;
        state.not_live -= 1;
        let at = match &chan.position {
            Position::At(o) => Some(Offset::clone(o)),
            _ => None,
        };
        for waiter in waiters {
            let _ = waiter.send(Live(at.clone()));
        }
        None
    }

    // --- a cluster's pushes (docs/REFERENCE.md §7) ---

    /// The server confirmed a subscription of `channel` on connection `conn`: ours, or one the
    /// cluster client made by itself after a reconnect or a failover. A channel that was live
    /// may have missed messages meanwhile: it is caught up again.
    pub fn on_subscribed(&self, conn: u64, channel: &str, max_replay: usize) -> Reads {
        let mut state = self.lock();
        if state.conn != conn {
            return Reads::default();
        }
        let Some(chan) = state.map.get_mut(channel) else {
            return Reads::default();
        };
        match chan.phase {
            Phase::Pending => {
                chan.sent = true;
                drop(state);
                self.confirmed(conn, &[channel.to_owned()], max_replay)
            }
            Phase::Live => {
                chan.phase = Phase::CatchingUp;
                state.not_live += 1;
                let chan = state.map.get(channel).expect("just found");
                Reads {
                    baselines: Vec::new(),
                    catch_ups: vec![ReadRequest {
                        channel: channel.to_owned(),
                        from: chan.position.clone(),
                        limit: max_replay,
                        budget: CATCH_UP_BUDGET,
                    }],
                }
            }
            Phase::CatchingUp => {
                chan.extra().again = true;
                Reads::default()
            }
        }
    }

    /// The server ended the subscription of `channel` by itself (its slot moved to another
    /// shard): it needs a SUBSCRIBE again, at the new owner, then a catch-up.
    pub fn moved(&self, conn: u64, channel: &str) -> bool {
        let mut state = self.lock();
        if state.conn != conn {
            return false;
        }
        let Some(chan) = state.map.get_mut(channel) else {
            // Ours: released and forgotten before the SUNSUBSCRIBE was confirmed.
            return false;
        };
        let was_live = chan.phase == Phase::Live;
        let was_subscribed = chan.phase != Phase::Pending;
        chan.phase = Phase::Pending;
        chan.sent = false;
        if was_live {
            state.not_live += 1;
        }
        if was_subscribed {
            state.subscribed = state.subscribed.saturating_sub(1);
        }
        state.unsent.push(channel.into());
        self.metrics.channels.set(state.subscribed as i64);
        true
    }

    /// A connection of the cluster client dropped (which node is not said): every channel is
    /// subscribed again, and caught up, wherever it lives now.
    pub fn suspect_all(&self, conn: u64) {
        let mut state = self.lock();
        if state.conn != conn {
            return;
        }
        let State {
            map,
            unsent,
            not_live,
            subscribed,
            provisional,
            ..
        } = &mut *state;
        unsent.clear();
        provisional.clear();
        for (name, chan) in map.iter_mut() {
            chan.phase = Phase::Pending;
            chan.sent = false;
            if let Some(extra) = &mut chan.extra {
                extra.provisional = None;
            }
            unsent.push(name.clone());
        }
        *not_live = map.len();
        *subscribed = 0;
        self.metrics.channels.set(0);
    }

    /// SUBSCRIBE of these channels failed (their shard is unreachable): try again later.
    pub fn unsent_again(&self, conn: u64, channels: &[String]) {
        let mut state = self.lock();
        if state.conn != conn {
            return;
        }
        for channel in channels {
            if let Some(chan) = state.map.get_mut(channel.as_str()) {
                if chan.phase == Phase::Pending && chan.sent {
                    chan.sent = false;
                    state.unsent.push(channel.as_str().into());
                }
            }
        }
    }

    /// Forget channels whose release is due and that nobody wants again; returns those
    /// subscribed on the current connection (to UNSUBSCRIBE).
    pub fn due_releases(&self, now: Instant) -> Vec<String> {
        let mut state = self.lock();
        let releasing = std::mem::take(&mut state.releasing);
        let mut gone = Vec::new();
        for name in releasing {
            let Some(chan) = state.map.get_mut(&name) else {
                continue;
            };
            match chan.release_at {
                Some(at) if at <= now => {
                    if self.hub.has_subscribers(&name) {
                        chan.release_at = None;
                        continue;
                    }
                    let chan = state.map.remove(&name).expect("just found");
                    if chan.phase != Phase::Live {
                        state.not_live -= 1;
                    }
                    if chan.sent && chan.phase != Phase::Pending {
                        state.subscribed = state.subscribed.saturating_sub(1);
                        gone.push(name.to_string());
                    }
                }
                Some(_) => state.releasing.push(name),
                None => {}
            }
        }
        self.metrics.channels.set(state.subscribed as i64);
        gone
    }
}

/// A node catch-up is bounded by `history.max_replay` entries, not by bytes: each session's
/// own queue bounds what it receives.
const CATCH_UP_BUDGET: usize = 1 << 40;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Outbox;
    use std::collections::VecDeque;

    fn setup() -> (Arc<Hub>, Channels, Arc<Outbox>) {
        let metrics = Metrics::new();
        let hub = Arc::new(Hub::new(metrics.clone()));
        let channels = Channels::new(hub.clone(), metrics, 3);
        let outbox = Arc::new(Outbox::new(1 << 20));
        (hub, channels, outbox)
    }

    fn texts(outbox: &Outbox) -> Vec<String> {
        let mut batch = VecDeque::new();
        outbox.take(&mut batch);
        batch.iter().map(|f| f.text().to_owned()).collect()
    }

    fn offset(ms: u64) -> String {
        format!("e:{ms}-0")
    }

    /// Subscribe `c` for a session and confirm it on connection `conn`.
    fn subscribe(hub: &Hub, channels: &Channels, outbox: &Arc<Outbox>, conn: u64) {
        hub.subscribe(&"c".into(), 1, outbox);
        channels.want(&"c".into());
        let mut waiter = channels.live("c").expect("pending");
        assert_eq!(channels.take_unsent(conn, 10), ["c"]);
        let reads = channels.confirmed(conn, &["c".to_owned()], 100);
        assert_eq!(reads.baselines.len(), 1);
        assert!(matches!(waiter.try_recv(), Ok(Live(None))));
        assert!(channels.live("c").is_none());
    }

    #[test]
    fn a_baseline_counts_only_after_a_later_pong() {
        let (hub, channels, outbox) = setup();
        let conn = channels.connected();
        subscribe(&hub, &channels, &outbox, conn);
        let n = channels.ping_sent();
        let baseline = Read {
            outcome: Outcome::Replay(Vec::new()),
            position: Position::at(Offset::parse(&offset(5)).unwrap()),
        };
        channels.baseline(conn, "c", Ok(baseline));
        assert!(channels.take_ping_wanted());
        // The PING sent before the baseline was read proves nothing about it.
        channels.pong(conn, n);
        channels.lost();
        let conn = channels.connected();
        channels.take_unsent(conn, 10);
        let reads = channels.confirmed(conn, &["c".to_owned()], 100);
        assert_eq!(reads.catch_ups[0].from, Position::Unknown);
    }

    #[test]
    fn a_message_arriving_twice_is_delivered_once_but_a_baseline_drops_nothing() {
        let (hub, channels, outbox) = setup();
        let conn = channels.connected();
        subscribe(&hub, &channels, &outbox, conn);
        // A baseline says the stream ends at 3 (read after the SUBSCRIBE, proven by a PING).
        channels.baseline(
            conn,
            "c",
            Ok(Read {
                outcome: Outcome::Replay(Vec::new()),
                position: Position::at(Offset::parse(&offset(3)).unwrap()),
            }),
        );
        let n = channels.ping_sent();
        channels.pong(conn, n);
        // 2 was published before the baseline was read but arrives after it: delivered.
        channels.on_message(conn, "c", Some(&offset(2)), b"2");
        channels.on_message(conn, "c", Some(&offset(4)), b"4");
        // The same messages again (a second subscription on the same node): not delivered.
        channels.on_message(conn, "c", Some(&offset(4)), b"4");
        channels.on_message(conn, "c", Some(&offset(2)), b"2");
        channels.on_message(conn, "c", Some(&offset(5)), b"5");
        let got = texts(&outbox);
        assert_eq!(got.len(), 3, "{got:?}");
        for (text, data) in got.iter().zip(["2", "4", "5"]) {
            assert!(text.contains(&format!("\"data\":{data}")), "{text}");
        }
    }

    #[test]
    fn a_resubscribed_channel_is_caught_up_before_its_held_messages() {
        let (hub, channels, outbox) = setup();
        let conn = channels.connected();
        subscribe(&hub, &channels, &outbox, conn);
        channels.on_message(conn, "c", Some(&offset(1)), b"1");
        assert_eq!(texts(&outbox).len(), 1);

        channels.lost();
        // A message of the dead connection changes nothing.
        channels.on_message(conn, "c", Some(&offset(9)), b"9");
        let conn = channels.connected();
        assert_eq!(channels.take_unsent(conn, 10), ["c"]);
        // Confirmed, not yet marked: held.
        channels.on_message(conn, "c", Some(&offset(4)), b"4");
        let reads = channels.confirmed(conn, &["c".to_owned()], 100);
        assert_eq!(
            reads.catch_ups[0].from,
            Position::at(Offset::parse(&offset(1)).unwrap())
        );
        channels.on_message(conn, "c", Some(&offset(5)), b"5");
        channels.on_message(conn, "c", None, b"plain");
        assert!(texts(&outbox).is_empty(), "held while catching up");
        // A session subscribing meanwhile waits for the catch-up.
        let mut waiter = channels.live("c").expect("catching up");
        let read = Read {
            outcome: Outcome::Replay(vec![
                (offset(2), b"2".to_vec()),
                (offset(3), b"3".to_vec()),
                (offset(4), b"4".to_vec()),
            ]),
            position: Position::at(Offset::parse(&offset(4)).unwrap()),
        };
        assert!(channels.caught_up(conn, "c", Ok(read), 100).is_none());
        let got: Vec<String> = texts(&outbox);
        assert_eq!(got.len(), 5, "{got:?}");
        for (text, data) in got.iter().zip(["2", "3", "4", "5", "\"plain\""]) {
            assert!(text.contains(&format!("\"data\":{data}")), "{text}");
        }
        assert!(matches!(waiter.try_recv(), Ok(Live(Some(o))) if o.id == (5, 0)));
        channels.on_message(conn, "c", Some(&offset(6)), b"6");
        assert_eq!(texts(&outbox).len(), 1);
        assert!(channels.is_ready());
    }

    #[test]
    fn what_cannot_be_caught_up_is_history_gone_then_live() {
        let (hub, channels, outbox) = setup();
        let conn = channels.connected();
        subscribe(&hub, &channels, &outbox, conn);
        channels.lost();
        let conn = channels.connected();
        channels.take_unsent(conn, 10);
        channels.confirmed(conn, &["c".to_owned()], 100);
        channels.on_message(conn, "c", Some(&offset(7)), b"7");
        let read = Read {
            outcome: Outcome::Gone("gone".into()),
            position: Position::at(Offset::parse(&offset(8)).unwrap()),
        };
        channels.caught_up(conn, "c", Ok(read), 100);
        let got = texts(&outbox);
        assert!(got[0].contains("history_gone"), "{got:?}");
        assert!(got[1].contains("\"data\":7"), "{got:?}");
    }

    #[test]
    fn overflowing_held_messages_are_read_again_from_history() {
        let (hub, channels, outbox) = setup();
        let conn = channels.connected();
        subscribe(&hub, &channels, &outbox, conn);
        channels.lost();
        let conn = channels.connected();
        channels.take_unsent(conn, 10);
        channels.confirmed(conn, &["c".to_owned()], 100);
        for ms in 3..=7 {
            channels.on_message(conn, "c", Some(&offset(ms)), b"x");
        }
        let read = Read {
            outcome: Outcome::Replay(vec![(offset(2), b"2".to_vec())]),
            position: Position::at(Offset::parse(&offset(2)).unwrap()),
        };
        let again = channels.caught_up(conn, "c", Ok(read), 100).expect("again");
        // Held kept 3..=5 (max 3); the next read starts after them.
        assert_eq!(again.from, Position::at(Offset::parse(&offset(5)).unwrap()));
        assert_eq!(texts(&outbox).len(), 4);
        assert!(!channels.is_ready());
    }

    #[test]
    fn a_released_channel_is_forgotten_and_its_late_messages_change_nothing() {
        let (hub, channels, outbox) = setup();
        let conn = channels.connected();
        subscribe(&hub, &channels, &outbox, conn);
        channels.on_message(conn, "c", Some(&offset(1)), b"1");
        hub.unsubscribe("c", 1);
        let now = Instant::now();
        channels.release("c", now);
        assert_eq!(channels.due_releases(now), ["c"]);
        channels.on_message(conn, "c", Some(&offset(2)), b"2");
        // Wanted again: a first subscription, with a fresh baseline, not the old position.
        hub.subscribe(&"c".into(), 2, &outbox);
        channels.want(&"c".into());
        assert_eq!(channels.take_unsent(conn, 10), ["c"]);
        let reads = channels.confirmed(conn, &["c".to_owned()], 100);
        assert_eq!(reads.baselines.len(), 1);
        assert!(reads.catch_ups.is_empty());
    }

    #[test]
    fn a_release_cancelled_by_a_new_subscriber_keeps_the_channel() {
        let (hub, channels, outbox) = setup();
        let conn = channels.connected();
        subscribe(&hub, &channels, &outbox, conn);
        let now = Instant::now();
        channels.release("c", now);
        // Still in the hub (another session subscribed): kept.
        assert!(channels.due_releases(now).is_empty());
        assert!(channels.live("c").is_none());
    }
}
