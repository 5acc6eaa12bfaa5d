//! The Redis bus: one RESP2 pub/sub connection per node, multiplexing every channel that at
//! least one local session wants, and a deadpool-redis pool for publishes and history reads.
//!
//! Catch-up (SPEC §4): the reader remembers the last offset it received per channel. After a
//! reconnect, the subscriber holds those channels (the reader buffers their new messages),
//! resubscribes, replays what each missed from its stream into the hub, then releases the
//! held messages minus the replayed ones. Sessions stay open and miss nothing that has
//! history; a channel whose history is gone just continues live. The buffer lives only for
//! the catch-up, whose reads are each bounded by `redis.timeout_ms` (and skipped once one
//! fails).
//!
//! Messages from the publisher arrive in an envelope (SPEC §5): a NUL byte, the offset
//! `<epoch>:<stream id>`, `\n`, then the payload. The reader splits it and hands the offset to
//! the hub; any other payload (a plain `PUBLISH`, or a malformed envelope) is live-only and has
//! no offset. Payloads starting with NUL are therefore reserved.
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
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use deadpool_redis::redis::{self, aio::PubSubSink, aio::PubSubStream};
use futures_util::StreamExt;
use rand::Rng;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::{BusError, History};
use crate::config::RedisConfig;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::protocol::{self, Offset};

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
        max_replay: usize,
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
            gaps: Arc::new(Mutex::new(Gaps::default())),
            pool: pool.clone(),
            max_replay,
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

    /// Read `channel`'s history after `since` (SPEC §5), in one atomic step: the epoch key
    /// and `XRANGE <since> + COUNT limit+2`. Recoverable only when the epoch is the offset's
    /// and the `since` entry itself is still in the stream: trimming and expiry remove the
    /// oldest entries first, so if it is there, nothing after it is missing. (Comparing with
    /// `XINFO STREAM`'s `max-deleted-entry-id` would need a second round trip and still
    /// cannot tell a trimmed offset from a made-up one.)
    pub async fn history(
        &self,
        channel: &str,
        since: &Offset,
        limit: usize,
    ) -> Result<History, BusError> {
        read_history(
            &self.pool,
            &self.prefix,
            self.timeout,
            channel,
            since,
            limit,
        )
        .await
    }
}

/// See [`RedisBus::history`]; also used by the subscriber to catch up after a reconnect.
async fn read_history(
    pool: &deadpool_redis::Pool,
    prefix: &str,
    op_timeout: Duration,
    channel: &str,
    since: &Offset,
    limit: usize,
) -> Result<History, BusError> {
    let stream = format!("{prefix}{}", crate::protocol::history_key(channel));
    let epoch_key = format!("{stream}:epoch");
    let read = async {
        let mut conn = pool
            .get()
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        redis::pipe()
            .atomic()
            .cmd("GET")
            .arg(&epoch_key)
            .cmd("XRANGE")
            .arg(&stream)
            .arg(since.stream_id())
            .arg("+")
            .arg("COUNT")
            .arg(limit.saturating_add(2))
            .query_async::<(Option<String>, redis::Value)>(&mut conn)
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))
    };
    let (epoch, entries) = match timeout(op_timeout, read).await {
        Ok(result) => result?,
        Err(_) => return Err(BusError::Timeout),
    };
    if epoch.as_deref() != Some(since.epoch.as_str()) {
        return Ok(History::Gone(
            "the channel's history was lost or restarted (epoch changed)",
        ));
    }
    let mut entries = parse_entries(entries)
        .ok_or_else(|| BusError::Unavailable("unexpected XRANGE reply".into()))?
        .into_iter();
    match entries.next() {
        Some((id, _)) if id == since.id => {}
        _ => {
            return Ok(History::Gone(
                "the offset is no longer in the channel's history",
            ))
        }
    }
    let entries: Vec<_> = entries.collect();
    if entries.len() > limit {
        return Ok(History::Gone(
            "more messages were missed than the node replays (history.max_replay)",
        ));
    }
    Ok(History::Replay(
        entries
            .into_iter()
            .map(|((ms, seq), payload)| (format!("{}:{ms}-{seq}", since.epoch), payload))
            .collect(),
    ))
}

/// A stream entry: its id and its payload.
type Entry = ((u64, u64), Vec<u8>);

