//! The node's command connections to Redis (everything but pub/sub): client publishes, the
//! history script, and the small expiring keys of the node's SSE sessions. A deadpool pool of multiplexed connections on a single Redis, or
//! deadpool-redis's cluster pool on a Redis Cluster, where the crate routes every command to
//! the shard of its key (a script by its keys, SPUBLISH by its channel) and follows `MOVED`.

use std::time::Duration;

use deadpool_redis::redis::{self, aio::ConnectionLike};

use crate::bus::BusError;
use crate::config::RedisConfig;

/// How many script calls run at once on a cluster (the connection pipelines them).
const CLUSTER_CONCURRENCY: usize = 64;

pub enum Commands {
    Standalone(deadpool_redis::Pool),
    Cluster(deadpool_redis::cluster::Pool),
}

/// One call of a script: its keys and arguments.
pub struct ScriptCall {
    pub keys: Vec<String>,
    pub args: Vec<String>,
}

impl Commands {
    /// The pool the configuration asks for. No connection is made yet.
    pub fn new(config: &RedisConfig) -> Commands {
        let op_timeout = Duration::from_millis(config.timeout_ms);
        let mut pool_settings = deadpool_redis::PoolConfig::new(config.pool_size);
        pool_settings.timeouts = deadpool_redis::Timeouts {
            wait: Some(op_timeout),
            create: Some(op_timeout),
            recycle: Some(op_timeout),
        };
        if config.is_cluster() {
            let mut cluster =
                deadpool_redis::cluster::Config::from_urls(config.cluster_nodes.clone());
            cluster.pool = Some(pool_settings);
            return Commands::Cluster(
                cluster
                    .create_pool(Some(deadpool_redis::Runtime::Tokio1))
                    .expect("redis.cluster_nodes was validated"),
            );
        }
        let mut standalone =
            deadpool_redis::Config::from_url(config.url.clone().unwrap_or_default());
        standalone.pool = Some(pool_settings);
        Commands::Standalone(
            standalone
                .create_pool(Some(deadpool_redis::Runtime::Tokio1))
                .expect("redis.url was validated"),
        )
    }

    /// `SCRIPT LOAD` of `code` on a single Redis: None when no connection could be had. (On a
    /// cluster the script is loaded per node as calls need it: None.)
    pub async fn load_script(&self, code: &str) -> Option<Result<String, redis::RedisError>> {
        match self {
            Commands::Standalone(pool) => {
                let mut conn = pool.get().await.ok()?;
                Some(
                    redis::cmd("SCRIPT")
                        .arg("LOAD")
                        .arg(code)
                        .query_async::<String>(&mut conn)
                        .await,
                )
            }
            Commands::Cluster(_) => None,
        }
    }

    /// PUBLISH (SPUBLISH on a cluster) `payload` on the Redis channel `key`.
    pub async fn publish(&self, key: &str, payload: &[u8]) -> Result<(), BusError> {
        let unavailable = |e: &dyn std::fmt::Display| BusError::Unavailable(e.to_string());
        match self {
            Commands::Standalone(pool) => {
                let mut conn = pool.get().await.map_err(|e| unavailable(&e))?;
                publish_on(&mut conn, "PUBLISH", key, payload).await
            }
            Commands::Cluster(pool) => {
                let mut conn = pool.get().await.map_err(|e| unavailable(&e))?;
                publish_on(&mut conn, "SPUBLISH", key, payload).await
            }
        }
    }

    /// `SET key value PX ttl_ms` for every entry: one pipeline on a single Redis, concurrent
    /// commands on a cluster (each routed to its key's shard).
    pub async fn set_px(&self, entries: &[(String, String)], ttl_ms: u64) -> Result<(), BusError> {
        let unavailable = |e: &dyn std::fmt::Display| BusError::Unavailable(e.to_string());
        match self {
            Commands::Standalone(pool) => {
                let mut pipe = redis::pipe();
                for (key, value) in entries {
                    pipe.cmd("SET")
                        .arg(key)
                        .arg(value)
                        .arg("PX")
                        .arg(ttl_ms)
                        .ignore();
                }
                let mut conn = pool.get().await.map_err(|e| unavailable(&e))?;
                pipe.query_async::<()>(&mut conn)
                    .await
                    .map_err(|e| unavailable(&e))
            }
            Commands::Cluster(pool) => {
                let conn = pool.get().await.map_err(|e| unavailable(&e))?;
                for chunk in entries.chunks(CLUSTER_CONCURRENCY) {
                    let sets = chunk.iter().map(|(key, value)| {
                        let mut conn = conn.clone();
                        async move {
                            redis::cmd("SET")
                                .arg(key)
                                .arg(value)
                                .arg("PX")
                                .arg(ttl_ms)
                                .query_async::<()>(&mut conn)
                                .await
                        }
                    });
                    for result in futures_util::future::join_all(sets).await {
                        result.map_err(|e| unavailable(&e))?;
                    }
                }
                Ok(())
            }
        }
    }

