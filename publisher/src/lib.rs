//! The publisher: the producer side of the push gateway (docs/REFERENCE.md §3). It emits ticks
//! while it holds a Redis lease, takes alerts and publish requests over HTTP and the command line,
//! and tails log files onto channels. Everything it sends goes through [`publish::Publisher`].
//!
//! # Layout
//!
//! - [`cli`]: flags, subcommands, exit codes; `main.rs` only calls [`cli::main`].
//! - [`config`]: the typed configuration and its layers (defaults, TOML, env, flags).
//! - [`channel`]: the channel-name rule.
//! - [`pool`]: the Redis handle (a pool, or a Redis Cluster connection), its timeouts and
//!   readiness check.
//! - [`publish`]: turning messages into Redis traffic: stream append + publish, one script.
//! - [`alert`]: the alert request and the alert message.
//! - [`lease`]: leader election over a Redis lease (the protocol is `gateway::lease`, shared
//!   with gateways that tick on the same Redis).
//! - [`tick`]: the aligned tick loop the leader runs (`gateway::ticker`'s, publishing here).
//! - [`api`]: the HTTP API, `/metrics`, `/healthz`, `/readyz`.
//! - [`server_api`]: the server API's Redis side: presence, history pages, channels, and the
//!   control messages (disconnect, unsubscribe) to every gateway node.
//! - [`tail`]: following a log file.
//! - [`token`]: client tokens for the gateways (`publisher token`).
//! - [`metrics`]: the Prometheus registry.
//! - [`shutdown`]: SIGTERM/SIGINT to a cancellation token.
//!
//! # Invariants
//!
//! - Nothing is published that failed validation: requests are checked whole first.
//! - Only a process that holds the lease *right now* ticks, and each tick slot is published at
//!   most once whatever the processes believe (see [`tick`]); gateways that tick on the same
//!   Redis are in the same lease.
//! - No Redis operation waits without a deadline.
//! - The publisher keeps no state that must survive a restart: the lease, the tick sequence
//!   and the slot claims live in Redis.

pub mod alert;
pub mod api;
pub mod channel;
pub mod cli;
pub mod config;
pub mod lease;
pub mod metrics;
pub mod pool;
pub mod publish;
pub mod server_api;
pub mod shutdown;
pub mod tail;
pub mod tick;
pub mod token;

use std::future::IntoFuture;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use crate::config::Config;

use crate::lease::Lease;
use crate::metrics::Metrics;
use crate::pool::RedisPool;
use crate::publish::Publisher;

/// Why the service could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration error: {0}")]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Redis(#[from] pool::RedisError),
    #[error("HTTP server failed: {0}")]
    Serve(#[from] std::io::Error),
}

/// Runs the service on `listener` until `shutdown` is cancelled: the HTTP API, and (with
/// `tick.enabled`) the lease and the tick loop. Redis may be down at start; the service then
/// reports not-ready and keeps trying. On shutdown it stops accepting, lets requests in flight
/// finish for up to `drain_timeout_ms`, releases the lease and returns `Ok`.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    config.validate()?;
    let redis = RedisPool::new(&config.redis)?;
    let metrics = Metrics::new(&[config.tick_channel(), config.alerts_channel()]);
    let publisher = Publisher::new(redis.clone(), metrics.clone(), config.history.clone());
    let drain = Duration::from_millis(config.drain_timeout_ms);

    let tasks = TaskTracker::new();
    if config.tick.enabled {
        let id = uuid::Uuid::new_v4().to_string();
        let (leadership_tx, leadership_rx) = watch::channel(None);
        let lease = Lease::new(redis.clone(), id.clone(), config.lease_ttl());
        let leader = metrics.leader.clone();
        tasks.spawn(lease.run(
            leadership_tx,
            move |leading| leader.set(i64::from(leading)),
            shutdown.child_token(),
        ));
        let ticker = tick::ticker(
            publisher.clone(),
            config.tick_channel(),
            config.tick_interval(),
            config.lease_ttl(),
            id,
        );
        tasks.spawn(ticker.run(leadership_rx, shutdown.child_token()));
    }
    tasks.close();

    let app = api::router(publisher, &config, shutdown.clone());
    info!(
        addr = %listener.local_addr()?,
        redis = %redis.target(),
        ticks = config.tick.enabled,
        "publisher listening"
    );
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .into_future();
    let drain_deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(drain).await;
    };
    tokio::select! {
        result = server => result?,
        () = drain_deadline => warn!(?drain, "requests still running after the drain timeout; closing them"),
    }

    // The server may also have stopped by itself; make sure every task sees the end.
    shutdown.cancel();
    if tokio::time::timeout(drain, tasks.wait()).await.is_err() {
        warn!(
            ?drain,
            "background tasks did not stop within the drain timeout"
        );
    }
    info!("publisher stopped");
    Ok(())
}
