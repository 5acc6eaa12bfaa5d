//! The tick lease and the per-slot claims: how every process that ticks on a Redis (the
//! publisher's replicas, and gateways with `ticks = true` and a `redis.url`) agrees that one of
//! them ticks, so that a deployment never has two tickers. The publisher uses this module as
//! it is (`publisher::lease`, `publisher::tick`), so both programs follow one protocol on the
//! same keys.
//!
//! The lease is one key, `<prefix>publisher:leader`, whose value is the holder's random id:
//!
//! - **acquire**: `SET key id NX PX ttl`. In the same round trip a compare-and-renew (for a
//!   holder that lost track after a failed renewal but still holds the key) and a `PTTL`, so a
//!   follower sleeps exactly until the current lease can expire and takes over at once when
//!   its holder died: a dead leader is replaced within the TTL of its last renewal.
//! - **renew**: every ttl/3, by the holder only (a compare-and-renew script).
//! - **release**: on shutdown, by the holder only (compare-and-delete), so a process that
//!   stops cleanly hands over without waiting for the TTL.
//!
//! Leadership is published on a `watch` channel as "leader until this `Instant`": the moment a
//! renewal fails (an error, a timeout, or someone else's id in the key) it becomes `None`, so a
//! leader that cannot renew stops ticking at once, and a renewal that merely hangs cannot extend
//! leadership past the TTL measured from before the last successful command was sent (which is
//! earlier than Redis' own expiry of the key). Even so two processes may briefly both believe
//! they lead (a paused process, clock jumps); the per-slot claim ([`claim_slot`]) keeps that
//! harmless: a slot is published by whoever claims `<prefix>publisher:tick:slot:<unix_ms>`
//! first, and only that claim takes the next `seq` from `<prefix>publisher:tick:seq`.
//!
//! On a Redis Cluster ([`Keys::HashTagged`]; only publishers tick there) the same keys carry
//! the `{publisher}` hash tag, `<prefix>{publisher}:leader` and so on: the claim script touches
//! a slot's claim and the counter, which must then be in one hash slot.
//!
//! Scripts are sent with `EVAL` rather than `EVALSHA`: they are a few dozen bytes, and `EVAL`
//! never meets `NOSCRIPT` after a Redis restart or a failover.

use std::future::Future;
use std::time::Duration;

use deadpool_redis::redis;
use tokio::sync::watch;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The lease key (before the prefix). Named after the publisher, which held it first; kept so
/// that publishers and gateways of different versions still share one lease.
pub const LEASE_KEY: &str = "publisher:leader";
/// The tick sequence counter (before the prefix).
pub const SEQ_KEY: &str = "publisher:tick:seq";

/// The claim key of the tick slot at `unix_ms` (before the prefix).
pub fn slot_key(unix_ms: u64) -> String {
    format!("publisher:tick:slot:{unix_ms}")
}

/// How the lease's keys are named (before the prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keys {
    /// A single Redis: [`LEASE_KEY`], [`SEQ_KEY`], [`slot_key`].
    Plain,
    /// A Redis Cluster: the same names under the `{publisher}` hash tag, all in one slot.
    HashTagged,
}

impl Keys {
    /// The lease key.
    pub fn lease(self) -> &'static str {
        match self {
            Self::Plain => LEASE_KEY,
            Self::HashTagged => "{publisher}:leader",
        }
    }

    /// The tick sequence counter.
    pub fn seq(self) -> &'static str {
        match self {
            Self::Plain => SEQ_KEY,
            Self::HashTagged => "{publisher}:tick:seq",
        }
    }

    /// The claim key of the tick slot at `unix_ms`.
    pub fn slot(self, unix_ms: u64) -> String {
        match self {
            Self::Plain => slot_key(unix_ms),
            Self::HashTagged => format!("{{publisher}}:tick:slot:{unix_ms}"),
        }
    }
}

/// Sets the key's expiry only while it still holds our id. KEYS[1] lease, ARGV id, ttl ms.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";

/// Deletes the key only while it still holds our id. KEYS[1] lease, ARGV[1] id.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// Claims a slot and, if the claim is new, returns the next sequence number (else nil).
/// KEYS[1] slot key, KEYS[2] sequence key; ARGV[1] claimant id, ARGV[2] claim TTL in ms.
const CLAIM: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return false";