    /// `GET key`.
    pub async fn get(&self, key: &str) -> Result<Option<String>, BusError> {
        let unavailable = |e: &dyn std::fmt::Display| BusError::Unavailable(e.to_string());
        let get = redis::cmd("GET").arg(key).clone();
        match self {
            Commands::Standalone(pool) => {
                let mut conn = pool.get().await.map_err(|e| unavailable(&e))?;
                get.query_async(&mut conn).await
            }
            Commands::Cluster(pool) => {
                let mut conn = pool.get().await.map_err(|e| unavailable(&e))?;
                get.query_async(&mut conn).await
            }
        }
        .map_err(|e| unavailable(&e))
    }

    /// `DEL key`.
    pub async fn del(&self, key: &str) -> Result<(), BusError> {
        let unavailable = |e: &dyn std::fmt::Display| BusError::Unavailable(e.to_string());
        let del = redis::cmd("DEL").arg(key).clone();
        match self {
            Commands::Standalone(pool) => {
                let mut conn = pool.get().await.map_err(|e| unavailable(&e))?;
                del.query_async::<()>(&mut conn).await
            }
            Commands::Cluster(pool) => {
                let mut conn = pool.get().await.map_err(|e| unavailable(&e))?;
                del.query_async::<()>(&mut conn).await
            }
        }
        .map_err(|e| unavailable(&e))
    }

    /// Run `script` once per call. The outer error: Redis did not answer; an inner one: that
    /// call failed on the server (its reply was an error).
    pub async fn eval_all(
        &self,
        code: &str,
        calls: &[ScriptCall],
    ) -> Result<Vec<Result<redis::Value, String>>, BusError> {
        let unavailable = |e: &dyn std::fmt::Display| BusError::Unavailable(e.to_string());
        let script = redis::Script::new(code);
        match self {
            Commands::Standalone(pool) => {
                // One round trip: load the script, then every call.
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                pipe.cmd("SCRIPT").arg("LOAD").arg(code).ignore();
                for call in calls {
                    let cmd = pipe
                        .cmd("EVALSHA")
                        .arg(script.get_hash())
                        .arg(call.keys.len());
                    for key in &call.keys {
                        cmd.arg(key);
                    }
                    for arg in &call.args {
                        cmd.arg(arg);
                    }
                }
                let mut conn = pool.get().await.map_err(|e| unavailable(&e))?;
                let replies: Vec<redis::Value> = pipe
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| unavailable(&e))?;
                if replies.len() != calls.len() {
                    return Err(BusError::Unavailable("unexpected pipeline reply".into()));
                }
                let mut results = Vec::with_capacity(replies.len());
                for reply in replies {
                    results.push(match reply {
                        redis::Value::ServerError(e) if e.kind().is_some_and(not_yet) => {
                            return Err(unavailable(&e));
                        }
                        redis::Value::ServerError(e) => Err(e.to_string()),
                        reply => Ok(reply),
                    });
                }
                Ok(results)
            }
            Commands::Cluster(pool) => {
                // The cluster connection routes each call to its keys' shard (loading the
                // script there when it has not seen it) and pipelines concurrent calls.
                let conn = pool.get().await.map_err(|e| unavailable(&e))?;
                let mut results = Vec::with_capacity(calls.len());
                for chunk in calls.chunks(CLUSTER_CONCURRENCY) {
                    let chunk = chunk.iter().map(|call| {
                        let (mut conn, script) = (conn.clone(), script.clone());
                        let (keys, args) = (call.keys.clone(), call.args.clone());
                        async move {
                            let mut invocation = script.prepare_invoke();
                            for key in keys {
                                invocation.key(key);
                            }
                            for arg in args {
                                invocation.arg(arg);
                            }
                            invocation.invoke_async::<redis::Value>(&mut conn).await
                        }
                    });
                    results.extend(futures_util::future::join_all(chunk).await);
                }
                results
                    .into_iter()
                    .map(|result| match result {
                        Ok(value) => Ok(Ok(value)),
                        Err(e) if transport(&e) => Err(unavailable(&e)),
                        Err(e) => Ok(Err(e.to_string())),
                    })
                    .collect()
            }
        }
    }
}

async fn publish_on(
    conn: &mut impl ConnectionLike,
    command: &str,
    key: &str,
    payload: &[u8],
) -> Result<(), BusError> {
    redis::cmd(command)
        .arg(key)
        .arg(payload)
        .query_async::<i64>(conn)
        .await
        .map(drop)
        .map_err(|e| BusError::Unavailable(e.to_string()))
}

/// Whether an error is about reaching Redis (retry later) rather than the command itself:
/// the connection, the cluster's topology (MOVED, ASK, TRYAGAIN, CLUSTERDOWN), or a node not
/// ready to answer yet.
fn transport(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_cluster_error()
        || matches!(e.kind(), redis::ErrorKind::Server(kind) if not_yet(kind))
}

/// A server refusal that says "not now" rather than "never": a node still loading its data
/// after a restart (a history read would find nothing yet), a replica whose primary is down.
/// A catch-up retries these; it never takes them for lost history.
fn not_yet(kind: redis::ServerErrorKind) -> bool {
    matches!(
        kind,
        redis::ServerErrorKind::BusyLoading
            | redis::ServerErrorKind::MasterDown
            | redis::ServerErrorKind::TryAgain
            | redis::ServerErrorKind::ClusterDown
    )
}
