//! Leader election: a Redis lease that decides which replica ticks.
//!
//! The lease is one key, `<prefix>publisher:leader`, whose value is the holder's random id:
//!
//! - **acquire**: `SET key id NX PX ttl`. In the same round trip a compare-and-renew (for a
//!   holder that lost track after a failed renewal but still holds the key) and a `PTTL`, so a
//!   follower sleeps exactly until the current lease can expire and takes over at once when
//!   its holder died: a dead leader is replaced within `lease.ttl_ms` of its last renewal.
//! - **renew**: every ttl/3, by the holder only (a compare-and-renew script).
//! - **release**: on shutdown, by the holder only (compare-and-delete), so a replica that
//!   stops cleanly hands over without waiting for the TTL.
//!
//! Leadership is published on a `watch` channel as "leader until this `Instant`": the moment a
//! renewal fails (an error, a timeout, or someone else's id in the key) it becomes `None`, so a
//! leader that cannot renew stops ticking at once, and a renewal that merely hangs cannot extend
//! leadership past the TTL measured from before the last successful command was sent (which is
//! earlier than Redis' own expiry of the key). Even so two replicas may briefly both believe they
//! lead (a paused process, clock jumps); the tick module's per-slot claim keeps that harmless.
//!
//! Scripts are sent with `EVAL` rather than `EVALSHA`: they are a few dozen bytes, and `EVAL`
//! never meets `NOSCRIPT` after a Redis restart.

use std::time::Duration;

use deadpool_redis::redis;
use tokio::sync::watch;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::pool::{RedisError, RedisPool};

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

/// "Leader until this instant", or `None` while not leading.
pub type Leadership = watch::Receiver<Option<Instant>>;

/// True while `leadership` says this process leads, right now.
pub fn is_leader(leadership: &Leadership) -> bool {
    leadership
        .borrow()
        .is_some_and(|until| Instant::now() < until)
}

/// One replica's side of the lease.
pub struct Lease {
    redis: RedisPool,
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

impl Lease {
    /// `id` must be unique among the replicas sharing the Redis (and prefix).
    pub fn new(redis: RedisPool, id: String, ttl: Duration) -> Self {
        let key = redis.key("publisher:leader");
        Self {
            redis,
            key,
            id,
            ttl,
        }
    }

    /// Competes for the lease until `shutdown`, publishing leadership on `leadership` and the
    /// `publisher_leader` gauge; releases the lease on the way out.
    pub async fn run(
        self,
        leadership: watch::Sender<Option<Instant>>,
        metrics: Metrics,
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
                        metrics.leader.set(0);
                        match outcome {
                            Err(e) => {
                                warn!(id = %self.id, error = %e, "lease renewal failed; no longer leader")
                            }
                            Ok(_) => {
                                warn!(id = %self.id, "lease taken over by another replica; no longer leader")
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
                        metrics.leader.set(1);
                        info!(id = %self.id, "acquired the tick lease; now leader");
                        started + renew_every
                    }
                    Ok(Attempt::HeldElsewhere(remaining)) => {
                        failing = false;
                        debug!(?remaining, "lease held by another replica");
                        // Wake when the holder's lease can first expire, but look again at
                        // least every renewal period.
                        started + remaining.clamp(Duration::from_millis(5), renew_every)
                    }
                    Err(e) => {
                        if !failing {
                            failing = true;
                            warn!(error = %e, "lease acquisition failed; will retry");
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
            metrics.leader.set(0);
            match self.bounded(renew_every, self.release()).await {
                Ok(()) => info!(id = %self.id, "released the tick lease"),
                Err(e) => {
                    warn!(error = %e, "could not release the tick lease; it expires by itself")
                }
            }
        }
    }

    /// `SET NX PX`, compare-and-renew and `PTTL` in one round trip.
    async fn try_acquire(&self) -> Result<Attempt, RedisError> {
        let ttl_ms = self.ttl_ms();
        let mut conn = self.redis.get().await?;
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
    async fn renew(&self) -> Result<bool, RedisError> {
        let mut conn = self.redis.get().await?;
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

    async fn release(&self) -> Result<(), RedisError> {
        let mut conn = self.redis.get().await?;
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
        operation: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> Result<T, RedisError> {
        timeout(limit, operation)
            .await
            .unwrap_or(Err(RedisError::Timeout(limit)))
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX)
    }
}
