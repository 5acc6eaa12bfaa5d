//! Presence as the node keeps it (docs/REFERENCE.md §8): which of this node's sessions are in
//! which presence channel (`presence_channels`), the writes that put them into Redis, the
//! node-wide refresh that keeps them there, and the `join`/`leave` events.
//!
//! Sessions only call [`Presence::join`] and [`Presence::leave`], which change a map and wake
//! the writer: nothing on a session's path (or on fan-out) waits for Redis. One node-level
//! task ([`Presence::run`]) does all the Redis work, in order:
//!
//! - pending changes (coalesced per session: the latest wins), one script call per channel,
//!   pipelined, then the queued `join`/`leave` frames, published on their channels;
//! - every `presence.ttl_ms / 3`, a refresh that rewrites every local entry with a fresh
//!   expiry (one script call per channel, pipelined) and prunes the entries of dead nodes.
//!
//! Being the only writer keeps a session's join, refresh and leave in order. A write that
//! fails is kept and retried a second later; a node that dies stops refreshing, and its
//! entries expire within `presence.ttl_ms`. On the memory bus the local map is the whole
//! presence and events go straight to the hub.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::bus::{Bus, BusError, ChannelWrite};
use crate::config::Config;
use crate::metrics::{presence_removal, Metrics};
use crate::protocol::{self, ClientInfo};

/// `join`/`leave` frames queued at most; more are dropped and counted.
const MAX_EVENTS: usize = 10_000;

/// Entries written per round trip (and, for a refresh, held in memory at once), about.
const SLICE: usize = 1_000;

/// How long a failed write waits before it is tried again.
const RETRY: Duration = Duration::from_secs(1);

pub struct Presence {
    patterns: Vec<String>,
    ttl_ms: u64,
    join_leave: bool,
    node_name: String,
    bus: Bus,
    metrics: Metrics,
    /// std Mutex: held for one insert or remove, or one swap of the pending work; never
    /// across `.await`.
    state: Mutex<State>,
    /// Wakes the writer: changes or events are pending.
    wake: Notify,
}

#[derive(Default)]
struct State {
    /// Channel → this node's sessions in it → their client ids. Only sessions in presence
    /// channels have entries: the rest pay nothing.
    local: HashMap<Box<str>, HashMap<Uuid, Box<str>>>,
    /// Changes not written yet: channel → session → present (true) or gone (false).
    dirty: HashMap<Box<str>, HashMap<Uuid, bool>>,
    /// `join`/`leave` frames not sent yet, in order: (channel, frame).
    events: VecDeque<(Box<str>, String)>,
}

