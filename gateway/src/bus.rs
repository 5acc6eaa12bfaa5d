//! The bus: how messages reach this node and how client publishes leave it.
//!
//! Two implementations behind one handle: [`memory`] (one node, in-process; the default when
//! no `redis.url` is configured) and [`redis`] (one pub/sub connection per node multiplexing
//! every channel a local session wants, plus a command pool for publishes and history reads).
//! The bus knows channels and payloads, never sockets; messages it receives go to the [`Hub`].
//! It also keeps the node's few small expiring keys (where each SSE session lives), which only
//! the Redis bus can share between nodes.
//! Publisher messages arrive in an envelope carrying their history offset (docs/REFERENCE.md
//! §5; see `redis/mod.rs`); the memory bus has no history.

pub mod memory;
pub mod redis;

use std::sync::Arc;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::protocol::{ClientInfo, Offset};
pub use redis::presence::{ChannelWrite, WriteOutcome};
pub use redis::ControlSink;

/// Why a publish failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    #[error("redis timed out")]
    Timeout,
}

/// What a channel's history holds after an offset (docs/REFERENCE.md §5).
#[derive(Debug)]
pub enum History {
    /// Everything published after the offset, oldest first: `(offset, payload)`.
    Replay(Vec<(String, Vec<u8>)>),
    /// The offset cannot be resumed from: why, for the `history_gone` error frame.
    Gone(String),
}

/// A channel became live on this node: whatever is published from now on reaches its
/// sessions. Carries the node's position in the channel's history when it was caught up
/// first: messages at or before it that sessions find queued were published before they
/// were told `subscribed`.
#[derive(Debug)]
pub struct Live(pub Option<Offset>);

/// A cheap-to-clone handle on the node's bus.
#[derive(Clone)]
pub enum Bus {
    Memory(Arc<memory::MemoryBus>),
    Redis(Arc<redis::RedisBus>),
}

impl Bus {
    /// Start the bus the configuration asks for. The Redis bus connects in the background:
    /// the node serves (and reports not-ready) while Redis is unreachable.
    pub fn start(
        config: &Config,
        hub: Arc<Hub>,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Bus {
        match config.redis.enabled() {
            false => Bus::Memory(Arc::new(memory::MemoryBus::new(hub, metrics))),
            true => Bus::Redis(redis::RedisBus::start(
                &config.redis,
                config.history.max_replay,
                hub,
                metrics,
                shutdown,
            )),
        }
    }

    /// The hub has its first local subscriber for `channel`: the node must receive it.
    pub fn want(&self, channel: &Arc<str>) {
        match self {
            Bus::Memory(_) => {}
            Bus::Redis(bus) => bus.want(channel),
        }
    }

    /// None when the node receives `channel`'s messages; otherwise a receiver that completes
    /// when it does (after a Redis outage, only once the channel has been caught up). A session
    /// is told `subscribed` only then.
    pub fn live(&self, channel: &str) -> Option<oneshot::Receiver<Live>> {
        match self {
            Bus::Memory(_) => None,
            Bus::Redis(bus) => bus.live(channel),
        }
    }

    /// The last local subscriber of `channel` left.
    pub fn release(&self, channel: &str) {
        match self {
            Bus::Memory(_) => {}
            Bus::Redis(bus) => bus.release(channel),
        }
    }

    /// Publish `payload` on `channel` to every node.
    pub async fn publish(&self, channel: &str, payload: &[u8]) -> Result<(), BusError> {
        match self {
            Bus::Memory(bus) => {
                bus.publish(channel, payload);
                Ok(())
            }
            Bus::Redis(bus) => bus.publish(channel, payload).await,
        }
    }

    /// Set expiring keys (the Redis prefix is added to each name). The memory bus has one
    /// node and nothing to share: a no-op.
    pub async fn put(
        &self,
        entries: &[(String, String)],
        ttl: std::time::Duration,
    ) -> Result<(), BusError> {
        match self {
            Bus::Memory(_) => Ok(()),
            Bus::Redis(bus) => bus.put(entries, ttl).await,
        }
    }

    /// The value of a key set with [`Bus::put`] by any node; always None on the memory bus.
    pub async fn get(&self, name: &str) -> Result<Option<String>, BusError> {
        match self {
            Bus::Memory(_) => Ok(None),
            Bus::Redis(bus) => bus.get(name).await,
        }
    }

    /// Delete a key set with [`Bus::put`].
    pub async fn delete(&self, name: &str) -> Result<(), BusError> {
        match self {
            Bus::Memory(_) => Ok(()),
            Bus::Redis(bus) => bus.delete(name).await,
        }
    }

    /// Whether other nodes can exist: keys and publishes reach them only through Redis.
    pub fn is_shared(&self) -> bool {
        matches!(self, Bus::Redis(_))
    }

    /// Whether messages can be recovered from history: not with the memory bus,
    /// where `since` is therefore ignored.
    pub fn keeps_history(&self) -> bool {
        matches!(self, Bus::Redis(_))
    }

    /// `channel`'s messages after `since`: at most `limit` of them, within `budget` payload
    /// bytes (more = gone). The memory bus keeps none: nothing to replay.
    pub async fn history(
        &self,
        channel: &str,
        since: &Offset,
        limit: usize,
        budget: usize,
    ) -> Result<History, BusError> {
        match self {
            Bus::Memory(_) => Ok(History::Replay(Vec::new())),
            Bus::Redis(bus) => bus.history(channel, since, limit, budget).await,
        }
    }

    /// Apply presence changes in Redis (docs/REFERENCE.md §8); nothing to do on the memory
    /// bus, where the node's own entries are the whole presence.
    pub async fn presence_write(
        &self,
        writes: Vec<ChannelWrite>,
        ttl_ms: u64,
    ) -> Result<WriteOutcome, BusError> {
        match self {
            Bus::Memory(_) => Ok(WriteOutcome::default()),
            Bus::Redis(bus) => bus.presence_write(writes, ttl_ms).await,
        }
    }

    /// `channel`'s presence entries on every node and how many expired ones were pruned; None
    /// on the memory bus (the node's own entries are all there is).
    pub async fn presence_read(
        &self,
        channel: &str,
    ) -> Result<Option<(u64, Vec<ClientInfo>)>, BusError> {
        match self {
            Bus::Memory(_) => Ok(None),
            Bus::Redis(bus) => bus.presence_read(channel).await.map(Some),
        }
    }

    /// Send a `join`/`leave` frame to `channel`'s subscribers on every node.
    pub async fn publish_event(&self, channel: &str, frame: &str) -> Result<(), BusError> {
        match self {
            Bus::Memory(bus) => {
                bus.publish_event(channel, frame);
                Ok(())
            }
            Bus::Redis(bus) => bus.publish_event(channel, frame).await,
        }
    }

    /// Receive the node's control channel (`protocol::CONTROL_CHANNEL`) into `sink`, from now
    /// on and after every reconnect. The memory bus has no other node and no server API to
    /// hear from: nothing arrives.
    pub fn on_control(&self, sink: ControlSink) {
        match self {
            Bus::Memory(_) => {}
            Bus::Redis(bus) => bus.on_control(sink),
        }
    }

    /// Whether the node can do its job: the pub/sub connection is up and every wanted channel
    /// (the control channel included) is live.
    pub fn is_ready(&self) -> bool {
        match self {
            Bus::Memory(_) => true,
            Bus::Redis(bus) => bus.is_ready(),
        }
    }
}
