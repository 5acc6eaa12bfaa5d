//! Redis Cluster mode (docs/REFERENCE.md §7): sharded pub/sub through the redis crate's
//! cluster client, which keeps the slot map, routes each SSUBSCRIBE to the shard that owns
//! the channel's slot (its primary), follows `MOVED`, reconnects
//! a node's connection and subscribes it again by itself. The server's confirmations and
//! messages arrive as RESP3 pushes, in order per node, and drive [`Channels`] exactly as the
//! standalone connection does:
//!
//! - an `ssubscribe` confirmation makes a channel live (first subscription) or, for a channel
//!   that was already live or caught up, starts a catch-up from its position (the client
//!   resubscribed it after a reconnect or a failover: messages may have been missed);
//! - a `sunsubscribe` the node did not ask for (its slot moved to another shard) makes the
//!   channel pending: it is SSUBSCRIBEd again, the crate finds the new owner, and the
//!   confirmation catches it up;
//! - a dropped node connection (the push does not say which node) makes every channel pending
//!   and subscribed again, each caught up from its position: exact, if more work than needed.
//!
//! A PING to every node proves the connections alive; one that does not answer within
//! `redis.timeout_ms` (a silent partition) ends the whole cluster client, closing its sockets,
//! and a new one subscribes everything again.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_redis::redis::{
    self,
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
    cluster_read_routing::RandomReplicaStrategy,
    cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo, Slot},
    Msg, ProtocolVersion, PushInfo, PushKind,
};
use tokio::sync::mpsc;
use tokio::time::{timeout, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::channels::{Channels, Reads};
use super::commands::Commands;
use super::subscriber::{backoff, HistoryWorker};
use crate::config::{ReadFrom, RedisConfig};
use crate::metrics::Metrics;

/// How long SSUBSCRIBEs that failed (their shard unreachable) wait before the next attempt.
const RETRY: Duration = Duration::from_millis(250);

pub struct ClusterSubscriber {
    pub config: RedisConfig,
    pub channels: Arc<Channels>,
    pub metrics: Metrics,
    pub commands: Arc<Commands>,
    pub max_replay: usize,
}

/// What a round of SSUBSCRIBEs achieved.
enum Subscribed {
    All,
    /// Some shard did not answer: try again soon.
    SomeFailed,
    /// Some shard answered MOVED and the client did not follow.
    Redirected,
}

/// Why a cluster client was given up.
enum Lost {
    Shutdown,
    Error(String),
}

impl ClusterSubscriber {
    fn op_timeout(&self) -> Duration {
        Duration::from_millis(self.config.timeout_ms)
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let mut attempt: u32 = 0;
        let mut ever_connected = false;
        loop {
            let (pushes_tx, pushes) = mpsc::unbounded_channel::<PushInfo>();
            let builder = ClusterClientBuilder::new(self.config.cluster_nodes.clone())
                .use_protocol(ProtocolVersion::RESP3)
                .push_sender(pushes_tx)
                .connection_timeout(self.op_timeout())
                .response_timeout(self.op_timeout())
                // This client's own retries are short: the subscriber retries, and a PING
                // must answer within `redis.timeout_ms` or the connection is replaced.
                .retries(2)
                .min_retry_wait(10)
                .max_retry_wait(200);
            // SSUBSCRIBE is a read to the crate: with a replica strategy it goes to one of
            // the slot's replicas (the primary while the shard has none), and so do the
            // crate's own resubscriptions after a reconnect.
            let builder = match self.config.read_from {
                ReadFrom::Primary => builder,
                ReadFrom::Replica => builder.read_routing_strategy(RandomReplicaStrategy),
            };
            let connected = match builder.build() {
                Ok(client) => tokio::select! {
                    _ = shutdown.cancelled() => return,
                    c = timeout(self.op_timeout(), client.get_async_connection()) => {
                        c.map_err(|_| "timed out".to_owned()).and_then(|c| c.map_err(|e| e.to_string()))
                    }
                },
                Err(e) => Err(e.to_string()),
            };
            let conn = match connected {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "redis cluster connect failed");
                    if backoff(&self.config, &mut attempt, &shutdown)
                        .await
                        .is_err()
                    {
                        return;
                    }
                    continue;
                }
            };
            // Connect to every node before subscribing (the crate connects lazily after its
            // slot map; a PING to all nodes makes every connection now).
            let mut all = conn.clone();
            let every_node = RoutingInfo::MultiNode((
                MultipleNodeRoutingInfo::AllNodes,
                Some(ResponsePolicy::AllSucceeded),
            ));
            let _ = timeout(
                self.op_timeout(),
                all.route_command(redis::cmd("PING"), every_node),
            )
            .await;
            if ever_connected {
                self.metrics.redis_reconnects.inc();
                self.count_resubscribes("reconnect", self.channels.len());
            }
            ever_connected = true;
            attempt = 0;
            let gen = self.channels.connected();
            let (reads, jobs) = mpsc::unbounded_channel();
            let mut reader = tokio::spawn(read_pushes(
                pushes,
                gen,
                self.channels.clone(),
                self.metrics.clone(),
                self.config.prefix.clone(),
                self.max_replay,
                reads.clone(),
            ));
            let worker = tokio::spawn(
                HistoryWorker {
                    conn: gen,
                    channels: self.channels.clone(),
                    commands: self.commands.clone(),
                    prefix: self.config.prefix.clone(),
                    op_timeout: self.op_timeout(),
                    batch: self.config.resubscribe_batch,
                    max_replay: self.max_replay,
                }
                .run(jobs),
            );
            self.metrics.redis_connected.set(1);
            let lost = self.serve(gen, conn, &mut reader, &shutdown).await;
            drop(reads);
            // The connection (and with it every node socket) is gone once its last handle
            // is: the reader holds none, but must not deliver anything later.
            reader.abort();
            let _ = reader.await;
            worker.abort();
            let _ = worker.await;
            self.channels.lost();
            self.metrics.redis_connected.set(0);
            self.metrics.redis_shards.set(0);
            match lost {
                Lost::Shutdown => return,
                Lost::Error(e) => {
                    tracing::warn!(error = %e, "redis cluster connection lost; reconnecting");
                    if backoff(&self.config, &mut attempt, &shutdown)
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    }

    fn count_resubscribes(&self, reason: &str, n: usize) {
        if n > 0 {
            self.metrics
                .redis_resubscribes
                .with_label_values(&[reason])
                .inc_by(n as u64);
        }
    }

    async fn serve(
        &self,
        gen: u64,
        conn: ClusterConnection,
        reader: &mut tokio::task::JoinHandle<()>,
        shutdown: &CancellationToken,
    ) -> Lost {
        let mut ping = tokio::time::interval(Duration::from_millis(self.config.ping_interval_ms));
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut sweep = tokio::time::interval(Duration::from_millis(
            (self.config.unsubscribe_delay_ms / 4).clamp(10, 250),
        ));
        sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Consecutive PING rounds in which the servers held fewer subscriptions than confirmed.
        let mut short = 0;
        loop {
            self.unsubscribe_released(&conn).await;
            let failed = match self.subscribe_unsent(gen, &conn).await {
                Subscribed::All => false,
                Subscribed::SomeFailed => true,
                // The client keeps sending to a shard that no longer owns the slot (after a
                // failover it can hold on to a stale slot map): start afresh from the seeds.
                Subscribed::Redirected => {
                    tokio::time::sleep(RETRY).await;
                    return Lost::Error("the cluster client's slot map is out of date".into());
                }
            };
            if self.channels.take_ping_wanted() {
                if let Err(e) = self.ping(gen, &conn, &mut short).await {
                    return e;
                }
            }
            let retry = async {
                if failed {
                    tokio::time::sleep(RETRY).await
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return Lost::Shutdown,
                _ = &mut *reader => return Lost::Error("the cluster client's pushes ended".into()),
                _ = self.channels.wake.notified() => {}
                _ = sweep.tick() => {}
                _ = retry => {}
                _ = ping.tick() => {
                    if let Err(e) = self.ping(gen, &conn, &mut short).await {
                        return e;
                    }
                }
            }
        }
    }

    /// SSUBSCRIBE every channel not yet subscribed, one command per slot, concurrently.
    /// Confirmations arrive as pushes; the failed are tried again later.
    async fn subscribe_unsent(&self, gen: u64, conn: &ClusterConnection) -> Subscribed {
        let mut failed = Vec::new();
        let mut redirected = false;
        loop {
            let batch = self
                .channels
                .take_unsent(gen, self.config.resubscribe_batch);
            if batch.is_empty() {
                break;
            }
            let mut by_slot: HashMap<Slot, Vec<String>> = HashMap::new();
            for channel in batch {
                let key = format!("{}{}", self.config.prefix, channel);
                by_slot
                    .entry(Slot::for_key(&key))
                    .or_default()
                    .push(channel);
            }
            let calls = by_slot.into_values().map(|channels| {
                let mut conn = conn.clone();
                let keys: Vec<String> = channels
                    .iter()
                    .map(|c| format!("{}{}", self.config.prefix, c))
                    .collect();
                let op_timeout = self.op_timeout();
                async move {
                    match timeout(op_timeout, conn.ssubscribe(&keys)).await {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some((channels, e.redirect_node().is_some(), e.to_string())),
                        Err(_) => Some((channels, false, "timed out".to_owned())),
                    }
                }
            });
            for (channels, moved, error) in futures_util::future::join_all(calls)
                .await
                .into_iter()
                .flatten()
            {
                tracing::debug!(%error, channels = channels.len(), "SSUBSCRIBE failed; will retry");
                redirected |= moved;
                failed.extend(channels);
            }
        }
        self.channels.unsent_again(gen, &failed);
        match (redirected, failed.is_empty()) {
            (true, _) => Subscribed::Redirected,
            (false, true) => Subscribed::All,
            (false, false) => Subscribed::SomeFailed,
        }
    }

    async fn unsubscribe_released(&self, conn: &ClusterConnection) {
        let gone = self.channels.due_releases(Instant::now());
        let mut by_slot: HashMap<Slot, Vec<String>> = HashMap::new();
        for channel in gone {
            let key = format!("{}{}", self.config.prefix, channel);
            by_slot.entry(Slot::for_key(&key)).or_default().push(key);
        }
        let calls = by_slot.into_values().map(|keys| {
            let mut conn = conn.clone();
            let op_timeout = self.op_timeout();
            async move {
                // A failure leaves a subscription nobody reads; it ends with its connection.
                let _ = timeout(op_timeout, conn.sunsubscribe(&keys)).await;
            }
        });
        futures_util::future::join_all(calls).await;
    }

    /// PING every node: proof the connections are alive, and that baselines read before it
    /// were read while the subscriptions were in place. A node that refuses (it is down, its
    /// replica being promoted) is the cluster client's to handle; one that does not answer at
    /// all ends this client.
    async fn ping(&self, gen: u64, conn: &ClusterConnection, short: &mut u32) -> Result<(), Lost> {
        let n = self.channels.ping_sent();
        let mut conn = conn.clone();
        let routing = RoutingInfo::MultiNode((
            MultipleNodeRoutingInfo::AllNodes,
            Some(ResponsePolicy::AllSucceeded),
        ));
        match timeout(
            self.op_timeout(),
            conn.route_command(redis::cmd("PING"), routing),
        )
        .await
        {
            Ok(Ok(_)) => {
                self.channels.pong(gen, n);
                self.metrics.redis_shards.set(shards(&mut conn).await);
                self.audit(&mut conn, short).await
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "a redis cluster node does not answer PING");
                self.metrics
                    .redis_shards
                    .set(shards(&mut conn).await.saturating_sub(1));
                Ok(())
            }
            Err(_) => Err(Lost::Error("ping timed out".into())),
        }
    }
}

impl ClusterSubscriber {
    /// Compare the subscriptions the servers hold for this client with the channels confirmed.
    /// The cluster client can replace a node's connection (its recovery after a node is lost
    /// reconnects from the seeds) and fail to subscribe the new one again, without a push to
    /// say so: those channels would look live and receive nothing. Fewer held than confirmed
    /// in two rounds in a row (one round can catch a slot move in flight) ends this client;
    /// the next one subscribes everything and catches it up.
    async fn audit(&self, conn: &mut ClusterConnection, short: &mut u32) -> Result<(), Lost> {
        let confirmed = self.channels.subscribed();
        if confirmed == 0 {
            *short = 0;
            return Ok(());
        }
        let Some(held) = held_subscriptions(conn).await else {
            return Ok(());
        };
        if held >= confirmed {
            *short = 0;
            return Ok(());
        }
        *short += 1;
        if *short < 2 {
            return Ok(());
        }
        tracing::warn!(
            held,
            confirmed,
            "redis cluster nodes hold fewer subscriptions than confirmed; subscribing afresh"
        );
        Err(Lost::Error("shard subscriptions lost".into()))
    }
}

/// The shard channels this client's connections hold, summed over every node's `CLIENT INFO`
/// (`ssub=`); `None` when some node does not answer.
async fn held_subscriptions(conn: &mut ClusterConnection) -> Option<usize> {
    let every_node = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllNodes, None));
    let reply = conn
        .route_command(redis::cmd("CLIENT").arg("INFO").clone(), every_node)
        .await
        .ok()?;
    let redis::Value::Map(answers) = reply else {
        return None;
    };
    let mut held = 0;
    for (_, answer) in answers {
        let text = match answer {
            redis::Value::BulkString(b) => String::from_utf8(b).ok()?,
            redis::Value::VerbatimString { text, .. } => text,
            redis::Value::SimpleString(s) => s,
            _ => return None,
        };
        held += text
            .split_ascii_whitespace()
            .find_map(|field| field.strip_prefix("ssub="))
            .and_then(|n| n.parse::<usize>().ok())?;
    }
    Some(held)
}

