//! The Redis bus: one RESP2 pub/sub connection per node, multiplexing every channel that at
//! least one local session wants, and a deadpool-redis pool for publishes and history reads.
//!
//! - [`channels`]: each wanted channel's phase (pending, catching up, live) and its position in
//!   the channel's history; the rules that make a resubscribe lose and repeat nothing.
//! - [`subscriber`]: the pub/sub connection's life (SUBSCRIBE / delayed UNSUBSCRIBE, PING
//!   liveness, reconnect with backoff, resubscribe) and its reader; history reads run beside
//!   it, so they never stall its PINGs or new subscriptions.
//! - [`history`]: the history read script and what a read means (replay or `history_gone`).
//! - [`presence`]: presence keys and scripts (shared with the publisher's server API), and
//!   the presence events published on a channel.
//!
//! Messages from the publisher arrive in an envelope (docs/REFERENCE.md §5): a NUL
//! byte, the offset `<epoch>:<stream id>`, `\n`, then the payload. The reader splits it and hands
//! the offset on; any other payload (a plain `PUBLISH`, or a malformed envelope) is live-only
//! and has no offset. Payloads starting with NUL are therefore reserved.

mod channels;
mod cluster;
mod commands;
mod envelope;
mod history;
pub mod presence;
mod subscriber;

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_redis::redis;
use tokio::sync::oneshot;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use super::{BusError, History, Live};
use crate::config::RedisConfig;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::protocol::Offset;
use channels::Channels;
pub use channels::ControlSink;
use commands::Commands;
use history::{Outcome, Position, ReadRequest};

/// At most this many messages a reader already holds are fanned out under one cork
/// (`hub::corked`), by the standalone reader and the cluster reader alike.
const CORK_MESSAGES: usize = 64;

pub struct RedisBus {
    channels: Arc<Channels>,
    commands: Arc<Commands>,
    prefix: String,
    timeout: Duration,
    unsubscribe_delay: Duration,
}

impl RedisBus {
    pub fn start(
        config: &RedisConfig,
        max_replay: usize,
        hub: Arc<Hub>,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Arc<RedisBus> {
        let op_timeout = Duration::from_millis(config.timeout_ms);
        let commands = Arc::new(Commands::new(config));
        let channels = Arc::new(Channels::new(hub, metrics.clone(), max_replay));
        if config.is_cluster() {
            let subscriber = cluster::ClusterSubscriber {
                config: config.clone(),
                channels: channels.clone(),
                metrics,
                commands: commands.clone(),
                max_replay,
            };
            tokio::spawn(subscriber.run(shutdown));
        } else {
            let url = config.url.clone().unwrap_or_default();
            let subscriber = subscriber::Subscriber {
                client: redis::Client::open(url).expect("redis.url was validated"),
                config: config.clone(),
                channels: channels.clone(),
                metrics,
                commands: commands.clone(),
                max_replay,
            };
            tokio::spawn(subscriber.run(shutdown));
        }
        Arc::new(RedisBus {
            channels,
            commands,
            prefix: config.prefix.clone(),
            timeout: op_timeout,
            unsubscribe_delay: Duration::from_millis(config.unsubscribe_delay_ms),
        })
    }

    pub fn want(&self, channel: &Arc<str>) {
        self.channels.want(channel);
    }

    pub fn release(&self, channel: &str) {
        self.channels
            .release(channel, Instant::now() + self.unsubscribe_delay);
    }

    pub fn live(&self, channel: &str) -> Option<oneshot::Receiver<Live>> {
        self.channels.live(channel)
    }

    pub fn is_ready(&self) -> bool {
        self.channels.is_ready()
    }

    /// Subscribe the node's control channel for good and hand its payloads to `sink`.
    pub fn on_control(&self, sink: channels::ControlSink) {
        self.channels.on_control(sink);
        self.channels.want(&crate::protocol::CONTROL_CHANNEL.into());
    }

    pub async fn publish(&self, channel: &str, payload: &[u8]) -> Result<(), BusError> {
        let key = format!("{}{}", self.prefix, channel);
        match timeout(self.timeout, self.commands.publish(&key, payload)).await {
            Ok(result) => result,
            Err(_) => Err(BusError::Timeout),
        }
        .inspect_err(|e| tracing::debug!(error = %e, "publish failed"))
    }

    /// Set expiring keys (`<prefix>` + each name), bounded by `redis.timeout_ms`.
    pub async fn put(&self, entries: &[(String, String)], ttl: Duration) -> Result<(), BusError> {
        let entries: Vec<(String, String)> = entries
            .iter()
            .map(|(name, value)| (format!("{}{name}", self.prefix), value.clone()))
            .collect();
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        match timeout(self.timeout, self.commands.set_px(&entries, ttl_ms)).await {
            Ok(result) => result,
            Err(_) => Err(BusError::Timeout),
        }
    }

    /// The value of the key `<prefix><name>`, bounded by `redis.timeout_ms`.
    pub async fn get(&self, name: &str) -> Result<Option<String>, BusError> {
        let key = format!("{}{name}", self.prefix);
        match timeout(self.timeout, self.commands.get(&key)).await {
            Ok(result) => result,
            Err(_) => Err(BusError::Timeout),
        }
    }

    /// Delete the key `<prefix><name>`, bounded by `redis.timeout_ms`.
    pub async fn delete(&self, name: &str) -> Result<(), BusError> {
        let key = format!("{}{name}", self.prefix);
        match timeout(self.timeout, self.commands.del(&key)).await {
            Ok(result) => result,
            Err(_) => Err(BusError::Timeout),
        }
    }

    /// `channel`'s history after `since`: at most `limit` entries within `budget` payload
    /// bytes, else gone (see [`history`]).
    pub async fn history(
        &self,
        channel: &str,
        since: &Offset,
        limit: usize,
        budget: usize,
    ) -> Result<History, BusError> {
        let request = ReadRequest {
            channel: channel.to_owned(),
            from: Position::at(since.clone()),
            limit,
            budget,
        };
        let mut reads =
            history::read(&self.commands, &self.prefix, self.timeout, &[request]).await?;
        Ok(match reads.pop() {
            Some(Ok(read)) => match read.outcome {
                Outcome::Replay(entries) => History::Replay(entries),
                Outcome::Gone(why) => History::Gone(why),
            },
            Some(Err(e)) => History::Gone(format!("the channel's history cannot be read: {e}")),
            None => History::Gone("the channel's history cannot be read".into()),
        })
    }
}
