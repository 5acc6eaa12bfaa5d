//! Leader election: the Redis tick lease that decides which replica ticks.
//!
//! The protocol (keys, scripts, renewal, release, slot claims) is `gateway::lease`, shared with
//! the gateways that tick on the same Redis, so that publishers and gateways take turns in one
//! lease and a deployment never has two tickers. This module connects it to the publisher's
//! pool: its connections, timeouts, key prefix, and key names (hash-tagged on a Redis Cluster).

pub use gateway::lease::{is_leader, Keys, Leadership, Lease, LeaseError, LeaseRedis};

use crate::pool::RedisPool;

impl LeaseRedis for RedisPool {
    type Connection = crate::pool::Connection;

    async fn connection(&self) -> Result<crate::pool::Connection, LeaseError> {
        // The pool's error names the Redis (without its password).
        self.get()
            .await
            .map_err(|e| LeaseError::Unavailable(e.to_string()))
    }

    fn key(&self, name: &str) -> String {
        RedisPool::key(self, name)
    }

    /// On a Redis Cluster the keys share the `{publisher}` hash tag (the claim script's two
    /// keys must be in one slot); on a single Redis they keep the names every version uses.
    fn keys(&self) -> Keys {
        if self.is_cluster() {
            Keys::HashTagged
        } else {
            Keys::Plain
        }
    }
}
