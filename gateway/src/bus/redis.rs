//! The Redis bus: one RESP2 pub/sub connection per node, multiplexing every channel that at
//! least one local session wants, and a deadpool-redis pool for publishes.
//!
//! One task (the *subscriber*) owns the pub/sub connection and is the only one to send
//! SUBSCRIBE / UNSUBSCRIBE, so their order is the order of the hub's changes. A second task
//! (the *reader*) drains the connection's message stream into the hub promptly: redis-rs
//! buffers that stream without bound, so it must never wait on anything but the hub's short
//! locks.
//!
//! Failure handling (SPEC §4): a connection that errors, ends, or does not answer a periodic
//! PING within `redis.timeout_ms` is dropped; the subscriber reconnects with capped
//! exponential backoff and full jitter, then resubscribes every channel the hub still has
//! (asked from the hub, in batches). `gateway_redis_connected` and `/readyz` follow it. When
//! the last local subscriber leaves, the UNSUBSCRIBE waits `redis.unsubscribe_delay_ms` and
//! happens only if nobody subscribed again meanwhile.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_redis::redis::{self, aio::PubSubSink, aio::PubSubStream};
use futures_util::StreamExt;
use rand::Rng;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::BusError;
use crate::config::RedisConfig;
use crate::hub::Hub;
use crate::metrics::Metrics;

/// Requests from sessions to the subscriber task. The queue is unbounded but is drained in
/// every state of the task (also while disconnected), and each entry stands for a change of
/// the hub (a channel's first subscriber or last one gone), so it cannot grow faster than
/// sessions subscribe.
enum Command {
    Want(String, oneshot::Sender<()>),
    Release(String),
}

pub struct RedisBus {
    commands: mpsc::UnboundedSender<Command>,
    pool: deadpool_redis::Pool,
    prefix: String,
    timeout: Duration,
    /// Set by the subscriber task once connected and resubscribed; read by `/readyz`.
    ready: Arc<AtomicBool>,
}

impl RedisBus {
    pub fn start(
        config: &RedisConfig,
        hub: Arc<Hub>,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Arc<RedisBus> {
        let url = config.url.clone().unwrap_or_default();
        let op_timeout = Duration::from_millis(config.timeout_ms);
        let mut pool_config = deadpool_redis::Config::from_url(url.clone());
        let mut pool_settings = deadpool_redis::PoolConfig::new(config.pool_size);
        pool_settings.timeouts = deadpool_redis::Timeouts {
            wait: Some(op_timeout),
            create: Some(op_timeout),
            recycle: Some(op_timeout),
        };
        pool_config.pool = Some(pool_settings);
        let pool = pool_config
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .expect("redis.url was validated");
        let (commands, rx) = mpsc::unbounded_channel();
        let ready = Arc::new(AtomicBool::new(false));
        let subscriber = Subscriber {
            client: redis::Client::open(url).expect("redis.url was validated"),
            config: config.clone(),
            hub,
            metrics,
            ready: ready.clone(),
            commands: rx,
            subscribed: HashSet::new(),
            releases: HashMap::new(),
        };
        tokio::spawn(subscriber.run(shutdown));
        Arc::new(RedisBus {
            commands,
            pool,
            prefix: config.prefix.clone(),
            timeout: op_timeout,
            ready,
        })
    }

    pub fn want(&self, channel: &str) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        // A send error means the subscriber task is gone (shutdown): the dropped sender
        // completes the receiver with an error, which callers treat as "don't wait".
        let _ = self.commands.send(Command::Want(channel.to_owned(), tx));
        rx
    }