impl Presence {
    pub fn new(config: &Config, node_name: &str, bus: Bus, metrics: Metrics) -> Presence {
        Presence {
            patterns: config.presence_channels.clone(),
            ttl_ms: config.presence.ttl_ms,
            join_leave: config.presence.join_leave,
            node_name: node_name.to_owned(),
            bus,
            metrics,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section is a few map operations; a poisoned lock still holds
        // consistent maps.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `channel` is a presence channel.
    pub fn applies(&self, channel: &str) -> bool {
        protocol::any_matches(&self.patterns, channel)
    }

    /// `session` of `client_id` subscribed to `channel`. Never waits.
    pub fn join(&self, channel: &str, session: Uuid, client_id: &str) {
        if !self.applies(channel) {
            return;
        }
        let mut state = self.lock();
        let sessions = state.local.entry(channel.into()).or_default();
        if sessions.insert(session, client_id.into()).is_some() {
            return;
        }
        self.metrics.presence_entries.inc();
        state
            .dirty
            .entry(channel.into())
            .or_default()
            .insert(session, true);
        self.event(&mut state, "join", channel, session, client_id);
        drop(state);
        self.wake.notify_one();
    }

    /// `session` left `channel` (unsubscribed, or closed). Never waits.
    pub fn leave(&self, channel: &str, session: Uuid, client_id: &str) {
        if !self.applies(channel) {
            return;
        }
        let mut state = self.lock();
        let Some(sessions) = state.local.get_mut(channel) else {
            return;
        };
        if sessions.remove(&session).is_none() {
            return;
        }
        if sessions.is_empty() {
            state.local.remove(channel);
        }
        self.metrics.presence_entries.dec();
        state
            .dirty
            .entry(channel.into())
            .or_default()
            .insert(session, false);
        self.event(&mut state, "leave", channel, session, client_id);
        drop(state);
        self.wake.notify_one();
    }

    fn event(&self, state: &mut State, kind: &str, channel: &str, session: Uuid, client_id: &str) {
        if !self.join_leave {
            return;
        }
        if state.events.len() >= MAX_EVENTS {
            self.metrics.presence_events_dropped.inc();
            return;
        }
        let frame = protocol::presence_event_frame(kind, channel, client_id, &session.to_string());
        state.events.push_back((channel.into(), frame));
    }

    /// Everyone in `channel`, on every node. This node's own changes count at once, even
    /// before the writer has put them into Redis.
    pub async fn list(&self, channel: &str) -> Result<Vec<ClientInfo>, BusError> {
        let stored = self.bus.presence_read(channel).await?;
        let mut clients = match stored {
            Some((expired, clients)) => {
                self.count_expired(expired);
                clients
            }
            None => Vec::new(),
        };
        let state = self.lock();
        if let Some(dirty) = state.dirty.get(channel) {
            clients.retain(|c| {
                Uuid::parse_str(&c.session).map_or(true, |s| dirty.get(&s) != Some(&false))
            });
        }
        if let Some(local) = state.local.get(channel) {
            for (session, client_id) in local {
                let session = session.to_string();
                if !clients.iter().any(|c| c.session == session) {
                    clients.push(self.info(&session, client_id));
                }
            }
        }
        Ok(clients)
    }

    fn info(&self, session: &str, client_id: &str) -> ClientInfo {
        ClientInfo {
            client_id: client_id.to_owned(),
            session: session.to_owned(),
            node: self.node_name.clone(),
        }
    }

    fn entry_json(&self, session: &str, client_id: &str) -> String {
        serde_json::to_string(&self.info(session, client_id)).unwrap_or_default()
    }

    fn count_expired(&self, expired: u64) {
        self.metrics
            .presence_removed
            .with_label_values(&[presence_removal::EXPIRED])
            .inc_by(expired);
    }

    /// The node's presence writer: pending changes and events as they come, a refresh of
    /// every local entry every `presence.ttl_ms / 3`. At `stop` (after the sessions have
    /// drained) it writes what their leaving changed, within the Redis timeout, and returns.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let every = Duration::from_millis(self.ttl_ms / 3);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry: Option<tokio::time::Instant> = None;
        loop {
            let ok = tokio::select! {
                _ = stop.cancelled() => {
                    let last = tokio::time::timeout(Duration::from_secs(2), self.flush());
                    let _ = last.await;
                    return;
                }
                _ = self.wake.notified() => self.flush().await,
                _ = tick.tick() => self.refresh().await,
                _ = tokio::time::sleep_until(retry.unwrap_or_else(tokio::time::Instant::now)),
                    if retry.is_some() => self.flush().await,
            };
            retry = (!ok).then(|| tokio::time::Instant::now() + RETRY);
        }
    }

    /// Write the pending changes, then send the pending events. False when the write failed
    /// (the changes are pending again).
    async fn flush(&self) -> bool {
        let (dirty, events) = {
            let mut state = self.lock();
            (
                std::mem::take(&mut state.dirty),
                std::mem::take(&mut state.events),
            )
        };
        let writes: Vec<ChannelWrite> = {
            let state = self.lock();
            dirty
                .iter()
                .map(|(channel, sessions)| self.channel_write(&state, channel, sessions.iter()))
                .collect()
        };
        let ok = self.write(writes).await;
        if !ok {
            // Put the changes back under any newer ones made meanwhile.
            let mut state = self.lock();
            for (channel, sessions) in dirty {
                let pending = state.dirty.entry(channel).or_default();
                for (session, present) in sessions {
                    pending.entry(session).or_insert(present);
                }
            }
        }
        for (channel, frame) in events {
            if let Err(e) = self.bus.publish_event(&channel, &frame).await {
                tracing::debug!(error = %e, %channel, "presence event not sent");
            }
        }
        ok
    }

    /// Pending changes first, then every local entry again with a fresh expiry: channel by
    /// channel, in slices of about [`SLICE`] entries, so what a refresh holds in
    /// memory at once does not grow with the node's sessions.
    async fn refresh(&self) -> bool {
        if !self.flush().await {
            return false;
        }
        let channels: Vec<Box<str>> = self.lock().local.keys().cloned().collect();
        let mut ok = true;
        let mut rest = &channels[..];
        while !rest.is_empty() {
            let mut writes = Vec::new();
            let mut entries = 0;
            {
                let state = self.lock();
                while let Some((channel, tail)) = rest.split_first() {
                    if entries >= SLICE {
                        break;
                    }
                    rest = tail;
                    if let Some(sessions) = state.local.get(channel) {
                        entries += sessions.len();
                        let present = sessions.keys().map(|s| (s, &true));
                        writes.push(self.channel_write(&state, channel, present));
                    }
                }
            }
            ok &= self.write(writes).await;
        }
        ok
    }

    /// One channel's writes: sessions present are (re)written with their data from the local
    /// map (one that left meanwhile is skipped: its removal is pending), the others removed.
    fn channel_write<'a>(
        &self,
        state: &State,
        channel: &str,
        sessions: impl Iterator<Item = (&'a Uuid, &'a bool)>,
    ) -> ChannelWrite {
        let local = state.local.get(channel);
        let mut write = ChannelWrite {
            channel: channel.to_owned(),
            ..Default::default()
        };
        for (session, present) in sessions {
            let id = session.to_string();
            match (present, local.and_then(|l| l.get(session))) {
                (true, Some(client_id)) => {
                    let json = self.entry_json(&id, client_id);
                    write.upserts.push((id, json));
                }
                (true, None) => {}
                (false, _) => write.removals.push(id),
            }
        }
        write
    }