/// An `XRANGE` reply: `[[id, [field, value, …]], …]` → `(id, value of field "d")`.
fn parse_entries(reply: redis::Value) -> Option<Vec<Entry>> {
    let redis::Value::Array(items) = reply else {
        return matches!(reply, redis::Value::Nil).then(Vec::new);
    };
    items
        .into_iter()
        .map(|item| {
            let redis::Value::Array(mut pair) = item else {
                return None;
            };
            if pair.len() != 2 {
                return None;
            }
            let fields = pair.pop()?;
            let id = match pair.pop()? {
                redis::Value::BulkString(b) => {
                    protocol::parse_stream_id(std::str::from_utf8(&b).ok()?)?
                }
                redis::Value::SimpleString(s) => protocol::parse_stream_id(&s)?,
                _ => return None,
            };
            let redis::Value::Array(fields) = fields else {
                return None;
            };
            let mut payload = Vec::new();
            for kv in fields.chunks(2) {
                if let [redis::Value::BulkString(k), redis::Value::BulkString(v)] = kv {
                    if k == b"d" {
                        payload = v.clone();
                    }
                }
            }
            Some((id, payload))
        })
        .collect()
}

/// Split a pub/sub payload into `(offset, payload)`. The publisher's envelope is a NUL byte,
/// the offset, `\n`, then the payload; anything else (a plain `PUBLISH`, or a malformed
/// envelope) is a live-only payload without an offset.
fn envelope(raw: &[u8]) -> (Option<&str>, &[u8]) {
    let parsed = raw.strip_prefix(b"\0").and_then(|rest| {
        let nl = rest.iter().position(|&b| b == b'\n')?;
        let offset = std::str::from_utf8(&rest[..nl]).ok()?;
        Offset::parse(offset)?;
        Some((Some(offset), &rest[nl + 1..]))
    });
    parsed.unwrap_or((None, raw))
}

/// When a message with this offset was published, as an `Instant`: the stream id's
/// milliseconds are the wall-clock time of the `XADD`. Now, for a clock in the future.
fn published_at(offset: &str) -> Instant {
    let now = Instant::now();
    let Some(ms) = Offset::parse(offset).map(|o| o.id.0) else {
        return now;
    };
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    now.checked_sub(Duration::from_millis(wall.saturating_sub(ms)))
        .unwrap_or(now)
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
    /// Shared with the reader: what to replay after a reconnect.
    gaps: Arc<Mutex<Gaps>>,
    /// The command pool, for reading history after a reconnect.
    pool: deadpool_redis::Pool,
    /// `history.max_replay`.
    max_replay: usize,
}

/// What the node needs to catch up after its pub/sub connection was replaced (SPEC §4:
/// messages published meanwhile are recovered from history where the channel has it).
/// std Mutex, shared by the subscriber and the reader: held for one map operation, never
/// across `.await`.
#[derive(Default)]
struct Gaps {
    /// The last offset received per subscribed channel with history.
    last: HashMap<String, String>,
    /// Channels being caught up: their live messages wait here, in order, until the missed
    /// ones have gone to the hub.
    held: HashMap<String, Vec<Held>>,
}

/// A live message received while its channel was held: its offset (if any) and payload.
type Held = (Option<String>, Vec<u8>);