    pub fn release(&self, channel: &str) {
        let _ = self.commands.send(Command::Release(channel.to_owned()));
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub async fn publish(&self, channel: &str, payload: &[u8]) -> Result<(), BusError> {
        let key = format!("{}{}", self.prefix, channel);
        let publish = async {
            let mut conn = self
                .pool
                .get()
                .await
                .map_err(|e| BusError::Unavailable(e.to_string()))?;
            redis::cmd("PUBLISH")
                .arg(key)
                .arg(payload)
                .query_async::<i64>(&mut conn)
                .await
                .map_err(|e| BusError::Unavailable(e.to_string()))
        };
        match timeout(self.timeout, publish).await {
            Ok(Ok(_receivers)) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(BusError::Timeout),
        }
        .inspect_err(|e| tracing::debug!(error = %e, "publish failed"))
    }
}

// === impl Subscriber ===

struct Subscriber {
    client: redis::Client,
    config: RedisConfig,
    hub: Arc<Hub>,
    metrics: Metrics,
    ready: Arc<AtomicBool>,
    commands: mpsc::UnboundedReceiver<Command>,
    /// Channels (without prefix) SUBSCRIBEd on the current connection.
    subscribed: HashSet<String>,
    /// Channels whose last local subscriber left, with when to UNSUBSCRIBE them.
    releases: HashMap<String, Instant>,
}

/// Why a connection was given up.
#[derive(Debug)]
enum Lost {
    Shutdown,
    Error(String),
}

impl Subscriber {
    fn op_timeout(&self) -> Duration {
        Duration::from_millis(self.config.timeout_ms)
    }

    async fn run(mut self, shutdown: CancellationToken) {
        let mut attempt: u32 = 0;
        let mut ever_connected = false;
        loop {
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = timeout(self.op_timeout(), self.client.get_async_pubsub()) => c,
            };
            let pubsub = match connected {
                Ok(Ok(pubsub)) => pubsub,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, attempt, "redis pub/sub connect failed");
                    if self.backoff(&mut attempt, &shutdown).await.is_err() {
                        return;
                    }
                    continue;
                }
                Err(_) => {
                    tracing::warn!(attempt, "redis pub/sub connect timed out");
                    if self.backoff(&mut attempt, &shutdown).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            if ever_connected {
                self.metrics.redis_reconnects.inc();
            }
            ever_connected = true;
            let (sink, stream) = pubsub.split();
            let reader = tokio::spawn(read_messages(
                stream,
                self.hub.clone(),
                self.metrics.clone(),
                self.config.prefix.clone(),
            ));
            self.metrics.redis_connected.set(1);
            let lost = self.serve(sink, reader, &shutdown).await;
            self.ready.store(false, Ordering::Relaxed);
            self.metrics.redis_connected.set(0);
            self.subscribed.clear();
            self.metrics.channels.set(0);
            match lost {
                Lost::Shutdown => return,
                Lost::Error(e) => {
                    tracing::warn!(error = %e, "redis pub/sub connection lost; reconnecting");
                    attempt = 0;
                    if self.backoff(&mut attempt, &shutdown).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Sleep a full-jitter exponential backoff, answering commands meanwhile (nothing to do
    /// for them while disconnected: the resubscription after the reconnect covers them).
    /// Err = shutdown.
    async fn backoff(&mut self, attempt: &mut u32, shutdown: &CancellationToken) -> Result<(), ()> {
        let min = self.config.backoff_min_ms;
        let cap = min
            .saturating_mul(1 << (*attempt).min(16))
            .min(self.config.backoff_max_ms);
        let delay = Duration::from_millis(rand::rng().random_range(min.min(cap)..=cap));
        *attempt = attempt.saturating_add(1);
        let deadline = tokio::time::Instant::now() + delay;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Err(()),
                _ = tokio::time::sleep_until(deadline) => return Ok(()),
                cmd = self.commands.recv() => match cmd {
                    // Dropping the ack sender releases the waiting session at once.
                    Some(Command::Want(..)) | Some(Command::Release(_)) => {}
                    None => return Err(()),
                },
            }
        }
    }

    /// Run one connection until it fails or the node shuts down.
    async fn serve(
        &mut self,
        mut sink: PubSubSink,
        mut reader: tokio::task::JoinHandle<()>,
        shutdown: &CancellationToken,
    ) -> Lost {
        // Resubscribe everything the hub wants, in batches.
        let wanted = self.hub.channels();
        for batch in wanted.chunks(self.config.resubscribe_batch) {
            if let Err(e) = self.subscribe(&mut sink, batch.to_vec()).await {
                return e;
            }
        }
        self.ready.store(true, Ordering::Relaxed);
        if !wanted.is_empty() {
            tracing::info!(channels = wanted.len(), "redis pub/sub subscribed");
        }

        let mut ping = tokio::time::interval(Duration::from_millis(self.config.ping_interval_ms));
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ping.reset();
        let mut sweep = tokio::time::interval(Duration::from_millis(
            (self.config.unsubscribe_delay_ms / 4).clamp(10, 250),
        ));
        sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    reader.abort();
                    return Lost::Shutdown;
                }
                _ = &mut reader => return Lost::Error("pub/sub stream ended".into()),
                cmd = self.commands.recv() => {
                    let Some(cmd) = cmd else { return Lost::Shutdown };
                    let mut wants = Vec::new();
                    let mut acks = Vec::new();
                    let mut next = Some(cmd);
                    // Take everything already queued so a burst becomes one SUBSCRIBE.
                    while let Some(cmd) = next {
                        match cmd {
                            Command::Want(channel, ack) => {
                                self.releases.remove(&channel);
                                if !self.subscribed.contains(&channel) {
                                    wants.push(channel);
                                }
                                acks.push(ack);
                            }
                            Command::Release(channel) => {
                                let at = Instant::now() + Duration::from_millis(self.config.unsubscribe_delay_ms);
                                self.releases.insert(channel, at);
                            }
                        }
                        next = self.commands.try_recv().ok();
                    }
                    wants.sort_unstable();
                    wants.dedup();
                    if !wants.is_empty() {
                        if let Err(e) = self.subscribe(&mut sink, wants).await {
                            return e;
                        }
                    }
                    for ack in acks {
                        let _ = ack.send(());
                    }
                }
                _ = sweep.tick() => {
                    if let Err(e) = self.unsubscribe_released(&mut sink).await {
                        return e;
                    }
                }
                _ = ping.tick() => {
                    match timeout(self.op_timeout(), sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Lost::Error(format!("ping failed: {e}")),
                        Err(_) => return Lost::Error("ping timed out".into()),
                    }
                }
            }
        }
    }

