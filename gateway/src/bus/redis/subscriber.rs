//! The pub/sub connection's life. One task (the *subscriber*) owns the connection and is the
//! only one to send SUBSCRIBE / UNSUBSCRIBE / PING on it, so their order is the order of the
//! hub's changes. A second task (the *reader*) drains the connection's message stream into
//! [`Channels`] promptly: redis-rs buffers that stream without bound, so it never waits on
//! anything but short locks. A third (the *history worker*) reads baselines and catch-ups
//! through the command pool, so those reads never stall the subscriber's PINGs or new
//! subscriptions.
//!
//! Failure handling (docs/REFERENCE.md §4): a connection that errors, ends, or does not answer
//! a SUBSCRIBE, UNSUBSCRIBE or periodic PING within `redis.timeout_ms` is given up, and a new
//! one is used only once Redis has loaded its data. Giving up ends its reader first (dropping
//! the message stream aborts redis-rs's driver, which closes the socket), so a connection
//! declared dead can never deliver again, even if its network path comes back. Then the
//! subscriber reconnects with capped exponential backoff and full jitter and resubscribes every
//! wanted channel in batches; [`Channels`] catches each up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_redis::redis::{self, aio::PubSubSink, aio::PubSubStream};
use futures_util::{FutureExt, StreamExt};
use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::{timeout, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::channels::{Channels, Reads};
use super::commands::Commands;
use super::history::{self, ReadRequest};
use crate::config::RedisConfig;
use crate::metrics::Metrics;

pub struct Subscriber {
    pub client: redis::Client,
    pub config: RedisConfig,
    pub channels: Arc<Channels>,
    pub metrics: Metrics,
    /// The command connections, for history reads.
    pub commands: Arc<Commands>,
    /// `history.max_replay`.
    pub max_replay: usize,
}

/// Why a connection was given up.
#[derive(Debug)]
enum Lost {
    Shutdown,
    /// The reader ended: the connection closed under it.
    Ended,
    Error(String),
}

impl Subscriber {
    fn op_timeout(&self) -> Duration {
        Duration::from_millis(self.config.timeout_ms)
    }

    /// The Redis URL for log lines, without its password.
    fn redacted_url(&self) -> String {
        crate::config::redact_url(self.config.url.as_deref().unwrap_or_default())
    }

    pub async fn run(self, shutdown: CancellationToken) {
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
                    tracing::warn!(redis = %self.redacted_url(), error = %e, attempt, "redis pub/sub connect failed");
                    if backoff(&self.config, &mut attempt, &shutdown)
                        .await
                        .is_err()
                    {
                        return;
                    }
                    continue;
                }
                Err(_) => {
                    tracing::warn!(redis = %self.redacted_url(), attempt, "redis pub/sub connect timed out");
                    if backoff(&self.config, &mut attempt, &shutdown)
                        .await
                        .is_err()
                    {
                        return;
                    }
                    continue;
                }
            };
            // Subscribe only once Redis can serve the history reads that follow: one still
            // loading its data accepts this connection and SUBSCRIBE, and a catch-up would
            // then take its -LOADING for lost history.
            if history::loading(&self.commands, self.op_timeout()).await {
                tracing::warn!(attempt, "redis is still loading its data; waiting");
                if backoff(&self.config, &mut attempt, &shutdown)
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
            if ever_connected {
                self.metrics.redis_reconnects.inc();
            }
            ever_connected = true;
            let conn = self.channels.connected();
            let (sink, stream) = pubsub.split();
            let mut reader = tokio::spawn(read_messages(
                stream,
                conn,
                self.channels.clone(),
                self.metrics.clone(),
                self.config.prefix.clone(),
            ));
            let (reads, jobs) = mpsc::unbounded_channel();
            let worker = tokio::spawn(
                HistoryWorker {
                    conn,
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
            let lost = self.serve(conn, sink, &mut reader, reads, &shutdown).await;
            // End the old connection before anything else: its reader owns the stream whose
            // drop closes the socket, so nothing it still has can reach the hub later.
            if !matches!(lost, Lost::Ended) {
                reader.abort();
                let _ = reader.await;
            }
            worker.abort();
            let _ = worker.await;
            self.channels.lost();
            self.metrics.redis_connected.set(0);
            match lost {
                Lost::Shutdown => return,
                Lost::Ended | Lost::Error(_) => {
                    let e = match lost {
                        Lost::Error(e) => e,
                        _ => "pub/sub stream ended".into(),
                    };
                    tracing::warn!(error = %e, "redis pub/sub connection lost; reconnecting");
                    attempt = 0;
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

    /// Run one connection until it fails or the node shuts down.
    async fn serve(
        &self,
        conn: u64,
        mut sink: PubSubSink,
        reader: &mut tokio::task::JoinHandle<()>,
        reads: mpsc::UnboundedSender<Reads>,
        shutdown: &CancellationToken,
    ) -> Lost {
        let mut ping = tokio::time::interval(Duration::from_millis(self.config.ping_interval_ms));
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ping.reset();
        let mut sweep = tokio::time::interval(Duration::from_millis(
            (self.config.unsubscribe_delay_ms / 4).clamp(10, 250),
        ));
        sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut announced = false;
        loop {
            // Forget what was released while nobody wanted it, then SUBSCRIBE what is wanted
            // and not yet subscribed, in batches.
            if let Err(e) = self.unsubscribe_released(&mut sink).await {
                return e;
            }
            loop {
                let batch = self
                    .channels
                    .take_unsent(conn, self.config.resubscribe_batch);
                if batch.is_empty() {
                    break;
                }
                if let Err(e) = self.subscribe(&mut sink, &batch).await {
                    return e;
                }
                let jobs = self.channels.confirmed(conn, &batch, self.max_replay);
                if !jobs.baselines.is_empty() || !jobs.catch_ups.is_empty() {
                    let _ = reads.send(jobs);
                }
            }
            if !announced {
                announced = true;
                tracing::info!("redis pub/sub connected and subscribed");
            }
            if self.channels.take_ping_wanted() {
                if let Err(e) = self.ping(conn, &mut sink).await {
                    return e;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Lost::Shutdown,
                _ = &mut *reader => return Lost::Ended,
                _ = self.channels.wake.notified() => {}
                _ = sweep.tick() => {}
                _ = ping.tick() => {
                    if let Err(e) = self.ping(conn, &mut sink).await {
                        return e;
                    }
                }
            }
        }
    }

    /// PING the connection: proof that it is alive, and that the baselines read before it
    /// was sent were read while the subscriptions were in place.
    async fn ping(&self, conn: u64, sink: &mut PubSubSink) -> Result<(), Lost> {
        let n = self.channels.ping_sent();
        match timeout(self.op_timeout(), sink.ping::<redis::Value>()).await {
            Ok(Ok(_)) => {
                self.channels.pong(conn, n);
                Ok(())
            }
            Ok(Err(e)) => Err(Lost::Error(format!("ping failed: {e}"))),
            Err(_) => Err(Lost::Error("ping timed out".into())),
        }
    }

    async fn subscribe(&self, sink: &mut PubSubSink, channels: &[String]) -> Result<(), Lost> {
        let keys: Vec<String> = channels
            .iter()
            .map(|c| format!("{}{}", self.config.prefix, c))
            .collect();
        match timeout(self.op_timeout(), sink.subscribe(&keys)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Lost::Error(format!("subscribe failed: {e}"))),
            Err(_) => Err(Lost::Error("subscribe timed out".into())),
        }
    }

    async fn unsubscribe_released(&self, sink: &mut PubSubSink) -> Result<(), Lost> {
        let gone: Vec<String> = self
            .channels
            .due_releases(Instant::now())
            .into_iter()
            .map(|c| format!("{}{}", self.config.prefix, c))
            .collect();
        if gone.is_empty() {
            return Ok(());
        }
        match timeout(self.op_timeout(), sink.unsubscribe(&gone)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Lost::Error(format!("unsubscribe failed: {e}"))),
            Err(_) => Err(Lost::Error("unsubscribe timed out".into())),
        }
    }
}

/// Drain the pub/sub stream of connection `conn` into [`Channels`] until it ends.
async fn read_messages(
    mut stream: PubSubStream,
    conn: u64,
    channels: Arc<Channels>,
    metrics: Metrics,
    prefix: String,
) {
    let on_message = |msg: redis::Msg| {
        let Some(channel) = msg.get_channel_name().strip_prefix(prefix.as_str()) else {
            return;
        };
        metrics.messages_received.inc();
        let (offset, payload) = super::envelope::envelope(msg.get_payload_bytes());
        channels.on_message(conn, channel, offset, payload);
    };
    while let Some(msg) = stream.next().await {
        // Everything Redis already delivered is fanned out under one cork: each socket gets
        // those messages in one write. Bounded, so one batch never holds a socket long.
        let ended = crate::hub::corked(|| {
            on_message(msg);
            for _ in 1..super::CORK_MESSAGES {
                match stream.next().now_or_never() {
                    Some(Some(msg)) => on_message(msg),
                    Some(None) => return true,
                    None => break,
                }
            }
            false
        });
        if ended {
            return;
        }
    }
}

// === impl HistoryWorker ===

/// Reads baselines and catch-ups for one connection, beside the subscriber. Ended (aborted)
/// with its connection; [`Channels`] ignores results for an older connection anyway.
pub(super) struct HistoryWorker {
    pub conn: u64,
    pub channels: Arc<Channels>,
    pub commands: Arc<Commands>,
    pub prefix: String,
    pub op_timeout: Duration,
    pub batch: usize,
    pub max_replay: usize,
}

impl HistoryWorker {
    pub async fn run(self, mut jobs: mpsc::UnboundedReceiver<Reads>) {
        while let Some(Reads {
            baselines,
            catch_ups,
        }) = jobs.recv().await
        {
            // Catch-ups first: sessions wait for them, while baselines only matter at the
            // next reconnect.
            let mut catch_ups = catch_ups;
            while !catch_ups.is_empty() {
                let results = self.read(&catch_ups).await;
                let mut again = Vec::new();
                for (request, result) in catch_ups.iter().zip(results) {
                    again.extend(self.channels.caught_up(
                        self.conn,
                        &request.channel,
                        result,
                        self.max_replay,
                    ));
                }
                catch_ups = again;
            }
            let results = self.read(&baselines).await;
            for (request, result) in baselines.iter().zip(results) {
                self.channels.baseline(self.conn, &request.channel, result);
            }
        }
    }

    /// Read `requests` in pipelines of `redis.resubscribe_batch`, retrying a failed round trip
    /// with a capped backoff (a Redis that does not answer; the subscriber's PING decides
    /// whether the connection is given up, which ends this worker).
    async fn read(&self, requests: &[ReadRequest]) -> Vec<Result<history::Read, String>> {
        let mut results = Vec::with_capacity(requests.len());
        for chunk in requests.chunks(self.batch.max(1)) {
            let mut delay = Duration::from_millis(100);
            loop {
                match history::read(&self.commands, &self.prefix, self.op_timeout, chunk).await {
                    Ok(reads) => {
                        results.extend(reads);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read history; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                }
            }
        }
        results
    }
}

/// Sleep a full-jitter exponential backoff between `redis.backoff_min_ms` and
/// `redis.backoff_max_ms`. Err = shutdown. Sessions that subscribe meanwhile wait in
/// [`Channels`] until their channel is live. Used by both connection owners (this one and
/// the cluster's).
pub(super) async fn backoff(
    config: &RedisConfig,
    attempt: &mut u32,
    shutdown: &CancellationToken,
) -> Result<(), ()> {
    let min = config.backoff_min_ms;
    let cap = min
        .saturating_mul(1 << (*attempt).min(16))
        .min(config.backoff_max_ms);
    let delay = Duration::from_millis(rand::rng().random_range(min.min(cap)..=cap));
    *attempt = attempt.saturating_add(1);
    tokio::select! {
        _ = shutdown.cancelled() => Err(()),
        _ = tokio::time::sleep(delay) => Ok(()),
    }
}