fn lock_gaps(gaps: &Mutex<Gaps>) -> MutexGuard<'_, Gaps> {
    // Every critical section is one map operation: a poisoned lock still holds a usable map.
    gaps.lock().unwrap_or_else(|e| e.into_inner())
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
                self.gaps.clone(),
            ));
            self.metrics.redis_connected.set(1);
            let lost = self.serve(sink, reader, &shutdown).await;
            // Whatever is still held came from the lost connection: deliver it now, in order.
            let held: Vec<String> = lock_gaps(&self.gaps).held.keys().cloned().collect();
            for channel in held {
                self.release_held(&channel, None);
            }
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
        // Resubscribe everything the hub wants, in batches. Channels with a known last offset
        // are held first, so that their new live messages wait for the missed ones.
        let wanted = self.hub.channels();
        let resume: Vec<(String, String)> = {
            let mut gaps = lock_gaps(&self.gaps);
            // Forget channels nobody wants any more (released while disconnected).
            let still: HashSet<&String> = wanted.iter().collect();
            gaps.last.retain(|c, _| still.contains(c));
            let resume: Vec<_> = wanted
                .iter()
                .filter_map(|c| gaps.last.get(c).map(|o| (c.clone(), o.clone())))
                .collect();
            for (channel, _) in &resume {
                gaps.held.insert(channel.clone(), Vec::new());
            }
            resume
        };
        for batch in wanted.chunks(self.config.resubscribe_batch) {
            if let Err(e) = self.subscribe(&mut sink, batch.to_vec()).await {
                return e;
            }
        }
        self.catch_up(resume).await;
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

    /// Replay into the hub what each resubscribed channel missed while the node was not
    /// subscribed, then release its held live messages (minus those the replay covered). One
    /// history read per channel, in turn; a channel whose history is gone (or unreadable)
    /// just continues live, as it would have without history.
    async fn catch_up(&mut self, resume: Vec<(String, String)>) {
        let mut readable = true;
        for (channel, last) in resume {
            let mut covered = None;
            if let (true, Some(since)) = (readable, Offset::parse(&last)) {
                let prefix = &self.config.prefix;
                let read = read_history(
                    &self.pool,
                    prefix,
                    self.op_timeout(),
                    &channel,
                    &since,
                    self.max_replay,
                );
                match read.await {
                    Ok(History::Replay(entries)) => {
                        for (offset, payload) in &entries {
                            self.metrics.messages_received.inc();
                            self.hub
                                .publish(&channel, payload, Some(offset), published_at(offset));
                        }
                        covered = match entries.last() {
                            Some((offset, _)) => Offset::parse(offset),
                            None => Some(since),
                        };
                    }
                    Ok(History::Gone(why)) => {
                        tracing::warn!(%channel, why, "messages missed while resubscribing are lost");
                    }
                    Err(e) => {
                        // Don't wait a timeout per channel on a Redis that does not answer.
                        tracing::warn!(error = %e, "cannot read history after a reconnect");
                        readable = false;
                    }
                }
            }
            self.release_held(&channel, covered.as_ref());
        }
    }

    /// Stop holding `channel`: hand its held messages to the hub, skipping those at or before
    /// `covered` (already delivered from history). Done under the lock, so that the reader
    /// cannot deliver a newer message of the channel before these (the hub's fan-out is
    /// short and never waits).
    fn release_held(&self, channel: &str, covered: Option<&Offset>) {
        let mut gaps = lock_gaps(&self.gaps);
        if let Some(covered) = covered {
            let last = format!("{}:{}", covered.epoch, covered.stream_id());
            gaps.last.insert(channel.to_owned(), last);
        }
        for (offset, payload) in gaps.held.remove(channel).unwrap_or_default() {
            let parsed = offset.as_deref().and_then(Offset::parse);
            if let (Some(c), Some(o)) = (covered, &parsed) {
                if o.epoch == c.epoch && o.id <= c.id {
                    continue;
                }
            }
            let born = offset.as_deref().map_or_else(Instant::now, published_at);
            self.hub.publish(channel, &payload, offset.as_deref(), born);
            if let Some(offset) = offset {
                gaps.last.insert(channel.to_owned(), offset);
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
                lock_gaps(&self.gaps).last.remove(&channel);
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
async fn read_messages(
    mut stream: PubSubStream,
    hub: Arc<Hub>,
    metrics: Metrics,
    prefix: String,
    gaps: Arc<Mutex<Gaps>>,
) {
    while let Some(msg) = stream.next().await {
        let Some(channel) = msg.get_channel_name().strip_prefix(prefix.as_str()) else {
            continue;
        };
        metrics.messages_received.inc();
        let (offset, payload) = envelope(msg.get_payload_bytes());
        {
            let mut gaps = lock_gaps(&gaps);
            if let Some(held) = gaps.held.get_mut(channel) {
                held.push((offset.map(str::to_owned), payload.to_vec()));
                continue;
            }
            if let Some(offset) = offset {
                match gaps.last.get_mut(channel) {
                    Some(last) => {
                        last.clear();
                        last.push_str(offset);
                    }
                    None => {
                        gaps.last.insert(channel.to_owned(), offset.to_owned());
                    }
                }
            }
        }
        let born = offset.map_or_else(Instant::now, published_at);
        hub.publish(channel, payload, offset, born);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_are_told_from_plain_payloads() {
        assert_eq!(
            envelope(b"\0k3f9:17-0\n{\"a\":1}"),
            (Some("k3f9:17-0"), &b"{\"a\":1}"[..])
        );
        assert_eq!(envelope(b"\0e:1-0\n"), (Some("e:1-0"), &b""[..]));
        assert_eq!(envelope(b"{\"a\":1}"), (None, &b"{\"a\":1}"[..]));
        // Malformed envelopes are plain payloads.
        assert_eq!(envelope(b"\0no newline"), (None, &b"\0no newline"[..]));
        assert_eq!(
            envelope(b"\0bad offset\nx"),
            (None, &b"\0bad offset\nx"[..])
        );
        assert_eq!(envelope(b""), (None, &b""[..]));
    }

    #[test]
    fn publish_time_comes_from_the_stream_id() {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let at = published_at(&format!("e:{}-0", ms - 250));
        let age = at.elapsed();
        assert!(
            age >= Duration::from_millis(240) && age < Duration::from_secs(5),
            "{age:?}"
        );
        assert!(published_at(&format!("e:{}-0", ms + 60_000)).elapsed() < Duration::from_secs(1));
    }
}
