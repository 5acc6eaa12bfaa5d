//! The `publisher` command line: flags, configuration loading, subcommands, exit codes.
//!
//! ```text
//! publisher [--config FILE] [--listen ADDR] [--redis-url URL] [--set KEY=VALUE]... [COMMAND]
//!   run                                        the service (the default)
//!   alert --level LEVEL [--title T] TEXT...    publish an alert on alerts.channel
//!   publish CHANNEL DATA                       publish DATA (JSON, else a JSON string)
//!   tail FILE [--channel logs] [--from-start]  publish each new line of FILE
//!   token --sub ID [--channels P,..] [--publish P,..] [--ttl 1h]
//!                                              print a client token signed with auth.secret
//!   presence CHANNEL                           print who is in CHANNEL (JSON lines)
//!   disconnect CLIENT_ID                       close every session of a client (4409)
//!   unsubscribe CLIENT_ID CHANNEL              remove a channel from a client's sessions
//!   channels                                   print the channels gateways subscribe to
//! ```
//!
//! Exit codes: 0 success, 1 runtime failure (Redis unreachable, port taken, unreadable file),
//! 2 bad usage or configuration (the message names the flag or key). One-shot commands need
//! no running service, only Redis, and give up after the Redis timeouts instead of hanging.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::alert::{Alert, Level};
use crate::channel::Channel;
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::pool::RedisPool;
use crate::publish::{Message, Publisher};
use crate::tail::TailOptions;

/// Producer service of the push gateway: ticks, alerts, publish API, log tail.
#[derive(Debug, Parser)]
#[command(name = "publisher", version)]
pub struct Cli {
    /// TOML configuration file (keys as in deploy/publisher.toml).
    #[arg(long, short = 'c', global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Sets `listen`, the HTTP API address.
    #[arg(long, global = true, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Sets `redis.url`, a single Redis. For a Redis Cluster set `redis.cluster_nodes`
    /// instead, e.g. `--set redis.cluster_nodes=redis://r1:7000,redis://r2:7000`.
    #[arg(long, global = true, value_name = "URL")]
    pub redis_url: Option<String>,
    /// Sets any configuration key, e.g. `--set tick.interval_ms=500`; repeatable.
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service: HTTP API and /metrics on `listen`, ticks while holding the lease.
    Run,
    /// Publish an alert {"level","title","text","at"} on `alerts.channel`.
    Alert {
        /// How serious it is.
        #[arg(long, value_enum)]
        level: Level,
        /// A short headline; published as null when absent.
        #[arg(long)]
        title: Option<String>,
        /// The alert text; several words are joined with spaces.
        #[arg(required = true, num_args = 1..)]
        text: Vec<String>,
    },
    /// Publish DATA on CHANNEL: as given when it is valid JSON, else as a JSON string.
    Publish {
        /// 1-128 characters of A-Z a-z 0-9 _ - . : @
        channel: String,
        /// The payload, e.g. '{"text":"hi"}' or plain words.
        data: String,
    },
    /// Follow FILE and publish each new line as {"line","file"} on a channel.
    Tail {
        /// The file to follow; rotation by truncation or by rename and recreate is followed.
        file: PathBuf,
        /// The channel to publish on.
        #[arg(long, default_value = "logs")]
        channel: String,
        /// Publish the lines already in the file too, not only new ones.
        #[arg(long)]
        from_start: bool,
    },
    /// Print a client token (HS256 JWT) for the gateways, signed with `auth.secret`.
    Token {
        /// The client id (`sub`): 1-123 characters of A-Z a-z 0-9 _ - . : @
        #[arg(long)]
        sub: String,
        /// Channel patterns the client may subscribe to, comma-separated (`*` = any run of
        /// characters); absent = any channel.
        #[arg(long, value_delimiter = ',')]
        channels: Option<Vec<String>>,
        /// Channel patterns the client may publish to, comma-separated; replaces the gateway's
        /// `client_publish` for this client. Absent = `client_publish`.
        #[arg(long, value_delimiter = ',')]
        publish: Option<Vec<String>>,
        /// How long the token is valid, e.g. 15m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
    /// Print who is in a presence channel, one JSON object {"client_id","session","node"} per
    /// line.
    Presence {
        /// 1-128 characters of A-Z a-z 0-9 _ - . : @
        channel: String,
    },
    /// Close every session of a client on every gateway node with 4409 (no reconnect).
    Disconnect {
        /// The client id.
        client_id: String,
    },
    /// Remove CHANNEL from every session of a client on every gateway node.
    Unsubscribe {
        /// The client id.
        client_id: String,
        /// The channel to remove.
        channel: String,
    },
    /// Print the channels at least one gateway node is subscribed to, one per line.
    Channels,
}

/// Runs the program and exits; see the module doc for exit codes.
pub fn main() -> ! {
    let cli = Cli::parse();
    let code = run_cli(cli);
    std::process::exit(code)
}

fn run_cli(cli: Cli) -> i32 {
    let command = cli.command.unwrap_or(Command::Run);
    let long_running = matches!(command, Command::Run | Command::Tail { .. });
    init_tracing(if long_running { "info" } else { "warn" });

    let config = match load_config(cli.config, cli.listen, cli.redis_url, &cli.set) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("publisher: configuration error: {e}");
            return 2;
        }
    };

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("publisher: cannot start the runtime: {e}");
            return 1;
        }
    };
    let result = runtime.block_on(execute(command, config));
    // Do not wait for blocking-pool work (a file read) beyond this point.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => 0,
        Err(Failure::Usage(message)) => {
            eprintln!("publisher: {message}");
            2
        }
        Err(Failure::Runtime(message)) => {
            eprintln!("publisher: {message}");
            1
        }
    }
}

