//! Where SSE sessions live, and how a client frame POSTed for one reaches it
//! (docs/REFERENCE.md §9): the node's registry of its own SSE sessions (session id → client id
//! and the session's inbox), one small expiring Redis key per SSE session naming its node and
//! client (so that any node can answer 404/401/403 for it), and forwarding: a POST that lands
//! on another node is published on the owning node's forwarding channel, which that node
//! subscribes to like any channel, through the hub and the bus. Nodes never talk to each
//! other directly.
//!
//! The keys' expiry is refreshed by one node-level task ([`Relay::run`]), never by a timer per
//! session; a key is deleted when its session ends, and the keys of a node that died expire
//! within [`KEY_TTL`]. With the memory bus there is one node: everything is local.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, BusError};
use crate::hub::{Hub, SessionId, Subscribed, Unsubscribed};
use crate::outbox::{Frame, Outbox};

/// How long a session's key outlives its node's last refresh.
pub const KEY_TTL: Duration = Duration::from_secs(60);
/// How often the node refreshes the keys of its SSE sessions.
const REFRESH_EVERY: Duration = Duration::from_secs(20);
/// Client frames a session has not handled yet; a POST beyond them is refused (429), so a
/// client cannot queue unbounded work on a session.
const INBOX: usize = 16;
/// The relay's id in the hub: sessions count from 1.
const RELAY_ID: SessionId = 0;
/// The relay drains its queue at once; this bound only matters if it could not keep up.
const RELAY_QUEUE_BYTES: usize = 4 << 20;

/// Who holds an SSE session.
pub enum Owner {
    /// This node: its inbox.
    Local {
        client_id: Box<str>,
        inbox: mpsc::Sender<String>,
    },
    /// Another node, by name.
    Remote { node: String, client_id: String },
}

impl Owner {
    pub fn client_id(&self) -> &str {
        match self {
            Owner::Local { client_id, .. } => client_id,
            Owner::Remote { client_id, .. } => client_id,
        }
    }
}

/// Why a client frame was not handed on.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error("the session has {INBOX} client frames waiting; slow down")]
    Busy,
    #[error("no such session")]
    Gone,
    #[error("the message bus (Redis) is unavailable: {0}")]
    Bus(#[from] BusError),
}

/// The Redis key's value, and what a forwarded frame carries.
#[derive(serde::Serialize, Deserialize)]
struct Entry {
    node: String,
    client_id: String,
}

#[derive(serde::Serialize, Deserialize)]
struct Forward {
    session: String,
    frame: String,
}

/// The hub's frame of a forwarded message: only its `data` matters.
#[derive(Deserialize)]
struct Delivered {
    data: Forward,
}

struct Local {
    client_id: Box<str>,
    inbox: mpsc::Sender<String>,
}

pub struct Relay {
    node_name: String,
    bus: Bus,
    hub: Arc<Hub>,
    /// This node's forwarding channel (a name no client can subscribe to: `#` and `/` are not
    /// channel characters).
    channel: String,
    /// std Mutex: held for one insert, remove, lookup or snapshot, never across `.await`.
    sessions: Mutex<HashMap<uuid::Uuid, Local>>,
    /// The queue the hub fills with forwarded frames; replaced if it ever overflows.
    outbox: Mutex<Arc<Outbox>>,
}

/// A session's place in the registry; leaving it (drop) unregisters the session and deletes
/// its key.
pub struct Registration {
    relay: Arc<Relay>,
    id: uuid::Uuid,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.relay.unregister(self.id);
    }
}

/// The forwarding channel of the node named `node`.
fn forward_channel(node: &str) -> String {
    let name: String = node
        .chars()
        .map(|c| match c {
            'A'..='Z' | 'a'..='z' | '0'..='9' | '_' | '-' | '.' | ':' | '@' => c,
            _ => '_',
        })
        .collect();
    format!("gateway#sse/{name}")
}

fn key(id: &uuid::Uuid) -> String {
    format!("sse:{}", id.as_simple())
}

// === impl Relay ===

