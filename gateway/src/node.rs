//! The node's shared state, as sessions and handlers see it: configuration, the hub and the
//! bus, presence, metrics, token verification, the registry of session outboxes the node
//! signals (shutdown, heartbeat, commands), the commands queued for sessions (the server API's
//! disconnect and unsubscribe, from `control`), the SSE relay, and the connection limits.
//! `server` builds it and drives the drain;
//! `session` uses it; neither imports the other.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::task::TaskTracker;

use crate::auth::Verifier;
use crate::bus::Bus;
use crate::config::Config;
use crate::hub::{Hub, SessionId};
use crate::metrics::{reason, Metrics};
use crate::outbox::{signal, Outbox};
use crate::presence::Presence;
use crate::protocol::{self, close};
use crate::relay::Relay;

/// Commands a session queued at most; more are dropped (a session that does not take them is
/// stuck writing to a client that does not read, and the heartbeat will close it).
const MAX_COMMANDS: usize = 64;

/// Something the node asks of one session, delivered with `signal::COMMAND`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionCommand {
    /// Close with 4409: disconnected by the server API.
    Disconnect,
    /// Leave this channel and tell the client `unsubscribed`.
    Unsubscribe(Box<str>),
}

/// One shard of the node's session registry.
type SessionShard = HashMap<SessionId, Arc<Outbox>>;

/// State shared by every session and handler of one node.
pub struct Node {
    pub config: Config,
    pub node_name: String,
    pub hub: Arc<Hub>,
    pub bus: Bus,
    pub presence: Arc<Presence>,
    pub metrics: Metrics,
    /// Token verification; None = auth off.
    pub verifier: Option<Verifier>,
    /// Where SSE sessions live and how POSTed client frames reach them.
    pub relay: Arc<Relay>,
    /// Every open session's outbox, for the node's signals (shutdown, heartbeat): sessions
    /// wait only on their own outbox, never on something shared with every other session.
    /// Sharded std Mutexes, held for an insert, a remove, or one pass of signals.
    sessions: Box<[Mutex<SessionShard>]>,
    /// Commands waiting for their sessions. A std Mutex held for one push or take; a session
    /// has an entry only while a command waits, and its entry goes when it unregisters.
    commands: Mutex<HashMap<SessionId, Vec<SessionCommand>>>,
    /// Sessions in flight, for the bounded drain.
    tracker: TaskTracker,
    /// Set at shutdown: `/readyz` answers 503, upgrades are refused.
    draining: AtomicBool,
    connections: AtomicUsize,
    /// Sessions per client address (IPv6: per /64), when `limits.max_connections_per_ip` is
    /// set. Sharded std Mutexes, held for one increment or decrement; an address leaves the
    /// map with its last session, so the map is bounded by the open sessions.
    per_ip: Box<[Mutex<HashMap<IpAddr, u32>>]>,
    next_session: AtomicU64,
    /// The demo page as this node serves it.
    index_page: String,
}

/// Holds one of the node's `max_connections` slots (and of its address's
/// `max_connections_per_ip`); released on drop.
pub struct ConnectionSlot {
    node: Arc<Node>,
    ip: Option<IpAddr>,
    /// `gateway_connections` of the session's transport.
    gauge: prometheus::IntGauge,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut shard = self.node.per_ip_shard(ip);
            if let Some(n) = shard.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    shard.remove(&ip);
                }
            }
        }
        self.node.connections.fetch_sub(1, Ordering::Relaxed);
        self.gauge.dec();
    }
}

/// The key clients are counted under: the address, IPv4-mapped IPv6 as IPv4, and IPv6 by its
/// /64 (one subscriber's allocation, which an attacker can spread over freely).
fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & (!0u128 << 64)).into()),
        v4 => v4,
    }
}

// === impl Node ===

impl Node {
    pub fn new(
        config: Config,
        node_name: String,
        hub: Arc<Hub>,
        bus: Bus,
        metrics: Metrics,
        verifier: Option<Verifier>,
        index_page: String,
    ) -> Node {
        // Its writer task is the server's to run (`Presence::run`).
        let presence = Arc::new(Presence::new(
            &config,
            &node_name,
            bus.clone(),
            metrics.clone(),
        ));
        Node {
            relay: Arc::new(Relay::new(node_name.clone(), bus.clone())),
            node_name,
            config,
            hub,
            bus,
            presence,
            metrics,
            commands: Mutex::new(HashMap::new()),
            verifier,
            sessions: (0..16).map(|_| Mutex::new(HashMap::new())).collect(),
            tracker: TaskTracker::new(),
            draining: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            per_ip: (0..16).map(|_| Mutex::new(HashMap::new())).collect(),
            next_session: AtomicU64::new(1),
            index_page,
        }
    }

    /// Sessions in flight, for the bounded drain.
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// The demo page as this node serves it.
    pub fn index_page(&self) -> &str {
        &self.index_page
    }