enum Failure {
    Usage(String),
    Runtime(String),
}

impl Failure {
    fn runtime(error: impl std::fmt::Display) -> Self {
        Self::Runtime(error.to_string())
    }
}

async fn execute(command: Command, config: Config) -> Result<(), Failure> {
    match command {
        Command::Token {
            sub,
            channels,
            publish,
            ttl,
        } => {
            let token = crate::token::mint(&config, &sub, channels, publish, ttl)
                .map_err(|e| Failure::Usage(e.to_string()))?;
            println!("{token}");
            Ok(())
        }
        Command::Run => {
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .map_err(|e| {
                    Failure::Runtime(format!("cannot listen on {}: {e}", config.listen))
                })?;
            let shutdown = CancellationToken::new();
            crate::shutdown::cancel_on_signal(shutdown.clone());
            crate::run(listener, config, shutdown)
                .await
                .map_err(Failure::runtime)
        }
        Command::Alert { level, title, text } => {
            let alert = Alert::new(level, title, text.join(" "))
                .map_err(|e| Failure::Usage(e.to_string()))?;
            publish_once(&config, Message::json(config.alerts_channel(), &alert)).await
        }
        Command::Publish { channel, data } => {
            let channel = parse_channel(&channel)?;
            publish_once(&config, Message::from_text(channel, &data)).await
        }
        Command::Presence { channel } => {
            let channel = parse_channel(&channel)?;
            let redis = RedisPool::new(&config.redis).map_err(Failure::runtime)?;
            let clients = crate::server_api::presence(&redis, &channel)
                .await
                .map_err(Failure::runtime)?;
            for client in clients {
                println!("{}", serde_json::to_string(&client).unwrap_or_default());
            }
            Ok(())
        }
        Command::Disconnect { client_id } => {
            check_client_id(&client_id)?;
            let message = gateway::control::ControlMessage::Disconnect { client_id };
            send_control(&config, message).await
        }
        Command::Unsubscribe { client_id, channel } => {
            check_client_id(&client_id)?;
            let channel = parse_channel(&channel)?.to_string();
            let message = gateway::control::ControlMessage::Unsubscribe { client_id, channel };
            send_control(&config, message).await
        }
        Command::Channels => {
            let redis = RedisPool::new(&config.redis).map_err(Failure::runtime)?;
            let channels = crate::server_api::channels(&redis)
                .await
                .map_err(Failure::runtime)?;
            for channel in channels {
                println!("{channel}");
            }
            Ok(())
        }
        Command::Tail {
            file,
            channel,
            from_start,
        } => {
            let options = TailOptions {
                path: file,
                channel: parse_channel(&channel)?,
                from_start,
                poll_interval: std::time::Duration::from_millis(config.tail.poll_interval_ms),
                max_line_bytes: config.tail.max_line_bytes,
                batch_lines: config.tail.batch_lines,
                rotate_grace: std::time::Duration::from_millis(config.tail.rotate_grace_ms),
            };
            let publisher = one_shot_publisher(&config)?;
            let shutdown = CancellationToken::new();
            crate::shutdown::cancel_on_signal(shutdown.clone());
            crate::tail::run(publisher, options, shutdown)
                .await
                .map_err(Failure::runtime)
        }
    }
}

fn check_client_id(id: &str) -> Result<(), Failure> {
    if gateway::protocol::valid_client_id(id) {
        Ok(())
    } else {
        Err(Failure::Usage(format!(
            "bad client id {id:?}: {}",
            gateway::protocol::CLIENT_ID_RULE
        )))
    }
}

/// Publish a control message to every gateway node.
async fn send_control(
    config: &Config,
    message: gateway::control::ControlMessage,
) -> Result<(), Failure> {
    let redis = RedisPool::new(&config.redis).map_err(Failure::runtime)?;
    crate::server_api::control(&redis, message)
        .await
        .map_err(Failure::runtime)
}

fn parse_channel(name: &str) -> Result<Channel, Failure> {
    Channel::parse(name).map_err(|e| Failure::Usage(format!("bad channel {name:?}: {e}")))
}

/// A publisher for a command that is not the service: its metrics are never served.
fn one_shot_publisher(config: &Config) -> Result<Publisher, Failure> {
    let redis = RedisPool::new(&config.redis).map_err(Failure::runtime)?;
    Ok(Publisher::new(
        redis,
        Metrics::new(&[]),
        config.history.clone(),
    ))
}

/// The one-shot commands: publish `message` and print its payload.
async fn publish_once(config: &Config, message: Message) -> Result<(), Failure> {
    one_shot_publisher(config)?
        .publish(&message)
        .await
        .map_err(Failure::runtime)?;
    println!("{}", String::from_utf8_lossy(&message.payload));
    Ok(())
}

/// Flags become the last configuration layer; `--listen` and `--redis-url` are shorthands
/// for `--set listen=…` and `--set redis.url=…`.
fn load_config(
    file: Option<PathBuf>,
    listen: Option<String>,
    redis_url: Option<String>,
    set: &[String],
) -> Result<Config, ConfigError> {
    let mut overrides = Vec::new();
    for pair in set {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(ConfigError::Invalid {
                key: pair.clone(),
                message: "--set expects KEY=VALUE".to_owned(),
            });
        };
        overrides.push((key.trim().to_owned(), value.to_owned()));
    }
    if let Some(listen) = listen {
        overrides.push(("listen".to_owned(), listen));
    }
    if let Some(url) = redis_url {
        overrides.push(("redis.url".to_owned(), url));
    }
    Config::load(file.as_deref(), None, &overrides)
}

/// Logs go to stderr; `RUST_LOG` overrides the default level.
fn init_tracing(default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
