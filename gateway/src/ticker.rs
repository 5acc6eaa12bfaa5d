//! Ticks: `{"time":"2026-11-27T13:01:10.000Z","unix_ms":1795784470000,"seq":42}` on `ticks`
//! every interval (docs/REFERENCE.md §3).
//!
//! Ticks fall on *slots*, the multiples of the interval since the Unix epoch. Each wait is
//! computed afresh from the wall clock to the next slot boundary, so the schedule never drifts
//! by the time spent publishing, and a slot that has passed entirely (the process was paused)
//! is skipped rather than published late in a burst. `time` and `unix_ms` are the slot's time,
//! not the moment the message happened to leave, so every ticker agrees on what a slot is.
//!
//! Two ways to tick:
//!
//! - [`LeasedTicker`], on a Redis: only while holding the tick lease, and only slots it claims
//!   ([`crate::lease`]). The publisher ticks this way, and so does a node with `ticks = true`
//!   and a `redis.url`, in the same lease: one ticker per deployment, whoever holds it.
//! - [`run_alone`], on the memory bus: the node is the whole deployment, so it just ticks.

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::bus::Bus;
use crate::config::{redact_url, Config, RedisConfig};
use crate::lease::{self, is_leader, Leadership, LeaseError, LeaseRedis};

/// The channel a node's ticks go to.
pub const CHANNEL: &str = "ticks";

/// The tick message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tick {
    pub time: String,
    pub unix_ms: u64,
    pub seq: u64,
}