    /// From now on `/readyz` answers 503 and upgrades are refused; every session is told to
    /// close with 1001.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.signal_all(signal::SHUTDOWN);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Take a connection slot for a client at `peer` on `transport` (a `metrics::transport`
    /// value), or the close code and reason: 1013 at `limits.max_connections`, or at
    /// `limits.max_connections_per_ip` for its address. Both transports share the limits.
    pub fn connection_slot(
        self: &Arc<Self>,
        peer: IpAddr,
        transport: &'static str,
    ) -> Result<ConnectionSlot, (u16, &'static str)> {
        let max = self.config.limits.max_connections;
        let taken = self
            .connections
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            });
        if taken.is_err() {
            return Err((close::TRY_AGAIN_LATER, reason::MAX_CONNECTIONS));
        }
        let gauge = self.metrics.connections.with_label_values(&[transport]);
        gauge.inc();
        // From here on the slot's Drop gives back what was taken.
        let mut slot = ConnectionSlot {
            node: self.clone(),
            ip: None,
            gauge,
        };
        let per_ip = self.config.limits.max_connections_per_ip;
        if per_ip > 0 {
            let ip = address_key(peer);
            let mut shard = self.per_ip_shard(ip);
            let n = shard.entry(ip).or_insert(0);
            if *n as usize >= per_ip {
                return Err((close::TRY_AGAIN_LATER, reason::MAX_CONNECTIONS_PER_IP));
            }
            *n += 1;
            drop(shard);
            slot.ip = Some(ip);
        }
        Ok(slot)
    }

    fn per_ip_shard(&self, ip: IpAddr) -> std::sync::MutexGuard<'_, HashMap<IpAddr, u32>> {
        let h = match ip {
            IpAddr::V4(v4) => u32::from(v4) as usize,
            IpAddr::V6(v6) => (u128::from(v6) >> 64) as usize,
        };
        let shard = &self.per_ip[h % self.per_ip.len()];
        // Poisoning: the critical sections only count.
        shard.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sessions_shard(
        &self,
        id: SessionId,
    ) -> std::sync::MutexGuard<'_, HashMap<SessionId, Arc<Outbox>>> {
        let shard = &self.sessions[id as usize % self.sessions.len()];
        // Poisoning: the critical sections only insert, remove or iterate.
        shard.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Make a session reachable by the node's signals. A session that registers while the
    /// node drains is told at once.
    pub fn register(&self, id: SessionId, outbox: &Arc<Outbox>) {
        self.sessions_shard(id).insert(id, outbox.clone());
        // After the insert: a drain that started earlier may have signalled this shard
        // already, and set `draining` before it did.
        if self.draining.load(Ordering::SeqCst) {
            outbox.signal(signal::SHUTDOWN);
        }
    }

    pub fn unregister(&self, id: SessionId) {
        self.sessions_shard(id).remove(&id);
        self.lock_commands().remove(&id);
    }

    fn lock_commands(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Vec<SessionCommand>>> {
        // Poisoning: the critical sections only push, take or remove.
        self.commands.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue `command` for every session of `client_id` on this node (found through its
    /// personal channel, to which each of them is subscribed) and signal them. Returns how
    /// many sessions were told.
    pub fn command_client(&self, client_id: &str, command: SessionCommand) -> usize {
        let sessions = self.hub.subscribers(&protocol::personal_channel(client_id));
        for (id, outbox) in &sessions {
            let mut commands = self.lock_commands();
            let queued = commands.entry(*id).or_default();
            if queued.len() < MAX_COMMANDS && !queued.contains(&command) {
                queued.push(command.clone());
            }
            drop(commands);
            outbox.signal(signal::COMMAND);
        }
        sessions.len()
    }

    /// Give back commands a session could not act on yet, ahead of any queued since.
    pub fn requeue_commands(&self, id: SessionId, mut commands: Vec<SessionCommand>) {
        if commands.is_empty() {
            return;
        }
        let mut all = self.lock_commands();
        let queued = all.entry(id).or_default();
        commands.append(queued);
        *queued = commands;
    }

    /// The commands queued for session `id`, in order.
    pub fn take_commands(&self, id: SessionId) -> Vec<SessionCommand> {
        self.lock_commands().remove(&id).unwrap_or_default()
    }

    /// Send `bits` (`outbox::signal::*`) to every session.
    pub fn signal_all(&self, bits: u8) {
        for i in 0..self.sessions.len() {
            let shard = self.sessions[i].lock().unwrap_or_else(|e| e.into_inner());
            for outbox in shard.values() {
                outbox.signal(bits);
            }
        }
    }

    pub fn next_session_id(&self) -> SessionId {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    pub fn ready(&self) -> bool {
        !self.draining.load(Ordering::Relaxed) && self.bus.is_ready()
    }
}
