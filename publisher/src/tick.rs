//! Ticks: `{"time":"2026-11-27T13:01:10.000Z","unix_ms":1795784470000,"seq":42}` on
//! `tick.channel` every `tick.interval_ms`, published only while this replica leads.
//!
//! Ticks fall on *slots*, the multiples of the interval since the Unix epoch. Each wait is
//! computed afresh from the wall clock to the next slot boundary, so the schedule never drifts
//! by the time spent publishing, and a slot that has passed entirely (the process was paused)
//! is skipped rather than published late in a burst. `time` and `unix_ms` are the slot's time,
//! not the moment the message happened to leave, so every replica agrees on what a slot is.
//!
//! Before publishing, the leader claims the slot and takes the next sequence number in one
//! script: `SET <prefix>publisher:tick:slot:<unix_ms> id NX PX …` and, only when that claim
//! succeeds, `INCR <prefix>publisher:tick:seq`. So even two replicas that both believe they
//! lead (see `lease`) publish each slot at most once, and `seq` grows by one per published
//! tick across leader changes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_redis::redis;
use serde::Serialize;
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::alert::rfc3339_millis;
use crate::channel::Channel;
use crate::lease::{is_leader, Leadership};
use crate::pool::RedisError;
use crate::publish::{Message, Publisher};

/// Claims a slot and, if the claim is new, returns the next sequence number (else nil).
/// KEYS[1] slot key, KEYS[2] sequence key; ARGV[1] claimant id, ARGV[2] claim TTL in ms.
const CLAIM: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return false";

/// The tick message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tick {
    pub time: String,
    pub unix_ms: u64,
    pub seq: u64,
}

/// The tick loop of one replica.
pub struct Ticker {
    publisher: Publisher,
    channel: Channel,
    interval_ms: u64,
    /// Claims outlive the slot by several intervals and by more than a lease handover, so a
    /// replica that takes over late (or runs a little behind in wall-clock time) still sees
    /// that a slot was already published.
    claim_ttl_ms: u64,
    id: String,
    seq_key: String,
}

impl Ticker {
    pub fn new(
        publisher: Publisher,
        channel: Channel,
        interval: Duration,
        lease_ttl: Duration,
        id: String,
    ) -> Self {
        let interval_ms = u64::try_from(interval.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let lease_ms = u64::try_from(lease_ttl.as_millis()).unwrap_or(u64::MAX);
        let seq_key = publisher.redis().key("publisher:tick:seq");
        Self {
            publisher,
            channel,
            interval_ms,
            claim_ttl_ms: (5 * interval_ms).max(2 * lease_ms),
            id,
            seq_key,
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
                Ok(Some(seq)) => {
                    self.publisher.metrics().ticks_total.inc();
                    debug!(slot, seq, "tick");
                }
                Ok(None) => debug!(slot, "slot already claimed by another replica"),
                Err(e) => warn!(slot, error = %e, "tick failed"),
            }
        }
    }

    /// Claims `slot` and publishes its tick; `None` when another replica had claimed it.
    async fn tick(&self, slot: u64) -> Result<Option<u64>, RedisError> {
        let slot_key = self
            .publisher
            .redis()
            .key(&format!("publisher:tick:slot:{slot}"));
        let seq: Option<u64> = {
            let mut conn = self.publisher.redis().get().await?;
            redis::cmd("EVAL")
                .arg(CLAIM)
                .arg(2)
                .arg(&slot_key)
                .arg(&self.seq_key)
                .arg(&self.id)
                .arg(self.claim_ttl_ms)
                .query_async(&mut conn)
                .await?
        };
        let Some(seq) = seq else {
            return Ok(None);
        };
        let tick = Tick {
            time: rfc3339_millis(UNIX_EPOCH + Duration::from_millis(slot)),
            unix_ms: slot,
            seq,
        };
        self.publisher
            .publish(&Message::json(self.channel.clone(), &tick))
            .await?;
        Ok(Some(seq))
    }
}

/// The first slot boundary strictly after `now_ms`.
fn next_slot(now_ms: u64, interval_ms: u64) -> u64 {
    (now_ms / interval_ms + 1) * interval_ms
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
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
    fn tick_serializes_in_the_documented_shape() {
        let tick = Tick {
            time: rfc3339_millis(UNIX_EPOCH + Duration::from_millis(1_795_784_470_123)),
            unix_ms: 1_795_784_470_123,
            seq: 7,
        };
        assert_eq!(
            serde_json::to_string(&tick).unwrap(),
            r#"{"time":"2026-11-27T13:01:10.123Z","unix_ms":1795784470123,"seq":7}"#
        );
    }
}