/// The number of shards (distinct slot owners) in the cluster client's view, from
/// `CLUSTER SLOTS`; 0 when that cannot be read.
async fn shards(conn: &mut ClusterConnection) -> i64 {
    let reply = conn
        .route_command(
            redis::cmd("CLUSTER").arg("SLOTS").clone(),
            RoutingInfo::SingleNode(redis::cluster_routing::SingleNodeRoutingInfo::Random),
        )
        .await;
    let Ok(redis::Value::Array(ranges)) = reply else {
        return 0;
    };
    let owners: HashSet<String> = ranges
        .iter()
        .filter_map(|range| match range {
            redis::Value::Array(fields) => match fields.get(2) {
                Some(redis::Value::Array(owner)) => owner.get(2).map(|id| format!("{id:?}")),
                _ => None,
            },
            _ => None,
        })
        .collect();
    owners.len() as i64
}

/// Drain the cluster client's pushes into [`Channels`] until the client is gone.
async fn read_pushes(
    mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    gen: u64,
    channels: Arc<Channels>,
    metrics: Metrics,
    prefix: String,
    max_replay: usize,
    reads: mpsc::UnboundedSender<Reads>,
) {
    let name = |data: &[redis::Value]| -> Option<String> {
        match data.first()? {
            redis::Value::BulkString(b) => std::str::from_utf8(b)
                .ok()?
                .strip_prefix(prefix.as_str())
                .map(str::to_owned),
            _ => None,
        }
    };
    let handle = |push: PushInfo| match push.kind {
        PushKind::SMessage => {
            let Some(msg) = Msg::from_push_info(push) else {
                return;
            };
            let Some(channel) = msg.get_channel_name().strip_prefix(prefix.as_str()) else {
                return;
            };
            metrics.messages_received.inc();
            let (offset, payload) = super::envelope::envelope(msg.get_payload_bytes());
            channels.on_message(gen, channel, offset, payload);
        }
        PushKind::SSubscribe => {
            let Some(channel) = name(&push.data) else {
                return;
            };
            let jobs = channels.on_subscribed(gen, &channel, max_replay);
            if !jobs.catch_ups.is_empty() || !jobs.baselines.is_empty() {
                let _ = reads.send(jobs);
            }
        }
        PushKind::SUnsubscribe => {
            let Some(channel) = name(&push.data) else {
                return;
            };
            if channels.moved(gen, &channel) {
                metrics
                    .redis_resubscribes
                    .with_label_values(&["moved"])
                    .inc();
                channels.wake.notify_one();
            }
        }
        PushKind::Disconnection => {
            let n = channels.len();
            channels.suspect_all(gen);
            if n > 0 {
                metrics
                    .redis_resubscribes
                    .with_label_values(&["failover"])
                    .inc_by(n as u64);
            }
            channels.wake.notify_one();
        }
        _ => {}
    };
    while let Some(push) = pushes.recv().await {
        // As the standalone reader does: what the client already delivered is fanned out
        // under one cork, so each socket gets those messages in one write.
        crate::hub::corked(|| {
            handle(push);
            for _ in 1..super::CORK_MESSAGES {
                match pushes.try_recv() {
                    Ok(push) => handle(push),
                    Err(_) => break,
                }
            }
        });
    }
}