impl Tick {
    /// The tick of the slot at `unix_ms`.
    pub fn at(unix_ms: u64, seq: u64) -> Tick {
        Tick {
            time: humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(unix_ms))
                .to_string(),
            unix_ms,
            seq,
        }
    }

    /// The payload subscribers receive.
    pub fn to_json(&self) -> String {
        // Serializing three plain fields cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The first slot boundary strictly after `now_ms`.
pub fn next_slot(now_ms: u64, interval_ms: u64) -> u64 {
    (now_ms / interval_ms + 1) * interval_ms
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Where a [`LeasedTicker`]'s ticks go: the publisher (with history), or a node's bus.
pub trait TickSink: Send + Sync {
    /// Publish one tick; the error says why not (for the log).
    fn publish(&self, tick: &Tick) -> impl Future<Output = Result<(), String>> + Send;
}

/// The tick loop of a process in the tick lease.
pub struct LeasedTicker<R, S> {
    redis: R,
    sink: S,
    interval_ms: u64,
    /// Claims outlive the slot by several intervals and by more than a lease handover, so a
    /// process that takes over late (or runs a little behind in wall-clock time) still sees
    /// that a slot was already published.
    claim_ttl_ms: u64,
    id: String,
}

// === impl LeasedTicker ===

impl<R: LeaseRedis, S: TickSink> LeasedTicker<R, S> {
    /// `id` is the process's lease id (claims carry it, for operators).
    pub fn new(redis: R, sink: S, interval: Duration, lease_ttl: Duration, id: String) -> Self {
        let interval_ms = u64::try_from(interval.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let lease_ms = u64::try_from(lease_ttl.as_millis()).unwrap_or(u64::MAX);
        Self {
            redis,
            sink,
            interval_ms,
            claim_ttl_ms: (5 * interval_ms).max(2 * lease_ms),
            id,
        }
    }

    /// Ticks while `leadership` says so, until `shutdown`.
    pub async fn run(self, mut leadership: Leadership, shutdown: CancellationToken) {
        loop {
            // Wait to lead. A renewal also counts as a change, which merely re-checks.
            while !is_leader(&leadership) {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    changed = leadership.changed() => if changed.is_err() { return },
                }
            }

            let slot = next_slot(unix_ms_now(), self.interval_ms);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = sleep(Duration::from_millis(slot.saturating_sub(unix_ms_now()))) => {}
            }
            // Leadership may have ended while sleeping; a stale slot is skipped, not sent late.
            if !is_leader(&leadership) {
                continue;
            }
            if unix_ms_now() >= slot + self.interval_ms {
                debug!(slot, "slot passed while waiting; skipped");
                continue;
            }
            match self.tick(slot).await {
                Ok(Some(seq)) => debug!(slot, seq, "tick"),
                Ok(None) => debug!(slot, "slot already claimed by another process"),
                Err(e) => warn!(slot, error = %e, "tick failed"),
            }
        }
    }

    /// Claims `slot` and publishes its tick; `None` when another process had claimed it.
    async fn tick(&self, slot: u64) -> Result<Option<u64>, String> {
        let claimed = lease::claim_slot(&self.redis, slot, &self.id, self.claim_ttl_ms)
            .await
            .map_err(|e: LeaseError| e.to_string())?;
        let Some(seq) = claimed else {
            return Ok(None);
        };
        self.sink.publish(&Tick::at(slot, seq)).await?;
        Ok(Some(seq))
    }
}

/// A node's ticks on the memory bus: every slot, `seq` counting from 1, until `shutdown`.
pub async fn run_alone(bus: Bus, interval: Duration, shutdown: CancellationToken) {
    let step = u64::try_from(interval.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let mut seq = 0;
    loop {
        let slot = next_slot(unix_ms_now(), step);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = sleep(Duration::from_millis(slot.saturating_sub(unix_ms_now()))) => {}
        }
        seq += 1;
        let tick = Tick::at(slot, seq);
        if let Err(e) = bus.publish(CHANNEL, tick.to_json().as_bytes()).await {
            warn!(error = %e, "tick not published");
        }
    }
}

// === a node's ticks ===

/// Start the node's ticks (`ticks` on): alone on the memory bus, in the tick lease on Redis.
/// The task ends after `shutdown`, once a held lease is released.
pub fn spawn(
    config: &Config,
    node_name: &str,
    bus: Bus,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let interval = Duration::from_millis(config.tick_interval_ms);
    let Some(url) = config.redis.url.as_deref() else {
        return tokio::spawn(run_alone(bus, interval, shutdown));
    };
    let redis = match NodeRedis::new(url, &config.redis) {
        Ok(redis) => redis,
        Err(e) => {
            // `redis.url` was validated; a pool that cannot be built is a bug, not a config.
            warn!(error = %e, "cannot start the node's ticks");
            return tokio::spawn(async {});
        }
    };
    let lease_ttl = Duration::from_millis(config.tick_lease_ttl_ms);
    let id = format!("gateway:{node_name}:{}", uuid::Uuid::new_v4().simple());
    let (leadership_tx, leadership) = tokio::sync::watch::channel(None);
    let lease = lease::Lease::new(redis.clone(), id.clone(), lease_ttl);
    let ticker = LeasedTicker::new(redis, BusSink(bus), interval, lease_ttl, id);
    tokio::spawn(async move {
        tokio::join!(
            lease.run(leadership_tx, |_| {}, shutdown.clone()),
            ticker.run(leadership, shutdown.clone()),
        );
    })
}

/// The connections of a node's lease and claims: a small pool of their own (the bus's pool
/// serves sessions), with the node's Redis timeouts.
#[derive(Clone)]
struct NodeRedis {
    pool: deadpool_redis::Pool,
    /// The URL without its password, for messages.
    url: std::sync::Arc<str>,
    prefix: std::sync::Arc<str>,
}

impl NodeRedis {
    fn new(url: &str, config: &RedisConfig) -> Result<NodeRedis, String> {
        let limit = Some(Duration::from_millis(config.timeout_ms));
        let mut pool_config = deadpool_redis::Config::from_url(url);
        let mut settings = deadpool_redis::PoolConfig::new(2);
        settings.timeouts = deadpool_redis::Timeouts {
            wait: limit,
            create: limit,
            recycle: limit,
        };
        pool_config.pool = Some(settings);
        let pool = pool_config
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .map_err(|e| e.to_string())?;
        Ok(NodeRedis {
            pool,
            url: redact_url(url).into(),
            prefix: config.prefix.as_str().into(),
        })
    }
}

impl LeaseRedis for NodeRedis {
    type Connection = deadpool_redis::Connection;

    async fn connection(&self) -> Result<deadpool_redis::Connection, LeaseError> {
        self.pool.get().await.map_err(|e| {
            LeaseError::Unavailable(format!("cannot reach Redis at {}: {e}", self.url))
        })
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
}

/// A node's ticks go out through its bus, live (no history: only the publisher writes it).
struct BusSink(Bus);

impl TickSink for BusSink {
    async fn publish(&self, tick: &Tick) -> Result<(), String> {
        self.0
            .publish(CHANNEL, tick.to_json().as_bytes())
            .await
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_aligned_to_the_interval() {
        assert_eq!(next_slot(1_000, 1_000), 2_000);
        assert_eq!(next_slot(1_999, 1_000), 2_000);
        assert_eq!(next_slot(2_000, 200), 2_200);
        assert_eq!(next_slot(2_001, 200), 2_200);
    }

    #[test]
    fn payload_shape() {
        let v: serde_json::Value =
            serde_json::from_str(&Tick::at(1_700_000_000_123, 7).to_json()).unwrap();
        assert_eq!(v["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["unix_ms"], 1_700_000_000_123u64);
        assert_eq!(v["seq"], 7);
        assert_eq!(
            Tick::at(1_795_784_470_123, 7).to_json(),
            r#"{"time":"2026-11-27T13:01:10.123Z","unix_ms":1795784470123,"seq":7}"#
        );
    }
}