impl Relay {
    pub fn new(node_name: String, bus: Bus, hub: Arc<Hub>) -> Relay {
        Relay {
            channel: forward_channel(&node_name),
            node_name,
            bus,
            hub,
            sessions: Mutex::new(HashMap::new()),
            outbox: Mutex::new(Arc::new(Outbox::new(RELAY_QUEUE_BYTES))),
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<uuid::Uuid, Local>> {
        // Poisoning: the critical sections only insert, remove or copy.
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn outbox(&self) -> Arc<Outbox> {
        self.outbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Register a new SSE session of `client_id`: the returned receiver is its inbox of client
    /// frames. The node's forwarding channel is wanted while it has SSE sessions.
    pub fn register(
        self: &Arc<Self>,
        id: uuid::Uuid,
        client_id: &str,
    ) -> (Registration, mpsc::Receiver<String>) {
        let (tx, rx) = mpsc::channel(INBOX);
        let mut sessions = self.sessions();
        let first = sessions.is_empty();
        sessions.insert(
            id,
            Local {
                client_id: client_id.into(),
                inbox: tx,
            },
        );
        if first && self.bus.is_shared() {
            // Under the registry's lock, so that join and leave reach the hub in order.
            let outbox = self.outbox();
            if self.hub.subscribe_node(&self.channel, RELAY_ID, &outbox) == Subscribed::First {
                self.bus.want(&self.channel);
            }
        }
        drop(sessions);
        let registration = Registration {
            relay: self.clone(),
            id,
        };
        (registration, rx)
    }

    /// Make a registered session findable by every node: write its key, and wait (bounded)
    /// until this node receives its forwarding channel. Called before the session's stream
    /// starts, so that a client that has its welcome can POST to any node. A Redis that does
    /// not answer delays nothing beyond `redis.timeout_ms`; the refresh writes the key later.
    pub async fn announce(&self, id: uuid::Uuid, client_id: &str, wait: Duration) {
        if !self.bus.is_shared() {
            return;
        }
        let entry = Entry {
            node: self.node_name.clone(),
            client_id: client_id.to_owned(),
        };
        let value = serde_json::to_string(&entry).unwrap_or_default();
        if let Err(e) = self.bus.put(&[(key(&id), value)], KEY_TTL).await {
            tracing::debug!(error = %e, "SSE session key not written; the refresh retries");
        }
        if let Some(live) = self.bus.live(&self.channel) {
            let _ = tokio::time::timeout(wait, live).await;
        }
    }

    fn unregister(&self, id: uuid::Uuid) {
        let mut sessions = self.sessions();
        if sessions.remove(&id).is_none() {
            return;
        }
        let last = sessions.is_empty();
        if last
            && self.bus.is_shared()
            && self.hub.unsubscribe_node(&self.channel, RELAY_ID) == Unsubscribed::Last
        {
            self.bus.release(&self.channel);
        }
        drop(sessions);
        if self.bus.is_shared() {
            let bus = self.bus.clone();
            tokio::spawn(async move {
                if let Err(e) = bus.delete(&key(&id)).await {
                    tracing::debug!(error = %e, "SSE session key not deleted; it expires");
                }
            });
        }
    }

    /// Who holds session `id`: this node, another one (from its Redis key), or nobody.
    pub async fn lookup(&self, id: uuid::Uuid) -> Result<Option<Owner>, BusError> {
        if let Some(local) = self.sessions().get(&id) {
            return Ok(Some(Owner::Local {
                client_id: local.client_id.clone(),
                inbox: local.inbox.clone(),
            }));
        }
        let Some(value) = self.bus.get(&key(&id)).await? else {
            return Ok(None);
        };
        let Ok(entry) = serde_json::from_str::<Entry>(&value) else {
            return Ok(None);
        };
        if entry.node == self.node_name {
            // This node's key, but the session is gone (its key outlived it briefly).
            return Ok(None);
        }
        Ok(Some(Owner::Remote {
            node: entry.node,
            client_id: entry.client_id,
        }))
    }

    /// Hand `frame` to session `id`'s inbox on this node, or publish it to its node.
    pub async fn deliver(
        &self,
        id: uuid::Uuid,
        owner: Owner,
        frame: String,
    ) -> Result<(), DeliverError> {
        match owner {
            Owner::Local { inbox, .. } => inbox.try_send(frame).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => DeliverError::Busy,
                mpsc::error::TrySendError::Closed(_) => DeliverError::Gone,
            }),
            Owner::Remote { node, .. } => {
                let forward = Forward {
                    session: id.as_simple().to_string(),
                    frame,
                };
                let payload = serde_json::to_vec(&forward).unwrap_or_default();
                self.bus.publish(&forward_channel(&node), &payload).await?;
                Ok(())
            }
        }
    }

    /// A frame forwarded by another node, as the hub delivered it: into its session's inbox.
    /// A frame for a session that ended meanwhile, or whose inbox is full, is dropped (its
    /// POST was answered 202 already).
    fn on_forwarded(&self, text: &str) {
        let Ok(Delivered { data }) = serde_json::from_str::<Delivered>(text) else {
            return;
        };
        let Ok(id) = uuid::Uuid::parse_str(&data.session) else {
            return;
        };
        let inbox = self.sessions().get(&id).map(|local| local.inbox.clone());
        if let Some(inbox) = inbox {
            if inbox.try_send(data.frame).is_err() {
                tracing::debug!(session = %id, "forwarded client frame dropped: inbox full");
            }
        }
    }

    /// The node's SSE task, until `stop`: hands forwarded frames to their sessions, and
    /// refreshes the keys of this node's SSE sessions every [`REFRESH_EVERY`].
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        if !self.bus.is_shared() {
            return;
        }
        tokio::spawn(self.clone().refresh_keys(stop.clone()));
        let mut batch: VecDeque<Frame> = VecDeque::new();
        loop {
            let outbox = self.outbox();
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = outbox.ready() => {}
            }
            if !outbox.take(&mut batch) {
                // Overflowed (it could not keep up): a fresh queue, subscribed in its place.
                tracing::warn!("SSE forwarding queue overflowed; forwarded frames were lost");
                let sessions = self.sessions();
                let fresh = Arc::new(Outbox::new(RELAY_QUEUE_BYTES));
                *self.outbox.lock().unwrap_or_else(|e| e.into_inner()) = fresh.clone();
                if !sessions.is_empty() {
                    self.hub.unsubscribe_node(&self.channel, RELAY_ID);
                    self.hub.subscribe_node(&self.channel, RELAY_ID, &fresh);
                }
                continue;
            }
            for frame in batch.drain(..) {
                self.on_forwarded(frame.text());
            }
        }
    }

