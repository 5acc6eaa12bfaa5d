//! The publisher's Redis handle, for a single Redis or a Redis Cluster: connection and response
//! timeouts, the readiness check, the key prefix, and error messages that say which Redis could
//! not be reached (without its password).
//!
//! Every Redis operation of the publisher takes a [`Connection`] from here, so no operation can
//! hang: a connection attempt fails after `redis.connect_timeout_ms`, a command after
//! `redis.response_timeout_ms`. Both modes hand out the same [`Connection`] type, so the code
//! above this module sends the same commands either way:
//!
//! - **Standalone** (`redis.url`): a deadpool pool of `redis.pool_size` multiplexed connections.
//! - **Cluster** (`redis.cluster_nodes`): one `redis::cluster_async::ClusterConnection`, shared
//!   by every caller. It is multiplexed already and keeps one connection per cluster node; it
//!   routes each command by its first key, follows `MOVED` and `ASK`, refreshes its slot map
//!   after a `MOVED`, and retries `TRYAGAIN` and `CLUSTERDOWN` — all within the response
//!   timeout, which the crate applies to a whole request, retries included. It is made on
//!   first use, so the service starts while the cluster is down. deadpool-redis's cluster pool
//!   is not used: its manager cannot set the connect and response timeouts, and its recycling
//!   PINGs every primary, so one dead shard would discard every pooled connection.
//!
//! What the cluster connection does not do is split a pipeline: all of a pipeline's keys must
//! hash to one slot (the crate refuses anything else with `CROSSSLOT` before sending).
//! [`crate::publish`] splits its batches by slot.

use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::redis::aio::ConnectionLike;
use deadpool_redis::redis::cluster::{ClusterClient, ClusterClientBuilder};
use deadpool_redis::redis::cluster_async::ClusterConnection;
use deadpool_redis::redis::{self, AsyncConnectionConfig, RedisFuture};
use deadpool_redis::{Manager, Pool, PoolError, Runtime};
use tokio::sync::OnceCell;

use crate::config::{RedisConfig, RedisTarget, Secret};

/// A cheap-to-clone handle on the Redis (or Redis Cluster) plus the key prefix.
#[derive(Clone)]
pub struct RedisPool {
    backend: Backend,
    /// What is being reached, with credentials hidden, for messages: `Redis at redis://…` or
    /// `Redis Cluster at redis://…,redis://…`.
    target: Arc<str>,
    prefix: Arc<str>,
    response_timeout: Duration,
}

#[derive(Clone)]
enum Backend {
    Standalone(Pool),
    Cluster(Arc<ClusterLink>),
}

/// The cluster connection, made on first use.
struct ClusterLink {
    client: ClusterClient,
    /// Concurrent first users wait for one attempt; a failed attempt leaves it empty, so the
    /// next operation tries again. Once made, the connection repairs itself (reconnecting
    /// nodes, re-reading the topology, going back to the seeds when every node is gone).
    connection: OnceCell<ClusterConnection>,
    /// Bound on making the connection: seeds in parallel, one slot-map query, then every node
    /// in parallel.
    connect_deadline: Duration,
}

/// A connection of either mode; commands and pipelines are sent on it as on any redis-rs
/// connection.
pub enum Connection {
    /// A pooled multiplexed connection (commands on it may be pipelined).
    Standalone(deadpool_redis::Connection),
    /// A clone of the shared cluster connection.
    Cluster(ClusterConnection),
}

/// A Redis operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// No connection could be had: refused, timed out, DNS, authentication…
    #[error("cannot reach {target}: {reason}")]
    Unreachable { target: Arc<str>, reason: String },
    /// Connected, but the command failed or timed out.
    #[error("Redis command failed: {0}")]
    Command(#[from] redis::RedisError),
    /// An operation with its own deadline (lease renewal, readiness check) ran out of time.
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    /// The cluster answered, but does not serve every slot (`cluster_state:fail`).
    #[error("the Redis Cluster reports cluster_state:{0}")]
    ClusterDown(String),
}

// === impl RedisPool ===

impl RedisPool {
    /// Builds the handle. No connection is made until the first operation, so this succeeds
    /// while Redis is down; only a malformed URL fails (and `Config::validate` catches that).
    pub fn new(config: &RedisConfig) -> Result<Self, RedisError> {
        let connect_timeout = Duration::from_millis(config.connect_timeout_ms);
        let response_timeout = Duration::from_millis(config.response_timeout_ms);
        let (backend, target) = match config.target() {
            RedisTarget::Standalone(url) => {
                let target: Arc<str> = format!("Redis at {}", redact(url.expose())).into();
                let pool = standalone_pool(config, url, connect_timeout, response_timeout)
                    .map_err(|reason| RedisError::Unreachable {
                        target: target.clone(),
                        reason,
                    })?;
                (Backend::Standalone(pool), target)
            }
            RedisTarget::Cluster(nodes) => {
                let seeds: Vec<String> = nodes.iter().map(|n| redact(n.expose())).collect();
                let target: Arc<str> = format!("Redis Cluster at {}", seeds.join(",")).into();
                let client = ClusterClientBuilder::new(nodes.iter().map(Secret::expose))
                    .connection_timeout(connect_timeout)
                    .response_timeout(response_timeout)
                    .build()
                    .map_err(|e| RedisError::Unreachable {
                        target: target.clone(),
                        reason: e.to_string(),
                    })?;
                let link = ClusterLink {
                    client,
                    connection: OnceCell::new(),
                    connect_deadline: 2 * connect_timeout + response_timeout,
                };
                (Backend::Cluster(Arc::new(link)), target)
            }
        };
        Ok(Self {
            backend,
            target,
            prefix: config.prefix.as_str().into(),
            response_timeout,
        })
    }

