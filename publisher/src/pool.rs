//! The Redis connection pool: connection and response timeouts, readiness PING, key prefix,
//! and error messages that say which Redis could not be reached (without its password).
//!
//! Every Redis operation of the publisher takes a connection from here, so no operation can
//! hang: a connection attempt fails after `redis.connect_timeout_ms`, a command after
//! `redis.response_timeout_ms`.

use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::redis::{self, AsyncConnectionConfig};
use deadpool_redis::{Connection, Manager, Pool, PoolError, Runtime};

use crate::config::RedisConfig;

/// A cheap-to-clone handle on the pool plus the key prefix.
#[derive(Clone)]
pub struct RedisPool {
    pool: Pool,
    /// The URL with any credentials replaced, for messages.
    url: Arc<str>,
    prefix: Arc<str>,
    response_timeout: Duration,
}

/// A Redis operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// No connection could be had: refused, timed out, DNS, authentication…
    #[error("cannot reach Redis at {url}: {reason}")]
    Unreachable { url: Arc<str>, reason: String },
    /// Connected, but the command failed or timed out.
    #[error("Redis command failed: {0}")]
    Command(#[from] redis::RedisError),
    /// An operation with its own deadline (lease renewal, readiness check) ran out of time.
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
}

impl RedisPool {
    /// Builds the pool. No connection is made until the first operation, so this succeeds
    /// while Redis is down; only a malformed URL fails (and `Config::validate` catches that).
    pub fn new(config: &RedisConfig) -> Result<Self, RedisError> {
        let url: Arc<str> = redact(config.url.expose()).into();
        let connect_timeout = Duration::from_millis(config.connect_timeout_ms);
        let response_timeout = Duration::from_millis(config.response_timeout_ms);
        let connection = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(response_timeout));
        let manager = Manager::new_with_config(config.url.expose(), connection).map_err(|e| {
            RedisError::Unreachable {
                url: url.clone(),
                reason: e.to_string(),
            }
        })?;
        let pool = Pool::builder(manager)
            .max_size(config.pool_size)
            .runtime(Runtime::Tokio1)
            // Belt and braces over the connection's own timeouts: getting a connection never
            // waits longer than one connection attempt plus one PING.
            .wait_timeout(Some(connect_timeout + response_timeout))
            .create_timeout(Some(connect_timeout))
            .recycle_timeout(Some(response_timeout))
            .build()
            .map_err(|e| RedisError::Unreachable {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            pool,
            url,
            prefix: config.prefix.as_str().into(),
            response_timeout,
        })
    }

    /// A pooled connection (a multiplexed connection: commands on it may be pipelined).
    pub async fn get(&self) -> Result<Connection, RedisError> {
        self.pool.get().await.map_err(|e| self.unreachable(e))
    }

    /// Succeeds when Redis answers a PING in time.
    pub async fn ping(&self) -> Result<(), RedisError> {
        let mut conn = self.get().await?;
        let ping_cmd = redis::cmd("PING");
        let ping = ping_cmd.query_async::<String>(&mut conn);
        match tokio::time::timeout(self.response_timeout, ping).await {
            Ok(result) => result.map(drop).map_err(RedisError::from),
            Err(_) => Err(RedisError::Timeout(self.response_timeout)),
        }
    }

    /// `redis.prefix` + `name`: the Redis name of a channel or key.
    pub fn key(&self, name: &str) -> String {
        let mut key = String::with_capacity(self.prefix.len() + name.len());
        key.push_str(&self.prefix);
        key.push_str(name);
        key
    }

    /// `redis.prefix`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The Redis URL with credentials hidden.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn unreachable(&self, error: PoolError) -> RedisError {
        let reason = match error {
            PoolError::Backend(e) => e.to_string(),
            PoolError::Timeout(_) => "timed out".to_owned(),
            other => other.to_string(),
        };
        RedisError::Unreachable {
            url: self.url.clone(),
            reason,
        }
    }
}

/// Hides the user-info part of a URL: `redis://:secret@host:6379` → `redis://***@host:6379`
/// (the gateway's definition: both programs name their Redis the same way).
pub use gateway::config::redact_url as redact;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_credentials_only() {
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact("redis://:p%40ss@db:6379/0"), "redis://***@db:6379/0");
        assert_eq!(redact("redis://user:pw@db/1?x=@"), "redis://***@db/1?x=@");
        assert_eq!(redact("not a url"), "not a url");
    }
}