    async fn refresh_keys(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(REFRESH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let entries: Vec<(String, String)> = self
                .sessions()
                .iter()
                .map(|(id, local)| {
                    let entry = Entry {
                        node: self.node_name.clone(),
                        client_id: local.client_id.to_string(),
                    };
                    (key(id), serde_json::to_string(&entry).unwrap_or_default())
                })
                .collect();
            for chunk in entries.chunks(1000) {
                if let Err(e) = self.bus.put(chunk, KEY_TTL).await {
                    tracing::debug!(error = %e, "SSE session keys not refreshed");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_channels_are_no_client_channel() {
        let channel = forward_channel("gw-1");
        assert_eq!(channel, "gateway#sse/gw-1");
        assert!(!crate::protocol::valid_channel(&channel));
        // A node name with characters a frame cannot carry verbatim is made safe.
        assert_eq!(forward_channel("a\"b c"), "gateway#sse/a_b_c");
    }

    #[tokio::test]
    async fn a_local_session_gets_its_frames_and_leaves_with_its_registration() {
        let metrics = crate::metrics::Metrics::new();
        let hub = Arc::new(Hub::new(metrics.clone()));
        let bus = Bus::Memory(Arc::new(crate::bus::memory::MemoryBus::new(
            hub.clone(),
            metrics,
        )));
        let relay = Arc::new(Relay::new("gw-1".into(), bus, hub));
        let id = uuid::Uuid::new_v4();
        let (registration, mut inbox) = relay.register(id, "alice");
        let owner = relay.lookup(id).await.unwrap().expect("registered");
        assert_eq!(owner.client_id(), "alice");
        relay.deliver(id, owner, "{}".into()).await.unwrap();
        assert_eq!(inbox.recv().await.as_deref(), Some("{}"));
        // The inbox is bounded: the 17th waiting frame is refused.
        for _ in 0..INBOX {
            let owner = relay.lookup(id).await.unwrap().unwrap();
            relay.deliver(id, owner, "{}".into()).await.unwrap();
        }
        let owner = relay.lookup(id).await.unwrap().unwrap();
        assert!(matches!(
            relay.deliver(id, owner, "{}".into()).await,
            Err(DeliverError::Busy)
        ));
        drop(registration);
        assert!(relay.lookup(id).await.unwrap().is_none());
    }
}