    /// A connection: pooled (standalone), or the shared cluster connection.
    pub async fn get(&self) -> Result<Connection, RedisError> {
        match &self.backend {
            Backend::Standalone(pool) => pool
                .get()
                .await
                .map(Connection::Standalone)
                .map_err(|e| self.unreachable(pool_error_reason(e))),
            Backend::Cluster(link) => link
                .connection()
                .await
                .map(Connection::Cluster)
                .map_err(|reason| self.unreachable(reason)),
        }
    }

    /// Succeeds when Redis can take messages: a single Redis answers a PING in time; a cluster
    /// answers `CLUSTER INFO` (on any node) with `cluster_state:ok`, i.e. every slot is served
    /// by a reachable primary as the cluster itself sees it.
    pub async fn ping(&self) -> Result<(), RedisError> {
        let mut conn = self.get().await?;
        let check = async {
            match self.backend {
                Backend::Standalone(_) => {
                    redis::cmd("PING").query_async::<String>(&mut conn).await?;
                    Ok(())
                }
                Backend::Cluster(_) => {
                    let info = redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query_async::<String>(&mut conn)
                        .await?;
                    match cluster_state(&info) {
                        Some("ok") => Ok(()),
                        state => Err(RedisError::ClusterDown(
                            state.unwrap_or("unknown").to_owned(),
                        )),
                    }
                }
            }
        };
        tokio::time::timeout(self.response_timeout, check)
            .await
            .unwrap_or(Err(RedisError::Timeout(self.response_timeout)))
    }

    /// True in cluster mode: channels are shard channels (SPUBLISH), and a pipeline must stay
    /// within one hash slot.
    pub fn is_cluster(&self) -> bool {
        matches!(self.backend, Backend::Cluster(_))
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

    /// What this handle reaches, with credentials hidden: `Redis at redis://…` or
    /// `Redis Cluster at redis://…,…`.
    pub fn target(&self) -> &str {
        &self.target
    }

    fn unreachable(&self, reason: String) -> RedisError {
        RedisError::Unreachable {
            target: self.target.clone(),
            reason,
        }
    }
}

fn standalone_pool(
    config: &RedisConfig,
    url: &Secret,
    connect_timeout: Duration,
    response_timeout: Duration,
) -> Result<Pool, String> {
    let connection = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(Some(response_timeout));
    let manager = Manager::new_with_config(url.expose(), connection).map_err(|e| e.to_string())?;
    Pool::builder(manager)
        .max_size(config.pool_size)
        .runtime(Runtime::Tokio1)
        // Belt and braces over the connection's own timeouts: getting a connection never
        // waits longer than one connection attempt plus one PING.
        .wait_timeout(Some(connect_timeout + response_timeout))
        .create_timeout(Some(connect_timeout))
        .recycle_timeout(Some(response_timeout))
        .build()
        .map_err(|e| e.to_string())
}

fn pool_error_reason(error: PoolError) -> String {
    match error {
        PoolError::Backend(e) => e.to_string(),
        PoolError::Timeout(_) => "timed out".to_owned(),
        other => other.to_string(),
    }
}

/// The value of `cluster_state` in a `CLUSTER INFO` answer.
fn cluster_state(info: &str) -> Option<&str> {
    info.lines()
        .find_map(|line| line.trim().strip_prefix("cluster_state:"))
}

// === impl ClusterLink ===

impl ClusterLink {
    /// The connection, made now if it is not yet. The attempt runs in its own task, so a
    /// caller with a shorter deadline of its own (a lease renewal) that gives up does not
    /// cancel it: it completes for the callers after it.
    async fn connection(self: &Arc<Self>) -> Result<ClusterConnection, String> {
        if let Some(connection) = self.connection.get() {
            return Ok(connection.clone());
        }
        let link = Arc::clone(self);
        let attempt = tokio::spawn(async move {
            link.connection
                .get_or_try_init(|| async {
                    match tokio::time::timeout(
                        link.connect_deadline,
                        link.client.get_async_connection(),
                    )
                    .await
                    {
                        Ok(Ok(connection)) => Ok(connection),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err(format!("timed out after {:?}", link.connect_deadline)),
                    }
                })
                .await
                .cloned()
        });
        attempt
            .await
            .unwrap_or_else(|e| Err(format!("the connection attempt failed: {e}")))
    }
}

// === impl Connection ===

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, redis::Value> {
        match self {
            Self::Standalone(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Standalone(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Standalone(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
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

    #[test]
    fn reads_the_cluster_state() {
        let info = "cluster_enabled:1\r\ncluster_state:fail\r\ncluster_slots_assigned:16384\r\n";
        assert_eq!(cluster_state(info), Some("fail"));
        assert_eq!(cluster_state("cluster_state:ok"), Some("ok"));
        assert_eq!(cluster_state("nothing"), None);
    }

    #[test]
    fn messages_name_the_mode_and_hide_passwords() {
        let cluster = crate::Config {
            redis: RedisConfig {
                cluster_nodes: vec![
                    Secret::new("redis://:pw@r1:7000"),
                    Secret::new("redis://:pw@r2:7000"),
                ],
                ..RedisConfig::default()
            },
            ..crate::Config::default()
        };
        let pool = RedisPool::new(&cluster.redis).unwrap();
        assert!(pool.is_cluster());
        assert_eq!(
            pool.target(),
            "Redis Cluster at redis://***@r1:7000,redis://***@r2:7000"
        );
        let standalone = RedisPool::new(&RedisConfig::default()).unwrap();
        assert!(!standalone.is_cluster());
        assert_eq!(standalone.target(), "Redis at redis://127.0.0.1:6379");
    }
}