/// Where the lease gets its Redis connections and how it names keys: the publisher's pool,
/// or the one a ticking gateway opens for it.
pub trait LeaseRedis: Send + Sync {
    type Connection: redis::aio::ConnectionLike + Send;

    /// A connection, or why none could be had (the message names the Redis, without its
    /// password).
    fn connection(&self) -> impl Future<Output = Result<Self::Connection, LeaseError>> + Send;

    /// `redis.prefix` + `name`.
    fn key(&self, name: &str) -> String;

    /// How the keys are named here: [`Keys::Plain`] on a single Redis, [`Keys::HashTagged`] on
    /// a Redis Cluster.
    fn keys(&self) -> Keys {
        Keys::Plain
    }
}

/// A lease or claim operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// No connection could be had.
    #[error("{0}")]
    Unavailable(String),
    /// Connected, but the command failed.
    #[error("Redis command failed: {0}")]
    Command(#[from] redis::RedisError),
    /// The operation ran out of its time (a slow Redis must not stretch a lease period).
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
}

/// "Leader until this instant", or `None` while not leading.
pub type Leadership = watch::Receiver<Option<Instant>>;

/// True while `leadership` says this process leads, right now.
pub fn is_leader(leadership: &Leadership) -> bool {
    leadership
        .borrow()
        .is_some_and(|until| Instant::now() < until)
}

/// One process's side of the lease.
pub struct Lease<R> {
    redis: R,
    key: String,
    id: String,
    ttl: Duration,
}

/// The outcome of an acquisition attempt.
enum Attempt {
    Acquired,
    /// Someone else holds the lease for about this much longer.
    HeldElsewhere(Duration),
}

// === impl Lease ===

impl<R: LeaseRedis> Lease<R> {
    /// `id` must be unique among the processes sharing the Redis (and prefix).
    pub fn new(redis: R, id: String, ttl: Duration) -> Self {
        let key = redis.key(redis.keys().lease());
        Self {
            redis,
            key,
            id,
            ttl,
        }
    }