    async fn subscribe(
        &mut self,
        sink: &mut PubSubSink,
        channels: Vec<String>,
    ) -> Result<(), Lost> {
        let keys: Vec<String> = channels
            .iter()
            .map(|c| format!("{}{}", self.config.prefix, c))
            .collect();
        match timeout(self.op_timeout(), sink.subscribe(&keys)).await {
            Ok(Ok(())) => {
                self.subscribed.extend(channels);
                self.metrics.channels.set(self.subscribed.len() as i64);
                Ok(())
            }
            Ok(Err(e)) => Err(Lost::Error(format!("subscribe failed: {e}"))),
            Err(_) => Err(Lost::Error("subscribe timed out".into())),
        }
    }

    async fn unsubscribe_released(&mut self, sink: &mut PubSubSink) -> Result<(), Lost> {
        let now = Instant::now();
        let due: Vec<String> = self
            .releases
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(c, _)| c.clone())
            .collect();
        let mut gone = Vec::new();
        for channel in due {
            self.releases.remove(&channel);
            // Someone may have subscribed again during the delay.
            if !self.hub.has_subscribers(&channel) && self.subscribed.remove(&channel) {
                gone.push(format!("{}{}", self.config.prefix, channel));
            }
        }
        if gone.is_empty() {
            return Ok(());
        }
        self.metrics.channels.set(self.subscribed.len() as i64);
        match timeout(self.op_timeout(), sink.unsubscribe(&gone)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Lost::Error(format!("unsubscribe failed: {e}"))),
            Err(_) => Err(Lost::Error("unsubscribe timed out".into())),
        }
    }
}

/// Drain the pub/sub stream into the hub until the connection ends.
async fn read_messages(mut stream: PubSubStream, hub: Arc<Hub>, metrics: Metrics, prefix: String) {
    while let Some(msg) = stream.next().await {
        let Some(channel) = msg.get_channel_name().strip_prefix(prefix.as_str()) else {
            continue;
        };
        metrics.messages_received.inc();
        hub.publish(channel, msg.get_payload_bytes(), None, Instant::now());
    }
}
