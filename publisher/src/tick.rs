//! Ticks: `{"time":"2026-11-27T13:01:10.000Z","unix_ms":1795784470000,"seq":42}` on
//! `tick.channel` every `tick.interval_ms`, published only while this replica leads.
//!
//! The loop, its slots and the per-slot claim are `gateway::ticker::LeasedTicker` (see there
//! and `gateway::lease`): each slot is claimed in Redis before it is published, and the claim
//! takes the next `seq`, so even two processes that both believe they lead publish each slot
//! at most once, and `seq` grows by one per published tick across leader changes, whether the
//! ticks come from a publisher or from a gateway in the same lease. This module is the
//! publisher's end of it: ticks go through [`Publisher`], so they carry history offsets.

use std::time::Duration;

pub use gateway::ticker::Tick;
use gateway::ticker::{LeasedTicker, TickSink};

use crate::channel::Channel;
use crate::publish::{Message, Publisher};

/// The tick loop of one replica: the shared loop, publishing through [`Publisher`].
pub type Ticker = LeasedTicker<crate::pool::RedisPool, PublisherTicks>;

/// Builds the replica's tick loop; `id` is its lease id.
pub fn ticker(
    publisher: Publisher,
    channel: Channel,
    interval: Duration,
    lease_ttl: Duration,
    id: String,
) -> Ticker {
    let redis = publisher.redis().clone();
    LeasedTicker::new(
        redis,
        PublisherTicks { publisher, channel },
        interval,
        lease_ttl,
        id,
    )
}

/// Where the publisher's ticks go: `tick.channel`, with history, counted in
/// `publisher_ticks_total`.
pub struct PublisherTicks {
    publisher: Publisher,
    channel: Channel,
}

impl TickSink for PublisherTicks {
    async fn publish(&self, tick: &Tick) -> Result<(), String> {
        self.publisher
            .publish(&Message::json(self.channel.clone(), tick))
            .await
            .map_err(|e| e.to_string())?;
        self.publisher.metrics().ticks_total.inc();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_serializes_in_the_documented_shape() {
        let tick = Tick::at(1_795_784_470_123, 7);
        assert_eq!(
            serde_json::to_string(&tick).unwrap(),
            r#"{"time":"2026-11-27T13:01:10.123Z","unix_ms":1795784470123,"seq":7}"#
        );
    }
}