    /// Competes for the lease until `shutdown`, publishing leadership on `leadership` and
    /// telling `on_change` (true = now leader) when it is won or lost; releases the lease on
    /// the way out.
    pub async fn run(
        self,
        leadership: watch::Sender<Option<Instant>>,
        on_change: impl Fn(bool) + Send,
        shutdown: CancellationToken,
    ) {
        let renew_every = self.ttl / 3;
        // Leadership ends a little before the TTL, measured from before the command was sent.
        let hold_for = self.ttl - self.ttl / 10;
        let mut held = false;
        // Log a Redis failure once per outage, not once per attempt.
        let mut failing = false;

        loop {
            let started = Instant::now();
            let next = if held {
                match self.bounded(renew_every, self.renew()).await {
                    Ok(true) => {
                        failing = false;
                        leadership.send_replace(Some(started + hold_for));
                        started + renew_every
                    }
                    outcome => {
                        held = false;
                        leadership.send_replace(None);
                        on_change(false);
                        match outcome {
                            Err(e) => {
                                warn!(id = %self.id, error = %e, "tick lease renewal failed; no longer leader")
                            }
                            Ok(_) => {
                                warn!(id = %self.id, "tick lease taken over by another process; no longer leader")
                            }
                        }
                        // Retry soon: the key may well still be ours.
                        started + renew_every / 4
                    }
                }
            } else {
                match self.bounded(renew_every, self.try_acquire()).await {
                    Ok(Attempt::Acquired) => {
                        failing = false;
                        held = true;
                        leadership.send_replace(Some(started + hold_for));
                        on_change(true);
                        info!(id = %self.id, "acquired the tick lease; now leader");
                        started + renew_every
                    }
                    Ok(Attempt::HeldElsewhere(remaining)) => {
                        failing = false;
                        debug!(?remaining, "tick lease held by another process");
                        // Wake when the holder's lease can first expire, but look again at
                        // least every renewal period.
                        started + remaining.clamp(Duration::from_millis(5), renew_every)
                    }
                    Err(e) => {
                        if !failing {
                            failing = true;
                            warn!(error = %e, "tick lease acquisition failed; will retry");
                        }
                        started + renew_every
                    }
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = sleep_until(next) => {}
            }
        }

        if held {
            leadership.send_replace(None);
            on_change(false);
            match self.bounded(renew_every, self.release()).await {
                Ok(()) => info!(id = %self.id, "released the tick lease"),
                Err(e) => {
                    warn!(error = %e, "could not release the tick lease; it expires by itself")
                }
            }
        }
    }

    /// `SET NX PX`, compare-and-renew and `PTTL` in one round trip.
    async fn try_acquire(&self) -> Result<Attempt, LeaseError> {
        let ttl_ms = self.ttl_ms();
        let mut conn = self.redis.connection().await?;
        let (set, renewed, pttl): (Option<String>, i64, i64) = redis::pipe()
            .cmd("SET")
            .arg(&self.key)
            .arg(&self.id)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .cmd("EVAL")
            .arg(RENEW)
            .arg(1)
            .arg(&self.key)
            .arg(&self.id)
            .arg(ttl_ms)
            .cmd("PTTL")
            .arg(&self.key)
            .query_async(&mut conn)
            .await?;
        if set.is_some() || renewed == 1 {
            return Ok(Attempt::Acquired);
        }
        // -2: the key vanished since the SET (try again soon); -1: a key without expiry, which
        // only an operator can have set (look again after a renewal period).
        let remaining = match pttl {
            -2 => Duration::ZERO,
            -1 => self.ttl / 3,
            ms => Duration::from_millis(ms.unsigned_abs()),
        };
        Ok(Attempt::HeldElsewhere(remaining))
    }

    /// True when the lease was still ours and now runs for another TTL.
    async fn renew(&self) -> Result<bool, LeaseError> {
        let mut conn = self.redis.connection().await?;
        let renewed: i64 = redis::cmd("EVAL")
            .arg(RENEW)
            .arg(1)
            .arg(&self.key)
            .arg(&self.id)
            .arg(self.ttl_ms())
            .query_async(&mut conn)
            .await?;
        Ok(renewed == 1)
    }

    async fn release(&self) -> Result<(), LeaseError> {
        let mut conn = self.redis.connection().await?;
        redis::cmd("EVAL")
            .arg(RELEASE)
            .arg(1)
            .arg(&self.key)
            .arg(&self.id)
            .query_async::<i64>(&mut conn)
            .await?;
        Ok(())
    }

    /// Runs `operation` for at most `limit`: a slow Redis must not stretch a lease period.
    async fn bounded<T>(
        &self,
        limit: Duration,
        operation: impl Future<Output = Result<T, LeaseError>>,
    ) -> Result<T, LeaseError> {
        timeout(limit, operation)
            .await
            .unwrap_or(Err(LeaseError::Timeout(limit)))
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX)
    }
}

/// Claims the tick slot at `unix_ms` for `id` and takes the next sequence number, in one
/// script; `None` when another process had claimed the slot. Claims expire after
/// `claim_ttl_ms`, which must outlive the slot by more than a lease handover.
pub async fn claim_slot<R: LeaseRedis>(
    redis: &R,
    unix_ms: u64,
    id: &str,
    claim_ttl_ms: u64,
) -> Result<Option<u64>, LeaseError> {
    let keys = redis.keys();
    let mut conn = redis.connection().await?;
    let seq: Option<u64> = redis::cmd("EVAL")
        .arg(CLAIM)
        .arg(2)
        .arg(redis.key(&keys.slot(unix_ms)))
        .arg(redis.key(keys.seq()))
        .arg(id)
        .arg(claim_ttl_ms)
        .query_async(&mut conn)
        .await?;
    Ok(seq)
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::cluster_routing::Slot;

    #[test]
    fn plain_keys_keep_their_names_and_tagged_ones_share_a_slot() {
        assert_eq!(Keys::Plain.lease(), "publisher:leader");
        assert_eq!(Keys::Plain.seq(), "publisher:tick:seq");
        assert_eq!(Keys::Plain.slot(1000), "publisher:tick:slot:1000");
        let tagged = Keys::HashTagged;
        assert_eq!(tagged.slot(1000), "{publisher}:tick:slot:1000");
        // With any prefix (the prefix comes before the tag and never contains braces).
        for prefix in ["", "app1:"] {
            let slot = Slot::for_key(format!("{prefix}{}", tagged.lease()));
            assert_eq!(Slot::for_key(format!("{prefix}{}", tagged.seq())), slot);
            assert_eq!(Slot::for_key(format!("{prefix}{}", tagged.slot(7))), slot);
        }
    }
}
