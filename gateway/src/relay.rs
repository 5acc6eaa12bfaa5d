//! Where SSE sessions live, and how a client frame POSTed for one reaches it
//! (docs/REFERENCE.md §9): the node's registry of its own SSE sessions (session id → client id
//! and the session's inbox), and one small expiring Redis key per SSE session naming its node
//! and client, so that any node can answer 404/401/403 for it. A POST that lands on another
//! node travels as a `forward` message of the control channel (`control`), addressed to the
//! owning node, which hands it to [`Relay::on_forwarded`]. Nodes never talk to each other
//! directly.
//!
//! The keys' expiry is refreshed by one node-level task ([`Relay::run`]), never by a timer per
//! session; a key is deleted when its session ends, and the keys of a node that died expire
//! within [`KEY_TTL`]. With the memory bus there is one node: everything is local.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, BusError};

/// How long a session's key outlives its node's last refresh.
pub const KEY_TTL: Duration = Duration::from_secs(60);
/// How often the node refreshes the keys of its SSE sessions.
const REFRESH_EVERY: Duration = Duration::from_secs(20);
/// Client frames a session has not handled yet; a POST beyond them is refused (429), so a
/// client cannot queue unbounded work on a session.
const INBOX: usize = 16;

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

/// Why a client frame was not handed to a session of this node.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error("the session has {INBOX} client frames waiting; slow down")]
    Busy,
    #[error("no such session")]
    Gone,
}

/// The Redis key's value.
#[derive(serde::Serialize, Deserialize)]
struct Entry {
    node: String,
    client_id: String,
}

struct Local {
    client_id: Box<str>,
    inbox: mpsc::Sender<String>,
}

pub struct Relay {
    node_name: String,
    bus: Bus,
    /// std Mutex: held for one insert, remove, lookup or snapshot, never across `.await`.
    sessions: Mutex<HashMap<uuid::Uuid, Local>>,
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

fn key(id: &uuid::Uuid) -> String {
    format!("sse:{}", id.as_simple())
}

// === impl Relay ===

impl Relay {
    pub fn new(node_name: String, bus: Bus) -> Relay {
        Relay {
            node_name,
            bus,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<uuid::Uuid, Local>> {
        // Poisoning: the critical sections only insert, remove or copy.
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register a new SSE session of `client_id`: the returned receiver is its inbox of client
    /// frames.
    pub fn register(
        self: &Arc<Self>,
        id: uuid::Uuid,
        client_id: &str,
    ) -> (Registration, mpsc::Receiver<String>) {
        let (tx, rx) = mpsc::channel(INBOX);
        self.sessions().insert(
            id,
            Local {
                client_id: client_id.into(),
                inbox: tx,
            },
        );
        let registration = Registration {
            relay: self.clone(),
            id,
        };
        (registration, rx)
    }

    /// Make a registered session findable by every node: write its key. Called before the
    /// session's stream starts, so that a client that has its welcome can POST to any node
    /// (which forwards on the control channel, subscribed since the node started). A Redis
    /// that does not answer delays nothing beyond `redis.timeout_ms`; the refresh writes the
    /// key later.
    pub async fn announce(&self, id: uuid::Uuid, client_id: &str) {
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
    }

    fn unregister(&self, id: uuid::Uuid) {
        if self.sessions().remove(&id).is_none() {
            return;
        }
        // Outside a runtime (a process tearing down) the key is left to expire.
        let runtime = tokio::runtime::Handle::try_current();
        if let (true, Ok(runtime)) = (self.bus.is_shared(), runtime) {
            let bus = self.bus.clone();
            runtime.spawn(async move {
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

    /// Hand `frame` to a session of this node, through the inbox [`Relay::lookup`] found.
    pub fn deliver(inbox: &mpsc::Sender<String>, frame: String) -> Result<(), DeliverError> {
        inbox.try_send(frame).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => DeliverError::Busy,
            mpsc::error::TrySendError::Closed(_) => DeliverError::Gone,
        })
    }

    /// A frame another node forwarded (a `forward` control message addressed to this node):
    /// into its session's inbox. A frame for a session that ended meanwhile, or whose inbox
    /// is full, is dropped (its POST was answered 202 already).
    pub fn on_forwarded(&self, session: &str, frame: String) {
        let Ok(id) = uuid::Uuid::parse_str(session) else {
            return;
        };
        let inbox = self.sessions().get(&id).map(|local| local.inbox.clone());
        if let Some(inbox) = inbox {
            if Self::deliver(&inbox, frame).is_err() {
                tracing::debug!(session = %id, "forwarded client frame dropped");
            }
        }
    }

    /// The node's SSE task, until `stop`: refreshes the keys of this node's SSE sessions
    /// every [`REFRESH_EVERY`] (one pipeline per thousand sessions).
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        if !self.bus.is_shared() {
            return;
        }
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

    #[tokio::test]
    async fn a_local_session_gets_its_frames_and_leaves_with_its_registration() {
        let metrics = crate::metrics::Metrics::new();
        let hub = Arc::new(crate::hub::Hub::new(metrics.clone()));
        let bus = Bus::Memory(Arc::new(crate::bus::memory::MemoryBus::new(hub, metrics)));
        let relay = Arc::new(Relay::new("gw-1".into(), bus));
        let id = uuid::Uuid::new_v4();
        let (registration, mut inbox) = relay.register(id, "alice");
        let Some(Owner::Local {
            client_id,
            inbox: tx,
        }) = relay.lookup(id).await.unwrap()
        else {
            panic!("registered here");
        };
        assert_eq!(&*client_id, "alice");
        Relay::deliver(&tx, "{}".into()).unwrap();
        assert_eq!(inbox.recv().await.as_deref(), Some("{}"));
        // Forwarded frames reach the same inbox, by the session's id in either spelling.
        relay.on_forwarded(&id.as_simple().to_string(), "[1]".into());
        assert_eq!(inbox.recv().await.as_deref(), Some("[1]"));
        // The inbox is bounded: the 17th waiting frame is refused.
        for _ in 0..INBOX {
            Relay::deliver(&tx, "{}".into()).unwrap();
        }
        assert!(matches!(
            Relay::deliver(&tx, "{}".into()),
            Err(DeliverError::Busy)
        ));
        drop(registration);
        assert!(relay.lookup(id).await.unwrap().is_none());
    }
}