    /// Write `writes`, in round trips of about [`SLICE`] entries each (a pipeline's buffers
    /// keep their size: the node's largest write stays small).
    async fn write(&self, writes: Vec<ChannelWrite>) -> bool {
        let mut ok = true;
        let mut slice = Vec::new();
        let mut entries = 0;
        for write in writes {
            entries += write.upserts.len() + write.removals.len();
            slice.push(write);
            if entries >= SLICE {
                ok &= self.write_slice(std::mem::take(&mut slice)).await;
                entries = 0;
            }
        }
        if !slice.is_empty() {
            ok &= self.write_slice(slice).await;
        }
        ok
    }

    async fn write_slice(&self, writes: Vec<ChannelWrite>) -> bool {
        let upserts: usize = writes.iter().map(|w| w.upserts.len()).sum();
        match self.bus.presence_write(writes, self.ttl_ms).await {
            Ok(outcome) => {
                if matches!(self.bus, Bus::Redis(_)) {
                    self.metrics.presence_written.inc_by(upserts as u64);
                    self.metrics
                        .presence_removed
                        .with_label_values(&[presence_removal::LEAVE])
                        .inc_by(outcome.removed);
                    self.count_expired(outcome.expired);
                }
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "presence write failed; retrying");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Hub;
    use crate::outbox::Outbox;

    fn memory() -> (Arc<Presence>, Arc<Hub>) {
        let metrics = Metrics::new();
        let hub = Arc::new(Hub::new(metrics.clone()));
        let bus = Bus::Memory(Arc::new(crate::bus::memory::MemoryBus::new(
            hub.clone(),
            metrics.clone(),
        )));
        let config = Config::default();
        (Arc::new(Presence::new(&config, "gw-1", bus, metrics)), hub)
    }

    #[tokio::test]
    async fn the_memory_bus_lists_local_sessions_and_sends_join_and_leave() {
        let (presence, hub) = memory();
        let stop = CancellationToken::new();
        tokio::spawn(presence.clone().run(stop.clone()));
        let outbox = Arc::new(Outbox::new(1 << 20));
        hub.subscribe(&"chat:a".into(), 1, &outbox);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        presence.join("chat:a", a, "alice");
        presence.join("chat:a", b, "bob");
        presence.join("ticks", a, "alice");
        let mut clients = presence.list("chat:a").await.unwrap();
        clients.sort_by(|x, y| x.client_id.cmp(&y.client_id));
        assert_eq!(clients.len(), 2);
        assert_eq!(clients[0].client_id, "alice");
        assert_eq!(clients[0].node, "gw-1");
        assert!(presence.list("ticks").await.unwrap().is_empty());
        presence.leave("chat:a", a, "alice");
        let clients = presence.list("chat:a").await.unwrap();
        assert_eq!(clients.len(), 1);
        // The events reach the channel's subscribers through the hub.
        let mut frames = std::collections::VecDeque::new();
        for _ in 0..100 {
            let mut batch = std::collections::VecDeque::new();
            outbox.take(&mut batch);
            frames.extend(batch);
            if frames.len() >= 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let kinds: Vec<String> = frames
            .iter()
            .map(|f| {
                let v: serde_json::Value = serde_json::from_str(f.text()).unwrap();
                v["type"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(kinds, ["join", "join", "leave"]);
        stop.cancel();
    }
}
