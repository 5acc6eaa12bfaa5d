//! The `gateway` program: flags, configuration, binding, then [`crate::run`].
//!
//! Exit codes: 0 after a clean drain, 1 when a port cannot be bound or serving fails, 2 when
//! the configuration is invalid (the message names the key).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// WebSocket push gateway node.
#[derive(Debug, Parser)]
#[command(name = "gateway", version, about)]
struct Args {
    /// TOML configuration file (then GATEWAY__… environment variables, then these flags).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Client address (`listen`).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Operator address for /metrics (`admin_listen`).
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<String>,
    /// Redis URL (`redis.url`); without one the node runs alone on the memory bus.
    #[arg(long, value_name = "URL")]
    redis_url: Option<String>,
    /// Node name in welcome frames (`node_name`).
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
}

impl Args {
    fn overrides(&self) -> Vec<(&'static str, String)> {
        [
            ("listen", &self.listen),
            ("admin_listen", &self.admin_listen),
            ("redis.url", &self.redis_url),
            ("node_name", &self.node_name),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
        .collect()
    }
}

/// Entry point of the `gateway` binary.
pub fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours for a terminal only: a file or a pipe (journald, docker logs) gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let config = match Config::load(args.config.as_deref(), &args.overrides()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("gateway: {e}");
            std::process::exit(2);
        }
    };
    // Each connection is a file descriptor; the usual soft limit (1024) is far below
    // `limits.max_connections`, so raise it to the hard limit.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) if (n as usize) < config.limits.max_connections => tracing::warn!(
            nofile = n,
            max_connections = config.limits.max_connections,
            "open-file limit is below limits.max_connections"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gateway: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(serve(config)) {
        eprintln!("gateway: {e:#}");
        std::process::exit(1);
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen_addr())
        .await
        .with_context(|| format!("binding listen {}", config.listen))?;
    let admin = tokio::net::TcpListener::bind(config.admin_listen_addr())
        .await
        .with_context(|| format!("binding admin_listen {}", config.admin_listen))?;
    let shutdown = CancellationToken::new();
    crate::shutdown::on_signals(shutdown.clone());
    crate::run(listener, admin, config, shutdown).await?;
    Ok(())
}
